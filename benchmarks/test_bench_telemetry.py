"""What telemetry adds per request, compiled and pure twins side by side.

Three modes of the same mesh (the resources of ``test_bench_request``: a LEAST_REQUEST cluster of
ten endpoints, a route with a timeout and a 5xx retry policy):

* ``off``: no sink (the request path reads one list item: ``telemetry.record.ACTIVE``);
* ``sink``: one sink that does nothing (the hook's own cost: the RequestRecord, its outcome);
* ``istio``: ``mesh.telemetry.enable_istio_metrics()`` (the record plus Istio's standard metrics:
  label tuple cached, one counter and three histograms).

Shapes: ``run`` (``mesh.request(url).run(send)``, ``send`` answering a 20-byte 200 at once), the
single-attempt form (``with``), and 100 ``run_async`` in one coroutine. ``test_added_cost_paired``
measures off / sink / istio interleaved in one process per twin and prints the added
microseconds (the figures in the report).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from importlib import import_module
from typing import Any, Dict, List

import pytest

from test_bench_request import URL, _resources

NODE = {"WORKLOAD_NAME": "bench", "NAMESPACE": "default", "CLUSTER_ID": "Kubernetes",
        "LABELS": {"app": "bench", "version": "v1", "service.istio.io/canonical-name": "bench",
                   "service.istio.io/canonical-revision": "v1"}}


class _Response:
    status_code = 200

    def __init__(self) -> None:
        self.headers = {"content-type": "application/json", "content-length": "20"}
        self._content = b"x" * 20


OK = _Response()


def _send(attempt: Any) -> Any:
    return OK


async def _asend(attempt: Any) -> Any:
    return OK


def _make(twin: str, path: str) -> Any:
    from meshcore.mesh import MeshBase

    mod = import_module(f"meshcore._fast.call_{twin}")
    cls = type(f"Mesh_{twin}", (MeshBase, mod.MeshCore), {"_core": mod})
    m = cls.from_file(path, watch=False, seed=1).start()
    m.wait_ready("svc.mesh.local:80", timeout=10)
    return m


@pytest.fixture(scope="module", params=["c", "py"])
def mesh(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("telemetry") / "resources.json")
    _resources(path)
    m = _make(request.param, path)
    yield m
    m.close()


def _noop(record: Any) -> None:
    pass


def _set_mode(mesh: Any, mode: str) -> None:
    tel = mesh.telemetry
    tel.disable_istio_metrics()
    tel.remove_sink(_noop)
    if mode == "sink":
        tel.add_sink(_noop)
    elif mode == "istio":
        tel.enable_istio_metrics(node_metadata=NODE)


@pytest.fixture(params=["off", "sink", "istio"])
def mode(request, mesh):
    _set_mode(mesh, request.param)
    yield request.param
    _set_mode(mesh, "off")


@pytest.mark.benchmark(group="telemetry-run")
def test_run(benchmark, mesh, mode):
    benchmark(lambda: mesh.request(URL).run(_send))
    if mode == "istio":
        [s] = mesh.telemetry.istio_metrics.snapshot()
        assert s["labels"]["response_code"] == "200" and s["requests"] >= 1


@pytest.mark.benchmark(group="telemetry-with")
def test_with_attempt(benchmark, mesh, mode):
    def one() -> None:
        with mesh.request(URL) as attempt:
            attempt.status = 200

    benchmark(one)


@pytest.mark.benchmark(group="telemetry-run-async-x100")
def test_run_async_x100(benchmark, mesh, mode):
    async def many() -> None:
        for _ in range(100):
            await mesh.request(URL).run_async(_asend)

    loop = asyncio.new_event_loop()
    try:
        benchmark(lambda: loop.run_until_complete(many()))
    finally:
        loop.close()


def _per_request_ns(fn: Any, n: int) -> float:
    """CPU time (this thread's) per call of ``fn``, ns."""
    t = time.thread_time_ns()
    for _ in range(n):
        fn()
    return (time.thread_time_ns() - t) / n


def paired_added_us(m: Any, fn: Any, modes: Any = ("off", "sink", "istio"), rounds: int = 15,
                    n: int = 3000) -> Dict[str, float]:
    """Per mode, the median over rounds of (mode - off) CPU µs per request, the modes interleaved
    in every round (order rotated per round); ``"off"``: the median off cost itself."""
    diffs: Dict[str, List[float]] = {mode: [] for mode in modes}
    for i in range(rounds):
        order = list(modes[i % len(modes):]) + list(modes[:i % len(modes)])
        got = {}
        for mode in order:
            _set_mode(m, mode)
            for _ in range(200):
                fn()
            got[mode] = _per_request_ns(fn, n)
        for mode in modes:
            diffs[mode].append(got[mode] if mode == "off" else got[mode] - got["off"])
    _set_mode(m, "off")
    return {mode: statistics.median(v) / 1000 for mode, v in diffs.items()}


def test_added_cost_paired(tmp_path):
    """off / sink / istio interleaved (15 rounds, CPU time, the median of per-round differences),
    both twins: the added microseconds per request of the hook alone and with Istio's metrics."""
    path = str(tmp_path / "resources.json")
    _resources(path)
    rows: List[Dict[str, Any]] = []
    quick = bool(os.environ.get("MESHCORE_BENCH_QUICK"))
    for twin in ("c", "py"):
        m = _make(twin, path)
        try:
            def run() -> None:
                m.request(URL).run(_send)

            def with_form() -> None:
                with m.request(URL) as a:
                    a.status = 200

            for shape, fn in (("run", run), ("with", with_form)):
                got = paired_added_us(m, fn, rounds=3 if quick else 15, n=500 if quick else 3000)
                rows.append({"twin": twin, "shape": shape, "off_us": got["off"], "hook_us": got["sink"],
                             "istio_us": got["istio"]})
        finally:
            m.close()
    print("\nper request (CPU): off, and what the hook (a no-op sink) and Istio's metrics add (µs, median of "
          "per-round differences)")
    for r in rows:
        print(f"  {r['twin']:>2} {r['shape']:<5} off {r['off_us']:6.2f}  +hook {r['hook_us']:5.2f}  "
              f"+istio {r['istio_us']:5.2f}")
    out = os.environ.get("MESHCORE_BENCH_TELEMETRY_JSON")
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
    for r in rows:
        assert r["istio_us"] < 20, r  # a sanity bound, not the figure
