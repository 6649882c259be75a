"""Marks: what is being said when, in samples of the stream — words for captions, visemes and a
mouth-open value for avatars.

Pure functions and small value types, no I/O. Everything is computed once per message at the
engine's rate and rescaled exactly to each listener's rate (:func:`rescale`).

**Words** come from Piper's phoneme alignments (the model's per-phoneme-id sample counts, the
``w_ceil`` tensor ``piper-tts[alignment]`` exposes). espeak-ng does not keep the text's words:
it merges function words ("for the" is one phoneme word ``fɚðə``), expands numbers ("1234" is
five) and drops punctuation. So each text word is phonemized on its own (~0.1 ms a word) to
learn how many *sounding* phonemes it has; the sentence's sounding phonemes are shared out
among the text words in proportion to those counts (exactly when the counts agree, as for
most chat), and each boundary moves to a phoneme-word boundary one phoneme away.
A word's time runs from its first phoneme's start to its last phoneme's end. Every text word
gets a mark, in order, never overlapping the next.

**Visemes**: the 15 Oculus (OVRLipSync) visemes — ``sil PP FF TH DD kk CH SS nn RR aa E ih oh
ou``. Why these and not VRM's five vowels plus closed: they are the set avatar tools already
take (VRChat avatars, Ready Player Me, Meta's lip sync), they keep the consonants a viewer sees
(lips closed for p/b/m, teeth on lip for f/v) and they fold down to VRM's set without loss of
what VRM can show (:data:`VRM_OF_VISEME`); the reverse cannot be recovered. Stress and length
marks are no sounds: their time goes to the phoneme they modify.

**Mouth**: the audio's own envelope, for any engine: RMS per 20 ms window (50 values a
second), a one-pole smoother (attack 0.6, release 0.3 per window: opens fast, closes softly),
divided by a fixed reference level (``MOUTH_FULL_RMS``, loud speech) and clipped to 0..1. A
fixed reference rather than a per-message peak so the value can be sent before the message
ends, and so a whisper does not open the mouth as wide as a shout.
"""

# ruff: noqa: RUF001, RUF002  (IPA symbols are the point of the phoneme table, not look-alikes)

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MOUTH_RATE = 50
"""Mouth values per second: one per 20 ms window."""
MOUTH_FULL_RMS = 0.2
"""RMS (full scale 1.0) at which the mouth is fully open: loud speech (about -14 dBFS)."""
_ATTACK = 0.6
_RELEASE = 0.3

VISEMES = ("sil", "PP", "FF", "TH", "DD", "kk", "CH", "SS", "nn", "RR", "aa", "E", "ih", "oh", "ou")
"""The Oculus viseme set, in its own order."""

_VISEME_OF_PHONEME: dict[str, str] = {
    **dict.fromkeys("pbmɓʙ", "PP"),
    **dict.fromkeys("fvɱβɸ", "FF"),
    **dict.fromkeys("θð", "TH"),
    **dict.fromkeys("tdɾʈɖʔɗ", "DD"),
    **dict.fromkeys("kɡgŋxɣqɢχhɦ", "kk"),
    **dict.fromkeys("ʃʒçʝɕʑʂʐj", "CH"),
    **dict.fromkeys("szʦʣ", "SS"),
    **dict.fromkeys("nlɫɲɳɬɮʎʟ", "nn"),
    **dict.fromkeys("ɹrɻʀʁɚɝ˞", "RR"),
    **dict.fromkeys("aɑɐæʌɒ", "aa"),
    **dict.fromkeys("eɛɜəɘɞœ", "E"),
    **dict.fromkeys("iɪɨyʏᵻ", "ih"),
    **dict.fromkeys("oɔɵø", "oh"),
    **dict.fromkeys("uʊɯʉwʍɥ", "ou"),
}
"""espeak-ng IPA (what Piper's English voices speak) → Oculus viseme. Pauses, punctuation and
the utterance's start and end are ``sil``; a phoneme not listed is ``sil`` too, so an unknown
symbol closes the mouth rather than guessing."""

VRM_OF_VISEME: dict[str, str] = {
    "aa": "A",
    "E": "E",
    "ih": "I",
    "oh": "O",
    "ou": "U",
    "RR": "O",
    "CH": "U",
    "SS": "I",
    "TH": "E",
    "DD": "E",
    "kk": "E",
    "nn": "E",
    "FF": "closed",
    "PP": "closed",
    "sil": "closed",
}
"""How a VRM avatar (A I U E O and closed) shows each Oculus viseme."""

_MODIFIERS = frozenset("ˈˌːˑʲʷˠˤ̩̃͡")
"""Symbols espeak writes that are no sound of their own: stress, length, secondary
articulation, syllabic and nasal marks, tie bars."""
_BOS, _EOS, _GAP = "^", "$", " "
_STRESS = frozenset("ˈˌ")
_TEXT_WORD = re.compile(r"[^\W_](?:[\w'’.\-]*[^\W_])?|[$€£%&+#@]")


@dataclass(frozen=True, slots=True)
class WordMark:
    text: str
    start: int
    """First sample of the word (inclusive)."""
    end: int
    """Sample after its last (exclusive)."""


@dataclass(frozen=True, slots=True)
class VisemeMark:
    v: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class MouthMarks:
    start: int
    """Sample of the first value's window start."""
    rate: int
    """Values per second."""
    values: tuple[float, ...]
    """0..1, three decimals."""


@dataclass(frozen=True, slots=True)
class Marks:
    """What one chunk of a stream carries, in samples of that stream at ``sample_rate``."""

    sample_rate: int
    words: tuple[WordMark, ...] = ()
    visemes: tuple[VisemeMark, ...] = ()
    mouth: MouthMarks | None = None

    def __bool__(self) -> bool:
        return bool(self.words or self.visemes or (self.mouth and self.mouth.values))

    def to_wire(self, kinds: Collection[str]) -> dict[str, Any]:
        """The ``audio.marks`` fields of the ``kinds`` asked for; empty ones left out."""
        out: dict[str, Any] = {}
        if self.words and "words" in kinds:
            out["words"] = [{"text": w.text, "start": w.start, "end": w.end} for w in self.words]
        if self.visemes and "visemes" in kinds:
            out["visemes"] = [{"v": v.v, "start": v.start, "end": v.end} for v in self.visemes]
        if self.mouth is not None and self.mouth.values and "mouth" in kinds:
            m = self.mouth
            out["mouth"] = {"start": m.start, "rate": m.rate, "values": list(m.values)}
        return out

    def rescaled(self, rate: int) -> Marks:
        """The same marks in samples at ``rate`` (each position by :func:`rescale`)."""
        if rate == self.sample_rate:
            return self

        def at(p: int) -> int:
            return rescale(p, self.sample_rate, rate)

        mouth = self.mouth
        return Marks(
            rate,
            tuple(WordMark(w.text, at(w.start), at(w.end)) for w in self.words),
            tuple(VisemeMark(v.v, at(v.start), at(v.end)) for v in self.visemes),
            None if mouth is None else MouthMarks(at(mouth.start), mouth.rate, mouth.values),
        )


def rescale(position: int, from_rate: int, to_rate: int) -> int:
    """Sample ``position`` at ``from_rate`` as the sample at ``to_rate`` that plays at the same
    time: ``round(position * to_rate / from_rate)``, in integers (halves round up).

    This is how the streaming resampler (``live.pcm.Resampler``, soxr, delay-compensated)
    places its output: sample n of the input plays at the same instant as this sample of the
    output, and a stream of N input samples comes out as this many.
    """
    return (2 * position * to_rate + from_rate) // (2 * from_rate)


def viseme_of(phoneme: str) -> str:
    """A diphthong written as one symbol ("aɪ") shows its first vowel."""
    return _VISEME_OF_PHONEME.get(phoneme) or _VISEME_OF_PHONEME.get(phoneme[:1], "sil")


@dataclass(frozen=True, slots=True)
class TimedPhoneme:
    phoneme: str
    start: int
    end: int


def timed_phonemes(
    phonemes: Sequence[str], samples: Sequence[int], offset: int
) -> list[TimedPhoneme]:
    """Piper's phonemes of one utterance (``^`` and ``$`` included) with their sample counts,
    placed from ``offset``, back to back."""
    out: list[TimedPhoneme] = []
    at = offset
    for phoneme, n in zip(phonemes, samples, strict=True):
        out.append(TimedPhoneme(phoneme, at, at + int(n)))
        at += int(n)
    return out


def viseme_marks(timed: Sequence[TimedPhoneme]) -> list[VisemeMark]:
    """One mark per run of phonemes with the same viseme; a modifier's time goes to its
    sound (stress: the next one; length and the rest: the one before)."""
    marks: list[VisemeMark] = []
    pending_start: int | None = None
    for t in timed:
        if t.phoneme in _STRESS:
            pending_start = t.start if pending_start is None else pending_start
            continue
        if t.phoneme in _MODIFIERS:
            if marks:
                marks[-1] = VisemeMark(marks[-1].v, marks[-1].start, t.end)
            continue
        start = t.start if pending_start is None else pending_start
        pending_start = None
        v = viseme_of(t.phoneme)
        if marks and marks[-1].v == v:
            marks[-1] = VisemeMark(v, marks[-1].start, t.end)
        else:
            marks.append(VisemeMark(v, start, t.end))
    return [m for m in marks if m.end > m.start]


def text_words(text: str) -> list[str]:
    """The words of ``text`` as a caption shows them: runs of letters and digits (with inner
    apostrophes, dots and hyphens: "isn't", "3.5", "hello-world") and the symbols espeak reads
    aloud ("$", "%", "&")."""
    return _TEXT_WORD.findall(text)


def is_sounding(phoneme: str) -> bool:
    """A phoneme that is a sound: not a pause, punctuation, utterance edge or modifier."""
    return (
        bool(phoneme)
        and phoneme not in _MODIFIERS
        and phoneme not in (_BOS, _EOS, _GAP, "_")
        and not all(unicodedata.category(c)[0] in "PZS" for c in phoneme)
    )


def share_words(word_sizes: Sequence[int], phonemes: Sequence[str]) -> list[tuple[int, int]]:
    """For each text word (its sounding-phoneme count spoken alone, ``word_sizes``), the range
    ``[first, last]`` of indices into ``phonemes`` (one utterance's, spaces included) it is
    given. See the module docstring for the rule."""
    sounding = [i for i, p in enumerate(phonemes) if is_sounding(p)]
    n = len(sounding)
    if not word_sizes or n == 0:
        return []
    sizes = [max(1, s) for s in word_sizes]
    total = sum(sizes)
    # starts of phoneme words, as indices into `sounding`
    word_starts = [
        k
        for k, i in enumerate(sounding)
        if k == 0 or any(p == _GAP for p in phonemes[sounding[k - 1] : i])
    ]
    bounds = [0]
    cumulative = 0
    for size in sizes[:-1]:
        cumulative += size
        b = round(cumulative * n / total)
        near = [s for s in word_starts if abs(s - b) <= 1 and s > bounds[-1]]
        if near:
            b = min(near, key=lambda s: (abs(s - b), s))
        bounds.append(b)
    bounds.append(n)
    # monotone, every word at least one phoneme while phonemes last
    for k in range(1, len(bounds) - 1):
        bounds[k] = max(bounds[k], min(bounds[k - 1] + 1, n))
    for k in range(len(bounds) - 2, 0, -1):
        bounds[k] = min(bounds[k], bounds[k + 1])
    ranges: list[tuple[int, int]] = []
    for k in range(len(sizes)):
        lo, hi = bounds[k], bounds[k + 1]
        if hi <= lo:  # more words than sounds: it shares the last sound of the word before
            lo, hi = max(0, min(lo, n) - 1), max(1, min(lo, n))
        ranges.append((sounding[lo], sounding[hi - 1]))
    return ranges


def word_marks(
    words: Sequence[str],
    word_sizes: Sequence[int],
    timed: Sequence[TimedPhoneme],
) -> list[WordMark]:
    """Word marks for one utterance whose phonemes are ``timed``: every word of ``words``, in
    order. A stress mark just before a word's first sound belongs to the word."""
    phonemes = [t.phoneme for t in timed]
    marks: list[WordMark] = []
    for word, (first, last) in zip(words, share_words(word_sizes, phonemes), strict=True):
        while first > 0 and timed[first - 1].phoneme in _STRESS:
            first -= 1
        while last + 1 < len(timed) and timed[last + 1].phoneme in _MODIFIERS:
            last += 1
        start = timed[first].start
        if marks and start < marks[-1].end:
            start = marks[-1].end
        marks.append(WordMark(word, start, max(start + 1, timed[last].end)))
    return marks


def word_sizes(words: Sequence[str], phonemize: Callable[[str], list[list[str]]]) -> list[int]:
    """How many sounding phonemes each word has when spoken alone."""
    return [sum(is_sounding(p) for s in phonemize(w) for p in s) for w in words]


@dataclass
class MouthEnvelope:
    """Mouth values from a message's audio as it streams (any engine), at ``sample_rate``."""

    sample_rate: int
    rate: int = MOUTH_RATE
    _carry: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    _level: float = 0.0
    _next_start: int = 0

    @property
    def window(self) -> int:
        return self.sample_rate // self.rate

    def feed(self, chunk: np.ndarray, *, last: bool = False) -> MouthMarks:
        """The values of the windows this chunk completes (with ``last``, the final partial
        window too)."""
        x = np.concatenate([self._carry, np.asarray(chunk, dtype=np.float32).ravel()])
        w = self.window
        whole = len(x) // w
        values: list[float] = []
        if whole:
            frames = x[: whole * w].reshape(whole, w).astype(np.float64)
            values.extend(self._smooth(np.sqrt(np.mean(frames * frames, axis=1))))
        self._carry = x[whole * w :]
        start = self._next_start
        self._next_start += whole * w
        if last and self._carry.size:
            tail = self._carry.astype(np.float64)
            values.extend(self._smooth(np.array([math.sqrt(float(np.mean(tail * tail)))])))
            self._next_start += self._carry.size
            self._carry = self._carry[:0]
        return MouthMarks(start, self.rate, tuple(values))

    def _smooth(self, rms: np.ndarray) -> list[float]:
        out: list[float] = []
        level = self._level
        for r in rms.tolist():
            target = min(1.0, r / MOUTH_FULL_RMS)
            level += (_ATTACK if target > level else _RELEASE) * (target - level)
            out.append(round(level, 3))
        self._level = level
        return out
