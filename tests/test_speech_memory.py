"""What a chat message costs the Piper engine: audio, phoneme pieces, and memory that comes back.

Issue 9 item 5: 200 characters of emoji became 46 s of audio and +820 MB of RSS that stayed;
400 characters of digits and symbols left +1.36 GB. The memory figures come from a subprocess
(``tests/speech_memory_probe.py``), so its VmRSS / VmHWM are that work's alone.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest

from live.speech import MAX_PHONEMES, PiperEngine, phoneme_pieces
from live.voices import Embedding

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

_ROOT = Path(__file__).resolve().parents[1]
_VOICE = Embedding(
    vector=np.zeros(256, dtype=np.float32), encoder_id="test", duration_s=5.0, created=0.0
)
# One segment (under segments()' 200 characters), one sentence: ~440 phonemes from espeak.
_LONG_SEGMENT = "98765432109876543210 12345678901234567890"


def _probe(*cases: str) -> dict[str, dict[str, float]]:
    done = subprocess.run(
        [sys.executable, "-m", "tests.speech_memory_probe", *cases],
        cwd=_ROOT,
        capture_output=True,
        timeout=540,
        check=True,
    )
    report: dict[str, dict[str, float]] = orjson.loads(done.stdout.splitlines()[-1])
    return report


def test_emoji_spam_and_hostile_digits_are_bounded_and_memory_comes_back() -> None:
    """Measured on a 2-core machine, old → new: the emoji messages 46 s and 10 s of audio → none;
    400 characters of digits and symbols kept +1.36 GB after the job (peak +1.38 GB, longest
    chunk 67 s) → +50-62 MB kept, peak +200 MB, longest chunk 10 s. The bounds leave room both
    ways."""
    report = _probe("emoji40", "emoji", "digits")
    warm = report["rss_warm_kib"]
    assert isinstance(warm, int)
    mib = 1024

    assert report["emoji40"]["audio_s"] == 0.0 and report["emoji"]["audio_s"] == 0.0
    assert report["emoji"]["rss_after_kib"] - warm < 50 * mib  # nothing was synthesized

    digits = report["digits"]
    assert digits["audio_s"] > 60  # all of it is spoken: digits are text
    assert digits["chunks"] >= 10  # ~2,800 phonemes in pieces of at most MAX_PHONEMES
    assert digits["longest_chunk_s"] < 20
    assert report["rss_end_kib"] - warm < 400 * mib  # memory taken for the job came back
    assert report["hwm_kib"] - warm < 800 * mib  # and no inference ever needed gigabytes


async def test_a_segment_far_over_the_phoneme_bound_comes_out_in_pieces(
    piper: PiperEngine,
) -> None:
    phonemes = [p for s in piper._voice.phonemize(_LONG_SEGMENT) for p in s]
    assert len(phonemes) > 2 * MAX_PHONEMES  # what this test is about: far over the bound

    chunks = [chunk async for chunk in piper.stream(_LONG_SEGMENT, _VOICE)]

    assert len(chunks) >= 3  # one inference per piece, each yielded as it is done
    for chunk in chunks:
        seconds = len(chunk) / piper.sample_rate
        assert 0.3 < seconds < 15  # ≤ 192 phonemes is ~9 s of speech
        assert chunk.dtype == np.float32
        assert 0.9 < float(np.max(np.abs(chunk))) <= 1.0  # audible, normalized as Piper does


async def test_an_everyday_sentence_is_one_inference(piper: PiperEngine) -> None:
    # A second sentence (a message's first may be cut at its clause for a sooner first audio).
    text = "Hi. Thanks for the follow, welcome in!"
    chunks = [chunk async for chunk in piper.stream(text, _VOICE)]
    assert len(chunks) == 2
    assert 1.0 < len(chunks[1]) / piper.sample_rate < 5.0


def test_phoneme_pieces_are_bounded_and_cut_at_clauses_then_words() -> None:
    def pieces(text: str, limit: int) -> list[str]:
        return ["".join(piece) for piece in phoneme_pieces(list(text), limit)]

    assert pieces("short", 192) == ["short"]
    assert pieces("ab cd ef gh", 5) == ["ab cd", "ef gh"]
    assert pieces("ab, cd ef gh", 9) == ["ab,", "cd ef gh"]  # a clause beats a later word
    assert pieces("abcdefghij", 4) == ["abcd", "efgh", "ij"]  # one endless word: cut anyway
    assert pieces("  ", 1) == []
    text = "one billion, two hundred thirty four million " * 40
    cut = phoneme_pieces(list(text), 64)
    assert all(0 < len(piece) <= 64 for piece in cut)
    assert " ".join("".join(piece) for piece in cut).split() == text.split()  # nothing lost
    with pytest.raises(ValueError):
        phoneme_pieces(["a"], 0)
