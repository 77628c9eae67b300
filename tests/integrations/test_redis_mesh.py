"""redis-py through the mesh's TCP path (``meshcore.integrations.redis``) against real ``redis-server``s.

Each endpoint of the TCP service ``cache.default:6379`` (VIP 10.96.0.50) is its own
``redis-server`` on a loopback address (127.0.0.2, .3, ... one shared free port: the pods of a
Service with one targetPort); the resources are what istiod sends a sidecar
(``controlplane.istio_sidecar.build``), served by a real ``ControlPlane`` to
``Mesh(xds_shape="envoy")``. Every server holds a key ``who`` = its own address, so a GET on a
connection proves which server it reached. The mTLS case runs redis-server's own TLS port
(``--tls-auth-clients yes``) with the test PKI's ``server`` identity, the service's endpoints
labelled ``security.istio.io/tlsMode: istio`` (auto-mTLS).

redis-server is a requirement of this file (``.ci/run`` installs it): nothing here is skipped. The
``redis_server`` marker lets platforms without it or without 127.x loopback routing (macOS,
Windows, the wheel-test containers) deselect the file.
"""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional

import pytest
import redis
import redis.asyncio

from meshcore import Mesh
from meshcore.controlplane import ControlPlane
from meshcore.controlplane.istio_sidecar import build
from meshcore.errors import UpstreamError
from meshcore.integrations.redis import AsyncMeshConnectionPool, MeshConnection, MeshConnectionPool
from meshcore.tls import TlsHandshakeError

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
from tls.pki import Pki, make_pki  # noqa: E402

pytestmark = [pytest.mark.redis_server, pytest.mark.filterwarnings("ignore::ResourceWarning")]

TARGET = "cache.default:6379"
CLUSTER = "outbound|6379||cache.default.svc.cluster.local"
NODE = "sidecar~10.0.0.9~app.default~default.svc.cluster.local"
IPS = [f"127.0.0.{n}" for n in range(2, 8)]
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


# -- redis-server processes ------------------------------------------------------------------------


def _port_free_on_all(ips: List[str]) -> int:
    for _ in range(200):
        with socket.socket() as s:
            s.bind((ips[0], 0))
            port = s.getsockname()[1]
        ok = True
        for ip in ips[1:]:
            with socket.socket() as t:
                try:
                    t.bind((ip, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise RuntimeError("no port free on every loopback address")


class RedisServer:
    """One ``redis-server`` on ``ip:port`` (plaintext, or TLS only with client certificates)."""

    def __init__(self, ip: str, port: int, tls: Optional[Dict[str, str]] = None) -> None:
        self.ip, self.port, self.tls = ip, port, tls
        self.key = f"{ip}:{port}"
        args = [REDIS_SERVER, "--bind", ip, "--save", "", "--appendonly", "no", "--protected-mode", "no",
                "--loglevel", "warning"]
        if tls is None:
            args += ["--port", str(port)]
        else:
            args += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", tls["chain"],
                     "--tls-key-file", tls["key"], "--tls-ca-cert-file", tls["roots"], "--tls-auth-clients", "yes"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_up()
        self.direct().set("who", self.key)

    def direct(self) -> redis.Redis:
        if self.tls is None:
            return redis.Redis(host=self.ip, port=self.port, socket_timeout=2)
        return redis.Redis(host=self.ip, port=self.port, socket_timeout=2, ssl=True, ssl_certfile=self.tls["chain"],
                           ssl_keyfile=self.tls["key"], ssl_ca_certs=self.tls["roots"], ssl_check_hostname=False)

    def _wait_up(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server {self.key} exited: {self.proc.stderr.read().decode()}")
            try:
                socket.create_connection((self.ip, self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.01)
        raise RuntimeError(f"redis-server {self.key} did not start")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def servers() -> Iterator[Any]:
    """``start(n, tls=None)`` -> ``n`` new RedisServers on the next loopback addresses, one port."""
    started: List[RedisServer] = []
    port = _port_free_on_all(IPS)

    def start(n: int, tls: Optional[Dict[str, str]] = None) -> List[RedisServer]:
        out = [RedisServer(IPS[len(started) + i], port, tls) for i in range(n)]
        started.extend(out)
        return out

    try:
        yield start
    finally:
        for s in started:
            s.kill()


# -- mesh --------------------------------------------------------------------------------------------


def description(eps: List[RedisServer], traffic_policy: Optional[Dict[str, Any]] = None, *,
                tls_mode: bool = False, service_account: str = "server") -> Dict[str, Any]:
    port = eps[0].port if eps else 6379
    labels = {"app": "cache", "security.istio.io/tlsMode": "istio"} if tls_mode else {"app": "cache"}
    desc: Dict[str, Any] = {"services": [{
        "name": "cache", "namespace": "default", "vip": "10.96.0.50",
        "ports": [{"port": 6379, "protocol": "tcp", "name": "tcp-redis", "target_port": port}],
        "endpoints": [{"ip": s.ip, "labels": labels, "service_account": service_account} for s in eps]}]}
    if traffic_policy is not None:
        desc["destination_rules"] = [{"name": "cache", "namespace": "default", "host": "cache",
                                      "trafficPolicy": traffic_policy}]
    return desc


def resources(desc: Dict[str, Any]) -> List[Any]:
    res = build(desc)
    return [*res["listeners"], *res["routes"], *res["clusters"], *res["endpoints"]]


@contextmanager
def mesh_for(desc: Dict[str, Any], **mesh_kw: Any) -> Iterator[Any]:
    with ControlPlane() as cp:
        cp.set_resources(resources(desc))
        mesh = Mesh({"xds_servers": [{"server_uri": f"127.0.0.1:{cp.port}", "channel_creds": [{"type": "insecure"}]}],
                     "node": {"id": NODE}}, xds_shape="envoy", **mesh_kw)
        try:
            yield cp, mesh  # not waited for: the first connection waits for the target's configuration
        finally:
            mesh.close()


def stats(mesh: Mesh) -> Dict[str, Any]:
    """The cluster's stats; a counter never incremented reads 0."""
    return collections.defaultdict(int, mesh.stats().get(CLUSTER, {}))


def held(pool: Any, n: int) -> List[redis.Redis]:
    """``n`` clients each holding its own connection of ``pool`` (connected now)."""
    return [redis.Redis(connection_pool=pool, single_connection_client=True) for _ in range(n)]


def where(client: redis.Redis) -> str:
    """The server a client's connection reached (its ``who`` key) -- checked against the mesh's pick."""
    who = client.get("who").decode()
    assert client.connection.mesh_endpoint == who
    return who


RR = {"loadBalancer": {"simple": "ROUND_ROBIN"}}
EJECT_ON_FIRST = {"consecutive5xxErrors": 1, "interval": "1s", "baseEjectionTime": "60s", "maxEjectionPercent": 100}


# -- tests -------------------------------------------------------------------------------------------


def test_set_get_and_round_robin_per_connection(servers):
    eps = servers(3)
    with mesh_for(description(eps, RR)) as (_, mesh):
        pool = MeshConnectionPool(mesh, TARGET)
        r = redis.Redis(connection_pool=pool)
        assert r.set("greeting", "hello") is True
        assert r.get("greeting") == b"hello"  # one connection, reused: the same server
        assert r.incr("n") == 1 and r.incr("n") == 2
        first = pool._available_connections[0] if hasattr(pool, "_available_connections") else None
        clients = held(pool, 6)  # the idle connection, then 5 new ones
        seen = [where(c) for c in clients]
        assert collections.Counter(seen) == {s.key: 2 for s in eps}
        # round robin: every 3 consecutive new connections cover the 3 endpoints
        assert len(set(seen[1:4])) == 3 and len(set(seen[3:6])) == 3
        assert stats(mesh)["upstream_cx_total"] == 6 and stats(mesh)["upstream_cx_connect_fail"] == 0
        conns = [c.connection for c in clients]
        picks = [c.mesh_pick for c in conns]
        assert all(p is not None and p.cluster == CLUSTER for p in picks)
        if first is not None:
            assert conns[0] is first
        for c in clients:
            c.close()  # back to the pool, still connected
        pool.disconnect()  # closes them: every pick is released
        assert all(c.mesh_pick is None for c in conns) and all(p._done for p in picks)
        assert "target=cache.default:6379" in repr(conns[0])


def test_least_request_default_spreads_open_connections(servers):
    eps = servers(3)
    desc = description(eps)  # no DestinationRule: Istio's default policy is LEAST_REQUEST
    (cluster,) = [c for c in build(desc)["clusters"] if c.name == CLUSTER]
    assert cluster.lb_policy == cluster.LEAST_REQUEST
    with mesh_for(desc, seed=7) as (_, mesh):
        pool = MeshConnectionPool(mesh, TARGET)
        clients = held(pool, 12)
        counts = collections.Counter(where(c) for c in clients)
        assert set(counts) == {s.key for s in eps}
        assert all(2 <= n <= 6 for n in counts.values()), counts
        for c in clients:
            c.close()
        pool.disconnect()


def test_killed_endpoint_counted_ejected_and_avoided(servers):
    eps = servers(3)
    a, b, c = eps
    with mesh_for(description(eps, {**RR, "outlierDetection": EJECT_ON_FIRST})) as (_, mesh):
        pool = MeshConnectionPool(mesh, TARGET)
        clients = held(pool, 3)
        assert {where(x) for x in clients} == {a.key, b.key, c.key}
        for x in clients:
            x.close()  # 3 idle connections, one per server
        b.kill()
        clients = held(pool, 6)  # b's idle connection is found dead and remade; 3 new connections
        seen = [where(x) for x in clients]
        assert b.key not in seen and set(seen) == {a.key, c.key}
        for x in clients:
            assert x.set("k", "v") is True and x.get("k") == b"v"
        st = stats(mesh)
        assert st["upstream_cx_connect_fail"] == 1  # the first connect to b; ejected after it
        assert st["outlier_detection.ejections_active"] == 1
        assert st["outlier_detection.ejections_enforced_consecutive_5xx"] == 1
        assert mesh.config(TARGET) is not None
        # later connections never try b again while it is ejected
        more = held(pool, 6)
        assert b.key not in {where(x) for x in more}
        assert stats(mesh)["upstream_cx_connect_fail"] == 1
        for x in clients + more:
            x.close()
        pool.disconnect()


def test_failed_connect_tried_on_another_endpoint_without_outlier_detection(servers):
    eps = servers(2)
    dead = servers(1)[0]
    dead.kill()
    with mesh_for(description([*eps, dead], RR)) as (_, mesh):
        pool = MeshConnectionPool(mesh, TARGET)
        clients = held(pool, 6)  # round robin reaches the dead endpoint twice; each time retried
        seen = [where(x) for x in clients]
        assert dead.key not in seen and set(seen) == {e.key for e in eps}
        st = stats(mesh)
        # each visit of the dead endpoint is one failed attempt, then the next endpoint
        assert st["upstream_cx_connect_fail"] in (2, 3) and st["upstream_cx_total"] == 6 + st["upstream_cx_connect_fail"]
        for x in clients:
            x.close()
        pool.disconnect()


def test_blocking_pool_with_the_connection_class(servers):
    eps = servers(2)
    with mesh_for(description(eps, RR)) as (_, mesh):
        pool = redis.BlockingConnectionPool(connection_class=MeshConnection, max_connections=4, timeout=2,
                                            mesh=mesh, target=TARGET)
        clients = held(pool, 4)
        assert collections.Counter(where(x) for x in clients) == {e.key: 2 for e in eps}
        for x in clients:
            x.close()
        pool.disconnect()


def test_importing_meshcore_does_not_import_redis():
    code = ("import sys, meshcore, meshcore.integrations, meshcore.tcp; "
            "print(sorted(m for m in sys.modules if m == 'redis' or m.startswith('redis.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_attempt_failing_raises_redis_connection_error(servers):
    dead = servers(1)[0]
    dead.kill()
    with mesh_for(description([dead], RR)) as (_, mesh):
        r = redis.Redis(connection_pool=MeshConnectionPool(mesh, TARGET, connect_attempts=2))
        with pytest.raises(redis.ConnectionError) as info:
            r.ping()
        exc = info.value
        assert isinstance(exc.__cause__, UpstreamError) and exc.__cause__.kind == "connect-failure"
        assert exc.meshcore["attempts"] == 2 and exc.meshcore["endpoint"] == dead.key
        assert exc.meshcore["cluster"] == CLUSTER
        assert stats(mesh)["upstream_cx_connect_fail"] == 2
        # not a TCP service of the mesh: no connection at all, the mesh's refusal as the cause
        bad = redis.Redis(connection_pool=MeshConnectionPool(mesh, "nothing.default:6379", ready_timeout=0.5))
        with pytest.raises(redis.ConnectionError) as info:
            bad.ping()
        assert info.value.meshcore["attempts"] == 0
    with pytest.raises(TypeError):
        MeshConnectionPool(mesh, TARGET, host="10.0.0.1")


def test_endpoint_change_applies_to_new_connections(servers):
    a, b, c = servers(3)
    with mesh_for(description([a], RR)) as (cp, mesh):
        pool = MeshConnectionPool(mesh, TARGET)
        old = held(pool, 2)
        assert [where(x) for x in old] == [a.key, a.key]
        cp.set_resources(resources(description([b, c], RR)))
        deadline = time.monotonic() + 10
        while True:
            with mesh.tcp_endpoint(TARGET) as pick:
                if pick.endpoint.key != a.key:
                    break
            assert time.monotonic() < deadline, "the endpoint change never arrived"
            time.sleep(0.02)
        new = held(pool, 4)
        assert collections.Counter(where(x) for x in new) == {b.key: 2, c.key: 2}
        assert [where(x) for x in old] == [a.key, a.key]  # open connections stay (as tcp_proxy's do)
        for x in old + new:
            x.close()
        pool.disconnect()


def test_asyncio_pool(servers):
    eps = servers(2)
    dead = servers(1)[0]
    dead.kill()

    async def main(mesh: Mesh) -> None:
        pool = AsyncMeshConnectionPool(mesh, TARGET)
        r = redis.asyncio.Redis(connection_pool=pool)
        assert await r.set("greeting", "hello") is True
        assert await r.get("greeting") == b"hello"
        clients = [redis.asyncio.Redis(connection_pool=pool, single_connection_client=True) for _ in range(6)]
        seen = []
        for x in clients:
            who = (await x.get("who")).decode()
            assert x.connection.mesh_endpoint == who
            seen.append(who)
        assert dead.key not in seen and set(seen) == {e.key for e in eps}
        conns = [x.connection for x in clients]
        picks = [cn.mesh_pick for cn in conns]
        for x in clients:
            await x.aclose() if hasattr(x, "aclose") else await x.close()
        await pool.disconnect()
        assert all(cn.mesh_pick is None for cn in conns) and all(p._done for p in picks)
        await (r.aclose() if hasattr(r, "aclose") else r.close())

    with mesh_for(description([*eps, dead], {**RR, "outlierDetection": EJECT_ON_FIRST})) as (_, mesh):
        asyncio.run(main(mesh))
        st = stats(mesh)
        assert st["upstream_cx_connect_fail"] == 1 and st["outlier_detection.ejections_active"] == 1


# -- mTLS: redis-server's TLS port with the workload certificates -------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("redis-pki"))


def _tls_files(pki: Pki, name: str) -> Dict[str, str]:
    p = pki.paths(name)
    return {"chain": str(p.chain), "key": str(p.key), "roots": str(p.roots)}


def test_mtls_auto_istio_sync_and_async(servers, pki):
    eps = servers(2, tls=_tls_files(pki, "server"))  # SPIFFE ID spiffe://cluster.local/ns/default/sa/server
    with mesh_for(description(eps, RR, tls_mode=True), certificates=str(pki.paths("client").dir)) as (_, mesh):
        pool = MeshConnectionPool(mesh, TARGET)
        clients = held(pool, 2)
        assert {where(x) for x in clients} == {e.key for e in eps}
        for x in clients:
            assert x.set("secret", "s3") is True and x.get("secret") == b"s3"
            sock = x.connection._sock
            assert sock.version() is not None and sock.getpeercert()["subjectAltName"] == (
                ("URI", "spiffe://cluster.local/ns/default/sa/server"),)
        assert clients[0].connection.mesh_pick.tls.mutual
        for x in clients:
            x.close()
        pool.disconnect()

        async def main() -> None:
            apool = AsyncMeshConnectionPool(mesh, TARGET)
            ac = [redis.asyncio.Redis(connection_pool=apool, single_connection_client=True) for _ in range(2)]
            got = set()
            for x in ac:
                who = (await x.get("who")).decode()
                assert x.connection.mesh_endpoint == who
                assert x.connection._writer.get_extra_info("ssl_object") is not None
                got.add(who)
            assert got == {e.key for e in eps}
            for x in ac:
                await x.aclose() if hasattr(x, "aclose") else await x.close()
            await apool.disconnect()

        asyncio.run(main())
        st = stats(mesh)
        assert st["ssl.handshake"] == 4 and st["upstream_cx_connect_fail"] == 0


def test_mtls_wrong_server_identity_is_a_connect_failure(servers, pki):
    eps = servers(1, tls=_tls_files(pki, "server"))
    # the service account the cluster expects is "other": the server's SPIFFE ID (sa/server) does not match
    desc = description(eps, RR, tls_mode=True, service_account="other")
    with mesh_for(desc, certificates=str(pki.paths("client").dir)) as (_, mesh):
        r = redis.Redis(connection_pool=MeshConnectionPool(mesh, TARGET, connect_attempts=1))
        with pytest.raises(redis.ConnectionError) as info:
            r.ping()
        assert isinstance(info.value.__cause__, TlsHandshakeError)
        assert "match none" in str(info.value.__cause__)

        async def main() -> None:
            ar = redis.asyncio.Redis(connection_pool=AsyncMeshConnectionPool(mesh, TARGET, connect_attempts=1))
            with pytest.raises(redis.ConnectionError) as ainfo:
                await ar.ping()
            assert isinstance(ainfo.value.__cause__, TlsHandshakeError)
            await (ar.aclose() if hasattr(ar, "aclose") else ar.close())

        asyncio.run(main())
        st = stats(mesh)
        assert st["ssl.fail_verify_san"] == 2 and st["upstream_cx_connect_fail"] == 2
