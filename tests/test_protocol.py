"""Protocol tier: conformance vectors, codec round trips and fuzzing of the sans-I/O core."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import AudioFrame, ClipUpload, LivevoiceError, ServerProtocol, decode_server, encode
from protocol.errors import all_codes
from protocol.messages import CLIENT_MESSAGES, SERVER_MESSAGES, ChannelJoin, Message, Speak

ROOT = Path(__file__).resolve().parent.parent
VECTORS = json.loads((ROOT / "protocol" / "vectors" / "v1.json").read_text())


def _feed(proto: ServerProtocol, frame: dict[str, Any]) -> Any:
    """One frame, as the server's I/O layer feeds it: every speak the core returns is admitted
    (no rate limit here), every channel.join seated (a resume found in the channel's buffer)."""
    if "text" in frame:
        message = proto.receive_text(frame["text"])
        if isinstance(message, Speak):
            channel = proto.membership is not None
            proto.accept_speak(message, position=len(proto.channel_jobs) if channel else None)
        elif isinstance(message, ChannelJoin):
            resumed = True if message.resume_message is not None else None
            proto.join_channel(message, sample_rate=22050, resumed=resumed)
        return message
    return proto.receive_binary(b"\x01" * frame["binary_len"])


@pytest.mark.parametrize("case", VECTORS["client_sessions"], ids=lambda c: c["name"])
def test_client_session_vectors(case: dict[str, Any]) -> None:
    proto = ServerProtocol(**VECTORS["limits"])
    for frame, expected in zip(case["frames"], case["expect"], strict=True):
        try:
            outcome = _feed(proto, frame)
        except LivevoiceError as exc:
            assert "error" in expected, f"unexpected {exc.code}: {exc.message}"
            assert exc.code == expected["error"]
            assert exc.message_id == expected.get("id")
            continue
        finally:
            sent = [json.loads(f) for f in proto.data_to_send() if isinstance(f, str)]
            if "sends" in expected:
                assert sent == expected["sends"]
        assert "error" not in expected, f"expected {expected['error']}, got {outcome!r}"
        if isinstance(outcome, ClipUpload):
            assert len(outcome.data) == expected["clip"]
        else:
            assert outcome.to_wire() == expected["message"]


@pytest.mark.parametrize("case", VECTORS["server_messages"], ids=lambda c: c["text"][:40])
def test_server_message_vectors(case: dict[str, Any]) -> None:
    if "error" in case:
        with pytest.raises(LivevoiceError) as info:
            decode_server(case["text"])
        assert info.value.code == case["error"]
    else:
        message = decode_server(case["text"])
        assert message.to_wire() == case["message"]
        assert json.loads(encode(message)) == case["message"]


@pytest.mark.parametrize("case", VECTORS["audio_frames"], ids=lambda c: c["name"])
def test_audio_frame_vectors(case: dict[str, Any]) -> None:
    raw = bytes.fromhex(case["hex"])
    if "error" in case:
        with pytest.raises(LivevoiceError) as info:
            AudioFrame.decode(raw)
        assert info.value.code == case["error"]
        return
    frame = AudioFrame.decode(raw)
    exp = case["expect"]
    assert (frame.stream, frame.seq) == (exp["stream"], exp["seq"])
    samples = [
        int.from_bytes(frame.pcm[i : i + 2], "little", signed=True)
        for i in range(0, len(frame.pcm), 2)
    ]
    assert samples == exp["samples"]
    assert frame.encode() == raw


def test_spec_lists_every_message_and_error_code() -> None:
    spec = (ROOT / "protocol" / "SPEC.md").read_text()
    for code in all_codes():
        assert re.search(rf"`{re.escape(code)}`", spec), f"error code {code} missing from SPEC.md"
    for kind in [*CLIENT_MESSAGES, *SERVER_MESSAGES]:
        assert f"`{kind}`" in spec, f"message {kind} missing from SPEC.md"


def test_protocol_imports_no_io_frameworks() -> None:
    for path in (ROOT / "protocol").glob("*.py"):
        source = path.read_text()
        for banned in ("asyncio", "aiohttp", "redis", "torch"):
            assert not re.search(rf"^\s*(import|from)\s+{banned}\b", source, re.M), (path, banned)


def test_state_survives_errors_and_stays_usable() -> None:
    proto = ServerProtocol()
    proto.receive_text('{"type":"hello"}')
    for bad in ["", "{", "null", '{"type":1}', '{"type":"speak"}']:
        with pytest.raises(LivevoiceError):
            proto.receive_text(bad)
    assert proto.receive_text('{"type":"ping","id":"x"}').to_wire() == {"type": "ping", "id": "x"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
message_like = st.fixed_dictionaries(
    {"type": st.sampled_from([*CLIENT_MESSAGES, "x", ""])},
    optional={
        k: json_values
        for k in (
            "id",
            "text",
            "token",
            "voice_id",
            "name",
            "format",
            "sample_rate",
            "protocol",
            "sha256",
        )
    },
)
frames = st.one_of(
    message_like.map(lambda d: ("text", json.dumps(d))),
    st.text(max_size=50).map(lambda s: ("text", s)),
    st.binary(max_size=64).map(lambda b: ("binary", b)),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(frames, max_size=12))
def test_any_frames_in_any_order_yield_a_message_or_a_typed_error(
    sequence: list[tuple[str, Any]],
) -> None:
    proto = ServerProtocol(max_clip_bytes=32)
    for kind, data in sequence:
        try:
            out = proto.receive_text(data) if kind == "text" else proto.receive_binary(data)
        except LivevoiceError as exc:
            assert exc.code in all_codes()
            continue
        assert isinstance(out, Message | ClipUpload)
    # Never stuck: a fresh hello-or-ping is always answered one way or the other.
    try:
        proto.receive_text('{"type":"ping"}')
    except LivevoiceError as exc:
        assert exc.code in {"hello_required", "clip_expected"}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40))
def test_audio_decoder_never_raises_untyped(data: bytes) -> None:
    try:
        frame = AudioFrame.decode(data)
    except LivevoiceError as exc:
        assert exc.code == "bad_audio_frame"
    else:
        assert frame.encode() == data


def test_every_error_is_one_kind_and_says_if_a_retry_can_help() -> None:
    """A caller acts on the kind (rejected request, server failure, session ended) and on
    ``retryable``, never on a list of codes of its own."""
    from protocol.errors import RequestRejected, ServerFailure, SessionEnded

    codes = all_codes()
    kinds = (RequestRejected, ServerFailure, SessionEnded)
    for code, cls in codes.items():
        assert sum(issubclass(cls, kind) for kind in kinds) == 1, code
        assert (cls.close_code is not None) == issubclass(cls, SessionEnded), code
    retryable = {code for code, cls in codes.items() if cls.retryable}
    assert {"rate_limited", "queue_full", "voice_unavailable", "encoder_busy"} <= retryable
    assert not {"unauthorized", "voice_not_found", "clip_not_audio", "bad_json"} & retryable
    assert codes["internal_error"].__name__ == "InternalError"
    spec = (ROOT / "protocol" / "SPEC.md").read_text()
    listed = re.search(r"Retryable codes: (.*?)\. The same", spec, re.S)
    assert listed is not None, "SPEC.md lists the retryable codes"
    assert set(re.findall(r"`([a-z0-9_]+)`", listed.group(1))) == retryable
