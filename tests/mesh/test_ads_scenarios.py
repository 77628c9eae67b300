"""The ADS client against the reference control plane: what goes over the wire and what the data
plane does (SotW and delta). Wire assertions read the control plane's request/response log."""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, List

import pytest

import meshcore
from meshcore.controlplane import ControlPlane
from meshcore.errors import Unavailable
from meshcore.xds.model import CLUSTER, ENDPOINT, LISTENER, ROUTE, TYPE_URLS
from meshcore.xds.resource_file import parse_resources

from .shapes import TARGET, bootstrap, cluster, resources

MODES = ["sotw", "delta"]


def requests(cp: ControlPlane, type_url: str, start: int = 0) -> List[Dict[str, Any]]:
    return [e for e in cp.history[start:] if e["dir"] == "req" and e["type_url"] == type_url]


def responses(cp: ControlPlane, type_url: str, start: int = 0) -> List[Dict[str, Any]]:
    return [e for e in cp.history[start:] if e["dir"] == "resp" and e["type_url"] == type_url]


def wait(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


def acked(cp: ControlPlane, resp: Dict[str, Any], mode: str) -> Dict[str, Any]:
    """The client's ACK of ``resp`` (waits for it)."""
    def is_ack(e: Dict[str, Any]) -> bool:
        return (e["dir"] == "req" and e["type_url"] == resp["type_url"] and e["stream"] == resp["stream"]
                and e["nonce"] == resp["nonce"] and e["error_detail"] is None)
    ev = cp.wait_for(is_ack, timeout=5)
    if mode == "sotw":
        assert ev["version_info"] == resp["version_info"]
    return ev


def status_of(mesh: meshcore.Mesh, type_url: str, name: str) -> Dict[str, Any]:
    for c in mesh.config_dump()["generic_xds_configs"]:
        if c["type_url"] == type_url and c["name"] == name:
            return c
    raise KeyError(name)


# -- initial sync and ACK -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_initial_sync_walks_lds_rds_cds_eds_and_acks_everything(cp, make_mesh, mode):
    cp.set_resources(resources())
    mesh = make_mesh(mode)
    mesh.wait_ready(TARGET, timeout=5)
    p = mesh.pick(TARGET, "/x")
    assert (p.cluster, p.route_name, p.timeout) == ("a", "default", 3.0)
    assert p.endpoint.port in (9001, 9002)
    p.done()
    assert mesh.pick(TARGET, "/b").endpoint.port == 9003

    first = [e for e in cp.history if e["dir"] == "req"]
    assert first[0]["type_url"] == LISTENER and first[0]["node"]["id"] == "meshcore-test"
    assert all(e["node"] is None for e in first[1:] if e["stream"] == first[0]["stream"])  # node once
    expected = {LISTENER: [TARGET], ROUTE: ["routes"], CLUSTER: ["a", "b"], ENDPOINT: ["a", "b"]}
    for t in TYPE_URLS:
        reqs = requests(cp, t)
        if mode == "sotw":
            assert reqs[0]["version_info"] == "" and reqs[0]["nonce"] == ""
            assert sorted(reqs[-1]["names"]) == expected[t]
        else:
            assert reqs[0]["nonce"] == "" and sorted(reqs[0]["subscribe"]) == expected[t]
        for resp in responses(cp, t):
            acked(cp, resp, mode)
    # the walk order: a type is requested only after the resource naming it arrived
    order = [e["type_url"] for e in first]
    assert [order.index(t) for t in TYPE_URLS] == sorted(order.index(t) for t in TYPE_URLS)
    for t, names in expected.items():
        for n in names:
            assert status_of(mesh, t, n)["client_status"] == "ACKED"


# -- NACK ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_nack_lists_invalid_resource_keeps_last_good_and_applies_valid_siblings(cp, make_mesh, mode):
    cp.set_resources(resources())
    mesh = make_mesh(mode)
    mesh.wait_ready(TARGET)
    good_version = mesh._source.version(CLUSTER)
    mark = len(cp.history)
    # one push: cluster a becomes invalid, cluster b changes policy (valid)
    version = cp.set_resources(resources(cluster_a=cluster("a", connect_timeout="-1s"),
                                         cluster_b=cluster("b", "LEAST_REQUEST")))
    nack = cp.wait_for(lambda e: e["dir"] == "req" and e["type_url"] == CLUSTER and e["error_detail"] is not None,
                       start=mark)
    assert nack["error_detail"]["code"] == 3  # INVALID_ARGUMENT
    message = nack["error_detail"]["message"]
    assert "a:" in message and "connect_timeout" in message and "b:" not in message
    if mode == "sotw":
        assert nack["version_info"] == good_version  # the last accepted version
    wait(lambda: mesh.config(TARGET).clusters["b"].lb is not None
         and mesh.config(TARGET).clusters["b"].lb.policy == "LEAST_REQUEST")
    assert mesh.config(TARGET).clusters["a"].lb.policy == "ROUND_ROBIN"  # last good
    assert mesh.pick(TARGET, "/x").cluster == "a"
    st = status_of(mesh, CLUSTER, "a")
    assert st["client_status"] == "NACKED" and "connect_timeout" in st["error_state"]["details"]
    assert status_of(mesh, CLUSTER, "b")["client_status"] == "ACKED"
    if mode == "sotw":
        assert st["error_state"]["version_info"] == version
    # a fix is ACKed and clears the error
    mark = len(cp.history)
    cp.set_resources(resources(cluster_b=cluster("b", "LEAST_REQUEST")))
    resp = cp.wait_for(lambda e: e["dir"] == "resp" and e["type_url"] == CLUSTER, start=mark)
    acked(cp, resp, mode)
    wait(lambda: status_of(mesh, CLUSTER, "a")["client_status"] == "ACKED")
    assert "error_state" not in status_of(mesh, CLUSTER, "a")


# -- deletion -----------------------------------------------------------------------------------


def test_sotw_deletion_semantics_per_type(cp, make_mesh):
    full = resources()
    cp.set_resources(full)
    mesh = make_mesh("sotw")
    mesh.wait_ready(TARGET)
    # EDS: absence from a SotW response means nothing
    cp.update(removes=[(ENDPOINT, "a")])
    cp.update(upserts=[full[ENDPOINT]["b"]])  # any EDS push
    time.sleep(0.2)
    assert mesh.pick(TARGET, "/x").endpoint.port in (9001, 9002)
    assert status_of(mesh, ENDPOINT, "a")["client_status"] == "ACKED"
    # CDS: a cached cluster missing from the full set is deleted; only that cluster fails
    cp.update(removes=[(CLUSTER, "b")])
    wait(lambda: mesh.config(TARGET).clusters["b"].lb is None)
    with pytest.raises(Unavailable, match="does not exist"):
        mesh.pick(TARGET, "/b")
    assert mesh.pick(TARGET, "/x").cluster == "a"
    assert status_of(mesh, CLUSTER, "b")["client_status"] == "DOES_NOT_EXIST"
    # LDS: the listener's deletion fails the target
    cp.update(removes=[(LISTENER, TARGET)])
    wait(lambda: mesh.config(TARGET).error is not None)
    with pytest.raises(Unavailable, match="does not exist"):
        mesh.pick(TARGET, "/x")


def test_delta_deletion_only_via_removed_resources(cp, make_mesh):
    full = resources()
    cp.set_resources(full)
    mesh = make_mesh("delta")
    mesh.wait_ready(TARGET)
    mark = len(cp.history)
    cp.update(removes=[(ENDPOINT, "b")])
    resp = cp.wait_for(lambda e: e["dir"] == "resp" and e["type_url"] == ENDPOINT, start=mark)
    assert resp["removed"] == ["b"]
    acked(cp, resp, "delta")
    wait(lambda: status_of(mesh, ENDPOINT, "b")["client_status"] == "DOES_NOT_EXIST")
    with pytest.raises(Unavailable, match="no healthy upstream"):
        mesh.pick(TARGET, "/b")
    cp.update(removes=[(CLUSTER, "b")])
    wait(lambda: mesh.config(TARGET).clusters["b"].lb is None)
    assert mesh.pick(TARGET, "/x").cluster == "a"


# -- does not exist ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_does_not_exist_after_timer(cp, make_mesh, mode):
    cp.set_resources(resources())
    mesh = make_mesh(mode, resource_timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="does not exist"):
        mesh.wait_ready("missing.default.svc.cluster.local:80", timeout=5)
    assert 0.25 < time.monotonic() - t0 < 3
    assert status_of(mesh, LISTENER, "missing.default.svc.cluster.local:80")["client_status"] == "DOES_NOT_EXIST"
    mesh.wait_ready(TARGET)  # the rest of the mesh is unaffected


def test_timer_not_armed_while_server_unreachable(cp, make_mesh):
    port = cp.port
    cp.stop()
    mesh = make_mesh("sotw", resource_timeout=0.2, bootstrap=bootstrap(cp, uri=f"127.0.0.1:{port}"))
    mesh.watch(TARGET)
    time.sleep(1.0)
    assert status_of(mesh, LISTENER, TARGET)["client_status"] == "REQUESTED"
    with pytest.raises(Unavailable, match="unavailable"):
        mesh.pick(TARGET, "/x")
    # once a server is there, the resource arrives
    with ControlPlane(address=f"127.0.0.1:{port}") as plane:
        plane.set_resources(resources())
        mesh.wait_ready(TARGET, timeout=5)


# -- reconnect -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_server_restart_resends_state_and_picks_never_fail(cp, make_mesh, mode):
    full = resources()
    cp.set_resources(full)
    mesh = make_mesh(mode)
    mesh.wait_ready(TARGET)
    held = {t: mesh._source.version(t) for t in TYPE_URLS}
    port = cp.port
    failures: List[BaseException] = []
    stop = threading.Event()

    def picker() -> None:
        while not stop.is_set():
            try:
                mesh.pick(TARGET, "/x").done()
            except BaseException as e:  # noqa: BLE001
                failures.append(e)
            time.sleep(0.0005)

    th = threading.Thread(target=picker)
    th.start()
    try:
        cp.stop()
        time.sleep(0.3)
        with ControlPlane(address=f"127.0.0.1:{port}") as plane:
            plane.set_resources(full)
            for t in TYPE_URLS:
                first = plane.wait_for(lambda e, t=t: e["dir"] == "req" and e["type_url"] == t, timeout=5)
                assert first["nonce"] == ""
                if mode == "sotw":
                    assert first["version_info"] == held[t]  # last accepted version, empty nonce
                else:
                    assert first["initial_resource_versions"]  # what we hold
            reqs = [e for e in plane.history if e["dir"] == "req"]
            assert reqs[0]["node"]["id"] == "meshcore-test"
            time.sleep(0.2)
    finally:
        stop.set()
        th.join()
    assert not failures


# -- Istio shapes ---------------------------------------------------------------------------------


def test_istio_shaped_resources(cp, make_mesh, fixture_path):
    import json

    host = "reviews.default.svc.cluster.local"
    cname = f"outbound|9080||{host}"
    with open(fixture_path("istio/endpoint/configdump.json")) as f:
        dump = json.load(f)
    clas = [c["endpoint_config"] for c in dump["configs"][0]["dynamic_endpoint_configs"]]
    cla = next(c for c in clas if c["cluster_name"] == cname)  # a real Istio EDS resource
    cla = {k: v for k, v in cla.items() if k != "@type"}
    listener = {
        "name": f"{host}:9080",
        "address": {"socket_address": {"address": "10.0.0.12", "port_value": 9080}},
        "api_listener": {"api_listener": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                     ".HttpConnectionManager",
            "rds": {"config_source": {"ads": {}, "resource_api_version": "V3"}, "route_config_name": cname},
            "http_filters": [
                {"name": "envoy.filters.http.fault", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}},
                {"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}},
    }
    rc = {"name": cname, "virtual_hosts": [{
        "name": f"{host}:9080",
        "domains": [f"{host}:9080", host, "reviews", "reviews:9080", "reviews.default", "reviews.default:9080"],
        "routes": [{"name": "default", "match": {"prefix": "/"}, "route": {
            "cluster": cname, "timeout": "0s", "retry_policy": {"retry_on": "connect-failure,refused-stream",
                                                                "num_retries": 2}}}]}]}
    cl = {"name": cname, "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"},
                                                               "service_name": cname},
          "connect_timeout": "10s", "lb_policy": "ROUND_ROBIN",
          "circuit_breakers": {"thresholds": [{"max_connections": 4294967295, "max_pending_requests": 4294967295,
                                               "max_requests": 4294967295, "max_retries": 4294967295}]}}
    cp.set_resources(parse_resources({"listeners": [listener], "routes": [rc], "clusters": [cl],
                                      "endpoints": [cla]}))
    mesh = make_mesh("sotw")
    target = f"{host}:9080"
    mesh.wait_ready(target)
    picked = {mesh.pick(target, "/reviews/1").endpoint.address for _ in range(6)}
    assert len(picked) == 3  # reviews v1, v2, v3 pods
    p = mesh.pick(target, "/")
    assert p.timeout is None and p.retry_policy.num_retries == 2
    lname = requests(cp, LISTENER)[0]["names"]
    assert lname == [target]  # Istio naming: host:port


# -- a push of 100 endpoint changes under concurrent picks ----------------------------------------------


def test_100_endpoint_pushes_while_4_threads_pick(cp, make_mesh):
    base = list(range(9100, 9110))
    cp.set_resources(resources(ports_a=base))
    mesh = make_mesh("sotw")
    mesh.wait_ready(TARGET)
    runtime = mesh.config(TARGET).clusters["a"]
    stable = base[:5]  # never removed
    held = [mesh.pick(TARGET, "/x") for _ in range(10)]  # in flight across every update
    held_by_port: Dict[int, int] = {}
    for p in held:
        held_by_port[p.endpoint.port] = held_by_port.get(p.endpoint.port, 0) + 1
    stop = threading.Event()
    errors: List[BaseException] = []
    picks: List[List[Any]] = [[] for _ in range(4)]

    def picker(i: int) -> None:
        log = picks[i]
        while not stop.is_set():
            t = time.monotonic()
            try:
                p = mesh.pick(TARGET, "/x")
                log.append((t, p.endpoint.port))
                p.done()
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
            time.sleep(0)  # let the xDS thread run: a real caller does I/O between picks

    threads = [threading.Thread(target=picker, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    removed_at: List[Any] = []
    current = list(base)
    try:
        for k in range(100):
            gone = current.pop(5)  # replace one of the changing half
            current.append(9200 + k)
            cp.set_resources(resources(ports_a=current))
            wait(lambda: gone not in {e.port for e in runtime.lb.endpoints}, timeout=5)
            removed_at.append((time.monotonic(), gone))
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert not errors
    assert mesh.config(TARGET).clusters["a"] is runtime  # EDS changes updated the balancer in place
    total = sum(len(l) for l in picks)
    assert total > 1000
    for t_removed, port in removed_at:
        late = [x for log in picks for x in log if x[0] > t_removed and x[1] == port]
        assert not late, f"picked removed endpoint {port} after the swap"
    for ep in runtime.lb.endpoints:
        expect = held_by_port.get(ep.port, 0) if ep.port in stable else 0
        assert runtime.lb.active_requests(ep) == expect, ep
    for p in held:
        p.done()
    assert all(runtime.lb.active_requests(ep) == 0 for ep in runtime.lb.endpoints)


# -- make-before-break -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_new_routes_publish_only_once_their_clusters_are_complete(cp, make_mesh, mode):
    """A route update naming a cluster the client has no data for does not tear: the old routes
    serve until the new cluster and its endpoints arrived (gRPC A74, Envoy's warming)."""
    from meshcore.controlplane.builders import assignment as cla_msg

    from .shapes import route as route_shape

    base = resources()
    cp.set_resources(base)
    mesh = make_mesh(mode)
    mesh.wait_ready(TARGET)
    before = mesh.config(TARGET)
    canary = route_shape("canary", "c", prefix="/", headers={"x-canary": "1"})
    with_c = resources(extra_routes=[canary])
    staged = {t: dict(v) for t, v in with_c.items()}
    staged[CLUSTER].pop("c", None)  # the route names c; c itself is not served yet
    cp.set_resources(staged)
    cp.wait_for(lambda e: e["dir"] == "req" and e["type_url"] == CLUSTER and "c" in (e["names"] or e["subscribe"]))
    time.sleep(0.2)
    assert mesh.config(TARGET) is before  # nothing published: the old routes still serve
    assert mesh.pick(TARGET, "/x", headers={"x-canary": "1"}).cluster == "a"
    staged[CLUSTER]["c"] = parse_resources({"clusters": [cluster("c")]})[CLUSTER]["c"]
    cp.set_resources(staged)  # cluster c, but not yet its endpoints
    cp.wait_for(lambda e: e["dir"] == "req" and e["type_url"] == ENDPOINT and "c" in (e["names"] or e["subscribe"]))
    time.sleep(0.2)
    assert mesh.config(TARGET) is before
    staged[ENDPOINT]["c"] = cla_msg("c", [("127.0.0.1", 9777)])
    cp.set_resources(staged)
    wait(lambda: mesh.config(TARGET) is not before)
    p = mesh.pick(TARGET, "/x", headers={"x-canary": "1"})
    assert (p.cluster, p.endpoint.port) == ("c", 9777)
    assert mesh.pick(TARGET, "/x").cluster == "a"


def test_xds_uri_target_matches_vhosts_on_its_authority(cp, make_mesh):
    cp.set_resources(resources())
    mesh = make_mesh("sotw")
    mesh.wait_ready(f"xds:///{TARGET}")
    p = mesh.pick(f"xds:///{TARGET}", "/b")
    assert (p.cluster, p.endpoint.port) == ("b", 9003)
    assert requests(cp, LISTENER)[0]["names"] == [TARGET]
