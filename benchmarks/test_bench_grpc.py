"""gRPC unary calls: meshcore's ``MeshChannel`` vs grpcio's own proxyless xDS channel vs a direct
channel, same server, same resources, one client process, interleaved blocks.

Processes: a grpcio server answering ``/bench.Echo/Hello`` (raw bytes in, ``b"ok"`` out) in its
own process (``python test_bench_grpc.py --serve``), and the reference control plane
(``python -m meshcore.controlplane.cli``) in another, serving one set of resources: an API
listener ``TARGET`` naming the RouteConfiguration ``routes`` whose only route (prefix ``/``) has
a 5 s timeout and a retry policy (``unavailable``, 2 retries), the EDS cluster ``svc``
(ROUND_ROBIN) and its assignment (the server). Both pinned to CPU 1 on a 2+ CPU machine; this
process (client, mesh, grpcio's xDS client) on CPU 0.

Modes (one channel each, made once, every mode's multicallable ``_registered_method=True``):

* ``direct``: ``grpc.insecure_channel("127.0.0.1:<port>")`` (the baseline);
* ``meshcore``: ``mesh_channel(mesh, TARGET)``; the ``Mesh`` is fed over ADS by the control plane;
* ``native-xds``: ``grpc.insecure_channel("xds:///" + TARGET)``: grpcio's built-in xDS client
  (C-core), bootstrapped (``GRPC_XDS_BOOTSTRAP_CONFIG``) to the same control plane.

Figures: unary latency p50/p99 and client CPU per call (``integration_harness.run_interleaved``:
rotated blocks, ``getrusage`` CPU, added = median over repetitions of mode - direct); throughput
of ``CALLERS`` threads in a closed loop (calls/s, CPU per call), interleaved blocks too; and
meshcore's own time per call *in situ* (the time outside the endpoint's grpcio call, with the
same wrapper around a direct call subtracted), because the loopback figures' noise is larger
than the cost measured. Printed (``-s``) and in ``extra_info``.

The low-noise figure of meshcore's added client CPU per unary call is :func:`added_cpu`
(``python benchmarks/test_bench_grpc.py --cpu [--telemetry]``, ``test_grpc_added_cpu``): one
process pinned to one CPU, an in-process grpcio server (both modes pay the same I/O), a
file-backed mesh with the same resources, blocks of calls alternating direct / meshcore, the
calling thread's CPU time (``time.thread_time_ns``), median of the per-round differences.

What Istio's metrics add (issue 16's budget: 2 µs) is :func:`telemetry_cpu` (``--telemetry-cpu``,
``test_grpc_telemetry_cpu``): meshes without telemetry, with the metrics without and with the
metadata exchange, and a direct channel without and with the exchange's metadata, all
interleaved in one process.

``MESHCORE_BENCH_QUICK=1``: a few seconds in all (CI's smoke run). Run: ``pytest
benchmarks/test_bench_grpc.py --benchmark-only -s`` or ``python benchmarks/test_bench_grpc.py
[--profile | --cpu]``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from integration_harness import QUICK, PinnedRig, extra_info, markdown, profile_sync, run_interleaved  # noqa: E402
from test_bench_sidecar import pin, run_ns, self_ns, system_ns  # noqa: E402

TARGET = "echo.bench.svc.cluster.local:50051"
METHOD = "/bench.Echo/Hello"
CALLERS = 4
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


def resources(port: int) -> Dict[str, List[Any]]:
    """What both clients get: listener, routes (timeout + retry policy), cluster, assignment."""
    route = {"name": "r-echo", "match": {"prefix": "/"},
             "route": {"cluster": "svc", "timeout": "5s",
                       "retry_policy": {"retry_on": "unavailable", "num_retries": 2}}}
    return {
        "listeners": [{"name": TARGET, "api_listener": {"api_listener": {
            "@type": HCM_TYPE, "rds": {"config_source": {"ads": {}}, "route_config_name": "routes"},
            "http_filters": [ROUTER]}}}],
        "routes": [{"name": "routes", "virtual_hosts": [{"name": "echo", "domains": ["*"], "routes": [route]}]}],
        "clusters": [{"name": "svc", "type": "EDS", "connect_timeout": "1s", "lb_policy": "ROUND_ROBIN",
                      "eds_cluster_config": {"eds_config": {"ads": {}}}}],
        # grpcio's xDS client wants a locality weight (it refuses an assignment without one)
        "endpoints": [{"cluster_name": "svc", "endpoints": [{
            "locality": {"region": "local", "zone": "z1"}, "load_balancing_weight": 1,
            "lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                                         "port_value": port}}}}]}]}],
    }


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def serve() -> None:
    """The server process: prints its port, serves until stdin closes."""
    from concurrent import futures

    import grpc

    def hello(request: bytes, context: Any) -> bytes:
        return b"ok"

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=CALLERS + 2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bench.Echo", {"Hello": grpc.unary_unary_rpc_method_handler(hello)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    sys.stdin.read()
    server.stop(0)


def _child(argv: List[str], tmpdir: str, name: str) -> Tuple[subprocess.Popen, str]:
    """A child process (its own session, dies with us) and the first line it prints."""
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    from envoy_process import die_with_parent, kill

    err = open(os.path.join(tmpdir, f"{name}.stderr"), "wb")
    proc = subprocess.Popen(die_with_parent(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                            start_new_session=True)
    err.close()
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line:
        kill(proc)
        with open(os.path.join(tmpdir, f"{name}.stderr")) as f:
            raise RuntimeError(f"{name} did not start: {f.read()[-2000:]}")
    return proc, line


class GrpcRig(PinnedRig):
    """Server, control plane, mesh and the three channels (the harness's Rig for gRPC)."""

    def __init__(self, pin_cpus: bool = True) -> None:
        import grpc

        import meshcore
        from meshcore.integrations.grpc import mesh_channel
        from meshcore.xds.client import Backoff

        self._init_pinning(pin_cpus)
        self.tmpdir = tempfile.mkdtemp(prefix="meshcore-bench-grpc-")
        self.server: Optional[subprocess.Popen] = None
        self.cp: Optional[subprocess.Popen] = None
        self.mesh: Any = None
        self.channels: Dict[str, Any] = {}
        self._saved_env = os.environ.get("GRPC_XDS_BOOTSTRAP_CONFIG")
        try:
            self.server, line = _child([sys.executable, os.path.abspath(__file__), "--serve"], self.tmpdir, "server")
            self.port = int(line)
            path = os.path.join(self.tmpdir, "resources.json")
            with open(path, "w") as f:
                json.dump(resources(self.port), f)
            self.cp, line = _child([sys.executable, "-m", "meshcore.controlplane.cli", "--address", "127.0.0.1:0",
                                    "--resources", path, "--no-watch", "--log-level", "warning"], self.tmpdir, "cp")
            xds = line.split("xds=", 1)[1].split()[0]
            boot = {"xds_servers": [{"server_uri": xds, "channel_creds": [{"type": "insecure"}],
                                     "server_features": ["xds_v3"]}],
                    "node": {"id": "bench-grpc", "cluster": "bench", "locality": {"zone": "z1"}}}
            self.mesh = meshcore.Mesh(boot, backoff=Backoff(0.05, 1.6, 0.2, 0.5)).start()
            self.mesh.wait_ready(TARGET, timeout=15)
            # grpcio reads its bootstrap when its first xds: channel is made (then it is kept)
            os.environ["GRPC_XDS_BOOTSTRAP_CONFIG"] = json.dumps(boot)
            self.channels = {"direct": grpc.insecure_channel(f"127.0.0.1:{self.port}"),
                             "meshcore": mesh_channel(self.mesh, TARGET),
                             "native-xds": grpc.insecure_channel("xds:///" + TARGET)}
            self.calls = {name: ch.unary_unary(METHOD, _registered_method=True) for name, ch in self.channels.items()}
            for name, call in self.calls.items():  # connected and resolved before any block
                assert call(b"hi", timeout=15, wait_for_ready=True) == b"ok", name
            self.pin_all()
        except BaseException:
            self.close()
            raise

    def _helpers(self) -> List[Any]:
        return [self.server, self.cp]

    def pids(self) -> Dict[str, int]:
        # the harness's "proxy" column: the control plane (idle during the blocks)
        return {"proxy": self.cp.pid, "upstream": self.server.pid}  # type: ignore[union-attr]

    def close(self) -> None:
        from envoy_process import kill

        for ch in self.channels.values():
            ch.close()
        self.channels = {}
        if self.mesh is not None:
            self.mesh.close()
            self.mesh = None
        if self.server is not None and self.server.stdin is not None:
            self.server.stdin.close()
        for proc in (self.server, self.cp):
            if proc is not None:
                kill(proc)
        self.server = self.cp = None
        if self._saved_env is None:
            os.environ.pop("GRPC_XDS_BOOTSTRAP_CONFIG", None)
        else:
            os.environ["GRPC_XDS_BOOTSTRAP_CONFIG"] = self._saved_env
        if self.saved_affinity is not None:
            pin(os.getpid(), self.saved_affinity)
            self.saved_affinity = None
        shutil.rmtree(self.tmpdir, ignore_errors=True)


MODES = ["direct", "meshcore", "native-xds"]


def modes(rig: GrpcRig) -> Dict[str, Callable[[], Any]]:
    def make(name: str) -> Callable[[], Any]:
        call = rig.calls[name]

        def factory() -> Callable[[str], bytes]:
            def send(path: str) -> bytes:
                return call(b"hi", timeout=5)
            return send
        return factory
    return {name: make(name) for name in MODES}


def latency(rig: GrpcRig, **kw: Any) -> Dict[str, Any]:
    return run_interleaved(rig, modes(rig), path=METHOD, expect=lambda r: r == b"ok", **kw)


# --------------------------------------------------------------------------------------------
# Throughput: CALLERS threads, closed loop, interleaved blocks
# --------------------------------------------------------------------------------------------


def _throughput_block(call: Any, seconds: float, callers: int) -> Tuple[int, float, int]:
    """(calls completed, wall seconds, client CPU ns) of ``callers`` threads calling back to back."""
    stop = threading.Event()
    counts = [0] * callers
    errors: List[BaseException] = []
    start = threading.Barrier(callers + 1)

    def worker(i: int) -> None:
        n = 0
        start.wait()
        try:
            while not stop.is_set():
                call(b"hi", timeout=5)
                n += 1
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)
        counts[i] = n

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(callers)]
    for t in threads:
        t.start()
    c0, w0 = self_ns(), time.perf_counter()
    start.wait()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - w0, self_ns() - c0
    if errors:
        raise errors[0]
    return sum(counts), wall, cpu


def throughput(rig: GrpcRig, reps: Optional[int] = None, seconds: Optional[float] = None,
               callers: int = CALLERS) -> Dict[str, Dict[str, Any]]:
    reps = reps if reps is not None else (2 if QUICK else 7)
    seconds = seconds if seconds is not None else (0.3 if QUICK else 1.5)
    rig.pin_all()
    rows: Dict[str, List[Tuple[float, float, float]]] = {m: [] for m in MODES}
    for rep in range(reps):
        k = rep % len(MODES)
        order = MODES[k:] + MODES[:k]
        for m in (order[::-1] if rep % 2 else order):
            _throughput_block(rig.calls[m], min(0.2, seconds / 3), callers)  # warm-up
            gc.collect()
            s0 = system_ns()[0]
            p0 = sum(run_ns(p) for p in rig.pids().values())
            n, wall, cpu = _throughput_block(rig.calls[m], seconds, callers)
            others = system_ns()[0] - s0 - cpu - (sum(run_ns(p) for p in rig.pids().values()) - p0)
            rows[m].append((n / wall, cpu / max(1, n) / 1e3, max(0.0, others / 1e9 / wall)))
    med = statistics.median
    out: Dict[str, Dict[str, Any]] = {}
    for m in MODES:
        r = rows[m]
        out[m] = {"calls_per_s": med(x[0] for x in r), "cpu_us": med(x[1] for x in r),
                  "calls_per_s_min": min(x[0] for x in r), "calls_per_s_max": max(x[0] for x in r),
                  "foreign_cores": max(x[2] for x in r), "callers": callers, "reps": reps, "seconds": seconds}
        if m != "direct":
            out[m]["ratio"] = med(a[0] / b[0] for a, b in zip(r, rows["direct"]))
        if m == "meshcore":
            out[m]["ratio_vs_native"] = med(a[0] / b[0] for a, b in zip(r, rows["native-xds"]))
    return out


def throughput_markdown(t: Dict[str, Dict[str, Any]]) -> str:
    any_row = next(iter(t.values()))
    lines = [f"{any_row['callers']} callers, closed loop, {any_row['reps']} reps x {any_row['seconds']}s blocks "
             f"interleaved (medians; max other-process CPU {max(r['foreign_cores'] for r in t.values()):.2f} cores)",
             "| mode | calls/s (min..max) | client CPU µs/call | vs direct | meshcore vs native |",
             "| --- | --- | --- | --- | --- |"]
    for m, r in t.items():
        lines.append(f"| {m} | {r['calls_per_s']:.0f} ({r['calls_per_s_min']:.0f}..{r['calls_per_s_max']:.0f}) "
                     f"| {r['cpu_us']:.1f} | {r.get('ratio', 1.0):.3f} | "
                     f"{r['ratio_vs_native']:.3f} |" if m == "meshcore" else
                     f"| {m} | {r['calls_per_s']:.0f} ({r['calls_per_s_min']:.0f}..{r['calls_per_s_max']:.0f}) "
                     f"| {r['cpu_us']:.1f} | {r.get('ratio', 1.0):.3f} | - |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# meshcore's own time per call, in situ
# --------------------------------------------------------------------------------------------


class _Timed:
    """Wraps a grpcio multicallable, recording the time spent inside each call."""

    def __init__(self, mc: Any, sink: List[int]) -> None:
        self.mc, self.sink = mc, sink

    def __call__(self, *args: Any, **kw: Any) -> Any:
        pc = time.perf_counter_ns
        t = pc()
        try:
            return self.mc(*args, **kw)
        finally:
            self.sink.append(pc() - t)


def in_situ(rig: GrpcRig, n: Optional[int] = None, reps: Optional[int] = None) -> Dict[str, float]:
    """Median µs per call spent outside the endpoint's grpcio call: meshcore's channel, minus the
    same measurement around a direct call (the wrapper's own cost); interleaved blocks."""
    from meshcore.integrations.grpc import mesh_channel

    n = n if n is not None else (300 if QUICK else 3000)
    reps = reps if reps is not None else (2 if QUICK else 5)
    inner: List[int] = []
    ch = mesh_channel(rig.mesh, TARGET)
    mesh_call = ch.unary_unary(METHOD, _registered_method=True)
    direct = _Timed(rig.calls["direct"], inner)
    assert mesh_call(b"hi", timeout=5) == b"ok"
    for ep in list(ch._pool._channels.values()):  # every endpoint's multicallable, timed
        for slot, mc in list(ep.callables.items()):
            ep.callables[slot] = _Timed(mc, inner)
    mesh_call._eps, mesh_call._eps_cfg = {}, None  # (the short path's cache: refilled with the timed ones)
    out: Dict[str, List[float]] = {"meshcore": [], "direct": []}
    pc = time.perf_counter_ns
    try:
        for rep in range(reps):
            for name, fn in ((("meshcore", mesh_call), ("direct", direct)) if rep % 2 == 0
                             else (("direct", direct), ("meshcore", mesh_call))):
                for _ in range(n // 10):
                    fn(b"hi", timeout=5)
                inner.clear()
                total = []
                for _ in range(n):
                    t = pc()
                    fn(b"hi", timeout=5)
                    total.append(pc() - t)
                out[name].append(statistics.median(a - b for a, b in zip(total, inner)) / 1e3)
    finally:
        ch.close()
    mesh_us, wrap_us = statistics.median(out["meshcore"]), statistics.median(out["direct"])
    return {"meshcore_outside_us": mesh_us, "wrapper_us": wrap_us, "meshcore_own_us": mesh_us - wrap_us}


# --------------------------------------------------------------------------------------------
# Added CPU per unary call: one process, one CPU, in-process server, thread CPU time
# --------------------------------------------------------------------------------------------


def added_cpu(rounds: Optional[int] = None, n: Optional[int] = None, cpu: Optional[int] = None,
              telemetry: bool = False) -> Dict[str, float]:
    """meshcore's added client CPU per unary call, low noise: this process pinned to one CPU, a
    grpcio server in it on loopback (both modes pay the same I/O), a file-backed ``Mesh`` with the
    same resources (route timeout + retry policy), ``n`` calls per block, the modes alternating
    block by block (order flipped every round); the figure is the median over ``rounds`` of the
    per-round difference of the calling thread's CPU time (``time.thread_time_ns``) per call,
    meshcore - direct. ``telemetry``: with a telemetry sink and Istio's metadata exchange on."""
    rounds = rounds if rounds is not None else (6 if QUICK else 41)
    n = n if n is not None else (200 if QUICK else 1000)
    with _one_cpu(cpu), _local_calls(telemetry, max(50, n // 5)) as calls:
        return _interleaved_cpu(calls, rounds, n)


@contextlib.contextmanager
def _one_cpu(cpu: Optional[int]) -> Iterator[None]:
    """This process pinned to CPU ``cpu`` (default: the highest it may use), then unpinned."""
    saved = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if saved is not None:
        os.sched_setaffinity(0, {cpu if cpu is not None else max(saved)})
    try:
        yield
    finally:
        if saved is not None:
            os.sched_setaffinity(0, saved)


@contextlib.contextmanager
def _local_calls(telemetry: bool = False, warm: int = 50) -> Iterator[Dict[str, Any]]:
    """``{"direct": ..., "meshcore": ...}``: the method's multicallables on a direct channel and a
    ``MeshChannel`` to a grpcio server in this process, the mesh file-backed with :func:`resources`
    (``telemetry``: Istio's metrics on), each called ``warm`` times first."""
    import grpc

    from meshcore.integrations.grpc import mesh_channel

    with _local_server() as (port, path), _file_mesh(path) as mesh:
        if telemetry:
            mesh.telemetry.enable_istio_metrics()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as direct, mesh_channel(mesh, TARGET) as mc:
            calls = {"direct": direct.unary_unary(METHOD, _registered_method=True),
                     "meshcore": mc.unary_unary(METHOD, _registered_method=True)}
            for call in calls.values():
                for _ in range(warm):
                    assert call(b"hi", timeout=5) == b"ok"
            yield calls


@contextlib.contextmanager
def _local_server() -> Iterator[Tuple[int, str]]:
    """``(port, resources file)``: a grpcio server answering METHOD in this process, and a file of
    :func:`resources` pointing at it (both gone afterwards)."""
    from concurrent import futures

    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bench.Echo", {"Hello": grpc.unary_unary_rpc_method_handler(lambda request, context: b"ok")})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    tmp = tempfile.mkdtemp(prefix="meshcore-bench-grpc-cpu-")
    path = os.path.join(tmp, "mesh.json")
    try:
        with open(path, "w") as f:
            json.dump(resources(port), f)
        yield port, path
    finally:
        server.stop(0)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _file_mesh(path: str) -> Iterator[Any]:
    """A started ``Mesh`` of the resources file ``path``, ready for TARGET (closed afterwards)."""
    import meshcore

    mesh = meshcore.Mesh.from_file(path, watch=False).start()
    try:
        mesh.wait_ready(TARGET, timeout=10)
        yield mesh
    finally:
        mesh.close()


def _cpu_blocks(calls: Dict[str, Any], rounds: int, n: int) -> Dict[str, List[float]]:
    """Per mode, the calling thread's CPU µs per call of each round's block of ``n`` calls; every
    mode once per round, the order rotated every round (and reversed every other round when there
    are more than two modes), the garbage collector off within rounds."""
    tt = time.thread_time_ns
    per: Dict[str, List[float]] = {m: [] for m in calls}
    modes = list(calls)
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            if len(modes) > 2 and r % 2:
                order.reverse()
            for m in order:
                call = calls[m]
                t = tt()
                for _ in range(n):
                    call(b"hi", timeout=5)
                per[m].append((tt() - t) / n / 1e3)
            gc.collect()
    finally:
        gc.enable()
    return per


def _interleaved_cpu(calls: Dict[str, Any], rounds: int, n: int) -> Dict[str, float]:
    """:func:`added_cpu`'s rounds: blocks of ``n`` calls, direct and meshcore alternating."""
    per = _cpu_blocks(calls, rounds, n)
    diffs = [a - b for a, b in zip(per["meshcore"], per["direct"])]
    return {"added_cpu_us": statistics.median(diffs), "direct_cpu_us": statistics.median(per["direct"]),
            "meshcore_cpu_us": statistics.median(per["meshcore"]),
            "added_cpu_q1_us": statistics.quantiles(diffs, n=4)[0] if len(diffs) > 1 else diffs[0],
            "added_cpu_q3_us": statistics.quantiles(diffs, n=4)[2] if len(diffs) > 1 else diffs[0],
            "rounds": rounds, "n": n}


TELEMETRY_MODES = ("direct", "direct+md", "off", "istio-noexchange", "istio")


@contextlib.contextmanager
def _telemetry_calls(warm: int = 50) -> Iterator[Dict[str, Any]]:
    """The modes of :func:`telemetry_cpu`: a grpcio server in this process; a direct channel
    without and with Istio's two exchange metadata entries (``direct+md``: grpc-core's own cost
    of sending them); three file-backed meshes with the same resources: no telemetry, Istio's
    metrics without the exchange, Istio's metrics with it. Each called ``warm`` times first
    (the first call to an endpoint with the exchange on is a tapped one: the peer learned)."""
    import grpc

    from meshcore.integrations.grpc import mesh_channel

    modes = ("off", "istio-noexchange", "istio")
    with _local_server() as (port, path), contextlib.ExitStack() as stack:
        meshes = {m: stack.enter_context(_file_mesh(path)) for m in modes}
        node = {"WORKLOAD_NAME": "bench-client", "NAMESPACE": "default", "LABELS": {"app": "bench-client"}}
        meshes["istio-noexchange"].telemetry.enable_istio_metrics(node_metadata=node, exchange=False)
        meshes["istio"].telemetry.enable_istio_metrics(node_metadata=node)
        exchange = meshes["istio"].telemetry.exchange.headers
        direct = stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{port}"))
        plain = direct.unary_unary(METHOD, _registered_method=True)
        calls: Dict[str, Any] = {"direct": plain,
                                 "direct+md": lambda request, timeout=None: plain(request, timeout, exchange)}
        for m, mesh in meshes.items():
            calls[m] = stack.enter_context(mesh_channel(mesh, TARGET)).unary_unary(METHOD, _registered_method=True)
        for call in calls.values():
            for _ in range(warm):
                assert call(b"hi", timeout=5) == b"ok"
        yield calls


def telemetry_cpu(rounds: Optional[int] = None, n: Optional[int] = None, cpu: Optional[int] = None
                  ) -> Dict[str, Any]:
    """The client CPU Istio's metrics add to a unary call, low noise (as :func:`added_cpu`: one
    process pinned to one CPU, in-process server, blocks of ``n`` calls, every mode once per
    round in a rotated order, the calling thread's CPU time): per mode, the median, the minimum
    and the 10th percentile over ``rounds`` of its difference from ``off`` (meshcore without
    telemetry) in the same round; ``direct+md`` - ``direct``: what grpc-core itself charges for
    the exchange's two metadata entries (any client sending them pays it)."""
    rounds = rounds if rounds is not None else (6 if QUICK else 41)
    n = n if n is not None else (200 if QUICK else 500)
    with _one_cpu(cpu), _telemetry_calls(max(50, n // 5)) as calls:
        per = _cpu_blocks(calls, rounds, n)

    def spread(xs: List[float]) -> Dict[str, float]:
        xs = sorted(xs)
        return {"median_us": statistics.median(xs), "min_us": xs[0], "p10_us": xs[len(xs) // 10]}

    out: Dict[str, Any] = {"rounds": rounds, "n": n, "off_cpu_us": statistics.median(per["off"]),
                           "direct_cpu_us": statistics.median(per["direct"])}
    for m in ("istio-noexchange", "istio"):
        out[f"{m}_added_us"] = spread([a - b for a, b in zip(per[m], per["off"])])
    out["off_vs_direct_us"] = spread([a - b for a, b in zip(per["off"], per["direct"])])
    out["exchange_md_in_grpc_core_us"] = spread([a - b for a, b in zip(per["direct+md"], per["direct"])])
    return out


class _Answer:
    """A stand-in for an endpoint's grpcio multicallable (a Python class's instance, like
    grpcio's): answers at once, so that only meshcore's own work is counted."""

    def __call__(self, request: Any, timeout: Optional[float] = None, metadata: Any = None, credentials: Any = None,
                 wait_for_ready: Optional[bool] = None, compression: Any = None) -> bytes:
        return b"ok"


def _stubbed(call: Any) -> Any:
    """``call`` (a MeshChannel's multicallable) with its channel's endpoint multicallables
    replaced by :class:`_Answer` (the short path's entries made again with them)."""
    for ep in list(call._channel._pool._channels.values()):
        for slot in list(ep.callables):
            ep.callables[slot] = _Answer()
    call._eps, call._eps_cfg = {}, None
    for _ in range(20):
        assert call(b"hi", timeout=5) == b"ok"
    return call


def call_loop(mode: str, n: int, go: Optional[str] = None) -> None:
    """``n`` calls of one mode for an instruction count, the deterministic complement of
    :func:`added_cpu` on a noisy machine: ``direct`` or ``meshcore`` (:func:`_local_calls`), or
    without the RPC itself, ``answer`` (an :class:`_Answer`: what a grpcio multicallable's call
    costs before grpcio's own work) and ``meshcore-answer`` (the MeshChannel, its endpoints
    answering so: meshcore's own work + ``answer``). ``go``: a path; ``go + ".ready"`` is created
    once warm, and the calls wait for ``go + ".go"`` (switch the counting tool's instrumentation on
    in between). Per-call counts: two runs ``n`` apart, the calling thread's totals subtracted,
    e.g. (``callgrind_control -i on PID`` once ``.ready`` exists; thread 1 is the caller)::

        valgrind --tool=callgrind --instr-atstart=no --separate-threads=yes --cache-sim=yes \\
            python benchmarks/test_bench_grpc.py --loop meshcore 1300 /tmp/sig

    The real RPC's count varies by ~2k instructions from run to run (grpcio's polling); the
    ``answer`` modes' by ~50. Measured so (2026-12, grpcio 1.85, CPython 3.11), per call:
    ``direct`` ~200k instructions; ``meshcore`` - ``direct`` 15.5k before the bound ``__call__``
    of the endpoint multicallables, 9.3-14k after; ``meshcore-answer`` - ``answer`` ~13.2k before,
    ~11.3k after (of which ~6.9k ``request`` + ``first_attempt`` + ``finish_final``), ~10.0k with
    ``MeshCore._request_first`` and the __slots__ fields read at their offsets, ~9.0k with the route
    table's memo of header-less static matches and the attempt's fields read by ``_request_first``
    (2026-12-07; ``answer`` ~2.7k of the loop's 11.76k); with
    Istio's metrics on (not a mode here: ``mesh.telemetry.enable_istio_metrics()`` before the
    loop) 20.5k before ``IstioObserver.answered``, 12.4k after."""
    with _local_calls(warm=200) as calls:
        if mode == "answer":
            call: Any = _Answer()
        elif mode == "meshcore-answer":
            call = _stubbed(calls["meshcore"])
        else:
            call = calls[mode]
        gc.collect()
        gc.disable()
        if go is not None:
            open(go + ".ready", "w").close()
            while not os.path.exists(go + ".go"):
                time.sleep(0.05)
        for _ in range(n):
            call(b"hi", timeout=5)
        gc.enable()


# --------------------------------------------------------------------------------------------
# pytest
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rig():
    with GrpcRig() as r:
        yield r


@pytest.mark.benchmark(group="grpc")
def test_grpc_unary_latency(benchmark, rig):
    out: Dict[str, Any] = {}
    benchmark.pedantic(lambda: out.update(latency(rig)), rounds=1, iterations=1)
    benchmark.extra_info.update(extra_info(out))
    m, x = out["modes"]["meshcore"], out["modes"]["native-xds"]
    benchmark.extra_info["meshcore_vs_native_p50"] = round(m["p50_us"] / x["p50_us"], 4)
    print("\n" + markdown(out, "gRPC unary: direct vs meshcore vs grpcio native xDS"))
    print(f"meshcore / native-xds p50: {m['p50_us'] / x['p50_us']:.3f}")
    assert m["n"] > 0 and x["n"] > 0


@pytest.mark.benchmark(group="grpc")
def test_grpc_throughput(benchmark, rig):
    out: Dict[str, Any] = {}
    benchmark.pedantic(lambda: out.update(throughput(rig)), rounds=1, iterations=1)
    for m, r in out.items():
        for k, v in r.items():
            benchmark.extra_info[f"{m}_{k}"] = round(v, 4) if isinstance(v, float) else v
    print("\n" + throughput_markdown(out))
    assert all(r["calls_per_s"] > 0 for r in out.values())


@pytest.mark.benchmark(group="grpc")
def test_grpc_meshcore_own_time(benchmark, rig):
    out: Dict[str, float] = {}
    benchmark.pedantic(lambda: out.update(in_situ(rig)), rounds=1, iterations=1)
    benchmark.extra_info.update({k: round(v, 3) for k, v in out.items()})
    print(f"\nmeshcore's own time per unary call, in situ: {out['meshcore_own_us']:.1f} µs "
          f"(outside grpcio {out['meshcore_outside_us']:.1f} µs, wrapper {out['wrapper_us']:.1f} µs)")


@pytest.mark.benchmark(group="grpc")
def test_grpc_added_cpu(benchmark):
    out: Dict[str, float] = {}
    benchmark.pedantic(lambda: out.update(added_cpu()), rounds=1, iterations=1)
    benchmark.extra_info.update({k: round(v, 3) for k, v in out.items()})
    print(f"\nmeshcore's added client CPU per unary call: {out['added_cpu_us']:.1f} µs "
          f"(q1 {out['added_cpu_q1_us']:.1f}, q3 {out['added_cpu_q3_us']:.1f}; direct {out['direct_cpu_us']:.1f} µs)")
    assert out["direct_cpu_us"] > 0


def _main(argv: List[str]) -> None:
    if "--serve" in argv:
        serve()
        return
    if "--loop" in argv:  # --loop MODE N [GO]: n calls of one mode, for an instruction count
        i = argv.index("--loop")
        call_loop(argv[i + 1], int(argv[i + 2]), argv[i + 3] if len(argv) > i + 3 else None)
        return
    if "--cpu" in argv:  # meshcore's added CPU per unary call (one process, one CPU)
        print(json.dumps(added_cpu(telemetry="--telemetry" in argv), indent=1))
        return
    if "--telemetry-cpu" in argv:  # what Istio's metrics add to meshcore's unary call (one process)
        print(json.dumps(telemetry_cpu(), indent=1))
        return
    with GrpcRig() as r:
        if "--profile" in argv:
            call = r.calls["meshcore"]
            print(profile_sync(lambda path: call(b"hi", timeout=5), n=3000))
            return
        print(markdown(latency(r), "gRPC unary: direct vs meshcore vs grpcio native xDS"), flush=True)
        print(throughput_markdown(throughput(r)), flush=True)
        s = in_situ(r)
        print(f"meshcore's own time per call in situ: {s['meshcore_own_us']:.1f} µs "
              f"(outside {s['meshcore_outside_us']:.1f}, wrapper {s['wrapper_us']:.1f})")


if __name__ == "__main__":
    _main(sys.argv[1:])


@pytest.mark.benchmark(group="grpc")
def test_grpc_telemetry_cpu(benchmark):
    out: Dict[str, Any] = {}
    benchmark.pedantic(lambda: out.update(telemetry_cpu()), rounds=1, iterations=1)
    for k, v in out.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                benchmark.extra_info[f"{k}_{kk}"] = round(vv, 3)
        else:
            benchmark.extra_info[k] = round(v, 3) if isinstance(v, float) else v
    print(f"\nIstio metrics added to a unary call: {out['istio-noexchange_added_us']['median_us']:.2f} µs without "
          f"the exchange, {out['istio_added_us']['median_us']:.2f} µs with it (grpc-core's own cost of its "
          f"metadata: {out['exchange_md_in_grpc_core_us']['median_us']:.2f} µs)")
    assert out["off_cpu_us"] > 0
