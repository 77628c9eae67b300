"""Configurations Envoy 1.40 rejects through its proto validation (PGV annotations) and its
duration checks are rejected by meshcore too, with a ConfigError naming the field. Each case is
checked on both sides: meshcore's decoder (exact field) and ``envoy --mode validate`` (a piece of
Envoy's message); one case goes through a real ADS stream and is NACKed."""

from __future__ import annotations

import copy
import os
import sys
from typing import Any, Dict

import pytest

from meshcore.xds.cluster_config import cluster_spec
from meshcore.xds.route_config import route_config_spec

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decoder_support import HCM, ROUTER, Case, bootstrap, check_documented, check_envoy, envoy_verdicts  # noqa: E402

PGV_REGEX = "RegexMatcherValidationError.Regex: value length must be at least 1"
NO_CTL = r'does not match regex pattern "^[^\x00\n\r]*$"'
NEGATIVE = "Invalid duration: Expected positive duration"
DEFINED = "value must be one of the defined enum values"
R = "virtual_hosts[vh].routes[r]"


def rc(route: Any = None, vh: Any = None, match: Any = None, action: Any = None, top: Any = None) -> Dict[str, Any]:
    r: Dict[str, Any] = {"name": "r", "match": {"prefix": "/", **(match or {})},
                         "route": {"cluster": "xds", **(action or {})}}
    r.update(route or {})
    v: Dict[str, Any] = {"name": "vh", "domains": ["*"], "routes": [r]}
    v.update(vh or {})
    return _strip({"name": "rc", "virtual_hosts": [v], **(top or {})})


def _strip(o: Any) -> Any:
    if isinstance(o, dict):
        return {k: _strip(v) for k, v in o.items() if v is not None}
    if isinstance(o, list):
        return [_strip(v) for v in o]
    return o


def cl(**extra: Any) -> Dict[str, Any]:
    return {"name": "c", "type": "STATIC", "connect_timeout": "1s", **extra}


NO_PREFIX = {"prefix": None}
ROUTE_CASES = [
    Case("ok", rc()),
    Case("route-regex-empty", rc(match={**NO_PREFIX, "safe_regex": {"regex": ""}}), f"{R}.match.safe_regex.regex",
         PGV_REGEX),
    Case("string-matcher-regex-empty", rc(match={"headers": [{"name": "x", "string_match": {"safe_regex": {"regex": ""}}}]}),
         f"{R}.match.headers[0].string_match.safe_regex.regex", PGV_REGEX),
    Case("header-regex-empty", rc(match={"headers": [{"name": "x", "safe_regex_match": {"regex": ""}}]}),
         f"{R}.match.headers[0].safe_regex_match.regex", PGV_REGEX),
    Case("query-regex-empty", rc(match={"query_parameters": [{"name": "x", "string_match": {"safe_regex": {"regex": ""}}}]}),
         f"{R}.match.query_parameters[0].string_match.safe_regex.regex", PGV_REGEX),
    Case("rewrite-regex-empty", rc(action={"regex_rewrite": {"pattern": {"regex": ""}, "substitution": "x"}}),
         f"{R}.route.regex_rewrite.pattern.regex", PGV_REGEX),
    Case("domain-nul", rc(vh={"domains": ["a\x00b"]}), "virtual_hosts[vh].domains[0]", "Domains[0]: value " + NO_CTL),
    Case("domain-cr", rc(vh={"domains": ["a\rb"]}), "virtual_hosts[vh].domains[0]", "Domains[0]: value " + NO_CTL),
    Case("domain-lf", rc(vh={"domains": ["a\nb"]}), "virtual_hosts[vh].domains[0]", "Domains[0]: value " + NO_CTL),
    Case("header-name-nul", rc(match={"headers": [{"name": "x\x00"}]}), f"{R}.match.headers[0].name",
         "HeaderMatcherValidationError.Name: value " + NO_CTL),
    Case("header-name-cr", rc(match={"headers": [{"name": "x\r"}]}), f"{R}.match.headers[0].name",
         "HeaderMatcherValidationError.Name: value " + NO_CTL),
    Case("header-name-lf", rc(match={"headers": [{"name": "x\ny"}]}), f"{R}.match.headers[0].name",
         "HeaderMatcherValidationError.Name: value " + NO_CTL),
    Case("cluster-empty", rc(action={"cluster": ""}), f"{R}.route.cluster",
         "RouteActionValidationError.Cluster: value length must be at least 1"),
    Case("cluster-header-empty", rc(action={"cluster": None, "cluster_header": ""}), f"{R}.route.cluster_header",
         "RouteActionValidationError.ClusterHeader: value length must be at least 1"),
    Case("cluster-header-nul", rc(action={"cluster": None, "cluster_header": "x\x00"}), f"{R}.route.cluster_header",
         "RouteActionValidationError.ClusterHeader: value " + NO_CTL),
    Case("redirect-code-99", rc(route={"route": None, "redirect": {"response_code": 99}}),
         f"{R}.redirect.response_code", "RedirectActionValidationError.ResponseCode: " + DEFINED),
    Case("cluster-not-found-code-7", rc(action={"cluster_not_found_response_code": 7}),
         f"{R}.route.cluster_not_found_response_code", "ClusterNotFoundResponseCode: " + DEFINED),
    Case("timeout-negative", rc(action={"timeout": "-1s"}), f"{R}.route.timeout", NEGATIVE),
    Case("idle-timeout-negative", rc(action={"idle_timeout": "-0.5s"}), f"{R}.route.idle_timeout", NEGATIVE),
    Case("per-try-timeout-negative", rc(action={"retry_policy": {"per_try_timeout": "-1s"}}),
         f"{R}.route.retry_policy.per_try_timeout", NEGATIVE),
    Case("max-stream-duration-negative", rc(action={"max_stream_duration": {"max_stream_duration": "-1s"}}),
         f"{R}.route.max_stream_duration.max_stream_duration", NEGATIVE),
    Case("cookie-name-empty", rc(action={"hash_policy": [{"cookie": {"name": ""}}]}),
         f"{R}.route.hash_policy[0].cookie.name", "CookieValidationError.Name: value length must be at least 1"),
    Case("cookie-ttl-negative", rc(action={"hash_policy": [{"cookie": {"name": "a", "ttl": "-1s"}}]}),
         f"{R}.route.hash_policy[0].cookie.ttl", NEGATIVE),
    Case("require-tls-9", rc(vh={"require_tls": 9}), "virtual_hosts[vh].require_tls", "RequireTls: " + DEFINED),
    Case("priority-9", rc(action={"priority": 9}), f"{R}.route.priority", "Priority: " + DEFINED),
    Case("prefix-rewrite-lf", rc(action={"prefix_rewrite": "/a\n"}), f"{R}.route.prefix_rewrite",
         "PrefixRewrite: value " + NO_CTL),
    Case("host-rewrite-lf", rc(action={"host_rewrite_literal": "a\n"}), f"{R}.route.host_rewrite_literal",
         "HostRewriteLiteral: value " + NO_CTL),
    Case("query-name-1025-bytes", rc(match={"query_parameters": [{"name": "x" * 1025}]}),
         f"{R}.match.query_parameters[0].name", "value length must be at most 1024 bytes"),
    Case("retry-predicate-name-empty", rc(action={"retry_policy": {"retry_host_predicate": [{"name": ""}]}}),
         f"{R}.route.retry_policy.retry_host_predicate[0].name", "RetryHostPredicateValidationError.Name"),
    Case("remove-header-empty", rc(route={"request_headers_to_remove": [""]}), f"{R}.request_headers_to_remove[0]",
         "RouteValidationError.RequestHeadersToRemove[0]: value length must be at least 1"),
    Case("rc-remove-header-lf", rc(top={"request_headers_to_remove": ["a\nb"]}), "request_headers_to_remove[0]",
         "RouteConfigurationValidationError.RequestHeadersToRemove[0]: value " + NO_CTL),
    Case("add-header-value-lf", rc(route={"request_headers_to_add": [{"header": {"key": "a", "value": "v\n"}}]}),
         f"{R}.request_headers_to_add[0].header.value", "HeaderValueValidationError.Value: value " + NO_CTL),
    Case("redirect-host-lf", rc(route={"route": None, "redirect": {"host_redirect": "a\n"}}),
         f"{R}.redirect.host_redirect", "HostRedirect: value " + NO_CTL),
]

def tls_cl(*cipher_suites: str) -> Dict[str, Any]:
    """A cluster whose TLS context names ``cipher_suites`` (and nothing else: meshcore checks the
    suites before it refuses a context without roots)."""
    return cl(transport_socket={"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": {"tls_params": {"cipher_suites": list(cipher_suites)}}}})


CIPHERS = "transport_socket.typed_config.common_tls_context.tls_params.cipher_suites"
CIPHER_REJECTED = "The following ciphers were rejected when tried individually: "
# (no accepted TLS cluster here: meshcore refuses one without roots, and Envoy 1.40's validate
# mode crashes on an SDS validation context over ADS; tests/xds/test_cluster_tls.py accepts known
# suites)

CLUSTER_CASES = [
    Case("cluster-ok", cl()),
    Case("cipher-unknown", tls_cl("ECDHE-RSA-AES128-GCM-SHA256", "BOGUS"), CIPHERS, CIPHER_REJECTED + "BOGUS"),
    Case("cipher-tls13-name", tls_cl("TLS_AES_128_GCM_SHA256"), CIPHERS, CIPHER_REJECTED + "TLS_AES_128_GCM_SHA256"),
    Case("dns-refresh-negative", cl(type="STRICT_DNS", dns_refresh_rate="-1s"), "dns_refresh_rate", NEGATIVE),
    Case("cleanup-interval-negative", cl(cleanup_interval="-1s"), "cleanup_interval", NEGATIVE),
    Case("update-merge-window-negative", cl(common_lb_config={"update_merge_window": "-1s"}),
         "common_lb_config.update_merge_window", NEGATIVE),
    Case("dns-lookup-family-9", cl(dns_lookup_family=9), "dns_lookup_family", "DnsLookupFamily: " + DEFINED),
    Case("idle-timeout-in-any-negative", cl(typed_extension_protocol_options={
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": {"idle_timeout": "-1s"},
            "explicit_http_config": {"http_protocol_options": {}}}}),
         "typed_extension_protocol_options[envoy.extensions.upstreams.http.v3.HttpProtocolOptions]"
         ".common_http_protocol_options.idle_timeout", NEGATIVE),
]


def test_cases_are_documented() -> None:
    check_documented(ROUTE_CASES + CLUSTER_CASES)


@pytest.mark.parametrize("case", ROUTE_CASES, ids=str)
def test_meshcore_route(case: Case) -> None:
    from meshcore.errors import ConfigError

    if case.field is None:
        route_config_spec(case.config)
        return
    with pytest.raises(ConfigError) as info:
        route_config_spec(case.config)
    assert (info.value.resource, info.value.field) == ("rc", case.field), info.value


@pytest.mark.parametrize("case", CLUSTER_CASES, ids=str)
def test_meshcore_cluster(case: Case) -> None:
    from meshcore.errors import ConfigError

    from envoy.config.cluster.v3 import cluster_pb2
    from google.protobuf import json_format

    # as from the wire (cluster_spec reads only the fields it uses from a dict)
    message = json_format.ParseDict(case.config, cluster_pb2.Cluster())
    if case.field is None:
        cluster_spec(message)
        return
    with pytest.raises(ConfigError) as info:
        cluster_spec(message)
    assert (info.value.resource, info.value.field) == ("c", case.field), info.value


def _listener(case: Case, port: int) -> Dict[str, Any]:
    return {"name": case.name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": HCM, "stat_prefix": "s", "route_config": case.config,
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}]}}]}]}


def _bootstrap(cases: Any) -> Dict[str, Any]:
    routes = [c for c in cases if c in ROUTE_CASES]
    clusters = [dict(copy.deepcopy(c.config), name=f"c{i}") for i, c in enumerate(cases) if c in CLUSTER_CASES]
    return bootstrap(clusters=clusters, listeners=[_listener(c, 21000 + i) for i, c in enumerate(routes)])


@pytest.fixture(scope="module")
def envoy_says() -> Dict[str, Any]:
    return envoy_verdicts(ROUTE_CASES + CLUSTER_CASES, _bootstrap)


@pytest.mark.envoy
@pytest.mark.parametrize("case", ROUTE_CASES + CLUSTER_CASES, ids=str)
def test_envoy_verdict(case: Case, envoy_says: Dict[str, Any]) -> None:
    check_envoy(case, envoy_says[case.name])
