"""The two sans-I/O cores driven against each other in memory, no socket (h11's ConnectionPair).

``Pair`` plays the I/O layer of both ends: it moves the client's frames into the server core,
admits every speak the server core returns (as the session does when no rate limit trips), and
moves the server's frames back into the client core, collecting the client's events. The slow
parts of a real server (voice store, synthesis) are the test's own calls on the server core.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import ClientProtocol, LivevoiceError, ServerProtocol, encode
from protocol.client import (
    Event,
    SpeechAudio,
    SpeechEnded,
    SpeechFailed,
    SpeechQueued,
    SpeechStarted,
    Unmatched,
    VoiceAnswered,
    VoiceLost,
    VoiceRequestFailed,
    error_code,
)
from protocol.errors import (
    ClipNeeded,
    EncoderFailed,
    NoVoice,
    RateLimited,
    SynthesisFailed,
    VoiceUnavailable,
)
from protocol.messages import (
    Cancel,
    Hello,
    Ping,
    Speak,
    VoiceDelete,
    VoiceDeleted,
    VoiceReady,
    VoiceRegister,
    VoiceUse,
)
from protocol.state import ClipUpload, SpeakJob, VoiceRequest

CLIP = b"RIFF-not-decoded-by-the-core"


class Pair:
    def __init__(self, **limits: Any) -> None:
        self.server = ServerProtocol(**limits)
        self.client = ClientProtocol()
        self.requests: list[VoiceRequest] = []
        """Voice requests the server core started, oldest first."""
        self.events: list[Event] = []
        self.client.send_hello(Hello(client="pair"))
        self.pump()
        self.server.accept_hello(
            session_id="s1", limits={}, default_sample_rate=22050, frame_ms=100
        )
        self.pump()

    def pump(self) -> list[Event]:
        """Move every frame both ways until both are quiet; the client's new events."""
        start = len(self.events)
        while True:
            moved = False
            for frame in self.client.data_to_send():
                moved = True
                self._serve(frame)
            for frame in self.server.data_to_send():
                moved = True
                if isinstance(frame, str):
                    self.events.append(self.client.receive_text(frame))
                else:
                    self.events.append(self.client.receive_binary(frame))
            if not moved:
                return self.events[start:]

    def _serve(self, frame: str | bytes) -> None:
        try:
            if isinstance(frame, bytes):
                upload = self.server.receive_binary(frame)
                assert isinstance(upload, ClipUpload) and upload.request is not None
                self.requests.append(upload.request)
                return
            message = self.server.receive_text(frame)
        except LivevoiceError as exc:
            self.server.reject(exc)
            return
        if isinstance(message, Speak):
            self.server.accept_speak(message)
        elif isinstance(message, VoiceUse) or (
            isinstance(message, VoiceRegister) and message.sha256 is not None
        ):
            self.requests.append(self.server._voice)  # type: ignore[arg-type]

    # --- the server's slow side -----------------------------------------------------------------
    def pin(self, request: VoiceRequest, voice_id: str = "v_a") -> list[Event]:
        self.server.voice_pinned(request, VoiceReady(voice_id=voice_id, source="encoder", ms=1.0))
        return self.pump()

    def register(self, voice_id: str = "v_a") -> str:
        request_id = self.client.send_voice_register(VoiceRegister(name="me"), CLIP)
        self.pump()
        events = self.pin(self.requests[-1], voice_id)
        assert [type(e) for e in events] == [VoiceAnswered]
        return request_id

    def speak(self, *ids: str) -> list[Event]:
        for message_id in ids:
            self.client.send_speak(Speak(id=message_id, text=f"say {message_id}"))
        return self.pump()

    def speak_next(self, frames: int = 2, *, samples: int = 3) -> SpeakJob:
        """Speak the next message through: start, ``frames`` frames, end."""
        job = self.server.next_speak()
        assert job is not None
        self.server.voice_of(job)
        if self.server.start_audio(job, 22050):
            for _ in range(frames):
                self.server.audio(job, b"\x01\x00" * samples)
            self.server.end_audio(job, ttfa_ms=1.0)
        self.pump()
        return job


def _ends(events: list[Event]) -> list[tuple[str, str]]:
    out = []
    for e in events:
        if isinstance(e, SpeechEnded):
            out.append((e.id, "cancelled" if e.cancelled else "spoken"))
        elif isinstance(e, SpeechFailed):
            out.append((e.id, error_code(e.error)))
    return out


def test_speaks_are_queued_and_spoken_in_order_on_numbered_streams() -> None:
    pair = Pair()
    pair.register()
    events = pair.speak("m1", "m2", "m3")
    assert [(e.id, e.position) for e in events if isinstance(e, SpeechQueued)] == [
        ("m1", 0),
        ("m2", 1),
        ("m3", 2),
    ]
    for _ in range(3):
        pair.speak_next(frames=2)
    started = [(e.id, e.stream) for e in pair.events if isinstance(e, SpeechStarted)]
    assert started == [("m1", 1), ("m2", 2), ("m3", 3)]
    ends = [e for e in pair.events if isinstance(e, SpeechEnded)]
    assert [(e.id, e.end.frames, e.end.samples) for e in ends if e.end] == [
        ("m1", 2, 6),
        ("m2", 2, 6),
        ("m3", 2, 6),
    ]
    assert sum(isinstance(e, SpeechAudio) for e in pair.events) == 6
    assert pair.client.speaking == [] and not pair.server.busy


def test_one_message_at_a_time() -> None:
    pair = Pair()
    pair.register()
    pair.speak("m1", "m2")
    first = pair.server.next_speak()
    assert first is not None and first.id == "m1"
    assert pair.server.next_speak() is None  # m1 has not ended
    pair.server.start_audio(first, 16000)
    pair.server.end_audio(first, ttfa_ms=0.0)
    second = pair.server.next_speak()
    assert second is not None and second.id == "m2"


def test_cancel_by_id_drops_one_waiting_message() -> None:
    pair = Pair()
    pair.register()
    pair.speak("m1", "m2", "m3")
    pair.client.send_cancel(Cancel(id="m2"))
    assert _ends(pair.pump()) == [("m2", "cancelled")]
    pair.speak_next()
    pair.speak_next()
    assert _ends(pair.events) == [("m2", "cancelled"), ("m1", "spoken"), ("m3", "spoken")]


def test_cancel_of_the_current_message_stops_its_audio() -> None:
    pair = Pair()
    pair.register()
    pair.speak("m1", "m2")
    job = pair.server.next_speak()
    assert job is not None
    assert pair.server.start_audio(job, 24000)
    assert pair.server.audio(job, b"\x00\x00" * 10)
    pair.client.send_cancel(Cancel(id="m1"))
    pair.pump()
    assert job.cancelled
    assert not pair.server.audio(job, b"\x00\x00" * 10)  # R9: nothing after the cancel
    pair.server.end_audio(job, ttfa_ms=2.0)
    ended = [e for e in pair.pump() if isinstance(e, SpeechEnded)]
    assert len(ended) == 1 and ended[0].end is not None
    assert (ended[0].end.cancelled, ended[0].end.frames, ended[0].end.samples) == (True, 1, 10)
    pair.speak_next()
    assert _ends(pair.events) == [("m1", "cancelled"), ("m2", "spoken")]


def test_cancel_all_stops_the_current_and_drops_the_rest() -> None:
    pair = Pair()
    pair.register()
    pair.speak("m1", "m2", "m3")
    job = pair.server.next_speak()
    assert job is not None
    pair.client.send_cancel(Cancel())
    assert _ends(pair.pump()) == [("m2", "cancelled"), ("m3", "cancelled")]
    # Cancelled before its audio started: it ends `cancelled`, not audio.end.
    assert not pair.server.start_audio(job, 22050)
    assert _ends(pair.pump()) == [("m1", "cancelled")]
    assert not pair.server.busy and pair.client.speaking == []


def test_purge_while_speaking_stops_everything_and_leaves_no_voice() -> None:
    pair = Pair()
    pair.register("v_a")
    pair.speak("m1", "m2")
    job = pair.server.next_speak()
    assert job is not None
    pair.server.start_audio(job, 22050)
    pair.server.audio(job, b"\x00\x00")
    assert pair.server.purge("v_a")
    events = pair.pump()
    assert _ends(events) == [("m2", "cancelled")]
    assert isinstance(events[-1], VoiceLost) and events[-1].notice.pinned
    assert job.cancelled
    pair.server.end_audio(job, ttfa_ms=0.0)
    assert _ends(pair.pump()) == [("m1", "cancelled")]
    # R5: no voice until another is requested.
    assert _ends(pair.speak("m3")) == [("m3", "no_voice")]
    assert not pair.server.purge("v_a")  # heard again (pub/sub): nothing left to drop


def test_own_delete_answers_after_the_purge_it_caused() -> None:
    pair = Pair()
    pair.register("v_a")
    pair.speak("m1")
    request_id = pair.client.send_voice_delete(VoiceDelete(voice_id="v_a"))
    pair.pump()
    delete = pair.server._deletes[0].message
    pair.server.purge("v_a")  # the store tells every session, this one included
    pair.server.voice_deleted(delete)
    events = pair.pump()
    assert _ends(events) == [("m1", "cancelled")]
    answer = events[-1]
    assert isinstance(answer, VoiceAnswered) and answer.request_id == request_id
    assert answer.answer == VoiceDeleted(voice_id="v_a", pinned=True, id=request_id)


def test_deleting_another_voice_leaves_the_pinned_one() -> None:
    pair = Pair()
    pair.register("v_a")
    pair.client.send_voice_delete(VoiceDelete(voice_id="v_other", id="d1"))
    pair.pump()
    assert not pair.server.purge("v_other")
    pair.server.voice_deleted(pair.server._deletes[0].message)
    (answer,) = pair.pump()
    assert isinstance(answer, VoiceAnswered)
    assert answer.answer == VoiceDeleted(voice_id="v_other", pinned=False, id="d1")
    assert _ends(pair.speak("m1")) == []  # still has its voice


def test_failed_delete_answers_its_error_with_its_id() -> None:
    pair = Pair()
    pair.register()
    pair.client.send_voice_delete(VoiceDelete(voice_id="v_a", id="d1"))
    pair.pump()
    delete = pair.server._deletes[0].message
    pair.server.delete_failed(delete, VoiceUnavailable("redis is down"))
    (failed,) = pair.pump()
    assert isinstance(failed, VoiceRequestFailed) and failed.request_id == "d1"
    assert error_code(failed.error) == "voice_unavailable"


def test_failed_registration_falls_back_to_the_voice_before_it() -> None:
    pair = Pair()
    pair.register("v_a")
    first = pair.requests[-1]
    request_id = pair.client.send_voice_register(VoiceRegister(), CLIP)
    pair.speak("m1")  # admitted while the new voice is on its way
    job = pair.server.next_speak()
    assert job is not None
    new = pair.requests[-1]
    assert pair.server.voice_of(job) is new and new.pending
    pair.server.voice_failed(new, EncoderFailed("the encoder failed"))
    (failed,) = pair.pump()
    assert isinstance(failed, VoiceRequestFailed) and failed.request_id == request_id
    assert pair.server.voice_of(job) is first  # R4
    assert pair.server.start_audio(job, 22050)
    pair.speak("m2")  # the session still has a voice
    assert _ends(pair.events) == []


def test_a_register_by_hash_sends_no_clip_and_clip_needed_falls_back() -> None:
    pair = Pair()
    pair.register("v_a")
    first = pair.requests[-1]
    sha256 = "ab" * 32
    request_id = pair.client.send_voice_register(VoiceRegister(sha256=sha256), None)
    pair.speak("m1")  # admitted at once: the session is not waiting for a clip (R2)
    new = pair.requests[-1]
    assert new is not first and new.pending
    job = pair.server.next_speak()
    assert job is not None and pair.server.voice_of(job) is new
    pair.server.voice_failed(new, ClipNeeded("send the clip"))
    (failed,) = pair.pump()
    assert isinstance(failed, VoiceRequestFailed) and failed.request_id == request_id
    assert isinstance(failed.error, ClipNeeded)
    assert pair.server.voice_of(job) is first  # R4, as for any failed request
    # The client side keeps the two forms apart: a clip, or its hash and no clip.
    with pytest.raises(ValueError):
        pair.client.send_voice_register(VoiceRegister(sha256=sha256), CLIP)
    with pytest.raises(ValueError):
        pair.client.send_voice_register(VoiceRegister(), None)


def test_failed_first_registration_fails_its_speaks_and_leaves_no_voice() -> None:
    pair = Pair()
    pair.client.send_voice_register(VoiceRegister(id="reg"), CLIP)
    pair.speak("m1")
    job = pair.server.next_speak()
    assert job is not None
    pair.server.voice_failed(pair.requests[-1], RateLimited("too many registrations"))
    with pytest.raises(LivevoiceError) as info:
        pair.server.voice_of(job)
    pair.server.fail_speak(job, info.value)
    events = pair.pump()
    assert [type(e) for e in events] == [VoiceRequestFailed, SpeechFailed]
    assert _ends(events) == [("m1", "voice_failed")]
    assert _ends(pair.speak("m2")) == [("m2", "no_voice")]


def test_voice_requests_are_answered_by_id_in_any_order() -> None:
    pair = Pair()
    first = pair.client.send_voice_use(VoiceUse(voice_id="v_a"))
    second = pair.client.send_voice_register(VoiceRegister(name="b"), CLIP)
    pair.pump()
    use, register = pair.requests
    pair.pin(register, "v_b")
    pair.pin(use, "v_a")
    answers = [
        (e.request_id, e.answer.voice_id) for e in pair.events if isinstance(e, VoiceAnswered)
    ]
    assert answers == [(second, "v_b"), (first, "v_a")]
    assert pair.client.voice_requests == []


def test_duplicate_ids_are_refused_by_both_ends() -> None:
    pair = Pair()
    pair.register()
    pair.speak("m1")
    with pytest.raises(LivevoiceError) as client_side:
        pair.client.send_speak(Speak(id="m1", text="again"))
    assert client_side.value.code == "duplicate_id"
    # A client that sends it anyway: the server refuses it, with its id, and m1 is untouched.
    server_side = ServerProtocol()
    server_side.receive_text('{"type":"hello"}')
    server_side.receive_text('{"type":"voice.use","voice_id":"v_a"}')
    server_side.accept_speak(Speak(id="m1", text="one"))  # type: ignore[arg-type]
    with pytest.raises(LivevoiceError) as info:
        server_side.receive_text('{"type":"speak","id":"m1","text":"two"}')
    assert (info.value.code, info.value.message_id) == ("duplicate_id", "m1")
    job = server_side.next_speak()
    assert job is not None
    # Once m1 ended its id is free again.
    server_side.fail_speak(job, SynthesisFailed("boom"))
    server_side.receive_text('{"type":"speak","id":"m1","text":"three"}')


def test_queue_full_counts_waiting_messages_only() -> None:
    pair = Pair(max_queue=2)
    pair.register()
    events = pair.speak("m1", "m2", "m3")
    assert _ends(events) == [("m3", "queue_full")]
    pair.server.next_speak()  # m1 is spoken now: one waits, so one more fits
    assert _ends(pair.speak("m4")) == []
    assert _ends(pair.speak("m5")) == [("m5", "queue_full")]


def test_synthesis_failure_is_the_speaks_one_end() -> None:
    pair = Pair()
    pair.register()
    pair.speak("m1")
    job = pair.server.next_speak()
    assert job is not None
    pair.server.start_audio(job, 22050)
    pair.server.audio(job, b"\x00\x00")
    pair.server.fail_speak(job, SynthesisFailed("boom"))
    pair.server.end_audio(job, ttfa_ms=0.0)  # too late: already ended
    pair.server.fail_speak(job, SynthesisFailed("again"))
    assert _ends(pair.pump()) == [("m1", "synthesis_failed")]


def test_client_catches_a_gap_and_a_miscount() -> None:
    pair = Pair()
    pair.register()
    pair.speak("m1", "m2")
    job = pair.server.next_speak()
    assert job is not None
    pair.server.start_audio(job, 22050)
    pair.server.audio(job, b"\x00\x00")
    job.frames += 1  # a frame lost on the way
    pair.server.audio(job, b"\x00\x00")
    failed = [e for e in pair.pump() if isinstance(e, SpeechFailed)]
    assert [(e.id, e.error.code) for e in failed] == [("m1", "bad_audio_frame")]
    pair.server.end_audio(job, ttfa_ms=0.0)
    assert isinstance(pair.pump()[-1], Unmatched)  # m1 already failed on the client
    job = pair.server.next_speak()
    assert job is not None
    pair.server.start_audio(job, 22050)
    pair.server.audio(job, b"\x00\x00")
    job.samples += 5
    pair.server.end_audio(job, ttfa_ms=0.0)
    assert _ends(pair.pump()) == [("m2", "bad_audio_frame")]


def test_ping_is_answered_by_the_core() -> None:
    pair = Pair()
    pair.client.send_ping(Ping(id="p1"))
    (pong,) = pair.pump()
    assert pong.message.TYPE == "pong" and getattr(pong, "id", None) == "p1"


def test_hello_refused_and_close_code() -> None:
    server = ServerProtocol()
    client = ClientProtocol()
    client.send_hello(Hello(token="bad"))
    server.receive_text(client.data_to_send()[0])
    from protocol.errors import Unauthorized

    server.reject(Unauthorized("no such token"))
    server.reject(Unauthorized("never sent: the session is closed"))
    frames = server.data_to_send()
    assert server.close_code == 4401 and len(frames) == 1
    event = client.receive_text(frames[0])
    assert type(event).__name__ == "HelloRefused"


# --- every admitted speak ends exactly once, whatever happens ---------------------------------
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("speak"), st.sampled_from(["a", "b", "c", "d"])),
        st.tuples(st.just("cancel"), st.sampled_from([None, "a", "b", "c"])),
        st.tuples(st.just("step"), st.integers(0, 3)),
        st.tuples(st.just("register"), st.booleans()),
        st.tuples(st.just("land"), st.booleans()),
        st.tuples(st.just("purge"), st.just(None)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_every_admitted_speak_ends_exactly_once(ops: list[tuple[str, Any]]) -> None:
    pair = Pair(max_queue=3)
    pair.register("v_0")
    pending: list[VoiceRequest] = []
    job: SpeakJob | None = None
    for n, (op, arg) in enumerate(ops):
        if op == "speak" and arg not in pair.client.speaking:
            pair.speak(arg)
        elif op == "cancel":
            pair.client.send_cancel(Cancel(id=arg))
        elif op == "register":
            pair.client.send_voice_register(VoiceRegister(), CLIP)
            pair.pump()
            pending.append(pair.requests[-1])
        elif op == "land" and pending:
            request = pending.pop(0)
            if arg:
                pair.pin(request, f"v_{n}")
            else:
                pair.server.voice_failed(request, EncoderFailed("no"))
        elif op == "purge" and pair.server.pinned_voice_id is not None:
            pair.server.purge(pair.server.pinned_voice_id)
        elif op == "step":
            job = job or pair.server.next_speak()
            if job is not None:
                job = _step(pair.server, job, arg)
        pair.pump()
    while job is not None or pair.server.busy:  # drain: everything left ends
        job = job or pair.server.next_speak()
        assert job is not None
        for request in pending:
            pair.pin(request)
        pending.clear()
        job = _step(pair.server, job, 3)
        pair.pump()
    queued = [e.id for e in pair.events if isinstance(e, SpeechQueued)]
    ends = [e for e in pair.events if isinstance(e, SpeechEnded | SpeechFailed) and not _refused(e)]
    assert sorted(e.id for e in ends) == sorted(queued)
    ended_jobs = [job for job, _ in pair.server.speaks_ended()]
    assert len({id(j) for j in ended_jobs}) == len(ended_jobs) == len(queued)
    assert pair.client.speaking == []


def _refused(event: Event) -> bool:
    """An error answering a speak that was never queued (no_voice, duplicate, queue full)."""
    return isinstance(event, SpeechFailed) and error_code(event.error) in {
        "no_voice",
        "queue_full",
        "duplicate_id",
    }


def _step(server: ServerProtocol, job: SpeakJob, phase: int) -> SpeakJob | None:
    """Advance the current job: 0 nothing, 1 start, 2 a frame, 3 to its end."""
    if phase == 0:
        return job
    try:
        request = server.voice_of(job)
    except LivevoiceError as exc:
        server.fail_speak(job, exc)
        return None
    if request.pending and phase < 3:
        return job
    if job.stream is None and not server.start_audio(job, 16000):
        return None
    server.audio(job, b"\x00\x00")
    if phase == 3:
        server.end_audio(job, ttfa_ms=0.0)
        return None
    return job


def test_a_purge_between_the_checks_and_admission_answers_no_voice() -> None:
    """The server awaits its own checks (a shared rate limit) between ``receive_text`` and
    ``accept_speak``; a purge landing in that gap is answered ``no_voice``, not a crash."""
    pair = Pair()
    pair.register("v_a")
    speak = pair.server.receive_text(encode(Speak(id="m1", text="Hello there.")))
    assert isinstance(speak, Speak)
    assert pair.server.purge("v_a")
    with pytest.raises(NoVoice) as refused:
        pair.server.accept_speak(speak)
    assert refused.value.message_id == "m1"
