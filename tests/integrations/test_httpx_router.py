"""The httpx / httpx2 transports run the router's straight path themselves while no telemetry sink is
registered (first attempt inline, a retry continued step for step as ``lifecycle.run`` /
``run_async``); with a sink they go through lifecycle's router. Both must do the same thing: the
same answers, attempts, resent bodies and cluster stats, and (async) no attempt deadline left
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


def _run(make_mesh: Any, lib: Any, is_async: bool, via_lifecycle: bool) -> Tuple[List[Any], Dict[str, int]]:
    echo = EchoUpstream()
    try:
        mesh = make_mesh(resources({"echo": [echo.port]}, [
            route("/", "echo", timeout="5s", retry={"retry_on": "5xx", "num_retries": 2})]))
        sink = mesh.telemetry.add_sink(lambda record: None) if via_lifecycle else None
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
    inline, inline_stats = _run(make_mesh, lib, mode == "async", via_lifecycle=False)
    routed, routed_stats = _run(make_mesh, lib, mode == "async", via_lifecycle=True)
    assert inline == routed
    assert inline_stats == routed_stats
    # and what that is: the 503s were retried once, the POST body sent again
    assert [s[4] for s in inline] == [1, 2, 2, 1]
    assert inline[2][:4] == (200, "/fail-once/b", "POST", "payload")
    assert inline_stats["upstream_rq_retry"] == 2 and inline_stats["upstream_rq_retry_success"] == 2
    assert inline_stats["upstream_rq_503"] == 2 and inline_stats["upstream_rq_total"] == 6
