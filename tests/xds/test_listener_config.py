"""``meshcore.xds.listener_config.listener_spec``: API listeners (gRPC A27/A39 with Envoy's
HttpConnectionManager checks), the fault filter, Istio's proxyless listener shape, the HCMs in the
Istio config dump, and a differential test against Envoy 1.40.

Envoy's server build has no API-listener extension ("missing the API listener extension"), so the
Envoy side of each case is the same HttpConnectionManager in an ordinary socket listener: that
validates the HCM and its filters exactly as an API listener would.
"""

from __future__ import annotations

import copy
import os
import sys
from typing import Any, Dict, List

import pytest
from google.protobuf import any_pb2, json_format

from envoy.config.listener.v3 import listener_pb2
from meshcore import ConfigError
from meshcore.xds.listener_config import listener_spec
from meshcore.xds.model import FaultSpec, HttpFilterSpec, ListenerSpec

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decoder_support import (  # noqa: E402
    FAULT, HCM, ROUTER, TYPE, UDPA_TYPED_STRUCT, XDS_TYPED_STRUCT, Case, bootstrap, check_documented, check_envoy,
    check_meshcore, envoy_verdicts, fault, load_json, resources, router, runs,
)

NAME = "reviews.default.svc.cluster.local:9080"
RDS_NAME = "outbound|9080||reviews.default.svc.cluster.local"
P = "api_listener.api_listener."
ROUTER_NAME = "envoy.extensions.filters.http.router.v3.Router"
FAULT_NAME = "envoy.extensions.filters.http.fault.v3.HTTPFault"
CORS = TYPE + "envoy.extensions.filters.http.cors.v3.Cors"
GRPC_STATS = TYPE + "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig"
RBAC = TYPE + "envoy.extensions.filters.http.rbac.v3.RBAC"
STATEFUL_SESSION = TYPE + "envoy.extensions.filters.http.stateful_session.v3.StatefulSession"
COOKIE_STATE = TYPE + "envoy.extensions.http.stateful_session.cookie.v3.CookieBasedSessionState"


def hcm(**fields: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {"@type": HCM, "stat_prefix": "outbound"}
    if "route_config" not in fields and "scoped_routes" not in fields:
        out["rds"] = {"config_source": {"ads": {}}, "route_config_name": RDS_NAME}
    out.setdefault("http_filters", [router()])
    out.update(fields)
    return {k: v for k, v in out.items() if v is not None}


def api(name: str = NAME, **hcm_fields: Any) -> Dict[str, Any]:
    return {"name": name, "api_listener": {"api_listener": hcm(**hcm_fields)}}


def error_of(config: Any) -> tuple:
    with pytest.raises(ConfigError) as info:
        listener_spec(config)
    return info.value.resource, info.value.field


ROUTE_CONFIG = {"name": "inline", "virtual_hosts": [  # "xds" is a cluster of the Envoy bootstrap
    {"name": "vh", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "xds"}}]}]}


# -- listener and route specifier -----------------------------------------------------------------


def test_rds_listener() -> None:
    spec = listener_spec(api())
    assert spec == ListenerSpec(name=NAME, route_config_name=RDS_NAME, inline_route_config=None,
                                http_filters=(HttpFilterSpec("envoy.filters.http.router", ROUTER_NAME),))
    self_source = api(rds={"config_source": {"self": {}}, "route_config_name": "r"})
    assert listener_spec(self_source).route_config_name == "r"


def test_istio_grpcgen_listener() -> None:
    # pilot/pkg/networking/grpcgen/lds.go buildOutboundListeners: address (service VIP) and
    # api_listener; HCM without stat_prefix; fault + router; RDS over ADS.
    listener = {
        "name": NAME, "address": {"socket_address": {"address": "10.96.12.34", "port_value": 9080}},
        "api_listener": {"api_listener": {
            "@type": HCM, "http_filters": [fault(), router()],
            "rds": {"config_source": {"ads": {}}, "route_config_name": RDS_NAME}}},
    }
    spec = listener_spec(listener)
    assert spec.address == "10.96.12.34:9080" and spec.route_config_name == RDS_NAME
    assert spec.http_filters == (HttpFilterSpec("envoy.filters.http.fault", FAULT_NAME, FaultSpec()),
                                 HttpFilterSpec("envoy.filters.http.router", ROUTER_NAME))
    v6 = copy.deepcopy(listener)
    v6["address"]["socket_address"]["address"] = "fd00::1"
    assert listener_spec(v6).address == "[fd00::1]:9080"


def test_inline_route_config() -> None:
    spec = listener_spec(api(route_config=ROUTE_CONFIG))
    assert spec.route_config_name is None and spec.inline_route_config is not None
    assert spec.inline_route_config.name == "inline"
    assert [vh.name for vh in spec.inline_route_config.virtual_hosts] == ["vh"]


def test_inline_route_config_errors_name_the_listener() -> None:
    bad = copy.deepcopy(ROUTE_CONFIG)
    bad["virtual_hosts"].append({"name": "vh2", "domains": ["*"]})
    assert error_of(api(route_config=bad)) == (NAME, P + "route_config.virtual_hosts[vh2].domains")


@pytest.mark.parametrize("config, field", [
    ({"name": NAME, "address": {"socket_address": {"address": "0.0.0.0", "port_value": 9080}},
      "filter_chains": [{"filters": []}]}, "api_listener"),
    ({"name": NAME}, "api_listener"),
    ({"name": NAME, "api_listener": {"api_listener": {"@type": ROUTER}}}, "api_listener.api_listener"),
    (api(rds=None), P + "route_specifier"),
    (api(rds=None, scoped_routes={"name": "s"}), P + "scoped_routes"),
    (api(rds={"route_config_name": "r"}), P + "rds.config_source"),
    (api(rds={"config_source": {"path_config_source": {"path": "/r.yaml"}}, "route_config_name": "r"}),
     P + "rds.config_source.path_config_source"),
    (api(rds={"config_source": {"ads": {}}}), P + "rds.route_config_name"),
    (api(common_http_protocol_options={"max_stream_duration": "-1s"}),
     P + "common_http_protocol_options.max_stream_duration"),
])
def test_listener_errors(config: Dict[str, Any], field: str) -> None:
    assert error_of(config) == (NAME, field)


def test_max_stream_duration() -> None:
    assert listener_spec(api(common_http_protocol_options={"max_stream_duration": "2.5s"})).max_stream_duration == 2.5
    assert listener_spec(api(common_http_protocol_options={"max_stream_duration": "0s"})).max_stream_duration is None
    assert listener_spec(api(common_http_protocol_options={"idle_timeout": "1s"})).max_stream_duration is None


def test_inputs_agree() -> None:
    config = api(http_filters=[fault({"abort": {"http_status": 503}}), router()])
    msg = json_format.ParseDict(config, listener_pb2.Listener())
    packed = any_pb2.Any()
    packed.Pack(msg)
    camel = json_format.MessageToDict(msg)
    assert listener_spec(msg) == listener_spec(packed) == listener_spec(camel) == listener_spec(config)


def test_garbage_hcm_bytes() -> None:
    msg = listener_pb2.Listener(name=NAME)
    msg.api_listener.api_listener.type_url = HCM
    msg.api_listener.api_listener.value = b"\xff\xff\xff"
    assert error_of(msg) == (NAME, "api_listener.api_listener")


# -- HTTP filters ---------------------------------------------------------------------------------


def test_filter_variants() -> None:
    filters = [
        {"name": "cors", "typed_config": {"@type": CORS}},
        {"name": "stats", "typed_config": {"@type": GRPC_STATS}},
        {"name": "opt", "is_optional": True, "typed_config": {"@type": XDS_TYPED_STRUCT, "type_url": TYPE + "x.Y"}},
        {"name": "opt-rbac", "is_optional": True, "typed_config": {"@type": RBAC}},
        {"name": "opt-ecds", "is_optional": True,
         "config_discovery": {"config_source": {"ads": {}}, "type_urls": [FAULT]}},
        {"name": "ts-fault", "typed_config": {
            "@type": XDS_TYPED_STRUCT, "type_url": FAULT,
            "value": {"abort": {"http_status": 503, "percentage": {"numerator": 5}}}}},
        fault(name="off", disabled=True),
        {"name": "r", "typed_config": {"@type": UDPA_TYPED_STRUCT, "type_url": ROUTER, "value": {}}},
    ]
    spec = listener_spec(api(http_filters=filters))
    assert spec.http_filters == (
        HttpFilterSpec("ts-fault", FAULT_NAME, FaultSpec(abort_per_million=50_000, abort_http_status=503)),
        HttpFilterSpec("off", FAULT_NAME, FaultSpec(), disabled=True),
        HttpFilterSpec("r", ROUTER_NAME),
    )


F = P + "http_filters"


@pytest.mark.parametrize("filters, field", [
    ([], F),
    ([router(), fault()], F + "[0]"),
    ([fault()], F + "[0]"),
    ([fault(), router(), router(name="r2")], F + "[1]"),
    ([fault(name="x"), fault(name="x"), router()], F + "[1].name"),
    ([fault(name=""), router()], F + "[0].name"),
    ([{"name": "u", "typed_config": {"@type": XDS_TYPED_STRUCT, "type_url": TYPE + "x.Y"}}, router()],
     F + "[0].typed_config"),
    ([{"name": "rbac", "typed_config": {"@type": RBAC}}, router()], F + "[0].typed_config"),
    ([{"name": "s", "typed_config": {"@type": STATEFUL_SESSION}}, router()], F + "[0].typed_config"),
    ([{"name": "e", "config_discovery": {"config_source": {"ads": {}}, "type_urls": [FAULT]}}, router()],
     F + "[0].config_discovery"),
    ([{"name": "n"}, router()], F + "[0].typed_config"),
    ([router(), {"name": "opt", "is_optional": True,
                 "typed_config": {"@type": XDS_TYPED_STRUCT, "type_url": TYPE + "x.Y"}}], F + "[0]"),
    ([fault(), {"name": "opt", "is_optional": True}], F + "[1]"),
    ([router(disabled=True)], F + "[0].disabled"),
    ([{"name": "ts", "typed_config": {"@type": XDS_TYPED_STRUCT, "type_url": FAULT, "value": {"bogus": 1}}}, router()],
     F + "[0].typed_config.value"),
])
def test_filter_errors(filters: List[Dict[str, Any]], field: str) -> None:
    assert error_of(api(http_filters=filters)) == (NAME, field)


# -- the fault filter -----------------------------------------------------------------------------


def fault_spec(config: Dict[str, Any]) -> FaultSpec:
    spec = listener_spec(api(http_filters=[fault(config), router()]))
    return spec.http_filters[0].config


@pytest.mark.parametrize("config, expected", [
    ({}, FaultSpec()),
    ({"delay": {"fixed_delay": "1.5s", "percentage": {"numerator": 25}}},
     FaultSpec(delay_per_million=250_000, fixed_delay=1.5)),
    ({"delay": {"header_delay": {}, "percentage": {"numerator": 5, "denominator": "TEN_THOUSAND"}}},
     FaultSpec(delay_per_million=500, header_delay=True, delay_percent_denominator=10_000)),
    ({"abort": {"http_status": 503, "percentage": {"numerator": 7, "denominator": "MILLION"}}},
     FaultSpec(abort_per_million=7, abort_http_status=503, abort_percent_denominator=1_000_000)),
    ({"abort": {"grpc_status": 14, "percentage": {"numerator": 100}}},
     FaultSpec(abort_per_million=1_000_000, abort_grpc_status=14)),
    ({"abort": {"header_abort": {}}}, FaultSpec(header_abort=True)),
    ({"abort": {"http_status": 200, "percentage": {"numerator": 250}}},  # capped at 100%
     FaultSpec(abort_per_million=1_000_000, abort_http_status=200)),
    ({"max_active_faults": 0, "upstream_cluster": "c"}, FaultSpec(max_active_faults=0, upstream_cluster="c")),
    ({"max_active_faults": 4294967295}, FaultSpec(max_active_faults=4294967295)),  # UInt32Value
    ({"abort": {"header_abort": {}, "percentage": {"numerator": 80, "denominator": "HUNDRED"}},
      "max_active_faults": 100},
     FaultSpec(abort_per_million=800_000, header_abort=True, max_active_faults=100)),
])
def test_fault_config(config: Dict[str, Any], expected: FaultSpec) -> None:
    assert fault_spec(config) == expected


def test_fault_headers() -> None:
    spec = fault_spec({"headers": [{"name": "X-Fault", "exact_match": "yes"}, {"name": "x-present"}]})
    assert [h.name for h in spec.headers] == ["x-fault", "x-present"]
    assert spec.headers[0].string is not None and spec.headers[0].string.value == "yes"


FC = F + "[0].typed_config"


@pytest.mark.parametrize("config, field", [
    ({"delay": {"percentage": {"numerator": 1}}}, FC + ".delay"),
    ({"delay": {"fixed_delay": "0s"}}, FC + ".delay.fixed_delay"),
    ({"delay": {"fixed_delay": "-1s"}}, FC + ".delay.fixed_delay"),
    ({"abort": {"percentage": {"numerator": 1}}}, FC + ".abort"),
    ({"abort": {"http_status": 199}}, FC + ".abort.http_status"),
    ({"abort": {"http_status": 600}}, FC + ".abort.http_status"),
    ({"downstream_nodes": ["n"]}, FC + ".downstream_nodes"),
    ({"response_rate_limit": {"fixed_limit": {"limit_kbps": 1}}}, FC + ".response_rate_limit"),
    ({"headers": [{"name": "x", "safe_regex_match": {"regex": "("}}]}, FC + ".headers[0].safe_regex_match.regex"),
])
def test_fault_errors(config: Dict[str, Any], field: str) -> None:
    assert error_of(api(http_filters=[fault(config), router()])) == (NAME, field)


def test_fault_unknown_denominator_from_binary() -> None:
    config = api(http_filters=[fault({"abort": {"http_status": 503}}), router()])
    msg = json_format.ParseDict(config, listener_pb2.Listener())
    from envoy.extensions.filters.http.fault.v3 import fault_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2

    h = http_connection_manager_pb2.HttpConnectionManager()
    msg.api_listener.api_listener.Unpack(h)
    f = fault_pb2.HTTPFault()
    h.http_filters[0].typed_config.Unpack(f)
    f.abort.percentage.denominator = 7
    h.http_filters[0].typed_config.Pack(f)
    msg.api_listener.api_listener.Pack(h)
    assert error_of(msg) == (NAME, FC + ".abort.percentage.denominator")


# -- Istio config dump HCMs ---------------------------------------------------------------------


def test_istio_config_dump_listeners_are_server_listeners() -> None:
    dump = load_json("istio/config_dump.json")
    listeners = list(resources(dump, "envoy.config.listener.v3.Listener"))
    assert listeners
    for lis in listeners:
        with pytest.raises(ConfigError) as info:
            listener_spec(lis)
        assert info.value.field == "api_listener"


def test_istio_config_dump_hcms_as_api_listeners() -> None:
    hcms = list(resources(load_json("istio/config_dump.json"), HCM.rsplit("/", 1)[1]))
    assert len(hcms) == 4
    agent = listener_spec({"name": "agent", "api_listener": {"api_listener": hcms[0]}})
    assert agent.inline_route_config is not None and [f.type_name for f in agent.http_filters] == [ROUTER_NAME]
    for i, h in enumerate(hcms[1:]):
        names = [f["name"] for f in h["http_filters"]]
        assert names[3:5] == ["waypoint_upstream_peer_metadata", "istio.stats"]  # Istio's own Envoy filters
        with pytest.raises(ConfigError) as info:
            listener_spec({"name": f"l{i}", "api_listener": {"api_listener": h}})
        assert info.value.field == P + "http_filters[3].typed_config"
        assert "io.istio.http.peer_metadata.Config" in info.value.reason
        optional = copy.deepcopy(h)
        for f in optional["http_filters"][3:5]:
            f["is_optional"] = True
        spec = listener_spec({"name": f"l{i}", "api_listener": {"api_listener": optional}})
        assert [f.name for f in spec.http_filters] == ["envoy.filters.http.fault", "envoy.filters.http.router"]
        assert spec.inline_route_config is not None


# -- differential test against Envoy 1.40 ---------------------------------------------------------


def _cases() -> List[Case]:
    C = Case
    ts_unknown = {"name": "u", "typed_config": {"@type": XDS_TYPED_STRUCT, "type_url": TYPE + "meshcore.test.Unknown"}}
    bad_routes = copy.deepcopy(ROUTE_CONFIG)
    bad_routes["virtual_hosts"].append({"name": "vh2", "domains": ["*"]})
    return [
        # accepted by both
        C("istio-shape", dict(api("istio-shape", http_filters=[fault(), router()]),
                              address={"socket_address": {"address": "10.96.0.1", "port_value": 9080}})),
        C("inline-routes", api("inline-routes", route_config=ROUTE_CONFIG)),
        C("fault-full", api("fault-full", http_filters=[fault({
            "delay": {"fixed_delay": "1s", "percentage": {"numerator": 5, "denominator": "TEN_THOUSAND"}},
            "abort": {"http_status": 503, "percentage": {"numerator": 250}}, "max_active_faults": 3,
            "upstream_cluster": "c", "headers": [{"name": "x-fault", "exact_match": "1"}]}), router()])),
        C("fault-header-grpc", api("fault-header-grpc", http_filters=[
            fault({"delay": {"header_delay": {}}, "abort": {"grpc_status": 99}}),
            fault({"abort": {"header_abort": {}}}, name="f2", disabled=True), router()])),
        C("typed-structs", api("typed-structs", http_filters=[
            {"name": "f", "typed_config": {"@type": XDS_TYPED_STRUCT, "type_url": FAULT,
                                           "value": {"abort": {"http_status": 503}}}},
            {"name": "r", "typed_config": {"@type": UDPA_TYPED_STRUCT, "type_url": ROUTER}}])),
        C("optional-and-no-effect", api("optional-and-no-effect", http_filters=[
            dict(ts_unknown, is_optional=True), {"name": "cors", "typed_config": {"@type": CORS}},
            {"name": "stats", "typed_config": {"@type": GRPC_STATS}}, router()])),
        C("max-stream-duration", api("max-stream-duration",
                                     common_http_protocol_options={"max_stream_duration": "0s", "idle_timeout": "1s"})),
        # rejected by both
        C("router-not-last", api("router-not-last", http_filters=[router(), fault()]), F + "[0]",
          "must be the last filter in a http filter chain"),
        C("unknown-filter", api("unknown-filter", http_filters=[ts_unknown, router()]), F + "[0].typed_config",
          "Didn't find a registered implementation for 'u'"),
        C("abort-status", api("abort-status", http_filters=[fault({"abort": {"http_status": 600}}), router()]),
          FC + ".abort.http_status", "HttpStatus: value must be inside range [200, 600)"),
        C("delay-zero", api("delay-zero", http_filters=[fault({"delay": {"fixed_delay": "0s"}}), router()]),
          FC + ".delay.fixed_delay", "FixedDelay: value must be greater than 0s"),
        C("max-stream-duration-negative", api("max-stream-duration-negative",
                                              common_http_protocol_options={"max_stream_duration": "-1s"}),
          P + "common_http_protocol_options.max_stream_duration", "Expected positive duration"),
        C("no-route-specifier", api("no-route-specifier", rds=None), P + "route_specifier",
          'field: "route_specifier", reason: is required'),
        C("inline-routes-invalid", api("inline-routes-invalid", route_config=bad_routes),
          P + "route_config.virtual_hosts[vh2].domains", "Only a single wildcard domain is permitted"),
        # documented differences
        C("no-filters", api("no-filters", http_filters=[]), F, None,
          why="gRPC A39 NACKs an empty filter list (Envoy adds a router)"),
        C("duplicate-names", api("duplicate-names", http_filters=[fault(name="x"), fault(name="x"), router()]),
          F + "[1].name", None, why="gRPC A39: filter names must be unique"),
        C("empty-rds-name", api("empty-rds-name", rds={"config_source": {"ads": {}}, "route_config_name": ""}),
          P + "rds.route_config_name", None, why="gRPC: an RDS name is required"),
        C("ecds", api("ecds", http_filters=[{"name": "e", "config_discovery": {
            "config_source": {"ads": {}}, "type_urls": [FAULT]}}, router()]), F + "[0].config_discovery", None,
          why="gRPC does not support filter config discovery"),
        C("rbac", api("rbac", http_filters=[{"name": "rbac", "typed_config": {"@type": RBAC}}, router()]),
          F + "[0].typed_config", None, why="only router and fault act on a client's requests (RBAC is server-side)"),
        C("stateful-session", api("stateful-session", http_filters=[{"name": "s", "typed_config": {
            "@type": STATEFUL_SESSION, "session_state": {"name": "envoy.http.stateful_session.cookie", "typed_config": {
                "@type": COOKIE_STATE, "cookie": {"name": "session", "ttl": "60s"}}}}}, router()]),
          F + "[0].typed_config", None, why="meshcore cannot keep sessions sticky; it refuses rather than ignore it"),
        C("fault-downstream-nodes", api("fault-downstream-nodes", http_filters=[
            fault({"downstream_nodes": ["n"], "abort": {"http_status": 503}}), router()]),
          FC + ".downstream_nodes", None, why="not supported: ignoring it would inject faults Envoy does not"),
        C("no-stat-prefix", api("no-stat-prefix", stat_prefix=None), None,
          "StatPrefix: value length must be at least 1 characters",
          why="gRPC control planes (Istio's grpcgen) leave stat_prefix unset"),
        C("rds-self", api("rds-self", rds={"config_source": {"self": {}}, "route_config_name": "r"}), None,
          "Missing config source specifier", why="'self' is the server that sent the listener; a static one has none"),
    ]


CASES = _cases()


def test_cases_are_documented() -> None:
    check_documented(CASES)
    assert runs(CASES) <= 10


@pytest.mark.parametrize("case", CASES, ids=str)
def test_meshcore_verdict(case: Case) -> None:
    check_meshcore(listener_spec, case, case.name)


def _socket_listener(case: Case, port: int) -> Dict[str, Any]:
    return {"name": case.name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": case.config["api_listener"]["api_listener"]}]}]}


@pytest.fixture(scope="module")
def envoy_says() -> Dict[str, Any]:
    return envoy_verdicts(CASES, lambda cases: bootstrap(
        listeners=[_socket_listener(c, 20000 + i) for i, c in enumerate(cases)]))


@pytest.mark.envoy
@pytest.mark.parametrize("case", CASES, ids=str)
def test_envoy_verdict(case: Case, envoy_says: Dict[str, Any]) -> None:
    check_envoy(case, envoy_says[case.name])
