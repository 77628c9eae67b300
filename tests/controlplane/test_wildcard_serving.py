"""The reference control plane serving wildcard subscriptions, SotW and delta, driven with raw requests:
``"*"`` and the legacy empty list (per the xDS protocol's examples), every resource of the type,
deletions pushed (SotW by absence from the full set, delta by removed_resources), named
subscriptions next to the wildcard, reconnect with initial_resource_versions."""

from __future__ import annotations

from meshcore.controlplane import ControlPlane
from meshcore.controlplane import builders as b
from meshcore.xds.model import CLUSTER, ENDPOINT, LISTENER, ROUTE

from .ads_client import delta_versions, resource_names


def _listeners(*names: str):
    return [b.api_listener(n, route_config_name="r") for n in names]


def test_sotw_spec_sequence_star_and_empty(cp: ControlPlane, open_stream) -> None:
    """The xDS protocol's SotW example: [] = "*"; ["*", "A"]; ["A"] drops "*"; [] then unsubscribes."""
    cp.set_resources(_listeners("A", "B", "C"))
    s = open_stream("sotw")
    s.send(LISTENER)  # never named anything: legacy wildcard
    r = s.recv()
    assert resource_names(r) == ["A", "B", "C"]
    s.send(LISTENER, ["*", "A"], version=r.version_info, nonce=r.nonce)  # still wildcard, A named: resent
    r = s.recv()
    assert resource_names(r) == ["A", "B", "C"]
    s.send(LISTENER, ["A"], version=r.version_info, nonce=r.nonce)  # wildcard dropped: the full set is A
    r = s.recv()
    assert resource_names(r) == ["A"]
    s.send(LISTENER, [], version=r.version_info, nonce=r.nonce)  # after explicit names: unsubscribe all
    r = s.recv()
    assert resource_names(r) == []
    s.ack(r, names=[])
    cp.update(_listeners("D"))
    s.barrier()  # nothing is pushed to a stream subscribed to nothing
    s.send(LISTENER, ["*"], version=r.version_info, nonce=r.nonce)  # explicit wildcard again
    r = s.recv()
    assert resource_names(r) == ["A", "B", "C", "D"]


def test_sotw_wildcard_pushes_full_sets_and_deletions_by_absence(cp: ControlPlane, open_stream) -> None:
    cp.set_resources(_listeners("A", "B") + [b.cluster("c1"), b.cluster("c2")])
    s = open_stream("sotw")
    s.send(LISTENER)
    lds = s.recv()
    s.send(CLUSTER, ["*"])
    cds = s.recv()
    assert resource_names(cds) == ["c1", "c2"]
    s.ack(lds, names=[])
    s.ack(cds, names=["*"])
    version = cp.update(_listeners("E") + [b.cluster("c3")], removes=[(LISTENER, "A"), (CLUSTER, "c1")])
    got = {}
    for _ in range(2):
        r = s.recv()
        got[r.type_url] = r
        s.ack(r, names=[] if r.type_url == LISTENER else ["*"])
    assert resource_names(got[CLUSTER]) == ["c2", "c3"]  # the full set: c1 is gone by absence
    assert resource_names(got[LISTENER]) == ["B", "E"]
    assert got[CLUSTER].version_info == got[LISTENER].version_info == version
    cp.update(removes=[(CLUSTER, "c2"), (CLUSTER, "c3")])
    r = s.recv()
    assert r.type_url == CLUSTER and resource_names(r) == []  # an empty full set: all deleted


def test_sotw_legacy_wildcard_for_any_type(cp: ControlPlane, open_stream) -> None:
    cp.set_resources([b.assignment("e1", [("127.0.0.1", 1)]), b.assignment("e2", [("127.0.0.1", 2)])])
    s = open_stream("sotw")
    s.send(ENDPOINT)
    r = s.recv()
    assert resource_names(r) == ["e1", "e2"]
    s.ack(r, names=[])
    cp.update([b.assignment("e2", [("127.0.0.1", 3)])], removes=[(ENDPOINT, "e1")])
    r = s.recv()
    assert resource_names(r) == ["e2"]  # EDS is not full-state: only what changed


def test_sotw_reconnect_with_wildcard_gets_the_current_set(cp: ControlPlane, open_stream) -> None:
    cp.set_resources(_listeners("A", "B"))
    s = open_stream("sotw")
    s.send(LISTENER)
    r = s.recv()
    s.ack(r, names=[])
    cp.update(removes=[(LISTENER, "A")])
    s.recv()
    s.close()
    s2 = open_stream("sotw")
    s2.send(LISTENER, [], version=r.version_info)  # new stream, old version, no nonce
    r2 = s2.recv()
    assert resource_names(r2) == ["B"] and r2.version_info == cp.version


def test_delta_wildcard_add_remove_and_named_alongside(cp: ControlPlane, open_stream) -> None:
    cp.set_resources([b.cluster("c1"), b.cluster("c2")])
    s = open_stream("delta")
    s.send(CLUSTER, subscribe=["*"])
    r = s.recv()
    assert sorted(delta_versions(r)) == ["c1", "c2"] and list(r.removed_resources) == []
    s.ack(r)
    cp.update([b.cluster("c3")], removes=[(CLUSTER, "c1")])
    r = s.recv()
    assert list(delta_versions(r)) == ["c3"] and list(r.removed_resources) == ["c1"]
    s.ack(r)
    # a named subscription next to the wildcard: resent (the client asked explicitly)
    s.send(CLUSTER, subscribe=["c2"])
    r = s.recv()
    assert list(delta_versions(r)) == ["c2"]
    s.ack(r)
    # unsubscribing the name the wildcard still covers: the server answers with it
    s.send(CLUSTER, unsubscribe=["c2"])
    r = s.recv()
    assert list(delta_versions(r)) == ["c2"]
    s.ack(r)
    # unsubscribing the wildcard: no more pushes for what only the wildcard covered
    s.send(CLUSTER, unsubscribe=["*"])
    s.barrier()
    cp.update([b.cluster("c4")], removes=[(CLUSTER, "c3")])
    s.barrier()


def test_delta_legacy_empty_first_request_is_wildcard_for_any_type(cp: ControlPlane, open_stream) -> None:
    cp.set_resources([b.route_config("r1", []), b.route_config("r2", [])])
    s = open_stream("delta")
    s.send(ROUTE)
    r = s.recv()
    assert sorted(delta_versions(r)) == ["r1", "r2"]
    s.ack(r)
    s.send(ROUTE, subscribe=["r3"])  # spec: continues the wildcard and adds r3
    s.barrier()
    cp.update([b.route_config("r3", [])])
    r = s.recv()
    assert list(delta_versions(r)) == ["r3"]


def test_delta_star_in_both_lists_starts_with_nothing(cp: ControlPlane, open_stream) -> None:
    """istiod's clients subscribe and unsubscribe "*" in their first request to avoid the legacy wildcard."""
    cp.set_resources([b.cluster("c1"), b.cluster("c2")])
    s = open_stream("delta")
    s.send(CLUSTER, subscribe=["*"], unsubscribe=["*"])
    r = s.recv()  # the first request is always answered, here with nothing
    assert list(r.resources) == [] and list(r.removed_resources) == []
    s.ack(r)
    cp.update([b.cluster("c3")])
    s.barrier()
    s.send(CLUSTER, subscribe=["c1"])
    r = s.recv()
    assert list(delta_versions(r)) == ["c1"]


def test_delta_reconnect_with_initial_versions(cp: ControlPlane, open_stream) -> None:
    cp.set_resources([b.cluster("c1"), b.cluster("c2"), b.cluster("c3")])
    s = open_stream("delta")
    s.send(CLUSTER, subscribe=["*"])
    r = s.recv()
    held = delta_versions(r)
    s.ack(r)
    s.close()
    cp.update([b.cluster("c2", lb_policy="RING_HASH"), b.cluster("c4")], removes=[(CLUSTER, "c3")])
    s2 = open_stream("delta")
    s2.send(CLUSTER, subscribe=["*"], initial=held)
    r = s2.recv()
    assert sorted(delta_versions(r)) == ["c2", "c4"]  # c1 unchanged: not resent
    assert list(r.removed_resources) == ["c3"]
    s2.ack(r)
    # nothing changed since: a reconnect with current versions gets no response
    s3 = open_stream("delta")
    current = cp.resource_versions()[CLUSTER]
    s3.send(CLUSTER, subscribe=["*"], initial=current)
    s3.barrier()
