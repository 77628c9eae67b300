"""The RBAC of inbound chains (``InboundChain.rbac`` / ``rbac_for``, built with ``meshcore.RbacEngine``).

* istiod grpcgen's filters over the reference control plane: DENY then ALLOW, decided per request; Istio's
  own fixture (``grpcgen_test.go initRBACTests``: DENY ``echo: block``, ALLOW ``echo: allow``, DENY
  ``principals: [evie]``).
* What A41 NACKs inside an RBAC filter or an RBACPerRoute is a NACK of the Listener (gRPC shape), and an
  unsupported chain in the Envoy shape.
* ``RBACPerRoute`` / ``FilterConfig`` overrides per route; ``remote_ip`` is the peer in the gRPC shape (A41).
"""

from __future__ import annotations

from typing import Any, Dict, Iterator

import pytest
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.path.match.uri_template.v3 import uri_template_match_pb2  # noqa: F401  (registers the type)
from google.protobuf import json_format

import meshcore
from meshcore import ConfigError
from meshcore.controlplane import ControlPlane, istio_sidecar
from meshcore.xds.server_listener import server_listener_spec
from tls.pki import certificate_providers

from .grpcgen_inbound import TEMPLATE, inbound_listener, inbound_route_config, pack

import meshcore.rbac  # noqa: E402,F401  (a test dependency: the test extras install it)

CLIENT = "spiffe://cluster.local/ns/default/sa/client"
EVIL = "spiffe://cluster.local/ns/default/sa/evil"
DENY_EVIL = {"ns-deny-evil-0": {"permissions": [{"any": True}], "principals": [
    {"and_ids": {"ids": [{"or_ids": {"ids": [{"authenticated": {"principal_name": {"exact": EVIL}}}]}}]}}]}}
ALLOW_MESH = {"ns-allow-mesh-0": {"permissions": [{"and_rules": {"rules": [{"any": True}]}}], "principals": [
    {"and_ids": {"ids": [{"or_ids": {"ids": [{"authenticated": {"principal_name": {"prefix": "spiffe://cluster.local/"}}}]}}]}}]}}


def _chain(**kw: Any) -> Any:
    (c,) = server_listener_spec(inbound_listener(8080, **kw), {"default"}).filter_chains
    return c


def _req(**kw: Any) -> Dict[str, Any]:
    base = dict(method="POST", path="/echo.EchoTestService/Echo", authority="server:8080",
                source_ip="10.1.1.1", source_port=40000, destination_ip="10.0.0.9", destination_port=8080)
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def plane() -> Iterator[ControlPlane]:
    with ControlPlane() as cp:
        yield cp


def test_grpcgen_deny_then_allow_over_the_control_plane(plane: ControlPlane, tmp_path: Any) -> None:
    plane.set_resources([inbound_listener(8080, deny=DENY_EVIL, allow=ALLOW_MESH)])
    b = {"xds_servers": [{"server_uri": f"127.0.0.1:{plane.port}", "channel_creds": [{"type": "insecure"}]}],
         "node": {"id": "sidecar~10.0.0.9~server-0.default~default.svc.cluster.local"},
         "certificate_providers": certificate_providers(tmp_path), "server_listener_resource_name_template": TEMPLATE}
    with meshcore.Mesh(b) as mesh:
        lst = mesh.serve(8080)
        assert lst.wait_serving(5)
        chain = lst.select("10.1.1.1", 40000, "10.0.0.9", 8080, True)
        route = chain.route("server:8080", "/echo.EchoTestService/Echo", method="POST")
        engine = chain.rbac_for(route)
        assert engine is chain.rbac  # no per-route override
        d = engine.evaluate(**_req(principal=CLIENT))
        assert d.allowed and d.policy == "ns-allow-mesh-0"
        d = engine.evaluate(**_req(principal=EVIL))
        assert not d.allowed and d.policy == "ns-deny-evil-0"
        assert not engine.evaluate(**_req(principal=None)).allowed  # plaintext: no ALLOW policy matches
        assert not engine.evaluate(**_req(principal="spiffe://other.domain/ns/default/sa/client")).allowed


def test_istio_grpcgen_fixture() -> None:
    deny = {"default-deny-block-0": {"permissions": [{"and_rules": {"rules": [{"or_rules": {"rules": [
        {"header": {"name": "echo", "string_match": {"exact": "block"}}}]}}]}}], "principals": [{"any": True}]},
        "default-deny-evie-0": {"permissions": [{"any": True}], "principals": [
            {"authenticated": {"principal_name": {"exact": "spiffe://evie"}}}]}}
    allow = {"default-allow-0": {"permissions": [{"and_rules": {"rules": [{"or_rules": {"rules": [
        {"header": {"name": "echo", "string_match": {"exact": "allow"}}}]}}]}}], "principals": [{"any": True}]}}
    engine = _chain(deny=deny, allow=allow).rbac
    assert not engine.evaluate(**_req(headers=[("echo", "block")], principal=CLIENT)).allowed
    assert engine.evaluate(**_req(headers=[("echo", "allow")], principal=CLIENT)).allowed
    assert not engine.evaluate(**_req(headers=[("echo", "other")], principal=CLIENT)).allowed
    d = engine.evaluate(**_req(headers=[("echo", "allow")], principal="spiffe://evie"))
    assert not d.allowed and d.policy == "default-deny-evie-0"


@pytest.mark.parametrize("policy,field", [
    ({"permissions": [{"any": True}], "principals": [{"any": True}], "condition": {"const_expr": {"bool_value": True}}},
     "condition"),
    ({"permissions": [{"header": {"name": ":scheme", "string_match": {"exact": "https"}}}],
      "principals": [{"any": True}]}, ":scheme"),
    ({"permissions": [{"uri_template": {"name": "envoy.path.match.uri_template.uri_template_matcher",
                                        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.path.match."
                                                         "uri_template.v3.UriTemplateMatchConfig",
                                                         "path_template": "/{x}"}}}],
      "principals": [{"any": True}]}, "uri_template"),
])
def test_a41_rejections_nack_the_listener(policy: Dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        server_listener_spec(inbound_listener(8080, allow={"p": policy}), {"default"})
    text = str(info.value)
    assert info.value.resource == "xds.istio.io/grpc/lds/inbound/0.0.0.0:8080"
    assert "http_filters[0].typed_config" in text and field in text


def _with_routes(route_config: Any, **kw: Any) -> Any:
    lis = inbound_listener(8080, **kw)
    h = hcm_pb2.HttpConnectionManager()
    lis.filter_chains[0].filters[0].typed_config.Unpack(h)
    h.route_config.CopyFrom(route_config)
    lis.filter_chains[0].filters[0].typed_config.Pack(h)
    return lis


def test_rbac_per_route_and_disabled_per_route() -> None:
    rc = inbound_route_config()
    vh = rc.virtual_hosts[0]
    admin = route_components_pb2.Route(name="admin", match=route_components_pb2.RouteMatch(prefix="/admin"))
    admin.non_forwarding_action.SetInParent()
    admin.typed_per_filter_config["envoy.filters.http.rbac"].Pack(json_format.ParseDict(
        {"rbac": {"rules": {"action": "ALLOW", "policies": {"admins": {"permissions": [{"any": True}], "principals": [
            {"authenticated": {"principal_name": {"exact": "spiffe://cluster.local/ns/default/sa/admin"}}}]}}}}},
        rbac_pb2.RBACPerRoute()))
    open_ = route_components_pb2.Route(name="open", match=route_components_pb2.RouteMatch(prefix="/open"))
    open_.non_forwarding_action.SetInParent()
    off = route_components_pb2.FilterConfig(disabled=True)
    open_.typed_per_filter_config["envoy.filters.http.rbac"].Pack(off)
    vh.routes.insert(0, open_)
    vh.routes.insert(0, admin)
    (chain,) = server_listener_spec(_with_routes(rc, allow=ALLOW_MESH), {"default"}).filter_chains

    def decide(path: str, principal: Any) -> bool:
        route = chain.route("server:8080", path)
        return chain.rbac_for(route).evaluate(**_req(path=path, principal=principal)).allowed

    assert decide("/other", CLIENT) and not decide("/other", None)
    assert not decide("/admin/x", CLIENT) and decide("/admin/x", "spiffe://cluster.local/ns/default/sa/admin")
    assert decide("/open", None)  # the ALLOW filter does not run on this route
    route = chain.route("server:8080", "/admin")
    assert chain.rbac_for(route) is chain.rbac_for(route)  # compiled once per route


def test_rbac_per_route_a41_rejection_nacks() -> None:
    rc = inbound_route_config()
    rc.virtual_hosts[0].routes[0].typed_per_filter_config["envoy.filters.http.rbac"].Pack(json_format.ParseDict(
        {"rbac": {"rules": {"policies": {"p": {"permissions": [{"any": True}], "principals": [{"any": True}],
                                               "condition": {"const_expr": {"bool_value": True}}}}}}},
        rbac_pb2.RBACPerRoute()))
    with pytest.raises(ConfigError, match="condition"):
        server_listener_spec(_with_routes(rc, allow=ALLOW_MESH), {"default"})


def test_remote_ip_is_the_peer_in_the_grpc_shape() -> None:
    allow = {"from-pods": {"permissions": [{"any": True}],
                           "principals": [{"remote_ip": {"address_prefix": "10.244.0.0", "prefix_len": 16}}]}}
    engine = _chain(mode="PERMISSIVE", allow=allow).rbac
    assert engine.evaluate(**_req(source_ip="10.244.1.1")).allowed
    spoofed = _req(source_ip="192.168.0.1", headers=[("x-forwarded-for", "10.244.1.1")])
    assert not engine.evaluate(**spoofed).allowed  # A41: x-forwarded-for is not trusted


def test_envoy_shape_keeps_rbac_and_refuses_what_a41_rejects() -> None:
    desc = {"services": [{"name": "server", "namespace": "default", "vip": "10.96.0.5",
                          "ports": [{"port": 80, "name": "http", "protocol": "http", "target_port": 8080}],
                          "endpoints": [{"ip": "10.0.0.9"}]}],
            "proxy": {"ip": "10.0.0.9"}, "mesh": {"mtls_mode": "STRICT"}}

    def virtual_inbound(policy: Dict[str, Any]) -> Any:
        (vi,) = [x for x in istio_sidecar.build(desc)["listeners"] if x.name == "virtualInbound"]
        for fc in vi.filter_chains:
            if fc.name == "0.0.0.0_8080":
                h = hcm_pb2.HttpConnectionManager()
                fc.filters[-1].typed_config.Unpack(h)
                f = h.http_filters.add(name="envoy.filters.http.rbac")
                f.typed_config.CopyFrom(pack(json_format.ParseDict(
                    {"rules": {"action": "ALLOW", "policies": {"p": policy}}}, rbac_pb2.RBAC())))
                h.http_filters.insert(0, f)
                del h.http_filters[-1]
                fc.filters[-1].typed_config.Pack(h)
        return vi

    ok = {"permissions": [{"any": True}], "principals": [{"authenticated": {"principal_name": {"exact": CLIENT}}}]}
    spec = server_listener_spec(virtual_inbound(ok), shape="envoy")
    chain = spec.select("10.1.1.1", 40000, "10.0.0.9", 8080, True, None, ["istio-http/1.1", "istio", "http/1.1"])
    assert [n for n, _ in chain.rbac_filters] == ["envoy.filters.http.rbac"] and chain.unsupported == ()
    assert chain.rbac.evaluate(**_req(principal=CLIENT)).allowed
    assert not chain.rbac.evaluate(**_req(principal=EVIL)).allowed
    bad = dict(ok, condition={"const_expr": {"bool_value": True}})
    spec = server_listener_spec(virtual_inbound(bad), shape="envoy")  # no NACK in the Envoy shape ...
    chain = spec.select("10.1.1.1", 40000, "10.0.0.9", 8080, True, None, ["istio-http/1.1"])
    assert any("condition" in u for u in chain.unsupported)  # ... the chain is refused instead
