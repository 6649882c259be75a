"""Chat text cleaning and segmenting (pure functions)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from live.speech import PiperEngine
from live.text import clean_text, segments


def test_clean_text_keeps_what_is_spoken() -> None:
    assert clean_text("  Hello\tchat!\n\nGG  ") == "Hello chat! GG"
    assert clean_text("he\u200bllo\u200d wor\ufeffld") == "hello world"
    assert clean_text("bell\x07 and \x1b[31mred\x00") == "bell and [31mred"
    assert clean_text("<speak><break time='3s'/>Hi <b>there</b></speak>") == "Hi there"
    assert clean_text("I <3 you and a < b > c") == "I <3 you and a < b > c"
    assert clean_text("\u202eevil\u202c") == "evil"
    assert clean_text("مرحبا 😀") == "مرحبا"
    assert clean_text("\x00\u200b \n") == ""
    assert clean_text("e\u0301") == "\u00e9"  # NFC


def test_emoji_are_not_spoken() -> None:
    """Not even one name: a message of emoji only has nothing to speak."""
    assert clean_text("😀🎉🔥👍🏽🧑\u200d🚀" * 400) == ""
    assert clean_text("GG 😀 well played 🎉🔥") == "GG well played"
    assert (
        clean_text(
            "from 🇺🇸 to 🇫🇷 and 🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"
        )
        == "from to and"
    )  # regional-indicator flags, and a tag sequence (Scotland)
    assert clean_text("wave 👋🏽 👋🏿 👋") == "wave"  # skin-tone modifiers
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466"
    doctor = "\U0001f469\u200d\u2695\ufe0f"
    kiss = "\U0001f469\u200d\u2764\ufe0f\u200d\U0001f48b\u200d\U0001f468"
    assert clean_text(f"the {family} {doctor} {kiss} crew") == "the crew"  # ZWJ sequences
    assert clean_text("press 1\ufe0f\u20e3 or #\ufe0f\u20e3 or *\u20e3 now") == "press or or now"
    symbols = "\u2764\ufe0f \u2728 \u2705 \u2b50 \u25b6\ufe0f \u231a \u21a9\ufe0f"
    assert clean_text(symbols + " \u00a9\ufe0f \u203c\ufe0f \u2122") == ""  # "❤️✨✅⭐▶️⌚↩️©️‼️™"
    assert clean_text("\u263a\ufe0e smile\ufe0f") == "smile"  # variation selectors, text or emoji


def test_cleaning_keeps_text_numbers_and_scripts() -> None:
    assert clean_text("I <3 you, 1000000 times :) 20°C → café, naïve") == (
        "I <3 you, 1000000 times :) 20°C → café, naïve"
    )
    assert (
        clean_text("日本語のテキスト 中文 한국어 😀 Ελληνικά")
        == "日本語のテキスト 中文 한국어 Ελληνικά"
    )
    assert clean_text("O\u0308sterreich") == "Österreich"


def test_spam_is_said_once() -> None:
    assert clean_text("wow!!!!!!!! aaaaaaaaaaa nooooo") == "wow!!! aaa nooo"
    assert clean_text("lol!!! zzz book") == "lol!!! zzz book"  # three is not a run
    assert clean_text("KEKW KEKW KEKW KEKW that was close") == "KEKW that was close"
    assert clean_text("LUL lul Lul LUL") == "LUL"
    assert clean_text("KEKW 😀 KEKW 🎉 KEKW") == "KEKW"  # emoji between do not break the run
    assert clean_text("bye bye chat, no no no") == "bye bye chat, no"  # twice is speech
    assert clean_text("999999999999 and 1111") == "999999999999 and 1111"  # numbers stay
    assert clean_text("ha" * 500) == "ha" * 500  # one long word: segments and the engine bound it


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


def test_chat_cannot_inject_raw_phonemes(piper: PiperEngine) -> None:
    """Piper reads ``[[ ... ]]`` as phonemes; from chat it is text like any other."""
    cleaned = clean_text("say [[ h ə l oʊ ]] now")
    assert "[[" not in cleaned and "]]" not in cleaned
    raw = [p for sentence in piper._voice.phonemize(cleaned) for p in sentence]
    injected = [
        p for sentence in piper._voice.phonemize("say [[ h ə l oʊ ]] now") for p in sentence
    ]
    assert raw != injected
