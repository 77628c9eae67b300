"""Unit behaviour of the resilience policies, with Envoy's numbers cited."""

from __future__ import annotations

import random
import threading

import pytest

from meshcore._route_model import RetryPolicy
from meshcore.resilience.fault import NO_FAULT, ActiveFaults, FaultDecision, decide_fault, limit_faults
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


class _Draw:
    """An rng whose every ``randrange(1_000_000)`` is ``value``: the fault fires iff value < percentage."""

    def __init__(self, value: int) -> None:
        self.value = value

    def randrange(self, n: int) -> int:
        assert n == 1_000_000
        return self.value


def _fires(spec, headers, per_million):
    """The effective percentage is exactly ``per_million``: the draw just below fires, the draw at it does not."""
    at = decide_fault(spec, headers, _Draw(per_million))
    if not per_million:  # 0%: not even the lowest draw fires
        return at == NO_FAULT
    return decide_fault(spec, headers, _Draw(per_million - 1)) != NO_FAULT and at == NO_FAULT


# Envoy test/extensions/filters/common/fault/fault_config_test.cc, FaultAbortPercentageHeaderConfig and
# FaultDelayPercentageHeaderConfig: configured numerator 80; header "abc" or "-1" -> the configured 80;
# "90" -> capped at 80; "60" -> 60; the denominator is always the configured one
# (source/extensions/filters/common/fault/fault_config.cc HeaderPercentageProvider::percentage).
@pytest.mark.parametrize("value, numerator", [
    (None, 80), ("abc", 80), ("-1", 80), ("", 80), ("0x10", 80), ("1.5", 80), ("4294967296", 80),  # > uint32: invalid
    ("90", 80), ("4294967295", 80), ("60", 60), (" 60\t", 60), ("+60", 60), ("0", 0),  # absl::SimpleAtoi
])
@pytest.mark.parametrize("denominator", [100, 10_000, 1_000_000])
def test_fault_percentage_headers_capped_by_the_configured_percentage(value, numerator, denominator):
    unit = 1_000_000 // denominator
    delay = FaultSpec(delay_per_million=80 * unit, delay_percent_denominator=denominator, header_delay=True)
    abort = FaultSpec(abort_per_million=80 * unit, abort_percent_denominator=denominator, header_abort=True)
    dh = {"x-envoy-fault-delay-request": "100"}
    ah = {"x-envoy-fault-abort-request": "503"}
    if value is not None:
        dh["x-envoy-fault-delay-request-percentage"] = value
        ah["x-envoy-fault-abort-request-percentage"] = value
    assert _fires(delay, dh, numerator * unit)
    assert _fires(abort, ah, numerator * unit)


def test_fault_percentage_header_above_100_percent():
    # configured 250/HUNDRED is always on; a header numerator of 150 (min(150, 250) >= 100) keeps it so
    spec = FaultSpec(abort_per_million=1_000_000, header_abort=True)
    assert decide_fault(spec, {"x-envoy-fault-abort-request": "503", "x-envoy-fault-abort-request-percentage": "150"},
                        _Draw(999_999)).abort_http_status == 503


def test_fault_percentage_headers_only_for_header_controlled_faults():
    # FixedDelayProvider / FixedAbortProvider return the configured percentage whatever the headers say.
    zero = {"x-envoy-fault-delay-request-percentage": "0", "x-envoy-fault-abort-request-percentage": "0"}
    fixed = FaultSpec(delay_per_million=1_000_000, fixed_delay=0.5, abort_per_million=1_000_000, abort_http_status=503)
    assert decide_fault(fixed, zero, _Draw(0)) == FaultDecision(0.5, 503, None)
    grpc = FaultSpec(abort_per_million=1_000_000, abort_grpc_status=14)
    assert decide_fault(grpc, zero, _Draw(0)) == FaultDecision(0.0, None, 14)
    # ... and the delay percentage header does not steer the abort or vice versa
    both = FaultSpec(delay_per_million=1_000_000, header_delay=True, abort_per_million=1_000_000, header_abort=True)
    h = {"x-envoy-fault-delay-request": "20", "x-envoy-fault-abort-request": "429",
         "x-envoy-fault-delay-request-percentage": "0"}
    assert decide_fault(both, h, _Draw(0)) == FaultDecision(0.0, 429, None)


def test_fault_header_config_as_envoys_integration_tests():
    # test/extensions/filters/http/fault/fault_filter_integration_test.cc, header_fault_config_:
    # header_abort and header_delay at numerator 100.
    spec = FaultSpec(abort_per_million=1_000_000, header_abort=True, delay_per_million=1_000_000, header_delay=True)
    rng = random.Random(7)
    # HeaderFaultsConfig0PercentageHeaders: both percentage headers "0" -> no fault
    assert decide_fault(spec, {"x-envoy-fault-abort-request": "429", "x-envoy-fault-abort-request-percentage": "0",
                               "x-envoy-fault-delay-request": "100", "x-envoy-fault-delay-request-percentage": "0"},
                        rng) == NO_FAULT
    # HeaderFaultsConfig100PercentageHeaders: delayed 100 ms
    assert decide_fault(spec, {"x-envoy-fault-delay-request": "100", "x-envoy-fault-delay-request-percentage": "100"},
                        rng) == FaultDecision(0.1, None, None)
    # HeaderFaultAbortGrpcConfig0PercentageHeader: the abort percentage header governs the gRPC abort too
    assert decide_fault(spec, {"x-envoy-fault-abort-grpc-request": "5", "x-envoy-fault-abort-request-percentage": "0"},
                        rng) == NO_FAULT
    # HeaderFaultAbortGrpcConfig: gRPC status 5 (Envoy answers HTTP 200 with grpc-status 5)
    assert decide_fault(spec, {"x-envoy-fault-abort-grpc-request": "5"}, rng) == FaultDecision(0.0, None, 5)
    # HeaderFaultConfigNoHeaders: nothing to inject
    assert decide_fault(spec, {}, rng) == NO_FAULT


def test_fault_percentage_header_statistics():
    # header 25 of a configured 50/HUNDRED: a quarter of the requests
    spec = FaultSpec(abort_per_million=500_000, header_abort=True)
    rng = random.Random(11)
    h = {"x-envoy-fault-abort-request": "503", "x-envoy-fault-abort-request-percentage": "25"}
    rate = sum(decide_fault(spec, h, rng).aborts for _ in range(4000)) / 4000
    assert 0.22 < rate < 0.28


@pytest.mark.parametrize("headers, expected", [
    # fault_config_test.cc FaultAbortHeaderConfig: "abc", "199", "600" -> no HTTP status; "401" -> 401
    ({"x-envoy-fault-abort-request": "abc"}, (None, None)),
    ({"x-envoy-fault-abort-request": "199"}, (None, None)),
    ({"x-envoy-fault-abort-request": "600"}, (None, None)),
    ({"x-envoy-fault-abort-request": "401"}, (401, None)),
    # FaultAbortGrpcHeaderConfig: "abc", "-1" -> none; "5" -> 5; "100" (not a defined code) -> 100
    ({"x-envoy-fault-abort-grpc-request": "abc"}, (None, None)),
    ({"x-envoy-fault-abort-grpc-request": "-1"}, (None, None)),
    ({"x-envoy-fault-abort-grpc-request": "5"}, (None, 5)),
    ({"x-envoy-fault-abort-grpc-request": "100"}, (None, 100)),
    # fault_filter_test.cc HeaderAbortWithHttpAndGrpcStatus: the HTTP status wins, the gRPC one is unused
    ({"x-envoy-fault-abort-request": "429", "x-envoy-fault-abort-grpc-request": "5"}, (429, None)),
    # fault_filter.cc abortStatus: no (valid) HTTP status -> the gRPC header
    ({"x-envoy-fault-abort-request": "600", "x-envoy-fault-abort-grpc-request": "5"}, (None, 5)),
])
def test_fault_abort_headers(headers, expected):
    spec = FaultSpec(abort_per_million=1_000_000, header_abort=True)
    d = decide_fault(spec, headers, _Draw(0))
    assert (d.abort_http_status, d.abort_grpc_status) == expected


@pytest.mark.parametrize("value, delay", [
    # fault_config_test.cc FaultDelayHeaderConfig: "abc" -> none, "123" -> 123 ms;
    # fault_filter.cc delayDuration: only a duration > 0 ms delays
    ("abc", 0.0), ("123", 0.123), ("0", 0.0), ("-5", 0.0), ("+20", 0.02), (" 20 ", 0.02), ("2_0", 0.0),
])
def test_fault_delay_header(value, delay):
    spec = FaultSpec(delay_per_million=1_000_000, header_delay=True)
    assert decide_fault(spec, {"x-envoy-fault-delay-request": value}, _Draw(0)).delay == delay


# -- max_active_faults (source/extensions/filters/http/fault/fault_filter.cc tryIncActiveFaults, faultOverflow,
# postDelayInjection, onDestroy) ------------------------------------------------------------------------------------

DELAY = FaultSpec(delay_per_million=1_000_000, fixed_delay=5.0)
ABORT = FaultSpec(abort_per_million=1_000_000, abort_http_status=429)


def test_active_faults_overflow_injects_nothing():
    # fault_filter_test.cc Overflow: a 100% 5 s delay with max_active_faults 0 -> no fault,
    # active_faults 0, faults_overflow 1.
    active = ActiveFaults()
    spec = FaultSpec(delay_per_million=1_000_000, fixed_delay=5.0, max_active_faults=0)
    assert limit_faults(decide_fault(spec, {}, _Draw(0)), spec, active) == (NO_FAULT, False)
    assert (active.active, active.overflow) == (0, 1)


def test_active_faults_untouched_without_a_fault():
    # fault_filter_test.cc Passthrough: no fault -> the gauge is not incremented (and no overflow is
    # counted: the limit is checked only when a fault is about to be injected).
    active = ActiveFaults()
    spec = FaultSpec(max_active_faults=0)
    assert limit_faults(decide_fault(spec, {}, _Draw(0)), spec, active) == (NO_FAULT, False)
    half = FaultSpec(abort_per_million=500_000, abort_http_status=503, max_active_faults=0)
    assert limit_faults(decide_fault(half, {}, _Draw(500_000)), half, active) == (NO_FAULT, False)
    assert (active.active, active.overflow) == (0, 0)


def test_active_faults_consecutive_delays():
    # fault_filter_test.cc ConsecutiveDelayFaults: max 1; request 1 is delayed (active 1); once its delay
    # elapses with no abort it stops counting (active 0); request 2 is delayed without overflow.
    active = ActiveFaults()
    spec = FaultSpec(delay_per_million=1_000_000, fixed_delay=5.0, max_active_faults=1)
    d1, counted1 = limit_faults(decide_fault(spec, {}, _Draw(0)), spec, active)
    assert d1.delay == 5.0 and counted1 and active.active == 1
    active.finish()  # request 1's delay elapsed, no abort follows
    d2, counted2 = limit_faults(decide_fault(spec, {}, _Draw(0)), spec, active)
    assert d2.delay == 5.0 and counted2 and (active.active, active.overflow) == (1, 0)
    active.finish()
    assert active.active == 0


def test_active_faults_limit_and_release():
    active = ActiveFaults()
    spec = FaultSpec(abort_per_million=1_000_000, abort_http_status=429, max_active_faults=2)
    results = [limit_faults(decide_fault(spec, {}, _Draw(0)), spec, active) for _ in range(3)]
    assert results == [(FaultDecision(0.0, 429, None), True)] * 2 + [(NO_FAULT, False)]
    assert (active.active, active.overflow) == (2, 1)
    active.finish()  # one aborted request ended (onDestroy)
    assert limit_faults(decide_fault(spec, {}, _Draw(0)), spec, active) == (FaultDecision(0.0, 429, None), True)
    assert (active.active, active.overflow) == (2, 1)


def test_active_faults_delay_and_abort_count_once():
    # tryIncActiveFaults: at most one active fault per request; the abort after an injected delay
    # (postDelayInjection) is not checked again.
    active = ActiveFaults()
    spec = FaultSpec(delay_per_million=1_000_000, fixed_delay=0.2, abort_per_million=1_000_000,
                     abort_http_status=503, max_active_faults=1)
    d, counted = limit_faults(decide_fault(spec, {}, _Draw(0)), spec, active)
    assert d == FaultDecision(0.2, 503, None) and counted and (active.active, active.overflow) == (1, 0)


def test_active_faults_delay_overflow_then_abort_checked_again():
    # maybeSetupDelay fails on overflow, then maybeDoAbort calls tryIncActiveFaults again: a second
    # overflow is counted when it fails too ...
    active = ActiveFaults()
    spec = FaultSpec(delay_per_million=1_000_000, fixed_delay=0.2, abort_per_million=1_000_000,
                     abort_http_status=503, max_active_faults=0)
    assert limit_faults(decide_fault(spec, {}, _Draw(0)), spec, active) == (NO_FAULT, False)
    assert (active.active, active.overflow) == (0, 2)

    # ... and the abort alone is injected when the second check passes (another request ended meanwhile).
    class Racy:
        def __init__(self):
            self.answers = [False, True]

        def try_start(self, limit):
            return self.answers.pop(0)

    d, counted = limit_faults(FaultDecision(0.2, 503, None), spec, Racy())
    assert d == FaultDecision(0.0, 503, None) and counted


def test_active_faults_route_override_limit_against_the_filters_gauge():
    # faultOverflow compares the filter config's gauge with the effective (per-route) settings' limit:
    # HTTPFault.max_active_faults docs: "because this setting can be overridden at the route level, it's
    # possible for the number of active faults to be greater than this value".
    active = ActiveFaults()
    listener = FaultSpec(abort_per_million=1_000_000, abort_http_status=503, max_active_faults=1)
    route = FaultSpec(abort_per_million=1_000_000, abort_http_status=503, max_active_faults=3)
    unlimited = FaultSpec(abort_per_million=1_000_000, abort_http_status=503)
    assert limit_faults(decide_fault(listener, {}, _Draw(0)), listener, active)[1]
    assert not limit_faults(decide_fault(listener, {}, _Draw(0)), listener, active)[1]
    assert limit_faults(decide_fault(route, {}, _Draw(0)), route, active)[1]
    assert limit_faults(decide_fault(route, {}, _Draw(0)), route, active)[1]
    assert not limit_faults(decide_fault(route, {}, _Draw(0)), route, active)[1]
    for _ in range(5):
        assert limit_faults(decide_fault(unlimited, {}, _Draw(0)), unlimited, active)[1]
    assert (active.active, active.overflow) == (8, 2)


def test_active_faults_finish_without_start():
    with pytest.raises(RuntimeError):
        ActiveFaults().finish()


def test_active_faults_thread_safe():
    active = ActiveFaults()
    peak = []
    started = []

    def worker():
        n = 0
        for _ in range(300):
            if active.try_start(4):
                peak.append(active.active)
                active.finish()
                n += 1
        started.append(n)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert active.active == 0 and max(peak) <= 4
    assert sum(started) + active.overflow == 6 * 300
