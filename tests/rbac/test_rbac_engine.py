"""RbacEngine: semantics (Envoy 1.40 within A41, security.md §4), NACKs, inputs, per-route
overrides, shadow rules and counters, argument checks; and a property test against the plain
interpreter in ``reference.py`` over generated configurations (``rbac_gen.py``)."""

from __future__ import annotations

import random
from typing import Any, Dict, List, Optional

import pytest
from google.protobuf import any_pb2, json_format

from meshcore import ConfigError, PeerCertificate, RbacEngine
from meshcore.rbac import Decision

from . import reference
from .istio_authz import filters_for, realistic_policies
from .rbac_gen import IDENTITIES, Gen, identity
from .rbac_oracle import Listener

RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
PER_ROUTE_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute"
CLIENT = "spiffe://cluster.local/ns/default/sa/client"


def rules(action: str, **policies: Dict[str, Any]) -> Dict[str, Any]:
    return {"rules": {"action": action, "policies": policies}}


def policy(perm: Any = None, princ: Any = None) -> Dict[str, Any]:
    return {"permissions": [perm or {"any": True}], "principals": [princ or {"any": True}]}


def hdr(name: str, **m: Any) -> Dict[str, Any]:
    return {"header": {"name": name, **m}}


def allow_if(perm: Any = None, princ: Any = None) -> RbacEngine:
    return RbacEngine.from_xds([rules("ALLOW", p=policy(perm, princ))])


# -- actions and chains ---------------------------------------------------------------------------


def test_allow_deny_log_and_no_rules():
    allow = RbacEngine.from_xds([rules("ALLOW", p=policy({"url_path": {"path": {"prefix": "/ok"}}}))])
    assert allow.evaluate(path="/ok/1").allowed and allow.evaluate(path="/ok/1").policy == "p"
    d = allow.evaluate(path="/no")
    assert not d.allowed and d.policy is None and not d and d.details == "rbac_access_denied_matched_policy[none]"
    deny = RbacEngine.from_xds([rules("DENY", p=policy({"url_path": {"path": {"prefix": "/bad"}}}))])
    assert not deny.evaluate(path="/bad").allowed and deny.evaluate(path="/bad").policy == "p"
    assert deny.evaluate(path="/good").allowed
    log = RbacEngine.from_xds([rules("LOG", p=policy())])
    d = log.evaluate()
    assert d.allowed and d.policy == "p"  # Envoy reports the LOG filter's matching policy
    assert RbacEngine.from_xds([{}]).evaluate().allowed  # no rules: no-op
    assert RbacEngine.from_xds([]).evaluate() == Decision(True)
    assert not RbacEngine.from_xds([rules("ALLOW")]).evaluate().allowed  # empty ALLOW map denies all
    assert RbacEngine.from_xds([rules("DENY")]).evaluate().allowed


def test_chain_deny_stops_and_allow_must_match():
    deny = rules("DENY", d=policy(hdr("x-a", exact_match="1")))
    allow = rules("ALLOW", a=policy(hdr("x-b", exact_match="1")))
    e = RbacEngine.from_xds([("deny", deny), ("allow", allow)])
    d = e.evaluate(headers=[("x-a", "1"), ("x-b", "1")])
    assert (d.allowed, d.policy, d.filter) == (False, "d", "deny")
    d = e.evaluate(headers=[("x-b", "1")])
    assert (d.allowed, d.policy) == (True, "a")
    d = e.evaluate(headers=[])
    assert (d.allowed, d.policy, d.filter) == (False, None, "allow")
    assert dict(d.metadata) == {"enforced_engine_result": "denied"}
    assert e.stats == {"allowed": 3, "denied": 2, "shadow_allowed": 0, "shadow_denied": 0}


def test_reported_policy_is_first_in_byte_order():
    pols = {name: policy() for name in ["a", "B", "9", "10", "policy-2", "policy-10"]}
    assert RbacEngine.from_xds([{"rules": {"action": "ALLOW", "policies": pols}}]).evaluate().policy == "10"


# -- headers ---------------------------------------------------------------------------------------


def test_repeated_headers_one_value_at_a_time_except_inline():
    e = allow_if(hdr("x-user", exact_match="b"))
    assert e.evaluate(headers=[("x-user", "a"), ("X-User", "b")]).allowed
    assert not allow_if(hdr("x-user", exact_match="a,b")).evaluate(headers=[("x-user", "a"), ("x-user", "b")]).allowed
    # invert inverts "some value matches"
    inv = allow_if(hdr("x-user", exact_match="a", invert_match=True))
    assert not inv.evaluate(headers=[("x-user", "a"), ("x-user", "b")]).allowed
    assert inv.evaluate(headers=[("x-user", "b"), ("x-user", "c")]).allowed
    for name in ("user-agent", "content-type", "authorization", "referer", "accept", "x-forwarded-for", "origin"):
        joined = allow_if(hdr(name, exact_match="a,b"))
        assert joined.evaluate(headers=[(name, "a"), (name, "b")]).allowed, name
    # Envoy's join skips empty values (and puts no "," after an empty first one)
    accept = allow_if(hdr("accept", exact_match="a,b"))
    assert accept.evaluate(headers=[("accept", "a"), ("accept", ""), ("accept", "b")]).allowed
    assert allow_if(hdr("accept", exact_match="b")).evaluate(headers=[("accept", ""), ("accept", "b")]).allowed
    # mapping form with a list of values, bytes pairs (ASGI)
    assert e.evaluate(headers={"X-User": ["a", "b"]}).allowed
    assert e.evaluate(headers=[(b"x-user", b"b")]).allowed


def test_header_matcher_kinds():
    h = [("x-n", "42"), ("x-e", "")]
    assert allow_if(hdr("x-n", range_match={"start": 40, "end": 43})).evaluate(headers=h).allowed
    assert not allow_if(hdr("x-n", range_match={"start": 43, "end": 50})).evaluate(headers=h).allowed
    assert allow_if(hdr("x-n", range_match={"start": 0, "end": 50})).evaluate(headers=[("x-n", " +7 ")]).allowed
    assert allow_if(hdr("x-e", exact_match="")).evaluate(headers=[("x-e", "anything")]).allowed  # legacy "" = any
    assert not allow_if(hdr("x-e", exact_match="")).evaluate(headers=[]).allowed
    assert allow_if(hdr("x-e", string_match={"exact": ""})).evaluate(headers=h).allowed
    assert not allow_if(hdr("x-e", string_match={"exact": ""})).evaluate(headers=[("x-e", "v")]).allowed
    assert allow_if(hdr("x-n", safe_regex_match={"regex": "4[0-9]"})).evaluate(headers=h).allowed
    assert not allow_if(hdr("x-n", safe_regex_match={"regex": "4"})).evaluate(headers=h).allowed  # full match
    assert allow_if(hdr("x-n")).evaluate(headers=h).allowed  # no specifier: present
    assert allow_if(hdr("x-q", present_match=False)).evaluate(headers=h).allowed
    assert allow_if(hdr("x-q", present_match=True, invert_match=True)).evaluate(headers=h).allowed
    assert not allow_if(hdr("x-q", exact_match="v", invert_match=True)).evaluate(headers=h).allowed  # absent
    assert allow_if(hdr("x-q", exact_match="v", invert_match=True, treat_missing_header_as_empty=True)).evaluate(
        headers=h).allowed
    assert allow_if(hdr("x-q", string_match={"exact": ""}, treat_missing_header_as_empty=True)).evaluate(
        headers=h).allowed
    ic = allow_if(hdr("x-u", string_match={"prefix": "AL", "ignore_case": True}))
    assert ic.evaluate(headers=[("x-u", "alice")]).allowed
    assert not allow_if(hdr("x-u", string_match={"exact": "É", "ignore_case": True})).evaluate(
        headers=[("x-u", "é")]).allowed  # ASCII-only case folding, as absl


def test_pseudo_headers_host_and_hop_by_hop():
    e = allow_if(hdr(":method", exact_match="POST"))
    assert e.evaluate(method="POST").allowed and not e.evaluate(method="GET").allowed
    assert allow_if(hdr(":path", exact_match="/a?b")).evaluate(path="/a?b").allowed
    for name in ("host", "Host", ":authority"):
        m = allow_if(hdr(name, exact_match="svc:80"))
        assert m.evaluate(authority="svc:80").allowed
        assert m.evaluate(headers=[("Host", "svc:80")]).allowed  # no authority argument: the Host header
        assert not m.evaluate().allowed
    for name in ("connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"):
        assert not allow_if(hdr(name)).evaluate(headers=[(name, "x")]).allowed
        assert allow_if(hdr(name, present_match=False)).evaluate(headers=[(name, "x")]).allowed
    te = allow_if(hdr("te", exact_match="trailers"))
    for value, kept in (("trailers", True), ("gzip, trailers", True), ("Trailers", False), ("gzip", False),
                        ("trailers;q=1", False)):
        assert te.evaluate(headers=[("te", value)]).allowed is kept, value


def test_url_path_strips_query_and_fragment():
    e = allow_if({"url_path": {"path": {"exact": "/a/b"}}})
    for p in ("/a/b", "/a/b?x=1", "/a/b#f", "/a/b?x#y"):
        assert e.evaluate(path=p).allowed, p
    assert not e.evaluate(path="/a/b/").allowed
    ic = allow_if({"url_path": {"path": {"prefix": "/ADMIN", "ignore_case": True}}})
    assert ic.evaluate(path="/admin/x").allowed


# -- peers -----------------------------------------------------------------------------------------


def test_authenticated_uri_then_dns_then_subject():
    def auth(m: Any) -> RbacEngine:
        return allow_if(princ={"authenticated": {"principal_name": m} if m is not None else {}})

    peer = PeerCertificate(uri_sans=("spiffe://td/ns/a/sa/x",), dns_sans=("api.example.com",), subject="CN=x,O=y")
    assert auth({"exact": "api.example.com"}).evaluate(peer=peer).allowed  # DNS even with a URI SAN
    assert auth({"exact": "CN=x,O=y"}).evaluate(peer=peer).allowed
    assert auth({"exact": ""}).evaluate(principal=CLIENT).allowed  # empty subject of Istio certs
    assert not auth({"exact": ""}).evaluate().allowed  # plaintext never
    assert auth(None).evaluate(peer=PeerCertificate()).allowed  # TLS without a client certificate
    assert not auth(None).evaluate().allowed
    assert auth({"exact": CLIENT}).evaluate(principal=CLIENT).allowed
    assert auth({"safe_regex": {"regex": ".*/ns/default/.*"}}).evaluate(principal=CLIENT).allowed
    assert auth({"prefix": "SPIFFE://", "ignore_case": True}).evaluate(principal=CLIENT).allowed
    assert not auth({"exact": "spiffe://other"}).evaluate(principal=CLIENT).allowed


def test_addresses_ports_and_sni():
    e = allow_if(princ={"source_ip": {"address_prefix": "10.0.0.0", "prefix_len": 8}})
    assert e.evaluate(source_ip="10.1.2.3").allowed
    assert e.evaluate(source_ip="::ffff:10.1.2.3").allowed  # dual-stack sockets' view of IPv4 peers
    assert not e.evaluate(source_ip="11.0.0.1").allowed and not e.evaluate(source_ip="::1").allowed
    assert not e.evaluate().allowed  # no address: no CIDR matches
    with pytest.raises(ValueError):
        e.evaluate(source_ip="not-an-ip")
    v6 = allow_if(princ={"direct_remote_ip": {"address_prefix": "2001:db8::", "prefix_len": 32}})
    assert v6.evaluate(source_ip="2001:db8::7").allowed
    remote = allow_if(princ={"remote_ip": {"address_prefix": "192.168.0.0", "prefix_len": 16}})
    assert remote.evaluate(source_ip="10.0.0.1", headers=[("x-forwarded-for", "1.1.1.1, 192.168.4.4")]).allowed
    assert not remote.evaluate(source_ip="10.0.0.1", headers=[("x-forwarded-for", "192.168.4.4, 1.1.1.1")]).allowed
    assert remote.evaluate(source_ip="192.168.0.9", headers=[("x-forwarded-for", "garbage")]).allowed  # fallback
    assert remote.evaluate(source_ip="192.168.0.9", headers=[("x-forwarded-for", "10.0.0.1,")]).allowed
    peer_only = RbacEngine.from_xds([rules("ALLOW", p=policy(princ={"remote_ip": {"address_prefix": "10.0.0.0",
                                                                                   "prefix_len": 8}}))],
                                    use_remote_address=True)
    assert peer_only.evaluate(source_ip="10.0.0.1", headers=[("x-forwarded-for", "1.1.1.1")]).allowed
    hops = RbacEngine.from_xds([rules("ALLOW", p=policy(princ={"remote_ip": {"address_prefix": "1.1.1.1",
                                                                              "prefix_len": 32}}))],
                               xff_num_trusted_hops=1)
    assert hops.evaluate(source_ip="10.0.0.1", headers=[("x-forwarded-for", "1.1.1.1, 2.2.2.2")]).allowed
    port = allow_if({"destination_port": 8080})
    assert port.evaluate(destination_port=8080).allowed and not port.evaluate(destination_port=80).allowed
    assert not port.evaluate().allowed
    rng = allow_if({"destination_port_range": {"start": 8000, "end": 8080}})
    assert rng.evaluate(destination_port=8079).allowed and not rng.evaluate(destination_port=8080).allowed
    dst = allow_if({"destination_ip": {"address_prefix": "10.0.0.2", "prefix_len": 32}})
    assert dst.evaluate(destination_ip="10.0.0.2").allowed
    sni = allow_if({"requested_server_name": {"exact": "api.example.com"}})
    assert sni.evaluate(server_name="API.Example.COM").allowed and not sni.evaluate().allowed
    assert allow_if({"requested_server_name": {"exact": ""}}).evaluate().allowed


def test_metadata_never_matches():
    md = {"filter": "envoy.filters.http.jwt_authn", "path": [{"key": "sub"}], "value": {"string_match": {"exact": "x"}}}
    assert not allow_if({"metadata": md}).evaluate().allowed
    assert allow_if({"metadata": {**md, "invert": True}}).evaluate().allowed
    assert not allow_if(princ={"metadata": md}).evaluate().allowed
    assert allow_if({"sourced_metadata": {"metadata_matcher": {**md, "invert": True}}}).evaluate().allowed
    # Istio: DENY with notRequestPrincipals ["*"] denies everything (security.md §4.2)
    deny = RbacEngine.from_xds([rules("DENY", p=policy(princ={"not_id": {"metadata": md}}))])
    assert not deny.evaluate(principal=CLIENT).allowed


# -- shadow rules, counters, metadata ------------------------------------------------------------------


def test_shadow_rules_counted_not_enforced():
    cfg = {"rules": {"action": "ALLOW", "policies": {"a": policy()}},
           "shadow_rules": {"action": "DENY", "policies": {"s": policy(hdr("x-bad"))}},
           "shadow_rules_stat_prefix": "istio_dry_run_allow_"}
    e = RbacEngine.from_xds([cfg])
    d = e.evaluate(headers=[("x-bad", "1")])
    assert d.allowed and d.shadow_allowed is False and d.shadow_policy == "s"
    assert dict(d.metadata) == {"istio_dry_run_allow_shadow_effective_policy_id": "s",
                                "istio_dry_run_allow_shadow_engine_result": "denied",
                                "enforced_effective_policy_id": "a", "enforced_engine_result": "allowed"}
    d = e.evaluate()
    assert d.shadow_allowed is True and d.shadow_policy is None
    assert e.stats == {"allowed": 2, "denied": 0, "shadow_allowed": 1, "shadow_denied": 1}
    assert e.stat_counters == {"allowed": 2, "denied": 0, "istio_dry_run_allow_.shadow_allowed": 1,
                               "istio_dry_run_allow_.shadow_denied": 1}
    only_shadow = RbacEngine.from_xds([{"shadow_rules": {"action": "ALLOW", "policies": {}}}])
    assert only_shadow.evaluate().allowed and only_shadow.stats["shadow_denied"] == 1
    assert not only_shadow.enforcing


def test_decisions_are_shared_and_immutable():
    e = allow_if(hdr("x-a"))
    d1, d2 = e.evaluate(headers=[("x-a", "1")]), e.evaluate(headers=[("x-a", "2")])
    assert d1 is d2
    with pytest.raises(AttributeError):
        d1.allowed = False  # type: ignore[misc]
    with pytest.raises(TypeError):
        d1.metadata["x"] = "y"  # type: ignore[index]


# -- per route -----------------------------------------------------------------------------------


def test_for_route_overrides():
    base = [("f0", rules("DENY", d=policy(hdr("x-a")))), ("f1", rules("ALLOW", a=policy(hdr("x-b"))))]
    e = RbacEngine.from_xds(base)
    assert not e.evaluate(headers=[("x-a", "1"), ("x-b", "1")]).allowed
    off = e.for_route({"f0": {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}})
    assert off.evaluate(headers=[("x-a", "1"), ("x-b", "1")]).allowed
    no_rules = e.for_route({"f1": {}})  # RBACPerRoute without rbac: the filter lets everything through
    assert no_rules.evaluate().allowed
    assert e.for_route({"f1": None}).evaluate().allowed
    replaced = e.for_route({1: {"rbac": rules("ALLOW", r=policy(hdr("x-c")))}})
    assert replaced.evaluate(headers=[("x-c", "1")]).policy == "r"
    assert not replaced.evaluate(headers=[("x-b", "1")]).allowed
    assert e.for_route({"not-a-filter": {}}).evaluate(headers=[("x-b", "1")]).allowed
    from envoy.extensions.filters.http.rbac.v3 import rbac_pb2

    msg = json_format.ParseDict({"rbac": rules("DENY", x=policy())}, rbac_pb2.RBACPerRoute())
    anyv = any_pb2.Any()
    anyv.Pack(msg)
    for form in (msg, anyv):
        assert not e.for_route({"f1": form}).evaluate(headers=[("x-b", "1")]).allowed
    # per-route engines count into the filters' counters
    before = e.stats["allowed"]
    off.evaluate(headers=[("x-b", "1")])
    assert e.stats["allowed"] == before + 1
    with pytest.raises(ValueError):
        e.for_route({7: {}})
    with pytest.raises(ConfigError):
        e.for_route({"f0": {"rbac": {"rules": {"policies": {"p": {"permissions": [], "principals": []}}}}}})


def test_disabled_http_filter_runs_only_where_enabled():
    f = {"name": "authz", "disabled": True, "typed_config": {"@type": RBAC_TYPE, **rules("DENY", p=policy())}}
    e = RbacEngine.from_xds([f])
    assert e.evaluate().allowed
    assert not e.for_route({"authz": {"rbac": rules("DENY", p=policy())}}).evaluate().allowed


# -- inputs and NACKs --------------------------------------------------------------------------------


def test_input_forms():
    from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

    cfg = rules("DENY", p=policy())
    msg = json_format.ParseDict(cfg, rbac_pb2.RBAC())
    anyv = any_pb2.Any()
    anyv.Pack(msg)
    hf = hcm.HttpFilter(name="envoy.filters.http.rbac.DENY", typed_config=anyv)
    for form in (cfg, {"@type": RBAC_TYPE, **cfg}, msg, anyv, hf, ("n", cfg),
                 {"name": "n", "typed_config": {"@type": RBAC_TYPE, **cfg}}):
        assert not RbacEngine.from_xds([form]).evaluate().allowed, form
    assert RbacEngine.from_xds([hf]).filters == ("envoy.filters.http.rbac.DENY",)
    with pytest.raises(ConfigError, match="@type"):
        RbacEngine.from_xds([{"@type": PER_ROUTE_TYPE}])
    with pytest.raises(ConfigError, match="unknown|no field|invalid"):
        RbacEngine.from_xds([{"rulez": {}}])
    with pytest.raises(TypeError):
        RbacEngine.from_xds([42])
    with pytest.raises(TypeError):
        RbacEngine.from_xds(cfg)


@pytest.mark.parametrize("cfg, field", [
    (rules("ALLOW", p={**policy(), "condition": {"id": "1"}}), "rules.policies[p].condition"),
    (rules("ALLOW", p={**policy(), "checked_condition": {}}), "rules.policies[p].checked_condition"),
    (rules("ALLOW", p=policy({"uri_template": {"name": "t", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig",
        "path_template": "/{x}"}}})), "rules.policies[p].permissions[0].uri_template"),
    (rules("ALLOW", p=policy({"matcher": {"name": "m", "typed_config": {
        "@type": "type.googleapis.com/google.protobuf.Empty"}}})), "rules.policies[p].permissions[0].matcher"),
    (rules("ALLOW", p=policy(princ={"filter_state": {"key": "k", "string_match": {"exact": "v"}}})),
     "rules.policies[p].principals[0].filter_state"),
    (rules("ALLOW", p=policy(hdr(":scheme", exact_match="https"))), "rules.policies[p].permissions[0].header.name"),
    (rules("ALLOW", p=policy(princ={"and_ids": {"ids": [{"not_id": hdr("Grpc-Timeout", present_match=True)}]}})),
     "rules.policies[p].principals[0].and_ids.ids[0].not_id.header.name"),
    (rules("ALLOW", p={"permissions": [], "principals": [{"any": True}]}), "rules.policies[p].permissions"),
    (rules("ALLOW", p={"permissions": [{"any": True}], "principals": []}), "rules.policies[p].principals"),
    (rules("ALLOW", p=policy({"any": False})), "rules.policies[p].permissions[0].any"),
    (rules("ALLOW", p=policy({"and_rules": {"rules": []}})), "rules.policies[p].permissions[0].and_rules.rules"),
    (rules("ALLOW", p=policy({"destination_port": 70000})), "rules.policies[p].permissions[0].destination_port"),
    (rules("ALLOW", p=policy({"destination_port_range": {"start": 9, "end": 9}})),
     "rules.policies[p].permissions[0].destination_port_range"),
    (rules("ALLOW", p=policy({"destination_ip": {"address_prefix": "10.0.0.x", "prefix_len": 8}})),
     "rules.policies[p].permissions[0].destination_ip.address_prefix"),
    (rules("ALLOW", p=policy({"url_path": {"path": {"safe_regex": {"regex": "("}}}})),
     "rules.policies[p].permissions[0].url_path.path.safe_regex.regex"),
    (rules("ALLOW", p=policy({"url_path": {"path": {"safe_regex": {"regex": ""}}}})),
     "rules.policies[p].permissions[0].url_path.path.safe_regex.regex"),
    (rules("ALLOW", p=policy(hdr("x", prefix_match=""))), "rules.policies[p].permissions[0].header.prefix_match"),
    (rules("ALLOW", p=policy(hdr(""))), "rules.policies[p].permissions[0].header.name"),
    (rules("ALLOW", p=policy({"requested_server_name": {"safe_regex": {"regex": "a"}, "ignore_case": True}})),
     "rules.policies[p].permissions[0].requested_server_name.ignore_case"),
    ({"matcher": {}}, "matcher"),
    ({"shadow_rules": {"policies": {"p": policy({"uri_template": {"name": "t"}})}}},
     "shadow_rules.policies[p].permissions[0].uri_template"),
])
def test_nacks_name_the_field(cfg, field):
    with pytest.raises(ConfigError) as e:
        RbacEngine.from_xds([("envoy.filters.http.rbac", cfg)])
    assert e.value.field == field, e.value
    assert e.value.resource == "envoy.filters.http.rbac"


def test_bad_arguments_raise():
    e = allow_if(hdr("x-a", exact_match="1"))
    with pytest.raises(TypeError):
        e.evaluate(method=b"GET")
    with pytest.raises(TypeError):
        e.evaluate(path=None)
    with pytest.raises(TypeError):
        e.evaluate(headers=[("x-a", 1)])
    with pytest.raises(TypeError):
        e.evaluate(headers="x-a: 1")
    with pytest.raises(TypeError):
        allow_if(princ={"authenticated": {}}).evaluate(principal=b"spiffe://x")
    with pytest.raises(TypeError):
        allow_if({"destination_port": 1}).evaluate(destination_port="1")
    with pytest.raises(TypeError):
        allow_if(princ={"authenticated": {}}).evaluate(peer=("spiffe://x",))
    with pytest.raises(TypeError):
        PeerCertificate(uri_sans="spiffe://x")
    with pytest.raises(ValueError):
        RbacEngine.from_xds([], xff_num_trusted_hops=-1)


def test_generated_code_holds_no_configuration_text():
    evil = "'); import os; os.system('echo pwned'); ('"
    e = allow_if(hdr("x-" + "a" * 3, exact_match=evil), {"authenticated": {"principal_name": {"prefix": evil}}})
    assert evil not in e.source and "os.system" not in e.source
    assert e.evaluate(headers=[("x-aaa", evil)], principal=evil + "x").allowed
    names = RbacEngine.from_xds([{"rules": {"action": "ALLOW", "policies": {evil: policy()}}}])
    assert evil not in names.source and names.evaluate().policy == evil


def test_deep_nesting_compiles():
    perm: Dict[str, Any] = hdr("x-a", exact_match="1")
    for i in range(30):  # ~90 message levels: protobuf (and Envoy) stop at 100
        perm = {"not_rule": {"and_rules": {"rules": [perm, {"destination_port_range": {"start": 0, "end": 65536}}]}}}
    e = allow_if(perm)
    assert "def _sub" in e.source  # deeper than the inline limit: split into functions
    # 30 negations: even -> the innermost test
    assert e.evaluate(headers=[("x-a", "1")], destination_port=80).allowed
    assert not e.evaluate(headers=[("x-a", "2")], destination_port=80).allowed


def test_istio_fixture():
    """Istio's grpcgen test (security.md §4.2): DENY echo=block, ALLOW echo=allow, DENY principal evie."""
    from .test_envoy_rbac_oracle import ISTIO_FIXTURE

    e = RbacEngine.from_xds(filters_for(ISTIO_FIXTURE))
    assert e.filters == ("envoy.filters.http.rbac.DENY", "envoy.filters.http.rbac")
    assert not e.evaluate(headers=[("echo", "block")], principal=CLIENT).allowed
    d = e.evaluate(headers=[("echo", "allow")], principal=CLIENT)
    assert d.allowed and d.policy == "ns[test]-policy[allow-allow]-rule[0]"
    assert not e.evaluate(headers=[("echo", "allow")], principal="spiffe://evie").allowed
    assert not e.evaluate(headers=[], principal=CLIENT).allowed
    d = e.evaluate(headers=[("echo", "block")], principal="spiffe://evie")
    assert d.policy == "ns[test]-policy[deny-block]-rule[0]"  # byte order: deny-block < deny-evie


def test_realistic_istio_policy():
    e = RbacEngine.from_xds(filters_for(realistic_policies(10)))
    ok = e.evaluate(method="GET", path="/api/v1/frontend/items?id=1", principal="spiffe://cluster.local/ns/prod/sa/x",
                    headers=[("x-tenant", "acme")])
    assert ok.allowed and ok.policy == "ns[prod]-policy[allow-callers]-rule[0]"
    assert not e.evaluate(method="GET", path="/api/v1/frontend/x", principal="spiffe://cluster.local/ns/evil/sa/x").allowed


# -- the engine against the reference interpreter ------------------------------------------------------


LISTENERS = [Listener("tls_a", "127.0.0.1", 15001, True), Listener("tls_c", "127.0.0.2", 15443, True),
             Listener("plain_a", "127.0.0.1", 8080, False)]


def _ref_request(r: Any, ls: Listener) -> reference.Req:
    ident = identity(r.identity)
    headers = [(k, v.strip(" \t")) for k, v in r.headers]
    return reference.Req(r.method, r.path, r.authority, headers, ls.tls,
                         uris=ident.uris if ident else (), dns=ident.dns if ident else (),
                         subject=ident.subject if ident else "", source=r.source, dest=ls.address, port=ls.port,
                         sni=r.sni if ls.tls else None)


@pytest.mark.parametrize("seed", range(6))
def test_engine_matches_reference_interpreter(seed):
    rng = random.Random(seed)
    g = Gen(rng, [ls.port for ls in LISTENERS])
    names = ("f0", "f1", "f2")
    by_name = {ls.name: ls for ls in LISTENERS}
    checked = 0
    for _ in range(60):
        base = [(n, g.rbac() if rng.random() < 0.7 else {}) for n in names]
        case = g.case(names)
        engine = RbacEngine.from_xds(base).for_route(case)
        chain: List[Optional[Dict[str, Any]]] = []
        for n, cfg in base:
            o = case.get(n, cfg if n not in case else None)
            if n in case:
                o = None if o.get("disabled") else o.get("rbac", {})
            chain.append(o)
        prefixes = [(cfg.get("rules_stat_prefix", ""), cfg.get("shadow_rules_stat_prefix", "")) for _, cfg in base]
        for _ in range(25):
            r = g.request(0, LISTENERS)
            ls = by_name[r.listener]
            ident = identity(r.identity)
            peer = (PeerCertificate() if ident is None else PeerCertificate(ident.uris, ident.dns, ident.subject)) \
                if ls.tls else None
            d = engine.evaluate(r.method, r.path, [(k, v.strip(" \t")) for k, v in r.headers], r.authority,
                                None, r.source, 1, ls.address, ls.port, r.sni if ls.tls else None, peer=peer)
            want = reference.decide(chain, prefixes, _ref_request(r, ls))
            assert (d.allowed, dict(d.metadata)) == want, (r, case, base)
            checked += 1
    assert checked == 60 * 25


def test_identities_cover_the_san_kinds():
    assert {bool(i.uris) for i in IDENTITIES} == {True, False}
    assert any(i.dns for i in IDENTITIES) and any(i.subject_attrs for i in IDENTITIES)


def test_peer_certificate_from_der():
    from cryptography.hazmat.primitives import serialization

    from tls.pki import CA

    from .rbac_oracle import Identity, issue

    ident = Identity("x", uris=("spiffe://td/ns/a/sa/b", "spiffe://td/ns/c/sa/d"), dns=("api.example.com",),
                     subject_attrs=(("O", "Acme Corp"), ("CN", "legacy")))
    leaf = issue(CA.new("der-test"), ident)
    peer = PeerCertificate.from_der(leaf.cert.public_bytes(serialization.Encoding.DER))
    assert peer == PeerCertificate(ident.uris, ident.dns, "CN=legacy,O=Acme Corp")  # Envoy's RFC 2253 order
    assert peer.names == (*ident.uris, "api.example.com", "CN=legacy,O=Acme Corp")
    assert hash(peer) == hash(PeerCertificate(ident.uris, ident.dns, "CN=legacy,O=Acme Corp"))
    with pytest.raises(AttributeError):
        peer.subject = "x"  # type: ignore[misc]


def test_lazy_export_loads_no_grpc():
    import json
    import subprocess
    import sys

    code = ("import sys, json, meshcore; e = meshcore.RbacEngine.from_xds([{'rules': {'action': 'DENY'}}]); "
            "meshcore.PeerCertificate(); print(json.dumps({'grpc': 'grpc' in sys.modules, "
            "'allowed': e.evaluate().allowed}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"grpc": False, "allowed": True}
