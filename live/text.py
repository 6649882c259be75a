"""Chat text on its way to a speech engine: made safe to speak, cut into bounded segments."""

from __future__ import annotations

import re
import unicodedata

_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9:_-]{0,40}(?:\s[^<>]{0,200})?/?>")
"""SSML/HTML-like tags. Chat's "<3" or "a < b" are not tags and stay."""
_SPACE = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?;:\u2026\u3002\uff01\uff1f])\s+")
_CLAUSE_END = re.compile(r"(?<=[,\u3001\uff0c])\s+")


def clean_text(text: str) -> str:
    """What is worth speaking of a chat message.

    NFC-normalised; control and format characters (NUL, escapes, zero-width joiners, BOMs,
    bidi overrides) removed; markup tags dropped rather than read out; whitespace collapsed.
    An empty result means there is nothing to speak.
    """
    text = unicodedata.normalize("NFC", text)
    text = _TAG.sub(" ", text)
    kept = []
    for ch in text:
        category = unicodedata.category(ch)
        if category in ("Cc", "Cf", "Cs", "Co", "Cn"):
            kept.append(" " if ch in "\t\n\r\v\f" else "")
        else:
            kept.append(ch)
    return _SPACE.sub(" ", "".join(kept)).strip()


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
