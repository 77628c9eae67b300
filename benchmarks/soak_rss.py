"""Churn soak: does a mesh client stay flat (RSS, fds, threads, gc objects) under xDS churn?

A child process runs the reference control plane and loopback HTTP upstreams and churns the
configuration: an EDS push every 10 ms (a random live cluster gets a new endpoint subset), an RDS
push every 100 ms (the route table changes), and every 500 ms a new cluster is added (with its
route) and the oldest one removed (route first, then cluster and assignment). This process runs a
``Mesh`` bootstrapped to it, 4 threads calling ``mesh.pick`` and one thread sending HTTP through
an integration (httpx by default) to the live clusters. Every ``--interval`` seconds it samples
RSS, open fds, threads and gc-tracked objects; after ``--warmup`` it fits a least-squares line to
each and prints the slope per minute::

    python benchmarks/soak_rss.py --seconds 150 --warmup 30
    python benchmarks/soak_rss.py --seconds 150 --client requests

``tests/soak/test_churn_soak.py`` runs the same harness (:func:`run_soak`) and asserts the slopes.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

log = logging.getLogger(__name__)

TARGET = "soak.default.svc.cluster.local:8080"
HOST = TARGET.rsplit(":", 1)[0]
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
LIVE_CLUSTERS = 4  # churned clusters alive at a time (plus "stable")
UPSTREAMS = 8


# -- the child: control plane, upstreams, churn -----------------------------------------------------


def _serve(eds_every: float, rds_every: float, cds_every: float, retries: float = 1.0) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from meshcore.controlplane import ControlPlane
    from meshcore.xds.model import CLUSTER, ENDPOINT, ROUTE
    from meshcore.xds.resource_file import parse_resources

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = b'{"ok": true}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass

    ports = []
    for _ in range(UPSTREAMS):
        srv = Server(("127.0.0.1", 0), Handler)
        ports.append(srv.server_address[1])
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    rng = random.Random(7)
    live: List[str] = []
    counter = [0]
    rds_gen = [0]

    def cluster(name: str) -> Dict[str, Any]:
        return {"name": name, "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}},
                "lb_policy": "ROUND_ROBIN", "connect_timeout": "1s",
                "outlier_detection": {"consecutive_5xx": 5, "interval": "1s"}}

    def assignment(name: str) -> Dict[str, Any]:
        chosen = rng.sample(ports, 2)
        return {"cluster_name": name, "endpoints": [{"locality": {"zone": "z1"}, "lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
            for p in chosen]}]}

    def route_config(names: List[str]) -> Dict[str, Any]:
        rds_gen[0] += 1
        action: Dict[str, Any] = {"timeout": f"{2 + rds_gen[0] % 3}s"}
        if retries:
            action["retry_policy"] = {"retry_on": "connect-failure,5xx", "num_retries": 1}
        routes = [{"name": f"to-{n}", "match": {"prefix": f"/{n}/"}, "route": {"cluster": n, **action}}
                  for n in names]
        routes.append({"name": "default", "match": {"prefix": "/"}, "route": {"cluster": "stable"}})
        return {"name": "routes", "virtual_hosts": [{"name": "vh", "domains": [HOST, TARGET], "routes": routes}]}

    listener = {"name": TARGET, "api_listener": {"api_listener": {
        "@type": HCM, "rds": {"config_source": {"ads": {}}, "route_config_name": "routes"},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}]}}}

    def new_name() -> str:
        counter[0] += 1
        return f"churn-{counter[0]}"

    for _ in range(LIVE_CLUSTERS):
        live.append(new_name())
    cp = ControlPlane(history_limit=100).start()
    cp.set_resources(parse_resources({
        "listeners": [listener], "routes": [route_config(live)],
        "clusters": [cluster(n) for n in ["stable", *live]],
        "endpoints": [assignment(n) for n in ["stable", *live]]}))
    print(f"READY {cp.address}", flush=True)

    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()  # parent gone
    now = time.monotonic()
    next_eds, next_rds, next_cds = now, now, now + cds_every
    while not stop.is_set():
        now = time.monotonic()
        if now >= next_cds:
            next_cds += cds_every
            name = new_name()
            cp.update(parse_resources({"clusters": [cluster(name)], "endpoints": [assignment(name)]}))
            old = live.pop(0)
            live.append(name)
            cp.update(parse_resources({"routes": [route_config(live)]}))
            cp.update(removes=[(CLUSTER, old), (ENDPOINT, old)])
        if now >= next_rds:
            next_rds += rds_every
            cp.update(parse_resources({"routes": [route_config(live)]}))
        if now >= next_eds:
            next_eds += eds_every
            name = rng.choice(["stable", *live])
            cp.update(parse_resources({"endpoints": [assignment(name)]}))
        time.sleep(max(0.0, min(next_eds, next_rds, next_cds) - time.monotonic()))
    cp.stop()
    _ = ROUTE


# -- the parent: the mesh client under test ---------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _native_threads() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return threading.active_count()


def sample() -> Dict[str, float]:
    # live objects only: cyclic garbage waiting for the collector is noise of several thousand
    # objects in a big process (the test suite's), which a short window reads as a slope
    gc.collect()
    return {"t": time.monotonic(), "rss_mb": _rss_bytes() / 1e6, "fds": len(os.listdir("/proc/self/fd")),
            "threads": _native_threads(), "objects": len(gc.get_objects())}


def slope_per_min(points: List[Tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    if sxx == 0:
        return 0.0
    return 60.0 * sum((t - mx) * (v - my) for t, v in points) / sxx


def window_floors(points: List[Tuple[float, float]], windows: int = 4) -> List[Tuple[float, float]]:
    """(mean time, smallest value) of each of ``windows`` consecutive runs of points, as equal
    as the count allows (sizes differ by one at most); fewer than two points per run: the
    points themselves (too few to take floors of)."""
    n = len(points)
    if n < 2 * windows:
        return list(points)
    runs = [points[i * n // windows:(i + 1) * n // windows] for i in range(windows)]
    return [(sum(t for t, _ in run) / len(run), min(v for _, v in run)) for run in runs]


@dataclass
class SoakResult:
    samples: List[Dict[str, float]]
    warmup: float
    counts: Dict[str, int] = field(default_factory=dict)
    sizes: Dict[str, int] = field(default_factory=dict)

    def slopes(self) -> Dict[str, float]:
        """Per-minute slopes after the warm-up. fds: the slope of each window's floor (its
        fewest fds): keep-alive connections open and close all the time (a sample can catch a
        handful more than the last one), while a leak raises the floor."""
        t0 = self.samples[0]["t"]
        after = [s for s in self.samples if s["t"] - t0 >= self.warmup]
        slopes = {k: slope_per_min([(s["t"] - t0, s[k]) for s in after]) for k in ("rss_mb", "threads", "objects")}
        slopes["fds"] = slope_per_min(window_floors([(s["t"] - t0, s["fds"]) for s in after]))
        return slopes

    def first_last(self) -> Dict[str, Tuple[float, float]]:
        t0 = self.samples[0]["t"]
        after = [s for s in self.samples if s["t"] - t0 >= self.warmup] or self.samples
        return {k: (after[0][k], self.samples[-1][k]) for k in ("rss_mb", "fds", "threads", "objects")}

    def report(self) -> str:
        s, fl = self.slopes(), self.first_last()
        lines = [f"{len(self.samples)} samples, warm-up {self.warmup:.0f} s",
                 f"RSS     {fl['rss_mb'][0]:8.1f} -> {fl['rss_mb'][1]:8.1f} MB   slope {s['rss_mb']:+8.2f} MB/min",
                 f"fds     {fl['fds'][0]:8.0f} -> {fl['fds'][1]:8.0f}      slope {s['fds']:+8.2f} fds/min (window floors)",
                 f"threads {fl['threads'][0]:8.0f} -> {fl['threads'][1]:8.0f}      slope {s['threads']:+8.2f} /min",
                 f"objects {fl['objects'][0]:8.0f} -> {fl['objects'][1]:8.0f}      slope {s['objects']:+8.0f} objects/min",
                 f"counts  {json.dumps(self.counts, sort_keys=True)}",
                 f"sizes   {json.dumps(self.sizes, sort_keys=True)}"]
        return "\n".join(lines)


def _sender(client: str, mesh: Any) -> Tuple[Callable[[str], int], Callable[[], None], Callable[[], int]]:
    """(send(url) -> status, close(), pool count) for the chosen integration."""
    if client in ("httpx", "httpx-async"):
        import httpx

        from meshcore.integrations.httpx import AsyncMeshTransport, MeshTransport

        if client == "httpx":
            transport = MeshTransport(mesh, ready_timeout=5)
            c = httpx.Client(mounts={"all://*.svc.cluster.local": transport}, timeout=5)
            return (lambda url: c.get(url).status_code), c.close, lambda: len(transport._inner)
        import asyncio

        loop = asyncio.new_event_loop()
        atransport = AsyncMeshTransport(mesh, ready_timeout=5)
        ac = httpx.AsyncClient(mounts={"all://*.svc.cluster.local": atransport}, timeout=5)

        async def aget(url: str) -> int:
            return (await ac.get(url)).status_code

        def close() -> None:
            loop.run_until_complete(ac.aclose())
            loop.close()

        return (lambda url: loop.run_until_complete(aget(url))), close, lambda: len(atransport._inner)
    if client == "requests":
        import requests

        from meshcore.integrations.requests import MeshAdapter

        adapter = MeshAdapter(mesh, ready_timeout=5)
        session = requests.Session()
        session.mount("http://", adapter)
        return ((lambda url: session.get(url, timeout=5).status_code), session.close,
                lambda: len(getattr(adapter, "_pools", {}) or adapter.poolmanager.pools))
    raise ValueError(f"unknown client {client!r}")


def run_soak(seconds: float, warmup: float, interval: float = 1.0, client: str = "httpx",
             eds_every: float = 0.01, rds_every: float = 0.1, cds_every: float = 0.5,
             pickers: int = 4, on_sample: Optional[Callable[[Dict[str, float]], None]] = None,
             retries: bool = True) -> SoakResult:
    """Run the churn for ``seconds``, sampling every ``interval``; ``retries``: the churned routes
    carry a retry policy (every RDS push makes new policy objects)."""
    import meshcore
    from meshcore.errors import MeshError
    from meshcore.xds.client import Backoff

    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", str(eds_every), str(rds_every),
                              str(cds_every), str(int(retries))], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline().split()  # type: ignore[union-attr]
        if not line or line[0] != "READY":
            raise RuntimeError(f"soak control plane did not start: {line!r}")
        boot = {"xds_servers": [{"server_uri": line[1], "channel_creds": [{"type": "insecure"}],
                                 "server_features": ["xds_v3"]}],
                "node": {"id": "soak", "cluster": "meshcore", "locality": {"zone": "z1"}}}
        mesh = meshcore.Mesh(boot, backoff=Backoff(initial=0.05, multiplier=1.6, jitter=0.2, maximum=0.5)).start()
        mesh.wait_ready(TARGET, timeout=10)
        send, close, pools = _sender(client, mesh)
        stop = threading.Event()
        counts = {"picks": 0, "pick_errors": 0, "sent": 0, "send_errors": 0}
        lock = threading.Lock()

        def live_paths() -> List[str]:
            cfg = mesh.config(TARGET)
            names = [n for n in (cfg.clusters if cfg is not None else ()) if n != "stable"]
            return [f"/{n}/x" for n in names] + ["/"]

        def picker(seed: int) -> None:
            rng = random.Random(seed)
            ok = bad = 0
            while not stop.is_set():
                try:
                    mesh.pick(TARGET, rng.choice(live_paths())).done()
                    ok += 1
                except MeshError:
                    bad += 1
                time.sleep(0.0005)
            with lock:
                counts["picks"] += ok
                counts["pick_errors"] += bad

        def http() -> None:
            rng = random.Random(99)
            while not stop.is_set():
                try:
                    send(f"http://{TARGET}{rng.choice(live_paths())}")
                    counts["sent"] += 1
                except Exception as e:  # a route to a just-removed cluster, a refused endpoint
                    log.debug("soak request failed: %r", e)
                    counts["send_errors"] += 1

        threads = [threading.Thread(target=picker, args=(i,), daemon=True) for i in range(pickers)]
        threads.append(threading.Thread(target=http, daemon=True))
        for t in threads:
            t.start()
        samples: List[Dict[str, float]] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(interval)
            s = sample()
            samples.append(s)
            if on_sample is not None:
                on_sample(s)
        stop.set()
        for t in threads:
            t.join(10)
        sizes = {"pools": pools(), "states": len(mesh._states), "stats_clusters": len(mesh.stats()),
                 "published_clusters": len(mesh.config(TARGET).clusters)}
        close()
        mesh.close()
        return SoakResult(samples, warmup, counts, sizes)
    finally:
        child.stdin.close()  # type: ignore[union-attr]
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=150.0)
    p.add_argument("--warmup", type=float, default=30.0)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--client", default="httpx", choices=["httpx", "httpx-async", "requests"])
    p.add_argument("--verbose", action="store_true", help="print every sample")
    p.add_argument("--no-retries", action="store_true", help="routes without retry policies")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    show = (lambda s: print(json.dumps({k: round(v, 1) for k, v in s.items()}), flush=True)) if args.verbose else None
    result = run_soak(args.seconds, args.warmup, args.interval, args.client, on_sample=show,
                      retries=not args.no_retries)
    print(result.report())


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        _serve(*(float(a) for a in sys.argv[2:6]))
    else:
        main()
