"""Fixtures for the end-to-end tests that disturb the broker itself."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ensync_kafka.localbroker import LocalBroker


@pytest.fixture
def own_broker() -> Iterator[LocalBroker]:
    """A broker of this test's own, to restart or freeze: the session's broker is shared (and may
    not be ours to disturb). Needs Java like any local broker, whatever ENSYNC_KAFKA_BOOTSTRAP
    says."""
    broker = LocalBroker.ephemeral()
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()
