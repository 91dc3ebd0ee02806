"""ensync-kafka benchmark: raw Kafka baseline, deferral throughput, lateness at load, held RSS.

    .venv/bin/python -m bench.run [--quick] [--profile] [--sections a,b,c,d]

Everything runs against one broker in one run (``--bootstrap``, else $ENSYNC_KAFKA_BOOTSTRAP,
else the running ``ensync-kafka broker``). Each section gets a fresh topic prefix, its own
topics (``ensure_topics``, 6 partitions for the defer and priority families), its own worker
process with a state directory under a temporary directory, and its own receiving process.
Topics, consumer groups and the temporary directory are removed at the end (``--keep-topics``
keeps the topics). See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ensync_kafka.config import GROUP_PROTOCOLS

from .common import FULL, PARTITIONS, QUICK, RESULTS_DIR, SECTIONS, Bench, Mode, log
from .machine import environment, listener_pid
from .report import json_default, markdown, profile_report
from .sections import section_a, section_b, section_c, section_d

# -- main -------------------------------------------------------------------------------------


def resolve_bootstrap(arg: str | None) -> str:
    if arg:
        return arg
    if os.environ.get("ENSYNC_KAFKA_BOOTSTRAP"):
        return os.environ["ENSYNC_KAFKA_BOOTSTRAP"]
    from ensync_kafka.localbroker import running_bootstrap

    found = running_bootstrap()
    if not found:
        raise SystemExit(
            "no broker: pass --bootstrap, export ENSYNC_KAFKA_BOOTSTRAP, or run "
            "`ensync-kafka broker start`"
        )
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="small N, about a minute in all")
    parser.add_argument(
        "--profile",
        nargs="?",
        const="b",
        choices=("b", "c"),
        default=None,
        help="also run section (b) (or the one named) once more with the worker under "
        "cProfile, and write its top functions to the results directory",
    )
    parser.add_argument(
        "--profile-clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="what the profile counts: each thread's CPU time [cpu], or elapsed time",
    )
    parser.add_argument("--sections", default=",".join(SECTIONS), help="subset of a,b,c,d [all]")
    parser.add_argument(
        "--worker-per-tier",
        action="store_true",
        help="(b) and (c): one worker process per tier instead of one process for both",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="(b) and (c): this many worker processes, each running every tier, sharing the "
        "partitions through the tiers' consumer groups [1]",
    )
    parser.add_argument("--bootstrap", default=None, help="[$ENSYNC_KAFKA_BOOTSTRAP]")
    parser.add_argument("--n", type=int, default=None, help="records for (a) and (b)")
    parser.add_argument("--held", type=int, default=None, help="held deferrals for (d)")
    parser.add_argument("--load-seconds", type=float, default=None, help="duration of (c)")
    parser.add_argument("--load-rate", type=int, default=None, help="offered load of (c)")
    parser.add_argument("--batch", type=int, default=None, help="defer_many batch size")
    parser.add_argument(
        "--partitions", type=int, default=PARTITIONS, help="per defer and priority topic [6]"
    )
    parser.add_argument(
        "--priority-partitions", type=int, default=None, help="per priority topic [--partitions]"
    )
    parser.add_argument(
        "--audit-partitions", type=int, default=None, help="of the audit topic [the default, 3]"
    )
    parser.add_argument(
        "--fetch-wait-ms",
        type=int,
        default=50,
        help="fetch.wait.max.ms of the receiving consumer [50]",
    )
    parser.add_argument(
        "--group-protocol",
        choices=GROUP_PROTOCOLS,
        default="classic",
        help="worker.group_protocol of the workers [classic]",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--kafka-version", default=None, help="when the broker is remote")
    parser.add_argument(
        "--git-sha", default=None, help="label results with this commit (exported trees)"
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-save", action="store_true", help="print only; write no files")
    parser.add_argument("--keep-topics", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = QUICK if args.quick else FULL
    mode = Mode(
        base.name,
        n=args.n or base.n,
        load_seconds=args.load_seconds or base.load_seconds,
        load_rate=args.load_rate or base.load_rate,
        held=args.held or base.held,
        batch=args.batch or base.batch,
    )
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"a", "b", "c", "d"}
    if unknown:
        raise SystemExit(f"unknown sections: {sorted(unknown)}")
    bootstrap = resolve_bootstrap(args.bootstrap)
    broker_pid = listener_pid(bootstrap)
    env = environment(bootstrap, broker_pid, args.kafka_version, args.git_sha)
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="ensync-bench-"))
    bench = Bench(
        bootstrap=bootstrap,
        partitions=args.partitions,
        tmp=tmp,
        broker_pid=broker_pid,
        fetch_wait_ms=args.fetch_wait_ms,
        priority_partitions=args.priority_partitions,
        audit_partitions=args.audit_partitions,
        workers=args.workers,
        per_tier=args.worker_per_tier,
        group_protocol=args.group_protocol,
    )
    log(
        f"{mode.name} mode on {bootstrap} ({env['cpu_count']} cores, Kafka {env['kafka']}); "
        f"run {bench.run_id}; temp {tmp}"
    )
    results: dict[str, Any] = {
        "environment": env,
        "mode": mode.__dict__,
        "partitions": args.partitions,
        "worker_per_tier": args.worker_per_tier,
        "workers": args.workers,
        "receiver_fetch_wait_ms": args.fetch_wait_ms,
        "group_protocol": args.group_protocol,
        "sections": {},
        "errors": [],
    }
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    suffix = "" if mode.name == "full" else f"-{mode.name}"
    if args.partitions != PARTITIONS:
        suffix += f"-partitions{args.partitions}"
    if args.priority_partitions:
        suffix += f"-priority{args.priority_partitions}"
    if args.audit_partitions:
        suffix += f"-audit{args.audit_partitions}"
    if args.group_protocol != "classic":
        suffix += f"-{args.group_protocol}-protocol"
    if args.worker_per_tier:
        suffix += "-per-tier"
    elif args.workers > 1:
        suffix += f"-workers{args.workers}"
    if sorted(sections) != list(SECTIONS):  # a partial run never overwrites a full one
        suffix += "-" + "".join(sorted(sections))
    stem = f"{stamp}-{env['git_sha']}{suffix}"
    if not args.no_save:  # a second recorded run of one commit never overwrites the first
        first, n = stem, 1
        while (args.results_dir / f"{stem}.md").exists():
            n += 1
            stem = f"{first}-run{n}"
    runs: list[tuple[str, Any]] = []
    if "a" in sections:
        runs.append(("a", lambda: section_a(bench, mode.n)))
    if "b" in sections:
        runs.append(("b", lambda: section_b(bench, mode.n, mode.batch, seed=args.seed)))
    if "c" in sections:
        runs.append(
            (
                "c",
                lambda: section_c(bench, mode.load_rate, mode.load_seconds, seed=args.seed),
            )
        )
    if "d" in sections:
        runs.append(("d", lambda: section_d(bench, mode.held, 10_000, seed=args.seed)))
    prof_path = tmp / f"worker-{args.profile}.prof"
    clock = args.profile_clock
    if args.profile == "b":
        runs.append(
            (
                "b_profiled",
                lambda: section_b(
                    bench,
                    mode.n,
                    mode.batch,
                    seed=args.seed,
                    profile=prof_path,
                    profile_clock=clock,
                ),
            )
        )
    elif args.profile == "c":
        runs.append(
            (
                "c_profiled",
                lambda: section_c(
                    bench,
                    mode.load_rate,
                    mode.load_seconds,
                    seed=args.seed,
                    profile=prof_path,
                    profile_clock=clock,
                ),
            )
        )
    try:
        for name, run in runs:
            try:
                results["sections"][name] = run()
            except Exception as exc:  # record and go on: one section must not hide the others
                log(f"section {name} failed: {exc!r}")
                results["errors"].append(name)
                results["sections"][f"{name}_error"] = repr(exc)
        prof_files = sorted(tmp.glob(f"{prof_path.stem}*.prof"))
        if args.profile and prof_files:
            text = profile_report(prof_files, args.profile, clock)
            if args.no_save:
                print(text)
            else:
                args.results_dir.mkdir(parents=True, exist_ok=True)
                out = args.results_dir / f"{stem}-worker-profile-{args.profile}.txt"
                out.write_text(text)
                results["profile_file"] = out.name
                log(f"worker profile: {out}")
    finally:
        bench.cleanup(args.keep_topics)
        shutil.rmtree(tmp, ignore_errors=True)
    results["wall_s"] = round(time.time() - started, 1)
    report = markdown(results)
    print(report)
    if not args.no_save:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        (args.results_dir / f"{stem}.md").write_text(report)
        (args.results_dir / f"{stem}.json").write_text(
            json.dumps(results, indent=2, default=json_default) + "\n"
        )
        log(f"wrote {args.results_dir / stem}.md and .json")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
