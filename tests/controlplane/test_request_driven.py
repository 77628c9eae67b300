"""The control plane is request-driven: per type at most one response awaits its ACK/NACK; store
changes made meanwhile are coalesced into one response with the newest state; a request the
server does not answer (stale nonce) still has its subscription change applied. SotW and delta,
raw requests on a real gRPC stream (``barrier()`` proves that nothing else was owed)."""

from __future__ import annotations

from envoy.config.endpoint.v3 import endpoint_pb2

from meshcore.controlplane import ControlPlane
from meshcore.controlplane import builders as b
from meshcore.xds.model import ENDPOINT

from .ads_client import delta_versions, resource_names


def _cla(name: str, port: int):
    return b.assignment(name, [("127.0.0.1", port)])


def _ports(response) -> dict:
    """``{cluster_name: first port}`` of the assignments in a SotW or delta response."""
    anys = [r.resource for r in response.resources] if hasattr(response, "system_version_info") \
        else list(response.resources)
    out = {}
    for any_ in anys:
        cla = endpoint_pb2.ClusterLoadAssignment.FromString(any_.value)
        out[cla.cluster_name] = cla.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value
    return out


def test_sotw_changes_wait_for_the_ack_and_coalesce(cp: ControlPlane, open_stream) -> None:
    cp.set_resources([_cla("e1", 1), _cla("e2", 2)])
    s = open_stream()
    s.send(ENDPOINT, ["e1", "e2"])
    r1 = s.recv()
    assert _ports(r1) == {"e1": 1, "e2": 2}
    # r1 is not ACKed yet: three store changes push nothing for EDS
    cp.update([_cla("e1", 11)])
    cp.update([_cla("e1", 12)])
    last = cp.update([_cla("e2", 22)])
    s.barrier()
    # the ACK frees the type: one response with the newest state of everything that changed
    s.ack(r1)
    r2 = s.recv()
    assert r2.version_info == last and _ports(r2) == {"e1": 12, "e2": 22}
    s.barrier()
    s.ack(r2)
    s.barrier()  # nothing more owed


def test_sotw_nack_also_frees_the_type(cp: ControlPlane, open_stream) -> None:
    cp.set_resources([_cla("e1", 1)])
    s = open_stream()
    s.send(ENDPOINT, ["e1"])
    r1 = s.recv()
    cp.update([_cla("e1", 2)])
    s.barrier()
    s.send(ENDPOINT, ["e1"], version="", nonce=r1.nonce, error="bad port")
    r2 = s.recv()
    assert _ports(r2) == {"e1": 2}
    # NACK r2: nothing changed since, so nothing is resent
    s.send(ENDPOINT, ["e1"], version="", nonce=r2.nonce, error="bad port")
    s.barrier()


def test_sotw_stale_request_subscription_is_not_lost(cp: ControlPlane, open_stream) -> None:
    """The client adds e2 in a request racing with a push (stale nonce), then ACKs the push with its
    full name set: the server answers the ACK with the new name although the ACK changes nothing."""
    cp.set_resources([_cla("e1", 1), _cla("e2", 2), _cla("e3", 3)])
    s = open_stream()
    s.send(ENDPOINT, ["e1"])
    r1 = s.recv()
    s.ack(r1)
    cp.update([_cla("e1", 11)])
    r2 = s.recv()  # the push the client has not seen when it sends the next request
    s.send(ENDPOINT, ["e1", "e2"], version=r1.version_info, nonce=r1.nonce)  # stale nonce
    s.barrier()  # not answered
    s.ack(r2, names=["e1", "e2"])
    r3 = s.recv()
    assert resource_names(r3) == ["e1", "e2"]
    s.ack(r3)
    # a stale request that drops a name: later changes of it are not sent
    cp.update([_cla("e2", 21)])
    r4 = s.recv()
    s.send(ENDPOINT, ["e1"], version=r3.version_info, nonce=r3.nonce)  # stale, unsubscribes e2
    s.ack(r4, names=["e1"])
    r5 = s.recv()  # the answer to the changed name set: the full (new) set
    assert resource_names(r5) == ["e1"]
    s.ack(r5)
    s.barrier()
    cp.update([_cla("e2", 22)])
    s.barrier()
    cp.update([_cla("e1", 13)])
    assert resource_names(s.recv()) == ["e1"]


def test_delta_changes_wait_for_the_ack_and_coalesce(cp: ControlPlane, open_stream) -> None:
    cp.set_resources([_cla("e1", 1), _cla("e2", 2)])
    s = open_stream("delta")
    s.send(ENDPOINT, subscribe=["e1", "e2"])
    r1 = s.recv()
    assert sorted(delta_versions(r1)) == ["e1", "e2"]
    cp.update([_cla("e1", 11)])
    cp.update([_cla("e1", 12)], removes=[(ENDPOINT, "e2")])
    s.barrier()
    s.ack(r1)
    r2 = s.recv()
    assert _ports(r2) == {"e1": 12} and list(r2.removed_resources) == ["e2"]
    s.ack(r2)
    s.barrier()


def test_delta_subscription_while_outstanding_is_answered_after_the_ack(cp: ControlPlane, open_stream) -> None:
    cp.set_resources([_cla("e1", 1), _cla("e2", 2), _cla("e3", 3)])
    s = open_stream("delta")
    s.send(ENDPOINT, subscribe=["e1"])
    r1 = s.recv()
    # a subscription change (nonce-less) and one carrying an old nonce, both while r1 is outstanding
    s.send(ENDPOINT, subscribe=["e2"])
    s.send(ENDPOINT, subscribe=["e3"], nonce="stale-nonce")
    s.barrier()
    cp.update([_cla("e1", 11)])
    s.barrier()
    s.ack(r1)
    r2 = s.recv()
    assert _ports(r2) == {"e1": 11, "e2": 2, "e3": 3}
    s.ack(r2)
    s.barrier()
    # unsubscribed while outstanding: not sent
    cp.update([_cla("e2", 22)])
    r3 = s.recv()
    s.send(ENDPOINT, unsubscribe=["e3"])
    cp.update([_cla("e3", 33)])
    s.barrier()
    s.ack(r3)
    s.barrier()
