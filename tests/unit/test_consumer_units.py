"""Consumer-side logic without a broker: backoff, ids, rate limit, priority choice, config."""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from ensync_kafka import (
    ConfigError,
    DeferRequest,
    Drop,
    Postpone,
    PriorityConsumer,
    RateLimit,
    Retry,
)
from ensync_kafka.cli.consumer import _request, _send
from ensync_kafka.client import MAX_DEFER_ID_CHARS
from ensync_kafka.config import Config, ConsumerConfig, RetryPolicyConfig, config_from_mapping
from ensync_kafka.consumer import load_callable
from ensync_kafka.dead import DeadLetter, dead_record, redrive_request
from ensync_kafka.models import Attempt, DeliveredEvent
from ensync_kafka.ordering import PrioritySelector
from ensync_kafka.retry import (
    CHAIN_HEADER,
    backoff_delay,
    chain_headers,
    chain_of,
    postpone_id,
    redefer_payload,
    redrive_id,
    retry_id,
)
from ensync_kafka.testing import InMemoryDeferClient

BOOT = {"kafka": {"bootstrap_servers": "127.0.0.1:9"}}


def build(consumer: dict[str, Any] | None = None) -> Config:
    return config_from_mapping({**BOOT, "consumer": consumer or {}}, environ={})


# -- config -----------------------------------------------------------------------------------


def test_consumer_config_defaults_and_yaml_keys() -> None:
    cc = build().consumer
    assert cc.ordering == "strict"
    assert cc.retry.max_attempts == 5 and cc.retry.base_delay == 1.0
    assert cc.shedding.lag_threshold is None
    cc = build(
        {
            "ordering": "weighted",
            "shares": {"1": 0.2},
            "retry": {"base_delay": "250ms", "by_name": {"pay": {"max_attempts": 9}}},
            "shedding": {"lag_threshold": 100, "max_priority": 2, "delay": "2m"},
            "alert": "myapp.alerts:page",
        }
    ).consumer
    assert cc.shares == {1: 0.2}
    assert cc.retry.base_delay == 0.25
    assert cc.shedding.delay == 120.0
    pay = cc.retry.for_event("pay")
    assert (pay.max_attempts, pay.base_delay) == (9, 0.25)
    assert cc.retry.for_event("other") is cc.retry


def test_consumer_config_env_override() -> None:
    config = config_from_mapping(
        BOOT, environ={"ENSYNC_CONSUMER__RETRY__MAX_ATTEMPTS": "7"}, source="env"
    )
    assert config.consumer.retry.max_attempts == 7


@pytest.mark.parametrize(
    ("consumer", "message"),
    [
        ({"ordering": "random"}, "consumer.ordering"),
        ({"shares": {"1": 0.6, "2": 0.5}}, "sum below 1"),
        ({"shares": {"7": 0.1}}, "outside 1..5"),
        ({"retry": {"factor": 0.5}}, "consumer.retry.factor"),
        ({"retry": {"by_name": {"x": {"max_attemps": 2}}}}, "max_attemps: unknown key"),
        ({"shedding": {"max_priority": 6}}, "consumer.shedding.max_priority"),
        ({"alert": "not a callable path"}, "consumer.alert"),
    ],
)
def test_consumer_config_errors_name_the_key(consumer: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(consumer)


# -- backoff and ids --------------------------------------------------------------------------


def test_backoff_grows_caps_and_jitters_deterministically() -> None:
    policy = RetryPolicyConfig(base_delay=1, factor=2, max_delay=10, jitter=0.2)
    delays = [backoff_delay(policy, n, "chain") for n in range(1, 7)]
    assert delays == [backoff_delay(policy, n, "chain") for n in range(1, 7)]
    for n, delay in enumerate(delays, start=1):
        nominal = min(10.0, 2.0 ** (n - 1))
        assert 0.8 * nominal <= delay <= nominal
    assert delays[0] < delays[1] < delays[2] < delays[3]
    assert backoff_delay(policy, 1, "a") != backoff_delay(policy, 1, "b")  # spread out
    exact = RetryPolicyConfig(base_delay=0.5, factor=3, jitter=0)
    assert [backoff_delay(exact, n, "c") for n in (1, 2, 3)] == [0.5, 1.5, 4.5]
    assert backoff_delay(exact, 10_000, "c") == exact.max_delay  # no overflow


def test_ids_are_deterministic_and_bounded() -> None:
    assert retry_id("abc", 2) == "abc:a2"
    assert postpone_id("abc", 3, 17) == "abc:p3.17"
    assert redrive_id("abc:a5") == "abc:a5:r"
    long = "x" * MAX_DEFER_ID_CHARS
    assert retry_id(long, 3) == retry_id(long, 3)
    assert len(retry_id(long, 3)) <= MAX_DEFER_ID_CHARS
    assert retry_id(long, 3) != retry_id(long + "y", 3)


def test_chain_header_names_the_chain() -> None:
    assert chain_of("abc", ()) == "abc"
    headers = chain_headers((("trace", b"1"), (CHAIN_HEADER, b"old")), "root")
    assert headers == [("trace", b"1"), (CHAIN_HEADER, b"root")]
    assert chain_of("root:a2", tuple(headers)) == "root"


@pytest.mark.parametrize("payload", [{"to": "ana", "n": [1, 2.5, None]}, "plain text", b"\x00\xff"])
def test_redeferred_payload_keeps_bytes_and_content_type(payload: Any) -> None:
    client = InMemoryDeferClient()
    client.defer("ev", payload, delay=0, defer_id="one")
    (first,) = client.release_due()
    client.defer("ev", redefer_payload(first.payload, first.content_type), delay=0, defer_id="two")
    (second,) = client.release_due()
    assert (second.payload, second.content_type) == (first.payload, first.content_type)


def test_a_json_string_payload_keeps_its_bytes() -> None:
    assert redefer_payload(b'"hi"', "application/json") == b'"hi"'


# -- signals ----------------------------------------------------------------------------------


def test_signals_carry_delay_and_reason() -> None:
    assert Retry(delay=timedelta(seconds=3), reason="busy").delay == 3.0
    assert Retry().delay is None and Retry().reason == "Retry requested by the handler."
    assert Drop("spam").reason == "spam"
    assert Postpone(-1).delay == 0.0
    assert not isinstance(Drop(), ConfigError)  # signals are not errors


# -- rate limit -------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limit_allows_the_burst_then_spreads_the_excess() -> None:
    clock = FakeClock()
    limit = RateLimit(rate=2, per="1s", burst=2, name="api", clock=clock)
    assert [limit.try_acquire("k") for _ in range(2)] == [0.0, 0.0]
    waits = [limit.try_acquire("k") for _ in range(3)]
    assert waits == pytest.approx([0.5, 1.0, 1.5])  # one slot apart, not all at once
    assert limit.try_acquire("other") == 0.0  # per key
    clock.now += 0.5
    assert limit.try_acquire("k") == 0.0  # a token has come back
    with pytest.raises(Postpone, match=r"api\[k\]") as info:
        limit.acquire("k")
    assert info.value.delay > 0


def test_rate_limit_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        RateLimit(rate=0)
    with pytest.raises(ValueError):
        RateLimit(rate=1, burst=0.5)


# -- priority selection -----------------------------------------------------------------------


def test_strict_serves_lower_only_when_higher_drained() -> None:
    selector = PrioritySelector(ConsumerConfig(ordering="strict", strict_wait=1.0))
    drained = {5: False, 4: True, 3: True, 2: True}
    assert selector.pick({5: 2, 1: 3}, drained.__getitem__, 0.0) == 5
    assert selector.pick({1: 3}, drained.__getitem__, 0.0) is None  # p5 may have more
    assert selector.pick({1: 3}, drained.__getitem__, 0.5) is None
    assert selector.pick({1: 3}, drained.__getitem__, 1.0) == 1  # waited strict_wait
    drained[5] = True
    assert selector.pick({1: 3}, drained.__getitem__, 1.1) == 1
    assert selector.pick({}, drained.__getitem__, 1.2) is None


def test_weighted_gives_each_share_under_a_flood() -> None:
    selector = PrioritySelector(ConsumerConfig(ordering="weighted", shares={1: 0.25, 3: 0.1}))
    picks = [selector.pick({5: 100, 3: 100, 1: 100}, lambda p: False, 0.0) for _ in range(100)]
    # Each share is met to within one event (two priorities owed at once take turns).
    assert 24 <= picks.count(1) <= 25
    assert 9 <= picks.count(3) <= 10
    assert picks.count(5) == 100 - picks.count(1) - picks.count(3)
    assert picks[:3] == [5, 5, 5]  # higher first


def test_weighted_does_not_bank_credit_while_idle() -> None:
    selector = PrioritySelector(ConsumerConfig(ordering="weighted", shares={1: 0.5}))
    for _ in range(10):
        assert selector.pick({5: 1}, lambda p: True, 0.0) == 5
    assert [selector.pick({5: 9, 1: 9}, lambda p: True, 0.0) for _ in range(4)] == [5, 1, 5, 1]


# -- dead letters -----------------------------------------------------------------------------


def _event(**changes: Any) -> DeliveredEvent:
    client = InMemoryDeferClient()
    client.defer(
        "ev", {"x": 1}, delay=0, priority=4, key="k", defer_id="d1", headers={"trace": "t"}
    )
    (event,) = client.release_due()
    return event


def test_dead_letter_round_trip_and_redrive_request() -> None:
    from ensync_kafka.codec import DEAD

    event = _event()
    history = (Attempt(attempt=1, at=event.delivered_at, reason="E: boom"),)
    record = dead_record(
        event, error="E: boom", traceback="tb", history=history, dead_at_ms=1, group="g"
    )
    letter = DeadLetter.from_record(DEAD.decode(DEAD.encode(record)), partition=0, offset=7)
    assert letter.history == history and letter.json() == {"x": 1}
    request = redrive_request(letter, delay=2.0)
    assert request.defer_id == "d1:r"
    assert (request.attempt, request.history, request.priority) == (1, (), 4)
    assert request.key == b"k"
    assert (CHAIN_HEADER, b"d1:r") in request.headers
    assert ("trace", b"t") in request.headers


# -- defer-file lines ---------------------------------------------------------------------------


def test_defer_file_line_parsing() -> None:
    req = _request('{"name": "a", "delay": "5s", "priority": 3, "defer_id": "x"}', "default")
    assert (req.name, req.delay, req.priority, req.defer_id) == ("a", 5.0, 3, "x")
    assert _request('{"name": "a", "at": "2030-01-01T00:00:00+00:00"}', "q").queue == "q"
    for line, message in [
        ("{nope", "not JSON"),
        ("[1]", "JSON object"),
        ('{"delay": 1}', "name: required"),
        ('{"name": "a", "dealy": 1}', "unknown key"),
        ('{"name": "a", "delay": "soon"}', "delay:"),
        ('{"name": "a", "at": "tomorrow"}', "at:"),
    ]:
        with pytest.raises(ValueError, match=message):
            _request(line, "default")


def test_defer_file_sends_the_valid_requests_of_a_batch() -> None:
    client = InMemoryDeferClient()
    batch = [
        (n, DeferRequest(name="e", payload=n, delay=0 if n != 3 else -1, priority=p))
        for n, p in [(1, 1), (2, 9), (3, 1), (4, 5), (5, 2)]
    ]
    rejected: list[tuple[int, str]] = []
    assert _send(client, batch, rejected) == 3
    assert sorted(n for n, _ in rejected) == [2, 3]
    assert all(not reason.startswith("request") for _, reason in rejected)
    assert len(client.pending) == 3


# -- load_callable ------------------------------------------------------------------------------


@pytest.fixture
def fake_module() -> Iterator[types.ModuleType]:
    module = types.ModuleType("ensync_fake_alerts")
    module.__dict__.update(page=lambda letter: json.dumps(letter), NOT_CALLABLE=3)
    sys.modules[module.__name__] = module
    yield module
    del sys.modules[module.__name__]


def test_load_callable(fake_module: types.ModuleType) -> None:
    assert load_callable("ensync_fake_alerts:page") is fake_module.page
    for spec in ("ensync_fake_alerts", "ensync_fake_alerts:missing", "no_such_mod_x:f"):
        with pytest.raises(ConfigError):
            load_callable(spec)
    with pytest.raises(ConfigError, match="not callable"):
        load_callable("ensync_fake_alerts:NOT_CALLABLE")


# -- PriorityConsumer construction (no broker contacted) ------------------------------------------


def test_priority_consumer_checks_before_connecting(fake_module: types.ModuleType) -> None:
    config = build()
    with pytest.raises(ConfigError, match="unknown queue 'nope'"):
        PriorityConsumer(config, queue="nope")
    consumer = PriorityConsumer(config)
    assert consumer.group == "ensync.consumer.default"
    assert consumer.topics == [f"ensync.default.p{p}" for p in (5, 4, 3, 2, 1)]
    with pytest.raises(ConfigError, match="no handler"):
        consumer.run(install_signal_handlers=False)
    with pytest.raises(ConfigError, match="cannot import"):
        PriorityConsumer(build({"alert": "ensync_fake_alerts:missing"}))
    assert PriorityConsumer(build({"alert": "ensync_fake_alerts:page"}))._alert is fake_module.page

    @consumer.handler
    def handle(event: DeliveredEvent) -> None:
        pass

    assert consumer._handler is handle
