"""Chat text on its way to a speech engine: made safe to speak, cut into bounded segments."""

from __future__ import annotations

import re
import unicodedata

_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9:_-]{0,40}(?:\s[^<>]{0,200})?/?>")
"""SSML/HTML-like tags. Chat's "<3" or "a < b" are not tags and stay."""
_EMOJI_SEQUENCE = re.compile(r"[0-9#*]\ufe0f?\u20e3|[^\w\s]\ufe0f")
"""Keycaps ("1️⃣", "#⃣") and symbols asked to look like emoji ("©️", "‼️", "↔️"): base and all."""
_PICTOGRAPH_BLOCKS = (
    (0x2190, 0x21FF),  # arrows: the pictographic ones ("↩") are category So, "→" (Sm) stays
    (0x2300, 0x23FF),  # technical: "⌚⏰⏩"
    (0x25A0, 0x25FF),  # geometric shapes: "▶◀◼"
    (0x2600, 0x27BF),  # miscellaneous symbols and dingbats: "☀❤✨✅", "♀♂" of ZWJ sequences
    (0x2B00, 0x2BFF),  # "⬆⭐⭕"
)
"""Blocks where a symbol (category So) is a pictograph: dropped. Elsewhere "°" or "№" stay."""
_PICTOGRAPHS = frozenset(
    "\u00a9\u00ae\u203c\u2049\u2122\u2139\u24c2\u2934\u2935\u3030\u303d\u3297\u3299"
)
"""Emoji outside those blocks ("©®™‼ℹⓂ〽㊗"), by the Unicode emoji data."""
_UNSPOKEN_CATEGORIES = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Me"))
"""Controls, format characters (zero-width joiners, tags, bidi overrides), surrogates, private
use, unassigned code points, and enclosing marks (the keycap and circle around a symbol)."""
_SPACE = re.compile(r"\s+")
_REPEATED_CHAR = re.compile(r"([^\d\s])\1{3,}")
"""A character other than a digit said more than three times in a row ("!!!!!!!!",
"noooooo"); digits are left alone, "1000000" is a number."""
_REPEATED_WORD = re.compile(r"(?<!\S)(\S+)(?:\s+\1(?!\S)){2,}", re.IGNORECASE)
"""One word three or more times in a row ("KEKW KEKW KEKW KEKW"); "bye bye" stays."""
_SENTENCE_END = re.compile(r"(?<=[.!?;:\u2026\u3002\uff01\uff1f])\s+")
_CLAUSE_END = re.compile(r"(?<=[,\u3001\uff0c])\s+")


def clean_text(text: str) -> str:
    """What is worth speaking of a chat message.

    NFC-normalised; control and format characters (NUL, escapes, zero-width joiners, BOMs,
    bidi overrides) removed; markup tags dropped rather than read out; whitespace collapsed.

    Emoji are not spoken at all, not even one name per message: a streamer's audience hears
    the message, not "grinning face party popper fire" (chat TTS tools skip emotes the same way),
    and one emoji name is ~1 s of audio from a single character, which is how a 200-character
    message became 46 s of speech. Dropped are pictographs (U+1F000 to U+1FBFF whole, symbols in
    the pictographic blocks of the BMP), skin-tone modifiers, variation selectors, zero-width
    joiners (so ZWJ sequences go whole), keycaps with their digit, regional-indicator flags and
    tag sequences. Text, "<3", numbers, accented letters and CJK stay.

    Spam is said once: a character repeated more than three times is said three times
    ("!!!!!!!!" → "!!!"; digits excepted), and a word said three or more times in a row is said
    once ("KEKW KEKW KEKW KEKW" → "KEKW"). Piper's raw-phoneme brackets ("[[ ... ]]") are
    broken up, so viewers cannot inject phonemes. An empty result means nothing to speak.
    """
    text = unicodedata.normalize("NFC", text)
    text = _TAG.sub(" ", text)
    text = _EMOJI_SEQUENCE.sub(" ", text)
    kept = []
    for ch in text:
        if _is_unspoken(ch):
            kept.append(" " if ch in "\t\n\r\v\f" else "")
        else:
            kept.append(ch)
    text = _SPACE.sub(" ", "".join(kept))
    text = _REPEATED_CHAR.sub(r"\1\1\1", text)
    text = _REPEATED_WORD.sub(r"\1", text)
    # Piper reads "[[ ... ]]" as raw phonemes: chat must not speak past the text it shows.
    text = text.replace("[[", "[ [").replace("]]", "] ]")
    return text.strip()


def _is_unspoken(ch: str) -> bool:
    code = ord(ch)
    if 0x1F000 <= code <= 0x1FBFF or ch in _PICTOGRAPHS:
        return True  # pictographs, regional indicators, skin tones (U+1F3FB to U+1F3FF)
    if 0xFE00 <= code <= 0xFE0F or 0xE0100 <= code <= 0xE01EF:
        return True  # variation selectors: presentation only, never sound
    category = unicodedata.category(ch)
    if category in _UNSPOKEN_CATEGORIES:
        return True
    return category == "So" and any(lo <= code <= hi for lo, hi in _PICTOGRAPH_BLOCKS)


def segments(text: str, max_chars: int = 200) -> list[str]:
    """Sentences, with any longer than ``max_chars`` cut at clause or word borders.

    Synthesis runs one segment at a time, so the first audio of a 2,000-character message
    without punctuation comes as fast as that of a short one.
    """
    out: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        pieces = [sentence] if len(sentence) <= max_chars else _CLAUSE_END.split(sentence)
        for piece in pieces:
            out.extend(_cut(piece, max_chars))
    return [s for s in (p.strip() for p in out) if s]


def _cut(piece: str, max_chars: int) -> list[str]:
    parts: list[str] = []
    while len(piece) > max_chars:
        cut = piece.rfind(" ", 0, max_chars + 1)
        if cut <= 0:
            cut = max_chars  # one endless "word": cut it anyway
        parts.append(piece[:cut])
        piece = piece[cut:].lstrip()
    parts.append(piece)
    return parts
