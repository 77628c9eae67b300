"""The Envoy shape at scale: a sidecar's whole configuration for a 2,000-service mesh, SotW and delta.

The snapshot is what istiod sends an Envoy sidecar in that mesh (``istio_sidecar.build`` of
``generated(2000, seed=1)``: every outbound/inbound listener, the route configurations ``<port>``
with a virtual host per service on the port, every cluster with its DestinationRule settings,
every assignment), served by the reference control plane (``ControlPlane``, this process).
``Mesh(xds_shape="envoy")`` runs in a child process (this file with ``--child``), so its memory
is its own, and subscribes as a sidecar does: LDS and CDS wildcard, RDS and EDS by name for
``TARGETS`` targets (FQDN ``host:port``, spread over the HTTP ports round robin).

Figures, per protocol (``sotw``, ``delta``):

* ready: from ``mesh.start()`` to every target ready (``wait_ready``), in the child;
* memory: the child's peak RSS (``ru_maxrss``) and its growth while applying (``VmHWM`` after
  ready minus ``VmHWM`` before the mesh was made: the interpreter and imports excluded); and in a
  second child run under ``tracemalloc``, the peak of Python allocations from making the mesh to
  ready (the mesh alone; tracing slows that run, its time is not reported);
* one endpoint change: the ClusterLoadAssignment of one target's cluster replaced on the control
  plane (one new endpoint) -> the first ``mesh.pick`` returning that endpoint, ``ROUNDS`` times,
  p50 / max. The clock is ``CLOCK_MONOTONIC`` in both processes: the parent stamps the update,
  the child the pick (polling every 0.2 ms);
* one VirtualService change: the route configuration ``<port>`` holding the target (the largest
  among the targets' ports; the whole RouteConfiguration is resent, as istiod does) gets a new
  first route in the target's virtual host -> the first ``mesh.pick`` matched by it.

``MESHCORE_BENCH_QUICK=1`` (the CI smoke run): 200 services, 5 rounds. Run:
``pytest benchmarks/test_bench_envoy_shape.py --benchmark-only -s`` or
``python benchmarks/test_bench_envoy_shape.py`` (prints the table).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

QUICK = bool(os.environ.get("MESHCORE_BENCH_QUICK"))
N_SERVICES = 200 if QUICK else 2000
SEED = 1
TARGETS = 20
ROUNDS = 5 if QUICK else 20
MODES = ["sotw", "delta"]
NODE_ID = "sidecar~10.0.0.9~client-0.default~default.svc.cluster.local"
READY_TIMEOUT = 120.0
POLL_S = 0.0002
CHANGE_TIMEOUT = 30.0


def _now() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


# --------------------------------------------------------------------------------------------
# The snapshot and the targets (parent)
# --------------------------------------------------------------------------------------------


class Snapshot:
    """The sidecar-shaped resources of the generated mesh, the targets and the two change subjects."""

    def __init__(self, n_services: int = N_SERVICES, n_targets: int = TARGETS) -> None:
        from meshcore.controlplane import istio_sidecar as sidecar

        t0 = time.perf_counter()
        self.desc = sidecar.generated(n_services, seed=SEED)
        self.res = sidecar.build(self.desc)
        self.build_s = time.perf_counter() - t0
        self.routes = {rc.name: rc for rc in self.res["routes"]}
        self.clas = {c.cluster_name: c for c in self.res["endpoints"]}
        domain = "cluster.local"
        with_vs = {self._fqdn(h, vs["namespace"], domain) for vs in self.desc["virtual_services"] for h in vs["hosts"]}
        with_dr = {self._fqdn(dr["host"], dr["namespace"], domain) for dr in self.desc["destination_rules"]}
        by_port: Dict[int, List[Tuple[str, bool]]] = {}
        for svc in self.desc["services"]:
            fqdn = f"{svc['name']}.{svc['namespace']}.svc.{domain}"
            plain = fqdn not in with_vs and fqdn not in with_dr  # default route, default cluster, no subsets
            for p in svc["ports"]:
                if p["protocol"] != "tcp":
                    by_port.setdefault(p["port"], []).append((f"{fqdn}:{p['port']}", plain))
        ports = sorted(by_port)
        # the change subjects: a plain service on the largest route configuration (both changes)
        biggest = max(ports, key=lambda p: self.routes[str(p)].ByteSize())
        self.subject = next(t for t, plain in by_port[biggest] if plain)
        self.targets = [self.subject]
        cursor = {p: 0 for p in ports}
        while len(self.targets) < min(n_targets, sum(len(v) for v in by_port.values())):
            for p in ports:
                if cursor[p] < len(by_port[p]) and len(self.targets) < n_targets:
                    t = by_port[p][cursor[p]][0]
                    cursor[p] += 1
                    if t not in self.targets:
                        self.targets.append(t)
        host, port = self.subject.rsplit(":", 1)
        self.subject_cluster = f"outbound|{port}||{host}"
        self.subject_route = port
        self.subject_vhost = f"{host}:{port}"

    @staticmethod
    def _fqdn(host: str, ns: str, domain: str) -> str:
        return host if "." in host else f"{host}.{ns}.svc.{domain}"

    def all(self) -> List[Any]:
        return [m for k in ("listeners", "routes", "clusters", "endpoints") for m in self.res[k]]

    def counts(self) -> Dict[str, int]:
        return {k: len(v) for k, v in self.res.items()}

    def sizes_mb(self) -> Dict[str, float]:
        return {k: sum(m.ByteSize() for m in v) / 1e6 for k, v in self.res.items()}

    def new_assignment(self, k: int) -> Tuple[Any, str, int]:
        """The subject cluster's assignment with one endpoint: ``10.250.<k>.1:<20000+k>``."""
        cla = type(self.clas[self.subject_cluster])()
        cla.CopyFrom(self.clas[self.subject_cluster])
        del cla.endpoints[1:]
        del cla.endpoints[0].lb_endpoints[1:]
        ip, port = f"10.250.{k % 250}.1", 20000 + k
        sa = cla.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
        sa.address, sa.port_value = ip, port
        return cla, ip, port

    def new_route_config(self, k: int) -> Tuple[Any, str, str]:
        """Route configuration ``<port>`` with a new first route ``bench-<k>`` in the subject's vhost."""
        from envoy.config.route.v3 import route_components_pb2

        rc = type(self.routes[self.subject_route])()
        rc.CopyFrom(self.routes[self.subject_route])
        vh = next(v for v in rc.virtual_hosts if v.name == self.subject_vhost)
        r = route_components_pb2.Route(name=f"bench-{k}")
        r.match.prefix = f"/bench-{k}/"
        r.route.cluster = self.subject_cluster
        r.route.timeout.SetInParent()
        vh.routes.insert(0, r)
        return rc, f"/bench-{k}/x", r.name


# --------------------------------------------------------------------------------------------
# The child: the mesh
# --------------------------------------------------------------------------------------------


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def child(address: str, mode: str, targets: List[str], traced: bool) -> None:
    """Apply the snapshot, report, then serve change rounds read from stdin (one JSON per line)."""
    import tracemalloc

    import meshcore
    from meshcore.xds.client import Backoff
    from meshcore.xds.model import TYPE_URLS

    def say(obj: Dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    # what the mesh imports on first use, imported now: the growth below is the configuration's
    import grpc  # noqa: F401
    from meshcore.xds import cluster_config, envoy_shape, route_config, sidecar_listener  # noqa: F401

    boot = {"xds_servers": [{"server_uri": address, "channel_creds": [{"type": "insecure"}]}],
            "node": {"id": NODE_ID, "metadata": {"NAMESPACE": "default"}}}
    hwm0 = _status_mb("VmHWM")
    if traced:
        tracemalloc.start()
    t0 = time.perf_counter()
    mesh = meshcore.Mesh(boot, xds_shape="envoy", delta=(mode == "delta"), backoff=Backoff(0.05, 1.6, 0.2, 0.5),
                         resource_timeout=READY_TIMEOUT)
    mesh.start()
    for t in targets:
        mesh.watch(t)
    for t in targets:
        mesh.wait_ready(t, timeout=READY_TIMEOUT)
    ready_s = time.perf_counter() - t0
    out: Dict[str, Any] = {"impl": meshcore.IMPLEMENTATION, "ready_s": ready_s}
    if traced:
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out.update(traced_peak_mb=peak / 2**20, traced_current_mb=current / 2**20)
    else:
        out.update(peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   rss_growth_mb=_status_mb("VmHWM") - hwm0, rss_after_mb=_status_mb("VmRSS"))
    problems = mesh.problems()
    out["problems"] = {t: p for t, p in problems.items() if t in targets}
    out["cached"] = {url.rsplit(".", 1)[-1]: len(mesh._source.names(url)) for url in TYPE_URLS}
    say(out)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        target, path = cmd["target"], cmd["path"]
        say({"armed": True})
        deadline = _now() + CHANGE_TIMEOUT
        seen: Optional[float] = None
        while _now() < deadline:
            try:
                p = mesh.pick(target, path)
            except (meshcore.NoRoute, meshcore.Unavailable):
                p = None
            if p is not None:
                hit = ((p.endpoint is not None and (p.endpoint.address, p.endpoint.port) == (cmd["address"], cmd["port"]))
                       if cmd["op"] == "endpoint" else p.route_name == cmd["route_name"])
                p.done()
                if hit:
                    seen = _now()
                    break
            time.sleep(POLL_S)
        say({"seen": seen})
    mesh.close()


# --------------------------------------------------------------------------------------------
# The parent: control plane, child, changes
# --------------------------------------------------------------------------------------------


def _spawn(address: str, mode: str, targets: List[str], traced: bool) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--child", address, mode, json.dumps(targets),
         "traced" if traced else "rss"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)


def _read(proc: subprocess.Popen) -> Dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        err = proc.stderr.read() if proc.stderr is not None else ""
        raise RuntimeError(f"envoy-shape child died:\n{err[-3000:]}")
    return json.loads(line)


def _send(proc: subprocess.Popen, obj: Dict[str, Any]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(obj) + "\n")
    proc.stdin.flush()


def _change(cp: Any, proc: subprocess.Popen, cmd: Dict[str, Any], resource_msg: Any) -> float:
    _send(proc, cmd)
    assert _read(proc) == {"armed": True}
    t0 = _now()
    cp.update(upserts=[resource_msg])
    seen = _read(proc)["seen"]
    if seen is None:
        raise AssertionError(f"{cmd['op']} change not seen within {CHANGE_TIMEOUT} s")
    return seen - t0


def run_mode(snap: Snapshot, mode: str) -> Dict[str, Any]:
    from meshcore.controlplane import ControlPlane

    row: Dict[str, Any] = {"mode": mode, "services": N_SERVICES, "targets": len(snap.targets)}
    with ControlPlane() as cp:
        cp.set_resources(snap.all())
        proc = _spawn(cp.address, mode, snap.targets, traced=False)
        try:
            ready = _read(proc)
            assert not ready["problems"], ready["problems"]
            row.update({k: v for k, v in ready.items() if k != "problems"})
            eds, rds = [], []
            for k in range(1, ROUNDS + 1):
                cla, ip, port = snap.new_assignment(k)
                eds.append(_change(cp, proc, {"op": "endpoint", "target": snap.subject, "path": "/",
                                              "address": ip, "port": port}, cla))
                rc, path, name = snap.new_route_config(k)
                rds.append(_change(cp, proc, {"op": "route", "target": snap.subject, "path": path,
                                              "route_name": name}, rc))
            _send(proc, {"op": "quit"})
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        row.update(eds_p50_ms=statistics.median(eds) * 1e3, eds_max_ms=max(eds) * 1e3,
                   rds_p50_ms=statistics.median(rds) * 1e3, rds_max_ms=max(rds) * 1e3,
                   rds_bytes=snap.routes[snap.subject_route].ByteSize())
        # the same apply under tracemalloc (fresh resources: the rounds changed two of them)
        cp.set_resources(snap.all())
        proc = _spawn(cp.address, mode, snap.targets, traced=True)
        try:
            traced = _read(proc)
            _send(proc, {"op": "quit"})
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        row.update(traced_peak_mb=traced["traced_peak_mb"], traced_current_mb=traced["traced_current_mb"])
    return row


def markdown(snap: Snapshot, rows: List[Dict[str, Any]]) -> str:
    counts = snap.counts()
    sizes = snap.sizes_mb()
    head = (f"{N_SERVICES} services (generated seed {SEED}): {counts['listeners']} listeners, {counts['routes']} "
            f"route configurations, {counts['clusters']} clusters, {counts['endpoints']} assignments "
            f"({sum(sizes.values()):.1f} MB serialized; built in {snap.build_s:.1f} s); {len(snap.targets)} targets; "
            f"changes on {snap.subject} (route configuration '{snap.subject_route}', "
            f"{snap.routes[snap.subject_route].ByteSize() / 1e3:.0f} kB), {ROUNDS} rounds")
    lines = [head, "",
             "| protocol | impl | ready s | peak RSS MB | RSS growth MB | traced peak MB (mesh) | traced after MB "
             "| endpoint change p50 / max ms | route change p50 / max ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['impl']} | {r['ready_s']:.2f} | {r['peak_rss_mb']:.0f} | {r['rss_growth_mb']:.0f} "
                     f"| {r['traced_peak_mb']:.0f} | {r['traced_current_mb']:.0f} "
                     f"| {r['eds_p50_ms']:.2f} / {r['eds_max_ms']:.2f} | {r['rds_p50_ms']:.2f} / {r['rds_max_ms']:.2f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# pytest
# --------------------------------------------------------------------------------------------

_ROWS: Dict[str, Dict[str, Any]] = {}


@pytest.fixture(scope="module")
def snap() -> Iterator[Snapshot]:
    s = Snapshot()
    yield s
    if _ROWS:
        print("\n" + markdown(s, [_ROWS[m] for m in MODES if m in _ROWS]))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.benchmark(group="envoy-shape")
@pytest.mark.parametrize("mode", MODES)
def test_envoy_shape_snapshot(benchmark, snap: Snapshot, mode: str) -> None:
    out: Dict[str, Any] = {}
    benchmark.pedantic(lambda: out.update(run_mode(snap, mode)), rounds=1, iterations=1)
    for k, v in out.items():
        benchmark.extra_info[k] = round(v, 3) if isinstance(v, float) else v
    _ROWS[mode] = out
    print(f"\nenvoy shape [{mode}] {N_SERVICES} services: ready {out['ready_s']:.2f} s, peak RSS "
          f"{out['peak_rss_mb']:.0f} MB (+{out['rss_growth_mb']:.0f}), traced peak {out['traced_peak_mb']:.0f} MB; "
          f"endpoint change p50 {out['eds_p50_ms']:.2f} ms, route change p50 {out['rds_p50_ms']:.2f} ms")
    assert out["ready_s"] > 0 and out["eds_p50_ms"] > 0 and out["rds_p50_ms"] > 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5] == "traced")
    else:
        s = Snapshot()
        print(markdown(s, [run_mode(s, m) for m in MODES]))
