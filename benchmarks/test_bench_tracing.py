"""What tracing adds per request (``meshcore.telemetry.tracing``), compiled and pure twins.

Modes of the same mesh (the resources of ``test_bench_request``):

* ``off``: no tracer provider (the request path reads ``telemetry.record.ACTIVE``, 0);
* ``sampled``: the OpenTelemetry SDK's ``TracerProvider`` with a ``SimpleSpanProcessor`` into an
  ``InMemorySpanExporter`` (cleared between rounds): one CLIENT span per request with its
  attributes, the W3C/B3/x-request-id headers of the attempt, the span exported;
* ``unsampled``: the same provider with ``ParentBased(ALWAYS_OFF)``: the headers and a
  non-recording span (what an application sampling 1 % pays for the other 99 %);
* ``attempt_spans``: ``sampled`` plus a child span per attempt (Envoy's spawn_upstream_span);
* ``w3c_only``: ``sampled`` with ``b3=False`` (what Envoy's OpenTelemetry tracer propagates).

Shapes: ``run`` (``mesh.request(url).run(send)``, ``send`` reading the attempt's headers and
answering a 200 at once), 100 ``run_async`` in one coroutine, and the single-attempt form
(``with mesh.request(url) as attempt``: its span made when the block ends). ``test_added_cost_paired``
interleaves the modes in one process per twin and prints the added microseconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any, Dict, List

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased  # noqa: E402
from test_bench_request import URL, _resources  # noqa: E402
from test_bench_telemetry import _make  # noqa: E402

from meshcore.telemetry import tracing  # noqa: E402

EXPORTER = InMemorySpanExporter()
SAMPLED = TracerProvider()
SAMPLED.add_span_processor(SimpleSpanProcessor(EXPORTER))
UNSAMPLED = TracerProvider(sampler=ParentBased(ALWAYS_OFF))
UNSAMPLED.add_span_processor(SimpleSpanProcessor(EXPORTER))
MODES = ("off", "sampled", "unsampled", "attempt_spans", "w3c_only")


class _Response:
    status_code = 200
    headers: Dict[str, str] = {}
    _content = b"x" * 20


OK = _Response()
_headers_of = tracing.headers_of


def _send(attempt: Any) -> Any:
    _headers_of(attempt)  # what an integration reads per attempt
    return OK


async def _asend(attempt: Any) -> Any:
    _headers_of(attempt)
    return OK


def _set_mode(mode: str) -> None:
    EXPORTER.clear()
    if mode == "off":
        tracing.configure(None, attempt_spans=False, b3=True)  # no process-wide provider in the benchmarks
    elif mode == "sampled":
        tracing.configure(SAMPLED, attempt_spans=False)
    elif mode == "unsampled":
        tracing.configure(UNSAMPLED, attempt_spans=False)
    elif mode == "w3c_only":
        tracing.configure(SAMPLED, attempt_spans=False, b3=False)
    else:
        tracing.configure(SAMPLED, attempt_spans=True)


@pytest.fixture(scope="module", params=["c", "py"])
def mesh(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tracing") / "resources.json")
    _resources(path)
    m = _make(request.param, path)
    yield m
    m.close()


@pytest.fixture(params=MODES)
def mode(request, mesh):
    _set_mode(request.param)
    yield request.param
    _set_mode("off")


@pytest.mark.benchmark(group="tracing-run")
def test_run(benchmark, mesh, mode):
    def one() -> None:
        mesh.request(URL).run(_send)
        if len(EXPORTER._finished_spans) > 10000:
            EXPORTER.clear()

    benchmark(one)
    if mode in ("sampled", "attempt_spans"):
        assert EXPORTER.get_finished_spans()


@pytest.mark.benchmark(group="tracing-single")
def test_single_form(benchmark, mesh, mode):
    def one() -> None:
        with mesh.request(URL) as attempt:
            attempt.status = 200
        if len(EXPORTER._finished_spans) > 10000:
            EXPORTER.clear()

    benchmark(one)
    if mode in ("sampled", "attempt_spans", "w3c_only"):
        assert EXPORTER.get_finished_spans()


@pytest.mark.benchmark(group="tracing-run-async-x100")
def test_run_async_x100(benchmark, mesh, mode):
    async def many() -> None:
        for _ in range(100):
            await mesh.request(URL).run_async(_asend)
        EXPORTER.clear()

    loop = asyncio.new_event_loop()
    try:
        benchmark(lambda: loop.run_until_complete(many()))
    finally:
        loop.close()


def _per_request_ns(fn: Any, n: int) -> float:
    t = time.perf_counter_ns()
    for _ in range(n):
        fn()
    return (time.perf_counter_ns() - t) / n


def test_added_cost_paired(tmp_path):
    """The modes interleaved (7 rounds, the best of each), both twins: the added microseconds
    per ``run`` request."""
    path = str(tmp_path / "resources.json")
    _resources(path)
    rows: List[Dict[str, Any]] = []
    for twin in ("c", "py"):
        m = _make(twin, path)
        try:
            def run() -> None:
                m.request(URL).run(_send)

            best = {k: float("inf") for k in MODES}
            for _ in range(7):
                for mode in MODES:
                    _set_mode(mode)
                    run()
                    best[mode] = min(best[mode], _per_request_ns(run, 2000))
            _set_mode("off")
            row: Dict[str, Any] = {"twin": twin, "off_us": best["off"] / 1000}
            for mode in MODES[1:]:
                row[f"{mode}_us"] = (best[mode] - best["off"]) / 1000
            rows.append(row)
        finally:
            m.close()
    print("\nper request (run): off, and what tracing adds (µs)")
    for r in rows:
        print(f"  {r['twin']:>2} off {r['off_us']:6.2f}  +sampled {r['sampled_us']:6.2f}  "
              f"+unsampled {r['unsampled_us']:6.2f}  +attempt_spans {r['attempt_spans_us']:6.2f}  "
              f"+w3c_only {r['w3c_only_us']:6.2f}")
    out = os.environ.get("MESHCORE_BENCH_TRACING_JSON")
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
    for r in rows:
        assert r["sampled_us"] < 200, r  # a sanity bound, not the figure
