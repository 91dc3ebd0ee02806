"""BrokerWatch reads librdkafka statistics: the shapes below are those of real clients (a
consumer before and after a fenced single broker answered a Metadata request with no brokers,
librdkafka #5301), trimmed to the fields the watch reads and a few for recognition."""

from __future__ import annotations

import json
import logging

import pytest
from confluent_kafka import KafkaError, Producer

from ensync_kafka import BrokerError, DeferClient, DeferRequest
from ensync_kafka._kafka import BROKER_WATCH_INTERVAL_MS, STRANDED_REPORTS, BrokerWatch
from ensync_kafka.config import config_from_mapping


def stats(*brokers: tuple[str, int, str, str]) -> str:
    return json.dumps(
        {
            "name": "rdkafka#consumer-6",
            "type": "consumer",
            "brokers": {
                name: {"name": name, "nodeid": node, "source": source, "state": state}
                for name, node, source, state in brokers
            },
        }
    )


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
