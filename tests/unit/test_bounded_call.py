"""_kafka.bounded: a librdkafka call that overruns its own timeout (librdkafka #3779) is
abandoned in its thread, and its client closed only once it returns; _kafka.retrying repeats a
transactional call that fails retriably, unless its client is stranded."""

from __future__ import annotations

import threading
import time

import pytest
from confluent_kafka import KafkaError, KafkaException

from ensync_kafka import _kafka
from ensync_kafka._kafka import (
    STRANDED,
    BoundedCall,
    CallAbandoned,
    TimedAttempts,
    bounded,
    retrying,
)


def test_a_call_that_returns_in_time_returns_and_nothing_is_abandoned() -> None:
    ran, abandoned = threading.Event(), threading.Event()
    bounded(ran.set, 1.0, "quick", abandon=abandoned.set)
    assert ran.is_set()
    assert not abandoned.is_set()


def test_its_error_is_raised_in_the_caller() -> None:
    def fail() -> None:
        raise KafkaException(KafkaError(KafkaError._FENCED, "fenced"))

    with pytest.raises(KafkaException) as info:
        bounded(fail, 1.0, "fenced", abandon=lambda: None)
    assert info.value.args[0].code() == KafkaError._FENCED
    assert not isinstance(info.value, CallAbandoned)


def test_an_overrun_is_abandoned_and_its_client_closed_only_after_it_returns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_kafka, "OVERRUN_GRACE_S", 0.05)
    release, abandoned = threading.Event(), threading.Event()
    with pytest.raises(CallAbandoned) as info:
        bounded(lambda: release.wait(10), 0.05, "stuck", abandon=abandoned.set)
    assert info.value.args[0].code() == KafkaError._TIMED_OUT
    assert not abandoned.is_set(), "closed while the call is still inside librdkafka"
    release.set()
    assert abandoned.wait(5), "closed once the call returned"


def test_the_deadline_runs_from_the_start_while_the_caller_works_beside_the_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_kafka, "OVERRUN_GRACE_S", 0.05)
    release, abandoned = threading.Event(), threading.Event()
    call = BoundedCall(lambda: release.wait(10), 0.05, "beside", abandon=abandoned.set)
    time.sleep(0.3)  # the caller's own work (the worker's flush) outlasts the limit
    started = time.monotonic()
    with pytest.raises(CallAbandoned):
        call.result()
    assert time.monotonic() - started < 0.05, "result() waited again after the deadline"
    release.set()
    assert abandoned.wait(5)


def test_a_call_is_given_up_once_its_client_is_stranded_served_meanwhile() -> None:
    release, abandoned = threading.Event(), threading.Event()
    served: list[float] = []
    stranded = threading.Event()
    threading.Timer(0.3, stranded.set).start()  # what the client's statistics would tell
    call = BoundedCall(
        lambda: release.wait(30),
        30.0,
        "stranded",
        abandon=abandoned.set,
        give_up=lambda: STRANDED if stranded.is_set() else None,
        serve=lambda: served.append(time.monotonic()),
    )
    started = time.monotonic()
    with pytest.raises(CallAbandoned) as info:
        call.result()
    assert time.monotonic() - started < 5, "waited out the bound instead of giving up"
    assert "knows no broker" in info.value.args[0].str()
    assert len(served) >= 2, "the client was not served while the call blocked"
    release.set()
    assert abandoned.wait(5), "closed once the call returned"


def test_a_watched_call_that_returns_is_not_given_up() -> None:
    call = BoundedCall(
        lambda: time.sleep(0.2), 30.0, "watched", abandon=lambda: None, give_up=lambda: None
    )
    call.result()  # returns, and raises nothing

    def fenced() -> None:
        raise KafkaException(KafkaError(KafkaError._FENCED))

    failing = BoundedCall(fenced, 30.0, "watched", abandon=lambda: None, give_up=lambda: None)
    with pytest.raises(KafkaException) as info:
        failing.result()
    assert info.value.args[0].code() == KafkaError._FENCED


def _timed_out() -> KafkaException:
    err = KafkaError(KafkaError._TIMED_OUT, "retry call to resume", retriable=True)
    return KafkaException(err)


def test_retrying_repeats_a_retriable_error_until_the_call_succeeds() -> None:
    outcomes: list[KafkaException | None] = [_timed_out(), _timed_out(), None]

    def call() -> None:
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    retrying(call, attempts=3)
    assert outcomes == []


def test_retrying_stops_at_once_on_an_abortable_error_and_after_the_last_attempt() -> None:
    calls: list[int] = []

    def abortable() -> None:
        calls.append(1)
        raise KafkaException(KafkaError(KafkaError._STATE, "abort", txn_requires_abort=True))

    with pytest.raises(KafkaException):
        retrying(abortable, attempts=3)
    assert len(calls) == 1

    def timing_out() -> None:
        calls.append(2)
        raise _timed_out()

    with pytest.raises(KafkaException):
        retrying(timing_out, attempts=3)
    assert calls.count(2) == 3


def test_retrying_serves_the_client_before_asking_whether_to_give_up() -> None:
    """The statistics that make a client stranded arrive only when it is served: a blocked
    commit serves nothing, so without serving first every attempt would time out."""
    stranded, calls = [False], []

    def timing_out() -> None:
        calls.append(1)
        raise _timed_out()

    with pytest.raises(KafkaException):
        retrying(
            timing_out,
            attempts=3,
            give_up=lambda: stranded[0],
            serve=lambda: stranded.__setitem__(0, True),
        )
    assert len(calls) == 1


def test_an_attempt_that_overruns_its_own_timeout_is_given_up_before_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """send_offsets_to_transaction can ignore its timeout (librdkafka #5456): the attempt under
    way is given up once it has outlasted its timeout by the grace, not at the bound of all
    attempts, which a tier would otherwise stand still for."""
    monkeypatch.setattr(_kafka, "OVERRUN_GRACE_S", 0.2)
    release, timeouts = threading.Event(), []

    def send(timeout: float) -> None:
        timeouts.append(timeout)
        if len(timeouts) == 1:  # the first attempt answers in time, retriably
            raise _timed_out()
        release.wait(30)  # the second never answers

    attempts = TimedAttempts(send, 0.3)
    call = BoundedCall(
        lambda: retrying(attempts), 30.0, "overrun", abandon=lambda: None, give_up=attempts.overrun
    )
    started = time.monotonic()
    with pytest.raises(CallAbandoned) as info:
        call.result()
    assert time.monotonic() - started < 5, "waited out the bound instead of giving up"
    assert timeouts == [0.3, 0.3]
    assert "an attempt had no answer" in info.value.args[0].str()
    release.set()
