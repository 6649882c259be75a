"""The load bench's pure parts (``bench.realtime``, the search and the docs section): the fixed
schedules, the real-time player's underrun accounting, the percentiles. Fed made-up times; no
clock, no server, nothing timed."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from bench.harness import LoadSizes
from bench.load import IDLE_GAP_S, Search, _idle_line, plan_run, ttfa_by_line
from bench.realtime import (
    LINES,
    DueLine,
    Player,
    chat_schedule,
    percentile,
    start_offsets,
    summary_ms,
)
from bench.report import replace_section

# --- the schedule ------------------------------------------------------------------------------


def test_chat_line_is_followed_by_three_times_its_length_of_silence() -> None:
    durations = [1.0, 2.0, 0.5]
    (lines,) = chat_schedule(1, durations, seconds=60.0, spread_s=0.0, duty=0.25, seed=1)
    assert lines[0].due == 0.0
    for before, after in itertools.pairwise(lines):
        assert after.due == pytest.approx(before.due + 4 * durations[before.line])
        assert after.line == (before.line + 1) % len(durations)  # walks the corpus
    assert lines[-1].due < 60.0
    assert lines[-1].due + 4 * durations[lines[-1].line] >= 60.0  # every line due is sent


def test_an_idle_run_says_every_line_in_turn_once_the_last_has_played() -> None:
    durations = [1.0, 2.0, 0.5]
    run = plan_run("idle", 1, LoadSizes(idle_repeats=2), durations)
    (plan,) = run["plans"]
    assert [line for _, line in plan["lines"]] == [0, 1, 2, 0, 1, 2]
    for (due, line), (after, _) in itertools.pairwise(plan["lines"]):
        assert after == pytest.approx(due + durations[line] + IDLE_GAP_S)
    last_due, last = plan["lines"][-1]
    assert run["seconds"] == pytest.approx(last_due + durations[last] + IDLE_GAP_S)


def test_the_idle_run_reports_each_lines_first_audio_from_memory_as_from_json() -> None:
    lines = [
        {"line": 3, "due": 10.0, "frames": [(10.05, 1)]},
        {"line": 3, "due": 20.0, "frames": [(20.07, 1)]},
        {"line": 3, "due": 30.0, "frames": [(30.06, 1)]},
        {"line": 5, "due": 40.0, "frames": []},  # never answered: no figure
    ]
    scored = ttfa_by_line(lines)
    assert scored == pytest.approx({"3": 60.0})
    data = {"runs": [{"server": "livevoice", "mode": "idle", "ttfa_by_line_ms": scored}]}
    for report in (data, json.loads(json.dumps(data))):
        line = _idle_line(report)
        assert line is not None
        assert f'{LINES[3][:37]}..." ({len(LINES[3].split())} words) 60' in line
        assert f'"{LINES[5][:37]}' in line and "n/a" in line


def test_starts_fall_within_the_spread_and_the_schedule_is_fixed_by_its_seed() -> None:
    durations = [1.0, 3.0]
    raid = chat_schedule(64, durations, seconds=30.0, spread_s=2.0, seed=5)
    assert len(raid) == 64
    assert all(0.0 <= lines[0].due < 2.0 for lines in raid)
    assert len({lines[0].due for lines in raid}) > 32  # spread out, not all at one instant
    assert chat_schedule(64, durations, seconds=30.0, spread_s=2.0, seed=5) == raid
    assert chat_schedule(64, durations, seconds=30.0, spread_s=2.0, seed=6) != raid
    steady = chat_schedule(64, durations, seconds=30.0, spread_s=10.0, seed=5)
    assert max(lines[0].due for lines in steady) > 2.0


def test_a_session_starting_after_the_end_sends_nothing() -> None:
    assert chat_schedule(3, [1.0], seconds=0.0, spread_s=0.0) == [[], [], []]
    assert chat_schedule(1, [1.0], seconds=5.0, spread_s=0.0, duty=1.0) == [
        [DueLine(float(t), 0) for t in range(5)]
    ]


@pytest.mark.parametrize(
    ("durations", "duty"), [([1.0], 0.0), ([1.0], 1.5), ([], 0.25), ([1.0, 0.0], 0.25)]
)
def test_a_schedule_refuses_what_it_cannot_keep(durations: list[float], duty: float) -> None:
    with pytest.raises(ValueError):
        chat_schedule(1, durations, seconds=10.0, spread_s=0.0, duty=duty)


def test_continuous_starts_are_seeded_within_the_spread() -> None:
    starts = start_offsets(24, 5.0, seed=3)
    assert len(starts) == 24 and all(0.0 <= s < 5.0 for s in starts)
    assert start_offsets(24, 5.0, seed=3) == starts
    assert start_offsets(4, 0.0) == [0.0] * 4


# --- the player --------------------------------------------------------------------------------


def _frames(player: Player, *frames: tuple[float, float]) -> None:
    player.line()
    for arrival, seconds in frames:
        player.frame(arrival, seconds)


def test_frames_ahead_of_playback_never_underrun() -> None:
    player = Player()
    _frames(player, (10.0, 0.1), (10.0, 0.1), (10.15, 0.1), (10.2, 0.1))  # a burst, then ahead
    assert player.underruns == []
    assert player.drains_at == pytest.approx(10.4)
    assert player.buffered(10.1) == pytest.approx(0.3)
    assert player.buffered(11.0) == 0.0


def test_a_late_frame_is_one_underrun_as_late_as_the_gap_and_playback_resumes_from_it() -> None:
    player = Player()
    # Playback starts at the first frame (no prebuffer): 1 s of audio, needed again at 11.0.
    _frames(player, (10.0, 1.0), (11.25, 0.5), (11.3, 0.5), (12.5, 0.2))
    assert [(u.at, u.late_s) for u in player.underruns] == [
        pytest.approx((11.0, 0.25)),
        pytest.approx((12.25, 0.25)),  # 11.25 + 0.5 + 0.5 = 12.25 needed, came at 12.5
    ]
    assert player.worst_late_s == pytest.approx(0.25)
    assert player.stall_s == pytest.approx(0.5)
    assert player.drains_at == pytest.approx(12.7)


def test_in_chat_waiting_for_a_line_to_begin_is_latency_not_an_underrun() -> None:
    player = Player(gapless=False)
    _frames(player, (0.0, 1.0))
    _frames(player, (5.0, 1.0), (5.5, 1.0))  # starts at its first frame, long after the last
    assert player.underruns == []
    # A line that arrives while the one before still plays waits for it, then plays.
    _frames(player, (6.6, 2.0), (7.0, 1.0))
    assert player.underruns == []
    assert player.drains_at == pytest.approx(10.0)
    _frames(player, (20.0, 1.0), (21.5, 1.0))  # but a gap inside a line still is one
    assert [(u.line, u.late_s) for u in player.underruns] == [(3, pytest.approx(0.5))]


def test_continuous_talk_hears_a_late_next_line_as_an_underrun() -> None:
    player = Player(gapless=True)
    _frames(player, (0.0, 2.0))
    _frames(player, (1.5, 2.0))  # in time: queued behind the first line
    assert player.underruns == []
    _frames(player, (4.75, 1.0))  # the stream ran dry at 4.0
    assert [(u.at, u.late_s, u.line) for u in player.underruns] == [(4.0, pytest.approx(0.75), 2)]
    assert player.lines == 3


def test_the_next_continuous_line_is_due_once_less_than_the_lead_is_buffered() -> None:
    player = Player(gapless=True)
    assert player.due_next(3.0, 1.0) == 3.0  # nothing played yet: at once
    _frames(player, (0.0, 4.0))
    assert player.due_next(2.0, 1.0) == pytest.approx(3.0)  # 2 s buffered at 2.0: wait 1 s
    assert player.due_next(3.5, 1.0) == 3.5  # already under the lead: now


def test_a_player_refuses_frames_it_cannot_place() -> None:
    with pytest.raises(ValueError):
        Player().frame(0.0, 0.1)  # no line begun
    player = Player()
    player.line()
    with pytest.raises(ValueError):
        player.frame(0.0, -0.1)


# --- percentiles -------------------------------------------------------------------------------


def test_percentiles_are_nearest_rank_values_that_were_observed() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile(values, 0) == 1.0
    assert percentile(list(reversed(values)), 90) == 90.0  # order does not matter
    few = [0.1, 0.2, 5.0]
    assert percentile(few, 99) == 5.0  # a p99 of few samples is their worst, not less
    assert percentile(few, 50) == 0.2
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(few, 101)


def test_summary_is_in_milliseconds() -> None:
    assert summary_ms([0.1, 0.2, 0.3, 4.0]) == {
        "n": 4,
        "p50": 200.0,
        "p90": 4000.0,
        "p99": 4000.0,
        "max": 4000.0,
    }
    assert summary_ms([]) == {"n": 0, "p50": None, "p90": None, "p99": None, "max": None}


# --- the continuous-talk search and the docs section -------------------------------------------


def test_the_search_bisects_from_the_target_to_one_session() -> None:
    search = Search(limit=20.0)
    assert search.probe == 18  # 90 % of the limit first
    search.record(18, ok=False)
    assert search.probe == 9
    search.record(9, ok=True)
    assert search.probe == 13
    search.record(13, ok=True)
    search.record(15, ok=False)
    assert search.probe == 14
    search.record(14, ok=True)
    assert search.probe is None  # 14 ok, 15 not: found
    assert (search.largest_ok, search.smallest_bad) == (14, 15)


def test_the_search_goes_past_the_limit_when_the_target_passes() -> None:
    search = Search(limit=20.0)
    search.record(18, ok=True)
    assert search.probe == 22  # between 18 and 125 % of the limit
    search.record(22, ok=True)
    search.record(24, ok=True)
    search.record(25, ok=True)
    assert search.probe is None


def test_a_section_is_replaced_in_place_or_appended() -> None:
    begin, end = "<!-- bench:load -->", "<!-- /bench:load -->"
    new = f"{begin}\n## 7. new\n{end}\n"
    doc = f"# B\n\n## 6. kept\n\n{begin}\n## 7. old\n{end}\n\n## after\n"
    assert replace_section(doc, begin, end, new) == f"# B\n\n## 6. kept\n\n{new}\n## after\n"
    assert replace_section("# B\n\ntext\n", begin, end, new) == f"# B\n\ntext\n\n{new}"


def test_a_full_docs_rewrite_keeps_the_load_section(tmp_path: Path) -> None:
    from bench.report import write_docs

    section = "<!-- bench:load -->\n## 7. Load\nfigures\n<!-- /bench:load -->\n"
    (tmp_path / "benchmarks.md").write_text(f"# Benchmarks\n\nold figures\n\n{section}")
    results = {
        "meta": {"command": "python -m bench", "started": "now", "wall_s": 1.0, "machine": {}},
        "scenarios": {},
    }
    text = write_docs(results, [], tmp_path).read_text()
    assert "old figures" not in text  # the rest is rewritten
    assert text.endswith("\n\n" + section)


def test_the_floor_is_the_wait_that_lets_capacity_keep_up() -> None:
    from bench.floor import feasible, floor_s

    two = [(0.0, 1.0), (0.0, 1.0)]  # two 1 s lines due at once
    # One audio second per second: by D + 1 both lines' 2 s must be made, so D >= 1.
    assert floor_s(two, capacity=1.0) == pytest.approx(1.0, abs=0.06)
    assert not feasible(two, 0.9, capacity=1.0)
    assert floor_s(two, capacity=2.0) == 0.0  # each line made as it plays
    # Work cannot start before a line is due: a later line gains nothing from idle time before.
    assert floor_s([(0.0, 1.0), (5.0, 1.0), (5.0, 1.0)], capacity=1.0) == pytest.approx(
        1.0, abs=0.06
    )
