"""Component tests of the voice store's plain parts: L1, pinning, fingerprints, voice ids."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import soxr

from live.audio import Fingerprint, canonicalize, fingerprint
from live.voices import Embedding, EmbeddingL1, voice_id_for
from tests.clips import reference_clip


def emb(i: int) -> Embedding:
    return Embedding(np.full(4, i, dtype=np.float32), "enc", 1.0, 0.0)


def test_l1_evicts_least_recently_used_but_never_a_pinned_entry() -> None:
    l1 = EmbeddingL1(capacity=2)
    fps = [Fingerprint(f"fp{i}") for i in range(6)]
    l1.put(fps[0], emb(0))
    l1.pin(fps[0])  # pinned entries do not count against the capacity
    for i in range(1, 4):
        l1.put(fps[i], emb(i))
    assert l1.get(fps[1]) is None, "the least recently used unpinned entry went"
    assert l1.get(fps[0]) is not None, "the pinned entry survives, though the oldest"
    l1.get(fps[2])  # touch: fps[3] is now the older unpinned one
    l1.put(fps[4], emb(4))
    assert l1.get(fps[3]) is None and l1.get(fps[2]) is not None
    assert len(l1) == 3
    l1.pin(fps[0])  # a second session pins it too
    l1.unpin(fps[0])
    assert fps[0] in l1.pinned
    l1.unpin(fps[0])  # the last session let go: it is evictable again, and the oldest
    assert not l1.pinned and len(l1) == 2 and l1.get(fps[0]) is None


def _encode(pcm: np.ndarray, sr: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, pcm, sr, format=fmt)
    return buf.getvalue()


def test_fingerprint_is_of_content_not_container() -> None:
    rng = np.random.default_rng(1)
    pcm = (rng.standard_normal(44100 * 2) * 3000).astype(np.int16)
    wav, flac = _encode(pcm, 44100, "WAV"), _encode(pcm, 44100, "FLAC")
    assert wav != flac
    assert canonicalize(wav).fingerprint == canonicalize(flac).fingerprint
    louder = np.clip(pcm.astype(np.int32) * 2, -32768, 32767).astype(np.int16)
    assert canonicalize(_encode(louder, 44100, "WAV")).fingerprint != canonicalize(wav).fingerprint


def test_fingerprint_is_blake2b_256_hex() -> None:
    fp = fingerprint(np.zeros(16000, dtype=np.float32))
    assert len(fp) == 64 and int(fp, 16) >= 0


def test_voice_ids_are_scoped_to_the_tenant() -> None:
    fp = Fingerprint("ab" * 32)
    assert voice_id_for("alice", fp) == voice_id_for("alice", fp)
    assert voice_id_for("alice", fp) != voice_id_for("bob", fp)
    assert fp not in voice_id_for("alice", fp)


@pytest.mark.parametrize("channels", [1, 2, 6])
def test_canonical_clip_is_mono_16k(channels: int) -> None:
    speech, sr = reference_clip("piper")  # speech: a tone is refused as clip_not_speech
    first_2s = soxr.resample(speech, sr, 48000)[: 48000 * 2]
    pcm = np.stack([first_2s] * channels, axis=1).astype(np.float32)
    clip = canonicalize(_encode(pcm, 48000, "WAV"))
    assert clip.pcm.dtype == np.float32 and clip.pcm.ndim == 1
    assert clip.duration_s == pytest.approx(2.0, abs=0.01)
    assert clip.source_channels == channels and clip.source_rate == 48000
