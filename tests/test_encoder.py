"""live.encoder: parity with resemblyzer, speaker separation, batching, the async worker."""

from __future__ import annotations

import asyncio
import shutil
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import numpy.typing as npt
import pytest
import torch

from live.encoder import (
    EncoderClosedError,
    EncoderWorker,
    MelFrontEnd,
    SpeakerEncoder,
    default_weights_path,
    preprocess_wav,
)
from tests.clips import piper_speech, reference_clip, to_16k

TIMEOUT = 30.0
OTHER_SENTENCE = "Hello there, this is another sentence about the weather today, and it is sunny."


@pytest.fixture(scope="module")
def resemblyzer() -> ModuleType:
    # The reference implementation; its import warns (scipy.ndimage.morphology,
    # pkg_resources), which filterwarnings=error would turn into failures.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import resemblyzer

    module: ModuleType = resemblyzer
    return module


@pytest.fixture(scope="module")
def encoder() -> SpeakerEncoder:
    return SpeakerEncoder.load(device="cpu")


@pytest.fixture(scope="module")
def piper16k() -> npt.NDArray[np.float32]:
    return to_16k(*reference_clip("piper"))


@pytest.fixture(scope="module")
def espeak16k() -> npt.NDArray[np.float32]:
    return to_16k(*reference_clip("espeak"))


@pytest.fixture(scope="module")
def piper_other16k() -> npt.NDArray[np.float32]:
    return to_16k(*piper_speech(OTHER_SENTENCE))


def cosine(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_load_identity(encoder: SpeakerEncoder) -> None:
    assert encoder.encoder_id.startswith("ge2e-")
    assert len(encoder.encoder_id) == len("ge2e-") + 16
    assert encoder.dim == 256
    assert encoder.device == torch.device("cpu")


def test_encoder_id_names_the_weights_not_the_file(
    encoder: SpeakerEncoder, piper16k: npt.NDArray[np.float32], tmp_path: Path
) -> None:
    """The id is part of every Redis key: new weights must never be served old vectors, and the
    same weights under another path must keep finding them (README, "The voice cache")."""
    source = default_weights_path()
    copy = tmp_path / "copy-of-pretrained.pt"
    shutil.copyfile(source, copy)
    assert SpeakerEncoder.load(weights_path=copy, device="cpu").encoder_id == encoder.encoder_id

    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    weight = checkpoint["model_state"]["linear.weight"]
    nudge = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    checkpoint["model_state"]["linear.weight"] = weight + 0.01 * nudge  # "fine-tuned"
    retrained = tmp_path / "retrained.pt"
    torch.save(checkpoint, retrained)
    other = SpeakerEncoder.load(weights_path=retrained, device="cpu")
    assert other.encoder_id.startswith("ge2e-") and other.encoder_id != encoder.encoder_id
    # Sanity of the staging: the weights changed, and so do the vectors.
    assert not np.array_equal(other.embed(piper16k), encoder.embed(piper16k))


@pytest.mark.parametrize("kind", ["piper", "espeak"])
def test_parity_with_resemblyzer(
    kind: str, encoder: SpeakerEncoder, resemblyzer: ModuleType, request: pytest.FixtureRequest
) -> None:
    clip = request.getfixturevalue(f"{kind}16k")
    reference = resemblyzer.VoiceEncoder(device="cpu", verbose=False)
    theirs = reference.embed_utterance(resemblyzer.preprocess_wav(clip))
    ours = encoder.embed(clip)
    cos = cosine(ours, theirs)
    print(f"{kind}: cosine(ours, resemblyzer) = {cos:.7f}")  # measured 1.0000000 for both
    assert cos >= 0.99
    assert ours.dtype == np.float32
    assert ours.shape == (256,)


def test_preprocessing_matches_resemblyzer(
    piper16k: npt.NDArray[np.float32], resemblyzer: ModuleType
) -> None:
    np.testing.assert_array_equal(preprocess_wav(piper16k), resemblyzer.preprocess_wav(piper16k))


def test_mel_front_end_matches_resemblyzer(
    piper16k: npt.NDArray[np.float32], resemblyzer: ModuleType
) -> None:
    wav = resemblyzer.preprocess_wav(piper16k)
    theirs = resemblyzer.audio.wav_to_mel_spectrogram(wav)
    with torch.inference_mode():
        ours = MelFrontEnd()(torch.from_numpy(wav)).numpy()
    assert ours.shape == theirs.shape
    # librosa computes the FFT in float64, torch in float32: relative error near 1e-6,
    # except in the near-silent bins, which the atol covers.
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6 * float(theirs.max()))


def test_speakers_are_apart(
    encoder: SpeakerEncoder,
    piper16k: npt.NDArray[np.float32],
    espeak16k: npt.NDArray[np.float32],
    piper_other16k: npt.NDArray[np.float32],
) -> None:
    piper, espeak, piper_other = encoder.embed_batch([piper16k, espeak16k, piper_other16k])
    same = cosine(piper, piper_other)
    cross = cosine(piper, espeak)
    print(f"same speaker, different text: {same:.4f}; piper vs espeak-ng: {cross:.4f}")
    # Measured: same 0.936, cross 0.481 (espeak-ng en-us+m3 vs piper: 0.57). The bounds
    # leave ~0.09 and ~0.2 of margin for drift in the synthesisers or the resampler.
    assert same > 0.85
    assert cross < 0.70
    assert same - cross > 0.25


def test_batch_equals_single(
    encoder: SpeakerEncoder,
    piper16k: npt.NDArray[np.float32],
    espeak16k: npt.NDArray[np.float32],
    piper_other16k: npt.NDArray[np.float32],
) -> None:
    clips = [piper16k, espeak16k, piper_other16k]
    batch = encoder.embed_batch(clips)
    assert batch.shape == (3, 256)
    assert batch.dtype == np.float32
    for row, clip in zip(batch, clips, strict=True):
        np.testing.assert_allclose(row, encoder.embed(clip), atol=1e-5)
    assert encoder.embed_batch([]).shape == (0, 256)


def test_input_is_not_modified(encoder: SpeakerEncoder, piper16k: npt.NDArray[np.float32]) -> None:
    clip = piper16k.copy() * 0.01  # quiet, so volume normalisation scales it
    before = clip.copy()
    encoder.embed(clip)
    np.testing.assert_array_equal(clip, before)


@pytest.mark.parametrize(
    "clip",
    [
        np.zeros(16_000 * 3, dtype=np.float32),  # digital silence: resemblyzer gives NaN
        np.zeros(1, dtype=np.float32),
        np.full(300, 0.2, dtype=np.float32),  # shorter than one 30 ms VAD window
        np.random.default_rng(0).normal(0, 0.05, 4_000).astype(np.float32),  # noise, no voice
        np.full(16_000, 3.0, dtype=np.float32),  # beyond full scale
    ],
    ids=["silence", "one-sample", "300-samples", "noise", "clipped"],
)
def test_degenerate_clips_give_unit_vectors(
    encoder: SpeakerEncoder, clip: npt.NDArray[np.float32]
) -> None:
    # Decision: anything with at least one finite sample embeds (to a meaningless but valid
    # vector); gating on "is there speech" belongs to the caller, which knows the policy.
    vector = encoder.embed(clip)
    assert np.isfinite(vector).all()
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5


@pytest.mark.parametrize(
    "clip",
    [
        np.zeros(0, dtype=np.float32),
        np.zeros((2, 16_000), dtype=np.float32),
        np.array([0.1, np.nan, 0.2], dtype=np.float32),
    ],
    ids=["empty", "stereo", "nan"],
)
def test_unembeddable_clips_raise_value_error(
    encoder: SpeakerEncoder, clip: npt.NDArray[np.float32]
) -> None:
    with pytest.raises(ValueError):
        encoder.embed(clip)


class FlakyEncoder(SpeakerEncoder):
    """Fails the next ``fail_next`` batches, then behaves."""

    fail_next = 0

    def embed_batch(self, clips: Sequence[npt.ArrayLike]) -> npt.NDArray[np.float32]:
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("injected failure")
        return super().embed_batch(clips)


@pytest.fixture
def flaky(encoder: SpeakerEncoder) -> FlakyEncoder:
    return FlakyEncoder(encoder.model, encoder.frontend, encoder_id=encoder.encoder_id)


async def test_worker_batches_concurrent_callers(
    encoder: SpeakerEncoder,
    piper16k: npt.NDArray[np.float32],
    espeak16k: npt.NDArray[np.float32],
) -> None:
    worker = EncoderWorker(encoder, max_batch=8)  # built before its task exists
    clips = [piper16k[: 16_000 * (1 + i % 4)] if i % 2 else espeak16k for i in range(10)]
    expected = encoder.embed_batch(clips)
    try:
        # gather starts all ten callers before the worker task first runs, so it finds
        # eight waiting, then two: two batches.
        results = await asyncio.wait_for(
            asyncio.gather(*(worker.aembed(c) for c in clips)), TIMEOUT
        )
    finally:
        await asyncio.wait_for(worker.aclose(), TIMEOUT)
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert worker.calls == 10
    assert worker.batches == 2


async def test_worker_failure_reaches_every_waiter_then_recovers(
    flaky: FlakyEncoder, piper16k: npt.NDArray[np.float32]
) -> None:
    worker = EncoderWorker(flaky)
    flaky.fail_next = 1
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(worker.aembed(piper16k) for _ in range(3)), return_exceptions=True),
            TIMEOUT,
        )
        assert len(results) == 3
        for r in results:
            assert isinstance(r, RuntimeError)
            assert str(r) == "injected failure"
        assert (worker.calls, worker.batches) == (0, 0)

        vector = await asyncio.wait_for(worker.aembed(piper16k), TIMEOUT)
        np.testing.assert_allclose(vector, flaky.embed(piper16k), atol=1e-5)
        assert (worker.calls, worker.batches) == (1, 1)
    finally:
        await asyncio.wait_for(worker.aclose(), TIMEOUT)


async def test_worker_rejects_bad_clip_alone(
    encoder: SpeakerEncoder, piper16k: npt.NDArray[np.float32]
) -> None:
    worker = EncoderWorker(encoder)
    try:
        good, bad = await asyncio.wait_for(
            asyncio.gather(
                worker.aembed(piper16k),
                worker.aembed(np.zeros(0, dtype=np.float32)),
                return_exceptions=True,
            ),
            TIMEOUT,
        )
    finally:
        await asyncio.wait_for(worker.aclose(), TIMEOUT)
    assert isinstance(bad, ValueError)
    assert isinstance(good, np.ndarray)
    assert worker.calls == 1


class GatedEncoder(SpeakerEncoder):
    """Holds each batch on the model thread until the test opens the gate."""

    def __init__(self, base: SpeakerEncoder) -> None:
        super().__init__(base.model, base.frontend, encoder_id=base.encoder_id)
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.finished = threading.Event()

    def embed_batch(self, clips: Sequence[npt.ArrayLike]) -> npt.NDArray[np.float32]:
        self.entered.set()
        self.gate.wait(TIMEOUT)
        try:
            return super().embed_batch(clips)
        finally:
            self.finished.set()


async def test_worker_close_fails_in_flight_and_queued_callers(
    encoder: SpeakerEncoder, piper16k: npt.NDArray[np.float32]
) -> None:
    gated = GatedEncoder(encoder)
    worker = EncoderWorker(gated, max_batch=1)
    callers = [asyncio.create_task(worker.aembed(piper16k)) for _ in range(3)]
    # The first caller's batch reaches the model thread; the other two stay queued.
    await asyncio.wait_for(asyncio.to_thread(gated.entered.wait, TIMEOUT), TIMEOUT)
    closing = asyncio.create_task(worker.aclose())
    done, pending = await asyncio.wait(callers, timeout=TIMEOUT)
    assert not pending
    for task in done:
        assert isinstance(task.exception(), EncoderClosedError)
    assert not closing.done()  # aclose waits for the batch still on the model thread
    gated.gate.set()
    await asyncio.wait_for(closing, TIMEOUT)
    assert gated.finished.is_set()
    assert worker.calls == 0

    with pytest.raises(EncoderClosedError):
        await asyncio.wait_for(worker.aembed(piper16k), TIMEOUT)
    await asyncio.wait_for(worker.aclose(), TIMEOUT)  # idempotent


async def test_worker_close_before_start(encoder: SpeakerEncoder) -> None:
    worker = EncoderWorker(encoder)
    await asyncio.wait_for(worker.aclose(), TIMEOUT)
    with pytest.raises(EncoderClosedError):
        await asyncio.wait_for(worker.aembed(np.zeros(16_000, dtype=np.float32)), TIMEOUT)
