"""The bench, run small, so that it cannot rot: every scenario reports numbers and draws its plot.

Figures are printed, never asserted; only the hard invariants are: no client-visible error while
Redis is down and back, and a cache-off run that calls the encoder once per registration.
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

    outage = results["scenarios"]["outage"]["summary"]
    assert outage["client_errors"] == 0, results["scenarios"]["outage"]["errors"]
    hot = results["scenarios"]["hot_voices"]
    assert hot["cache_off_encoder_calls_equal_registrations"] is True, hot["runs"]["cache_off"]
    assert hot["runs"]["cache_off"]["encoder_calls"] == hot["runs"]["cache_off"]["registrations"]


def test_livevoice_bench_forwards_to_the_bench(capsys: pytest.CaptureFixture[str]) -> None:
    from live.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    assert "livevoice bench" in capsys.readouterr().out
