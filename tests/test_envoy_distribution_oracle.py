"""Statistical differential tests: meshcore's ROUND_ROBIN / LEAST_REQUEST / RANDOM vs a real Envoy 1.40.

These policies draw random numbers, so picks cannot be compared one by one as in
``test_envoy_hash_oracle.py``; the *distribution* of picks is compared instead.  For every scenario
(hand-picked ones, each about one Envoy rule, plus seeded random mixes):

* one Envoy (``envoy_oracle.EnvoyOracle``, ``--concurrency 1``, no retries) is started with the
  scenario's cluster (STATIC, or file-based EDS where the scenario says so) and ``N`` (500-4000)
  strictly sequential keep-alive requests are sent through it (``EnvoyOracle.sample``); the
  upstream that answered each one is counted (``None`` = 503 "no healthy upstream"), cross-checked
  against Envoy's per-host ``rq_total``.  Requests are sequential, so every host's active-request
  count is 0 at each pick: Envoy's least-request P2C is then uniform and its weighted (EDF) form
  follows the weights.  Envoy runs once per scenario; its counts are cached for all its tests.
* meshcore is built from the same scenario -- ``LoadBalancer.from_xds(cluster, cla)`` with the very
  dicts Envoy was given, and the ``LoadBalancer(Endpoint(...), ...)`` constructor -- for both twins
  (``LB`` fixture: ``lb_c`` / ``lb_py``), and its share per host is measured over ``M`` picks
  (200k compiled, 100k pure; fixed seeds), each released at once.
* compared: (a) the set of hosts Envoy hit equals the set meshcore hits (hosts meshcore gives
  less than 0.5 % may be missing on Envoy's side); (b) each host's share agrees within
  ``4.5 * sqrt(p(1-p) * (1/N + 1/M)) + 0.005``; (c) where meshcore follows a deterministic
  schedule (round robin / EDF with all load on one (priority, healthy|degraded) pair: no random
  draw at all, detected from meshcore's own picks, see ``_is_schedule``), Envoy's count for every
  host must be within ``DET_TOL`` of ``N`` times meshcore's share -- this is what tells EDF from
  P2C, which have the same mean; and scenarios marked ``balanced`` (equal weights, one host
  source) must be balanced to within one request on both sides.

Each scenario also carries a check on Envoy's own answers, worked out by hand from Envoy's rules
(``test_envoy_scenario_behaves_as_intended``), so a scenario cannot silently test nothing
(e.g. "P1 gets 23 % because the DRAINING host is excluded from P0's denominator").

A failure prints the scenario, the Envoy rule it is about, both share tables, meshcore's priority
loads and panic flags, Envoy's LB stats and a self-contained reproduction (xDS dicts or the
equivalent constructor call).  Nothing here skips: a missing envoy binary or meshcore is a failure.
``MESHCORE_ORACLE_MIX_SEEDS=1,2,...`` chooses the random mixes (a mix whose Envoy run has a
single outcome fails its intent check: pick other seeds).

Run:  /work/venv/bin/python -m pytest tests/test_envoy_distribution_oracle.py -q
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import random
import sys
import zlib
from typing import Any, Callable

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from envoy_oracle import EndpointSpec, EnvoyOracle, build_xds, endpoints_from_cla  # noqa: E402
from envoy_process import free_port  # noqa: E402
from oracle_common import all_checks as _all  # noqa: E402
from oracle_common import import_meshcore as _import_meshcore  # noqa: E402
from oracle_common import loopback_addr as _addr  # noqa: E402
from oracle_common import EnvoyRun, once_per_scenario, per_scenario  # noqa: E402

pytestmark = pytest.mark.envoy  # every test here runs a real Envoy

M_PICKS = {"c": 200_000, "py": 100_000}  # meshcore picks per (scenario, twin, api)
SIGMAS = 4.5
SLACK = 0.005  # absolute share slack on top of the binomial bound
TINY = 0.005  # a host meshcore gives less than this may be absent from Envoy's sample
DET_TOL = 3  # deterministic schedules: |envoy count - N * meshcore share| <= DET_TOL (seen: <= 1.1)
# Seeds of the random mixes (chosen so that each has at least two outcomes on Envoy's side).
MIX_SEEDS = [int(x) for x in os.environ.get("MESHCORE_ORACLE_MIX_SEEDS", "1,2,3,4,5,6,8,9,12").split(",")]

H, K, U, T, X, D = "HEALTHY", "UNKNOWN", "UNHEALTHY", "TIMEOUT", "DRAINING", "DEGRADED"
NO_HOST = "<no host: 503 UH>"


# --------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Scenario:
    name: str
    endpoints: list[EndpointSpec]
    options: dict[str, Any]  # build_xds / LoadBalancer keyword options (policy=..., ...)
    why: str  # the Envoy rule(s) exercised, with the expected numbers worked out by hand
    n: int = 3000
    style: str = "classic"  # envoy_oracle.build_xds lb_config_style: "classic" or "typed"
    # Check on Envoy's own answers that the scenario exercises what it is named for.
    check: Callable[["Run"], None] | None = None
    # Equal-weight round robin (or EDF over equal weights) from ONE host source: both Envoy
    # and meshcore must be balanced to within one request.
    balanced: bool = False
    # Serve the assignment over (file-based) EDS instead of a STATIC cluster's load_assignment.
    eds: bool = False
    # {j: i}: endpoint j reuses endpoint i's address:port (a duplicate entry in the assignment).
    same_as: dict[int, int] | None = None
    # Edits the built (cluster, cla) dicts in place before Envoy gets them (e.g. reorders groups).
    mutate: Callable[[dict, dict], None] | None = None


@dataclasses.dataclass
class Run(EnvoyRun):  # scenario, cluster, cla, specs, then:
    counts: collections.Counter  # "ip:port" (or None) -> hits
    stats: dict[str, int]

    @property
    def n(self) -> int:
        return sum(self.counts.values())

    def key(self, s: EndpointSpec) -> str:
        return f"{s.address}:{s.port}"

    def hits(self, s: EndpointSpec) -> int:
        return self.counts.get(self.key(s), 0)

    def share(self, pred: Callable[[EndpointSpec], bool]) -> float:
        keys = {self.key(s) for s in self.specs if pred(s)}  # duplicate entries count once
        return sum(self.counts.get(k, 0) for k in keys) / self.n

    def stat(self, name: str) -> int:
        return self.stats.get(f"cluster.oracle.{name}", 0)

    def table(self) -> str:
        return ", ".join(f"{_label(self, k)}={v}" for k, v in sorted(self.counts.items(), key=_sort_key))


def _sort_key(kv: tuple) -> tuple:
    k = kv[0]
    return (k is None, k or "")


def _label(run: Run, key: str | None) -> str:
    if key is None:
        return NO_HOST
    for i, s in enumerate(run.specs):
        if run.key(s) == key:
            loc = "" if s.locality is None else f" loc={'/'.join(x for x in s.locality if x)}(lw={s.locality_weight})"
            return f"#{i} {key} P{s.priority} {s.health_name} w={s.weight}{loc}"
    return key


class _Eps:
    """Endpoint builder for one scenario: addresses 127.<base>.0.<2+i> in creation order."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.i = 0

    def __call__(self, health: str = H, **kw: Any) -> EndpointSpec:
        spec = EndpointSpec(_addr(self.i, self.base), health=health, **kw)
        self.i += 1
        return spec

    def many(self, healths: list[str] | str, **kw: Any) -> list[EndpointSpec]:
        return [self(h, **kw) for h in healths]


# -- checks on Envoy's answers (they document Envoy behaviour, and keep scenarios honest) ---


def _hits(pred: Callable[[EndpointSpec], bool], what: str, every: bool = False) -> Callable[[Run], None]:
    def check(run: Run) -> None:
        chosen = [s for s in run.specs if pred(s)]
        assert chosen, f"scenario bug: no endpoint is {what}"
        hit = [s for s in chosen if run.hits(s)]
        if every:
            assert len(hit) == len(chosen), f"expected Envoy to pick every {what}; counts: {run.table()}"
        else:
            assert hit, f"expected Envoy to pick {what}; counts: {run.table()}"

    return check


def _no_hits(pred: Callable[[EndpointSpec], bool], what: str) -> Callable[[Run], None]:
    def check(run: Run) -> None:
        bad = [s for s in run.specs if pred(s) and run.hits(s)]
        assert not bad, f"expected Envoy never to pick {what}; counts: {run.table()}"

    return check


def _share(pred: Callable[[EndpointSpec], bool], lo: float, hi: float, what: str) -> Callable[[Run], None]:
    def check(run: Run) -> None:
        got = run.share(pred)
        assert lo <= got <= hi, f"expected {what} to get a share in [{lo}, {hi}], got {got:.4f}; counts: {run.table()}"

    return check


def _each_share(pred: Callable[[EndpointSpec], bool], lo: float, hi: float, what: str) -> Callable[[Run], None]:
    def check(run: Run) -> None:
        for s in run.specs:
            if pred(s):
                got = run.hits(s) / run.n
                assert lo <= got <= hi, f"expected each {what} in [{lo}, {hi}], {run.key(s)} got {got:.4f}; {run.table()}"

    return check


def _panic_picks(lo: float, hi: float) -> Callable[[Run], None]:
    """Envoy's lb_healthy_panic counter (one per pick from a priority in panic), as a share."""

    def check(run: Run) -> None:
        got = run.stat("lb_healthy_panic") / run.n
        assert lo <= got <= hi, f"expected lb_healthy_panic/N in [{lo}, {hi}], got {got:.4f}; stats {run.stats}"

    return check


def _all_none(run: Run) -> None:
    assert set(run.counts) == {None}, f"expected only 503s (no healthy upstream), got {run.table()}"


def _no_none(run: Run) -> None:
    assert None not in run.counts, f"unexpected 503s: {run.table()}"


def _max_spread(limit: int) -> Callable[[Run], None]:
    def check(run: Run) -> None:
        c = [v for k, v in run.counts.items() if k is not None]
        assert c and max(c) - min(c) <= limit, f"expected max-min <= {limit}, got {run.table()}"

    return check


def _dispersed(min_chi2: float) -> Callable[[Run], None]:
    """Envoy drew at random (multinomial counts), it did not follow a schedule: the chi-square
    statistic of the counts against equal shares is not ~0.  For 8 hosts a random sampler gives
    chi2 < 0.2 with probability ~3e-5; an EDF/round-robin schedule gives ~0.02."""

    def check(run: Run) -> None:
        c = [v for k, v in run.counts.items() if k is not None]
        exp = run.n / len(c)
        chi2 = sum((v - exp) ** 2 / exp for v in c)
        assert chi2 >= min_chi2, f"expected random (P2C) picks, but the counts look scheduled (chi2={chi2:.3f}): {run.table()}"

    return check


def _nontrivial(run: Run) -> None:
    assert len(run.counts) >= 2, f"random scenario exercises nothing: a single outcome {run.table()}"


def _prio(p: int) -> Callable[[EndpointSpec], bool]:
    return lambda s: s.priority == p


def _healthy(s: EndpointSpec) -> bool:
    return s.health_name in (H, K)


def _unhealthy(s: EndpointSpec) -> bool:
    return s.health_name in (U, T, X)


def _zone(z: str) -> Callable[[EndpointSpec], bool]:
    return lambda s: s.locality is not None and s.locality[1] == z


def _scenarios() -> list[Scenario]:  # noqa: C901  (a list of cases)
    S: list[Scenario] = []
    add = S.append
    RR, LR, RND = "ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"

    # ---------------- weights, single source ----------------
    e = _Eps(60)
    add(Scenario(
        "rr_equal_5", e.many([H] * 5), {"policy": RR},
        "equal weights -> plain round robin from the healthy-hosts source: 600 each",
        check=_hits(_healthy, "host", every=True), balanced=True,
    ))
    e = _Eps(61)
    add(Scenario(
        "rr_unequal_weights_edf", [e(weight=w) for w in (1, 2, 3, 4, 10)], {"policy": RR},
        "unequal weights -> EDF scheduler (createWithPicks): shares w/20, deterministic",
        check=_share(lambda s: s.weight == 10, 0.47, 0.53, "the weight-10 host"),
    ))
    e = _Eps(62)
    add(Scenario(
        "rr_unset_weights_mean_1", [e(weight=w) for w in (None, 1, None, 1)], {"policy": RR},
        "load_balancing_weight unset = 1, so all weights are equal: plain round robin",
        check=_hits(_healthy, "host", every=True), balanced=True,
    ))
    e = _Eps(63)
    add(Scenario(
        "random_weights_ignored", [e(weight=w) for w in (1, 10, 100)], {"policy": RND},
        "RANDOM ignores weights: uniform 1/3 each",
        check=_each_share(_healthy, 0.28, 0.39, "host"),
    ))
    e = _Eps(64)
    add(Scenario(
        "lr_equal_p2c", e.many([H] * 4), {"policy": LR},
        "equal weights -> P2C over active requests, all 0 when sequential: uniform 1/4",
        check=_each_share(_healthy, 0.21, 0.29, "host"),
    ))
    e = _Eps(65)
    add(Scenario(
        "lr_unequal_weights_edf", [e(weight=w) for w in (1, 3, 6)], {"policy": LR},
        "unequal weights -> EDF over weight/(active+1)^1 = weight: shares .1/.3/.6, deterministic",
        check=_share(lambda s: s.weight == 6, 0.56, 0.64, "the weight-6 host"),
    ))
    e = _Eps(66)
    add(Scenario(
        "lr_choice_count_5_over_3_hosts", e.many([H] * 3), {"policy": LR, "choice_count": 5},
        "choice_count 5 > 3 hosts: N_CHOICES samples with replacement, ties keep the first: uniform",
        check=_each_share(_healthy, 0.28, 0.39, "host"),
    ))
    e = _Eps(67)
    add(Scenario(
        "lr_explicit_bias_equal_weights_still_p2c", e.many([H] * 8), {"policy": LR, "active_request_bias": 0.5},
        "Envoy 1.40.0: with equal weights the LB never builds an EDF scheduler, an explicit "
        "active_request_bias does not change that (the runtime guard "
        "least_request_lb_active_request_bias_forces_weighted is not in the 1.40.0 binary): P2C, "
        "so the counts are multinomial, not a balanced schedule",
        n=4000, check=_all(_each_share(_healthy, 0.10, 0.15, "host"), _dispersed(0.2)),
    ))
    e = _Eps(68)
    add(Scenario(
        "lr_typed_bias_0_unequal", [e(weight=w) for w in (2, 5)],
        {"policy": LR, "active_request_bias": 0.0, "choice_count": 3},
        "typed LeastRequest, bias 0 -> EDF over plain weights: 2/7 and 5/7",
        style="typed", check=_share(lambda s: s.weight == 5, 0.67, 0.76, "the weight-5 host"),
    ))

    # ---------------- priorities, health, panic ----------------
    e = _Eps(70)
    add(Scenario(
        "rr_spillover_draining_excluded",
        e.many([H, H, K, H, H, U, U, D, X, T]) + [e(priority=1, weight=w) for w in (1, 2, 3, 4, 5)],
        {"policy": RR},
        "P0: 10 hosts, DRAINING excluded -> 9 counted, 5 healthy (UNKNOWN counts): health "
        "140*5//9=77, degraded 140*1//9=15; P1 healthy 100 -> loads P0 77 / P1 23 (30 if the "
        "DRAINING host counted); P1 by EDF weights",
        check=_all(_share(_prio(1), 0.195, 0.265, "P1"), _no_hits(lambda s: not _healthy(s), "a non-healthy host")),
    ))
    e = _Eps(71)
    add(Scenario(
        "rr_degraded_after_lower_priority_healthy",
        e.many([H, H, D, D, D, U]) + e.many([U, U, H], priority=1),
        {"policy": RR},
        "P0 health 46 degraded 70, P1 health 46: healthy loads 46/46, then the remaining 8 % "
        "goes to P0's DEGRADED hosts (healthy capacity of every priority first)",
        check=_all(_share(lambda s: s.health_name == D, 0.05, 0.11, "the DEGRADED hosts"),
                   _share(_prio(1), 0.41, 0.51, "P1"), _no_hits(_unhealthy, "an unhealthy host")),
    ))
    e = _Eps(72)
    add(Scenario(
        "rr_only_degraded_hosts", e.many([D, D, D]), {"policy": RR},
        "only DEGRADED hosts: degraded load 100 -> round robin over the degraded-hosts source "
        "(hash policies answer 503 here; RR/LR/RANDOM do not)",
        check=_all(_hits(lambda s: True, "DEGRADED host", every=True), _no_none), balanced=True,
    ))
    e = _Eps(73)
    add(Scenario(
        "rr_partial_panic",
        e.many([H] + [U] * 9) + e.many([H] * 5 + [U] * 5, priority=1),
        {"policy": RR},
        "P0 1/10 healthy (health 14, in panic), P1 5/10 (70, not in panic: 50 % is not < 50); "
        "NTA 84 -> loads 16+1 / 83; P0 routes to all 10 hosts, P1 to its 5 healthy ones",
        check=_all(_hits(lambda s: s.priority == 0 and _unhealthy(s), "an unhealthy P0 host (panic)"),
                   _no_hits(lambda s: s.priority == 1 and _unhealthy(s), "an unhealthy P1 host"),
                   _share(_prio(0), 0.13, 0.21, "P0"), _panic_picks(0.13, 0.21)),
    ))
    e = _Eps(74)
    add(Scenario(
        "rr_total_panic_with_draining",
        e.many([H, U, U, X, T]) + e.many([U, U, U, X], priority=1),
        {"policy": RR},
        "P0 1/4 counted hosts healthy (panic), P1 0/3 (panic): total panic -> loads by raw host "
        "counts INCLUDING the DRAINING ones: 100*5//9=55+1 / 44; every host, DRAINING included, is picked",
        check=_all(_hits(lambda s: True, "host (DRAINING included)", every=True),
                   _share(_prio(0), 0.51, 0.61, "P0"), _panic_picks(1.0, 1.0)),
    ))
    e = _Eps(75)
    add(Scenario(
        "rr_panic_threshold_0_never_panics",
        e.many([H, H] + [U] * 8) + e.many([H] + [U] * 4, priority=1),
        {"policy": RR, "healthy_panic_threshold": 0.0},
        "threshold 0: no panic; P0 health 28, P1 28 -> loads 50/50 over healthy hosts only",
        check=_all(_no_hits(_unhealthy, "an unhealthy host"), _share(_prio(1), 0.45, 0.55, "P1"), _panic_picks(0, 0)),
    ))
    e = _Eps(76)
    add(Scenario(
        "rr_panic_threshold_0_nothing_available",
        e.many([U, T, X]) + e.many([U, U], priority=1),
        {"policy": RR, "healthy_panic_threshold": 0.0},
        "threshold 0 and NTA 0: P0 gets 100 % but has no healthy host -> every request 503 (UH)",
        n=500, check=_all_none,
    ))
    e = _Eps(77)
    add(Scenario(
        "rr_threshold_100_opf_100_panics",
        e.many([H] * 9 + [U]), {"policy": RR, "healthy_panic_threshold": 100.0, "overprovisioning_factor": 100},
        "OPF 100: health 90 < 100 so panic is possible; 90 % healthy < threshold 100 -> panic, all hosts",
        check=_all(_hits(_unhealthy, "the unhealthy host (panic)"), _panic_picks(1.0, 1.0)), balanced=True,
    ))
    e = _Eps(78)
    add(Scenario(
        "lr_threshold_100_opf_140_no_panic",
        e.many([H] * 9 + [U]), {"policy": LR, "healthy_panic_threshold": 100.0},
        "OPF 140: health 126 -> 100 = NTA 100, and at NTA 100 no priority is ever in panic, "
        "whatever the threshold",
        check=_all(_no_hits(_unhealthy, "the unhealthy host"), _panic_picks(0, 0)),
    ))
    e = _Eps(79)
    add(Scenario(
        "rr_panic_threshold_30_4_rounds_to_30",
        e.many([H] * 3 + [U] * 7), {"policy": RR, "healthy_panic_threshold": 30.4, "overprovisioning_factor": 100},
        "threshold 30.4 is rounded to the integer 30 (std::round); 30 % healthy is not < 30 -> "
        "no panic (it would panic if compared with 30.4)",
        check=_all(_no_hits(_unhealthy, "an unhealthy host"), _panic_picks(0, 0)), balanced=True,
    ))
    e = _Eps(80)
    add(Scenario(
        "random_panic_threshold_29_6_truncates_to_29",
        e.many([H] * 8 + [U] * 19), {"policy": RND, "healthy_panic_threshold": 29.6, "overprovisioning_factor": 100},
        "PROTOBUF_PERCENT_TO_ROUNDED_INTEGER_OR_DEFAULT does not round: convertPercent returns "
        "uint64_t(100 * (29.6 / 100.0)) = 29 (truncation); 8/27 healthy = 29.63 % is not < 29 -> no "
        "panic (with round-half-up, 30, it would panic)",
        check=_all(_no_hits(_unhealthy, "an unhealthy host"), _panic_picks(0, 0)),
    ))
    e = _Eps(88)
    add(Scenario(
        "rr_panic_threshold_29_is_28_in_envoy",
        e.many([H] * 2 + [U] * 5), {"policy": RR, "healthy_panic_threshold": 29.0},
        "threshold 29.0: uint64_t(100 * (29.0 / 100.0)) = uint64_t(28.999999999999996) = 28 (likewise "
        "57 -> 56, 58 -> 57); 2/7 healthy = 28.57 % is not < 28 -> no panic (it is < 29)",
        check=_all(_no_hits(_unhealthy, "an unhealthy host"), _panic_picks(0, 0)), balanced=True,
    ))
    e = _Eps(89)
    add(Scenario(
        "lr_panic_threshold_58_is_57_in_envoy",
        e.many([H] * 4 + [U] * 3), {"policy": LR, "healthy_panic_threshold": 58.0, "overprovisioning_factor": 100},
        "threshold 58.0 -> uint64_t(57.99999999999999) = 57; 4/7 healthy = 57.14 % is not < 57 -> no panic",
        check=_all(_no_hits(_unhealthy, "an unhealthy host"), _panic_picks(0, 0)),
    ))
    e = _Eps(81)
    add(Scenario(
        "random_panic_all_hosts_incl_draining",
        e.many([H] * 3 + [U] * 6 + [X]), {"policy": RND, "healthy_panic_threshold": 34.0, "overprovisioning_factor": 100},
        "3/9 counted hosts healthy = 33.3 % < 34 -> panic: RANDOM over ALL 10 hosts, DRAINING included",
        check=_all(_hits(lambda s: True, "host (panic, DRAINING included)", every=True), _panic_picks(1.0, 1.0)),
    ))
    e = _Eps(87)
    add(Scenario(
        "rr_panic_excludes_draining_from_denominator",
        e.many([H] * 3 + [U] * 6 + [X]), {"policy": RR, "healthy_panic_threshold": 32.0, "overprovisioning_factor": 100},
        "panic test on counted hosts: 3/9 = 33.3 % >= 32 -> no panic (3/10 = 30 % would panic)",
        check=_all(_no_hits(_unhealthy, "an unhealthy host"), _panic_picks(0, 0)), balanced=True,
    ))
    e = _Eps(82)
    add(Scenario(
        "rr_opf_200",
        e.many([H] * 3 + [U] * 7) + e.many([H] * 4, priority=1), {"policy": RR, "overprovisioning_factor": 200},
        "OPF 200: P0 health 200*3//10=60, P1 100 -> loads 60/40; NTA 100 so P0 (30 % healthy) is not in panic",
        check=_all(_share(_prio(1), 0.35, 0.45, "P1"), _no_hits(_unhealthy, "an unhealthy host")),
    ))
    e = _Eps(83)
    add(Scenario(
        "lr_opf_100_spill",
        e.many([H] * 9 + [U]) + e.many([H, H], priority=1), {"policy": LR, "overprovisioning_factor": 100},
        "OPF 100: P0 health 90 -> P1 gets 10 %",
        check=_all(_share(_prio(1), 0.07, 0.13, "P1"), _no_hits(_unhealthy, "an unhealthy host")),
    ))
    e = _Eps(84)
    add(Scenario(
        "random_one_draw_picks_priority_and_host",
        e.many([H] * 4) + e.many([H] * 5, priority=1), {"policy": RND, "overprovisioning_factor": 97},
        "OPF 97: loads P0 97 / P1 3. RANDOM uses ONE draw r for both: P1 is chosen iff r%100+1 > 97, "
        "i.e. r%100 in {97,98,99}, and the host is r%5 in {2,3,4}: P1's hosts #0 and #1 are never picked",
        n=4000,
        check=_all(_no_hits(lambda s: s.address in (_addr(4, 84), _addr(5, 84)), "P1 host #0 or #1"),
                   _hits(lambda s: s.address in (_addr(6, 84), _addr(7, 84), _addr(8, 84)), "P1 hosts #2-#4",
                         every=True)),
    ))
    e = _Eps(85)
    add(Scenario(
        "rr_weighted_priority_health",
        [e(weight=10)] + e.many([U] * 5) + e.many([H, H], priority=1),
        {"policy": RR, "weighted_priority_health": True},
        "weighted_priority_health: P0 health 140*10//15=93 by weight (23 by count) -> P1 gets 7 %",
        check=_share(_prio(0), 0.89, 0.97, "P0"),
    ))
    e = _Eps(100)
    add(Scenario(
        "rr_weighted_priority_health_excludes_draining_weight",
        [e(weight=3), e(X, weight=10), e(U, weight=1)] + e.many([H, H], priority=1),
        {"policy": RR, "weighted_priority_health": True},
        "weighted_priority_health: the DRAINING host's weight leaves the denominator too: P0 health "
        "min(100, 140*3//(14-10)) = 100 -> P1 gets nothing (140*3//14 = 30 would send it 70 %)",
        check=_all(_no_hits(_prio(1), "a P1 host"), _no_hits(_unhealthy, "an unhealthy host")),
    ))
    e = _Eps(86)
    add(Scenario(
        "rr_three_priorities_capacity_reached",
        e.many([H, U, U, U]) + e.many([H, H, U], priority=1) + e.many([H] * 3, priority=2),
        {"policy": RR},
        "health P0 35, P1 93, P2 100: loads 35 / 65 / 0 -- P2 is never reached",
        check=_all(_no_hits(_prio(2), "a P2 host"), _share(_prio(0), 0.30, 0.40, "P0")),
    ))

    # ---------------- localities ----------------
    e = _Eps(90)
    add(Scenario(
        "rr_locality_weighted_basic",
        [e(locality=("us", "b", ""), locality_weight=2), e(locality=("ap", "d", ""), locality_weight=None)]
        + [e(locality=("eu", "c", ""), locality_weight=3) for _ in range(3)]
        + [e(locality=("us", "a", ""), locality_weight=1) for _ in range(2)]
        + [e(X, locality=("eu", "x", ""), locality_weight=5) for _ in range(2)]
        + [e(locality=("ap", "d", ""), locality_weight=None)],
        {"policy": RR, "locality_weighted": True},
        "locality weights 1/2/3 -> shares 1/6, 2/6, 3/6; unset weight (ap/d) = 0: never picked; "
        "eu/x (weight 5) has only DRAINING hosts: 0 counted hosts -> effective weight 0",
        check=_all(_no_hits(_zone("d"), "the unset-weight locality"), _no_hits(_zone("x"), "the all-DRAINING locality"),
                   _share(_zone("b"), 0.30, 0.37, "locality us/b")),
    ))
    e = _Eps(91)
    add(Scenario(
        "rr_locality_partially_unhealthy",
        [e(h, locality=("r", "A", ""), locality_weight=2) for h in (H, U, U, U)]
        + [e(h, locality=("r", "B", ""), locality_weight=1) for h in (H, H)]
        + [e(h, locality=("r", "C", ""), locality_weight=3) for h in (H, H, U, T, X)],
        {"policy": RR, "locality_weighted": True},
        "effective weight = w*min(1, 1.4*healthy/(hosts-excluded)): A 2*0.35=0.7, B 1, "
        "C 3*min(1, 1.4*2/4)=2.1 (1.68 if DRAINING counted) -> shares .184/.263/.553",
        check=_all(_share(_zone("A"), 0.15, 0.22, "locality A"), _share(_zone("C"), 0.52, 0.59, "locality C"),
                   _no_hits(_unhealthy, "an unhealthy host")),
    ))
    e = _Eps(92)
    add(Scenario(
        "rr_typed_locality_opf_200",
        [e(h, locality=("r", "A", ""), locality_weight=1) for h in (H, U, U, U)]
        + [e(h, locality=("r", "B", ""), locality_weight=1) for h in (H, H, H, U)],
        {"policy": RR, "locality_weighted": True, "overprovisioning_factor": 200},
        "typed RoundRobin locality_lb_config; OPF 200: A 1*min(1, 2*1/4)=0.5, B min(1, 2*3/4)=1 -> 1/3, 2/3",
        style="typed", check=_share(_zone("A"), 0.30, 0.37, "locality A"),
    ))
    e = _Eps(93)
    add(Scenario(
        "rr_locality_all_weights_unset_falls_back",
        [e(locality=("a", "", "")), e(locality=("a", "", "")), e(locality=("b", "", "")), e(U, locality=("c", "", ""))],
        {"policy": RR, "locality_weighted": True},
        "locality weighting on but no locality has a weight: no locality scheduler, "
        "chooseHealthyLocality() gives nothing and Envoy falls back to the priority's healthy hosts",
        check=_all(_hits(_healthy, "healthy host", every=True), _no_none), balanced=True,
    ))
    e = _Eps(94)
    add(Scenario(
        "rr_locality_weighted_ones_unhealthy_fallback",
        [e(locality=("a", "", "")) for _ in range(3)] + [e(U, locality=("b", "", ""), locality_weight=5) for _ in range(3)],
        {"policy": RR, "locality_weighted": True},
        "the only weighted locality has no healthy host (effective weight 0) -> no scheduler -> "
        "fallback to all healthy hosts: the UNSET-weight locality takes all traffic (not in panic: 3/6 = 50 %)",
        check=_all(_hits(_healthy, "host of the unset-weight locality", every=True),
                   _no_hits(_unhealthy, "an unhealthy host")), balanced=True,
    ))
    e = _Eps(101)
    add(Scenario(
        "rr_locality_degraded_fallback_to_unweighted",
        [e(H, locality=("r", "A", ""), locality_weight=1), e(U, locality=("r", "A", ""), locality_weight=1)]
        + [e(D, locality=("r", "B", "")) for _ in range(2)],
        {"policy": RR, "locality_weighted": True},
        "health 140*1//4=35, degraded 70 -> 35 % healthy (locality A), 65 % degraded; no locality "
        "with degraded hosts has a weight (B is unset) -> no degraded locality scheduler -> fallback "
        "to the priority's degraded hosts: B's hosts get 65 % despite their unset locality weight",
        check=_all(_share(_zone("B"), 0.60, 0.70, "locality B (unset weight)"), _no_hits(_unhealthy, "an unhealthy host")),
    ))
    e = _Eps(95)
    add(Scenario(
        "rr_locality_degraded",
        [e(h, locality=("r", "A", ""), locality_weight=1) for h in (H, D)]
        + [e(h, locality=("r", "B", ""), locality_weight=3) for h in (D, D, U)]
        + [e(h, locality=("r", "C", ""), locality_weight=2) for h in (H, H, U)],
        {"policy": RR, "locality_weighted": True},
        "health 140*3//8=52, degraded 52 -> 52 % healthy, 48 % degraded; healthy locality weights "
        "A 0.7, C 1.87; degraded locality weights A 0.7, B 2.8 -> B's degraded hosts get .48*.8=38 %",
        check=_all(_share(lambda s: s.health_name == D, 0.43, 0.53, "the DEGRADED hosts"),
                   _share(_zone("B"), 0.34, 0.43, "locality B")),
    ))
    e = _Eps(96)
    add(Scenario(
        "lr_typed_locality_spill_p1_panic",
        [e(locality=("r", "A", ""), locality_weight=2, weight=1), e(locality=("r", "A", ""), locality_weight=2, weight=3),
         e(U, locality=("r", "A", ""), locality_weight=2)]
        + [e(h, locality=("r", "B", ""), locality_weight=1, weight=(2 if h == H else 1)) for h in (H, U, U)]
        + [e(h, priority=1, locality=("r", "C", ""), locality_weight=1) for h in (H, U, U, U)]
        + [e(U, priority=1, locality=("r", "D", ""), locality_weight=4) for _ in range(2)],
        {"policy": LR, "locality_weighted": True, "choice_count": 3},
        "P0 3/6 healthy (70), P1 1/6 (23, panic since NTA 93 < 100) -> loads 75+1 / 24; P0 by "
        "locality A 1.87 vs B 0.47 then EDF weights; P1 in panic: all 6 hosts, localities ignored",
        style="typed",
        check=_all(_hits(lambda s: s.priority == 1 and _unhealthy(s), "an unhealthy P1 host", every=True),
                   _share(_prio(1), 0.20, 0.28, "P1"), _no_hits(lambda s: s.priority == 0 and _unhealthy(s), "bad P0")),
    ))
    e = _Eps(97)
    add(Scenario(
        "random_typed_locality",
        [e(locality=("z", "a", ""), locality_weight=1) for _ in range(3)] + [e(locality=("z", "b", ""), locality_weight=3)]
        + [e(locality=("z", "c", ""))],
        {"policy": RND, "locality_weighted": True},
        "typed Random with locality weighting: locality b (weight 3 of 4) -> its single host 75 %; c unset: never",
        style="typed",
        check=_all(_share(_zone("b"), 0.71, 0.79, "locality b"), _no_hits(_zone("c"), "the unset-weight locality")),
    ))
    e = _Eps(98)
    add(Scenario(
        "rr_localities_present_not_weighted",
        [e(locality=(f"r{i % 3}", "", ""), locality_weight=(i % 3) * 5 or None) for i in range(6)],
        {"policy": RR},
        "localities (with weights) but no locality_weighted_lb_config: localities are ignored",
        check=_hits(_healthy, "host", every=True), balanced=True,
    ))
    e = _Eps(99)
    add(Scenario(
        "lr_locality_weighted_classic_degraded_p1",
        [e(h, locality=("q", "a", ""), locality_weight=1) for h in (H, U, U, U, U)]
        + [e(D, priority=1, locality=("q", "b", ""), locality_weight=2, weight=w) for w in (1, 4)]
        + [e(H, priority=1, locality=("q", "c", ""), locality_weight=1)],
        {"policy": LR, "locality_weighted": True},
        "P0 1/5 (health 28, panic: 20 %), P1 1/3 healthy (46) + 2/3 degraded (93): NTA 100 -> no panic; "
        "loads P0 28 / P1 46 healthy, P1 26 degraded -> P1's degraded locality b, EDF 1:4",
        check=_all(_share(lambda s: s.health_name == D, 0.21, 0.31, "the DEGRADED hosts"),
                   _no_hits(_unhealthy, "an unhealthy host"), _panic_picks(0, 0)),
    ))

    # ---------------- EDS (file-based) ----------------
    e = _Eps(102)
    add(Scenario(
        "rr_eds_duplicate_address_first_wins",
        [e(weight=1), e(), e(weight=5)], {"policy": RR},
        "EDS merges entries with the same address: the FIRST one (weight 1) is kept, so the two hosts "
        "have equal weights -> plain round robin 50/50 (a STATIC cluster would keep both entries: 6:1)",
        eds=True, same_as={2: 0}, check=_share(lambda s: s.address == _addr(0, 102), 0.45, 0.55, "the duplicated host"),
        balanced=True,
    ))

    def p1_group_first(cluster: dict, cla: dict) -> None:
        cla["endpoints"].sort(key=lambda lle: -lle.get("priority", 0))

    e = _Eps(103)
    add(Scenario(
        "random_eds_duplicate_across_priorities_cla_order",
        [e(), e(), e(U)] + [e(priority=1), e(priority=1)], {"policy": RND},
        "the P1 group comes first in the assignment and repeats P0's first address: EDS keeps the "
        "entry seen first (in P1), so P0 = {healthy, unhealthy}: health 70 -> P1 gets 30 %, the "
        "shared host 15 % (kept in P0 it would be P0 93 %, P1 7 %)",
        eds=True, same_as={3: 0}, mutate=p1_group_first,
        check=_all(_share(lambda s: s.address == _addr(0, 103), 0.11, 0.19, "the shared host"),
                   _no_hits(_unhealthy, "the unhealthy host")),
    ))

    # ---------------- seeded random mixes ----------------
    for seed in MIX_SEEDS:
        add(_random_scenario(seed))
    return S


def _random_scenario(seed: int) -> Scenario:
    """A random mix: policy, weights, health, priorities, localities, OPF, panic threshold..."""
    rng = random.Random(f"distribution-{seed}")
    policy = rng.choice(["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"])
    n = rng.randint(3, 12)
    n_prio = rng.choice([1, 2, 2, 3])
    locs = [("r1", "z1", ""), ("r1", "z2", "s1"), ("r0", "z9", ""), ("r2", "", "")]
    locality_mode = rng.choice(["none", "plain", "weighted", "weighted"])
    loc_weights = {(p, loc): rng.choice([None, 1, 2, 5]) for p in range(n_prio) for loc in locs}
    equal = rng.random() < 0.4
    eps = []
    for i in range(n):
        prio = i % n_prio if rng.random() < 0.8 else rng.randrange(n_prio)
        loc = rng.choice(locs) if locality_mode != "none" else None
        eps.append(EndpointSpec(
            _addr(i, 150 + seed),
            weight=1 if equal else rng.choice([None, 1, 2, 3, 5, 10]),
            health=rng.choices([H, K, U, D, X, T], [7, 1, 2, 2, 1, 1])[0],
            priority=prio,
            locality=loc,
            locality_weight=None if loc is None else loc_weights[(prio, loc)],
        ))
    used = sorted({e.priority for e in eps})  # contiguous priorities
    for e in eps:
        e.priority = used.index(e.priority)
    opts: dict[str, Any] = {"policy": policy}
    if rng.random() < 0.4:
        opts["overprovisioning_factor"] = rng.choice([100, 120, 200])
    if rng.random() < 0.4:
        opts["healthy_panic_threshold"] = rng.choice([0.0, 25.0, 70.0, 100.0])
    if locality_mode == "weighted":
        opts["locality_weighted"] = True
    if policy == "LEAST_REQUEST":
        if rng.random() < 0.4:
            opts["choice_count"] = rng.choice([2, 3, 10])
        if rng.random() < 0.3:
            opts["active_request_bias"] = rng.choice([0.0, 0.5, 1.0, 2.0])
    style = rng.choice(["classic", "typed"])
    if rng.random() < 0.25:
        opts["weighted_priority_health"] = True
    eds = rng.random() < 0.3
    return Scenario(f"mix_{seed}_{policy.lower()}", eps, opts, "seeded random mix (see the config)",
                    n=3000, style=style, check=_nontrivial, eds=eds)


SCENARIOS = _scenarios()
PER_SCENARIO = per_scenario(SCENARIOS)


# --------------------------------------------------------------------------------------------
# Running Envoy (once per scenario, shared by the tests of that scenario)
# --------------------------------------------------------------------------------------------

_STATS = "cluster\\.oracle\\.(lb_healthy_panic|upstream_rq_total|upstream_cx_none_healthy|upstream_rq_retry|membership_.*)$"


def _oracle(scn: Scenario) -> EnvoyOracle:
    specs = [dataclasses.replace(e) for e in scn.endpoints]
    if not (scn.same_as or scn.mutate):
        return EnvoyOracle(specs, lb_config_style=scn.style, eds=scn.eds, **scn.options)
    # Concrete ports chosen here (the helper then binds them), so that entries can share one.
    for spec in specs:
        spec.port = spec.port or free_port(spec.address)
    for j, i in (scn.same_as or {}).items():
        specs[j].address, specs[j].port = specs[i].address, specs[i].port
    cluster, cla = build_xds(specs, lb_config_style=scn.style, **scn.options)
    if scn.mutate:
        scn.mutate(cluster, cla)
        cluster["load_assignment"] = json.loads(json.dumps(cla))
    return EnvoyOracle.from_xds(cluster, cla, eds=scn.eds)


@once_per_scenario
def _envoy_run(scn: Scenario) -> Run:
    with _oracle(scn) as oracle:
        counts = oracle.sample(scn.n)
        stats = oracle.stats(_STATS)
        return Run(scn, oracle.cluster, oracle.cla, endpoints_from_cla(oracle.cla), counts, stats)


# --------------------------------------------------------------------------------------------
# meshcore side
# --------------------------------------------------------------------------------------------


def _mc_endpoints_code(run: Run) -> list[str]:
    out = []
    for s in run.specs:
        loc = "None" if s.locality is None else f"Locality{tuple(s.locality)!r}"
        out.append(
            f"Endpoint({s.address!r}, {s.port}, weight={s.weight if s.weight is not None else 1}, "
            f"health=HealthStatus.{s.health_name}, priority={s.priority}, locality={loc}, "
            f"locality_weight={s.locality_weight!r})"
        )
    return out


def _seed(api: str, run: Run) -> int:
    return zlib.crc32(f"{api}/{run.scenario.name}".encode())


def _mc_build(api: str, run: Run, LB: Any, seed: int | None = None):  # noqa: N803
    mc = _import_meshcore()
    seed = _seed(api, run) if seed is None else seed
    if api == "from_xds":
        cluster, cla = json.loads(json.dumps(run.cluster)), json.loads(json.dumps(run.cla))
        return LB.from_xds(cluster, cla, seed=seed)
    eps = [
        mc.Endpoint(
            s.address, s.port, weight=s.weight if s.weight is not None else 1, health=mc.HealthStatus[s.health_name],
            priority=s.priority, locality=None if s.locality is None else mc.Locality(*s.locality),
            locality_weight=s.locality_weight,
        )
        for s in run.specs
    ]
    return LB(eps, seed=seed, **run.scenario.options)


def _mc_sample(lb: Any, m: int) -> tuple[collections.Counter, list[tuple[int, collections.Counter]]]:
    """``m`` picks, each released at once (so least request always sees 0 active requests).
    Returns the counts and snapshots of them after every m/8 picks."""
    counts: collections.Counter = collections.Counter()
    snaps = []
    pick, release = lb.pick, lb.release
    done = 0
    for i in range(1, 9):
        stop = m * i // 8
        for _ in range(stop - done):
            ep = pick()
            if ep is None:
                counts[None] += 1
            else:
                counts[ep.key] += 1
                release(ep)
        done = stop
        if stop < m:
            snaps.append((stop, counts.copy()))
    return counts, snaps


def _is_schedule(lb: Any, counts: collections.Counter, snaps: list, m: int) -> bool:
    """Does meshcore follow a deterministic schedule here?  Two conditions:

    * all load is on one (priority, healthy|degraded) pair (``priority_loads``), so no random
      priority draw is made, and
    * the per-source choice has a bounded lag, as round robin and EDF have: at each of 7
      snapshots (every m/8 picks) every host is within DET_TOL of picks x (its final share).  A
      random choice (RANDOM, P2C) drifts by ~sqrt((m/8) p (1-p)) between snapshots (~55 picks for
      two hosts at m = 100k), so passing all 7 by chance is < 1e-8.
    """
    healthy, degraded = lb.priority_loads
    if sum(1 for x in list(healthy) + list(degraded) if x) != 1:
        return False
    return all(abs(snap.get(k, 0) - c * v / m) <= DET_TOL for c, snap in snaps for k, v in counts.items())


def _impl_of(LB: Any) -> str:  # noqa: N803
    return "py" if LB.__module__.endswith("_py") else "c"


def _compare(api: str, scn: Scenario, LB: Any) -> None:  # noqa: N803
    run = _envoy_run(scn)
    lb = _mc_build(api, run, LB)
    m = M_PICKS[_impl_of(LB)]
    mc, snaps = _mc_sample(lb, m)
    n = run.n
    det = _is_schedule(lb, mc, snaps, m)
    problems: list[str] = []
    rows = []
    for key in sorted(set(run.counts) | set(mc), key=lambda k: (k is None, k or "")):
        ce, cm = run.counts.get(key, 0), mc.get(key, 0)
        pe, pm = ce / n, cm / m
        tol = SIGMAS * math.sqrt(pm * (1 - pm) * (1 / n + 1 / m)) + SLACK
        verdict = "ok"
        if ce and not cm:
            verdict = "ENVOY ONLY"
            problems.append(f"Envoy picked {_label(run, key)} {ce} times; meshcore never did in {m} picks")
        elif cm and not ce and pm >= TINY:
            verdict = "MESHCORE ONLY"
            problems.append(f"meshcore gives {_label(run, key)} a share of {pm:.4f}; Envoy never picked it in {n}")
        elif abs(pe - pm) > tol:
            verdict = "SHARE"
            problems.append(f"{_label(run, key)}: Envoy share {pe:.4f} vs meshcore {pm:.4f} (tolerance {tol:.4f})")
        if det and abs(ce - n * pm) > DET_TOL and verdict == "ok":
            verdict = "SCHEDULE"
            problems.append(
                f"{_label(run, key)}: meshcore follows a deterministic schedule here (its counts stay "
                f"within {DET_TOL} of picks x share), but Envoy's count {ce} is {ce - n * pm:+.1f} off "
                f"N x {pm:.5f}: Envoy drew at random, or followed another schedule"
            )
        rows.append((key, ce, pe, cm, pm, tol, verdict))
    if scn.balanced:
        vals = [v for k, v in mc.items() if k is not None]
        if max(vals) - min(vals) > 1:
            problems.append(f"meshcore round robin is not balanced over {m} picks: {dict(mc)}")
    if problems:
        pytest.fail(_report(api, LB, run, lb, m, det, problems, rows), pytrace=False)


def _report(api: str, LB: Any, run: Run, lb: Any, m: int, det: bool, problems: list[str], rows: list) -> str:  # noqa: N803
    scn = run.scenario
    lines = [
        f"meshcore ({_impl_of(LB)}, {api}) disagrees with Envoy 1.40 in scenario {scn.name!r}",
        f"Rule(s): {scn.why}",
        "Problems:",
        *[f"  - {p}" for p in problems],
        f"Share table (Envoy: N={run.n} sequential requests; meshcore: M={m} picks, released at once; "
        f"tolerance {SIGMAS}*sqrt(p(1-p)(1/N+1/M))+{SLACK}; deterministic={det}):",
        f"  {'host':70} {'envoy':>6} {'share':>7} {'meshcore':>8} {'share':>7} {'tol':>6}  verdict",
    ]
    for key, ce, pe, cm, pm, tol, verdict in rows:
        lines.append(f"  {_label(run, key):70} {ce:6d} {pe:7.4f} {cm:8d} {pm:7.4f} {tol:6.4f}  {verdict}")
    healthy, degraded = lb.priority_loads
    lines += [
        f"meshcore priority loads: healthy={list(healthy)} degraded={list(degraded)} panic={list(lb.panic)}",
        f"Envoy stats: {run.stats}",
        "",
        "Reproduction (no Envoy needed):",
        "    import collections",
        "    from meshcore import Endpoint, HealthStatus, LoadBalancer, Locality",
    ]
    if api == "from_xds":
        lines += [
            f"    cluster = {json.dumps(run.cluster)}",
            f"    cla = {json.dumps(run.cla)}",
            f"    lb = LoadBalancer.from_xds(cluster, cla, seed={_seed(api, run)})",
        ]
    else:
        lines.append("    eps = [")
        lines += [f"        {c}," for c in _mc_endpoints_code(run)]
        lines += ["    ]", f"    lb = LoadBalancer(eps, seed={_seed(api, run)}, **{scn.options!r})"]
    lines += [
        "    c = collections.Counter()",
        f"    for _ in range({m}):",
        "        ep = lb.pick(); c[ep and ep.key] += 1",
        "        ep and lb.release(ep)",
        f"    # Envoy 1.40 answered (N={run.n}): {dict(run.counts)}",
        f"Envoy config (the same cluster/cla, for EnvoyOracle.from_xds(cluster, cla{', eds=True' if scn.eds else ''})"
        ".sample(N)):",
        f"    {json.dumps({'cluster': run.cluster}, sort_keys=True)}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@PER_SCENARIO
def test_envoy_scenario_behaves_as_intended(scn: Scenario) -> None:
    """Envoy-only: the scenario runs, and Envoy's answers show what the scenario is meant to test."""
    run = _envoy_run(scn)
    assert run.n == scn.n
    known = {run.key(s) for s in run.specs} | {None}
    assert set(run.counts) <= known, run.table()
    assert run.stat("upstream_rq_retry") == 0
    if scn.check:
        scn.check(run)
    if scn.balanced:
        _max_spread(1)(run)


@pytest.mark.parametrize("api", ["from_xds", "constructor"])
@PER_SCENARIO
def test_meshcore_distribution_matches_envoy(scn: Scenario, api: str, LB: Any) -> None:  # noqa: N803
    _compare(api, scn, LB)


def test_harness_sample_counts_and_no_retries() -> None:
    """The sampler itself: round robin over 3 equal hosts is exact; 503s are counted as None."""
    eps = [EndpointSpec(_addr(i, 140)) for i in range(3)]
    with EnvoyOracle(eps, policy="ROUND_ROBIN") as o:
        c = o.sample(300)
        assert sorted(c.values()) == [100, 100, 100] and None not in c
        per_host = o.host_stats()
        assert sorted(v["rq_total"] for v in per_host.values()) == [100, 100, 100]
    bad = [EndpointSpec(_addr(3 + i, 140), health="UNHEALTHY") for i in range(2)]
    with EnvoyOracle(bad, policy="RANDOM", healthy_panic_threshold=0.0, lb_config_style="typed") as o:
        assert o.sample(50) == collections.Counter({None: 50})
