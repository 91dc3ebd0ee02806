"""Worker.run's stop: a failed tier stops the others, and a tier stuck in a client call is
abandoned after the grace instead of keeping the process alive (and useless) for good."""

from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass, field

import pytest
from confluent_kafka import KafkaError

from ensync_kafka import BrokerError, Worker
from ensync_kafka.config import config_from_mapping

GRACE_S = 0.5


@dataclass
class _Tier:
    name: str


@dataclass
class _StandIn:
    """What Worker.run uses of a TierWorker: ``tier.name`` and ``run()``."""

    tier: _Tier
    behaviour: str
    stop: threading.Event
    release: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        if self.behaviour == "fail":
            raise BrokerError("tier 1s: abort failed")
        if self.behaviour == "non-exception":  # what confluent-kafka can raise: no except catches
            set_error = ctypes.pythonapi.PyErr_SetObject
            set_error.argtypes = [ctypes.py_object, ctypes.py_object]
            set_error(KafkaError, KafkaError(KafkaError._TIMED_OUT, "committed offsets"))
        if self.behaviour == "wedged":  # ignores the stop, like a thread inside librdkafka
            self.release.wait(30)
            return
        self.stop.wait(30)


def _worker(*behaviours: str) -> Worker:
    config = config_from_mapping(
        {"kafka": {"bootstrap_servers": "127.0.0.1:9"}, "monitor": {"port": 0}}, environ={}
    )
    worker = Worker(config, ["1s"], stop_grace=GRACE_S)
    worker.tiers = [  # type: ignore[list-item]
        _StandIn(_Tier(f"t{i}"), b, worker.stop_event) for i, b in enumerate(behaviours)
    ]
    return worker


def test_a_failed_tier_stops_the_others_and_its_error_is_raised() -> None:
    worker = _worker("fail", "polite")
    with pytest.raises(BrokerError, match="abort failed"):
        worker.run(install_signal_handlers=False)
    assert worker.stop_event.is_set()


def test_a_tier_ended_by_what_no_except_catches_stops_the_others_and_fails_the_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    escaped: list[type] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_type))
    worker = _worker("non-exception", "polite")
    with pytest.raises(BrokerError, match="tier t0: ended by a non-exception"):
        worker.run(install_signal_handlers=False)
    assert worker.stop_event.is_set()
    assert escaped == [KafkaError]


def test_a_wedged_tier_is_abandoned_after_the_grace() -> None:
    worker = _worker("fail", "wedged")
    began = time.monotonic()
    with pytest.raises(BrokerError, match="abort failed"):
        worker.run(install_signal_handlers=False)
    assert GRACE_S <= time.monotonic() - began < GRACE_S + 5
    worker.tiers[1].release.set()  # type: ignore[attr-defined]


def test_a_stop_that_a_tier_ignores_raises_naming_it() -> None:
    worker = _worker("polite", "wedged")
    threading.Timer(0.1, worker.stop).start()
    with pytest.raises(BrokerError, match=r"tier-t1 did not stop within"):
        worker.run(install_signal_handlers=False)
    worker.tiers[1].release.set()  # type: ignore[attr-defined]


def test_a_clean_stop_returns() -> None:
    worker = _worker("polite", "polite")
    threading.Timer(0.1, worker.stop).start()
    worker.run(install_signal_handlers=False)
    assert worker.errors == []
