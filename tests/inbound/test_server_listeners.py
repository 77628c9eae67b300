"""``Mesh.serve`` (gRFC A36) against meshcore's reference control plane, SotW and delta.

* istiod grpcgen's inbound listeners (``xds.istio.io/grpc/lds/inbound/<ip:port>``, from the bootstrap's
  ``server_listener_resource_name_template``): STRICT -> the ``inbound-mtls`` chain with the DownstreamTlsContext's
  provider instances and the RBAC filters (DENY then ALLOW); PERMISSIVE -> ``inbound-plaintext``.
* Serving states: a missing listener (does-not-exist timer, deletion) and a NACKed first version do not serve
  (``error``: why, the NACK text as sent); a fix serves; a NACKed update keeps the last good version (``nack``);
  the listener address must be the listening address; a client listener under the server name does not serve.
* Updates: a new snapshot per change (``on_change`` sees old and new), a chain already handed out is unchanged.
* RDS-named route configurations (``non_forwarding_action`` accepted for server names only).
* ``close()`` unsubscribes; a closed mesh does not serve; the template is required; argument errors.
* The Envoy shape: the sidecar's ``virtualInbound`` from istiod's sidecar generator, STRICT then PERMISSIVE.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

import meshcore
from meshcore import ConfigError
from meshcore.controlplane import ControlPlane
from meshcore.controlplane import istio_sidecar
from meshcore.inbound import InboundListener, InboundSnapshot
from meshcore.xds.model import LISTENER, ROUTE
from tls.pki import certificate_providers

from .grpcgen_inbound import TEMPLATE, hcm, inbound_listener, inbound_route_config, pack

NODE_ID = "sidecar~10.0.0.9~server-0.default~default.svc.cluster.local"
DENY = {"default-deny-evil-0": {"permissions": [{"any": True}], "principals": [
    {"authenticated": {"principal_name": {"exact": "spiffe://cluster.local/ns/default/sa/evil"}}}]}}
ALLOW = {"default-allow-0": {"permissions": [{"any": True}], "principals": [
    {"authenticated": {"principal_name": {"prefix": "spiffe://cluster.local/"}}}]}}


def wait(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def plane() -> Iterator[ControlPlane]:
    with ControlPlane() as cp:
        yield cp


@pytest.fixture
def cp(plane: ControlPlane) -> ControlPlane:
    plane.set_resources([])
    return plane


def bootstrap(port: int, cert_dir: Any, **extra: Any) -> Dict[str, Any]:
    b = {"xds_servers": [{"server_uri": f"127.0.0.1:{port}", "channel_creds": [{"type": "insecure"}]}],
         "node": {"id": NODE_ID}, "certificate_providers": certificate_providers(cert_dir),
         "server_listener_resource_name_template": TEMPLATE}
    b.update(extra)
    return b


@pytest.fixture
def make_mesh(cp: ControlPlane, tmp_path: Any) -> Iterator[Callable[..., meshcore.Mesh]]:
    made: List[meshcore.Mesh] = []

    def make(delta: bool = False, resource_timeout: float = 15.0, **kw: Any) -> meshcore.Mesh:
        b = bootstrap(cp.port, tmp_path, **kw.pop("bootstrap", {}))
        for key in [k for k, v in b.items() if v is None]:
            del b[key]
        m = meshcore.Mesh(b, delta=delta, resource_timeout=resource_timeout, **kw)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


class Recorder:
    def __init__(self, lst: InboundListener) -> None:
        self.events: List[Tuple[Optional[InboundSnapshot], Optional[InboundSnapshot]]] = []
        lst.on_change(self)

    def __call__(self, lst: InboundListener, old: Optional[InboundSnapshot], new: Optional[InboundSnapshot]) -> None:
        self.events.append((old, new))


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_strict_and_permissive_listeners_serve(make_mesh: Callable[..., meshcore.Mesh], cp: ControlPlane,
                                               delta: bool) -> None:
    cp.set_resources([inbound_listener(8080, deny=DENY, allow=ALLOW), inbound_listener(9090, mode="PERMISSIVE")])
    mesh = make_mesh(delta=delta)
    strict = mesh.serve(8080)
    plain = mesh.serve(9090)
    assert strict.resource_name == "xds.istio.io/grpc/lds/inbound/0.0.0.0:8080"
    assert strict.wait_serving(5) and plain.wait_serving(5)
    assert strict.error is None and strict.nack is None and strict.snapshot.version == 1
    c = strict.select("10.1.1.1", 40000, "10.0.0.9", 8080, tls=True)
    assert c.name == "inbound-mtls" and c.mtls
    assert c.tls.identity.kind == "provider" and c.tls.identity.name == "default"
    assert c.tls.roots.name == "default" and c.tls.roots.certificate_name == "ROOTCA"
    assert [n for n, _ in c.rbac_filters] == ["envoy.filters.http.rbac.DENY", "envoy.filters.http.rbac"]
    assert c.route("server.default.svc.cluster.local:8080", "/echo.Echo/Say", method="POST").serves
    p = plain.select("10.1.1.1", 40000, "10.0.0.9", 9090, tls=False)
    assert p.name == "inbound-plaintext" and p.tls is None and p.rbac_filters == ()
    asked = {n for e in cp.history if e["dir"] == "req" and e["type_url"] == LISTENER for n in e["names"]}
    assert {strict.resource_name, plain.resource_name} <= asked  # the server names, on the wire
    assert "serving" in repr(strict)


def test_missing_listener_then_added_then_deleted(make_mesh: Callable[..., meshcore.Mesh], cp: ControlPlane) -> None:
    mesh = make_mesh(resource_timeout=0.3)
    lst = mesh.serve(7070)
    rec = Recorder(lst)
    assert not lst.serving and "waiting for Listener" in lst.error
    wait(lambda: "does not exist" in (lst.error or ""))
    assert not lst.wait_serving(0.05) and lst.select("10.1.1.1", 1, "10.0.0.9", 7070, False) is None
    cp.update([inbound_listener(7070)])
    assert lst.wait_serving(5) and lst.error is None
    cp.update(removes=[(LISTENER, lst.resource_name)])
    wait(lambda: not lst.serving)
    assert "does not exist" in lst.error
    kinds = [(old is not None, new is not None) for old, new in rec.events]
    assert kinds == [(False, False), (False, True), (True, False)]  # reason changed, serving, not serving


def test_nack_first_version_then_fix_then_bad_update(make_mesh: Callable[..., meshcore.Mesh], cp: ControlPlane) -> None:
    bad = inbound_listener(8443)
    tls = bad.filter_chains[0].transport_socket
    from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

    ctx = tls_pb2.DownstreamTlsContext()
    tls.typed_config.Unpack(ctx)
    ctx.require_sni.value = True
    tls.typed_config.Pack(ctx)
    cp.set_resources([bad])
    mesh = make_mesh()
    lst = mesh.serve(8443)
    wait(lambda: "rejected" in (lst.error or ""))
    assert not lst.serving and "require_sni" in lst.error
    nack = cp.wait_for(lambda e: e["dir"] == "req" and e["type_url"] == LISTENER and bool(e["error_detail"]))
    assert "require_sni" in nack["error_detail"]["message"] and lst.resource_name in nack["error_detail"]["message"]
    assert lst.error.split("rejected: ", 1)[1] in nack["error_detail"]["message"]  # the NACK text, as sent
    cp.set_resources([inbound_listener(8443)])
    assert lst.wait_serving(5) and lst.error is None and lst.nack is None
    first = lst.snapshot
    cp.set_resources([bad])
    wait(lambda: lst.nack is not None)
    assert lst.serving and lst.snapshot is first and "require_sni" in lst.nack  # the last good version serves
    cp.set_resources([inbound_listener(8443, mode="PERMISSIVE")])
    wait(lambda: lst.nack is None and lst.snapshot is not first)
    assert lst.select("10.1.1.1", 1, "10.0.0.9", 8443, False).name == "inbound-plaintext"


def test_update_swaps_the_snapshot_and_held_chains_stay(make_mesh: Callable[..., meshcore.Mesh],
                                                        cp: ControlPlane) -> None:
    cp.set_resources([inbound_listener(8080, allow=ALLOW)])
    mesh = make_mesh()
    lst = mesh.serve(8080)
    assert lst.wait_serving(5)
    rec = Recorder(lst)
    held = lst.select("10.1.1.1", 40000, "10.0.0.9", 8080, True)
    modes: List[str] = []
    lst.on_change(lambda _l, old, new: modes.append(
        f"{'mTLS' if old and old.chains[0].mtls else 'plaintext'} -> {'mTLS' if new and new.chains[0].mtls else 'plaintext'}"))
    cp.set_resources([inbound_listener(8080, mode="PERMISSIVE")])
    wait(lambda: lst.snapshot is not None and lst.snapshot.version == 2)
    (old, new), = rec.events
    assert old.chains[0] is held and new.chains[0].name == "inbound-plaintext"
    assert modes == ["mTLS -> plaintext"]
    assert held.mtls and [n for n, _ in held.rbac_filters] == ["envoy.filters.http.rbac"]  # unchanged
    assert lst.select("10.1.1.1", 40001, "10.0.0.9", 8080, True).tls is None
    lst.remove_on_change(rec)
    cp.set_resources([inbound_listener(8080)])
    wait(lambda: lst.snapshot.version == 3)
    assert len(rec.events) == 1 and len(modes) == 2


def test_listener_address_must_be_the_listening_address(make_mesh: Callable[..., meshcore.Mesh],
                                                        cp: ControlPlane) -> None:
    elsewhere = inbound_listener(6060, host="10.9.9.9")
    elsewhere.name = TEMPLATE % "0.0.0.0:6060"
    cp.set_resources([elsewhere])
    mesh = make_mesh()
    lst = mesh.serve(6060)
    wait(lambda: "not the listening address" in (lst.error or ""))
    assert not lst.serving
    other = mesh.serve(6060, address="10.9.9.9")  # a listener for that address serves it
    cp.set_resources([elsewhere, inbound_listener(6060, host="10.9.9.9")])
    assert other.wait_serving(5) and other.resource_name == TEMPLATE % "10.9.9.9:6060"


def test_client_listener_under_the_server_name(make_mesh: Callable[..., meshcore.Mesh], cp: ControlPlane) -> None:
    from envoy.config.listener.v3 import listener_pb2

    client = listener_pb2.Listener(name=TEMPLATE % "0.0.0.0:5050")
    h = hcm_pb2.HttpConnectionManager()
    h.rds.route_config_name = "r"
    h.rds.config_source.ads.SetInParent()
    h.http_filters.add(name="router").typed_config.CopyFrom(hcm().http_filters[-1].typed_config)
    client.api_listener.api_listener.Pack(h)
    cp.set_resources([client])
    mesh = make_mesh()
    lst = mesh.serve(5050)
    wait(lambda: "client (API) listener" in (lst.error or ""))


def test_route_configuration_over_rds(make_mesh: Callable[..., meshcore.Mesh], cp: ControlPlane) -> None:
    lis = inbound_listener(8080)
    h = hcm_pb2.HttpConnectionManager()
    lis.filter_chains[0].filters[0].typed_config.Unpack(h)
    h.ClearField("route_config")
    h.rds.route_config_name = "inbound-routes"
    h.rds.config_source.ads.SetInParent()
    lis.filter_chains[0].filters[0].typed_config.Pack(h)
    cp.set_resources([lis])
    mesh = make_mesh(resource_timeout=0.3)
    lst = mesh.serve(8080)
    wait(lambda: "RouteConfiguration 'inbound-routes'" in (lst.error or ""))
    assert not lst.serving
    rc = inbound_route_config()
    rc.name = "inbound-routes"
    cp.set_resources([lis, rc])  # a non_forwarding_action route: accepted for a server's route name
    assert lst.wait_serving(5)
    c = lst.select("10.1.1.1", 1, "10.0.0.9", 8080, True)
    assert c.route_config_name == "inbound-routes" and c.route_config.name == "inbound-routes"
    assert c.route("a:8080", "/x").action == "non_forwarding"
    assert mesh._source.entry(ROUTE, "inbound-routes").status == "ACKED"
    lst.close()
    wait(lambda: "inbound-routes" not in mesh._source.watched(ROUTE))


def test_close_and_mesh_close(make_mesh: Callable[..., meshcore.Mesh], cp: ControlPlane) -> None:
    cp.set_resources([inbound_listener(8080), inbound_listener(9090)])
    mesh = make_mesh()
    a, b = mesh.serve(8080), mesh.serve(9090)
    assert a.wait_serving(5) and b.wait_serving(5)
    closed: List[Any] = []
    a.on_change(lambda _l, old, new: closed.append(new))
    a.close()
    assert not a.serving and a.error == "the inbound listener is closed" and closed == [None]
    assert a.select("10.1.1.1", 1, "10.0.0.9", 8080, True) is None
    assert a.resource_name not in mesh._source.watched(LISTENER)
    assert b.resource_name in mesh._source.watched(LISTENER)
    a.close()  # harmless
    mesh.close()
    assert not b.serving and b.error == "the mesh is closed" and not b.wait_serving(0.1)
    with pytest.raises(meshcore.MeshClosed):
        mesh.serve(7000)


def test_template_required_and_bad_arguments(make_mesh: Callable[..., meshcore.Mesh]) -> None:
    mesh = make_mesh(bootstrap={"server_listener_resource_name_template": None})
    with pytest.raises(ConfigError, match="server_listener_resource_name_template"):
        mesh.serve(8080)
    mesh = make_mesh()
    with pytest.raises(TypeError):
        mesh.serve("8080")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1..65535"):
        mesh.serve(0)
    with pytest.raises(ValueError, match="IP address"):
        mesh.serve(8080, address="localhost")
    assert mesh.serve(8080, address="::").resource_name == TEMPLATE % "[::]:8080"
    assert mesh.serve(8080, address="[::1]").resource_name == TEMPLATE % "[::1]:8080"


# -- the Envoy shape -------------------------------------------------------------------------------------------


def _sidecar_resources(mode: str, inbound: bool = True) -> List[Any]:
    desc = {"services": [{"name": "server", "namespace": "default", "vip": "10.96.0.5",
                          "ports": [{"port": 80, "name": "http", "protocol": "http", "target_port": 8080}],
                          "endpoints": [{"ip": "10.0.0.9", "labels": {"app": "server"}}]}],
            "proxy": {"ip": "10.0.0.9", "labels": {"app": "server"}}, "mesh": {"mtls_mode": mode}}
    res = istio_sidecar.build(desc)
    listeners = [lis for lis in res["listeners"] if inbound or lis.name != "virtualInbound"]
    return listeners + res["routes"] + res["clusters"] + res["endpoints"]


ISTIO_HTTP11 = ["istio-http/1.1", "istio", "http/1.1"]


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_envoy_shape_virtual_inbound(make_mesh: Callable[..., meshcore.Mesh], cp: ControlPlane, delta: bool) -> None:
    cp.set_resources(_sidecar_resources("STRICT"))
    mesh = make_mesh(delta=delta, xds_shape="envoy", bootstrap={"server_listener_resource_name_template": None})
    lst = mesh.serve(8080)
    assert lst.wait_serving(5) and lst.resource_name == "virtualInbound" and lst.shape == "envoy"
    c = lst.select("10.1.1.1", 40000, "10.0.0.9", 8080, True, None, ISTIO_HTTP11)
    assert c.name == "0.0.0.0_8080" and c.mtls and c.tls.identity.kind == "sds" and c.tls.roots.name == "ROOTCA"
    assert c.route("server.default.svc.cluster.local:80", "/").serves and c.unsupported == ()
    assert lst.select("10.1.1.1", 40000, "10.0.0.9", 8080, False, None, ["http/1.1"]) is None  # STRICT
    rec = Recorder(lst)
    cp.set_resources(_sidecar_resources("PERMISSIVE"))
    wait(lambda: len(rec.events) == 1)
    plain = lst.select("10.1.1.1", 40000, "10.0.0.9", 8080, False, None, ["http/1.1"])
    assert plain.name == "0.0.0.0_8080" and plain.tls is None
    assert c.mtls  # a chain handed out before keeps its configuration


def test_envoy_shape_without_virtual_inbound(make_mesh: Callable[..., meshcore.Mesh], cp: ControlPlane) -> None:
    cp.set_resources(_sidecar_resources("STRICT", inbound=False))
    mesh = make_mesh(xds_shape="envoy")
    lst = mesh.serve(8080)
    wait(lambda: "no virtualInbound listener" in (lst.error or ""))
    cp.set_resources(_sidecar_resources("STRICT"))
    assert lst.wait_serving(5)


def test_envoy_shape_from_a_resource_file(tmp_path: Any) -> None:
    import json

    from google.protobuf import json_format

    path = tmp_path / "sidecar.json"
    path.write_text(json.dumps({"resources": [json_format.MessageToDict(pack(m))
                                              for m in _sidecar_resources("PERMISSIVE")]}))
    with meshcore.Mesh.from_file(str(path), xds_shape="envoy") as mesh:
        lst = mesh.serve(8080)
        assert lst.serving
        assert lst.select("10.1.1.1", 1, "10.0.0.9", 8080, False, None, ["http/1.1"]).tls is None
        assert lst.select("10.1.1.1", 1, "10.0.0.9", 8080, True, None, ISTIO_HTTP11).mtls
    with meshcore.Mesh.from_file(str(path)) as mesh:  # gRPC shape: no bootstrap, no template
        with pytest.raises(ConfigError, match="server_listener_resource_name_template"):
            mesh.serve(8080)
