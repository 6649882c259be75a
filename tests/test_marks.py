"""Marks (issue 13): words, visemes and the mouth, from the real Piper voice and from an engine
without alignments, over a real socket; the pure functions of ``live.marks`` directly."""

# ruff: noqa: RUF001  (IPA symbols in the phoneme tests are meant)

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from live.encoder import EncoderWorker
from live.marks import (
    MOUTH_RATE,
    VISEMES,
    Marks,
    MouthEnvelope,
    WordMark,
    rescale,
    share_words,
    text_words,
    viseme_of,
)
from live.pcm import PcmFramer
from live.speech import PiperEngine
from protocol import AudioFrame
from protocol.messages import AudioEnd, AudioMarks, AudioStart
from tests.clips import quantize, reference_clip, wav_bytes
from tests.fakes import GatedEngine
from tests.server import RawClient, live_server, raw_client

pytestmark = pytest.mark.timeout(120)

TEXT = "Thanks for the follow, Ada! It's 1234 o'clock, isn't it? Supercalifragilistic."
CLIP = wav_bytes(quantize(reference_clip("piper")[0]), reference_clip("piper")[1])
MOUTH_MIN_PEARSON = 0.8
"""The mouth must follow the audio's own RMS envelope (20 ms windows) at least this closely."""


def test_rescale_rounds_like_the_resampler_counts() -> None:
    assert rescale(22050, 22050, 48000) == 48000
    assert rescale(1, 22050, 48000) == 2  # 2.18 -> 2
    assert rescale(3, 22050, 16000) == 2  # 2.18 -> 2
    assert rescale(0, 22050, 16000) == 0
    for n in (1, 441, 1000, 22049, 123_457):
        for rate in (16000, 24000, 48000):
            assert rescale(n, 22050, rate) == round(n * rate / 22050)


@pytest.mark.parametrize("rate", [16000, 24000, 48000])
def test_the_framer_emits_as_many_samples_as_rescale_counts(rate: int) -> None:
    """A chunked stream of N engine samples comes out of ``PcmFramer`` as rescale(N) samples
    (±1): the mark positions and the audio count the same clock."""
    rng = np.random.default_rng(1)
    framer = PcmFramer(22050, rate, 100)
    total_in, out = 0, 0
    for size in (5000, 17, 30000, 441, 12345):
        chunk = (0.1 * rng.standard_normal(size)).astype(np.float32)
        total_in += size
        out += sum(len(f) // 2 for f in framer.feed(chunk))
    out += len(framer.flush()) // 2
    assert abs(out - rescale(total_in, 22050, rate)) <= 1


def test_words_are_shared_exactly_when_the_counts_agree() -> None:
    # "for the" is one espeak word; alone they are 2 and 2 sounds: split at the sound count.
    phonemes = ["θ", "æ", "ŋ", "k", "s", " ", "f", "ɚ", "ð", "ə", " ", "f", "ɑ", "l", "o", "ʊ"]
    assert share_words([5, 2, 2, 5], phonemes) == [(0, 4), (6, 7), (8, 9), (11, 15)]
    # more words than sounds: every word still gets a range, in order
    ranges = share_words([1, 1, 1], ["a"])
    assert len(ranges) == 3 and all(a <= b for a, b in ranges)


def test_text_words_keep_contractions_numbers_and_spoken_symbols() -> None:
    assert text_words("It's 3.5 o'clock, $5 & hello-world!") == [
        "It's",
        "3.5",
        "o'clock",
        "$",
        "5",
        "&",
        "hello-world",
    ]


def test_every_english_phoneme_has_a_viseme_of_the_oculus_set() -> None:
    for p in "pbmfvθðtdkɡŋszʃʒnlɹwjhaæɑɐʌeɛəɚɜiɪoɔuʊ":
        assert viseme_of(p) in VISEMES and viseme_of(p) != "sil", p
    assert viseme_of("aɪ") == "aa"
    assert viseme_of("?") == "sil"


def test_rescaled_marks_move_every_position() -> None:
    marks = Marks(22050, (WordMark("hi", 2205, 4410),))
    at48 = marks.rescaled(48000)
    assert at48.words == (WordMark("hi", 4800, 9600),)
    assert at48.sample_rate == 48000


def _rms_windows(pcm: np.ndarray, window: int) -> np.ndarray:
    n = len(pcm) // window
    frames = pcm[: n * window].astype(np.float64).reshape(n, window)
    rms: np.ndarray = np.sqrt(np.mean(frames * frames, axis=1))
    return rms


async def test_the_mouth_follows_the_audio_envelope(piper: PiperEngine) -> None:
    chunks = [chunk async for chunk in piper.stream(TEXT, None)]  # type: ignore[arg-type]
    envelope = MouthEnvelope(piper.sample_rate)
    values: list[float] = []
    starts: list[int] = []
    for chunk in chunks:
        mouth = envelope.feed(chunk)
        starts.append(mouth.start)
        values.extend(mouth.values)
    values.extend(envelope.feed(np.zeros(0, dtype=np.float32), last=True).values)
    pcm = np.concatenate(chunks)
    window = piper.sample_rate // MOUTH_RATE
    rms = _rms_windows(pcm, window)
    assert len(values) == -(-len(pcm) // window)
    assert all(0.0 <= v <= 1.0 for v in values)
    pearson = float(np.corrcoef(values[: len(rms)], rms)[0, 1])
    assert pearson >= MOUTH_MIN_PEARSON, pearson
    assert max(values) > 0.5 and min(values) < 0.05, "opens for speech, closes in pauses"


async def _speak_marked(
    client: RawClient, message_id: str, text: str, **extra: object
) -> tuple[AudioStart, list[tuple[int, AudioMarks]], AudioEnd, np.ndarray]:
    """Speak with marks; each ``audio.marks`` with the samples of the stream received
    before it."""
    await client.asend({"type": "speak", "id": message_id, "text": text, "marks": True, **extra})
    start: AudioStart | None = None
    marks: list[tuple[int, AudioMarks]] = []
    received = 0
    while True:
        item = await client.areceive()
        if isinstance(item, AudioFrame):
            received += len(item.pcm) // 2
        elif isinstance(item, AudioStart):
            start = item
        elif isinstance(item, AudioMarks):
            marks.append((received, item))
        elif isinstance(item, AudioEnd):
            assert start is not None
            pcm = np.frombuffer(
                b"".join(f.pcm for f in client.seen.frames[start.stream]), dtype="<i2"
            )
            return start, marks, item, pcm


def _words(marks: list[tuple[int, AudioMarks]]) -> list[dict[str, object]]:
    return [w for _, m in marks for w in (m.words or [])]


@pytest.mark.parametrize("rate", [None, 16000, 24000, 48000])
async def test_piper_marks_every_word_in_order_inside_the_stream_before_its_audio(
    encoder_worker: EncoderWorker, piper: PiperEngine, rate: int | None
) -> None:
    extra = {} if rate is None else {"sample_rate": rate}
    async with live_server(embedder=encoder_worker, engine=piper) as srv, raw_client(srv) as c:
        await c.aregister(CLIP, match=False)
        start, marks, end, pcm = await _speak_marked(c, "m1", TEXT, **extra)
    assert start.marks == ["words", "visemes", "mouth"]
    words = _words(marks)
    assert [w["text"] for w in words] == text_words(TEXT)
    starts = [int(w["start"]) for w in words]  # type: ignore[call-overload]
    ends = [int(w["end"]) for w in words]  # type: ignore[call-overload]
    assert starts == sorted(starts) and all(s < e for s, e in zip(starts, ends, strict=True))
    assert all(e <= s2 for e, s2 in zip(ends, starts[1:], strict=False)), "words overlap"
    assert starts[0] >= 0 and ends[-1] <= end.samples == len(pcm)
    for before, m in marks:  # sent ahead of the audio they describe
        for w in m.words or []:
            assert w["start"] >= before
        for v in m.visemes or []:
            assert v["start"] >= before and v["v"] in VISEMES
    mouth = [m.mouth for _, m in marks if m.mouth]
    assert mouth and all(m["rate"] == MOUTH_RATE for m in mouth)
    assert sum(len(m["values"]) for m in mouth) == -(-len(pcm) // (start.sample_rate // 50))


async def test_an_engine_without_alignments_gives_the_mouth_only(
    encoder_worker: EncoderWorker,
) -> None:
    engine = GatedEngine(auto=True)
    async with live_server(embedder=encoder_worker, engine=engine) as srv, raw_client(srv) as c:
        await c.aregister(CLIP, match=False)
        start, marks, end, _ = await _speak_marked(c, "m1", "One. Two.")
        plain_start, plain_marks, _, _ = await _speak_marked(c, "m2", "Three.", marks=False)
    assert start.marks == ["mouth"]
    assert marks and all(m.words is None and m.visemes is None for _, m in marks)
    values = [v for _, m in marks if m.mouth for v in m.mouth["values"]]
    assert len(values) == -(-end.samples // (22050 // 50))
    assert max(values) > 0.5, "a 0.3-amplitude tone opens the mouth"
    assert plain_start.marks is None and plain_marks == [], "not asked, nothing changes"


async def test_channel_listeners_get_the_same_marks_exact_at_their_own_rates(
    encoder_worker: EncoderWorker, piper: PiperEngine
) -> None:
    """One synthesis, listeners at 22.05 (the engine's rate), 16, 24 and 48 kHz: a word at
    rate R starts at round(start_22050 * R / 22050) ±1; a listener that did not ask gets no
    marks."""
    rates = (22050, 16000, 24000, 48000)
    async with (
        live_server(embedder=encoder_worker, engine=piper) as srv,
        contextlib.AsyncExitStack() as stack,
    ):
        bot = await stack.enter_async_context(raw_client(srv))
        listeners = [await stack.enter_async_context(raw_client(srv)) for _ in rates]
        plain = await stack.enter_async_context(raw_client(srv))
        await bot.aregister(CLIP, match=False)
        await bot.asend({"type": "channel.join", "channel": "main", "role": "speak"})
        await bot.await_type("channel.joined")
        for client, rate in zip(listeners, rates, strict=True):
            await client.asend(
                {
                    "type": "channel.join",
                    "channel": "main",
                    "role": "listen",
                    "sample_rate": rate,
                    "marks": True,
                }
            )
            await client.await_type("channel.joined")
        await plain.asend({"type": "channel.join", "channel": "main", "role": "listen"})
        await plain.await_type("channel.joined")
        await bot.asend({"type": "speak", "id": "m1", "text": TEXT})
        words: dict[int, list[dict[str, object]]] = {}
        for client, rate in zip(listeners, rates, strict=True):
            got: list[dict[str, object]] = []
            while not isinstance(item := await client.anext(), AudioEnd):
                if isinstance(item, AudioStart):
                    assert item.marks == ["words", "visemes", "mouth"] and item.id == "m1"
                if isinstance(item, AudioMarks):
                    got.extend(item.words or [])
            words[rate] = got
        while not isinstance(item := await plain.anext(), AudioEnd):
            assert not isinstance(item, AudioMarks)
            if isinstance(item, AudioStart):
                assert item.marks is None
    reference = words[22050]
    assert [w["text"] for w in reference] == text_words(TEXT)
    for rate in rates[1:]:
        assert [w["text"] for w in words[rate]] == [w["text"] for w in reference]
        for w, ref in zip(words[rate], reference, strict=True):
            for edge in ("start", "end"):
                expected = round(int(ref[edge]) * rate / 22050)  # type: ignore[call-overload]
                assert abs(int(w[edge]) - expected) <= 1, (rate, w, ref)  # type: ignore[call-overload]
