"""xDS layer benchmarks: push-to-pick latency, a 10,000 x 10 snapshot, one EDS change in that mesh.

The compiled and pure twins run side by side (ids c / py): the publisher's balancers and route
tables come from ``meshcore._fast.lb_<impl>`` / ``routes_<impl>``. The control plane runs in a
child process for the big snapshot, so the client's peak memory is its own.

``MESHCORE_BENCH_QUICK=1`` (CI smoke) shrinks the mesh to 500 clusters and the rounds.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from importlib import import_module
from typing import Any, Dict, List

import pytest

import meshcore
from meshcore.controlplane import ControlPlane
from meshcore.xds import publisher as publisher_mod
from meshcore.xds import snapshot as snapshot_mod
from meshcore.xds.client import Backoff
from meshcore.xds.model import ENDPOINT
from meshcore.xds.resource_file import parse_resources

QUICK = bool(os.environ.get("MESHCORE_BENCH_QUICK"))
N_CLUSTERS = 500 if QUICK else 10_000
N_ENDPOINTS = 10
TARGET = "big.mesh.local:80"


@pytest.fixture(params=["c", "py"])
def impl(request, monkeypatch):
    monkeypatch.setattr(snapshot_mod, "LoadBalancer", import_module(f"meshcore._fast.lb_{request.param}").LoadBalancer)
    monkeypatch.setattr(publisher_mod, "RouteTable",
                        import_module(f"meshcore._fast.routes_{request.param}").RouteTable)
    return request.param


def _bootstrap(address: str) -> Dict[str, Any]:
    return {"xds_servers": [{"server_uri": address, "channel_creds": [{"type": "insecure"}]}],
            "node": {"id": "bench", "cluster": "bench"}}


def _cla(name: str, base: int, n: int = N_ENDPOINTS) -> Dict[str, Any]:
    return {"cluster_name": name, "endpoints": [{"locality": {"zone": "z"}, "load_balancing_weight": 1,
            "lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": f"10.{(base + i) >> 16 & 255}.{(base + i) >> 8 & 255}.{(base + i) & 255}",
                "port_value": 8080}}}} for i in range(n)]}]}


def mesh_of(n_clusters: int) -> Dict[str, List[Any]]:
    names = [f"svc-{i}" for i in range(n_clusters)]
    routes = [{"name": f"r{i}", "match": {"prefix": f"/svc-{i}/"}, "route": {"cluster": n}}
              for i, n in enumerate(names)]
    return {
        "listeners": [{"name": TARGET, "api_listener": {"api_listener": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                     ".HttpConnectionManager",
            "rds": {"config_source": {"ads": {}}, "route_config_name": "big"},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}}],
        "routes": [{"name": "big", "virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": routes}]}],
        "clusters": [{"name": n, "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}}} for n in names],
        "endpoints": [_cla(n, i * N_ENDPOINTS) for i, n in enumerate(names)],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: List[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


@pytest.mark.benchmark(group="xds-push-to-pick")
def test_push_to_pick_latency(benchmark, impl):
    """Server push of a new endpoint -> first pick that can return it (loopback, SotW)."""
    with ControlPlane() as cp:
        res = parse_resources(mesh_of(20))
        cp.set_resources(res)
        with meshcore.Mesh(_bootstrap(cp.address), backoff=Backoff(0.05, 1.6, 0.2, 0.5)) as mesh:
            mesh.wait_ready(TARGET, timeout=10)
            rt = mesh.config(TARGET).clusters["svc-3"]
            samples: List[float] = []
            counter = [0]

            def one_push() -> None:
                counter[0] += 1
                port = 20000 + counter[0]
                cla = _cla("svc-3", 30, 1)
                cla["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"] = port
                t0 = time.perf_counter()
                cp.update(upserts=parse_resources({"endpoints": [cla]})[ENDPOINT].values())
                # poll with a short sleep: a busy loop would hold the GIL and starve the xDS
                # thread (5 ms switch interval), measuring the poller instead of the push
                while True:
                    ep = rt.lb.pick()
                    rt.lb.release(ep)
                    if ep.port == port:
                        break
                    time.sleep(0.0001)
                samples.append(time.perf_counter() - t0)

            benchmark.pedantic(one_push, rounds=30 if QUICK else 200, iterations=1, warmup_rounds=2)
    p50, p99 = _percentile(samples, 0.5) * 1e3, _percentile(samples, 0.99) * 1e3
    benchmark.extra_info.update(p50_ms=round(p50, 3), p99_ms=round(p99, 3))
    print(f"\npush-to-pick [{impl}] p50 {p50:.2f} ms  p99 {p99:.2f} ms")


@pytest.mark.benchmark(group="xds-full-snapshot")
def test_full_snapshot_apply(benchmark, impl, tmp_path):
    """Start -> ready for a mesh of N_CLUSTERS clusters x 10 endpoints from a separate control plane."""
    import json

    path = tmp_path / "big.json"
    path.write_text(json.dumps(mesh_of(N_CLUSTERS)))
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "meshcore", "control-plane", "--address", f"127.0.0.1:{port}",
                             "--resources", str(path), "--no-watch"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.stdout.readline()  # the "listening" line
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result: Dict[str, Any] = {}

        def apply() -> None:
            mesh = meshcore.Mesh(_bootstrap(f"127.0.0.1:{port}"))
            t0 = time.perf_counter()
            mesh.start()
            mesh.wait_ready(TARGET, timeout=120)
            result["seconds"] = time.perf_counter() - t0
            assert len(mesh.config(TARGET).clusters) == N_CLUSTERS
            result["mesh"] = mesh

        benchmark.pedantic(apply, rounds=1, iterations=1)
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
        mesh = result["mesh"]
        # one EDS change in that mesh: the client-side work (decode, validate, cache, publish, ACK
        # queued) for one ClusterLoadAssignment response, with no network in the measurement
        from envoy.service.discovery.v3 import discovery_pb2
        from google.protobuf import any_pb2

        client = mesh._source
        stream = client._stream
        cla_msg = parse_resources({"endpoints": [_cla("svc-7", 7 * N_ENDPOINTS)]})[ENDPOINT]["svc-7"]
        times: List[float] = []
        for k in range(50):
            cla_msg.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value = 9000 + k
            packed = any_pb2.Any()
            packed.Pack(cla_msg)
            resp = discovery_pb2.DiscoveryResponse(version_info=f"local-{k}", type_url=ENDPOINT, nonce=f"n{k}",
                                                   resources=[packed])
            t0 = time.perf_counter()
            client._on_response(stream, resp)
            times.append(time.perf_counter() - t0)
        lb = mesh.config(TARGET).clusters["svc-7"].lb
        assert any(e.port == 9049 for e in lb.endpoints)
        mesh.close()
        eds_ms = _percentile(times, 0.5) * 1e3
        benchmark.extra_info.update(seconds=round(result["seconds"], 3), peak_rss_mb=round(peak_mb, 1),
                                    eds_change_p50_ms=round(eds_ms, 4),
                                    eds_change_p99_ms=round(_percentile(times, 0.99) * 1e3, 4))
        print(f"\n{N_CLUSTERS}x{N_ENDPOINTS} [{impl}]: {result['seconds']:.2f} s to ready, peak RSS +{peak_mb:.0f} MB; "
              f"one EDS change p50 {eds_ms:.3f} ms")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
