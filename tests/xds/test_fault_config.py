"""The HTTPFault decoder (``meshcore.xds.listener_config.fault_spec``) on the per-route path: an
``HTTPFault`` in a route's or virtual host's ``typed_per_filter_config`` (how Istio writes
VirtualService faults) keeps ``max_active_faults`` and the percentage denominators exactly as the
listener's fault filter does.

Envoy: source/extensions/filters/http/fault/fault_filter.cc builds the same ``FaultSettings`` for the
filter and for a route (``max_active_faults_`` from ``max_active_faults().value()`` when set), and
``faultOverflow`` compares the filter's ``active_faults`` gauge with the effective (per-route)
settings' limit.
"""

from __future__ import annotations

from typing import Any, Dict

from meshcore.xds.model import FaultSpec
from meshcore.xds.route_config import route_config_spec

FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
FILTER_CONFIG = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
NAME = "envoy.filters.http.fault"


def routes(route_tpfc: Any = None, vh_tpfc: Any = None) -> Any:
    route: Dict[str, Any] = {"name": "r", "match": {"prefix": "/"}, "route": {"cluster": "c"}}
    other: Dict[str, Any] = {"name": "o", "match": {"prefix": "/o"}, "route": {"cluster": "c"}}
    if route_tpfc is not None:
        route["typed_per_filter_config"] = route_tpfc
    vh: Dict[str, Any] = {"name": "vh", "domains": ["*"], "routes": [other, route]}
    if vh_tpfc is not None:
        vh["typed_per_filter_config"] = vh_tpfc
    spec = route_config_spec({"name": "rc", "virtual_hosts": [vh]})
    return {r.name: dict(r.filter_overrides) for r in spec.virtual_hosts[0].routes}


def test_route_override_max_active_faults() -> None:
    got = routes({NAME: {"@type": FAULT, "max_active_faults": 2,
                         "abort": {"header_abort": {}, "percentage": {"numerator": 5, "denominator": "TEN_THOUSAND"}}}})
    assert got["r"] == {NAME: FaultSpec(abort_per_million=500, header_abort=True, abort_percent_denominator=10_000,
                                        max_active_faults=2)}
    assert got["o"] == {}


def test_route_override_without_max_active_faults_is_unlimited() -> None:
    got = routes({NAME: {"@type": FAULT, "delay": {"header_delay": {}, "percentage": {"numerator": 7,
                                                                                     "denominator": "MILLION"}}}})
    assert got["r"][NAME] == FaultSpec(delay_per_million=7, header_delay=True, delay_percent_denominator=1_000_000)
    assert got["r"][NAME].max_active_faults is None


def test_route_override_zero_and_wrapped_in_filter_config() -> None:
    # max_active_faults 0 is a limit (every fault overflows), not "unset"
    abort = {"http_status": 503, "percentage": {"numerator": 100}}
    wrapped = {NAME: {"@type": FILTER_CONFIG, "config": {"@type": FAULT, "max_active_faults": 0, "abort": abort}}}
    assert routes(wrapped)["r"][NAME] == FaultSpec(abort_per_million=1_000_000, abort_http_status=503,
                                                   max_active_faults=0)


def test_virtual_host_override_max_active_faults() -> None:
    got = routes(vh_tpfc={NAME: {"@type": FAULT, "max_active_faults": 9}})
    assert got["r"] == got["o"] == {NAME: FaultSpec(max_active_faults=9)}
    # a route's own config replaces the virtual host's
    got = routes({NAME: {"@type": FAULT, "max_active_faults": 1}}, {NAME: {"@type": FAULT, "max_active_faults": 9}})
    assert got["r"] == {NAME: FaultSpec(max_active_faults=1)} and got["o"] == {NAME: FaultSpec(max_active_faults=9)}
