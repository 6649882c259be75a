"""The bench, run small, so that it cannot rot: every scenario reports numbers and draws its plot.

Speed figures are printed, never asserted (they belong to docs/benchmarks.md); the bench's own
invariants are: one synthesis per channel message however many listen, every listener hearing
every message whole and none cut loose, one encoder call per distinct voice with the cache on
and one per registration with it off, every registration served from the tier it should be,
no client-visible error in any scenario, and no registration slower than a second once Redis is
back after an outage (a stall on a lock or a flapping breaker shows there first).
"""

from __future__ import annotations

import json
import numbers
import subprocess
import sys
from pathlib import Path

import pytest

import bench

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

TINY = [
    "lookup.n=4",
    "lookup.warmup=1",
    "hot_voices.voices=6",
    "hot_voices.registrations=60",
    "hot_voices.clients=4",
    "live_sessions.levels=1,2",
    "live_sessions.seconds=3",
    "live_sessions.interval_s=1.5",
    "live_sessions.drain_s=8",
    "outage.seconds=6",
    "outage.voices=6",
    "outage.clients=4",
    "outage.recovery_wait_s=15",
    "memory.redis_keys=200",
    "memory.l1_voices=200",
    "memory.evicting_puts=50",
    "fanout.levels=1,3",
    "fanout.messages=3",
    "fanout.interval_s=0.5",
    "fanout.rates=48000,16000",
    "fanout.drain_s=20",
]


def _numbers_only(summary: dict[str, object]) -> list[str]:
    """Keys whose value is not a number (None included: a figure that was never measured)."""
    return [
        key
        for key, value in summary.items()
        if isinstance(value, bool) or not isinstance(value, numbers.Real)
    ]


def test_bench_quick_run_reports_every_scenario(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path), *TINY],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=140,
    )
    print(run.stdout)  # the table: shown with -s, never asserted
    assert run.returncode == 0, run.stderr[-4000:]

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["meta"]["machine"]["cores"] >= 1
    assert set(results["scenarios"]) == set(bench.SCENARIOS)
    for name, data in results["scenarios"].items():
        assert "error" not in data, (name, data.get("error"))
        assert data["summary"], name
        assert _numbers_only(data["summary"]) == [], (name, data["summary"])
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000, name

    scenarios = results["scenarios"]
    lookup = scenarios["lookup"]
    assert lookup["summary"]["unexpected_sources"] == 0, lookup["tiers"]

    hot = scenarios["hot_voices"]
    on, off = hot["runs"]["cache_on"], hot["runs"]["cache_off"]
    assert on["errors"] == off["errors"] == 0, hot["runs"]
    # Cache on, one server: each distinct voice is embedded once (concurrent registrations of
    # it share that call and report "encoder" too), every other registration is an L1 hit.
    assert on["encoder_calls"] == on["distinct_voices"] > 0, on
    assert set(on["by_source"]) <= {"encoder", "l1"}, on["by_source"]
    assert hot["cache_off_encoder_calls_equal_registrations"] is True, off
    assert off["encoder_calls"] == off["registrations"] > 0, off
    assert off["by_source"] == {"encoder": off["registrations"]}, off["by_source"]

    for level in scenarios["live_sessions"]["levels"]:
        assert level["errors"] == {}, level

    outage = scenarios["outage"]
    assert outage["summary"]["client_errors"] == 0, outage["errors"]
    during, after = outage["phases"]["outage"], outage["phases"]["after"]
    assert "redis" not in during["by_source"], during  # nothing can come from a dead Redis
    assert during["registrations"] > 0 and after["registrations"] > 0, outage["phases"]
    assert outage["summary"]["first_redis_hit_after_s"] is not None, "Redis never served again"
    assert outage["summary"]["breaker_reopened_after_restart"] == 0, outage["breaker_transitions"]
    assert after["latency_ms"]["max"] < 1000, after  # no registration over 1 s once it is back

    fanout = scenarios["fanout"]
    assert [lv["listeners"] for lv in fanout["levels"]] == [1, 3], fanout["skipped_levels"]
    for level in fanout["levels"]:
        # One synthesis per message, fanned out: the engine ran once per message, not per
        # listener; each message spoken; no listener cut loose or erring.
        assert level["engine_calls"] == level["messages"] == level["spoken"] == 3, level
        assert level["producer_errors"] == [] and level["errors"] == {}, level
        assert level["cut_loose"] == 0, level
        # Every listener got every message's audio.end with all the frames and samples it
        # announced, and listeners at one rate got the same samples of each message.
        assert level["messages_missing"] == 0 and level["frames_lost"] == 0, level
        assert level["ttfa_ms"]["n"] == level["listeners"] * level["messages"], level
        assert level["samples_differ"] == 0, level["samples"]
        rates = {"48000", "16000"} if level["listeners"] > 1 else {"48000"}
        assert set(level["samples"]) == rates, level["samples"]
        for by_id in level["samples"].values():
            assert len(by_id) == level["messages"], by_id
            assert all(len(counts) == 1 and counts[0] > 0 for counts in by_id.values()), by_id


def test_livevoice_bench_forwards_to_the_bench(capsys: pytest.CaptureFixture[str]) -> None:
    from live.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    assert "livevoice bench" in capsys.readouterr().out
