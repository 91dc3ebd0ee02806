"""BrokerWatch reads librdkafka statistics: the shapes below are those of real clients (a
consumer before and after a fenced single broker answered a Metadata request with no brokers,
librdkafka #5301), trimmed to the fields the watch reads and a few for recognition; the group
(``cgrp``) and clock (``ts``, microseconds) fields as librdkafka's STATISTICS.md defines them."""

from __future__ import annotations

import json
import logging

import pytest
from confluent_kafka import KafkaError, Producer

from ensync_kafka import BrokerError, DeferClient, DeferRequest
from ensync_kafka._kafka import (
    BROKER_WATCH_INTERVAL_MS,
    GROUP_REJOIN_MIN_S,
    GROUP_REJOIN_SESSIONS,
    STRANDED_REPORTS,
    BrokerWatch,
)
from ensync_kafka.config import config_from_mapping

Broker = tuple[str, int, str, str]
"""A broker's name, node id, source and state in a report."""


def stats(*brokers: Broker, group: tuple[str, str] | None = None, at_s: float = 0) -> str:
    report: dict[str, object] = {
        "name": "rdkafka#consumer-6",
        "type": "consumer",
        "ts": int(at_s * 1e6),
        "brokers": {
            name: {"name": name, "nodeid": node, "source": source, "state": state}
            for name, node, source, state in brokers
        },
    }
    if group is not None:
        state, join_state = group
        report["cgrp"] = {"state": state, "stateage": 0, "join_state": join_state}
    return json.dumps(report)


COORDINATOR = ("GroupCoordinator", -1, "logical", "UP")
HEALTHY = stats(("127.0.0.1:39621/1", 1, "learned", "UP"), COORDINATOR)
BROKER_DOWN = stats(("127.0.0.1:39621/1", 1, "learned", "DOWN"), COORDINATOR)
BOOTSTRAPPING = stats(("127.0.0.1:39621/bootstrap", -1, "configured", "CONNECT"))
STRANDED = stats(("GroupCoordinator", -1, "logical", "TRY_CONNECT"))


def test_a_client_that_knows_a_broker_is_not_stranded_even_while_it_is_down() -> None:
    watch = BrokerWatch("c")
    for report in (HEALTHY, BROKER_DOWN, BOOTSTRAPPING) * STRANDED_REPORTS:
        watch.report(report)
    assert not watch.stranded


def test_only_logical_brokers_in_consecutive_reports_make_it_stranded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    watch = BrokerWatch("tier 1s: consumer")
    for _ in range(STRANDED_REPORTS - 1):
        watch.report(STRANDED)
    watch.report(HEALTHY)  # a report with a broker starts the count again
    for _ in range(STRANDED_REPORTS - 1):
        watch.report(STRANDED)
    assert not watch.stranded
    with caplog.at_level(logging.WARNING, logger="ensync_kafka.kafka"):
        watch.report(STRANDED)
    assert watch.stranded
    assert "tier 1s: consumer" in caplog.text and "#5301" in caplog.text
    watch.report(HEALTHY)
    assert watch.stranded, "librdkafka never finds its brokers again: its owner replaces it"


def test_settings_ask_for_statistics_and_keep_a_given_callback() -> None:
    watch = BrokerWatch("c")
    settings = watch.settings({"bootstrap.servers": "b:9092"})
    assert settings == {
        "statistics.interval.ms": BROKER_WATCH_INTERVAL_MS,
        "stats_cb": watch.report,
    }
    theirs: list[str] = []
    settings = watch.settings({"statistics.interval.ms": 1000, "stats_cb": theirs.append})
    assert settings["statistics.interval.ms"] == 1000
    for _ in range(STRANDED_REPORTS):
        settings["stats_cb"](STRANDED)
    assert watch.stranded and theirs == [STRANDED] * STRANDED_REPORTS


LEARNED_UP = ("127.0.0.1:39621/1", 1, "learned", "UP")
LEARNED_DOWN = ("127.0.0.1:39621/1", 1, "learned", "DOWN")
SESSION_S = 20.0
LIMIT_S = max(GROUP_REJOIN_MIN_S, GROUP_REJOIN_SESSIONS * SESSION_S)


def group_reports(watch: BrokerWatch, *steps: tuple[float, tuple[str, str], Broker]) -> None:
    for at_s, group, broker in steps:
        watch.report(stats(broker, COORDINATOR, group=group, at_s=at_s))


def test_a_group_that_waits_on_its_coordinator_for_two_sessions_makes_it_stranded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After a broker stall: the group looking for its coordinator for good, whatever its
    brokers' states say. Timed by librdkafka's clock in the reports, which may be served late."""
    watch = BrokerWatch("consumer group g", group_session_s=SESSION_S)
    looking = ("query-coord", "init")
    group_reports(
        watch,
        (100.0, looking, LEARNED_UP),
        (110.0, ("up", "wait-join"), LEARNED_DOWN),
        (100 + LIMIT_S - 1, looking, LEARNED_DOWN),
    )
    assert not watch.stranded
    with caplog.at_level(logging.WARNING, logger="ensync_kafka.kafka"):
        group_reports(watch, (100 + LIMIT_S, looking, LEARNED_DOWN))
    assert watch.stranded
    assert watch.brokers == {"127.0.0.1:39621/1": "DOWN", "GroupCoordinator": "UP"}
    assert "consumer group g" in caplog.text and "query-coord" in caplog.text
    assert "'127.0.0.1:39621/1': 'DOWN'" in caplog.text


@pytest.mark.parametrize(
    "between",
    [
        pytest.param(("up", "steady"), id="steady"),
        pytest.param(("up", "wait-assign-call"), id="our-assign-callback"),
        pytest.param(("up", "wait-unassign-call"), id="our-revoke-callback"),
    ],
)
def test_the_wait_starts_again_when_the_group_is_up_or_in_our_callback(
    between: tuple[str, str],
) -> None:
    """A tier's restore in its assign callback can take minutes: that is our wait, not the
    coordinator's."""
    watch = BrokerWatch("c", group_session_s=SESSION_S)
    joining = ("up", "wait-sync")
    group_reports(
        watch,
        (0.0, joining, LEARNED_UP),
        (LIMIT_S - 1, between, LEARNED_UP),
        (LIMIT_S, joining, LEARNED_UP),
        (2 * LIMIT_S - 1, joining, LEARNED_UP),
    )
    assert not watch.stranded


def test_a_consumer_not_subscribed_yet_or_to_topics_that_do_not_exist_is_not_stranded() -> None:
    """The shapes a real consumer reported on a real broker: created, then polled only after a
    while (its reports queued meanwhile: a worker subscribes after init_transactions), then
    subscribed to a topic that did not exist. It waits for the topic, not for its coordinator,
    and joins once the topic is created."""
    watch = BrokerWatch("c", group_session_s=SESSION_S)
    group_reports(
        watch,
        (0.0, ("query-coord", "init"), LEARNED_UP),
        (1.0, ("wait-coord", "init"), LEARNED_UP),
        *((at_s, ("up", "init"), LEARNED_UP) for at_s in range(2, 3 * int(LIMIT_S))),
        (3 * LIMIT_S, ("up", "wait-metadata"), LEARNED_UP),
        (4 * LIMIT_S, ("up", "init"), LEARNED_UP),
    )
    assert not watch.stranded


def test_the_group_is_watched_only_when_asked_and_at_least_the_minimum() -> None:
    unwatched = BrokerWatch("producer")
    short = BrokerWatch("c", group_session_s=1.0)
    joining = ("up", "wait-join")
    for watch in (unwatched, short):
        group_reports(
            watch, (0.0, joining, LEARNED_UP), (GROUP_REJOIN_MIN_S - 1, joining, LEARNED_UP)
        )
    assert not short.stranded
    group_reports(short, (GROUP_REJOIN_MIN_S, joining, LEARNED_UP))
    group_reports(unwatched, (10 * GROUP_REJOIN_MIN_S, joining, LEARNED_UP))
    assert short.stranded and not unwatched.stranded


def test_a_defer_client_replaces_a_producer_whose_sends_time_out() -> None:
    """Nothing listens on the address: the send times out, the call raises, and the next call
    goes out on a new producer (a stranded one would never send again)."""
    config = config_from_mapping({"kafka": {"bootstrap_servers": "127.0.0.1:9"}}, environ={})
    client = DeferClient(config, producer_settings={"message.timeout.ms": "300"})
    first = client._producer
    with pytest.raises(BrokerError) as raised:
        client.defer_many([DeferRequest(name="n", payload=1, delay=1)])
    assert raised.value.code == KafkaError._MSG_TIMED_OUT
    assert client._producer is not first
    assert isinstance(client._producer, Producer)


def test_a_send_on_a_producer_replaced_meanwhile_raises_a_broker_error() -> None:
    """Another thread's timed-out send replaced (and closed) the producer this call had taken."""
    config = config_from_mapping({"kafka": {"bootstrap_servers": "127.0.0.1:9"}}, environ={})
    client = DeferClient(config)
    client._producer.close()
    with pytest.raises(BrokerError, match="producer was replaced"):
        client.defer("n", 1, delay=1)
