"""The ``ensync-kafka`` command as a real process: topics create, defer, schedule, errors."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition

from ensync_kafka.codec import delivered_from_deferral
from ensync_kafka.config import config_from_mapping
from ensync_kafka.models import now_ms
from ensync_kafka.topics import TopicNames, topic_specs
from tests.helpers import (
    TopicReader,
    cli_command,
    cli_env,
    kafka_script,
    pipeline_mapping,
    raw_deferral,
    transactional_producer,
    write_config,
)

CLI_TIMEOUT_S = 60.0


def run(
    bootstrap: str, *args: str, cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_command(*args),
        env={**cli_env(bootstrap), **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def receipt_of(stdout: str) -> dict[str, object]:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "no receipt printed"
    receipt: dict[str, object] = json.loads(lines[-1])
    return receipt


def test_topics_defer_schedule_and_errors(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    mapping = pipeline_mapping(unique_prefix, kafka_bootstrap, tmp_path / "state")
    config_path = write_config(tmp_path / "ensync.yaml", mapping)
    config = config_from_mapping(mapping, environ={})
    expected = sorted(spec.name for spec in topic_specs(config))
    names = TopicNames(unique_prefix)

    # topics create: creates everything, then verifies everything.
    first = ok(run(kafka_bootstrap, "topics", "create", "--config", str(config_path)))
    created = sorted(line.split()[1] for line in first.splitlines() if line.startswith("created"))
    assert created == expected
    second = ok(run(kafka_bootstrap, "topics", "create", "--config", str(config_path)))
    assert "created" not in second
    verified = sorted(line.split()[1] for line in second.splitlines() if line.startswith("verif"))
    assert verified == expected

    # A config that disagrees with the existing topics is reported, with a failing exit.
    wider = json.loads(json.dumps(mapping))
    wider["topics"]["defer"]["partitions"] = 4
    wider_path = write_config(tmp_path / "wider.yaml", wider)
    mismatch = run(kafka_bootstrap, "topics", "create", "--config", str(wider_path))
    assert mismatch.returncode != 0
    assert "MISMATCH" in mismatch.stderr
    assert f"{names.defer('1s')}: has 3 partitions, the configuration expects 4" in (
        mismatch.stderr
    )

    # defer prints the receipt as JSON.
    before = datetime.now(tz=UTC)
    out = ok(
        run(
            kafka_bootstrap,
            "defer",
            "--config",
            str(config_path),
            "--name",
            "cli.event",
            "--payload",
            '{"order": 42}',
            "--delay",
            "2s",
            "--priority",
            "3",
            "--reason",
            "from the CLI",
            "--key",
            "order-42",
        )
    )
    deferred = receipt_of(out)
    assert deferred["tier"] == "10s"
    assert deferred["priority"] == 3
    assert deferred["queue"] == "default"
    assert isinstance(deferred["defer_id"], str) and deferred["defer_id"]
    due = datetime.fromisoformat(str(deferred["due_at"]))
    assert before + timedelta(seconds=2) <= due + timedelta(milliseconds=1)
    assert due <= datetime.now(tz=UTC) + timedelta(seconds=2)

    # schedule prints the receipt as JSON too.
    at = (datetime.now(tz=UTC) + timedelta(seconds=30)).replace(microsecond=250_000)
    out = ok(
        run(
            kafka_bootstrap,
            "schedule",
            "--config",
            str(config_path),
            "--name",
            "cli.scheduled",
            "--at",
            at.isoformat(),
            "--priority",
            "5",
            "--defer-id",
            "cli-scheduled-1",
        )
    )
    scheduled = receipt_of(out)
    assert scheduled["defer_id"] == "cli-scheduled-1"
    assert scheduled["priority"] == 5
    assert scheduled["tier"] == "10s"  # past the top span: the top tier
    assert datetime.fromisoformat(str(scheduled["due_at"])) == at

    # Both reached their tier topic, keyed by defer_id.
    with TopicReader(kafka_bootstrap, [names.defer("10s")]) as reader:
        reader.poll_until(
            lambda records: (
                {r.key for r in records} >= {str(deferred["defer_id"]).encode(), b"cli-scheduled-1"}
            ),
            timeout=30,
            what="the CLI deferrals on the tier topic",
        )

    # A bad priority fails with the validation message and a non-zero exit.
    for priority in ("9", "0"):
        bad = run(
            kafka_bootstrap,
            "defer",
            "--config",
            str(config_path),
            "--name",
            "x",
            "--delay",
            "1s",
            "--priority",
            priority,
        )
        assert bad.returncode != 0
        assert "priority: must be an integer 1..5" in bad.stderr, bad.stderr
        assert not bad.stdout.strip()

    naive = run(
        kafka_bootstrap,
        "schedule",
        "--config",
        str(config_path),
        "--name",
        "x",
        "--at",
        (datetime.now() + timedelta(minutes=1)).isoformat(),
    )
    assert naive.returncode != 0
    assert "naive" in naive.stderr

    bad_delay = run(
        kafka_bootstrap, "defer", "--config", str(config_path), "--name", "x", "--delay", "soon"
    )
    assert bad_delay.returncode != 0
    assert "--delay" in bad_delay.stderr

    bad_payload = run(
        kafka_bootstrap,
        "defer",
        "--config",
        str(config_path),
        "--name",
        "x",
        "--delay",
        "1s",
        "--payload",
        "{not json",
    )
    assert bad_payload.returncode != 0
    assert "--payload" in bad_payload.stderr


def test_config_errors_and_unknown_tier_fail_clearly(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    mapping = pipeline_mapping(unique_prefix, kafka_bootstrap, tmp_path / "state")
    mapping["worker"]["fire_batch_szie"] = 10
    typo = write_config(tmp_path / "typo.yaml", mapping)
    result = run(kafka_bootstrap, "topics", "create", "--config", str(typo))
    assert result.returncode != 0
    assert "worker.fire_batch_szie: unknown key" in result.stderr

    good = write_config(
        tmp_path / "good.yaml", pipeline_mapping(unique_prefix, kafka_bootstrap, tmp_path / "s")
    )
    result = run(kafka_bootstrap, "worker", "--config", str(good), "--tiers", "1s,5m")
    assert result.returncode != 0
    assert "unknown tier '5m'" in result.stderr

    result = run(
        kafka_bootstrap,
        "defer",
        "--config",
        str(tmp_path / "absent.yaml"),
        "--name",
        "x",
        "--delay",
        "1s",
    )
    assert result.returncode != 0
    assert "no such config file" in result.stderr


def test_topics_hanging_names_an_old_open_transaction_and_the_way_out(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    """An open transaction holding a changelog partition and the tier group's offsets, as a
    broker restart can leave one: found, and ended with the commands printed, run through
    ``broker tool``; the group rewound to what it had committed before."""
    mapping = pipeline_mapping(unique_prefix, kafka_bootstrap, tmp_path / "state")
    config_path = write_config(tmp_path / "ensync.yaml", mapping)
    ok(run(kafka_bootstrap, "topics", "create", "--config", str(config_path)))
    calm = ok(run(kafka_bootstrap, "topics", "hanging", "--config", str(config_path)))
    assert "is hanging" in calm.splitlines()[0]
    assert unique_prefix not in calm  # nothing of ours open

    names = TopicNames(unique_prefix)
    changelog, tier_topic, group = names.state("1s"), names.defer("1s"), names.worker_group("1s")
    committer = Consumer(
        {"bootstrap.servers": kafka_bootstrap, "group.id": group, "enable.auto.commit": False}
    )
    plain = Producer({"bootstrap.servers": kafka_bootstrap})
    for _ in range(12):  # a reset clamps to the partition's offsets: give it some
        plain.produce(tier_topic, b"x", partition=0)
    assert plain.flush(30) == 0
    committer.commit(offsets=[TopicPartition(tier_topic, 0, 4)], asynchronous=False)
    producer = transactional_producer(kafka_bootstrap)
    producer.begin_transaction()
    producer.produce(changelog, b"open", b"k", partition=1)
    release = delivered_from_deferral(raw_deferral("held-up", priority=3), now_ms(), "1s")
    producer.produce(names.priority("default", 3), release, b"held-up", partition=0)
    assert producer.flush(30) == 0
    producer.send_offsets_to_transaction(
        [TopicPartition(tier_topic, 0, 10)], committer.consumer_group_metadata(), 30
    )
    try:
        young = ok(run(kafka_bootstrap, "topics", "hanging", "--config", str(config_path)))
        assert f"open     {changelog}[1] from offset 0 (end 1), open for" in young
        # Any transaction older than --max-age counts as hanging: exit 1, and the way out.
        old = run(
            kafka_bootstrap, "topics", "hanging", "--config", str(config_path), "--max-age", "0s"
        )
        assert old.returncode == 1, old.stdout + old.stderr
        assert f"HANGING  {changelog}[1] from offset 0" in old.stdout
        assert "count): stop the workers of the tiers below; run the aborts above" in old.stdout
        assert f"  tier 1s (group {group})" in old.stdout
        # (__consumer_offsets is shared: other transactions may be open on its partitions)
        assert "hanging transaction(s): end each with the command shown" in old.stderr
        lines = [line.strip() for line in old.stdout.splitlines()]
        aborts = [line for line in lines if line.startswith("kafka-transactions.sh")]
        rewinds = [line for line in lines if f"--group {group} " in line]
        assert (
            f"kafka-transactions.sh --bootstrap-server {kafka_bootstrap} abort --topic "
            f"{changelog} --partition 1 --start-offset 0" in aborts
        )
        assert rewinds == [
            f"kafka-consumer-groups.sh --bootstrap-server {kafka_bootstrap} --group {group} "
            f"--reset-offsets --topic {tier_topic}:{p} {to} --execute"
            for p, to in enumerate(["--to-offset 4", "--to-earliest", "--to-earliest"])
        ]
        republishes = [line for line in lines if line.startswith("ensync-kafka topics republish")]
        assert republishes == [
            f"ensync-kafka topics republish --topic {names.priority('default', 3)} --partition 0 "
            "--from 0 --to 1",
            f"ensync-kafka topics republish --topic {changelog} --partition 1 --from 0 --to 1",
        ]
        for line in aborts + rewinds:
            tool, args = kafka_script(line)
            ok(run(kafka_bootstrap, "broker", "tool", tool, *args))
        # Its turn never committed (no changelog marker): nothing is written again.
        again = ok(run(kafka_bootstrap, *republishes[0].split()[1:], "--config", str(config_path)))
        assert "1 hidden, 0 written again, 1 left" in again and "left           held-up" in again
        after = ok(run(kafka_bootstrap, "topics", "hanging", "--config", str(config_path)))
        assert changelog not in after
        committed = committer.committed([TopicPartition(tier_topic, p) for p in range(3)], 30)
        assert [tp.offset for tp in committed] == [4, 0, 0]
        bad = run(kafka_bootstrap, "topics", "hanging", "--max-age", "soon")
        assert bad.returncode == 2 and "--max-age" in bad.stderr
    finally:
        producer.abort_transaction(30)
        committer.close()
