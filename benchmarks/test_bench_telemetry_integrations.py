"""What Istio's standard metrics add per request through a client integration: httpx (sync and
async; the canned httpcore pool of ``test_bench_integrations_httpx``) and aiohttp (the canned
connector of ``test_bench_integrations_requests_aiohttp``), no I/O, so the figure is meshcore's CPU
and nothing else.

One mesh and one client; the mesh's telemetry is switched between blocks
(``integration_harness.set_telemetry``): ``off``, ``istio`` (``enable_istio_metrics()``: the
metadata exchange headers on every request and the peer's stripped from the response, and the
Istio sink alone: its fast path, no record), ``istio-noexchange`` (the metrics without the exchange's
headers), ``istio+log`` (the same as ``istio`` plus one more sink: every
request builds its full RequestRecord, what an access log adds), ``istio+tracing`` (Istio's
metrics and an OpenTelemetry SDK provider, every request sampled: a span per request and the
trace headers on every attempt). Per round every mode runs one
block of ``n`` requests (order rotated per round), CPU time of this thread; the figure is the
median over rounds of (mode - off) within the round.

``python benchmarks/test_bench_telemetry_integrations.py`` prints the table.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from typing import Any, Dict, List

import pytest

from integration_harness import QUICK, TELEMETRY_MODES, set_telemetry
from test_bench_integrations_httpx import _lib, no_io_clients, no_io_mesh


def telemetry_added(mesh: Any, lib: Any, is_async: bool, n: int = 300, rounds: int = 31,
                    modes: Any = TELEMETRY_MODES) -> Dict[str, float]:
    """``{"off": µs per request, "istio" / "istio+log" / "istio+tracing": added µs}`` through httpx
    (see the module doc; ``modes``: a subset, "off" included)."""
    send = no_io_clients(mesh, lib, is_async)["meshcore"]
    loop = asyncio.new_event_loop() if is_async else None
    try:
        return _added(mesh, send, loop, n, rounds, modes)
    finally:
        if loop is not None:
            loop.close()


def aiohttp_telemetry_added(mesh: Any, n: int = 300, rounds: int = 31,
                            modes: Any = TELEMETRY_MODES) -> Dict[str, float]:
    """:func:`telemetry_added` through aiohttp's ``MeshSession`` (over canned connections)."""
    from test_bench_integrations_requests_aiohttp import no_io_clients as aiohttp_clients

    loop = asyncio.new_event_loop()

    async def make() -> Dict[str, Any]:
        return aiohttp_clients(mesh)

    sends = loop.run_until_complete(make())
    try:
        out = _added(mesh, sends["meshcore"], loop, n, rounds, modes)
        out["exchange_headers_in_aiohttp"] = _aiohttp_header_cost(mesh, sends["sessions"][0], loop, n, rounds)
        return out
    finally:
        loop.run_until_complete(sends["close"]())
        loop.close()


def _aiohttp_header_cost(mesh: Any, session: Any, loop: Any, n: int, rounds: int) -> float:
    """What aiohttp itself charges for Istio's two exchange headers: a plain session's request
    with them minus without (median of per-round differences, rounds alternating), the part of
    ``istio`` - ``istio-noexchange`` that any client sending them pays."""
    from integration_harness import PATH, TARGET

    set_telemetry(mesh, "istio")
    headers = dict(mesh.telemetry.exchange.headers)
    set_telemetry(mesh, "off")
    url = f"http://{TARGET}{PATH}"
    get = session.get

    async def block(k: int, h: Any) -> float:
        t0 = time.thread_time_ns()
        for _ in range(k):
            async with get(url, headers=h) as r:
                await r.read()
        return (time.thread_time_ns() - t0) / k / 1e3

    diffs = []
    for r in range(rounds):
        pair = {}
        for h in ((None, headers) if r % 2 == 0 else (headers, None)):
            loop.run_until_complete(block(10, h))
            pair[h is None] = loop.run_until_complete(block(n, h))
        diffs.append(pair[False] - pair[True])
    return statistics.median(diffs)


def _added(mesh: Any, send: Any, loop: Any, n: int, rounds: int, modes: Any) -> Dict[str, float]:
    """The rounds of :func:`telemetry_added`: ``send()`` makes one request (a coroutine with a
    ``loop``)."""

    async def aloop(k: int) -> None:
        for _ in range(k):
            await send()

    def block(k: int) -> float:
        t0 = time.thread_time_ns()
        if loop is not None:
            loop.run_until_complete(aloop(k))
        else:
            for _ in range(k):
                send()
        return (time.thread_time_ns() - t0) / k / 1e3

    modes = list(modes)
    got: Dict[str, List[float]] = {m: [] for m in modes}
    try:
        for mode in modes:  # warm-up: every mode's series and caches made
            set_telemetry(mesh, mode)
            block(max(20, n // 10))
        for r in range(rounds):
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            this: Dict[str, float] = {}
            for mode in order:
                set_telemetry(mesh, mode)
                block(10)
                this[mode] = block(n)
            for mode in modes:
                got[mode].append(this[mode] if mode == "off" else this[mode] - this["off"])
    finally:
        set_telemetry(mesh, "off")
    return {m: statistics.median(v) for m, v in got.items()}


@pytest.fixture(scope="module")
def mesh():
    m = no_io_mesh()
    saved = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if saved is not None and len(saved) > 1:
        os.sched_setaffinity(0, {min(saved)})
    try:
        yield m
    finally:
        if saved is not None:
            os.sched_setaffinity(0, saved)
        m.close()


@pytest.mark.skipif(_lib("httpx") is None, reason="needs httpx")
@pytest.mark.benchmark(group="telemetry-integrations")
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_istio_metrics_added_through_httpx(benchmark, mesh, kind):
    n, rounds = (50, 3) if QUICK else (300, 31)
    out: Dict[str, float] = {}
    benchmark.pedantic(lambda: out.update(telemetry_added(mesh, _lib("httpx"), kind == "async", n, rounds)),
                       rounds=1, iterations=1)
    benchmark.extra_info.update({k: round(v, 3) for k, v in out.items()})
    print(f"\nhttpx {kind} no I/O: off {out['off']:.2f} us, +istio {out['istio']:.2f} us, "
          f"+istio without the exchange {out['istio-noexchange']:.2f} us, "
          f"+istio+record {out['istio+log']:.2f} us, +istio+tracing {out['istio+tracing']:.2f} us CPU per request")
    sink = mesh.telemetry.istio_metrics
    assert sink is None  # left off
    assert out["off"] > 0


@pytest.fixture(scope="module")
def aiohttp_mesh():
    from test_bench_integrations_requests_aiohttp import no_io_mesh as aiohttp_mesh

    m = aiohttp_mesh()
    try:
        yield m
    finally:
        m.close()


@pytest.mark.benchmark(group="telemetry-integrations")
def test_istio_metrics_added_through_aiohttp(benchmark, aiohttp_mesh):
    n, rounds = (50, 3) if QUICK else (300, 31)
    out: Dict[str, float] = {}
    benchmark.pedantic(lambda: out.update(aiohttp_telemetry_added(aiohttp_mesh, n, rounds)), rounds=1,
                       iterations=1)
    benchmark.extra_info.update({k: round(v, 3) for k, v in out.items()})
    print(f"\naiohttp no I/O: off {out['off']:.2f} us, +istio {out['istio']:.2f} us, "
          f"+istio without the exchange {out['istio-noexchange']:.2f} us, "
          f"+istio+record {out['istio+log']:.2f} us, +istio+tracing {out['istio+tracing']:.2f} us CPU per request "
          f"(aiohttp's own cost of the exchange's two headers: {out['exchange_headers_in_aiohttp']:.2f} us)")
    assert aiohttp_mesh.telemetry.istio_metrics is None  # left off
    assert out["off"] > 0


def _main() -> None:
    m = no_io_mesh()
    try:
        lib = _lib("httpx")
        for kind in ("sync", "async"):
            out = telemetry_added(m, lib, kind == "async")
            print(f"httpx {kind:<5} off {out['off']:6.2f} us  +istio {out['istio']:5.2f} us  "
                  f"+istio-noexchange {out['istio-noexchange']:5.2f} us  "
                  f"+istio+record {out['istio+log']:5.2f} us  +istio+tracing {out['istio+tracing']:5.2f} us  "
                  "(CPU per request, median of per-round differences)")
    finally:
        m.close()
    from test_bench_integrations_requests_aiohttp import no_io_mesh as aiohttp_mesh

    m = aiohttp_mesh()
    try:
        out = aiohttp_telemetry_added(m)
        print(f"aiohttp     off {out['off']:6.2f} us  +istio {out['istio']:5.2f} us  "
              f"+istio-noexchange {out['istio-noexchange']:5.2f} us  "
              f"+istio+record {out['istio+log']:5.2f} us  +istio+tracing {out['istio+tracing']:5.2f} us  "
              f"(aiohttp's own cost of the exchange's two headers: {out['exchange_headers_in_aiohttp']:.2f} us)")
    finally:
        m.close()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    _main()
