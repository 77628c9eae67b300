"""xDS layer benchmarks: push-to-pick latency, a 10,000 x 10 snapshot, one EDS change in that mesh.

The compiled and pure twins run side by side (ids c / py): the publisher's balancers and route
tables come from ``meshcore._fast.lb_<impl>`` / ``routes_<impl>``. The control plane runs in a
child process for the big snapshot, so the client's peak memory is its own.

``MESHCORE_BENCH_QUICK=1`` (CI smoke) shrinks the mesh to 500 clusters and the rounds.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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
@pytest.mark.parametrize("probe_impl", ["c", "py"])
def test_full_snapshot_apply(benchmark, probe_impl, tmp_path):
    """Start -> ready for N_CLUSTERS clusters x 10 endpoints, and one EDS change in that mesh.

    The control plane and the client each run in a child process (xds_snapshot_probe.py), so
    the client's peak memory is its own; the benchmark's own timing includes process start-up,
    the figures that matter are in extra_info.
    """
    import json

    path = tmp_path / "big.json"
    path.write_text(json.dumps(mesh_of(N_CLUSTERS)))
    port = _free_port()
    cp = subprocess.Popen([sys.executable, "-m", "meshcore", "control-plane", "--address", f"127.0.0.1:{port}",
                           "--resources", str(path), "--no-watch"], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, start_new_session=True)
    env = dict(os.environ)
    if probe_impl == "py":
        env["MESHCORE_NO_EXTENSIONS"] = "1"
    probe = os.path.join(os.path.dirname(__file__), "xds_snapshot_probe.py")
    try:
        cp.stdout.readline()  # the "listening" line
        out: Dict[str, Any] = {}

        def apply() -> None:
            res = subprocess.run([sys.executable, probe, f"127.0.0.1:{port}", TARGET, str(N_CLUSTERS)],
                                 env=env, capture_output=True, text=True, timeout=600, check=True)
            out.update(json.loads(res.stdout.strip().splitlines()[-1]))

        benchmark.pedantic(apply, rounds=1, iterations=1)
        assert out["impl"] == probe_impl
        benchmark.extra_info.update({k: round(v, 4) for k, v in out.items() if isinstance(v, float)})
        print(f"\n{N_CLUSTERS}x{N_ENDPOINTS} [{probe_impl}]: {out['seconds']:.2f} s to ready, "
              f"peak RSS +{out['peak_rss_mb']:.0f} MB; one EDS change p50 {out['eds_change_p50_ms']:.3f} ms "
              f"p99 {out['eds_change_p99_ms']:.3f} ms")
    finally:
        cp.terminate()
        cp.wait(timeout=10)
