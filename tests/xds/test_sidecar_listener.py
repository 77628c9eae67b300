"""``meshcore.xds.sidecar_listener``: an Envoy sidecar's Listeners (istiod's SIDECAR shape) and the
outbound path of a connection (listener by original destination, Envoy's FilterChainMatch order).

* Every Listener of the real Istio dumps in ``tests/fixtures/istio`` decodes: ``config_dump.json``
  (Istio 1.21, v3: a static listener and the ambient ``main_internal`` listener with a
  ``filter_chain_matcher``) and the Istio bootstrap ``default_golden.json`` (v3, static
  listeners); ``productpage-v1-*.json`` is Istio 1.3 (``envoy.api.v2.Listener``): refused as it is,
  and decoded after :func:`v2_listener_to_v3` (type URLs, ``tls_context``, name-only filters, Struct
  ``config``), which is also how its 51 dynamic listeners are checked for resolution.
* Every Listener ``istio_sidecar.build(generated(...))`` makes decodes (seeds, with and without
  Istio's own filters) with nothing unsupported; resolution on built meshes: HTTP ports, TCP VIPs,
  unknown ports (ALLOW_ANY / REGISTRY_ONLY), decision-changing filters named in ``unsupported``.
* ``envoy`` marker: ONE real Envoy 1.40 with listeners whose chains differ in destination port,
  destination/source/direct-source ranges, server names, transport and application protocols,
  source type and source ports, each chain answering its own name; plaintext HTTP/1.1 requests to
  loopback addresses; meshcore's ``resolve_outbound`` must pick the chain Envoy picked.
"""

from __future__ import annotations

import copy
import http.client
import ipaddress
import json
import os
import socket
import sys
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Tuple

import pytest
from google.protobuf import any_pb2, wrappers_pb2

from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.http.stateful_session.v3 import stateful_session_pb2
from envoy.extensions.filters.http.wasm.v3 import wasm_pb2
from envoy.extensions.filters.network.connection_limit.v3 import connection_limit_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from meshcore import ConfigError
from meshcore.controlplane import istio_sidecar
from meshcore.xds.sidecar_listener import (
    FilterChainMatchSpec, FilterChainSpec, OutboundResolution, SidecarListenerSpec, resolve_outbound,
    sidecar_listener_spec,
)

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
from envoy_process import EnvoyProcess, find_envoy, free_port, socket_address  # noqa: E402

ISTIO = os.path.join(TESTS, "fixtures", "istio")
T = "type.googleapis.com/"
HCM_TYPE = T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER_TYPE = T + "envoy.extensions.filters.http.router.v3.Router"
HTTP_INSPECTOR = {"name": "envoy.filters.listener.http_inspector",
                  "typed_config": {"@type": T + "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"}}
ISTIO_FILTERS = {"istio.metadata_exchange", "istio.alpn", "istio.stats"}


def _load(name: str) -> Any:
    with open(os.path.join(ISTIO, name)) as f:
        return json.load(f)


def dump_listeners(dump: Mapping[str, Any]) -> List[Tuple[str, Dict[str, Any]]]:
    """``(where, Listener dict)`` for every listener of an admin /config_dump (static, and the
    active/warming/draining state of dynamic ones) or of a bootstrap's ``static_resources``."""
    out = []
    for c, cfg in enumerate(dump.get("configs", [])):
        if not cfg.get("@type", "").endswith("ListenersConfigDump"):
            continue
        for i, s in enumerate(cfg.get("static_listeners", [])):
            out.append((f"configs[{c}].static_listeners[{i}]", s["listener"]))
        for i, d in enumerate(cfg.get("dynamic_listeners", [])):
            for state in ("active_state", "warming_state", "draining_state"):
                if state in d:
                    out.append((f"configs[{c}].dynamic_listeners[{i}].{state}", d[state]["listener"]))
    for i, lis in enumerate(dump.get("static_resources", {}).get("listeners", [])):
        out.append((f"static_resources.listeners[{i}]", lis))
    return out


# -- the v2 (Istio 1.3) dump -----------------------------------------------------------------------

V2_TYPES = {
    T + "envoy.api.v2.Listener": T + "envoy.config.listener.v3.Listener",
    T + "envoy.config.filter.network.http_connection_manager.v2.HttpConnectionManager": HCM_TYPE,
    T + "envoy.config.filter.network.tcp_proxy.v2.TcpProxy": T + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
}
V2_NETWORK_NAMES = {"envoy.http_connection_manager": HCM_TYPE,
                    "envoy.tcp_proxy": T + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"}
V2_HTTP_NAMES = {"envoy.router": ROUTER_TYPE, "envoy.fault": T + "envoy.extensions.filters.http.fault.v3.HTTPFault",
                 "envoy.cors": T + "envoy.extensions.filters.http.cors.v3.Cors"}
V2_TLS = T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"


def v2_listener_to_v3(listener: Mapping[str, Any]) -> Dict[str, Any]:
    """An ``envoy.api.v2.Listener`` dict (Istio 1.3) as v3, changing only what v3 lacks:

    * type URLs of the Listener, HCM and TcpProxy -> v3 (same fields otherwise);
    * a filter's Struct ``config`` (v2) -> ``typed_config`` of its type, by the filter's name; a
      lone object where the Struct took a list (``http_filters``) -> a list;
    * name-only HTTP filters (router, fault, cors) get their v3 ``typed_config``;
    * a chain's ``tls_context`` -> ``transport_socket`` with a v3 ``DownstreamTlsContext``;
    * HCM ``tracing.operation_name`` (not in v3) dropped; an inline route config's ``@type``
      dropped (a message there, not an ``Any``).

    Istio 1.3's own filters (``mixer``, ``istio_authn``) keep their types: meshcore knows no protos
    for them and keeps them as TypedStruct, and the decoder reports them unsupported."""
    out = copy.deepcopy(dict(listener))
    out["@type"] = V2_TYPES[out["@type"]]
    for fc in out.get("filter_chains", []):
        tls = fc.pop("tls_context", None)
        if tls is not None:
            fc["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": dict(tls, **{"@type": V2_TLS})}
        for f in fc.get("filters", []):
            if "config" in f and f["name"] in V2_NETWORK_NAMES:
                f["typed_config"] = dict(f.pop("config"), **{"@type": V2_NETWORK_NAMES[f["name"]]})
            tc = f.get("typed_config") or {}
            tc["@type"] = V2_TYPES.get(tc.get("@type"), tc.get("@type"))
            if tc.get("@type") != HCM_TYPE:
                continue
            tc.get("tracing", {}).pop("operation_name", None)
            if isinstance(tc.get("route_config"), dict):
                tc["route_config"].pop("@type", None)
            if isinstance(tc.get("http_filters"), dict):
                tc["http_filters"] = [tc["http_filters"]]
            for hf in tc.get("http_filters", []):
                if "typed_config" not in hf and hf.get("name") in V2_HTTP_NAMES:
                    hf["typed_config"] = {"@type": V2_HTTP_NAMES[hf["name"]]}
    return out


def all_unsupported(spec: SidecarListenerSpec) -> List[str]:
    chains = list(spec.filter_chains) + ([spec.default_filter_chain] if spec.default_filter_chain else [])
    return list(spec.unsupported) + [u for c in chains for u in c.unsupported]


# -- fixtures: v3 ------------------------------------------------------------------------------------


def test_every_v3_fixture_listener_decodes() -> None:
    found: Dict[str, SidecarListenerSpec] = {}
    for name in ("config_dump.json", "default_golden.json"):
        listeners = dump_listeners(_load(name))
        assert listeners, name
        for where, lis in listeners:
            spec = sidecar_listener_spec(lis)
            found[f"{name}:{spec.name or where}"] = spec
    assert len(found) == 4
    # Istio 1.21: the agent's health listener (static, unnamed), inline route config
    (health,) = [s for k, s in found.items() if k.startswith("config_dump.json:configs")]
    assert health.address == ("0.0.0.0", 15021)
    (chain,) = health.filter_chains
    assert chain.kind == "http" and chain.hcm.route_config is not None and not all_unsupported(health)
    # the ambient waypoint's internal listener: no address; the unified matcher is not supported;
    # its chains still decode (Istio's filters ignored; connect_authority is unsupported)
    internal = found["config_dump.json:main_internal"]
    assert internal.address is None and internal.has_filter_chain_matcher
    assert internal.unsupported == ("filter_chain_matcher: the unified filter chain matcher is not supported",)
    assert internal.listener_filters == ("envoy.filters.listener.original_dst", "envoy.filters.listener.http_inspector")
    assert internal.http_inspector
    by_name = {c.name: c for c in internal.filter_chains}
    vip = by_name["inbound-vip|8000||httpbin.default.svc.cluster.local-http"]
    assert vip.kind == "http" and not vip.unsupported
    assert vip.hcm.ignored_filters == ("envoy.filters.http.grpc_stats", "envoy.filters.http.cors",
                                       "waypoint_upstream_peer_metadata", "istio.stats")
    assert [f.name for f in vip.hcm.http_filters] == ["envoy.filters.http.fault", "envoy.filters.http.router"]
    assert vip.hcm.normalize_path and vip.hcm.path_with_escaped_slashes_action == "KEEP_UNCHANGED"
    tcp = by_name["direct-tcp"]
    assert tcp.kind == "tcp" and tcp.tcp.cluster == "encap"
    assert tcp.filters == ("connect_authority", "istio.metadata_exchange", "istio.stats", "envoy.filters.network.tcp_proxy")
    assert len(tcp.unsupported) == 1 and "'connect_authority'" in tcp.unsupported[0]
    # a match on an internal listener without an address never resolves
    assert resolve_outbound({"main_internal": internal}, "10.104.171.68", 8000, vip="10.104.171.68").kind == "none"
    # the Istio bootstrap: prometheus (compressors: response compression, ignored) and health
    prom = found["default_golden.json:0.0.0.0_15090"]
    assert prom.filter_chains[0].hcm.ignored_filters == (
        "envoy.filters.http.compressor.brotli", "envoy.filters.http.compressor.zstd", "envoy.filters.http.compressor.gzip")
    assert not all_unsupported(prom) and not all_unsupported(found["default_golden.json:0.0.0.0_15021"])


# -- fixtures: the v2 dump (Istio 1.3) ---------------------------------------------------------------

PP_IP = "172.30.150.216"


@pytest.fixture(scope="module")
def v2_specs() -> Dict[str, SidecarListenerSpec]:
    out = {}
    for where, lis in dump_listeners(_load("productpage-v1-7bbd79f8fd-k6j79.json")):
        assert lis["@type"] == T + "envoy.api.v2.Listener", where
        spec = sidecar_listener_spec(v2_listener_to_v3(lis))
        out[spec.name or where] = spec
    return out


def test_v2_listener_is_refused_unconverted() -> None:
    (where, lis), *_ = dump_listeners(_load("productpage-v1-7bbd79f8fd-k6j79.json"))
    with pytest.raises(ConfigError, match="envoy.api.v2.Listener"):
        sidecar_listener_spec(lis)


def test_every_v2_fixture_listener_decodes_converted(v2_specs: Dict[str, SidecarListenerSpec]) -> None:
    assert len(v2_specs) == 52  # 1 static + 51 dynamic
    vo = v2_specs["virtualOutbound"]
    assert vo.use_original_dst and vo.address == ("0.0.0.0", 15001)
    pod_chain, catch_all = vo.filter_chains
    assert pod_chain.match.prefix_ranges == (ipaddress.ip_network(f"{PP_IP}/32"),
                                             ipaddress.ip_network("fe80::863:a7ff:fe55:26a9/128"))
    assert pod_chain.tcp.cluster == "BlackHoleCluster" and catch_all.tcp.cluster == "PassthroughCluster"
    sniffed = v2_specs["172.21.0.10_9153"]  # protocol sniffing: a TCP chain and an HTTP chain by ALPN
    assert sniffed.http_inspector and not sniffed.bind_to_port  # v2 deprecated_v1.bind_to_port: false
    assert [c.kind for c in sniffed.filter_chains] == ["tcp", "http"]
    assert sniffed.filter_chains[1].match.application_protocols == ("http/1.1", "http/1.0")
    inbound = v2_specs[f"{PP_IP}_9080"]
    assert inbound.filter_chains[0].terminates_tls and inbound.filter_chains[0].match.application_protocols == ("istio",)
    # Istio 1.3's Mixer (policy checks) and authn filters are unsupported wherever they are
    for spec in v2_specs.values():
        for chain in spec.filter_chains:
            for entry in chain.unsupported:
                assert "Istio Mixer" in entry or "Istio authentication" in entry, entry


def test_v2_dump_resolution(v2_specs: Dict[str, SidecarListenerSpec]) -> None:
    def go(host: str, port: int, vip: Optional[str], protocol: str = "http") -> OutboundResolution:
        return resolve_outbound(v2_specs, host, port, vip=vip, protocol=protocol, source_ip=PP_IP)

    r = go("reviews.default.svc.cluster.local", 9080, "172.21.95.172")  # 1.3: a listener per HTTP VIP
    assert (r.kind, r.listener, r.route_config_name) == ("http", "172.21.95.172_9080", "reviews.default.svc.cluster.local:9080")
    assert r.via_original_dst and r.chain_index == 1 and "'mixer'" in r.unsupported[0]
    r = go("kube-dns.kube-system", 9153, "172.21.0.10")  # sniffed port, HTTP/1.1 -> the HTTP chain
    assert (r.kind, r.route_config_name, r.chain_index) == ("http", "kube-dns.kube-system.svc.cluster.local:9153", 1)
    r = go("kube-dns.kube-system", 9153, "172.21.0.10", "tcp")  # raw TCP -> the tcp_proxy chain
    assert (r.kind, r.cluster, r.chain_index) == ("tcp", "outbound|9153||kube-dns.kube-system.svc.cluster.local", 0)
    assert go("kube-dns.kube-system", 9153, "172.21.0.10", "h2c").chain_index == 0  # h2c is not http/1.x there
    r = go("somewhere", 9080, None)  # unknown destination IP: only catch-all ranges -> the HCM chain
    assert (r.kind, r.listener, r.route_config_name) == ("http", "0.0.0.0_9080", "9080")
    r = go("10.1.2.3", 8080, None, "tcp")  # an IP literal host is the destination
    assert (r.kind, r.listener, r.destination_ip) == ("http", "0.0.0.0_8080", "10.1.2.3")
    assert r.unsupported[-1] == "a raw TCP connection reaches an HttpConnectionManager"
    r = go("me", 8080, PP_IP, "tcp")  # the pod's own IP on an HTTP port: 1.3's loop guard
    assert (r.kind, r.chain_index) == ("blackhole", 0)
    r = go("me", 9080, PP_IP)  # the pod's own IP on its service port: its inbound listener
    assert (r.kind, r.listener, r.chain_index) == ("http", f"{PP_IP}_9080", 1) and r.hcm.route_config is not None
    r = go("example.com", 5555, "93.184.216.34", "tcp")
    assert (r.kind, r.listener, r.chain_index) == ("passthrough", "virtualOutbound", 1)
    r = go("me", 5555, PP_IP, "tcp")
    assert (r.kind, r.listener, r.chain_index) == ("blackhole", "virtualOutbound", 0)


# -- istio_sidecar.build -------------------------------------------------------------------------------


def built(desc: Mapping[str, Any], **kw: Any) -> Tuple[Dict[str, Any], Dict[str, SidecarListenerSpec]]:
    res = istio_sidecar.build(desc, **kw)
    return res, {lis.name: sidecar_listener_spec(lis) for lis in res["listeners"]}


@pytest.mark.parametrize("ext", [True, False], ids=["istio-filters", "upstream-filters"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_every_built_listener_decodes(seed: int, ext: bool) -> None:
    desc = istio_sidecar.generated(40, seed)
    res, specs = built(desc, istio_proxy_extensions=ext, domains_with_port=seed % 2 == 1)
    assert len(specs) == len(res["listeners"])
    for spec in specs.values():
        assert all_unsupported(spec) == [], spec.name
        for chain in spec.filter_chains + ((spec.default_filter_chain,) if spec.default_filter_chain else ()):
            assert chain.kind in ("http", "tcp"), (spec.name, chain.name)
            if chain.kind == "http":
                h = chain.hcm
                assert h.normalize_path and not h.merge_slashes and h.path_with_escaped_slashes_action == "KEEP_UNCHANGED"
                assert [f.name for f in h.http_filters] == ["envoy.filters.http.fault", "envoy.filters.http.router"]
                # Istio's own filters are ignored (istio.alpn is on outbound HCMs only)
                istio = ISTIO_FILTERS - ({"istio.alpn"} if spec.name == "virtualInbound" else set())
                assert istio.issubset(h.ignored_filters) == ext
    vo = specs["virtualOutbound"]
    assert vo.use_original_dst and [c.name for c in vo.filter_chains] == ["virtualOutbound-blackhole",
                                                                          "virtualOutbound-catchall-tcp"]


def _services(desc: Mapping[str, Any]) -> List[Tuple[Dict[str, Any], Dict[str, Any], str]]:
    return [(svc, port, f"{svc['name']}.{svc['namespace']}.svc.cluster.local")
            for svc in desc["services"] for port in svc["ports"]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_resolution_on_built_meshes(seed: int) -> None:
    desc = istio_sidecar.generated(40, seed)
    _, specs = built(desc)
    proxy_ip = desc["proxy"]["ip"]
    kinds = set()
    for svc, port, fqdn in _services(desc):
        p = port["port"]
        r = resolve_outbound(specs, fqdn, p, vip=svc["vip"], protocol="http", source_ip=proxy_ip)
        assert not r.unsupported, r
        if port["protocol"] == "tcp":
            assert (r.kind, r.listener, r.cluster) == ("tcp", f"{svc['vip']}_{p}", f"outbound|{p}||{fqdn}"), r.reason
            assert r.tcp.idle_timeout == 3600.0
        else:
            assert (r.kind, r.listener, r.route_config_name) == ("http", f"0.0.0.0_{p}", str(p)), r.reason
            assert r.chain_index == 0 and r.via_original_dst
            assert r.hcm.normalize_path
            h2 = resolve_outbound(specs, fqdn, p, vip=svc["vip"], protocol="h2c", source_ip=proxy_ip)
            assert h2.chain is r.chain
            # raw TCP to an HTTP port: the HTTP inspector finds no HTTP -> the PassthroughFilterChain
            raw = resolve_outbound(specs, fqdn, p, vip=svc["vip"], protocol="tcp")
            assert (raw.kind, raw.default_chain, raw.chain.name) == ("passthrough", True, "PassthroughFilterChain")
            # by name only (no VIP known): the same listener and chain
            assert resolve_outbound(specs, fqdn, p, vip=None).chain is r.chain
        kinds.add(r.kind)
    assert kinds == {"http", "tcp"}
    r = resolve_outbound(specs, "example.com", 1234, vip="93.184.216.34", protocol="http")
    assert (r.kind, r.listener, r.chain.name) == ("passthrough", "virtualOutbound", "virtualOutbound-catchall-tcp")
    r = resolve_outbound(specs, "10.0.0.1", 15001, vip=None)
    assert (r.kind, r.chain.name) == ("blackhole", "virtualOutbound-blackhole")


def test_registry_only_blackholes_unknown_destinations() -> None:
    desc = {"services": [
        {"name": "web", "namespace": "default", "vip": "10.96.0.10",
         "ports": [{"port": 8080, "protocol": "http", "name": "http"}], "endpoints": [{"ip": "10.244.0.5"}]},
        {"name": "db", "namespace": "default", "vip": "10.96.0.11",
         "ports": [{"port": 5432, "protocol": "tcp", "name": "tcp"}], "endpoints": [{"ip": "10.244.0.6"}]}],
        "mesh": {"outbound_traffic_policy": "REGISTRY_ONLY"}}
    _, specs = built(desc)
    assert resolve_outbound(specs, "example.com", 1234, vip="93.184.216.34").kind == "blackhole"
    r = resolve_outbound(specs, "web", 8080, vip="10.96.0.10", protocol="tcp")
    assert (r.kind, r.chain.name) == ("blackhole", "PassthroughFilterChain")
    assert resolve_outbound(specs, "web", 8080, vip="10.96.0.10").route_config_name == "8080"
    r = resolve_outbound(specs, "db", 5432, vip="10.96.0.11", protocol="tcp")
    assert r.cluster == "outbound|5432||db.default.svc.cluster.local"
    # the TCP service's port on another IP: no <ip>_5432 and no 0.0.0.0_5432 listener
    assert resolve_outbound(specs, "db", 5432, vip="10.96.0.99", protocol="tcp").kind == "blackhole"


def test_tcp_proxy_settings_from_a_destination_rule() -> None:
    desc = {"services": [{"name": "db", "namespace": "default", "vip": "10.96.0.11",
                          "ports": [{"port": 5432, "protocol": "tcp", "name": "tcp"}], "endpoints": [{"ip": "10.244.0.6"}]}],
            "destination_rules": [{"name": "db", "namespace": "default", "host": "db", "trafficPolicy": {
                "connectionPool": {"tcp": {"idleTimeout": "30s", "maxConnectionDuration": "1h"}},
                "loadBalancer": {"consistentHash": {"useSourceIp": True}}}}]}
    _, specs = built(desc)
    tcp = resolve_outbound(specs, "db", 5432, vip="10.96.0.11", protocol="tcp").tcp
    assert (tcp.cluster, tcp.idle_timeout, tcp.max_downstream_connection_duration, tcp.hash_policy) == (
        "outbound|5432||db.default.svc.cluster.local", 30.0, 3600.0, ("source_ip",))


# -- decision-changing filters in a built listener ----------------------------------------------------

WEB = {"services": [{"name": "web", "namespace": "default", "vip": "10.96.0.10",
                     "ports": [{"port": 8080, "protocol": "http", "name": "http"}], "endpoints": [{"ip": "10.244.0.5"}]},
                    {"name": "db", "namespace": "default", "vip": "10.96.0.11",
                     "ports": [{"port": 5432, "protocol": "tcp", "name": "tcp"}], "endpoints": [{"ip": "10.244.0.6"}]}]}


def _pack(msg: Any) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def _with_hcm(edit: Any, **kw: Any) -> Dict[str, SidecarListenerSpec]:
    """The WEB mesh's listeners with ``edit(hcm)`` applied to the HCM of ``0.0.0.0_8080``."""
    res = istio_sidecar.build(WEB, **kw)
    out = {}
    for lis in res["listeners"]:
        if lis.name == "0.0.0.0_8080":
            lis = copy.deepcopy(lis)
            f = lis.filter_chains[0].filters[-1]
            h = hcm_pb2.HttpConnectionManager()
            assert f.typed_config.Unpack(h)
            edit(h)
            f.typed_config.Pack(h)
        out[lis.name] = sidecar_listener_spec(lis)
    return out


def _insert_before_router(name: str, config: Any, *, disabled: bool = False) -> Any:
    def edit(h: Any) -> None:
        flt = hcm_pb2.HttpFilter(name=name, disabled=disabled, typed_config=_pack(config))
        h.http_filters.insert(len(h.http_filters) - 1, flt)
    return edit


UNSUPPORTED_CASES = [
    ("envoy.filters.http.ext_authz", ext_authz_pb2.ExtAuthz(), "external authorization"),
    ("envoy.filters.http.lua", lua_pb2.Lua(default_source_code={"inline_string": "function envoy_on_request(h) end"}),
     "Lua"),
    ("my.wasm", wasm_pb2.Wasm(), "Wasm plugin"),
    ("envoy.filters.http.rbac", http_rbac_pb2.RBAC(rules={"action": "DENY"}), "RBAC"),
    ("envoy.filters.http.stateful_session", stateful_session_pb2.StatefulSession(), "stateful sessions"),
    ("envoy.filters.http.grpc_json_transcoder", wrappers_pb2.StringValue(value="x"), "unknown HTTP filter"),
]


@pytest.mark.parametrize("name, config, why", UNSUPPORTED_CASES, ids=[c[0] for c in UNSUPPORTED_CASES])
@pytest.mark.parametrize("ext", [True, False], ids=["istio-filters", "upstream-filters"])
def test_a_decision_changing_http_filter_is_named(name: str, config: Any, why: str, ext: bool) -> None:
    specs = _with_hcm(_insert_before_router(name, config), istio_proxy_extensions=ext)
    r = resolve_outbound(specs, "web", 8080, vip="10.96.0.10")
    assert r.kind == "http" and r.route_config_name == "8080"
    (entry,) = r.unsupported
    assert f"'{name}'" in entry and why in entry and type(config).DESCRIPTOR.full_name in entry
    assert entry.startswith("filter_chains[0].filters[")
    # the TCP service and unknown destinations are unaffected
    assert not resolve_outbound(specs, "db", 5432, vip="10.96.0.11", protocol="tcp").unsupported


def test_disabled_and_ecds_filters_stay_unsupported() -> None:
    specs = _with_hcm(_insert_before_router("envoy.filters.http.ext_authz", ext_authz_pb2.ExtAuthz(), disabled=True))
    (entry,) = resolve_outbound(specs, "web", 8080, vip="10.96.0.10").unsupported
    assert "typed_per_filter_config can enable it" in entry

    def ecds(h: Any) -> None:
        flt = hcm_pb2.HttpFilter(name="envoy.filters.http.wasm")
        flt.config_discovery.type_urls.append(T + "envoy.extensions.filters.http.wasm.v3.Wasm")
        flt.config_discovery.config_source.ads.SetInParent()
        h.http_filters.insert(0, flt)
    (entry,) = resolve_outbound(_with_hcm(ecds), "web", 8080, vip="10.96.0.10").unsupported
    assert "'envoy.filters.http.wasm'" in entry and "ECDS" in entry


IGNORED_CASES = [
    ("shadow-rbac", http_rbac_pb2.RBAC(shadow_rules={"action": "DENY"})),
    ("istio.stats", wasm_pb2.Wasm(config={"root_id": "stats_outbound", "vm_config": {
        "runtime": "envoy.wasm.runtime.null", "code": {"local": {"inline_string": "envoy.wasm.stats"}}}})),
    ("istio.metadata_exchange", wasm_pb2.Wasm(config={"vm_config": {
        "code": {"local": {"filename": "/etc/istio/extensions/metadata-exchange-filter.compiled.wasm"}}}})),
]


@pytest.mark.parametrize("name, config", IGNORED_CASES, ids=[c[0] for c in IGNORED_CASES])
def test_observability_only_filters_are_ignored(name: str, config: Any) -> None:
    specs = _with_hcm(_insert_before_router(name, config), istio_proxy_extensions=False)
    r = resolve_outbound(specs, "web", 8080, vip="10.96.0.10")
    assert not r.unsupported and name in r.hcm.ignored_filters


def test_filter_order_and_hcm_settings() -> None:
    def edit(h: Any) -> None:
        h.merge_slashes = True
        h.strip_any_host_port = True
        h.strip_trailing_host_dot = True
        h.path_with_escaped_slashes_action = hcm_pb2.HttpConnectionManager.UNESCAPE_AND_REDIRECT
        h.normalize_path.value = False
        h.common_http_protocol_options.max_stream_duration.seconds = 7
    h = resolve_outbound(_with_hcm(edit), "web", 8080, vip="10.96.0.10").hcm
    assert (h.merge_slashes, h.strip_any_host_port, h.strip_matching_host_port, h.strip_trailing_host_dot,
            h.path_with_escaped_slashes_action, h.normalize_path, h.max_stream_duration) == (
        True, True, False, True, "UNESCAPE_AND_REDIRECT", False, 7.0)
    assert not h.unsupported

    def router_first(h: Any) -> None:
        router = h.http_filters[-1]
        h.http_filters.insert(0, copy.deepcopy(router))
        h.http_filters[0].name = "early-router"
    r = resolve_outbound(_with_hcm(router_first, istio_proxy_extensions=False), "web", 8080, vip="10.96.0.10")
    assert r.unsupported == ("filter_chains[0].filters[0].typed_config.http_filters[0] 'early-router' "
                             "(envoy.extensions.filters.http.router.v3.Router): the router must be the last filter "
                             "(Envoy rejects this)",)

    def inline(h: Any) -> None:
        h.route_config.name = "inline"
        h.route_config.ignore_port_in_host_matching = True
        vh = h.route_config.virtual_hosts.add(name="all", domains=["*"])
        vh.routes.add().match.prefix = "/"
        vh.routes[0].route.cluster = "c"
        del h.http_filters[:]  # Envoy adds the router
    h = resolve_outbound(_with_hcm(inline), "web", 8080, vip="10.96.0.10").hcm
    assert h.route_config_name is None and h.route_config.ignore_port_in_host_matching and not h.unsupported
    assert [f.name for f in h.http_filters] == ["envoy.filters.http.router"]

    def scoped(h: Any) -> None:
        h.scoped_routes.name = "s"
    r = resolve_outbound(_with_hcm(scoped), "web", 8080, vip="10.96.0.10")
    assert r.kind == "http" and r.unsupported == ("filter_chains[0].filters[0].typed_config.scoped_routes: "
                                                  "scoped routes are not supported",)


def test_network_filters() -> None:
    res = istio_sidecar.build(WEB)
    (tcp,) = [copy.deepcopy(lis) for lis in res["listeners"] if lis.name == "10.96.0.11_5432"]
    assert [f.name for f in tcp.filter_chains[0].filters] == ["istio.stats", "envoy.filters.network.tcp_proxy"]
    limit = listener_components_pb2.Filter(name="envoy.filters.network.connection_limit", typed_config=_pack(
        connection_limit_pb2.ConnectionLimit(stat_prefix="x", max_connections={"value": 3})))
    tcp.filter_chains[0].filters.insert(0, limit)
    spec = sidecar_listener_spec(tcp)
    r = resolve_outbound({tcp.name: spec}, "db", 5432, vip="10.96.0.11", protocol="tcp")
    assert r.kind == "tcp" and len(r.unsupported) == 1 and "'envoy.filters.network.connection_limit'" in r.unsupported[0]
    # a tcp_proxy that is not last, a chain without a terminal filter
    tcp.filter_chains[0].filters.append(copy.deepcopy(tcp.filter_chains[0].filters[0]))
    spec = sidecar_listener_spec(tcp)
    assert spec.filter_chains[0].kind == "other"
    assert any("a terminal filter must be the last one" in u for u in spec.filter_chains[0].unsupported)
    # weighted clusters, no idle timeout
    tp = tcp_proxy_pb2.TcpProxy(stat_prefix="w", idle_timeout={})
    tp.weighted_clusters.clusters.add(name="a", weight=1)
    tp.weighted_clusters.clusters.add(name="b", weight=3)
    lis = listener_pb2.Listener(name="w", address=socket_pb({"address": "10.0.0.9", "port_value": 1}))
    lis.filter_chains.add().filters.add(name="envoy.filters.network.tcp_proxy", typed_config=_pack(tp))
    t = sidecar_listener_spec(lis).filter_chains[0].tcp
    assert (t.cluster, t.weighted_clusters, t.clusters, t.idle_timeout) == ("", (("a", 1), ("b", 3)), ("a", "b"), None)
    # Envoy's ClusterWeight rules (weight >= 1, a name): the chain is unsupported, naming the field
    tp.weighted_clusters.clusters.add(name="", weight=0)
    lis.filter_chains[0].filters[0].typed_config.CopyFrom(_pack(tp))
    chain = sidecar_listener_spec(lis).filter_chains[0]
    assert [u for u in chain.unsupported if "weighted_clusters.clusters[2]" in u] == [
        u for u in chain.unsupported if "clusters[2].name: value length" in u or "clusters[2].weight: value must" in u]
    assert len([u for u in chain.unsupported if "weighted_clusters.clusters[2]" in u]) == 2, chain.unsupported


def socket_pb(sa: Mapping[str, Any]) -> Any:
    from envoy.config.core.v3 import address_pb2

    return address_pb2.Address(socket_address=address_pb2.SocketAddress(**sa))


def test_input_forms() -> None:
    res = istio_sidecar.build(WEB)
    lis = res["listeners"][0]
    by_msg = sidecar_listener_spec(lis)
    assert sidecar_listener_spec(_pack(lis)) == by_msg
    from google.protobuf import json_format

    assert sidecar_listener_spec(json_format.MessageToDict(lis)) == by_msg  # proto3 JSON
    with pytest.raises(ConfigError):
        sidecar_listener_spec({"name": "x", "bogus": 1})
    with pytest.raises(TypeError):
        sidecar_listener_spec(42)
    with pytest.raises(ValueError):
        resolve_outbound({}, "a", 80, protocol="udp")
    assert resolve_outbound({}, "a", 80).kind == "none"


# -- FilterChainMatch precedence without Envoy ----------------------------------------------------------


def _chain(name: str, **match: Any) -> FilterChainSpec:
    for key in ("prefix_ranges", "source_prefix_ranges", "direct_source_prefix_ranges"):
        if key in match:
            match[key] = tuple(ipaddress.ip_network(n) for n in match[key])
    return FilterChainSpec(name=name, match=FilterChainMatchSpec(**match), kind="other")


def _pick(chains: List[FilterChainSpec], ip: Optional[str], port: int, **kw: Any) -> str:
    lis = SidecarListenerSpec(name="l", address=("0.0.0.0", port), additional_addresses=(("::", port),),
                              filter_chains=tuple(chains), default_filter_chain=_chain("default"), http_inspector=True)
    r = resolve_outbound({"l": lis}, ip or "name.example", port, vip=ip, **kw)
    return r.chain.name if r.chain else "none"


def test_filter_chain_precedence_rules() -> None:
    chains = [_chain("p80-h2c", destination_port=80, application_protocols=("h2c",)), _chain("any")]
    assert _pick(chains, "10.0.0.1", 80) == "default"  # no fallback from port 80 to "any port"
    assert _pick(chains, "10.0.0.1", 80, protocol="h2c") == "p80-h2c"
    chains = [_chain("slash8", prefix_ranges=["10.0.0.0/8"]), _chain("slash24", prefix_ranges=["10.1.2.0/24"]),
              _chain("all")]
    assert [_pick(chains, ip, 80) for ip in ("10.1.2.3", "10.9.9.9", "192.168.0.1", None, "fd00::1")] == [
        "slash24", "slash8", "all", "all", "all"]
    chains = [_chain("sni", server_names=("a.example",)), _chain("tls", transport_protocol="tls")]
    assert _pick(chains, "10.0.0.1", 80) == "default"  # plaintext: no SNI, transport raw_buffer
    chains = [_chain("local", source_type="SAME_IP_OR_LOOPBACK"), _chain("external", source_type="EXTERNAL"),
              _chain("anytype")]
    assert _pick(chains, "10.0.0.1", 80, source_ip="10.244.0.9") == "external"
    assert _pick(chains, "10.0.0.1", 80) == "external"  # unknown source: the pod's IP, not loopback
    assert _pick(chains, "10.244.0.9", 80, source_ip="10.244.0.9") == "local"
    assert _pick(chains, "10.0.0.1", 80, source_ip="127.0.0.1") == "local"
    chains = [_chain("src", source_prefix_ranges=["10.244.0.0/16"], source_ports=(5555,)), _chain("srcany")]
    assert _pick(chains, "10.0.0.1", 80, source_ip="10.244.0.9") == "default"  # no port 5555 -> no chain
    assert _pick(chains, "10.0.0.1", 80, source_ip="10.244.0.9", source_port=5555) == "src"
    assert _pick(chains, "10.0.0.1", 80) == "srcany"
    twins = [_chain("a"), _chain("b")]
    lis = SidecarListenerSpec(name="l", address=("0.0.0.0", 80), filter_chains=tuple(twins))
    r = resolve_outbound({"l": lis}, "x", 80, vip="10.0.0.1")
    assert r.chain.name == "a" and "match the connection equally" in r.unsupported[0]


# -- the Envoy oracle ------------------------------------------------------------------------------


def _hcm_chain(name: str, match: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    hcm = {"@type": HCM_TYPE, "stat_prefix": name, "codec_type": "AUTO",
           "route_config": {"name": name, "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
               {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": name}}}]}]},
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}]}
    chain: Dict[str, Any] = {"name": name, "filters": [
        {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
    if match:
        chain["filter_chain_match"] = match
    return chain


def _range(cidr: str) -> Dict[str, Any]:
    ip, _, n = cidr.partition("/")
    return {"address_prefix": ip, "prefix_len": int(n or 32)}


class _Scenario:
    def __init__(self, name: str, addresses: List[Tuple[str, int]], chains: List[Dict[str, Any]], *,
                 inspector: bool = True, default: bool = True) -> None:
        self.listener: Dict[str, Any] = {
            "name": name, "address": socket_address(addresses[0][1], addresses[0][0]),
            "filter_chains": chains}
        if addresses[1:]:
            self.listener["additional_addresses"] = [{"address": socket_address(p, ip)} for ip, p in addresses[1:]]
        if inspector:
            self.listener["listener_filters"] = [HTTP_INSPECTOR]
        if default:
            self.listener["default_filter_chain"] = _hcm_chain("default")
        self.probes: List[Tuple[str, int, str, int, str]] = []  # (dst ip, dst port, src ip, src port, want)

    def probe(self, dst: str, port: int, want: str, src: str = "127.0.0.1", src_port: int = 0) -> "_Scenario":
        self.probes.append((dst, port, src, src_port, want))
        return self


def _scenarios() -> List[_Scenario]:
    L1, L2, L3, L5 = "127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.5"
    ports = iter(free_port(L1) for _ in range(20))
    out = []
    p, q = next(ports), next(ports)
    out.append(_Scenario("port", [(L1, p), (L1, q)], [
        _hcm_chain("port-h2c", {"destination_port": p, "application_protocols": ["h2c"]}),
        _hcm_chain("any-port")]).probe(L1, p, "default").probe(L1, q, "any-port"))
    p = next(ports)
    out.append(_Scenario("ip", [(L1, p), (L2, p), (L5, p)], [
        _hcm_chain("ip-32", {"prefix_ranges": [_range(f"{L2}/32")]}),
        _hcm_chain("ip-30", {"prefix_ranges": [_range("127.0.0.0/30")]}),
        _hcm_chain("ip-any")]).probe(L1, p, "ip-30").probe(L2, p, "ip-32").probe(L5, p, "ip-any"))
    p = next(ports)
    out.append(_Scenario("transport", [(L1, p)], [
        _hcm_chain("raw", {"transport_protocol": "raw_buffer"}), _hcm_chain("tls", {"transport_protocol": "tls"}),
        _hcm_chain("no-transport")]).probe(L1, p, "raw"))
    p = next(ports)
    out.append(_Scenario("transport-unset", [(L1, p)], [
        _hcm_chain("tls", {"transport_protocol": "tls"}), _hcm_chain("no-transport")]).probe(L1, p, "no-transport"))
    alpn = [_hcm_chain("h2c", {"application_protocols": ["h2c"]}),
            _hcm_chain("http11", {"application_protocols": ["http/1.1", "http/1.0"]}), _hcm_chain("no-alpn")]
    p = next(ports)
    out.append(_Scenario("alpn", [(L1, p)], copy.deepcopy(alpn)).probe(L1, p, "http11"))
    p = next(ports)
    out.append(_Scenario("alpn-no-inspector", [(L1, p)], copy.deepcopy(alpn), inspector=False).probe(L1, p, "no-alpn"))
    p, q = next(ports), next(ports)
    disabled = _Scenario("alpn-inspector-disabled-on-port", [(L1, p), (L1, q)], copy.deepcopy(alpn))
    disabled.listener["listener_filters"] = [dict(HTTP_INSPECTOR, filter_disabled={
        "destination_port_range": {"start": p, "end": p + 1}})]
    out.append(disabled.probe(L1, p, "no-alpn").probe(L1, q, "http11"))
    p = next(ports)
    out.append(_Scenario("no-backtracking", [(L1, p), (L2, p)], [
        _hcm_chain("ip1-h2c", {"prefix_ranges": [_range(f"{L1}/32")], "application_protocols": ["h2c"]}),
        _hcm_chain("any-http11", {"application_protocols": ["http/1.1"]})]).probe(L1, p, "default").probe(L2, p, "any-http11"))
    p = next(ports)
    out.append(_Scenario("port-then-ip", [(L1, p), (L2, p)], [
        _hcm_chain("port-ip2", {"destination_port": p, "prefix_ranges": [_range(f"{L2}/32")]}),
        _hcm_chain("port-0")]).probe(L1, p, "default").probe(L2, p, "port-ip2"))
    p = next(ports)
    out.append(_Scenario("source-type", [(L1, p)], [
        _hcm_chain("local", {"source_type": "SAME_IP_OR_LOOPBACK"}), _hcm_chain("external", {"source_type": "EXTERNAL"}),
        _hcm_chain("any-type")]).probe(L1, p, "local"))
    p = next(ports)
    out.append(_Scenario("source-type-external-only", [(L1, p)], [
        _hcm_chain("external", {"source_type": "EXTERNAL"}), _hcm_chain("any-type")]).probe(L1, p, "any-type"))
    p = next(ports)
    out.append(_Scenario("source-ip", [(L1, p)], [
        _hcm_chain("src-32", {"source_prefix_ranges": [_range(f"{L1}/32")]}),
        _hcm_chain("src-8", {"source_prefix_ranges": [_range("127.0.0.0/8")]}),
        _hcm_chain("src-any")]).probe(L1, p, "src-32").probe(L1, p, "src-8", src=L3))
    p = next(ports)
    out.append(_Scenario("direct-source-ip", [(L1, p)], [
        _hcm_chain("direct-32", {"direct_source_prefix_ranges": [_range(f"{L1}/32")]}),
        _hcm_chain("direct-any")]).probe(L1, p, "direct-32").probe(L1, p, "direct-any", src=L3))
    p, sp = next(ports), next(ports)
    out.append(_Scenario("source-port", [(L1, p)], [
        _hcm_chain("sport", {"source_ports": [sp]}), _hcm_chain("sport-any")]).probe(
        L1, p, "sport", src_port=sp).probe(L1, p, "sport-any"))
    p = next(ports)
    out.append(_Scenario("server-names", [(L1, p)], [
        _hcm_chain("named", {"server_names": ["example.com", "*.example.org"]}), _hcm_chain("unnamed")]).probe(
        L1, p, "unnamed"))
    p = next(ports)
    out.append(_Scenario("nothing-matches", [(L1, p)], [
        _hcm_chain("named", {"server_names": ["example.com"]})], default=False).probe(L1, p, "none"))
    return out


class _ChainOracle(EnvoyProcess):
    """One Envoy with the scenarios' listeners (static)."""

    def __init__(self, listeners: List[Dict[str, Any]]) -> None:
        self.bootstrap = {"admin": {"address": socket_address(0)}, "static_resources": {"listeners": listeners}}
        self.envoy_bin = find_envoy()
        self.log_level = "warning"
        self.startup_timeout = 15.0
        self.keep_tmp = False
        self.tmpdir: Optional[str] = None
        self.admin_url: Optional[str] = None
        self._envoy = None
        self._log_path = ""

    def _start(self) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="meshcore-chain-oracle-")
        cfg = os.path.join(self.tmpdir, "envoy.json")
        with open(cfg, "w") as f:
            json.dump(self.bootstrap, f)
        self._run_envoy(cfg)

    def close(self) -> None:
        self._stop(None)


def _request(dst: str, port: int, src: str, src_port: int) -> str:
    """The body of a plaintext HTTP/1.1 GET (the chain's name), or "none" when Envoy closes the
    connection without a response."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.settimeout(5)
    try:
        sock.bind((src, src_port))
        sock.connect((dst, port))
        conn = http.client.HTTPConnection(dst, port, timeout=5)
        conn.sock = sock
        try:
            conn.request("GET", "/", headers={"Host": "svc.example"})
            resp = conn.getresponse()
            assert resp.status == 200
            return resp.read().decode()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            return "none"
    finally:
        sock.close()


@pytest.mark.envoy
def test_filter_chain_selection_matches_envoy() -> None:
    scenarios = _scenarios()
    specs = {s.listener["name"]: sidecar_listener_spec(s.listener) for s in scenarios}
    with _ChainOracle([s.listener for s in scenarios]):
        rows = []
        for s in scenarios:
            for dst, port, src, src_port, want in s.probes:
                envoy = _request(dst, port, src, src_port)
                r = resolve_outbound(specs, dst, port, vip=dst, protocol="http", source_ip=src, source_port=src_port)
                mine = r.chain.name if r.chain is not None else "none"
                assert r.listener == s.listener["name"]
                rows.append((s.listener["name"], f"{src}:{src_port}->{dst}:{port}", want, envoy, mine))
    wrong = [row for row in rows if not row[2] == row[3] == row[4]]
    assert not wrong, "(scenario, connection, expected, envoy, meshcore):\n" + "\n".join(map(str, wrong))
