"""Deadline-aware synthesis: the segment whose listener runs out of audio first goes first.

Synthesis is the scarce resource. First-come synthesis made a chat line's first sentence wait in
one FIFO behind sentences other sessions would not play for seconds. Here every pending segment
(one model inference: a sentence, or a piece of one) carries the moment its listener runs out of
audio, and free cores take the earliest such deadline:

- a stream's first segment: the caller's hint (when the listener's earlier audio ends), else now
  plus the first-audio target;
- every later one: when the audio already produced runs out, i.e. playback start (the first
  segment ready, or the hint if later) plus the seconds synthesized so far, less ``early_s``
  (a session holds back the last partial frame of a chunk until the next chunk comes).

A segment must be *finished* by its deadline, so the order is by latest start: the deadline less
the segment's estimated inference time (known once it is phonemized, which happens right after
the segment before it).

Lines already being heard come first once they are due soon (``PLAYING_FIRST_S``): earliest
deadline first alone let new messages' first segments (due 0.15 s after they came) go before
every playing line with more than that in hand, so near the machine's capacity a burst of new
lines pushed the lines already playing past their deadlines: at 64 chat sessions 129 gaps in
lines already playing (63 sessions, worst 1.7 s), none with this rule. Under overload new
messages wait instead: their first audio comes later, and nothing already heard breaks up.

A stream is an iterator of segments with only ONE segment pending at a time: the next is taken
from the iterator when the previous is done. A stream far ahead of its listener therefore holds
no queue of work; its next segment simply carries a late deadline and waits while anything more
urgent is pending (no core is left idle for it, though: the order is earliest deadline first, not
a pacing). Taking the next segment from the iterator (phonemizing) runs on the worker too, never
on the event loop.

Threads, the way the load needs them. An onnxruntime session runs an inference on its
``intra_op_num_threads``; two sessions of one model file with different settings share the
machine. Measured on this 2-core machine (Piper joe medium, onnxruntime 1.32, three chat
sentences of 3.0-3.9 s synthesized 8 times over, four runs; the pair is two Python threads on
the 1-thread session; the machine was shared with other work):

==========================================  ==========================================
one 1-thread job alone                      RTF 0.074-0.083
one 2-thread job alone, spinning off        RTF 0.045-0.056 (spinning on: 0.049-0.061)
two 1-thread jobs at once                   RTF 0.076-0.087 each: 0.039-0.044 wall
                                            seconds per audio second for the pair
==========================================  ==========================================

(DESIGN.md's older figures were 0.082 and 0.067.) So a lone job finishes ~35 % sooner on both
cores, while two single-threaded jobs carry ~25 % more audio per second. With two segments
waiting, running them one after the other on two threads finishes them at 0.05 L and 0.10 L
(mean 0.075 L for L seconds of audio each), side by side on one thread each at 0.078 L: a wash
for latency, a loss of a quarter of the throughput when the queue is building. The rule: **a
job gets every core when all cores are free and nothing else is waiting; otherwise one
thread.** A segment arriving while a wide job runs waits for it (at most one segment's
inference, tens of ms for a clause): oversubscribing the cores would slow both. So only an
urgent job goes wide — a new message's first segment, or a playing line's due within
``PLAYING_FIRST_S``; a segment whose listener has more in hand runs on one thread (cheaper in CPU
too) and leaves a core to whatever comes next. At 32 chat sessions the slowest first audios had
waited 180-325 ms for a core, mostly behind such wide jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from contextvars import ContextVar
from typing import Generic, TypeVar, cast

log = logging.getLogger(__name__)

PLAYING_FIRST_S = 1.0
"""A stream whose listener is playing goes before every new message once its next segment must
start within this long: its listener already hears it, and a gap in a line is worse than a later
start of the next (a new message's first segment is due 0.15 s after it came). Beyond this, new
messages go first: a listener with this much audio in hand can wait one inference or two."""

heard_until: ContextVar[float | None] = ContextVar("livevoice_heard_until", default=None)
"""When the listener of what is synthesized next runs out of the audio it already has
(``time.monotonic``), set by whoever sends it (a session's speaker): a stream started without a
``deadline`` takes it from here, through the engine wrappers in between. None, or a moment
already past: the listener waits now."""


class HeardUntil:
    """Where a listener's audio runs out, kept by whoever sends it messages one after another (a
    session's speaker, a channel's): each message is taken to start playing at its first audio,
    or when the audio before it ends if that is later, and to play without a gap."""

    __slots__ = ("_playing", "until")

    def __init__(self) -> None:
        self.until = 0.0
        """``time.monotonic`` when the audio sent so far runs out."""
        self._playing = False

    def begin(self) -> None:
        """A new message: its synthesis is not due before ``until`` (``heard_until``, in the
        calling task's context, read when the engine's stream starts)."""
        heard_until.set(self.until)
        self._playing = False

    def sent(self, seconds: float) -> None:
        """Audio of the message went to the listener."""
        if not self._playing:
            self.until = max(self.until, time.monotonic())
            self._playing = True
        self.until += seconds


S = TypeVar("S")
"""A segment: what one inference takes."""
R = TypeVar("R")
"""What one inference gives (PCM)."""

_END = object()
_NOTHING = object()


class _Stream(Generic[S, R]):
    """One consumer's segments, and where its listener's audio stands."""

    __slots__ = (
        "cancelled",
        "deadline",
        "deliver",
        "heard_from",
        "running",
        "seconds",
        "segments",
        "upcoming",
    )

    def __init__(
        self, segments: Iterator[S], deadline: float, deliver: Callable[[object], None]
    ) -> None:
        self.segments = segments
        self.upcoming: object = _NOTHING
        """The next segment, taken from ``segments`` right after the one before it was done."""
        self.deadline = deadline
        """When the listener runs out of audio: the next segment must be ready by then."""
        self.heard_from: float | None = None
        """When the listener starts playing this stream: its first segment ready, or the hint
        (the end of the audio before it) when that is later."""
        self.seconds = 0.0
        """Audio produced so far."""
        self.deliver = deliver
        self.cancelled = False
        self.running = False
        """A worker is inside the iterator or the job for this stream."""


class SynthesisScheduler(Generic[S, R]):
    """Earliest-deadline-first workers over ``cores`` thread slots.

    ``run(segment, threads)`` is one inference on ``threads`` intra-op threads; ``seconds(result)``
    is the audio it made; ``cost(segment)``, an estimate of the inference's seconds on one thread.
    A segment must be *finished* by its deadline, so it is ordered by its latest start (deadline
    less cost): of two sentences due at nearly the same moment, the longer starts first. All
    three are called on worker threads; the iterators given to ``stream`` are advanced there too,
    one step at a time per stream.
    """

    def __init__(
        self,
        run: Callable[[S, int], R],
        seconds: Callable[[R], float],
        *,
        cost: Callable[[S], float] = lambda segment: 0.0,
        cores: int = 2,
        first_audio_s: float = 0.15,
        early_s: float = 0.0,
        playing_first_s: float = PLAYING_FIRST_S,
        clock: Callable[[], float] = time.monotonic,
        name: str = "synthesis",
    ) -> None:
        if cores < 1:
            raise ValueError(f"cores must be at least 1, not {cores}")
        self._run = run
        self._seconds = seconds
        self._cost = cost
        self.cores = cores
        self.first_audio_s = first_audio_s
        self.early_s = early_s
        """A later segment is due this long before the listener's audio runs out: what the
        consumer holds back (a partial frame) and the time to deliver it."""
        """A new stream's first segment is due this long after it is submitted."""
        self._clock = clock
        self._free = cores
        self.playing_first_s = playing_first_s
        self._playing: list[tuple[float, int, _Stream[S, R]]] = []
        """Streams whose listener is playing (their first segment is done, or they follow
        audio the listener already has), by latest start."""
        self._new: list[tuple[float, int, _Stream[S, R]]] = []
        """Streams nobody hears yet: a new message's first segment, by latest start."""
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._workers = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(cores)
        ]
        for worker in self._workers:
            worker.start()

    @property
    def waiting(self) -> int:
        """Streams with a segment due and no core on it yet (cancelled ones not yet dropped)."""
        with self._cond:
            return len(self._playing) + len(self._new)

    async def stream(
        self, segments: Iterator[S], *, deadline: float | None = None
    ) -> AsyncGenerator[R, None]:
        """Each segment's result, in order, as soon as it is synthesized.

        ``deadline`` (on the scheduler's clock, ``time.monotonic``): when the listener runs out
        of the audio it already has (the end of the message before this one); None: what
        ``heard_until`` says in the caller's context, and when that is None or past, the
        listener is waiting now and the first segment is due after the first-audio target.
        A stream with a deadline counts as playing (``PLAYING_FIRST_S``). Closing the
        generator drops the stream's pending segment; one already running finishes and is
        discarded. An error in this stream's iterator or job ends this stream alone.
        """
        loop = asyncio.get_running_loop()
        results: asyncio.Queue[object] = asyncio.Queue()

        def deliver(item: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
                loop.call_soon_threadsafe(results.put_nowait, item)

        if deadline is None and (hint := heard_until.get()) is not None and hint > self._clock():
            deadline = hint
        first = self._clock() + self.first_audio_s if deadline is None else deadline
        stream: _Stream[S, R] = _Stream(segments, first, deliver)
        if deadline is not None:
            stream.heard_from = deadline
        with self._cond:
            if self._closed:
                raise RuntimeError("the synthesis scheduler is closed")
            self._submit(stream)
        try:
            while True:
                item = await results.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield cast(R, item)
        finally:
            self._cancel(stream)

    def close(self, *, wait: bool = False) -> None:
        """Stop taking work: pending segments are dropped and their streams end; running jobs
        finish. ``wait``: return only once they have and the workers are gone. The workers are
        daemon threads (a scheduler nobody closed must not hold the process up), so a job
        still running when the interpreter exits is torn down under it: onnxruntime aborts the
        process ("terminate called without an active exception") when its session is
        destroyed mid-run."""
        with self._cond:
            self._closed = True
            dropped = [stream for _, _, stream in self._playing + self._new]
            self._playing.clear()
            self._new.clear()
            self._cond.notify_all()
        for stream in dropped:
            stream.deliver(_END)
            self._close_iterator(stream)
        if wait:
            for worker in self._workers:
                if worker is not threading.current_thread():
                    worker.join()

    def _submit(self, stream: _Stream[S, R]) -> None:
        """Under the lock: the stream's next segment is due at ``stream.deadline``, so it must
        start by then less what it costs (a first segment's cost is not known yet: it is
        taken from its iterator on a worker)."""
        start_by = stream.deadline
        if stream.upcoming is not _NOTHING:
            start_by -= self._cost(cast(S, stream.upcoming))
        queue = self._new if stream.heard_from is None else self._playing
        heapq.heappush(queue, (start_by, next(self._order), stream))
        self._cond.notify()

    def _cancel(self, stream: _Stream[S, R]) -> None:
        with self._cond:
            if stream.cancelled:
                return
            stream.cancelled = True
            if stream.running:
                return  # the worker closes the iterator when it is out of it
            for queue in (self._playing, self._new):
                kept = [entry for entry in queue if entry[2] is not stream]
                if len(kept) != len(queue):
                    queue[:] = kept
                    heapq.heapify(queue)
        self._close_iterator(stream)

    def _take(self) -> tuple[_Stream[S, R], int] | None:
        """Under the lock: the most urgent stream and its threads, or None once closed."""
        while not self._closed:
            if (self._playing or self._new) and self._free > 0:
                playing, new = self._playing, self._new
                soon = self._clock() + self.playing_first_s
                queue = playing if playing and (not new or playing[0][0] <= soon) else new
                start_by, _, stream = heapq.heappop(queue)
                # Every core for one job only when it is urgent (a new message's, or a playing
                # line's due soon): one far ahead of its listener takes one, and a message that
                # comes meanwhile finds the other free instead of waiting out a wide job.
                urgent = queue is new or start_by <= soon
                wide = urgent and self._free == self.cores and not playing and not new
                threads = self.cores if wide else 1
                self._free -= threads
                stream.running = True
                return stream, threads
            self._cond.wait()
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                taken = self._take()
            if taken is None:
                return
            stream, threads = taken
            segment, stream.upcoming = stream.upcoming, _NOTHING
            result: object = _NOTHING
            error: BaseException | None = None
            last = False
            try:
                if segment is _NOTHING:
                    segment = next(stream.segments)
                result = self._run(cast(S, segment), threads)
                if not stream.cancelled:
                    # Taken now, on this worker: the stream's end is known as soon as its last
                    # audio is, and a pending stream always has a segment to synthesize.
                    stream.upcoming = next(stream.segments)
            except StopIteration:
                last = True
            except BaseException as exc:  # the stream's error, for its consumer alone
                error = exc
            self._finish(stream, threads, result, error, last=last)

    def _finish(
        self,
        stream: _Stream[S, R],
        threads: int,
        result: object,
        error: BaseException | None,
        *,
        last: bool,
    ) -> None:
        with self._cond:
            self._free += threads
            stream.running = False
            ended = last or error is not None or self._closed
            if result is not _NOTHING and not stream.cancelled:
                if stream.seconds == 0.0:
                    # playback starts when the first audio is ready (or the earlier audio ends)
                    stream.heard_from = max(stream.heard_from or 0.0, self._clock())
                stream.seconds += self._seconds(cast(R, result))
                heard_until = (stream.heard_from or 0.0) + stream.seconds
                stream.deadline = heard_until - self.early_s
            if not ended and not stream.cancelled:
                self._submit(stream)
            self._cond.notify_all()  # slots freed: every idle worker looks again
            cancelled = stream.cancelled
        if cancelled:
            self._close_iterator(stream)
            return
        if result is not _NOTHING:
            stream.deliver(result)
        if error is not None:
            stream.deliver(error)
        if ended:
            stream.deliver(_END)
            self._close_iterator(stream)

    @staticmethod
    def _close_iterator(stream: _Stream[S, R]) -> None:
        close = getattr(stream.segments, "close", None)
        if close is None:
            return
        try:
            close()
        except Exception:
            log.exception("closing a synthesis stream's segments failed")
