"""Real speech for tests: the helpers live in ``live.testing.clips`` (the bench uses them too)."""

from live.testing.clips import (
    REFERENCE_TEXT,
    Pcm,
    espeak_speech,
    flac_bytes,
    mp3_bytes,
    ogg_bytes,
    piper_speech,
    quantize,
    reference_clip,
    reference_wav,
    to_16k,
    wav_bytes,
)

__all__ = [
    "REFERENCE_TEXT",
    "Pcm",
    "espeak_speech",
    "flac_bytes",
    "mp3_bytes",
    "ogg_bytes",
    "piper_speech",
    "quantize",
    "reference_clip",
    "reference_wav",
    "to_16k",
    "wav_bytes",
]
