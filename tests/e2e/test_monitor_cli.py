"""``status``, ``upcoming``, ``show``, ``cancel``, ``reschedule``, ``audit`` and ``dashboard`` as a
user runs them, against a worker process and a real broker."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ensync_kafka.config import load_config
from ensync_kafka.query import Cluster
from tests.helpers import CliProcess, cli_command

CLI_TIMEOUT_S = 60.0
WAIT_S = 60.0


@pytest.fixture
def config_file(kafka_bootstrap: str, unique_prefix: str, tmp_path: Path) -> Path:
    path = tmp_path / "ensync.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "prefix": unique_prefix,
                "kafka": {"bootstrap_servers": kafka_bootstrap},
                "tiers": {"1s": "1s", "1m": "1m", "1h": "1h"},
                "topics": {"defer": {"partitions": 2}, "audit": {"partitions": 1}},
                "worker": {"id": "cli-w", "state_dir": str(tmp_path / "state")},
                "monitor": {"port": "auto"},
                "audit_store": {"path": str(tmp_path / "audit.sqlite3")},
            },
            sort_keys=False,
        )
    )
    return path


def _env(config_file: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENSYNC_")}
    return {**env, "ENSYNC_CONFIG": str(config_file)}


def _run(config_file: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        cli_command(*args),
        env=_env(config_file),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    if ok:
        assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result


def _json(config_file: Path, *args: str) -> Any:
    return json.loads(_run(config_file, *args, "--json").stdout)


def _defer(config_file: Path, *args: str) -> Any:
    return json.loads(_run(config_file, "defer", *args).stdout)


@pytest.fixture
def worker(config_file: Path) -> Iterator[CliProcess]:
    _run(config_file, "topics", "create")
    process = CliProcess(["--log-level", "WARNING", "worker"], _env(config_file))
    cluster = Cluster(load_config(config_file))
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            status = cluster.status()
            if all(t["covered"] == t["partitions"] for t in status["tiers"]):
                break
            if process.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("worker not ready:\n" + "\n".join(process.lines[-30:]))
            time.sleep(0.2)
        yield process
    finally:
        cluster.close()
        process.stop()


def test_monitor_commands(config_file: Path, worker: CliProcess) -> None:
    soon = _defer(config_file, "--name", "cli.soon", "--delay", "40s", "--priority",
                 "5", "--reason", "card retry")  # fmt: skip
    later = _defer(
        config_file, "--name", "cli.later", "--delay", "2h", "--reason", "renewal notice"
    )
    gone = _defer(config_file, "--name", "cli.gone", "--delay", "30m")

    deadline = time.monotonic() + WAIT_S
    while True:
        status = _json(config_file, "status")
        if sum(t["held"] for t in status["tiers"]) == 3:
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.3)
    table = _run(config_file, "status").stdout
    assert re.search(r"^1m\s+1\s", table, re.M) and re.search(r"^1h\s+2\s", table, re.M), table
    assert "cli-w" in table and "ready" in table

    upcoming = _run(config_file, "upcoming", "--limit", "2").stdout
    lines = upcoming.splitlines()
    assert lines[0].startswith("DUE") and "cli.soon" in lines[1] and "cli.gone" in lines[2]
    assert lines[-1].startswith("more: --after ")
    rest = _json(config_file, "upcoming", "--after", lines[-1].split()[-1])
    assert [i["defer_id"] for i in rest["items"]] == [later["defer_id"]]
    assert [i["name"] for i in _json(config_file, "upcoming", "--tier", "1m")["items"]] == [
        "cli.soon"
    ]

    shown = _json(config_file, "show", soon["defer_id"])
    assert shown["state"] == "held" and shown["priority"] == 5 and shown["reason"] == "card retry"
    assert [h["event"] for h in shown["history"]] == ["DEFERRED"]

    cancelled = _run(config_file, "cancel", gone["defer_id"], "--reason", "user unsubscribed")
    assert "cancelled" in cancelled.stdout
    again = _run(config_file, "cancel", gone["defer_id"], ok=False)
    assert again.returncode == 1 and "already cancelled" in again.stdout
    assert _json(config_file, "show", gone["defer_id"])["state"] == "cancelled"

    moved = _json(config_file, "reschedule", soon["defer_id"], "--delay", "90s")
    assert moved["outcome"] == "rescheduled"
    assert _json(config_file, "show", soon["defer_id"])["due_at"] == moved["due_at"]

    found = _json(config_file, "audit", "--reason", "RENEWAL")
    assert [r["defer_id"] for r in found] == [later["defer_id"]]
    audit_table = _run(config_file, "audit", "--id", gone["defer_id"]).stdout
    assert "DEFERRED" in audit_table and "CANCELLED" in audit_table
    assert _json(config_file, "audit", "--name", "cli.later", "--since", "1h")[0]["event"] == (
        "DEFERRED"
    )
    assert _json(config_file, "audit", "--until", "1h") == []

    # SIGINT stops it even when started the way CI's shell starts background jobs.
    dashboard = CliProcess(["dashboard", "--port", "0"], _env(config_file), sigint_ignored=True)
    try:
        url = re.search(r"http://\S+", dashboard.wait_for(r"dashboard: http://"))
        assert url, "the dashboard did not print its URL"
        with urllib.request.urlopen(url.group(0) + "api/v1/upcoming", timeout=10) as response:
            items = json.load(response)["items"]
        assert [i["name"] for i in items] == ["cli.soon", "cli.later"]
        with urllib.request.urlopen(url.group(0), timeout=10) as response:
            assert b"Upcoming deliveries" in response.read()
    finally:
        assert dashboard.stop(signal.SIGINT) == 0
