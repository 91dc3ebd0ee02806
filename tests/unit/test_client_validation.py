"""DeferClient validation: every invalid request raises ValidationError before anything is sent.

The client points at a closed 127.0.0.1 port: a request that got past validation would block in
``flush`` for the delivery timeout, so "raised at once, nothing queued" proves no send happened.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from ensync_kafka import DeferClient, DeferRequest, ValidationError
from ensync_kafka.client import choose_tier
from ensync_kafka.config import TierConfig, config_from_mapping

MAX_DELAY_S = 3600
MAX_PAYLOAD = 100
IMMEDIATE_S = 1.0


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def client() -> Iterator[DeferClient]:
    config = config_from_mapping(
        {
            "kafka": {"bootstrap_servers": f"127.0.0.1:{closed_port()}"},
            "queues": ["default", "billing"],
            "defer": {"max_delay": MAX_DELAY_S, "max_payload_bytes": MAX_PAYLOAD},
        },
        environ={},
    )
    # A record that got past validation fails within a second instead of blocking the test.
    client = DeferClient(config, producer_settings={"log_level": "0", "message.timeout.ms": "500"})
    yield client
    client.flush(2)


def rejects(call: Callable[[], Any], client: DeferClient, match: str) -> str:
    started = time.monotonic()
    with pytest.raises(ValidationError, match=match) as info:
        call()
    elapsed = time.monotonic() - started
    assert elapsed < IMMEDIATE_S, f"ValidationError came after {elapsed:.2f}s: did it send?"
    assert client.flush(0) == 0, "a record was queued for sending despite the ValidationError"
    return str(info.value)


def future(seconds: float = 60) -> datetime:
    return datetime.now(tz=UTC) + timedelta(seconds=seconds)


@pytest.mark.parametrize("priority", [0, 6, -1, 100, True, False, "3", 2.0, None])
def test_priority_outside_1_to_5_or_not_an_int(client: DeferClient, priority: Any) -> None:
    message = rejects(lambda: client.defer("n", {}, delay=1, priority=priority), client, "priority")
    assert "1..5" in message


@pytest.mark.parametrize("priority", [0, 6, True, "3"])
def test_schedule_checks_priority_too(client: DeferClient, priority: Any) -> None:
    rejects(lambda: client.schedule("n", {}, at=future(), priority=priority), client, "priority")


@pytest.mark.parametrize("delay", [-1, -0.001, timedelta(seconds=-5)])
def test_negative_delay(client: DeferClient, delay: Any) -> None:
    rejects(lambda: client.defer("n", {}, delay=delay), client, "delay")


@pytest.mark.parametrize("delay", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_delay(client: DeferClient, delay: float) -> None:
    rejects(lambda: client.defer("n", {}, delay=delay), client, "delay")


@pytest.mark.parametrize("delay", ["5s", "5", True, [1], object()])
def test_delay_of_the_wrong_type(client: DeferClient, delay: Any) -> None:
    rejects(lambda: client.defer("n", {}, delay=delay), client, "delay")


def test_naive_datetime(client: DeferClient) -> None:
    naive = datetime.now() + timedelta(minutes=1)  # naive: the point of the test
    message = rejects(lambda: client.schedule("n", {}, at=naive), client, "at")
    assert "naive" in message


def test_at_must_be_a_datetime(client: DeferClient) -> None:
    rejects(lambda: client.schedule("n", {}, at="2030-01-01T00:00:00Z"), client, "at")  # type: ignore[arg-type]


def test_both_delay_and_at(client: DeferClient) -> None:
    both = DeferRequest(name="n", payload={}, delay=1, at=future())
    rejects(lambda: client.defer_many([both]), client, "exactly one of delay and at")


def test_neither_delay_nor_at(client: DeferClient) -> None:
    neither = DeferRequest(name="n", payload={})
    rejects(lambda: client.defer_many([neither]), client, "exactly one of delay and at")
    rejects(lambda: client.defer("n", {}, delay=None), client, "exactly one")  # type: ignore[arg-type]
    rejects(lambda: client.schedule("n", {}, at=None), client, "exactly one")  # type: ignore[arg-type]


@pytest.mark.parametrize("delay", [MAX_DELAY_S + 1, timedelta(seconds=MAX_DELAY_S, minutes=1)])
def test_delay_past_max_delay(client: DeferClient, delay: Any) -> None:
    message = rejects(lambda: client.defer("n", {}, delay=delay), client, "delay")
    assert "defer.max_delay" in message


def test_schedule_past_max_delay(client: DeferClient) -> None:
    at = future(MAX_DELAY_S + 120).astimezone(timezone(timedelta(hours=-7)))
    rejects(lambda: client.schedule("n", {}, at=at), client, "max_delay")


def test_unknown_queue(client: DeferClient) -> None:
    message = rejects(lambda: client.defer("n", {}, delay=1, queue="nope"), client, "queue")
    assert "'nope'" in message
    assert "default, billing" in message


@pytest.mark.parametrize(
    "payload",
    [b"x" * (MAX_PAYLOAD + 1), "é" * (MAX_PAYLOAD // 2 + 1), {"data": "x" * MAX_PAYLOAD}],
)
def test_payload_over_max_payload_bytes(client: DeferClient, payload: Any) -> None:
    message = rejects(lambda: client.defer("n", payload, delay=1), client, "payload")
    assert "max_payload_bytes" in message


@pytest.mark.parametrize("payload", [object(), {1, 2}, {"when": datetime.now(tz=UTC)}, {(1,): 2}])
def test_payload_not_json_serialisable(client: DeferClient, payload: Any) -> None:
    rejects(lambda: client.defer("n", payload, delay=1), client, "payload")


@pytest.mark.parametrize("payload", [float("nan"), {"x": float("inf")}])
def test_payload_with_non_finite_numbers_is_not_json(client: DeferClient, payload: Any) -> None:
    """``json.dumps`` writes NaN/Infinity by default, which is not JSON (RFC 8259): consumers in
    other languages could not parse the delivered ``application/json`` payload."""
    rejects(lambda: client.defer("n", payload, delay=1), client, "payload")


@pytest.mark.parametrize(
    "headers",
    [
        {1: b"v"},
        {"h": 5},
        {"h": ["v"]},
        [("h",)],
        [("a", b"1", "extra")],
        42,
        [42],
        [(None, b"v")],
    ],
)
def test_bad_headers(client: DeferClient, headers: Any) -> None:
    rejects(lambda: client.defer("n", {}, delay=1, headers=headers), client, "headers")


@pytest.mark.parametrize("name", ["", None, 5, b"bytes"])
def test_bad_name(client: DeferClient, name: Any) -> None:
    rejects(lambda: client.defer(name, {}, delay=1), client, "name")


@pytest.mark.parametrize("defer_id", ["", "x" * 201, 5])
def test_bad_defer_id(client: DeferClient, defer_id: Any) -> None:
    rejects(lambda: client.defer("n", {}, delay=1, defer_id=defer_id), client, "defer_id")


@pytest.mark.parametrize("key", [5, 1.5, ["k"]])
def test_bad_key(client: DeferClient, key: Any) -> None:
    rejects(lambda: client.defer("n", {}, delay=1, key=key), client, "key")


def test_bad_reason(client: DeferClient) -> None:
    rejects(lambda: client.defer("n", {}, delay=1, reason=None), client, "reason")  # type: ignore[arg-type]


@pytest.mark.parametrize("attempt", [0, -1, True, "2"])
def test_bad_attempt(client: DeferClient, attempt: Any) -> None:
    request = DeferRequest(name="n", payload={}, delay=1, attempt=attempt)
    rejects(lambda: client.defer_many([request]), client, "attempt")


def test_defer_many_sends_nothing_when_one_request_is_invalid(client: DeferClient) -> None:
    requests = [
        DeferRequest(name="ok", payload={}, delay=1),
        DeferRequest(name="bad", payload={}, delay=1, priority=9),
        DeferRequest(name="ok", payload={}, delay=2),
    ]
    message = rejects(lambda: client.defer_many(requests), client, "priority")
    assert message.startswith("request 1:"), message


def test_validation_error_is_an_ensync_error(client: DeferClient) -> None:
    from ensync_kafka import EnsyncKafkaError

    with pytest.raises(EnsyncKafkaError):
        client.defer("n", {}, delay=1, priority=0)


# -- choose_tier ----------------------------------------------------------------------------------

TIERS = (
    TierConfig(name="1s", span=1),
    TierConfig(name="10s", span=10),
    TierConfig(name="1m", span=60),
)


@pytest.mark.parametrize(
    ("delay", "tier"),
    [
        (0.0, "1s"),
        (0.5, "1s"),
        (1.0, "1s"),  # a span covers its own length
        (1.001, "10s"),
        (9.99, "10s"),
        (10.0, "10s"),
        (10.5, "1m"),
        (60.0, "1m"),
        (61.0, "1m"),  # longer than every span: the top tier holds it
        (86400.0 * 30, "1m"),
    ],
)
def test_choose_tier(delay: float, tier: str) -> None:
    assert choose_tier(TIERS, delay).name == tier


def test_choose_tier_single_tier() -> None:
    only = (TierConfig(name="only", span=5),)
    assert choose_tier(only, 0).name == "only"
    assert choose_tier(only, 500).name == "only"
