"""Results out: the table on stdout, ``results.json``, a PNG per scenario, docs/benchmarks.md."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

Results = dict[str, Any]
TIMES = "\u00d7"

SOURCE_COLORS = {"l1": "#2a9d8f", "redis": "#e76f51", "encoder": "#264653"}
TIER_LABELS = {"encoder": "encoder miss", "redis": "Redis hit", "l1": "L1 hit"}


# --- the headline table -----------------------------------------------------------------------
def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        text = f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"
        if abs(value) >= 1000:
            text = f"{value:,.0f}"
    else:
        text = f"{value:,}" if isinstance(value, int) else str(value)
    return f"{text} {unit}".strip()


def _get(results: Results, scenario: str, key: str) -> Any:
    return results.get("scenarios", {}).get(scenario, {}).get("summary", {}).get(key)


def headline_rows(results: Results) -> list[tuple[str, str, str]]:
    """(scenario, what, value) rows: the figures the issue asked for."""
    rows: list[tuple[str, str, str]] = []

    def g(scenario: str, key: str) -> Any:
        return _get(results, scenario, key)

    scenarios = results.get("scenarios", {})
    if "summary" in scenarios.get("lookup", {}):
        for what, label in (("round_trip", "round trip"), ("lookup", "server lookup")):
            for tier in ("encoder", "redis", "l1"):
                rows.append(
                    (
                        "lookup",
                        f"{TIER_LABELS[tier]}, {label} p50 / p99",
                        f"{_fmt(g('lookup', f'{tier}_{what}_p50_ms'))} / "
                        f"{_fmt(g('lookup', f'{tier}_{what}_p99_ms'), 'ms')}",
                    )
                )
            rows.append(
                (
                    "lookup",
                    f"encoder miss ÷ Redis hit, {label} p50 / p99",
                    f"{_fmt(g('lookup', f'encoder_over_redis_{what}_p50'))}{TIMES} / "
                    f"{_fmt(g('lookup', f'encoder_over_redis_{what}_p99'))}{TIMES}",
                )
            )
    if "summary" in scenarios.get("hot_voices", {}):
        s = "hot_voices"
        rows += [
            (
                s,
                "registrations / distinct voices / clients",
                f"{_fmt(g(s, 'registrations'))} / {_fmt(g(s, 'distinct_voices'))} / "
                f"{_fmt(g(s, 'clients'))}",
            ),
            (s, "hit ratio (cache on)", _fmt(g(s, "hit_ratio"))),
            (s, "encoder calls per distinct voice", _fmt(g(s, "encoder_calls_per_distinct_voice"))),
            (
                s,
                "encoder calls, cache on / off",
                f"{_fmt(g(s, 'cache_on_encoder_calls'))} / {_fmt(g(s, 'cache_off_encoder_calls'))}"
                f" (of {_fmt(g(s, 'cache_off_registrations'))})",
            ),
            (
                s,
                "encoder calls per registration, off ÷ on",
                f"{_fmt(g(s, 'encoder_call_reduction'))}{TIMES}",
            ),
            (
                s,
                "p50 / p99, cache on (p99 of hits alone)",
                f"{_fmt(g(s, 'cache_on_p50_ms'))} / {_fmt(g(s, 'cache_on_p99_ms'), 'ms')} "
                f"({_fmt(g(s, 'cache_on_hits_p99_ms'), 'ms')})",
            ),
            (
                s,
                "p50 / p99, cache off",
                f"{_fmt(g(s, 'cache_off_p50_ms'))} / {_fmt(g(s, 'cache_off_p99_ms'), 'ms')}",
            ),
            (
                s,
                "p50 / p99 ratio, off ÷ on",
                f"{_fmt(g(s, 'p50_ratio'))}{TIMES} / {_fmt(g(s, 'p99_ratio'))}{TIMES}",
            ),
            (
                s,
                "registrations per second, on / off",
                f"{_fmt(g(s, 'cache_on_per_s'))} / {_fmt(g(s, 'cache_off_per_s'))}",
            ),
        ]
    live = scenarios.get("live_sessions", {})
    if "summary" in live:
        rows.append(
            (
                "live_sessions",
                "max sessions without underrun (largest tried; first not ok)",
                f"{_fmt(g('live_sessions', 'max_sessions_without_underrun'))} "
                f"({_fmt(g('live_sessions', 'largest_level_tried'))}; "
                f"{_fmt(g('live_sessions', 'first_level_not_ok') or None)})",
            )
        )
        for lv in live.get("levels", []):
            rows.append(
                (
                    "live_sessions",
                    f"{lv['sessions']} sessions: TTFA p50 / p99, RTF p50, underruns",
                    f"{_fmt(lv['ttfa_ms']['p50'])} / {_fmt(lv['ttfa_ms']['p99'], 'ms')}, "
                    f"{_fmt(lv['rtf']['p50'])}, {lv['underruns']}",
                )
            )
    if "summary" in scenarios.get("outage", {}):
        s = "outage"
        rows += [
            (s, "client-visible errors", _fmt(g(s, "client_errors"))),
            (s, "Redis down for", _fmt(g(s, "outage_s"), "s")),
            (s, "fallback encoder calls (while down)", _fmt(g(s, "fallback_encoder_calls"))),
            (
                s,
                "breaker closed after Redis returned (re-opened n times, closed for good after)",
                f"{_fmt(g(s, 'breaker_closed_after_s'), 's')} "
                f"({_fmt(g(s, 'breaker_reopened_after_restart'))}, "
                f"{_fmt(g(s, 'breaker_closed_for_good_after_s'), 's')})",
            ),
            (s, "first Redis hit after Redis returned", _fmt(g(s, "first_redis_hit_after_s"), "s")),
            (
                s,
                "p50 before / during outage",
                f"{_fmt(g(s, 'before_p50_ms'))} / {_fmt(g(s, 'outage_p50_ms'), 'ms')}",
            ),
            (
                s,
                "after return: p99, slowest, registrations over 1 s",
                f"{_fmt(g(s, 'after_p99_ms'), 'ms')}, {_fmt(g(s, 'max_latency_ms'), 'ms')}, "
                f"{_fmt(g(s, 'registrations_over_1s'))}",
            ),
        ]
    if "summary" in scenarios.get("memory", {}):
        s = "memory"
        rows += [
            (s, "Redis MEMORY USAGE per voice", _fmt(g(s, "redis_memory_usage_bytes"), "B")),
            (
                s,
                "Redis used_memory per voice",
                _fmt(g(s, "redis_used_memory_per_voice_bytes"), "B"),
            ),
            (
                s,
                f"RSS for {_fmt(g(s, 'l1_voices'))} voices in L1 (per voice)",
                f"{_fmt(g(s, 'l1_rss_delta_mb'), 'MB')} "
                f"({_fmt(g(s, 'l1_rss_per_voice_bytes'), 'B')})",
            ),
            (s, "process RSS with them", _fmt(g(s, "process_rss_mb_with_l1"), "MB")),
        ]
    fanout = scenarios.get("fanout", {})
    if "summary" in fanout:
        s = "fanout"
        for lv in fanout.get("levels", []):
            rows.append(
                (
                    s,
                    f"{lv['listeners']} listeners: CPU s per audio s, TTFA from due p50 / p99",
                    f"{_fmt(lv['cpu_per_audio_s'])}, {_fmt(lv['ttfa_ms']['p50'])} / "
                    f"{_fmt(lv['ttfa_ms']['p99'], 'ms')}",
                )
            )
        rows += [
            (
                s,
                "per extra listener: CPU s per audio s, TTFA p50 / p99",
                f"{_fmt(g(s, 'cpu_per_audio_s_per_extra_listener'))}, "
                f"{_fmt(g(s, 'ttfa_p50_ms_per_extra_listener'))} / "
                f"{_fmt(g(s, 'ttfa_p99_ms_per_extra_listener'), 'ms')}",
            ),
            (
                s,
                "engine calls minus messages, frames lost, cut loose",
                f"{_fmt(g(s, 'engine_calls_minus_messages'))}, {_fmt(g(s, 'frames_lost'))}, "
                f"{_fmt(g(s, 'cut_loose'))}",
            ),
        ]
    for ref, r in scenarios.get("matching", {}).get("references", {}).items():
        if "plain_cosine" not in r:
            continue
        rows.append(
            (
                "matching",
                f"{ref}: cosine, recall plain → matched; PSOLA CPU per audio s",
                f"{_fmt(r['plain_cosine'])} → {_fmt(r['matched_cosine'])}, "
                f"{_fmt(r['plain_recall'])} → {_fmt(r['matched_recall'])}; "
                f"{_fmt(r.get('plain_psola_cpu_per_audio_s'))}",
            )
        )
    for name, scenario in scenarios.items():
        if "error" in scenario:
            rows.append((name, "FAILED", str(scenario["error"])[:80]))
    return rows


def table(results: Results) -> str:
    rows = headline_rows(results)
    if not rows:
        return "(no results)"
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{'scenario':<{w0}}  {'figure':<{w1}}  value", "-" * (w0 + w1 + 30)]
    last = None
    for scenario, what, value in rows:
        lines.append(f"{scenario if scenario != last else '':<{w0}}  {what:<{w1}}  {value}")
        last = scenario
    return "\n".join(lines)


def write_json(results: Results, path: Path) -> None:
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))


# --- plots ------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax: Any, values: list[float], **kwargs: Any) -> None:
    if not values:
        return
    xs = np.sort(np.asarray(values, dtype=np.float64))
    ys = np.arange(1, len(xs) + 1) / len(xs)
    ax.step(xs, ys, where="post", **kwargs)


def _log(ax: Any, axis: str = "x") -> None:
    """A log axis labelled in plain numbers (0.01, 1, 100) rather than powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    getattr(ax, f"set_{axis}scale")("log")
    target = ax.xaxis if axis == "x" else ax.yaxis
    lo, hi = getattr(ax, f"get_{axis}lim")()
    wide = lo > 0 and hi / lo > 10**2.5  # 1-2-5 ticks only where they do not collide
    target.set_major_locator(LogLocator(base=10, subs=(1.0,) if wide else (1.0, 2.0, 5.0)))
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_formatter(NullFormatter())


def _subtitle(results: Results) -> str:
    m = results.get("meta", {}).get("machine", {})
    return f"{m.get('cores', '?')} cores, {m.get('cpu', '?')}"


def plot_lookup(data: Results, results: Results, path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for tier in ("encoder", "redis", "l1"):
        series = data["series"][tier]
        color = SOURCE_COLORS[tier]
        _cdf(axes[0], series["round_trip_ms"], color=color, label=TIER_LABELS[tier])
        _cdf(axes[1], series["lookup_ms"], color=color, label=TIER_LABELS[tier])
    axes[0].set_title("Client round trip (upload + decode + lookup)")
    axes[1].set_title("Server-side lookup alone")
    for ax in axes:
        _log(ax)
        ax.set_xlabel("milliseconds (log)")
        ax.set_ylabel("fraction of registrations")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(f"Voice registration latency by cache tier — {_subtitle(results)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_hot_voices(data: Results, results: Results, path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    runs = data["runs"]
    colors = {"cache_on": "#2a9d8f", "cache_off": "#264653"}
    for mode in ("cache_on", "cache_off"):
        _cdf(
            axes[0],
            data["series"][mode]["latency_ms"],
            color=colors[mode],
            label=f"{mode.replace('_', ' ')} (p99 {_fmt(runs[mode]['latency_ms']['p99'], 'ms')})",
        )
    _log(axes[0])
    axes[0].set_xlabel("registration round trip, ms (log)")
    axes[0].set_ylabel("fraction of registrations")
    axes[0].grid(True, which="both", alpha=0.3)
    axes[0].legend(loc="lower right")
    axes[0].set_title("Registration latency, Zipf workload")
    labels = ["cache on", "cache off"]
    calls = [runs["cache_on"]["encoder_calls"], runs["cache_off"]["encoder_calls"]]
    regs = [runs["cache_on"]["registrations"], runs["cache_off"]["registrations"]]
    x = np.arange(2)
    axes[1].bar(x - 0.2, regs, 0.4, color="#bbbbbb", label="registrations")
    axes[1].bar(
        x + 0.2, calls, 0.4, color=[colors["cache_on"], colors["cache_off"]], label="encoder calls"
    )
    for xi, c in zip(x, calls, strict=True):
        axes[1].annotate(f"{c:,}", (xi + 0.2, c), ha="center", va="bottom", fontsize=9)
    axes[1].set_xticks(x, labels)
    axes[1].set_title(f"Encoder calls (hit ratio {_fmt(runs['cache_on']['hit_ratio'])})")
    axes[1].legend(loc="upper left")
    fig.suptitle(f"Hot voices: cache on vs off — {_subtitle(results)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_live_sessions(data: Results, results: Results, path: Path) -> None:
    plt = _pyplot()
    levels = data["levels"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    if levels:
        n = [lv["sessions"] for lv in levels]

        def pick(key: str, q: str) -> list[float]:
            return [np.nan if lv[key][q] is None else lv[key][q] for lv in levels]

        axes[0].plot(n, pick("ttfa_ms", "p50"), "o-", color="#264653", label="TTFA p50 (client)")
        axes[0].plot(n, pick("ttfa_ms", "p99"), "o--", color="#264653", label="TTFA p99 (client)")
        axes[0].plot(
            n,
            pick("server_ttfa_ms", "p50"),
            "s-",
            color="#e9c46a",
            label="TTFA p50 (server, from dequeue)",
        )
        axes[0].set_ylim(bottom=0)
        axes[0].set_xlabel("concurrent sessions")
        axes[0].set_ylabel("ms")
        axes[0].set_xticks(n)
        axes[0].grid(True, which="both", alpha=0.3)
        axes[0].legend()
        axes[0].set_title("Time to first audio")
        axes[1].plot(n, pick("rtf", "p50"), "o-", color="#2a9d8f", label="RTF p50")
        axes[1].plot(n, pick("rtf", "p99"), "o--", color="#2a9d8f", label="RTF p99")
        axes[1].axhline(1.0, color="#999999", lw=0.8)
        axes[1].set_xlabel("concurrent sessions")
        axes[1].set_ylabel("synthesis time ÷ audio time")
        axes[1].set_xticks(n)
        twin = axes[1].twinx()
        twin.bar(
            n,
            [lv["underruns"] for lv in levels],
            width=[max(0.6, v * 0.15) for v in n],
            alpha=0.35,
            color="#e76f51",
            label="underruns",
        )
        twin.set_ylabel("player underruns", color="#e76f51")
        twin.set_ylim(0, max([1] + [lv["underruns"] for lv in levels]) * 1.3)
        lines, labels = axes[1].get_legend_handles_labels()
        l2, lab2 = twin.get_legend_handles_labels()
        axes[1].legend(lines + l2, labels + lab2, loc="upper left")
        axes[1].set_title(
            f"Real-time factor and underruns (max ok: "
            f"{data['summary']['max_sessions_without_underrun']})"
        )
    fig.suptitle(f"Live sessions speaking chat messages (Piper) — {_subtitle(results)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_outage(data: Results, results: Results, path: Path) -> None:
    plt = _pyplot()
    s = data["summary"]
    series = data["series"]
    fig, (ax, bx) = plt.subplots(
        2, 1, figsize=(11, 5.2), sharex=True, gridspec_kw={"height_ratios": [4, 1]}
    )
    t = np.asarray(series["t_done"])
    lat = np.asarray(series["latency_ms"])
    src = np.asarray(series["source"])
    for source, color in SOURCE_COLORS.items():
        mask = src == source
        ax.scatter(
            t[mask], lat[mask], s=4, color=color, alpha=0.6, label=f"{source} ({int(mask.sum()):,})"
        )
    for a in (ax, bx):
        a.axvspan(s["killed_at_s"], s["restarted_at_s"], color="#e76f51", alpha=0.12)
    if s.get("first_redis_hit_after_s") is not None:
        ax.axvline(
            s["restarted_at_s"] + s["first_redis_hit_after_s"],
            color="#e76f51",
            lw=1,
            ls="--",
            label="first Redis hit after restart",
        )
    _log(ax, "y")
    ax.set_ylabel("registration ms (log)")
    ax.legend(loc="upper left", markerscale=3, fontsize=8)
    ax.set_title(
        f"Redis killed at {s['killed_at_s']:.0f} s, back at {s['restarted_at_s']:.0f} s: "
        f"{s['client_errors']} client errors, {s['fallback_encoder_calls']} fallback encoder calls"
    )
    states = {"closed": 0, "half_open": 1, "open": 2}
    steps = list(data["breaker_transitions"])
    end = max([p["t"] for p in series["samples"]] + [s["restarted_at_s"]])
    steps.append({"t": end, "state": steps[-1]["state"]})
    bx.step(
        [p["t"] for p in steps],
        [states.get(p["state"], 0) for p in steps],
        where="post",
        color="#264653",
    )
    bx.set_yticks([0, 1, 2], ["closed", "half-open", "open"])
    bx.set_xlabel("seconds since start")
    bx.set_ylabel("breaker")
    fig.suptitle(f"Redis outage under the hot-voice workload — {_subtitle(results)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(data: Results, results: Results, path: Path) -> None:
    plt = _pyplot()
    s = data["summary"]
    bars = [
        ("float32 vector (256-dim)", 1024),
        ("msgpack value", s["value_bytes"]),
        ("Redis MEMORY USAGE (key + value)", s["redis_memory_usage_bytes"]),
        ("Redis used_memory ÷ voices", s["redis_used_memory_per_voice_bytes"]),
        ("L1 Python objects (getsizeof)", s["l1_object_bytes_per_voice"]),
        ("L1 process RSS ÷ voices", s["l1_rss_per_voice_bytes"]),
    ]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    labels = [b[0] for b in bars]
    values = [0 if b[1] is None else b[1] for b in bars]
    colors = ["#bbbbbb", "#bbbbbb", "#e76f51", "#e76f51", "#2a9d8f", "#2a9d8f"]
    ax.barh(labels, values, color=colors)
    for i, v in enumerate(values):
        ax.annotate(
            f"{v:,.0f} B",
            (v, i),
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize=9,
        )
    ax.invert_yaxis()
    ax.set_xlabel("bytes per cached voice")
    ax.set_xlim(0, max(values) * 1.2 if values else 1)
    ax.set_title(
        f"Memory per voice — {s['redis_keys']:,} Redis keys, {s['l1_voices']:,} L1 entries"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fanout(data: Results, results: Results, path: Path) -> None:
    plt = _pyplot()
    levels = data["levels"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    if levels:
        n = [lv["listeners"] for lv in levels]
        axes[0].plot(n, [lv["cpu_per_audio_s"] for lv in levels], "o-", color="#264653")
        axes[0].set_ylim(bottom=0)
        axes[0].set_xlabel("listeners on the channel")
        axes[0].set_ylabel("server CPU s per audio s")
        axes[0].set_xticks(n)
        axes[0].grid(True, alpha=0.3)
        axes[0].set_title("Server CPU (one synthesis per message)")
        for key, style, label in (
            ("ttfa_ms", "o-", "TTFA p50 (listener, from due)"),
            ("server_ttfa_ms", "s-", "TTFA p50 (server, synthesis)"),
        ):
            axes[1].plot(
                n,
                [np.nan if lv[key]["p50"] is None else lv[key]["p50"] for lv in levels],
                style,
                label=label,
            )
        axes[1].plot(
            n,
            [np.nan if lv["ttfa_ms"]["p99"] is None else lv["ttfa_ms"]["p99"] for lv in levels],
            "o--",
            label="TTFA p99 (listener, from due)",
        )
        axes[1].set_ylim(bottom=0)
        axes[1].set_xlabel("listeners on the channel")
        axes[1].set_ylabel("ms")
        axes[1].set_xticks(n)
        axes[1].grid(True, alpha=0.3)
        axes[1].legend()
        axes[1].set_title("Time to first audio per listener")
    fig.suptitle(f"Channel fan-out (Piper) — {_subtitle(results)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_matching(data: Results, results: Results, path: Path) -> None:
    plt = _pyplot()
    refs = [(k, r) for k, r in data["references"].items() if "plain_cosine" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = np.arange(len(refs))
    for ax, what, title in (
        (axes[0], "cosine", "GE2E cosine to the reference"),
        (axes[1], "recall", "PocketSphinx word recall"),
    ):
        ax.bar(xs - 0.2, [r[f"plain_{what}"] for _, r in refs], 0.4, label="Piper as is")
        ax.bar(xs + 0.2, [r[f"matched_{what}"] for _, r in refs], 0.4, label="matched")
        ax.set_xticks(xs, [k.replace(" ", "\n", 1) for k, _ in refs], fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTS: dict[str, Callable[[Results, Results, Path], None]] = {
    "lookup": plot_lookup,
    "hot_voices": plot_hot_voices,
    "live_sessions": plot_live_sessions,
    "outage": plot_outage,
    "memory": plot_memory,
    "fanout": plot_fanout,
    "matching": plot_matching,
}


def write_plots(results: Results, out: Path) -> list[Path]:
    written: list[Path] = []
    for name, data in results.get("scenarios", {}).items():
        if "summary" not in data or name not in PLOTS:
            continue
        path = out / f"{name}.png"
        PLOTS[name](data, results, path)
        written.append(path)
    return written


# --- docs/benchmarks.md ------------------------------------------------------------------------
def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(results: Results, images: dict[str, str]) -> str:
    meta = results["meta"]
    m = meta["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())
    ram = m.get("ram_bytes")
    out = [
        "# Benchmarks",
        "",
        "Generated by the bench (`bench/`), which starts the real server in process on a free "
        "loopback port, a real `redis-server`, and drives them with real WebSocket clients. "
        "Do not edit by hand: re-run the command below with `--docs`. Results of every run also "
        "land in `bench-results/<timestamp>/` (JSON with the raw series, and the plots).",
        "",
        "The clients share the server's process and event loop (so that server-side counters "
        "are read directly): their own share of the CPU is inside every client-side figure. "
        "They all arrive as one tenant, so the per-tenant throttles (sessions, registrations "
        "and speaks per minute, concurrent encoder jobs) are lifted for the bench; everything "
        "else runs at its defaults. Other work on the machine shows in the load averages below.",
        "",
        f"- **Command**: `{meta['command']}`",
        f"- **Date**: {meta['started']} (took {meta['wall_s']:.0f} s)",
        f"- **Machine**: {m.get('cores')} cores, {m.get('cpu')}, "
        f"{'?' if ram is None else f'{ram / 2**30:.1f} GiB'} RAM, {m.get('gpu')}; "
        f"load average at start {m.get('loadavg_at_start')}, at end {meta.get('loadavg_at_end')}",
        f"- **Software**: {versions}",
        "",
        "## Headline",
        "",
        _md_table(["scenario", "figure", "value"], [list(r) for r in headline_rows(results)]),
        "",
    ]
    sc = results["scenarios"]
    sections = [
        ("lookup", "1. Voice lookup by tier"),
        ("hot_voices", "2. Hot voices: cache on vs off"),
        ("live_sessions", "3. Live sessions"),
        ("outage", "4. Redis outage"),
        ("memory", "5. Memory"),
        ("fanout", "6. Fan-out"),
        ("matching", "8. Voice matching"),
    ]
    for name, title in sections:
        data = sc.get(name)
        if data is None:
            continue
        out += [f"## {title}", ""]
        if "error" in data:
            out += [f"Failed: `{data['error']}`", ""]
            continue
        out += [data.get("method", ""), ""]
        if name == "lookup":
            rows = []
            for tier in ("encoder", "redis", "l1"):
                d = data["tiers"][tier]
                for what, label in (
                    ("round_trip_ms", "round trip"),
                    ("server_ms", "voice.ready ms"),
                    ("lookup_ms", "lookup alone"),
                ):
                    st = d[what]
                    rows.append(
                        [TIER_LABELS[tier], label, str(st["n"])]
                        + [_fmt(st[q]) for q in ("p50", "p95", "p99", "max")]
                    )
            out += [
                _md_table(["tier", "measured", "n", "p50 ms", "p95 ms", "p99 ms", "max ms"], rows),
                "",
            ]
        elif name == "hot_voices":
            rows = []
            for mode, run in data["runs"].items():
                rows.append(
                    [
                        mode.replace("_", " "),
                        _fmt(run["registrations"]) + (" (time cap)" if run["truncated"] else ""),
                        _fmt(run["distinct_voices"]),
                        _fmt(run["encoder_calls"]),
                        _fmt(run["hit_ratio"]),
                        _fmt(run["latency_ms"]["p50"]),
                        _fmt(run["latency_ms"]["p99"]),
                        _fmt(run["registrations_per_s"]),
                        ", ".join(f"{k} {v:,}" for k, v in sorted(run["by_source"].items())),
                    ]
                )
            out += [
                _md_table(
                    [
                        "run",
                        "registrations",
                        "distinct",
                        "encoder calls",
                        "hit ratio",
                        "p50 ms",
                        "p99 ms",
                        "per s",
                        "answered from",
                    ],
                    rows,
                ),
                "",
                "Cache off: encoder calls == registrations: "
                f"**{_fmt(data['cache_off_encoder_calls_equal_registrations'])}**.",
                "",
            ]
        elif name == "live_sessions":
            rows = []
            for lv in data["levels"]:
                rows.append(
                    [
                        str(lv["sessions"]),
                        f"{lv['messages_finished']}/{lv['messages_sent']}",
                        _fmt(lv["audio_s"]),
                        f"{_fmt(lv['ttfa_ms']['p50'])} / {_fmt(lv['ttfa_ms']['p99'])}",
                        f"{_fmt(lv['server_ttfa_ms']['p50'])} / "
                        f"{_fmt(lv['server_ttfa_ms']['p99'])}",
                        f"{_fmt(lv['rtf']['p50'])} / {_fmt(lv['rtf']['p99'])}",
                        f"{lv['underruns']} ({lv['sessions_with_underrun']} sessions)",
                        _fmt(lv["worst_late_ms"]),
                        str(lv["underruns_with_200ms_prebuffer"]),
                        "yes" if lv["ok"] else "no",
                    ]
                )
            out += [
                _md_table(
                    [
                        "sessions",
                        "spoken",
                        "audio s",
                        "TTFA p50 / p99 ms",
                        "server TTFA p50 / p99 ms",
                        "RTF p50 / p99",
                        "underruns",
                        "worst late ms",
                        "underruns, 200 ms prebuffer",
                        "ok",
                    ],
                    rows,
                ),
                "",
                "Largest session count with no underrun: "
                f"**{data['summary']['max_sessions_without_underrun']}**"
                + (
                    " — the largest level tried within the time cap, so the limit is at least that"
                    if not data["summary"].get("first_level_not_ok")
                    else f"; the first level not ok: {data['summary']['first_level_not_ok']}"
                )
                + (
                    f" (levels skipped for time: {data['skipped_levels']})"
                    if data.get("skipped_levels")
                    else ""
                )
                + ".",
                "",
            ]
        elif name == "outage":
            rows = []
            for phase, d in data["phases"].items():
                rows.append(
                    [
                        phase,
                        _fmt(d["registrations"]),
                        ", ".join(f"{k} {v:,}" for k, v in sorted(d["by_source"].items())),
                        _fmt(d["latency_ms"]["p50"]),
                        _fmt(d["latency_ms"]["p99"]),
                    ]
                )
            s = data["summary"]
            out += [
                _md_table(["phase", "registrations", "answered from", "p50 ms", "p99 ms"], rows),
                "",
                f"Client-visible errors: **{s['client_errors']}**. Fallback encoder calls while "
                f"Redis was down: {s['fallback_encoder_calls']}; from its return to the first "
                f"hit: {s['recovery_encoder_calls']}. Breaker closed "
                f"{_fmt(s['breaker_closed_after_s'], 's')} and the first Redis hit came "
                f"{_fmt(s['first_redis_hit_after_s'], 's')} after Redis answered again; the "
                f"breaker re-opened {s['breaker_reopened_after_restart']} times after that first "
                f"close and stayed closed from {_fmt(s['breaker_closed_for_good_after_s'], 's')}. "
                f"Slowest registration: {_fmt(s['max_latency_ms'], 'ms')}; "
                f"{s['registrations_over_1s']} took over 1 s.",
                "",
            ]
        elif name == "fanout":
            out += fanout_markdown(data)
        elif name == "matching":
            out += matching_markdown(data)
        elif name == "memory":
            s = data["summary"]
            rows = [[k, _fmt(v)] for k, v in s.items()]
            out += [_md_table(["figure", "value"], rows), ""]
        if name in images:
            out += [f"![{title}]({images[name]})", ""]
    return "\n".join(out).rstrip() + "\n"


def matching_markdown(data: Results) -> list[str]:
    """The matching section: one row per reference, plain and matched side by side."""
    rows = []
    for ref, r in data["references"].items():
        if "plain_cosine" not in r:
            rows.append([ref] + ["skipped"] * 8)
            continue
        matched = r.get("matched") or {}
        rows.append(
            [
                ref,
                f"{_fmt(r['plain_cosine'])} / {_fmt(r['matched_cosine'])}",
                f"{_fmt(r['plain_recall'])} / {_fmt(r['matched_recall'])}",
                f"{_fmt(r['plain_ttfa_ms'])} / {_fmt(r['matched_ttfa_ms'])}",
                f"{_fmt(r['plain_cpu_per_audio_s'])} / {_fmt(r['matched_cpu_per_audio_s'])}",
                _fmt(r.get("plain_psola_cpu_per_audio_s")),
                ", ".join(f"{k} {v}" for k, v in matched.items() if k != "clamped") or "-",
                ", ".join(matched.get("clamped", [])) or "-",
            ]
        )
    return [
        _md_table(
            [
                "reference",
                "GE2E cosine plain / matched",
                "word recall plain / matched",
                "engine TTFA ms plain / matched",
                "CPU s per audio s plain / matched",
                "PSOLA CPU s per audio s",
                "matched",
                "clamped",
            ],
            rows,
        ),
        "",
    ]


def fanout_markdown(data: Results) -> list[str]:
    """The fan-out section's table and its invariants (lines of markdown)."""
    rows = []
    for lv in data["levels"]:
        rows.append(
            [
                str(lv["listeners"]),
                f"{lv['spoken']}/{lv['messages']}",
                str(lv["engine_calls"]),
                _fmt(lv["audio_s"]),
                _fmt(lv["server_cpu_s"]),
                _fmt(lv["cpu_per_audio_s"]),
                f"{_fmt(lv['ttfa_ms']['p50'])} / {_fmt(lv['ttfa_ms']['p99'])}",
                f"{_fmt(lv['server_ttfa_ms']['p50'])} / {_fmt(lv['server_ttfa_ms']['p99'])}",
                str(lv["frames_lost"]),
                str(lv["cut_loose"]),
                str(lv["messages_missing"]),
            ]
        )
    s = data["summary"]
    return [
        _md_table(
            [
                "listeners",
                "spoken",
                "engine calls",
                "audio s",
                "server CPU s",
                "CPU s per audio s",
                "TTFA from due p50 / p99 ms",
                "server TTFA p50 / p99 ms",
                "frames lost",
                "cut loose",
                "messages missing",
            ],
            rows,
        ),
        "",
        "Per extra listener (least-squares slope over the levels): "
        f"**{_fmt(s.get('cpu_per_audio_s_per_extra_listener'))} CPU s per audio s**, "
        f"TTFA p50 {_fmt(s.get('ttfa_p50_ms_per_extra_listener'), 'ms')}, "
        f"p99 {_fmt(s.get('ttfa_p99_ms_per_extra_listener'), 'ms')}."
        + (
            f" Levels skipped for time: {data['skipped_levels']}."
            if data.get("skipped_levels")
            else ""
        ),
        "",
    ]


SECTION = re.compile(r"<!-- bench:(\w+) -->.*?<!-- /bench:\1 -->\n?", re.S)
"""A section a separately run scenario (``load``) keeps up to date on its own."""


def replace_section(text: str, begin: str, end: str, section: str) -> str:
    """``text`` with the part from ``begin`` to ``end`` replaced by ``section`` (which carries
    both markers), or ``section`` appended after a blank line when there is none."""
    start = text.find(begin)
    stop = text.find(end, start)
    if start < 0 or stop < 0:
        return text.rstrip("\n") + "\n\n" + section
    after = stop + len(end)
    if text.startswith("\n", after):
        after += 1
    return text[:start] + section + text[after:]


def write_docs(results: Results, plots: list[Path], docs_dir: Path) -> Path:
    """Rewrite docs/benchmarks.md from ``results``, keeping the sections that separately run
    scenarios wrote (they are not in ``results``)."""
    img = docs_dir / "img"
    img.mkdir(parents=True, exist_ok=True)
    images: dict[str, str] = {}
    for path in plots:
        target = img / f"bench-{path.name}"
        shutil.copyfile(path, target)
        images[path.stem] = f"img/{target.name}"
    doc = docs_dir / "benchmarks.md"
    kept = [m.group(0) for m in SECTION.finditer(doc.read_text())] if doc.exists() else []
    text = markdown(results, images)
    for section in kept:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    doc.write_text(text)
    return doc
