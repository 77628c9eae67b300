"""Unit behaviour of the resilience policies, with Envoy's numbers cited."""

from __future__ import annotations

import random

import pytest

from meshcore._route_model import RetryPolicy
from meshcore.resilience.fault import decide_fault
from meshcore.resilience.outlier import OutlierDetector
from meshcore.resilience.retry import CONNECT_FAILURE, RESET, TIMEOUT, RetryState
from meshcore.xds.model import FaultSpec, OutlierDetectionSpec


# -- retries ------------------------------------------------------------------------------------


@pytest.mark.parametrize("retry_on,outcome,expected", [
    ("5xx", {"status": 503}, True),
    ("5xx", {"status": 500}, True),
    ("5xx", {"status": 404}, False),
    ("5xx", {"error": CONNECT_FAILURE}, True),  # Envoy: 5xx includes connect-failure and resets
    ("5xx", {"error": RESET}, True),
    ("5xx", {"error": TIMEOUT}, True),  # per-try timeout -> 504
    ("gateway-error", {"status": 502}, True),
    ("gateway-error", {"status": 500}, False),
    ("gateway-error", {"error": TIMEOUT}, True),
    ("reset", {"status": 503}, False),
    ("reset", {"error": RESET}, True),
    ("connect-failure", {"error": CONNECT_FAILURE}, True),
    ("connect-failure", {"error": RESET}, False),
    ("retriable-4xx", {"status": 409}, True),
    ("retriable-4xx", {"status": 404}, False),
    ("unavailable", {"grpc_status": 14}, True),
    ("unavailable", {"grpc_status": 13}, False),
    ("cancelled,deadline-exceeded,internal,resource-exhausted", {"grpc_status": 8}, True),
    ("", {"status": 503}, False),
])
def test_retry_on_classes(retry_on, outcome, expected):
    # Envoy docs, router filter "x-envoy-retry-on" / "x-envoy-retry-grpc-on".
    state = RetryState(RetryPolicy(retry_on=(retry_on,), num_retries=2))
    assert state.retriable(**outcome) is expected


def test_retriable_status_codes():
    state = RetryState(RetryPolicy(retry_on=("retriable-status-codes",), retriable_status_codes=(418,)))
    assert state.retriable(status=418) and not state.retriable(status=503)


def test_no_policy_never_retries():
    state = RetryState(None)
    assert not state.retriable(status=503) and not state.can_retry()


def test_backoff_is_envoys_jittered_exponential():
    # source/common/common/backoff_strategy.cc (JitteredExponentialBackOffStrategy): the n-th
    # back-off is random() % ((2^n - 1) * base), capped at max (default 10 x base = 250 ms).
    windows = [25, 75, 175, 250, 250, 250]  # the 4th window (375 ms) is past the cap: capped, stops growing
    for seed in range(50):
        state = RetryState(RetryPolicy(retry_on=("5xx",), num_retries=10, base_interval=0.025), random.Random(seed))
        for window in windows:
            ms = state.next_backoff() * 1000
            assert 0 <= ms < window if window < 250 else 0 <= ms <= 250
    # distribution of the first back-off is uniform over [0, 25) ms
    firsts = [RetryState(RetryPolicy(retry_on=("5xx",)), random.Random(i)).next_backoff() * 1000 for i in range(2000)]
    assert max(firsts) < 25 and 10 < sum(firsts) / len(firsts) < 14.5
    assert state.retries == len(windows)


def test_retry_budget_counts():
    state = RetryState(RetryPolicy(retry_on=("5xx",), num_retries=2))
    assert state.can_retry()
    state.next_backoff()
    state.next_backoff()
    assert not state.can_retry()


# -- outlier detection ----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def detector(**kw):
    clock = Clock()
    events = []
    spec = OutlierDetectionSpec(**kw)
    d = OutlierDetector(spec, lambda key, ej: events.append((key, ej)), random.Random(0), clock)
    return d, clock, events


def test_consecutive_5xx_ejects_and_returns_after_base_time():
    d, clock, events = detector(consecutive_5xx=3, interval=1.0, base_ejection_time=5.0, max_ejection_percent=100)
    d.sync_hosts(["a", "b", "c"])
    for _ in range(2):
        d.record("a", 503)
    d.record("a", 200)  # a success resets the run
    for _ in range(2):
        d.record("a", 500)
    assert events == []
    d.record("a", 500)
    assert events == [("a", True)] and d.is_ejected("a")
    clock.now += 4.5
    d.tick()
    assert d.is_ejected("a")
    clock.now += 1.0  # 5.5 s > base_ejection_time x 1
    d.tick()
    assert events[-1] == ("a", False) and not d.is_ejected("a")
    # a second ejection lasts twice as long (base x number of ejections)
    for _ in range(3):
        d.record("a", 503)
    assert d.is_ejected("a")
    clock.now += 6.0
    d.tick()
    assert d.is_ejected("a")
    clock.now += 5.0
    d.tick()
    assert not d.is_ejected("a")


def test_local_origin_failures_count_as_5xx_unless_split():
    d, _, events = detector(consecutive_5xx=2, max_ejection_percent=100)
    d.sync_hosts(["a", "b"])
    d.record("a", None, local_failure=True)
    d.record("a", None, local_failure=True)
    assert events == [("a", True)]
    d2, _, events2 = detector(consecutive_5xx=2, split_external_local_origin_errors=True, max_ejection_percent=100)
    d2.record("a", None, local_failure=True)
    d2.record("a", None, local_failure=True)
    assert events2 == []


def test_max_ejection_percent_but_at_least_one_host():
    # Envoy docs (OutlierDetection.max_ejection_percent): "Defaults to 10% but will eject at
    # least one host regardless of the value."
    d, _, events = detector(consecutive_5xx=1)  # default max_ejection_percent 10
    d.sync_hosts(["a", "b", "c"])
    d.record("a", 503)
    d.record("b", 503)
    assert events == [("a", True)]
    assert d.counters["ejections_overflow"] == 1


def test_gateway_failures_enforcement_defaults_to_zero():
    d, _, events = detector(consecutive_5xx=0, consecutive_gateway_failure=2)
    d.sync_hosts(["a", "b"])
    for _ in range(4):
        d.record("a", 502)
    assert events == [] and d.counters["ejections_detected_consecutive_gateway_failure"] == 2
    d, _, events = detector(consecutive_5xx=0, consecutive_gateway_failure=2, enforcing_consecutive_gateway_failure=100,
                            max_ejection_percent=100)
    d.record("a", 502)
    d.record("a", 504)
    assert events == [("a", True)]


def test_success_rate_ejection():
    d, clock, events = detector(consecutive_5xx=0, interval=10.0, success_rate_minimum_hosts=5,
                                success_rate_request_volume=10, max_ejection_percent=100)
    hosts = [f"h{i}" for i in range(6)]
    d.sync_hosts(hosts)
    for h in hosts:
        for i in range(20):
            d.record(h, 500 if (h == "h5" and i % 2 == 0) else 200)  # h5: 50 % success, others 100 %
    clock.now += 10.5
    d.tick()
    # mean = (5*100 + 50)/6 = 91.7, stdev = 18.6, threshold = 91.7 - 1.9*18.6 = 56.3 -> h5 out
    assert events == [("h5", True)]
    assert d.counters["ejections_enforced_success_rate"] == 1


def test_failure_percentage_ejection():
    d, clock, events = detector(consecutive_5xx=0, interval=1.0, enforcing_failure_percentage=100,
                                failure_percentage_minimum_hosts=2, failure_percentage_request_volume=10,
                                failure_percentage_threshold=50, enforcing_success_rate=0, max_ejection_percent=100)
    d.sync_hosts(["a", "b"])
    for i in range(10):
        d.record("a", 503 if i < 6 else 200)
        d.record("b", 200)
    clock.now += 1.5
    d.tick()
    assert events == [("a", True)]


# -- fault injection ----------------------------------------------------------------------------------------


def test_fault_percentages_and_headers():
    spec = FaultSpec(delay_per_million=500_000, fixed_delay=0.01, abort_per_million=250_000, abort_http_status=503)
    rng = random.Random(3)
    decisions = [decide_fault(spec, {}, rng) for _ in range(4000)]
    delayed = sum(1 for d in decisions if d.delay) / len(decisions)
    aborted = sum(1 for d in decisions if d.abort_http_status == 503) / len(decisions)
    assert 0.46 < delayed < 0.54 and 0.22 < aborted < 0.28
    hdr = FaultSpec(abort_per_million=1_000_000, header_abort=True, delay_per_million=1_000_000, header_delay=True)
    d = decide_fault(hdr, {"x-envoy-fault-abort-request": "429", "x-envoy-fault-delay-request": "20"}, rng)
    assert d.abort_http_status == 429 and d.delay == 0.02
    scoped = FaultSpec(abort_per_million=1_000_000, abort_http_status=500, upstream_cluster="other")
    assert not decide_fault(scoped, {}, rng, "mine").aborts
