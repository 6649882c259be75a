"""A channel's word filter (R17): the streamer's word list, matched in linear time.

No user regexes: a pattern is a literal word with at most one ``*`` (any run of word
characters), so a hostile list cannot make matching backtrack. The text is split into words
once by a fixed pattern; each word is looked up in a set (literals) and checked against the
wildcard patterns by prefix and suffix, so the cost is linear in the text for a bounded list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import Unsupported

MAX_WORDS = 500
"""Patterns in one channel's filter."""
MAX_WORD_CHARS = 64
"""Characters in one pattern."""
ACTIONS = ("mask", "drop")
MASK = "beep"
"""What a matched word is spoken as."""
LINK = "link"
"""What a URL is spoken as, with ``links``."""

_WORD = re.compile(r"\w+")
_PATTERN = re.compile(r"\w*\*?\w*")
_URL = re.compile(r"\b(?:https?://|www\.)\S+|\b[\w-]+\.(?:com|net|org|tv|gg|io|ly)\b\S*")


@dataclass(frozen=True, slots=True)
class WordFilter:
    """A compiled filter: ``literals`` and ``wildcards`` (prefix, suffix), all casefolded."""

    literals: frozenset[str]
    wildcards: tuple[tuple[str, str], ...]
    action: str = "mask"
    links: bool = False

    @classmethod
    def compile(
        cls, words: list[str], *, action: str = "mask", links: bool = False, message_id: str | None
    ) -> WordFilter:
        """Check and compile a ``channel.filter``'s list (``unsupported`` past the bounds)."""
        if action not in ACTIONS:
            raise Unsupported(f"action must be one of {', '.join(ACTIONS)}", message_id=message_id)
        if len(words) > MAX_WORDS:
            raise Unsupported(
                f"a filter holds at most {MAX_WORDS} words; got {len(words)}", message_id=message_id
            )
        literals: set[str] = set()
        wildcards: list[tuple[str, str]] = []
        for word in words:
            if not isinstance(word, str) or not 0 < len(word) <= MAX_WORD_CHARS:
                raise Unsupported(
                    f"each filter word is 1 to {MAX_WORD_CHARS} characters", message_id=message_id
                )
            folded = word.casefold()
            if not _PATTERN.fullmatch(folded) or folded == "*":
                raise Unsupported(
                    f"filter word {word[:64]!r}: letters and digits with at most one '*'",
                    message_id=message_id,
                )
            if "*" in folded:
                prefix, _, suffix = folded.partition("*")
                wildcards.append((prefix, suffix))
            else:
                literals.add(folded)
        return cls(frozenset(literals), tuple(wildcards), action, links)

    @property
    def active(self) -> bool:
        return bool(self.literals or self.wildcards or self.links)

    def matches(self, word: str) -> bool:
        folded = word.casefold()
        if folded in self.literals:
            return True
        return any(
            len(folded) >= len(p) + len(s) and folded.startswith(p) and folded.endswith(s)
            for p, s in self.wildcards
        )

    def apply(self, text: str) -> str | None:
        """The text as spoken: URLs as "link" (with ``links``), matched words masked; None
        when a word matched and the action is ``drop``."""
        if self.links:
            text = _URL.sub(LINK, text)
        if not (self.literals or self.wildcards):
            return text
        hit = False

        def mask(match: re.Match[str]) -> str:
            nonlocal hit
            if self.matches(match.group()):
                hit = True
                return MASK
            return match.group()

        masked = _WORD.sub(mask, text)
        if hit and self.action == "drop":
            return None
        return masked
