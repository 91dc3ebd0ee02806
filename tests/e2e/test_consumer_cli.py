"""``defer-file``, ``consume``, ``dead list`` and ``dead redrive`` as a user runs them.

A worker process and a consumer process (a handler module given as module:function) run
against a real broker; the handler fails until a flag file is removed, so events go dead, are
listed, then redriven twice and handled once each. The same JSONL file sent twice delivers
nothing twice.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ensync_kafka.config import Config
from ensync_kafka.topics import TopicNames
from tests.helpers import (
    CliProcess,
    TopicReader,
    audit_records,
    cli_command,
    cli_env,
    wait_until,
)

WAIT_S = 60.0
CLI_TIMEOUT_S = 60.0

pytestmark = pytest.mark.timeout(300)

HANDLER_MODULE = """
import json, os, pathlib

def handle(event):
    if pathlib.Path(os.environ["FAIL_FLAG"]).exists():
        raise RuntimeError("downstream is down")
    with open(os.environ["HANDLED_LOG"], "a") as log:
        log.write(json.dumps({"defer_id": event.defer_id, "i": event.json()["i"]}) + "\\n")
"""


@pytest.fixture
def setup(kafka_bootstrap: str, unique_prefix: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    data: dict[str, Any] = {
        "prefix": unique_prefix,
        "kafka": {"bootstrap_servers": kafka_bootstrap},
        "tiers": [{"name": "all", "span": "1h"}],
        "topics": {
            "defer": {"partitions": 2},
            "priority": {"partitions": 2},
            "audit": {"partitions": 1},
            "dead": {"partitions": 1},
            "invalid": {"partitions": 1},
        },
        "worker": {"id": "e2e-worker", "state_dir": str(tmp_path / "state")},
        "consumer": {"retry": {"base_delay": "200ms", "jitter": 0, "max_attempts": 2}},
    }
    if "monitor" in Config.model_fields:
        data["monitor"] = {"port": 0}
    config = tmp_path / "ensync.yaml"
    config.write_text(yaml.safe_dump(data))
    (tmp_path / "handlers.py").write_text(HANDLER_MODULE)
    env = {
        **cli_env(kafka_bootstrap),
        "ENSYNC_CONFIG": str(config),
        "FAIL_FLAG": str(tmp_path / "fail"),
        "HANDLED_LOG": str(tmp_path / "handled.jsonl"),
    }
    yield {"env": env, "dir": tmp_path, "prefix": unique_prefix, "bootstrap": kafka_bootstrap}


def run(setup: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_command(*args),
        env=setup["env"],
        cwd=setup["dir"],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args}: exit {result.returncode}\n{result.stderr}"
    return result.stdout


def test_defer_file_dead_list_and_redrive(setup: dict[str, Any]) -> None:
    tmp: Path = setup["dir"]
    ok(run(setup, "topics", "create"))
    lines = [
        {"name": "sync", "payload": {"i": 0}, "delay": "0s", "defer_id": "job-0", "priority": 5},
        "{not json",
        {"name": "sync", "payload": {"i": 1}, "delay": 0.1, "defer_id": "job-1"},
        {"name": "sync", "payload": {"i": 2}, "delay": "0s", "defer_id": "job-2", "priority": 9},
        {"name": "sync", "payload": {"i": 3}, "delay": "0s", "defer_id": "job-3", "priority": 2},
    ]
    events = tmp / "events.jsonl"
    events.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    (tmp / "fail").touch()

    worker = CliProcess(["worker"], setup["env"], tmp)
    consumer = CliProcess(["consume", "handlers:handle"], setup["env"], tmp)
    try:
        worker.wait_for(r"tier all: assigned")
        sent = run(setup, "defer-file", str(events))
        assert sent.returncode == 1, sent.stderr  # some lines were rejected
        assert "accepted 3, rejected 2" in sent.stdout
        assert "line 2: not JSON" in sent.stderr
        assert re.search(r"line 4: .*priority", sent.stderr)

        consumer.wait_for(r"ERROR ensync_kafka\.consumer dead ", times=3)
        again = run(setup, "defer-file", str(events))  # same ids: deduplicated by the worker
        assert "accepted 3, rejected 2" in again.stdout

        listed = ok(run(setup, "dead", "list"))
        for n in (0, 1, 3):
            assert f"job-{n}:a2" in listed
        assert "3 dead event(s)" in listed
        as_json = [json.loads(x) for x in ok(run(setup, "dead", "list", "--json")).splitlines()]
        assert {d["defer_id"] for d in as_json} == {"job-0:a2", "job-1:a2", "job-3:a2"}
        assert all(d["error"] == "RuntimeError: downstream is down" for d in as_json)
        assert all([h["attempt"] for h in d["history"]] == [1, 2] for d in as_json)
        assert ok(run(setup, "dead", "list", "--name", "other")).strip() == "no dead letters"
        assert "3 dead event(s)" in ok(run(setup, "dead", "list", "--since", "10m"))
        later = ok(run(setup, "dead", "list", "--since", "2099-01-01T00:00:00+00:00"))
        assert later.strip() == "no dead letters"
        refused = run(setup, "dead", "redrive")
        assert refused.returncode != 0 and "--all" in refused.stderr

        (tmp / "fail").unlink()
        first = ok(run(setup, "dead", "redrive", "--all"))
        assert "3 dead event(s) redriven" in first
        second = ok(run(setup, "dead", "redrive", "--id", "job-1:a2", "--id", "nope"))
        assert "1 dead event(s) redriven" in second

        handled_log = tmp / "handled.jsonl"

        def handled() -> list[dict[str, Any]]:
            text = handled_log.read_text() if handled_log.exists() else ""
            return [json.loads(x) for x in text.splitlines()]

        wait_until(lambda: len(handled()) >= 3, timeout=WAIT_S, what="the redriven events")
        duplicates = _wait_duplicates(setup, expected=4)  # 3 re-sent lines + 1 second redrive
        time.sleep(1.0)  # a duplicate delivery would be handled by now
    finally:
        consumer_rc = consumer.stop()
        worker_rc = worker.stop()
    assert consumer_rc == 0, "\n".join(consumer.lines[-20:])
    assert worker_rc == 0, "\n".join(worker.lines[-20:])
    assert sorted(h["defer_id"] for h in handled()) == ["job-0:a2:r", "job-1:a2:r", "job-3:a2:r"]
    assert sorted(duplicates) == ["job-0", "job-1", "job-1:a2:r", "job-3"]


def _wait_duplicates(setup: dict[str, Any], expected: int) -> list[str]:
    names = TopicNames(setup["prefix"])
    with TopicReader(setup["bootstrap"], [names.audit]) as reader:

        def duplicates() -> list[str]:
            return [
                r["defer_id"] for r in audit_records(reader.records) if r["event"] == "DUPLICATE"
            ]

        reader.poll_until(
            lambda _: len(duplicates()) >= expected,
            timeout=WAIT_S,
            what=f"{expected} DUPLICATE audit records",
        )
        return duplicates()
