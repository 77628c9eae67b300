"""aiohttp's ``MeshSession`` runs the router's straight path itself while tracing is off (the
first attempt inline in ``MeshSession._request``, a retry continued in
``lifecycle.run_after_async``; with telemetry sinks the call is then reported as
``lifecycle.run_async_reported`` reports it); while tracing is on it goes through lifecycle's
router (``run_async_reported`` and ``_Sender.send``). Both must do the same thing: the same
answers, attempts, resent bodies and cluster stats, one record per request, and no attempt
deadline left registered in the loop's ``_Deadlines``."""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Dict, List, Tuple

import aiohttp
import pytest
from opentelemetry.sdk.trace import TracerProvider

from meshcore import lifecycle
from meshcore.integrations import aiohttp as _aiohttp
from meshcore.integrations.aiohttp import MeshSession
from meshcore.telemetry import tracing

from .conftest import URL, resources, route
from .echo_upstream import EchoUpstream

# (method, path, body): a first answer that is final, a 503 retried once, a POST whose body is
# resent, a query string
REQUESTS = [("GET", "/x", None), ("GET", "/fail-once/a", None), ("POST", "/fail-once/b", b"payload"),
            ("GET", "/y?q=1", None)]
STATS = ("upstream_rq_total", "upstream_rq_completed", "upstream_rq_retry", "upstream_rq_retry_success",
         "upstream_rq_200", "upstream_rq_503", "upstream_rq_2xx", "upstream_rq_5xx")


def _run(make_mesh: Any, mode: str, monkeypatch: Any) -> Tuple[List[Any], Dict[str, int]]:
    """``mode``: ``inline`` (no telemetry), ``reported`` (a sink: inline, reported), ``lifecycle``
    (tracing on: lifecycle's router, ``run_async_reported``)."""
    sends: List[int] = []  # attempts made through _Sender.send (lifecycle's send(attempt))
    send = _aiohttp._Sender.send

    async def counted(self: Any, attempt: Any) -> Any:
        sends.append(attempt.number)
        return await send(self, attempt)

    monkeypatch.setattr(_aiohttp._Sender, "send", counted)
    echo = EchoUpstream()
    try:
        mesh = make_mesh(resources({"echo": [echo.port]}, [
            route("/", "echo", timeout="5s", retry={"retry_on": "5xx", "num_retries": 2})]))
        records: List[Any] = []
        sink = mesh.telemetry.add_sink(records.append) if mode != "inline" else None
        if mode == "lifecycle":
            assert tracing.configure(TracerProvider()) is not None
        try:
            async def main() -> List[Any]:
                async with MeshSession(mesh) as http:
                    out = []
                    for method, path, body in REQUESTS:
                        async with http.request(method, f"{URL}{path}", data=body) as r:
                            out.append((r.status, await r.json(), dict(r.meshcore)))
                    dl = lifecycle._deadlines()
                    assert not dl.pending and not dl.fired  # every attempt's deadline withdrawn
                    return out

            responses = asyncio.run(main())
        finally:
            if sink is not None:
                mesh.telemetry.remove_sink(sink)
            tracing.configure(None)
        if sink is not None:  # one record per request, with its attempts
            assert [(r.path, r.attempts, r.response_code) for r in records] == [
                (path, n, 200) for (_, path, _), n in zip(REQUESTS, (1, 2, 2, 1))]
        # inline: only the retries go through lifecycle's send; lifecycle's router: every attempt
        assert sends == ([1, 1, 2, 1, 2, 1] if mode == "lifecycle" else [2, 2])
        seen = [(status, body["path"], body["method"], body["body"], info["attempts"], info["cluster"],
                 info["route"], info["endpoint"] == f"127.0.0.1:{echo.port}") for status, body, info in responses]
        stats = mesh.stats()["echo"]
        return seen, {k: int(stats.get(k, 0)) for k in STATS}
    finally:
        echo.close()


def test_inline_router_path_equals_lifecycles(make_mesh, monkeypatch):
    inline, inline_stats = _run(make_mesh, "inline", monkeypatch)
    reported, reported_stats = _run(make_mesh, "reported", monkeypatch)
    routed, routed_stats = _run(make_mesh, "lifecycle", monkeypatch)
    assert inline == reported == routed
    assert inline_stats == reported_stats == routed_stats
    # and what that is: the 503s were retried once, the POST body sent again
    assert [s[4] for s in inline] == [1, 2, 2, 1] and all(s[7] for s in inline)
    assert inline[2][:4] == (200, "/fail-once/b", "POST", "payload")
    assert inline[3][1] == "/y?q=1"
    assert inline_stats["upstream_rq_retry"] == 2 and inline_stats["upstream_rq_retry_success"] == 2
    assert inline_stats["upstream_rq_503"] == 2 and inline_stats["upstream_rq_total"] == 6


def test_inline_path_reports_refusals_and_failures_once(make_mesh):
    # with a sink and no tracing: a request refused before its attempt (no healthy upstream) and
    # one whose retries ran out on connection failures are each recorded once, with Envoy's flags
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = s.getsockname()[1]
    s.close()  # nothing listens there: connection refused
    mesh = make_mesh(resources({"echo": [], "dead": [dead]}, [
        route("/empty", "echo", timeout="5s"),
        route("/", "dead", timeout="5s", retry={"retry_on": "connect-failure", "num_retries": 1})]))
    records: List[Any] = []
    sink = mesh.telemetry.add_sink(records.append)

    async def main() -> None:
        async with MeshSession(mesh) as http:
            with pytest.raises(aiohttp.ClientConnectionError):
                await http.get(f"{URL}/empty")
            with pytest.raises(aiohttp.ClientConnectorError) as info:
                await http.get(f"{URL}/down")
            assert info.value.meshcore["attempts"] == 2
            dl = lifecycle._deadlines()
            assert not dl.pending and not dl.fired

    try:
        asyncio.run(main())
    finally:
        mesh.telemetry.remove_sink(sink)
    assert [(r.path, r.response_code, r.response_flags, r.attempts) for r in records] == [
        ("/empty", 503, "UH", 0), ("/down", 503, "URX,UF", 2)]


def test_each_answer_has_its_own_meshcore_info(make_mesh):
    # every answer gets a resp.meshcore of its own: changing one answer's
    # does not change the next one's; a retried answer says how many attempts it took
    echo = EchoUpstream()
    try:
        mesh = make_mesh(resources({"echo": [echo.port]}, [
            route("/", "echo", timeout="5s", retry={"retry_on": "5xx", "num_retries": 2})]))

        async def main() -> None:
            async with MeshSession(mesh) as http:
                first = await http.get(f"{URL}/same")
                first.meshcore["attempts"] = 99
                second = await http.get(f"{URL}/same")
                assert second.meshcore == {"cluster": "echo", "endpoint": f"127.0.0.1:{echo.port}",
                                           "route": second.meshcore["route"], "attempts": 1}
                retried = await http.get(f"{URL}/fail-once/same")
                assert retried.status == 200 and retried.meshcore["attempts"] == 2
                assert (await http.get(f"{URL}/same")).meshcore["attempts"] == 1

        asyncio.run(main())
    finally:
        echo.close()
