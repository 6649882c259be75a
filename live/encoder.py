"""GE2E speaker encoder: resemblyzer's model and preprocessing, in torch, batched.

The network, weights and numbers match ``resemblyzer.VoiceEncoder`` (a 3-layer LSTM over
40-channel power-mel frames, 160-frame partials, mean of partial embeddings), so a
fingerprint computed here is interchangeable with one from resemblyzer. What differs:

* the mel front end is torch (``MelFrontEnd``) so it runs on the model's device;
* volume normalisation and silence trimming are plain numpy (no scipy), and guard the
  degenerate inputs resemblyzer turns into NaN or an empty array;
* ``SpeakerEncoder.embed_batch`` runs the partials of many clips through one LSTM pass;
* ``EncoderWorker`` keeps all model work off the event loop and batches concurrent callers.

resemblyzer itself is never imported here: its import pulls deprecated scipy modules. Only
its weights file is read, from inside the installed wheel.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import importlib.util
import logging
import types
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

__all__ = [
    "EMBEDDING_DIM",
    "GE2E",
    "SAMPLE_RATE",
    "EncoderClosedError",
    "EncoderWorker",
    "MelFrontEnd",
    "SpeakerEncoder",
    "check_clip",
    "normalize_volume",
    "partial_slices",
    "preprocess_wav",
    "trim_long_silences",
    "voice_flags",
]

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

# resemblyzer/hparams.py, unchanged.
SAMPLE_RATE: Final = 16_000
N_FFT: Final = 400  # 25 ms window
HOP_LENGTH: Final = 160  # 10 ms step
N_MELS: Final = 40
PARTIAL_FRAMES: Final = 160  # 1.6 s per partial utterance
VAD_WINDOW: Final = 480  # 30 ms at 16 kHz
VAD_MOVING_AVERAGE_WIDTH: Final = 8
VAD_MAX_SILENCE_WINDOWS: Final = 6
TARGET_DBFS: Final = -30.0
HIDDEN_SIZE: Final = 256
EMBEDDING_DIM: Final = 256
NUM_LAYERS: Final = 3
PARTIAL_RATE: Final = 1.3
MIN_COVERAGE: Final = 0.75

_INT16_MAX: Final = 2**15 - 1
# Loss parameters of GE2E training, present in the checkpoint but not part of inference.
_TRAINING_ONLY_KEYS: Final = frozenset({"similarity_weight", "similarity_bias"})


def default_weights_path() -> Path:
    """The ``pretrained.pt`` that ships inside the resemblyzer wheel.

    Found with ``find_spec``, which locates a top-level package without running it:
    ``importlib.resources.files("resemblyzer")`` would import resemblyzer (and its warnings).
    """
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("resemblyzer is not installed; pass weights_path")
    return Path(next(iter(spec.submodule_search_locations))) / "pretrained.pt"


class GE2E(nn.Module):
    """resemblyzer's VoiceEncoder network: LSTM → last hidden state → Linear → ReLU → L2."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(N_MELS, HIDDEN_SIZE, NUM_LAYERS, batch_first=True)
        self.linear = nn.Linear(HIDDEN_SIZE, EMBEDDING_DIM)
        self.relu = nn.ReLU()

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        """(batch, frames, 40) power mels → (batch, 256) unit vectors."""
        _, (hidden, _) = self.lstm(mels)
        raw = self.relu(self.linear(hidden[-1]))
        unit: torch.Tensor = raw / torch.linalg.vector_norm(raw, dim=1, keepdim=True)
        return unit


class MelFrontEnd(nn.Module):
    """``resemblyzer.audio.wav_to_mel_spectrogram`` in torch: power (not log) Slaney mels.

    Same as ``librosa.feature.melspectrogram(sr=16000, n_fft=400, hop_length=160, n_mels=40)``
    with librosa's defaults: periodic Hann window, centred frames, zero ("constant") padding.
    """

    window: torch.Tensor
    mel_basis: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        import librosa  # heavy import (numba); only needed to build the filterbank once

        basis = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS)
        self.register_buffer("window", torch.hann_window(N_FFT, periodic=True))
        self.register_buffer("mel_basis", torch.from_numpy(np.asarray(basis, dtype=np.float32)))

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """(samples,) or (batch, samples) → (frames, 40) or (batch, frames, 40)."""
        spec = torch.stft(
            wav,
            n_fft=N_FFT,
            hop_length=HOP_LENGTH,
            win_length=N_FFT,
            window=self.window,
            center=True,
            pad_mode="constant",
            return_complex=True,
        )
        power = spec.abs().pow(2)  # (..., freq, frames), as librosa's np.abs(S) ** 2
        return torch.matmul(self.mel_basis, power).transpose(-1, -2)


def check_clip(clip: npt.ArrayLike) -> FloatArray:
    """A fresh, writable float32 copy of a 16 kHz mono clip, or ValueError.

    Rejects what cannot be embedded meaningfully: wrong shape, no samples, NaN/inf. Done per
    clip before batching so one bad clip fails only its own caller.
    """
    wav = np.array(clip, dtype=np.float32, copy=True)
    if wav.ndim != 1:
        raise ValueError(f"expected mono audio (1-D array), got shape {wav.shape}")
    if wav.size == 0:
        raise ValueError("cannot embed an empty clip")
    if not np.isfinite(wav).all():
        raise ValueError("clip contains NaN or infinite samples")
    return wav


def normalize_volume(wav: FloatArray, target_dbfs: float = TARGET_DBFS) -> FloatArray:
    """resemblyzer's ``normalize_volume(..., increase_only=True)``, safe on digital silence.

    resemblyzer computes log10(0) on an all-zero clip and multiplies by inf (NaN out); a
    silent clip has no level to raise, so it is returned unchanged.
    """
    rms = np.sqrt(np.mean((wav * _INT16_MAX) ** 2))
    if rms == 0:
        return wav
    change = target_dbfs - 20 * np.log10(rms / _INT16_MAX)
    if change < 0:
        return wav
    louder: FloatArray = (wav * (10 ** (change / 20))).astype(np.float32, copy=False)
    return louder


@functools.cache
def _webrtcvad() -> types.ModuleType:
    """Import webrtcvad on first use, hiding the warnings of its ``import pkg_resources``.

    ``SpeakerEncoder.load`` calls this, so the import (and its process-global warnings
    filter change) happens at startup, not on the model thread while the server runs.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "pkg_resources is deprecated", UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="pkg_resources")
        import webrtcvad

    module: types.ModuleType = webrtcvad
    return module


def voice_flags(wav: FloatArray) -> npt.NDArray[np.bool_]:
    """webrtcvad's verdict (aggressiveness 3) per 30 ms window of a 16 kHz clip whose length
    is a whole number of windows.

    Also what ``live.audio`` counts voiced seconds with, so the clip check and the encoder's
    silence trimming hear the same speech.
    """
    webrtcvad = _webrtcvad()
    # resemblyzer casts without clipping, which wraps (and warns) for samples beyond ±1.0.
    pcm = np.clip(np.round(wav * _INT16_MAX), -_INT16_MAX - 1, _INT16_MAX).astype(np.int16)
    data = pcm.tobytes()
    vad = webrtcvad.Vad(3)
    step = VAD_WINDOW * 2  # bytes per window
    return np.array(
        [vad.is_speech(data[i : i + step], SAMPLE_RATE) for i in range(0, len(data), step)],
        dtype=bool,
    )


def trim_long_silences(wav: FloatArray) -> FloatArray:
    """resemblyzer's ``trim_long_silences``: drop pauses longer than ~6 VAD windows.

    Identical output (moving average of width 8, then a centred binary dilation by 7 windows,
    done here with a convolution instead of scipy). One deliberate difference: where
    resemblyzer returns an empty array (the VAD heard no voice, or the clip is shorter than
    one 30 ms window) we return the clip untouched. An empty wav has nothing to embed; a
    quiet, noisy or tiny reference should still get a deterministic vector instead of an
    error deep in the model.
    """
    usable = wav[: len(wav) - len(wav) % VAD_WINDOW]
    if usable.size == 0:
        return wav
    flags = voice_flags(usable).astype(np.float64)

    width = VAD_MOVING_AVERAGE_WIDTH
    padded = np.concatenate((np.zeros((width - 1) // 2), flags, np.zeros(width // 2)))
    sums = np.cumsum(padded)
    sums[width:] = sums[width:] - sums[:-width]
    mask = np.round(sums[width - 1 :] / width).astype(bool)

    # scipy.ndimage.binary_dilation(mask, np.ones(7)): centred, zero outside the array.
    span = VAD_MAX_SILENCE_WINDOWS + 1
    full = np.convolve(mask.astype(np.int32), np.ones(span, dtype=np.int32), mode="full")
    start = (span - 1) // 2
    mask = full[start : start + len(mask)] > 0

    trimmed = usable[np.repeat(mask, VAD_WINDOW)]
    return trimmed if trimmed.size else wav


def preprocess_wav(wav: FloatArray) -> FloatArray:
    """``resemblyzer.preprocess_wav`` for a clip already at 16 kHz mono float32."""
    return trim_long_silences(normalize_volume(wav))


def partial_slices(n_samples: int) -> tuple[int, list[slice]]:
    """``VoiceEncoder.compute_partial_slices(n_samples, rate=1.3, min_coverage=0.75)``.

    Returns the padded length in samples (zero-pad the wav to it) and the mel-frame slices.
    """
    n_frames = int(np.ceil((n_samples + 1) / HOP_LENGTH))
    frame_step = int(np.round((SAMPLE_RATE / PARTIAL_RATE) / HOP_LENGTH))
    steps = max(1, n_frames - PARTIAL_FRAMES + frame_step + 1)
    starts = list(range(0, steps, frame_step))
    last = starts[-1] * HOP_LENGTH
    coverage = (n_samples - last) / (PARTIAL_FRAMES * HOP_LENGTH)
    if coverage < MIN_COVERAGE and len(starts) > 1:
        starts.pop()
    return (
        (starts[-1] + PARTIAL_FRAMES) * HOP_LENGTH,
        [slice(s, s + PARTIAL_FRAMES) for s in starts],
    )


def _file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class SpeakerEncoder:
    """Clips of 16 kHz mono float32 → 256-d unit speaker embeddings (float32)."""

    dim: Final = EMBEDDING_DIM

    def __init__(self, model: GE2E, frontend: MelFrontEnd, *, encoder_id: str) -> None:
        self.model = model.eval()
        self.frontend = frontend.eval()
        self.encoder_id = encoder_id
        self.device: torch.device = next(model.parameters()).device

    @classmethod
    def load(
        cls,
        *,
        weights_path: Path | str | None = None,
        device: torch.device | str | None = None,
        threads: int | None = 1,
    ) -> SpeakerEncoder:
        """Load GE2E weights (resemblyzer's by default) onto ``device`` (CUDA if present).

        On CPU, ``threads`` sets torch's intra-op thread count for the whole process; one
        thread measured faster and steadier than two on a 2-core host. None leaves it alone.
        """
        path = Path(weights_path) if weights_path is not None else default_weights_path()
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cpu" and threads is not None:
            torch.set_num_threads(threads)

        _webrtcvad()
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in checkpoint["model_state"].items() if k not in _TRAINING_ONLY_KEYS}
        model = GE2E()
        model.load_state_dict(state)  # strict: every inference weight must be present
        encoder_id = "ge2e-" + _file_digest(path)[:16]
        logger.info("loaded speaker encoder %s on %s", encoder_id, device)
        return cls(model.to(device), MelFrontEnd().to(device), encoder_id=encoder_id)

    def embed(self, clip: npt.ArrayLike) -> FloatArray:
        """One clip → (256,) unit vector."""
        out: FloatArray = self.embed_batch([clip])[0]
        return out

    def embed_batch(self, clips: Sequence[npt.ArrayLike]) -> FloatArray:
        """Clips → (n, 256) unit vectors, with one LSTM pass over every clip's partials.

        Raises ValueError (see ``check_clip``) for a clip that cannot be embedded.
        """
        wavs = [preprocess_wav(check_clip(c)) for c in clips]
        if not wavs:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            partials: list[torch.Tensor] = []
            counts: list[int] = []
            for wav in wavs:
                padded_len, mel_slices = partial_slices(len(wav))
                wav = np.pad(wav, (0, max(0, padded_len - len(wav))))
                mel = self.frontend(torch.from_numpy(wav).to(self.device))
                partials.extend(mel[s] for s in mel_slices)
                counts.append(len(mel_slices))
            embeds = self.model(torch.stack(partials))
            means = torch.stack([p.mean(dim=0) for p in torch.split(embeds, counts)])
            out = means / torch.linalg.vector_norm(means, dim=1, keepdim=True)
            result: FloatArray = out.to("cpu", torch.float32).numpy()
        return result


class EncoderClosedError(RuntimeError):
    """The encoder worker was closed before this request was embedded."""


@dataclass(slots=True)
class _Request:
    clip: FloatArray
    future: asyncio.Future[FloatArray] = field(repr=False)


class EncoderWorker:
    """Runs a ``SpeakerEncoder`` off the event loop, batching concurrent requests.

    One thread owns the model. A background task takes every request waiting (up to
    ``max_batch``) without delaying for more, and embeds them in one ``embed_batch`` call.
    The task starts on the first ``aembed`` (or ``start()``), so the worker can be built
    before the loop runs; it is then bound to that loop.
    """

    def __init__(self, encoder: SpeakerEncoder, *, max_batch: int = 8) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.encoder = encoder
        self.max_batch = max_batch
        self.calls = 0  # clips embedded
        self.batches = 0  # embed_batch calls that succeeded
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="speaker-encoder"
        )
        self._queue: asyncio.Queue[_Request] | None = None
        self._task: asyncio.Task[None] | None = None
        self._in_flight: list[_Request] = []
        self._running: concurrent.futures.Future[FloatArray] | None = None
        self._closed = False

    @property
    def encoder_id(self) -> str:
        return self.encoder.encoder_id

    @property
    def dim(self) -> int:
        return self.encoder.dim

    @property
    def alive(self) -> bool:
        """Taking requests: not closed, and its batching task (once started) still running.
        ``/readyz`` asks this."""
        return not self._closed and (self._task is None or not self._task.done())

    def start(self) -> None:
        """Start the batching task on the running loop (idempotent)."""
        if self._closed:
            raise EncoderClosedError("encoder worker is closed")
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(
                self._serve(self._queue), name="speaker-encoder"
            )

    async def aembed(self, pcm16k: npt.ArrayLike) -> FloatArray:
        """Embed one 16 kHz mono clip; ValueError for a clip that cannot be embedded."""
        clip = check_clip(pcm16k)  # validate here so a bad clip never fails a whole batch
        self.start()
        assert self._queue is not None
        future: asyncio.Future[FloatArray] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Request(clip, future))
        return await future

    async def _serve(self, queue: asyncio.Queue[_Request]) -> None:
        while True:
            batch = [await queue.get()]
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            live = [r for r in batch if not r.future.done()]  # skip callers that gave up
            if not live:
                continue
            self._in_flight = live
            self._running = self._executor.submit(self.encoder.embed_batch, [r.clip for r in live])
            try:
                vectors = await asyncio.wrap_future(self._running)
            except Exception as exc:
                logger.warning("speaker embedding failed for %d clips: %r", len(live), exc)
                for r in live:
                    if not r.future.done():
                        r.future.set_exception(exc)
            else:
                self.batches += 1
                self.calls += len(live)
                for r, vector in zip(live, vectors, strict=True):
                    if not r.future.done():
                        r.future.set_result(vector)
            # Not in a finally: on cancellation aclose() still needs these to fail them.
            self._in_flight = []

    async def aclose(self) -> None:
        """Stop batching, fail every waiting caller, and release the model thread."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        pending = list(self._in_flight)
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for r in pending:
            if not r.future.done():
                r.future.set_exception(EncoderClosedError("encoder worker closed"))
        # Let a batch already on the model thread finish without blocking the loop.
        if self._running is not None and not self._running.done():
            with contextlib.suppress(Exception):  # its callers were already failed above
                await asyncio.wrap_future(self._running)
        self._executor.shutdown(wait=False, cancel_futures=True)
