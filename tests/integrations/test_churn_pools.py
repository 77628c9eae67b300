"""Clusters leaving the configuration: each integration closes the departed cluster's pools once
its requests in flight finished (never under one), the mesh drops the cluster's state and stats
(into the bounded removed summary), and failures after retries carry the mesh's context.

A reference control plane feeds the mesh; the upstreams are real loopback servers. Pools are the
integrations' real ones, observed (a close is recorded, then done) -- nothing is mocked.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, List

import pytest

import meshcore
from meshcore.controlplane import ControlPlane
from meshcore.xds.client import Backoff
from meshcore.xds.resource_file import parse_resources

from .conftest import TARGET, URL, dead_port, resources, route


class Env:
    """A control plane serving clusters ``keep`` (fast upstream) and ``old`` (slow upstream:
    answers after ``SLOW`` s), and a mesh bootstrapped to it."""

    SLOW = 0.8

    def __init__(self, cp: ControlPlane, upstreams: Any, ports: Any = None) -> None:
        self.cp = cp
        self.dead = dead_port()
        if ports is None:
            self.fast = upstreams("fast")
            self.slow = upstreams("slow", delay=self.SLOW)
            ports = (self.fast.port, self.slow.port)
        self.clusters: Dict[str, List[int]] = {"keep": [ports[0]], "old": [ports[1]], "dead": [self.dead]}
        self.fast_port = ports[0]
        self.publish()
        boot = {"xds_servers": [{"server_uri": cp.address, "channel_creds": [{"type": "insecure"}],
                                 "server_features": ["xds_v3"]}],
                "node": {"id": "churn-test", "cluster": "meshcore", "locality": {"zone": "z1"}}}
        self.mesh = meshcore.Mesh(boot, backoff=Backoff(initial=0.05, multiplier=1.6, jitter=0.2, maximum=0.5))
        self.mesh.start()
        self.mesh.wait_ready(TARGET, timeout=10)

    def publish(self) -> None:
        routes = [route(f"/{c}", c, retry={"retry_on": "connect-failure", "num_retries": 2})
                  for c in self.clusters if c != "keep"]
        routes.append(route("/", "keep"))
        self.cp.set_resources(parse_resources(resources(self.clusters, routes)))

    def remove(self, cluster: str) -> None:
        """Remove ``cluster`` (and its route) from the control plane; wait until the mesh let go."""
        del self.clusters[cluster]
        self.publish()
        wait_until(lambda: not self.mesh._is_live_cluster(cluster), what=f"{cluster} removed")

    def close(self) -> None:
        self.mesh.close()


def wait_until(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def env(upstreams) -> Iterator[Env]:
    with ControlPlane() as cp:
        e = Env(cp, upstreams)
        try:
            yield e
        finally:
            e.close()


def in_flight(env: Env, fn: Callable[[], Any]) -> "tuple[threading.Thread, Dict[str, Any]]":
    """Run ``fn`` (a request to the slow cluster) in a thread; return once the upstream has it."""
    out: Dict[str, Any] = {}
    hits = env.slow.hits

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as e:  # reported by the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    wait_until(lambda: env.slow.hits > hits, what="the request to reach the slow upstream")
    return t, out


def check_notes(exc: BaseException, cluster: str, attempts: int, endpoint: str) -> None:
    info = exc.meshcore  # type: ignore[attr-defined]
    assert info["target"] == TARGET and info["cluster"] == cluster
    assert info["attempts"] == attempts and info["endpoint"] == endpoint
    notes = getattr(exc, "__notes__", [])
    assert any(f"cluster {cluster}" in n and endpoint in n and f"{attempts} attempt" in n for n in notes), notes


# -- the mesh: state and stats of removed clusters --------------------------------------------------


def test_mesh_drops_state_and_stats_of_removed_cluster_after_in_flight_request(env: Env) -> None:
    mesh = env.mesh

    def request_slow() -> int:
        call = mesh.request(f"{URL}/old")
        import urllib.request

        def send(attempt: Any) -> Any:
            with urllib.request.urlopen(attempt.url, timeout=5) as r:
                return r.status

        return call.run(send, status_of=lambda s: s)

    mesh.request(f"{URL}/").run(lambda a: 200, status_of=lambda s: s)  # "keep" has state too
    t, out = in_flight(env, request_slow)
    env.remove("old")
    assert "old" in mesh._states, "state dropped under an in-flight request"
    assert "old" in mesh.stats()
    t.join(5)
    assert out.get("result") == 200, out
    stats = mesh.stats()  # reaps: the request finished
    assert "old" not in stats and "old" not in mesh._states
    assert "keep" in stats
    removed = mesh.stats_registry.removed()
    assert removed["clusters"] == 1
    assert removed.get("upstream_rq_total") == 1 and removed.get("upstream_rq_200") == 1


def test_mesh_state_stays_bounded_over_many_cluster_names(env: Env) -> None:
    mesh = env.mesh
    for i in range(30):
        name = f"gen{i}"
        env.clusters[name] = [env.fast_port]
        env.publish()
        wait_until(lambda: mesh._is_live_cluster(name), what=f"{name} published")
        call = mesh.request(f"{URL}/{name}")
        call.run(lambda a: 200, status_of=lambda s: s)
        del env.clusters[name]
    env.publish()
    wait_until(lambda: not mesh._is_live_cluster("gen29"))
    assert set(mesh.stats()) <= {"keep", "old", "dead"}
    assert len(mesh._states) <= 3
    assert mesh.stats_registry.removed()["upstream_rq_total"] == 30


# -- httpx ---------------------------------------------------------------------------------------------


def _recording_httpx(sync: bool) -> Any:
    import httpx

    base = httpx.HTTPTransport if sync else httpx.AsyncHTTPTransport

    class Recording(base):  # type: ignore[misc, valid-type]
        made: List[Any] = []

        def __init__(self, cluster: str) -> None:
            super().__init__()
            self.cluster = cluster
            self.closed_at: Any = None
            Recording.made.append(self)

        def close(self) -> None:
            self.closed_at = time.monotonic()
            super().close()

        async def aclose(self) -> None:
            self.closed_at = time.monotonic()
            await super().aclose()

    return Recording


def test_httpx_closes_removed_cluster_transport_after_in_flight_request(env: Env) -> None:
    import httpx

    from meshcore.integrations.httpx import MeshTransport

    Recording = _recording_httpx(sync=True)
    transport = MeshTransport(env.mesh, inner_factory=Recording)
    with httpx.Client(mounts={"all://*.svc.cluster.local": transport}) as client:
        assert client.get(f"{URL}/").status_code == 200
        t, out = in_flight(env, lambda: client.get(f"{URL}/old"))
        (old,) = [r for r in Recording.made if r.cluster == "old"]
        env.remove("old")
        time.sleep(0.1)
        assert old.closed_at is None, "closed under an in-flight request"
        t.join(5)
        assert out["result"].status_code == 200 and out["result"].json()["name"] == "slow"
        assert old.closed_at is not None
        keep = [r for r in Recording.made if r.cluster == "keep"]
        assert keep and keep[0].closed_at is None
        assert client.get(f"{URL}/").status_code == 200
        # an idle pool closes as soon as its cluster leaves
        env.clusters["old2"] = [env.fast_port]
        env.publish()
        wait_until(lambda: env.mesh._is_live_cluster("old2"))
        assert client.get(f"{URL}/old2").status_code == 200
        (old2,) = [r for r in Recording.made if r.cluster == "old2"]
        env.remove("old2")
        wait_until(lambda: old2.closed_at is not None, what="idle pool closed")
        assert set(c for _, c, _ in transport._inner) == {"keep"}


def test_httpx_async_closes_removed_cluster_transport_after_in_flight_request(env: Env) -> None:
    import httpx

    from meshcore.integrations.httpx import AsyncMeshTransport

    Recording = _recording_httpx(sync=False)
    transport = AsyncMeshTransport(env.mesh, inner_factory=Recording)

    async def main() -> None:
        async with httpx.AsyncClient(mounts={"all://*.svc.cluster.local": transport}) as client:
            assert (await client.get(f"{URL}/")).status_code == 200
            hits = env.slow.hits
            task = asyncio.ensure_future(client.get(f"{URL}/old"))
            while env.slow.hits == hits:
                await asyncio.sleep(0.01)
            (old,) = [r for r in Recording.made if r.cluster == "old"]
            await asyncio.to_thread(env.remove, "old")
            await asyncio.sleep(0.1)
            assert old.closed_at is None, "closed under an in-flight request"
            resp = await task
            assert resp.status_code == 200 and resp.json()["name"] == "slow"
            assert old.closed_at is not None
            # idle: closed on this loop, from the xDS thread's notification
            env.clusters["old2"] = [env.fast_port]
            await asyncio.to_thread(env.publish)
            while not env.mesh._is_live_cluster("old2"):
                await asyncio.sleep(0.01)
            assert (await client.get(f"{URL}/old2")).status_code == 200
            (old2,) = [r for r in Recording.made if r.cluster == "old2"]
            await asyncio.to_thread(env.remove, "old2")
            for _ in range(200):
                if old2.closed_at is not None:
                    break
                await asyncio.sleep(0.01)
            assert old2.closed_at is not None
            assert [r.closed_at for r in Recording.made if r.cluster == "keep"] == [None]

    asyncio.run(main())


def test_httpx_shares_one_ssl_context(env: Env) -> None:
    import httpx

    from meshcore.integrations.httpx import MeshTransport

    env.clusters["other"] = [env.fast_port]
    env.publish()
    wait_until(lambda: env.mesh._is_live_cluster("other"))
    transport = MeshTransport(env.mesh)
    with httpx.Client(mounts={"all://*.svc.cluster.local": transport}) as client:
        client.get(f"{URL}/")
        client.get(f"{URL}/other")
        inner = list(transport._inner.values())
        assert len(inner) == 2
        contexts = {id(t._pool._ssl_context) for t in inner}
        assert len(contexts) == 1
        ctx = inner[0]._pool._ssl_context
        import ssl

        assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_httpx_failure_after_retries_carries_mesh_context(env: Env, mode: str) -> None:
    import httpx

    from meshcore.integrations.httpx import AsyncMeshTransport, MeshTransport

    if mode == "sync":
        with httpx.Client(mounts={"all://*.svc.cluster.local": MeshTransport(env.mesh)}) as client:
            with pytest.raises(httpx.ConnectError) as info:
                client.get(f"{URL}/dead")
    else:
        async def main() -> None:
            async with httpx.AsyncClient(mounts={"all://*.svc.cluster.local": AsyncMeshTransport(env.mesh)}) as c:
                await c.get(f"{URL}/dead")

        with pytest.raises(httpx.ConnectError) as info:
            asyncio.run(main())
    check_notes(info.value, "dead", 3, f"127.0.0.1:{env.dead}")
    if sys.version_info >= (3, 11):
        import traceback

        assert "cluster dead" in "".join(traceback.format_exception(info.value))


# -- requests ------------------------------------------------------------------------------------------


def test_requests_clears_removed_cluster_pools_after_in_flight_request(env: Env) -> None:
    import requests

    from meshcore.integrations.requests import MeshAdapter

    adapter = MeshAdapter(env.mesh)
    with requests.Session() as session:
        session.mount("http://", adapter)
        assert session.get(f"{URL}/").status_code == 200
        t, out = in_flight(env, lambda: session.get(f"{URL}/old"))
        manager = adapter._pools.pools()["old"]
        assert len(manager.pools) == 1
        env.remove("old")
        time.sleep(0.1)
        assert len(manager.pools) == 1, "cleared under an in-flight request"
        t.join(5)
        assert out["result"].status_code == 200 and out["result"].json()["name"] == "slow"
        assert len(manager.pools) == 0
        assert list(adapter._pools.pools()) == ["keep"]
        assert session.get(f"{URL}/").status_code == 200


def test_requests_failure_after_retries_carries_mesh_context(env: Env) -> None:
    import requests

    from meshcore.integrations.requests import MeshAdapter

    with requests.Session() as session:
        session.mount("http://", MeshAdapter(env.mesh))
        with pytest.raises(requests.ConnectionError) as info:
            session.get(f"{URL}/dead")
    check_notes(info.value, "dead", 3, f"127.0.0.1:{env.dead}")


# -- aiohttp -------------------------------------------------------------------------------------------


def _idle_ports(session: Any) -> List[int]:
    return [key.port for key, conns in session.connector._conns.items() if conns]


def test_aiohttp_closes_removed_cluster_connections_after_in_flight_request(env: Env) -> None:
    from meshcore.integrations.aiohttp import MeshSession

    async def main() -> None:
        async with MeshSession(env.mesh) as http:
            assert (await http.get(f"{URL}/")).status == 200
            hits = env.slow.hits
            task = asyncio.ensure_future(http.get(f"{URL}/old"))
            while env.slow.hits == hits:
                await asyncio.sleep(0.01)
            await asyncio.to_thread(env.remove, "old")
            await asyncio.sleep(0.1)
            assert http._pools.closed_pools == 0, "closed under an in-flight request"
            resp = await task
            assert resp.status == 200 and (await resp.json())["name"] == "slow"
            assert http._pools.closed_pools == 1
            assert env.slow.port not in _idle_ports(http.session)  # its keep-alive connection closed
            assert env.fast.port in _idle_ports(http.session)  # a live cluster's stays
            assert (await http.get(f"{URL}/")).status == 200

    asyncio.run(main())


def test_aiohttp_failure_after_retries_carries_mesh_context(env: Env) -> None:
    import aiohttp

    from meshcore.integrations.aiohttp import MeshSession

    async def main() -> None:
        async with MeshSession(env.mesh) as http:
            await http.get(f"{URL}/dead")

    with pytest.raises(aiohttp.ClientConnectionError) as info:
        asyncio.run(main())
    check_notes(info.value, "dead", 3, f"127.0.0.1:{env.dead}")


# -- gRPC ----------------------------------------------------------------------------------------------


@pytest.fixture
def grpc_env() -> Iterator[Any]:
    """Two gRPC servers (``old.S/Slow`` answers after SLOW s) behind ``keep`` and ``old``."""
    import concurrent.futures

    import grpc

    arrived = threading.Event()

    def slow(request: bytes, context: Any) -> bytes:
        arrived.set()
        time.sleep(Env.SLOW)
        return b"slow:" + request

    def fast(request: bytes, context: Any) -> bytes:
        return b"fast:" + request

    servers, ports = [], []
    for handler in (fast, slow):
        server = grpc.server(concurrent.futures.ThreadPoolExecutor(4))
        methods = {"Slow": grpc.unary_unary_rpc_method_handler(handler)}
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("old.S", methods),
                                         grpc.method_handlers_generic_handler("keep.S", methods)])
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        servers.append(server)
    with ControlPlane() as cp:
        e = Env(cp, None, ports)
        e.arrived = arrived  # type: ignore[attr-defined]
        try:
            yield e
        finally:
            e.close()
            for server in servers:
                server.stop(0)


def test_grpc_closes_departed_endpoint_channel_after_in_flight_rpc(grpc_env: Any) -> None:
    import grpc

    from meshcore.integrations.grpc import mesh_channel

    env = grpc_env
    with mesh_channel(env.mesh, TARGET) as channel:
        assert channel.unary_unary("/keep.S/Slow")(b"a", timeout=5) == b"fast:a"
        out: Dict[str, Any] = {}
        t = threading.Thread(target=lambda: out.update(r=channel.unary_unary("/old.S/Slow")(b"b", timeout=5)))
        t.start()
        assert env.arrived.wait(5)
        old_address = f"127.0.0.1:{env.clusters['old'][0]}"
        (ep,) = [ep for ep in channel._pool._channels.values() if ep.address == old_address]
        env.remove("old")
        wait_until(lambda: old_address not in channel.endpoint_addresses(), what="the sweep")
        assert ep.departed and ep.inflight == 1
        t.join(5)
        assert out.get("r") == b"slow:b", "the in-flight RPC was cut"
        with pytest.raises(ValueError):  # grpcio refuses RPCs on a closed channel
            ep.channel.unary_unary("/old.S/Slow")(b"c", timeout=1)
        assert channel.endpoint_addresses() == [f"127.0.0.1:{env.fast_port}"]


def test_grpc_failure_after_retries_carries_mesh_context(grpc_env: Any) -> None:
    import grpc

    from meshcore.integrations.grpc import mesh_channel

    env = grpc_env
    with mesh_channel(env.mesh, TARGET) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary("/dead.S/Slow")(b"x", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    check_notes(info.value, "dead", 3, f"127.0.0.1:{env.dead}")
