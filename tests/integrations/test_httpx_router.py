"""The httpx / httpx2 transports run the router's straight path themselves while tracing is off
(first attempt inline, a retry continued in ``lifecycle.run_after`` / ``run_after_async``; with
telemetry sinks the call is then reported as ``lifecycle.run_reported`` reports it); while tracing
is on they go through lifecycle's router. All must do the same thing: the same answers, attempts,
resent bodies and cluster stats, one record per request, and (async) no attempt deadline left
registered in the loop's ``_Deadlines``."""

from __future__ import annotations

import asyncio
import importlib
from typing import Any, Dict, List, Tuple

import pytest

from meshcore import lifecycle
from meshcore.integrations.httpx import AsyncMeshTransport, MeshTransport

from .conftest import URL, resources, route
from .echo_upstream import EchoUpstream

LIBS = [name for name in ("httpx", "httpx2") if importlib.util.find_spec(name) is not None]
# (method, path, body): a first answer that is final, a 503 retried once, a POST whose body is resent
REQUESTS = [("GET", "/x", None), ("GET", "/fail-once/a", None), ("POST", "/fail-once/b", b"payload"),
            ("GET", "/y?q=1", None)]
STATS = ("upstream_rq_total", "upstream_rq_completed", "upstream_rq_retry", "upstream_rq_retry_success",
         "upstream_rq_200", "upstream_rq_503", "upstream_rq_2xx", "upstream_rq_5xx")


def _run(make_mesh: Any, lib: Any, is_async: bool, mode: str) -> Tuple[List[Any], Dict[str, int]]:
    """``mode``: ``inline`` (no telemetry), ``reported`` (a sink: inline, reported), ``lifecycle``
    (tracing on: lifecycle's router, ``run_reported``)."""
    from opentelemetry.sdk.trace import TracerProvider

    from meshcore.telemetry import tracing

    echo = EchoUpstream()
    try:
        mesh = make_mesh(resources({"echo": [echo.port]}, [
            route("/", "echo", timeout="5s", retry={"retry_on": "5xx", "num_retries": 2})]))
        records: List[Any] = []
        sink = mesh.telemetry.add_sink(records.append) if mode != "inline" else None
        if mode == "lifecycle":
            assert tracing.configure(TracerProvider()) is not None
        try:
            if is_async:
                async def main() -> List[Any]:
                    async with lib.AsyncClient(transport=AsyncMeshTransport(mesh), trust_env=False) as client:
                        out = []
                        for method, path, body in REQUESTS:
                            r = await client.request(method, f"{URL}{path}", content=body)
                            out.append(r)
                        dl = lifecycle._deadlines()
                        assert not dl.pending and not dl.fired  # every attempt's deadline withdrawn
                        return out

                responses = asyncio.run(main())
            else:
                with lib.Client(transport=MeshTransport(mesh), trust_env=False) as client:
                    responses = [client.request(method, f"{URL}{path}", content=body)
                                 for method, path, body in REQUESTS]
        finally:
            if sink is not None:
                mesh.telemetry.remove_sink(sink)
            tracing.configure(None)
        if sink is not None:  # one record per request, with its attempts
            assert [(r.path, r.attempts, r.response_code) for r in records] == [
                (path, n, 200) for (_, path, _), n in zip(REQUESTS, (1, 2, 2, 1))]
        seen = [(r.status_code, r.json()["path"], r.json()["method"], r.json()["body"],
                 r.extensions["meshcore"]["attempts"], r.extensions["meshcore"]["cluster"]) for r in responses]
        stats = mesh.stats()["echo"]
        return seen, {k: int(stats.get(k, 0)) for k in STATS}
    finally:
        echo.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("name", LIBS)
def test_inline_router_path_equals_lifecycles(make_mesh, name, mode):
    lib = importlib.import_module(name)
    inline, inline_stats = _run(make_mesh, lib, mode == "async", "inline")
    reported, reported_stats = _run(make_mesh, lib, mode == "async", "reported")
    routed, routed_stats = _run(make_mesh, lib, mode == "async", "lifecycle")
    assert inline == reported == routed
    assert inline_stats == reported_stats == routed_stats
    # and what that is: the 503s were retried once, the POST body sent again
    assert [s[4] for s in inline] == [1, 2, 2, 1]
    assert inline[2][:4] == (200, "/fail-once/b", "POST", "payload")
    assert inline_stats["upstream_rq_retry"] == 2 and inline_stats["upstream_rq_retry_success"] == 2
    assert inline_stats["upstream_rq_503"] == 2 and inline_stats["upstream_rq_total"] == 6


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_inline_path_reports_refusals_and_failures_once(make_mesh, mode):
    # with a sink and no tracing: a request refused before its attempt (no healthy upstream) and
    # one whose retries ran out on connection failures are each recorded once, with Envoy's flags
    import socket

    import httpx

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = s.getsockname()[1]
    s.close()  # nothing listens there: connection refused
    mesh = make_mesh(resources({"echo": [], "dead": [dead]}, [
        route("/empty", "echo", timeout="5s"),
        route("/", "dead", timeout="5s", retry={"retry_on": "connect-failure", "num_retries": 1})]))
    records: List[Any] = []
    sink = mesh.telemetry.add_sink(records.append)
    try:
        if mode == "async":
            async def main() -> None:
                async with httpx.AsyncClient(transport=AsyncMeshTransport(mesh), trust_env=False) as client:
                    for path in ("/empty", "/down"):
                        with pytest.raises(httpx.ConnectError):
                            await client.get(f"{URL}{path}")
            asyncio.run(main())
        else:
            with httpx.Client(transport=MeshTransport(mesh), trust_env=False) as client:
                for path in ("/empty", "/down"):
                    with pytest.raises(httpx.ConnectError):
                        client.get(f"{URL}{path}")
    finally:
        mesh.telemetry.remove_sink(sink)
    assert [(r.path, r.response_code, r.response_flags, r.attempts) for r in records] == [
        ("/empty", 503, "UH", 0), ("/down", 503, "URX,UF", 2)]
