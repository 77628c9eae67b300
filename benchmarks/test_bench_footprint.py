"""Footprint: the import time of ``meshcore`` and the memory of an idle ``Mesh`` with 100 targets.

Import time: fresh interpreters (``python -X importtime``), bytecode cached (a private
``pycache_prefix``, warmed first: ``PYTHONDONTWRITEBYTECODE`` would make every run compile
sources), medians of ``RUNS``: ``import meshcore``, ``import meshcore; meshcore.Mesh``, and for
scale ``import grpc``. The wall time of the statement and importtime's total, and the slowest
modules by own time (cumulative = the module and what it imports).

Idle memory: in a fresh interpreter with everything imported, a ``Mesh`` with no target, then
``TARGETS`` targets subscribed and ready (each its own API listener, route configuration with
two routes, EDS cluster and an assignment of 3 endpoints): the first tenth, then the rest;
then one request routed per target (the request path's per-target and per-cluster state
made). RSS (``/proc/self/status`` VmRSS, after ``gc.collect``) and ``tracemalloc``'s traced
size (a second run: tracing itself costs memory); per target = the growth from the first tenth
to all targets / their number (one-time costs, such as the ADS stream's channel and threads,
fall in the first tenth). Sources: a resource file
(``Mesh.from_file``, no watcher) and the reference control plane over ADS (a child process).

Figures printed (``-s``) and in ``extra_info``. ``MESHCORE_BENCH_QUICK=1``: fewer runs, 20
targets, file source only. Run: ``pytest benchmarks/test_bench_footprint.py --benchmark-only -s``
or ``python benchmarks/test_bench_footprint.py``.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
QUICK = bool(os.environ.get("MESHCORE_BENCH_QUICK"))
RUNS = 3 if QUICK else 11
TARGETS = 20 if QUICK else 100
ENDPOINTS = 3
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
STATEMENTS = {"import meshcore": "import meshcore",
              "meshcore.Mesh": "import meshcore; meshcore.Mesh",
              "import grpc": "import grpc"}


def _env(pycache: str) -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = pycache
    return env


# --------------------------------------------------------------------------------------------
# Import time
# --------------------------------------------------------------------------------------------


def _importtime(stmt: str, env: Dict[str, str]) -> Dict[str, Any]:
    code = f"import time; t = time.perf_counter(); {stmt}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env=env, capture_output=True,
                         text=True, check=True)
    own: Dict[str, int] = {}
    cumulative: Dict[str, int] = {}
    for line in out.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if m:
            own[m.group(4)] = int(m.group(1))
            cumulative[m.group(4)] = int(m.group(2))
    return {"wall_ms": float(out.stdout.strip()) * 1e3, "importtime_ms": sum(own.values()) / 1e3,
            "modules": len(own), "own": own, "cumulative": cumulative}


def import_times(runs: int = RUNS) -> Dict[str, Dict[str, Any]]:
    """Per statement: median wall ms, median importtime total ms, modules, slowest own times."""
    with tempfile.TemporaryDirectory(prefix="meshcore-pyc-") as pycache:
        env = _env(pycache)
        for stmt in STATEMENTS.values():  # warm the bytecode cache
            _importtime(stmt, env)
        samples: Dict[str, List[Dict[str, Any]]] = {k: [] for k in STATEMENTS}
        for _ in range(runs):
            for name, stmt in STATEMENTS.items():  # interleaved: the machine's noise spreads evenly
                samples[name].append(_importtime(stmt, env))
    out: Dict[str, Dict[str, Any]] = {}
    for name, runs_ in samples.items():
        mods = runs_[0]["own"].keys()
        own = {m: statistics.median(r["own"].get(m, 0) for r in runs_) / 1e3 for m in mods}
        cum = {m: statistics.median(r["cumulative"].get(m, 0) for r in runs_) / 1e3 for m in mods}
        top = sorted(own.items(), key=lambda kv: kv[1], reverse=True)[:12]
        groups = {g: sum(v for m, v in own.items() if pred(m)) for g, pred in _GROUPS.items()}
        out[name] = {"wall_ms": statistics.median(r["wall_ms"] for r in runs_),
                     "wall_ms_min": min(r["wall_ms"] for r in runs_),
                     "importtime_ms": statistics.median(r["importtime_ms"] for r in runs_),
                     "modules": runs_[0]["modules"], "top_own_ms": top, "groups_ms": groups,
                     "meshcore_cumulative_ms": {m: cum[m] for m in cum if m.startswith("meshcore")
                                                and cum[m] >= 2.0}}
    return out


_GROUPS = {
    "meshcore": lambda m: m.startswith("meshcore"),
    "protobuf (google.*, *_pb2)": lambda m: m.startswith("google") or m.endswith("_pb2") or m.startswith(
        ("envoy", "xds.", "udpa", "validate")),
    "grpc": lambda m: m.startswith("grpc"),
    "asyncio": lambda m: m.startswith("asyncio"),
}


def import_markdown(t: Dict[str, Dict[str, Any]]) -> str:
    groups = list(_GROUPS)
    lines = ["| statement | wall ms (median, min) | importtime total ms | modules | "
             + " | ".join(f"{g} ms" for g in groups) + " |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in groups) + " |"]
    for name, r in t.items():
        lines.append(f"| `{STATEMENTS[name]}` | {r['wall_ms']:.1f} ({r['wall_ms_min']:.1f}) | {r['importtime_ms']:.1f} "
                     f"| {r['modules']} | " + " | ".join(f"{r['groups_ms'][g]:.1f}" for g in groups) + " |")
    for name in ("import meshcore", "meshcore.Mesh"):
        lines.append(f"\nslowest modules (own ms) for `{STATEMENTS[name]}`: "
                     + ", ".join(f"{m} {v:.1f}" for m, v in t[name]["top_own_ms"]))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Idle memory
# --------------------------------------------------------------------------------------------


def target_name(i: int) -> str:
    return f"svc-{i:03d}.bench.svc.cluster.local:8080"


def resources(n: int) -> Dict[str, List[Any]]:
    """``n`` targets, each its own listener, route configuration, cluster and assignment."""
    out: Dict[str, List[Any]] = {"listeners": [], "routes": [], "clusters": [], "endpoints": []}
    for i in range(n):
        t, c = target_name(i), f"svc-{i:03d}"
        out["listeners"].append({"name": t, "api_listener": {"api_listener": {
            "@type": HCM_TYPE, "rds": {"config_source": {"ads": {}}, "route_config_name": f"{c}-routes"},
            "http_filters": [ROUTER]}}})
        out["routes"].append({"name": f"{c}-routes", "virtual_hosts": [{"name": c, "domains": ["*"], "routes": [
            {"name": "api", "match": {"prefix": "/api/"},
             "route": {"cluster": c, "timeout": "5s", "retry_policy": {"retry_on": "5xx", "num_retries": 2}}},
            {"name": "default", "match": {"prefix": "/"}, "route": {"cluster": c}}]}]})
        out["clusters"].append({"name": c, "type": "EDS", "connect_timeout": "1s", "lb_policy": "ROUND_ROBIN",
                                "eds_cluster_config": {"eds_config": {"ads": {}}}})
        out["endpoints"].append({"cluster_name": c, "endpoints": [{"locality": {"zone": "z1"}, "lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": f"10.{i // 250}.{i % 250}.{k + 1}",
                                                         "port_value": 8080}}}}
            for k in range(ENDPOINTS)]}]})
    return out


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def child(source: str, path: str, n: int, traced: bool) -> Dict[str, Any]:
    """Runs in a fresh interpreter: the memory steps of one source (see the module doc)."""
    import gc
    import tracemalloc

    import grpc  # noqa: F401  (everything the mesh imports, imported before the first figure)

    import meshcore
    from meshcore.xds.client import Backoff

    def measure() -> int:
        gc.collect()
        return tracemalloc.get_traced_memory()[0] if traced else _rss_kb() * 1024

    cp = None
    if source == "ads":
        from meshcore.controlplane.cli import listen_address  # noqa: F401  (the CLI's imports)
        cp = subprocess.Popen([sys.executable, "-m", "meshcore.controlplane.cli", "--address", "127.0.0.1:0",
                               "--resources", path, "--no-watch", "--log-level", "warning"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert cp.stdout is not None
        xds = cp.stdout.readline().decode().split("xds=", 1)[1].split()[0]
    if traced:
        tracemalloc.start()
    base = measure()
    try:
        if source == "ads":
            boot = {"xds_servers": [{"server_uri": xds, "channel_creds": [{"type": "insecure"}]}],
                    "node": {"id": "bench-footprint", "cluster": "bench"}}
            mesh = meshcore.Mesh(boot, backoff=Backoff(0.05, 1.6, 0.2, 0.5)).start()
        else:
            mesh = meshcore.Mesh.from_file(path, watch=False).start()
        empty = measure()
        first = max(1, n // 10)  # the first targets carry the one-time costs (the ADS stream, ...)
        for i in range(first):
            mesh.wait_ready(target_name(i), timeout=30)
        some = measure()
        t0 = time.perf_counter()
        for i in range(first, n):
            mesh.watch(target_name(i))
        for i in range(first, n):
            mesh.wait_ready(target_name(i), timeout=30)
        ready_s = time.perf_counter() - t0
        ready = measure()
        for i in range(n):
            with mesh.request(f"http://{target_name(i)}/api/x") as attempt:
                attempt.status = 200
        routed = measure()
        mesh.close()
    finally:
        if cp is not None:
            cp.kill()
            cp.wait()
    return {"base": base, "empty": empty, "first": first, "some": some, "ready": ready, "routed": routed,
            "ready_s": ready_s}


def idle_memory(n: int = TARGETS, sources: Optional[List[str]] = None) -> Dict[str, Dict[str, Any]]:
    sources = sources or (["file"] if QUICK else ["file", "ads"])
    out: Dict[str, Dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="meshcore-footprint-") as tmp:
        path = os.path.join(tmp, "resources.json")
        with open(path, "w") as f:
            json.dump(resources(n), f)
        env = _env(os.path.join(tmp, "pyc"))
        for source in sources:
            row: Dict[str, Any] = {"targets": n}
            for traced in (False, True):
                res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", source, path, str(n),
                                      "traced" if traced else "rss"], env=env, capture_output=True, text=True,
                                     timeout=300)
                if res.returncode != 0:
                    raise RuntimeError(f"footprint child ({source}) failed:\n{res.stderr[-3000:]}")
                r = json.loads(res.stdout.strip().splitlines()[-1])
                kind = "traced" if traced else "rss"
                more = n - r["first"]
                row[f"{kind}_empty_mesh_kib"] = (r["empty"] - r["base"]) / 1024
                row[f"{kind}_first_targets_kib"] = (r["some"] - r["empty"]) / 1024  # one-time costs included
                # per target: the slope from the first tenth to all of them (one-time costs excluded)
                row[f"{kind}_per_target_kib"] = (r["ready"] - r["some"]) / more / 1024
                row[f"{kind}_per_target_routed_kib"] = (r["routed"] - r["ready"]) / n / 1024 + row[f"{kind}_per_target_kib"]
                row[f"{kind}_total_kib"] = (r["routed"] - r["base"]) / 1024
                row["ready_s"] = r["ready_s"]
            out[source] = row
    return out


def memory_markdown(m: Dict[str, Dict[str, Any]]) -> str:
    lines = ["| source | targets | empty Mesh RSS KiB | first 10 % of targets RSS KiB | RSS KiB/target (ready) "
             "| RSS KiB/target (+1 request each) | traced KiB/target (ready) | traced KiB/target (+1 request) "
             "| 90 % of targets ready in s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for source, r in m.items():
        lines.append(f"| {source} | {r['targets']} | {r['rss_empty_mesh_kib']:.0f} | {r['rss_first_targets_kib']:.0f} "
                     f"| {r['rss_per_target_kib']:.1f} "
                     f"| {r['rss_per_target_routed_kib']:.1f} | {r['traced_per_target_kib']:.1f} "
                     f"| {r['traced_per_target_routed_kib']:.1f} | {r['ready_s']:.2f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# pytest
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.benchmark(group="footprint")
def test_import_time(benchmark):
    out: Dict[str, Any] = {}
    benchmark.pedantic(lambda: out.update(import_times()), rounds=1, iterations=1)
    for name, r in out.items():
        key = name.replace(" ", "_").replace(".", "_")
        benchmark.extra_info[f"{key}_wall_ms"] = round(r["wall_ms"], 2)
        benchmark.extra_info[f"{key}_importtime_ms"] = round(r["importtime_ms"], 2)
        benchmark.extra_info[f"{key}_modules"] = r["modules"]
    print("\n" + import_markdown(out))
    assert "grpc" not in " ".join(m for m, _ in out["import meshcore"]["top_own_ms"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.benchmark(group="footprint")
def test_idle_memory(benchmark):
    out: Dict[str, Any] = {}
    benchmark.pedantic(lambda: out.update(idle_memory()), rounds=1, iterations=1)
    for source, r in out.items():
        for k, v in r.items():
            benchmark.extra_info[f"{source}_{k}"] = round(v, 2) if isinstance(v, float) else v
    print("\n" + memory_markdown(out))
    assert all(r["traced_per_target_kib"] > 0 for r in out.values())


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "traced")))
    else:
        print(import_markdown(import_times()))
        print(memory_markdown(idle_memory()))
