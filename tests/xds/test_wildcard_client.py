"""Wildcard LDS/CDS subscriptions of the ADS client (what Envoy does, and meshcore's Envoy shape),
SotW and delta, against the reference control plane: every resource cached, additions and deletions
(SotW by absence, delta by removed_resources), partial NACKs, reconnect to a restarted server,
named RDS/EDS and named LDS watches alongside, readiness, CSDS."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterator, List, Set, Tuple

import pytest

from meshcore.controlplane import ControlPlane
from meshcore.controlplane import builders as b
from meshcore.controlplane.store import resource_version
from meshcore.xds.bootstrap import Bootstrap
from meshcore.xds.cache import ACKED, DOES_NOT_EXIST, NACKED
from meshcore.xds.client import WILDCARD, Backoff, XdsClient
from meshcore.xds.csds import client_config
from meshcore.xds.model import CLUSTER, ENDPOINT, LISTENER, ROUTE

Key = Tuple[str, str]
MODES = ["sotw", "delta"]


def wait(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class Recorder:
    """``on_update`` that remembers every changed key (and how many calls there were)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.keys: Set[Key] = set()
        self.calls = 0

    def __call__(self, changed: Set[Key]) -> None:
        with self.lock:
            self.keys |= changed
            self.calls += 1

    def take(self) -> Set[Key]:
        with self.lock:
            keys, self.keys = self.keys, set()
            return keys


def mesh_resources() -> List[Any]:
    return [
        b.api_listener("l1", route_config_name="r1"),
        b.api_listener("l2", route_config_name="r2"),
        b.api_listener("l3", route_config_name="r1"),
        b.route_config("r1", [b.virtual_host("vh", ["*"], [b.route(cluster="c1")])]),
        b.route_config("r2", [b.virtual_host("vh", ["*"], [b.route(cluster="c2")])]),
        b.cluster("c1", eds_service_name="e1"),
        b.cluster("c2", eds_service_name="e2"),
        b.cluster("c3", eds_service_name="e3"),
        b.assignment("e1", [("127.0.0.1", 1001)]),
        b.assignment("e2", [("127.0.0.1", 1002)]),
        b.assignment("e3", [("127.0.0.1", 1003)]),
    ]


def bootstrap(address: str, mode: str, features: Tuple[str, ...] = ()) -> Bootstrap:
    data = {
        "xds_servers": [{"server_uri": address, "channel_creds": [{"type": "insecure"}],
                         "server_features": list(features)}],
        "node": {"id": "sidecar~10.0.0.1~app-1.ns~ns.svc.cluster.local"},
    }
    if mode == "delta":
        data["meshcore"] = {"api_type": "DELTA_GRPC"}
    return Bootstrap.from_dict(data)


@pytest.fixture
def cp() -> Iterator[ControlPlane]:
    with ControlPlane() as plane:
        plane.set_resources(mesh_resources())
        yield plane


@pytest.fixture
def make_client(cp: ControlPlane) -> Iterator[Callable[..., Tuple[XdsClient, Recorder]]]:
    clients: List[XdsClient] = []

    def make(mode: str, wildcard: Tuple[str, ...] = (LISTENER, CLUSTER), start: bool = True,
             address: str = "", **kwargs: Any) -> Tuple[XdsClient, Recorder]:
        rec = Recorder()
        client = XdsClient(bootstrap(address or cp.address, mode), rec, wildcard_types=wildcard,
                           backoff=Backoff(initial=0.05, maximum=0.3), **kwargs)
        clients.append(client)
        if start:
            client.start()
        return client, rec

    yield make
    for c in clients:
        c.close()


def requests(cp: ControlPlane, type_url: str) -> List[dict]:
    return [e for e in cp.history if e["dir"] == "req" and e["type_url"] == type_url]


def responses(cp: ControlPlane, type_url: str) -> List[dict]:
    return [e for e in cp.history if e["dir"] == "resp" and e["type_url"] == type_url]


def ready(client: XdsClient) -> None:
    assert client.wait_wildcard_ready(LISTENER, 5) and client.wait_wildcard_ready(CLUSTER, 5)


@pytest.mark.parametrize("mode", MODES)
def test_wildcard_receives_every_resource(cp: ControlPlane, make_client, mode: str) -> None:
    client, rec = make_client(mode, start=False)
    assert client.wildcard_types == {LISTENER, CLUSTER} and client.is_wildcard(LISTENER)
    assert not client.is_wildcard(ROUTE)
    assert not client.wildcard_ready(LISTENER)  # "not received yet"
    assert client.names(LISTENER) == []
    client.start()
    ready(client)
    assert client.names(LISTENER) == ["l1", "l2", "l3"]
    assert client.names(CLUSTER) == ["c1", "c2", "c3"]
    assert client.names(ROUTE) == [] and client.names(ENDPOINT) == []  # not subscribed at all
    assert client.watched(LISTENER) == []  # no named watch: the wildcard provides them
    for name in ("l1", "l2", "l3"):
        e = client.entry(LISTENER, name)
        assert e.status == ACKED and e.spec.name == name
    wait(lambda: {(LISTENER, "l1"), (LISTENER, "l2"), (LISTENER, "l3"),
                  (CLUSTER, "c1"), (CLUSTER, "c2"), (CLUSTER, "c3")} <= rec.keys, what="on_update keys")
    first_lds = requests(cp, LISTENER)[0]
    if mode == "sotw":
        assert first_lds["names"] == [] and first_lds["version_info"] == ""  # legacy wildcard, as Envoy
        assert requests(cp, CLUSTER)[0]["names"] == []
        assert client.version(LISTENER) == cp.version
    else:
        assert first_lds["subscribe"] == [WILDCARD] and first_lds["initial_resource_versions"] == {}
        assert requests(cp, CLUSTER)[0]["subscribe"] == [WILDCARD]
        assert client.entry(CLUSTER, "c2").version == cp.resource_versions()[CLUSTER]["c2"]
    assert not [e for e in requests(cp, LISTENER) if e["error_detail"]]  # everything ACKed
    # CSDS / config dump shows what the wildcard brought
    dump = client_config(client.entries(), client.node)
    shown = {(g.type_url, g.name): g for g in dump.generic_xds_configs}
    assert {n for t, n in shown if t == LISTENER} == {"l1", "l2", "l3"}
    assert shown[(CLUSTER, "c3")].client_status == 3  # ACKED
    assert shown[(CLUSTER, "c3")].xds_config.type_url == CLUSTER


@pytest.mark.parametrize("mode", MODES)
def test_additions_and_deletions_reach_the_client(cp: ControlPlane, make_client, mode: str) -> None:
    client, rec = make_client(mode)
    ready(client)
    rec.take()
    start = len(cp.history)
    cp.update([b.api_listener("l4", route_config_name="r2"), b.cluster("c1", eds_service_name="e1-new")],
              removes=[(CLUSTER, "c2"), (LISTENER, "l3")])
    wait(lambda: client.names(LISTENER) == ["l1", "l2", "l4"] and client.names(CLUSTER) == ["c1", "c3"],
         what="the update")
    assert client.entry(CLUSTER, "c1").spec.eds_service_name == "e1-new"
    # only the wildcard provided them: deleted resources leave the cache
    assert client.entry(CLUSTER, "c2") is None and client.entry(LISTENER, "l3") is None
    wait(lambda: {(LISTENER, "l4"), (LISTENER, "l3"), (CLUSTER, "c1"), (CLUSTER, "c2")} <= rec.keys,
         what="on_update keys")
    pushed = [e for e in cp.history[start:] if e["dir"] == "resp" and e["type_url"] == CLUSTER]
    if mode == "sotw":  # the full set; c2 is deleted by its absence
        assert pushed[-1]["names"] == ["c1", "c3"] and pushed[-1]["removed"] == []
    else:  # only what changed, and removed_resources
        assert pushed[-1]["names"] == ["c1"] and pushed[-1]["removed"] == ["c2"]
    # everything deleted
    cp.update(removes=[(CLUSTER, "c1"), (CLUSTER, "c3")])
    wait(lambda: client.names(CLUSTER) == [], what="all clusters deleted")
    assert client.wildcard_ready(CLUSTER)  # "no such resource", not "not received yet"
    cp.update([b.cluster("c9")])
    wait(lambda: client.names(CLUSTER) == ["c9"], what="a cluster after an empty set")


@pytest.mark.parametrize("mode", MODES)
def test_ignore_resource_deletion_keeps_wildcard_resources(cp: ControlPlane, make_client, mode: str) -> None:
    rec = Recorder()
    client = XdsClient(bootstrap(cp.address, mode, ("ignore_resource_deletion",)), rec,
                       wildcard_types=(CLUSTER,), backoff=Backoff(initial=0.05, maximum=0.3)).start()
    try:
        assert client.wait_wildcard_ready(CLUSTER, 5)
        cp.update(removes=[(CLUSTER, "c2")])
        wait(lambda: client.entry(CLUSTER, "c2").status == DOES_NOT_EXIST, what="deletion")
        e = client.entry(CLUSTER, "c2")
        assert e.deleted and e.has_value and "c2" in client.names(CLUSTER)
    finally:
        client.close()


@pytest.mark.parametrize("mode", MODES)
def test_nacked_resource_keeps_its_last_good_value(cp: ControlPlane, make_client, mode: str) -> None:
    client, rec = make_client(mode)
    ready(client)
    good_c1 = client.entry(CLUSTER, "c1").spec
    start = len(cp.history)
    bad = b.cluster("c1", eds_service_name="e1")
    bad.type = bad.ORIGINAL_DST  # not supported: rejected
    new_bad = b.cluster("c5")
    new_bad.type = new_bad.ORIGINAL_DST
    cp.update([bad, new_bad, b.cluster("c4", eds_service_name="e4"), b.cluster("c3", eds_service_name="e3-new")])
    wait(lambda: "c4" in client.names(CLUSTER), what="the good cluster")
    wait(lambda: client.entry(CLUSTER, "c1").status == NACKED, what="the NACK")
    e = client.entry(CLUSTER, "c1")
    assert e.spec is good_c1 and "ORIGINAL_DST clusters are not supported" in e.error
    assert client.entry(CLUSTER, "c3").spec.eds_service_name == "e3-new"  # others apply
    fresh = client.entry(CLUSTER, "c5")  # a new resource rejected at once: NACKED, no value
    assert fresh.status == NACKED and not fresh.has_value
    assert client.names(CLUSTER) == ["c1", "c2", "c3", "c4"]
    cp.wait_for(lambda e: e["dir"] == "req" and e["type_url"] == CLUSTER and e["error_detail"], start=start)
    nacks = [e for e in cp.history[start:] if e["dir"] == "req" and e["type_url"] == CLUSTER and e["error_detail"]]
    assert len(nacks) == 1
    message = nacks[0]["error_detail"]["message"]
    assert nacks[0]["error_detail"]["code"] == 3 and "c1: " in message and "c5: " in message
    assert "c4" not in message and "c3" not in message
    if mode == "sotw":
        assert nacks[0]["version_info"] != cp.version  # the last accepted version
        assert nacks[0]["names"] == []  # still the wildcard
    # CSDS shows the NACK on the cached resource
    shown = {g.name: g for g in client_config(client.entries(), client.node).generic_xds_configs
             if g.type_url == CLUSTER}
    assert shown["c1"].client_status == 4 and shown["c1"].error_state.details == e.error
    assert shown["c5"].client_status == 4 and not shown["c5"].HasField("xds_config")
    # fixed: ACKed again; the never-good one deleted on the server leaves the cache
    cp.update([b.cluster("c1", eds_service_name="e1-fixed")], removes=[(CLUSTER, "c5")])
    wait(lambda: client.entry(CLUSTER, "c1").status == ACKED and client.entry(CLUSTER, "c5") is None,
         what="recovery")
    assert client.entry(CLUSTER, "c1").spec.eds_service_name == "e1-fixed"


@pytest.mark.parametrize("mode", MODES)
def test_reconnect_keeps_the_wildcard(cp: ControlPlane, make_client, mode: str) -> None:
    port = cp.port
    client, rec = make_client(mode)
    ready(client)
    client.watch(ROUTE, "r1")
    wait(lambda: client.entry(ROUTE, "r1").has_value, what="r1")
    streams = client.streams_started
    cp.stop()
    wait(lambda: client.streams_started > streams, what="a new stream attempt")
    assert client.names(LISTENER) == ["l1", "l2", "l3"]  # the cache serves meanwhile
    resources = [r for r in mesh_resources() if getattr(r, "name", "") not in ("l2", "c3")]
    resources.append(b.cluster("c7", eds_service_name="e7"))
    with ControlPlane(f"127.0.0.1:{port}") as cp2:
        cp2.set_resources(resources)
        wait(lambda: client.names(CLUSTER) == ["c1", "c2", "c7"] and client.names(LISTENER) == ["l1", "l3"],
             timeout=8, what="the restarted server's state")
        assert client.entry(ROUTE, "r1").has_value
        lds = requests(cp2, LISTENER)[0]
        cds = requests(cp2, CLUSTER)[0]
        first = [e for e in cp2.history if e["dir"] == "req"][0]
        assert first["node"]["id"] == client.node.id  # the node again, on the new stream
        if mode == "sotw":
            assert lds["names"] == [] and lds["version_info"] != "" and lds["nonce"] == ""
            assert requests(cp2, ROUTE)[0]["names"] == ["r1"]
        else:
            assert lds["subscribe"] == [WILDCARD] and lds["nonce"] == ""
            assert set(lds["initial_resource_versions"]) == {"l1", "l2", "l3"}
            assert set(cds["initial_resource_versions"]) == {"c1", "c2", "c3"}
            assert requests(cp2, ROUTE)[0]["subscribe"] == ["r1"]
            # claimed but gone: removed_resources
            assert "c3" in [n for e in responses(cp2, CLUSTER) for n in e["removed"]]
        assert client.wildcard_ready(LISTENER) and client.wildcard_ready(CLUSTER)
        cp2.update([b.api_listener("l8", route_config_name="r1")])
        wait(lambda: "l8" in client.names(LISTENER), what="a push after reconnect")


@pytest.mark.parametrize("mode", MODES)
def test_named_rds_eds_alongside(cp: ControlPlane, make_client, mode: str) -> None:
    client, rec = make_client(mode)
    client.update_watches({ROUTE: ["r1"], ENDPOINT: ["e1", "e2"]}, {})
    wait(lambda: client.entry(ROUTE, "r1").has_value and client.entry(ENDPOINT, "e2").has_value,
         what="named resources")
    assert client.names(ROUTE) == ["r1"] and client.names(ENDPOINT) == ["e1", "e2"]
    rds = requests(cp, ROUTE)
    assert (rds[0]["names"] if mode == "sotw" else rds[0]["subscribe"]) == ["r1"]
    cp.update([b.assignment("e2", [("127.0.0.1", 2002)]), b.assignment("e3", [("127.0.0.1", 3003)])])
    wait(lambda: client.entry(ENDPOINT, "e2").spec.endpoints[0].port == 2002, what="the EDS update")
    assert client.entry(ENDPOINT, "e3") is None  # named types stay named
    client.unwatch(ENDPOINT, "e1")
    assert client.entry(ENDPOINT, "e1") is None
    ready(client)
    assert client.names(LISTENER) == ["l1", "l2", "l3"]


@pytest.mark.parametrize("mode", MODES)
def test_named_listener_watch_alongside_the_wildcard(cp: ControlPlane, make_client, mode: str) -> None:
    client, rec = make_client(mode)
    ready(client)
    start = len(cp.history)
    client.update_watches({LISTENER: ["l1", "missing"]}, {})
    req = cp.wait_for(lambda e: e["dir"] == "req" and e["type_url"] == LISTENER and "missing" in e["names"],
                      start=start)
    if mode == "sotw":
        assert req["names"] == [WILDCARD, "l1", "missing"]  # explicit "*" once names are there
        # the full set lacks it: DOES_NOT_EXIST without waiting for the 15 s timer
        wait(lambda: client.entry(LISTENER, "missing").status == DOES_NOT_EXIST, what="does not exist")
    else:
        assert req["subscribe"] == ["l1", "missing"] and req["nonce"] == ""
    assert client.entry(LISTENER, "l1").status == ACKED
    client.unwatch(LISTENER, "l1")  # still covered by the wildcard: stays cached
    client.unwatch(LISTENER, "missing")
    assert client.entry(LISTENER, "l1").has_value and client.entry(LISTENER, "missing") is None
    if mode == "sotw":
        cp.wait_for(lambda e: e["dir"] == "req" and e["type_url"] == LISTENER and e["names"] == [WILDCARD],
                    start=start)
    else:
        cp.wait_for(lambda e: e["dir"] == "req" and e["type_url"] == LISTENER
                    and sorted(e["unsubscribe"]) == ["l1", "missing"], start=start)
    cp.update(removes=[(LISTENER, "l1")])
    wait(lambda: client.entry(LISTENER, "l1") is None, what="l1 deleted")


@pytest.mark.parametrize("mode", MODES)
def test_watch_all_and_unwatch_all_at_runtime(cp: ControlPlane, make_client, mode: str) -> None:
    client, rec = make_client(mode, wildcard=())
    client.watch(CLUSTER, "c1")
    wait(lambda: client.entry(CLUSTER, "c1").has_value, what="c1")
    assert client.names(CLUSTER) == ["c1"] and not client.wildcard_ready(CLUSTER)
    client.watch_all(CLUSTER)
    assert client.wait_wildcard_ready(CLUSTER, 5)
    wait(lambda: client.names(CLUSTER) == ["c1", "c2", "c3"], what="the wildcard's clusters")
    cds = requests(cp, CLUSTER)
    if mode == "sotw":
        assert cds[0]["names"] == ["c1"] and [WILDCARD, "c1"] in [e["names"] for e in cds]
    else:
        assert [WILDCARD] in [e["subscribe"] for e in cds]
    client.unwatch_all(CLUSTER)
    assert not client.is_wildcard(CLUSTER) and not client.wildcard_ready(CLUSTER)
    assert client.names(CLUSTER) == ["c1"]  # the named watch stays
    if mode == "delta":
        cp.wait_for(lambda e: e["dir"] == "req" and e["type_url"] == CLUSTER and e["unsubscribe"] == [WILDCARD])
    else:
        cp.wait_for(lambda e: e["dir"] == "req" and e["type_url"] == CLUSTER and e["names"] == ["c1"]
                    and e["nonce"] != "")
    cp.update([b.cluster("c6")])
    time.sleep(0.2)
    assert client.names(CLUSTER) == ["c1"]
    with pytest.raises(ValueError):
        client.watch_all("type.googleapis.com/nothing")


def test_custom_decoder_accepts_sidecar_listeners(cp: ControlPlane, make_client) -> None:
    """The Envoy shape's socket listeners are NACKed by the proxyless decoder; ``decoders``
    replaces it per type."""
    cp.update([b.http_listener("0.0.0.0_8080", 8080, route_config_name="8080")])
    plain, _ = make_client("sotw", wildcard=(LISTENER,))
    assert plain.wait_wildcard_ready(LISTENER, 5)
    assert plain.entry(LISTENER, "0.0.0.0_8080").status == NACKED and "l1" in plain.names(LISTENER)
    seen: List[str] = []

    def decode(message: Any, providers: Any = None) -> str:
        seen.append(message.name)
        return f"decoded {message.name}"

    custom, _ = make_client("delta", wildcard=(LISTENER,), decoders={LISTENER: decode})
    assert custom.wait_wildcard_ready(LISTENER, 5)
    assert custom.entry(LISTENER, "0.0.0.0_8080").spec == "decoded 0.0.0.0_8080"
    assert sorted(seen) == ["0.0.0.0_8080", "l1", "l2", "l3"]
    with pytest.raises(ValueError):
        XdsClient(bootstrap(cp.address, "sotw"), decoders={"type.googleapis.com/x": decode})


def test_wildcard_resources_versions_match_the_server(cp: ControlPlane, make_client) -> None:
    client, _ = make_client("delta")
    ready(client)
    expected = cp.resource_versions()
    assert {n: client.entry(LISTENER, n).version for n in client.names(LISTENER)} == expected[LISTENER]
    assert client.entry(CLUSTER, "c1").version == resource_version(b.cluster("c1", eds_service_name="e1"))
