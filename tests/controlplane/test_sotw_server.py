"""The control plane's SotW ADS protocol, driven with raw DiscoveryRequests on a real gRPC stream.

"No response" is asserted deterministically with ``barrier()``: the server handles a stream's
requests in order, so if the next response is the barrier's, nothing else was owed.
"""

from __future__ import annotations

import threading

import pytest

from meshcore.controlplane import ControlPlane
from meshcore.controlplane import builders as b
from meshcore.xds.model import CLUSTER, ENDPOINT, LISTENER, ROUTE

from .ads_client import AdsStream, resource_names


def _listeners(*names: str) -> list:
    return [b.api_listener(n, route_config_name="r") for n in names]


def _rc(name: str, cluster: str = "c1"):
    return b.route_config(name, [b.virtual_host("vh", ["*"], [b.route(cluster=cluster)])])


def test_wildcard_lds_then_ack_is_silent(cp: ControlPlane, open_stream) -> None:
    version = cp.set_resources(_listeners("l1", "l2") + [b.cluster("c1")])
    s = open_stream()
    s.send(LISTENER, [])
    r = s.recv()
    assert r.type_url == LISTENER and r.version_info == version and r.nonce
    assert resource_names(r) == ["l1", "l2"]
    s.ack(r, names=[])
    s.barrier()
    # the request and the response are in the history, the node only on the first message
    events = [e for e in cp.history if e["type_url"] == LISTENER]
    assert [(e["dir"], e["nonce"], e["names"]) for e in events] == [
        ("req", "", []), ("resp", r.nonce, ["l1", "l2"]), ("req", r.nonce, [])]
    assert events[0]["node"] == {"id": "test-node", "cluster": "meshcore-test"}
    assert events[2]["node"] is None and events[2]["version_info"] == version
    assert all(e["mode"] == "sotw" and e["error_detail"] is None for e in events)
    assert events[0]["stream"] == events[1]["stream"] == events[2]["stream"]


def test_named_subscription_and_star(cp: ControlPlane, open_stream) -> None:
    cp.set_resources([b.cluster("c1"), b.cluster("c2"), b.cluster("c3")])
    s = open_stream()
    s.send(CLUSTER, ["c2", "missing"])
    r = s.recv()
    assert resource_names(r) == ["c2"]
    s.send(CLUSTER, ["c2", "c1"], version=r.version_info, nonce=r.nonce)  # name set changed
    r = s.recv()
    assert resource_names(r) == ["c1", "c2"]
    s.send(CLUSTER, ["*"], version=r.version_info, nonce=r.nonce)
    r = s.recv()
    assert resource_names(r) == ["c1", "c2", "c3"]
    # RDS with an explicit "*" is wildcard too
    cp.update([_rc("r1"), _rc("r2")])
    s.send(ROUTE, ["*"])
    assert resource_names(s.recv()) == ["r1", "r2"]


def test_empty_list_after_explicit_names_unsubscribes(cp: ControlPlane, open_stream) -> None:
    cp.set_resources([b.cluster("c1"), b.cluster("c2")])
    s = open_stream()
    s.send(CLUSTER, ["c1"])
    r = s.recv()
    s.send(CLUSTER, [], version=r.version_info, nonce=r.nonce)
    r = s.recv()
    assert resource_names(r) == []  # full-state type: nothing subscribed any more
    s.ack(r, names=[])
    cp.update([b.cluster("c1", lb_policy="RANDOM"), b.cluster("c9")])
    s.barrier()


def test_nack_is_recorded_and_not_resent(cp: ControlPlane, open_stream) -> None:
    cp.set_resources([b.cluster("c1")])
    s = open_stream()
    s.send(CLUSTER, ["c1"])
    r = s.recv()
    s.ack(r)
    bad_version = cp.update([b.cluster("c1", connect_timeout=-1)])
    r2 = s.recv()
    assert r2.version_info == bad_version and r2.nonce != r.nonce
    s.send(CLUSTER, ["c1"], version=r.version_info, nonce=r2.nonce, error="negative timeout", code=13)
    s.barrier()
    nack = cp.wait_for(lambda e: e["dir"] == "req" and e["error_detail"] is not None)
    assert nack["error_detail"] == {"code": 13, "message": "negative timeout"}
    assert nack["nonce"] == r2.nonce and nack["version_info"] == r.version_info
    # a fix is pushed
    cp.update([b.cluster("c1", connect_timeout=2)])
    r3 = s.recv()
    assert resource_names(r3) == ["c1"] and r3.resources[0].value != r2.resources[0].value


def test_stale_nonce_is_ignored(cp: ControlPlane, open_stream) -> None:
    cp.set_resources([b.assignment("e1", [("127.0.0.1", 1)]), b.assignment("e2", [("127.0.0.1", 2)])])
    s = open_stream()
    s.send(ENDPOINT, ["e1"])
    r1 = s.recv()
    s.ack(r1)
    cp.update([b.assignment("e1", [("127.0.0.1", 11)])])
    r2 = s.recv()
    # a request still carrying the first nonce (with a new name set) is not answered ...
    s.send(ENDPOINT, ["e1", "e2"], version=r1.version_info, nonce=r1.nonce)
    s.barrier()
    # ... but its subscription change is kept: the ACK of the latest response gets the new set
    s.send(ENDPOINT, ["e1", "e2"], version=r2.version_info, nonce=r2.nonce)
    assert resource_names(s.recv()) == ["e1", "e2"]


def test_lds_cds_pushes_carry_the_full_set(cp: ControlPlane, open_stream) -> None:
    cp.set_resources(_listeners("a", "b") + [b.cluster("c1"), b.cluster("c2")])
    s = open_stream()
    s.send(LISTENER, [])
    s.ack(s.recv(), names=[])
    s.send(CLUSTER, ["c1"])
    s.ack(s.recv())
    # deletion: the full set without "b"
    v = cp.update(removes=[(LISTENER, "b")])
    r = s.recv()
    assert (r.type_url, r.version_info, resource_names(r)) == (LISTENER, v, ["a"])
    s.ack(r, names=[])
    cp.update(_listeners("c"))
    r = s.recv()
    assert resource_names(r) == ["a", "c"]
    s.ack(r, names=[])
    # a change to an unsubscribed cluster pushes nothing; to the subscribed one, its full set
    cp.update([b.cluster("c2", lb_policy="RANDOM")])
    s.barrier()
    cp.update([b.cluster("c1", lb_policy="RANDOM")])
    r = s.recv()
    assert (r.type_url, resource_names(r)) == (CLUSTER, ["c1"])
    # deleting the only subscribed cluster sends an empty CDS response (= deleted)
    s.ack(r)
    cp.update(removes=[(CLUSTER, "c1")])
    r = s.recv()
    assert r.type_url == CLUSTER and resource_names(r) == []


def test_rds_eds_pushes_carry_only_changes(cp: ControlPlane, open_stream) -> None:
    cp.set_resources([_rc("r1"), _rc("r2"), b.assignment("e1", [("127.0.0.1", 1)]),
                      b.assignment("e2", [("127.0.0.1", 2)])])
    s = open_stream()
    s.send(ENDPOINT, ["e1", "e2"])
    s.ack(s.recv())
    s.send(ROUTE, ["r1", "r2"])
    s.ack(s.recv())  # carried both names
    cp.update([b.assignment("e2", [("127.0.0.1", 22)]), _rc("r1", "c9")])
    first, second = s.recv(), s.recv()
    assert (first.type_url, resource_names(first)) == (ENDPOINT, ["e2"])  # EDS before RDS
    assert (second.type_url, resource_names(second)) == (ROUTE, ["r1"])
    s.ack(first, names=["e1", "e2"])  # SotW requests always carry the full name set
    s.ack(second, names=["r1", "r2"])
    # deleting an RDS/EDS resource sends nothing (absence means nothing); recreating it sends it
    cp.update(removes=[(ENDPOINT, "e1")])
    s.barrier()
    cp.update([b.assignment("e1", [("127.0.0.1", 1)])])
    r = s.recv()
    assert resource_names(r) == ["e1"]
    # re-setting identical content changes nothing and pushes nothing
    before = cp.version
    assert cp.update([b.assignment("e1", [("127.0.0.1", 1)])]) == before
    s.barrier()


def test_missing_resource_is_sent_when_it_appears(cp: ControlPlane, open_stream) -> None:
    s = open_stream()
    s.send(ROUTE, ["later"])
    r = s.recv()
    assert resource_names(r) == [] and r.version_info == "0"
    s.ack(r, names=["later"])  # SotW requests carry the full name set
    v = cp.update([_rc("later"), _rc("other")])
    r = s.recv()
    assert (r.version_info, resource_names(r)) == (v, ["later"])


def test_reconnect_gets_current_resources(cp: ControlPlane, open_stream) -> None:
    v = cp.set_resources(_listeners("l1") + [_rc("r")])
    s1 = open_stream()
    s1.send(LISTENER, [])
    r = s1.recv()
    s1.ack(r, names=[])
    s1.close()
    s2 = open_stream()  # a new stream: last accepted version, empty nonce
    s2.send(ROUTE, ["r"], version=v)
    s2.send(LISTENER, [], version=v)
    a, c = s2.recv(), s2.recv()
    assert (a.type_url, resource_names(a)) == (ROUTE, ["r"])
    assert (c.type_url, resource_names(c)) == (LISTENER, ["l1"])
    streams = {e["stream"] for e in cp.history}
    assert len(streams) == 2


def test_set_resources_replaces_and_versions(cp: ControlPlane, open_stream) -> None:
    v1 = cp.set_resources(_listeners("l1") + [b.cluster("c1")])
    assert cp.set_resources(_listeners("l1") + [b.cluster("c1")]) == v1  # nothing changed
    s = open_stream()
    s.send(LISTENER, [])
    s.ack(s.recv(), names=[])
    s.send(CLUSTER, [])
    r = s.recv()
    assert r.version_info == v1
    s.ack(r, names=[])
    # replacing everything: the cluster list changes, the listener does not -> only CDS is pushed
    v2 = cp.set_resources(_listeners("l1") + [b.cluster("c2")])
    assert int(v2) == int(v1) + 1
    r = s.recv()
    assert (r.type_url, r.version_info, resource_names(r)) == (CLUSTER, v2, ["c2"])
    s.barrier()
    assert set(cp.resources(CLUSTER)) == {"c2"} and set(cp.resources(LISTENER)) == {"l1"}


def test_dicts_and_type_url_mapping_accepted(cp: ControlPlane) -> None:
    cp.set_resources([{"@type": CLUSTER, "name": "d1", "type": "EDS"}])
    assert list(cp.resources(CLUSTER)) == ["d1"]
    cp.set_resources({CLUSTER: {"m1": b.cluster("m1")}, LISTENER: {}})
    assert list(cp.resources(CLUSTER)) == ["m1"]
    cp.update(upserts=[{"@type": ROUTE, "name": "r1"}], removes=[(CLUSTER, "m1"), (CLUSTER, "nope")])
    assert cp.resources(CLUSTER) == {} and list(cp.resources(ROUTE)) == ["r1"]


def test_many_streams_all_get_pushes(cp: ControlPlane, open_stream) -> None:
    cp.set_resources([b.cluster("c1")])
    streams = [open_stream("sotw" if i % 2 else "delta") for i in range(8)]
    for s in streams:
        s.send(CLUSTER, [])
        s.ack(s.recv(), names=[])
    assert cp.connected_streams == 8
    cp.update([b.cluster("c2")])
    for s in streams:
        assert "c2" in resource_names(s.recv())


def test_stop_ends_streams_and_port_can_be_reused() -> None:
    cp = ControlPlane().start()
    port = cp.port
    cp.set_resources([b.cluster("c1")])
    s = AdsStream(cp.address)
    try:
        s.send(CLUSTER, [])
        s.recv()
        assert cp.connected_streams == 1
        done = threading.Event()
        threading.Thread(target=lambda: (s.wait_end(), done.set()), daemon=True).start()
        cp.stop()
        assert done.wait(5), "the client did not see its stream end"
        assert cp.connected_streams == 0
    finally:
        s.close()
    with ControlPlane(address=f"127.0.0.1:{port}") as again:
        assert again.port == port
        again.set_resources([b.cluster("c2")])
        s = AdsStream(again.address)
        try:
            s.send(CLUSTER, [])
            assert resource_names(s.recv()) == ["c2"]
        finally:
            s.close()


def test_busy_port_is_an_error(cp: ControlPlane) -> None:
    with pytest.raises(OSError):
        ControlPlane(address=cp.address).start()


def test_wait_for_times_out_with_history(cp: ControlPlane, open_stream) -> None:
    s = open_stream()
    s.send(CLUSTER, ["x"])
    s.recv()
    with pytest.raises(TimeoutError) as info:
        cp.wait_for(lambda e: e["type_url"] == LISTENER, timeout=0.05)
    assert "CDS" in str(info.value)
    n = len(cp.history)
    assert cp.wait_for(lambda e: e["dir"] == "resp", start=0)["type_url"] == CLUSTER
    with pytest.raises(TimeoutError):
        cp.wait_for(lambda e: e["dir"] == "resp", timeout=0.05, start=n)
    cp.clear_history()
    assert cp.history == []


def test_unix_socket_address(tmp_path) -> None:
    address = f"unix://{tmp_path}/xds.sock"
    with ControlPlane(address=address) as plane:
        assert plane.address == address and plane.port is None
        plane.set_resources([b.cluster("c1")])
        s = AdsStream(plane.address)
        try:
            s.send(CLUSTER, [])
            assert resource_names(s.recv()) == ["c1"]
        finally:
            s.close()


def test_history_limit() -> None:
    from meshcore.controlplane.history import History

    h = History(limit=10)
    for i in range(100):
        h.append({"i": i})
    kept = [e["i"] for e in h.events()]
    assert 10 <= len(kept) <= 11 and kept[-1] == 99
