"""Chat text cleaning and segmenting (pure functions)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from live.text import clean_text, segments


def test_clean_text_keeps_what_is_spoken() -> None:
    assert clean_text("  Hello\tchat!\n\nGG  ") == "Hello chat! GG"
    assert clean_text("he\u200bllo\u200d wor\ufeffld") == "hello world"
    assert clean_text("bell\x07 and \x1b[31mred\x00") == "bell and [31mred"
    assert clean_text("<speak><break time='3s'/>Hi <b>there</b></speak>") == "Hi there"
    assert clean_text("I <3 you and a < b > c") == "I <3 you and a < b > c"
    assert clean_text("\u202eevil\u202c") == "evil"
    assert clean_text("مرحبا 😀") == "مرحبا 😀"
    assert clean_text("\x00\u200b \n") == ""
    assert clean_text("e\u0301") == "\u00e9"  # NFC


def test_segments_split_sentences_and_bound_length() -> None:
    assert segments("One. Two! Three? Four") == ["One.", "Two!", "Three?", "Four"]
    long = "lol " * 500
    parts = segments(long, max_chars=200)
    assert all(len(p) <= 200 for p in parts) and len(parts) >= 10
    assert " ".join(parts).split() == long.split()
    assert all(len(p) <= 50 for p in segments("a" * 2000, max_chars=50))
    assert segments("a, b, c", max_chars=3) == ["a,", "b,", "c"]


@given(st.text(max_size=400))
def test_segments_lose_no_words(text: str) -> None:
    cleaned = clean_text(text)
    parts = segments(cleaned, max_chars=40)
    assert all(0 < len(p) <= 40 for p in parts)
    assert "".join("".join(parts).split()) == "".join(cleaned.split())
