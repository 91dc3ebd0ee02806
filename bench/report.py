"""The run's markdown report (and the profile's)."""

from __future__ import annotations

import io
import pstats
from pathlib import Path
from typing import Any

from .common import (
    PROFILE_TOP,
    TARGET_E2E_PER_S,
    TARGET_HELD,
    TARGET_LATENESS_MAX_MS,
    TARGET_LATENESS_P99_MS,
    TARGET_LOAD_PER_S,
    TARGET_RSS_MB,
    THROUGHPUT_CATCHUP_RATE,
    THROUGHPUT_DELAY_S,
)

# -- profile ----------------------------------------------------------------------------------


def profile_report(prof_paths: list[Path], section: str, clock: str, top: int = PROFILE_TOP) -> str:
    out = io.StringIO()
    stats = pstats.Stats(*(str(p) for p in prof_paths), stream=out)
    stats.strip_dirs()
    what = "CPU time per thread (time.thread_time)" if clock == "cpu" else "elapsed time"
    out.write(
        f"# worker profile, section ({section}), tier threads merged, {what}: "
        f"top {top} cumulative\n"
    )
    stats.sort_stats("cumulative").print_stats(top)
    out.write(f"\n# same profile: top {top} by own time (tottime)\n")
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


# -- report -----------------------------------------------------------------------------------


def _fmt(value: Any, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "n/a"
    text = f"{value:,.{digits}f}" if isinstance(value, float | int) else str(value)
    return f"{text}{unit}"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def _once_row(section: str, d: dict[str, Any], n: int) -> tuple[str, str, str, str]:
    """The row that says whether a section delivered each of its ``n`` deferrals exactly once."""
    return (
        f"({section}) delivered once: unique / duplicates / missing",
        f"{d['unique']:,} / {d['duplicates']} / {d['missing']}",
        f"{n:,} / 0 / 0",
        _verdict(d["unique"] == n and not d["duplicates"] and not d["missing"]),
    )


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    mode = results["mode"]
    lines = [
        f"# ensync-kafka benchmark — {env['date']} — {env['git_sha']}"
        f"{' (uncommitted changes)' if env['git_dirty'] else ''} — {mode['name']} mode",
        "",
        f"- Machine: {env['cpu_count']} cores (os.cpu_count()), {env['memory_gb']} GB RAM, "
        f"load average at start {env['load_average_at_start'][0]} / "
        f"{env['load_average_at_start'][1]} (1 / 5 min); broker on this machine: "
        f"{'yes' if env['broker_on_this_machine'] else 'no'}",
        f"- CPU: {env.get('cpu_model', 'not recorded')}; speed probe (a fastavro decode of a "
        f"Deferral, no code of ours; lower is faster): {env.get('speed_probe_us', '—')} µs",
        f"- Python {env['python']}, confluent-kafka {env['confluent_kafka']}, "
        f"librdkafka {env['librdkafka']}, Kafka {env['kafka']}, fastavro {env['fastavro']}, "
        f"rocksdict {env['rocksdict']}",
        f"- N: (a)/(b) {mode['n']:,}; (c) {mode['load_rate']:,}/s for {mode['load_seconds']:.0f} s;"
        f" (d) {mode['held']:,} held; defer_many batch {mode['batch']:,}; "
        f"{results['partitions']} partitions per defer/priority topic; (b)/(c) worker: "
        f"{_layout(results)}",
        f"- Wall time of the run: {results.get('wall_s', 0):.0f} s",
        "",
        "| figure | measured | target | result |",
        "|---|---|---|---|",
    ]
    rows: list[tuple[str, str, str, str]] = []
    s = results["sections"]
    a = s.get("a")
    if a:
        rows += [
            ("(a) raw Kafka produce, records/s", _fmt(a["produce_per_s"]), "—", ""),
            ("(a) raw Kafka consume, records/s", _fmt(a["consume_per_s"]), "—", ""),
            ("(a) raw Kafka end to end, records/s", _fmt(a["e2e_per_s"]), "—", ""),
            ("(a) record value size, bytes", _fmt(a["value_bytes_mean"]), "—", ""),
        ]
    b = s.get("b")
    if b:
        full_n = mode["name"] == "full"
        ok = b["e2e_per_s"] is not None and b["e2e_per_s"] >= TARGET_E2E_PER_S
        d = b["delivery"]
        rows += [
            (
                "(b) deferrals/s end to end (first send → last receipt)",
                _fmt(b["e2e_per_s"]),
                f"≥ {TARGET_E2E_PER_S:,}",
                _verdict(ok if full_n else None),
            ),
            (
                "(b) ratio to raw Kafka end to end",
                _fmt(100 * b["e2e_per_s"] / a["e2e_per_s"], " %", 1)
                if a and a["e2e_per_s"] and b["e2e_per_s"]
                else "n/a",
                "—",
                "",
            ),
            ("(b) client send rate (defer_many), deferrals/s", _fmt(b["send_per_s"]), "—", ""),
            (
                "(b) delivery rate, first → last receipt, deferrals/s",
                _fmt(b["delivery_window_per_s"]),
                "—",
                "",
            ),
            (
                "(b) CPU µs per deferral: client / worker / broker",
                f"{_fmt(b['cpu_s']['client_us_per_deferral'])} / "
                f"{_fmt(b['cpu_s']['worker_us_per_deferral'])} / "
                f"{_fmt(b['cpu_s']['broker_us_per_deferral'])}",
                "—",
                "",
            ),
            _once_row("b", d, b["n"]),
        ]
    c = s.get("c")
    if c:
        d = c["delivery"]
        rel, rec = d["release_lateness_ms"], d["receive_lateness_ms"]
        p99_ok = rel["p99"] is not None and rel["p99"] <= TARGET_LATENESS_P99_MS
        max_ok = rel["max"] is not None and rel["max"] <= TARGET_LATENESS_MAX_MS
        rows += [
            (
                "(c) offered load achieved, deferrals/s",
                _fmt(c["achieved_rate_per_s"]),
                f"{TARGET_LOAD_PER_S:,}",
                "",
            ),
            ("(c) release lateness p50 (delivered_at - due_at)", _fmt(rel["p50"], " ms"), "—", ""),
            (
                "(c) release lateness p99",
                _fmt(rel["p99"], " ms"),
                f"≤ {TARGET_LATENESS_P99_MS:.0f} ms",
                _verdict(p99_ok),
            ),
            (
                "(c) release lateness max",
                _fmt(rel["max"], " ms"),
                f"≤ {TARGET_LATENESS_MAX_MS:.0f} ms",
                _verdict(max_ok),
            ),
            (
                "(c) commit lateness p50 / p99 / max (the worker's commit returned - due_at)",
                " / ".join(_fmt(c["commit_lateness_ms"][k], "", 0) for k in ("p50", "p99"))
                + f" / {_fmt(c['commit_lateness_ms']['max'], ' ms', 0)}",
                "—",
                "",
            ),
            (
                "(c) receive lateness p50 / p99 / max (receive - due_at)",
                f"{_fmt(rec['p50'], '', 1)} / {_fmt(rec['p99'], '', 1)} / "
                f"{_fmt(rec['max'], ' ms', 1)}",
                "—",
                "",
            ),
            *_phase_rows(c.get("turn_phases_ms")),
            *_floor_rows(c.get("floor")),
            (
                "(c) early: released / received before due",
                f"{d['early_release']} / {d['early_receive']}",
                "0",
                _verdict(d["early_release"] == 0 and d["early_receive"] == 0),
            ),
            _once_row("c", d, c["n"]),
        ]
    dd = s.get("d")
    if dd:
        full_held = dd["n"] >= TARGET_HELD
        rows += [
            (
                f"(d) worker RSS with {dd['n']:,} held (settled)",
                _fmt(dd["rss_mb_settled"], " MB"),
                f"≤ {TARGET_RSS_MB:.0f} MB with {TARGET_HELD:,}",
                _verdict(dd["rss_mb_settled"] <= TARGET_RSS_MB if full_held else None),
            ),
            ("(d) worker RSS peak during intake", _fmt(dd["rss_mb_peak_sampled"], " MB"), "—", ""),
            (
                "(d) intake time (worker ready → group lag 0)",
                f"{_fmt(dd['intake_s'], ' s', 1)} ({_fmt(dd['intake_per_s'])}/s)",
                "—",
                "",
            ),
            (
                "(d) client send of the held deferrals, deferrals/s",
                _fmt(dd["send_per_s"]),
                "—",
                "",
            ),
        ]
    bp = s.get("b_profiled")
    if bp:
        rows.append(
            (
                "(b, worker under cProfile) deferrals/s end to end — not a target figure",
                _fmt(bp["e2e_per_s"]),
                "—",
                "",
            )
        )
    cp = s.get("c_profiled")
    if cp:
        rel = cp["delivery"]["release_lateness_ms"]
        rows.append(
            (
                "(c, worker under cProfile) release lateness p50 / p99 / max — not a target",
                f"{_fmt(rel['p50'])} / {_fmt(rel['p99'])} / {_fmt(rel['max'], ' ms')}",
                "—",
                "",
            )
        )
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |" for r in rows]
    notes = [
        "",
        "Notes:",
        f"- (b) runs the worker with `worker.catchup_rate = {THROUGHPUT_CATCHUP_RATE:,.0f}` so the "
        "overdue-backlog cap does not throttle the throughput test; (c) and (d) use the "
        "default configuration.",
        "- (b) end to end includes the deferrals' own delays (up to "
        f"{THROUGHPUT_DELAY_S[1]:.0f} s) after the last send: with small N this tail dominates.",
        "- Quick mode judges only (c), at the target rate for 5 s instead of 20 s; (b) and (d) "
        "are judged in full mode only (N and the held count are too small to mean anything).",
    ]
    if results.get("errors"):
        notes.append(f"- Sections that failed: {', '.join(results['errors'])} (see the JSON).")
    if results.get("profile_file"):
        notes.append(f"- Worker profile (same directory): `{results['profile_file']}`")
    return "\n".join(lines + notes) + "\n"


def _floor_rows(f: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    if not f:
        return []
    d = f["delivery"]
    rel, com, rec = d["release_lateness_ms"], f["commit_lateness_ms"], d["receive_lateness_ms"]

    def three(q: dict[str, Any]) -> str:
        return f"{_fmt(q['p50'])} / {_fmt(q['p99'])} / {_fmt(q['max'], ' ms')}"

    once = d["unique"] == f["n"] and not d["duplicates"] and not d["missing"]
    return [
        (
            "(c) floor, same load and run (bench/floor.py): release / commit / receive lateness "
            "p50 / p99 / max",
            f"{three(rel)}; {three(com)}; {three(rec)}",
            "—",
            "" if once else f"**{d['unique']:,} unique, {d['missing']} missing**",
        )
    ]


def _phase_rows(phases: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    if not phases or "turn" not in phases:
        return []
    names = [n for n in phases if n != "turn"] + ["turn"]
    return [
        (
            "(c) a worker turn, p50 / p99 ms (`TurnPhases`): " + ", ".join(names),
            ", ".join(
                f"{_fmt(phases[n]['p50'], '', 1)} / {_fmt(phases[n]['p99'], '', 1)}" for n in names
            ),
            "—",
            "",
        )
    ]


def _layout(results: dict[str, Any]) -> str:
    protocol = results.get("group_protocol", "classic")
    groups = "" if protocol == "classic" else f"; tier groups on the {protocol} protocol"
    if results.get("worker_per_tier"):
        return "one process per tier" + groups
    n = results.get("workers", 1)
    return ("one process" if n == 1 else f"{n} processes, each running every tier") + groups


def json_default(value: Any) -> Any:
    if isinstance(value, set | tuple):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)
