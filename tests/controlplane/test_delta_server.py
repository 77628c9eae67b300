"""The control plane's delta (incremental) ADS protocol, driven with raw DeltaDiscoveryRequests."""

from __future__ import annotations

from meshcore.controlplane import ControlPlane
from meshcore.controlplane import builders as b
from meshcore.controlplane.store import resource_version
from meshcore.xds.model import CLUSTER, ENDPOINT, LISTENER, ROUTE

from .ads_client import delta_versions


def _cla(name: str, port: int):
    return b.assignment(name, [("127.0.0.1", port)])


def test_wildcard_cds_with_versions_and_silent_ack(cp: ControlPlane, open_stream) -> None:
    c1, c2 = b.cluster("c1"), b.cluster("c2")
    version = cp.set_resources([c1, c2])
    s = open_stream("delta")
    s.send(CLUSTER)  # first CDS request with an empty subscribe list = wildcard
    r = s.recv()
    assert r.type_url == CLUSTER and r.system_version_info == version and r.nonce
    assert delta_versions(r) == {"c1": resource_version(c1), "c2": resource_version(c2)}
    assert list(r.removed_resources) == []
    c = b.cluster("c1")
    assert r.resources[0].resource.type_url == CLUSTER and r.resources[0].resource.value == c.SerializeToString(
        deterministic=True)
    s.ack(r)
    s.barrier()
    events = [e for e in cp.history if e["type_url"] == CLUSTER]
    assert [(e["dir"], e["mode"], e["nonce"]) for e in events] == [
        ("req", "delta", ""), ("resp", "delta", r.nonce), ("req", "delta", r.nonce)]
    assert events[1]["names"] == ["c1", "c2"] and events[1]["version_info"] == version
    assert events[0]["node"]["id"] == "test-node" and events[2]["node"] is None


def test_first_request_without_resources_is_answered(cp: ControlPlane, open_stream) -> None:
    s = open_stream("delta")
    s.send(LISTENER)
    r = s.recv()
    assert r.type_url == LISTENER and list(r.resources) == [] and r.system_version_info == "0"
    s.ack(r)
    v = cp.update(b.api_listener("l1", "r"))
    r = s.recv()
    assert delta_versions(r).keys() == {"l1"} and r.system_version_info == v


def test_named_subscriptions(cp: ControlPlane, open_stream) -> None:
    cp.set_resources([_cla("e1", 1), _cla("e2", 2), _cla("e3", 3)])
    s = open_stream("delta")
    s.send(ENDPOINT, subscribe=["e1"])  # EDS with names is never wildcard
    r = s.recv()
    assert list(delta_versions(r)) == ["e1"]
    s.ack(r)
    s.send(ENDPOINT, subscribe=["e2", "missing"])
    r = s.recv()
    assert list(delta_versions(r)) == ["e2"]  # only the new name; nothing said about "missing"
    s.ack(r)
    s.send(ENDPOINT, subscribe=["e1"])  # re-subscribing something the client has: resent anyway
    r = s.recv()
    assert list(delta_versions(r)) == ["e1"]
    s.ack(r)  # request-driven: nothing more is pushed for EDS until this ACK
    # unsubscribe: later changes of e1 are not sent; a change to e2 is
    s.send(ENDPOINT, unsubscribe=["e1"])
    s.barrier()
    cp.update([_cla("e1", 11), _cla("e3", 33)])
    s.barrier()
    cp.update([_cla("e2", 22)])
    r = s.recv()
    assert list(delta_versions(r)) == ["e2"]
    s.ack(r)
    # the missing name appears
    cp.update([_cla("missing", 9)])
    assert list(delta_versions(s.recv())) == ["missing"]


def test_initial_resource_versions(cp: ControlPlane, open_stream) -> None:
    c1, c2, c3 = b.cluster("c1"), b.cluster("c2"), b.cluster("c3")
    cp.set_resources([c1, c2, c3])
    s = open_stream("delta")
    s.send(CLUSTER, initial={"c1": resource_version(c1), "c2": "stale", "gone": "abc"})
    r = s.recv()
    assert delta_versions(r) == {"c2": resource_version(c2), "c3": resource_version(c3)}
    assert list(r.removed_resources) == ["gone"]
    # a reconnecting client that has everything gets nothing
    s2 = open_stream("delta")
    s2.send(CLUSTER, initial={n: resource_version(m) for n, m in (("c1", c1), ("c2", c2), ("c3", c3))})
    s2.send(ENDPOINT, subscribe=["e1"], initial={"e1": "old", "other": "x"})  # "other": not subscribed
    r = s2.recv()
    assert r.type_url == ENDPOINT and list(delta_versions(r)) == [] and list(r.removed_resources) == ["e1"]
    s2.barrier()


def test_updates_and_removals(cp: ControlPlane, open_stream) -> None:
    cp.set_resources([b.api_listener("l1", "r"), b.api_listener("l2", "r"), b.api_listener("l3", "r")])
    s = open_stream("delta")
    s.send(LISTENER)
    s.ack(s.recv())
    v = cp.update(upserts=[b.api_listener("l2", "r-new")], removes=[(LISTENER, "l3")])
    r = s.recv()
    assert list(delta_versions(r)) == ["l2"] and list(r.removed_resources) == ["l3"]
    assert r.system_version_info == v
    s.ack(r)
    cp.set_resources([b.api_listener("l1", "r")])  # replace: l2 goes away
    r = s.recv()
    assert list(delta_versions(r)) == [] and list(r.removed_resources) == ["l2"]
    s.ack(r)
    # RDS deletions are sent too (delta has explicit removal for every type)
    cp.update([b.route_config("rc", [])])
    s.send(ROUTE, subscribe=["rc"])
    s.ack(s.recv())
    cp.update(removes=[(ROUTE, "rc")])
    r = s.recv()
    assert r.type_url == ROUTE and list(r.removed_resources) == ["rc"]


def test_nack_is_recorded_and_not_resent(cp: ControlPlane, open_stream) -> None:
    cp.set_resources([b.cluster("c1")])
    s = open_stream("delta")
    s.send(CLUSTER)
    s.ack(s.recv())
    cp.update([b.cluster("c1", connect_timeout=-1)])
    r = s.recv()
    s.send(CLUSTER, nonce=r.nonce, error="Invalid duration", code=13)
    s.barrier()
    nack = cp.wait_for(lambda e: e["dir"] == "req" and e["error_detail"])
    assert nack["mode"] == "delta" and nack["nonce"] == r.nonce
    assert nack["error_detail"] == {"code": 13, "message": "Invalid duration"}


def test_star_subscription_and_unsubscribe_under_wildcard(cp: ControlPlane, open_stream) -> None:
    cp.set_resources([_cla("e1", 1), _cla("e2", 2)])
    s = open_stream("delta")
    s.send(ENDPOINT, subscribe=["*"])
    r = s.recv()
    assert list(delta_versions(r)) == ["e1", "e2"]
    s.ack(r)
    cp.update([_cla("e3", 3)])
    r = s.recv()
    assert list(delta_versions(r)) == ["e3"]
    s.ack(r)
    # unsubscribing a name that the wildcard still covers: the server must answer with it
    s.send(ENDPOINT, unsubscribe=["e1"])
    r = s.recv()
    assert list(delta_versions(r)) == ["e1"]
    s.ack(r)
    # dropping the wildcard: nothing more unless named
    s.send(ENDPOINT, unsubscribe=["*"], subscribe=["e2"])
    r = s.recv()
    assert list(delta_versions(r)) == ["e2"]
    s.ack(r)
    cp.update([_cla("e1", 11), _cla("e3", 33)])
    s.barrier()


def test_sotw_and_delta_streams_side_by_side(cp: ControlPlane, open_stream) -> None:
    cp.set_resources([b.cluster("c1")])
    sotw, delta = open_stream("sotw"), open_stream("delta")
    sotw.send(CLUSTER, [])
    delta.send(CLUSTER)
    r1, r2 = sotw.recv(), delta.recv()
    sotw.ack(r1, names=[])
    delta.ack(r2)
    cp.update(removes=[(CLUSTER, "c1")])
    assert len(sotw.recv().resources) == 0
    assert list(delta.recv().removed_resources) == ["c1"]
    modes = {e["stream"]: e["mode"] for e in cp.history}
    assert sorted(modes.values()) == ["delta", "sotw"]
