"""The request path (``meshcore._fast.call_c`` vs ``call_py``) side by side in one run.

What a service pays per request on top of its own I/O: ``mesh.request`` (URL, published
configuration, route match, cluster state), the attempt (breakers, pick, timeouts) and its end
(release, stats, histogram). Three shapes:

* ``with``: ``with mesh.request(url) as attempt: attempt.status = 200`` (the plain API), also
  with five ordinary request headers;
* ``run``: ``mesh.request(url).run(send)`` with a ``send`` that answers 200 at once (the loop
  the client integrations use);
* ``retry``: ``run`` where the first attempt gets a 503 and the route retries once (5xx, 1 ms
  back-off base, so the back-off sleep is part of the figure).

The mesh reads a resource file (no control plane, nothing else running); the route table and
balancers are the compiled ones in both columns, so the ratio is the request path's own.
"""

from __future__ import annotations

import json
import os
from importlib import import_module

import pytest

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
URL = "http://svc.mesh.local/api/items?page=1"


def _resources(path: str) -> None:
    routes = [
        {"name": "r-health", "match": {"path": "/healthz"}, "route": {"cluster": "svc"}},
        {"name": "r-canary", "match": {"prefix": "/", "headers": [{"name": "x-canary",
                                                                     "string_match": {"exact": "1"}}]},
         "route": {"cluster": "svc"}},
        {"name": "r-api", "match": {"prefix": "/api/"}, "route": {
            "cluster": "svc", "timeout": "5s",
            "retry_policy": {"retry_on": "5xx", "num_retries": 1, "retry_back_off": {"base_interval": "0.001s"}}}},
        {"name": "r-default", "match": {"prefix": "/"}, "route": {"cluster": "svc"}},
    ]
    data = {
        "listeners": [{"name": "svc.mesh.local:80", "api_listener": {"api_listener": {
            "@type": HCM, "rds": {"config_source": {"ads": {}}, "route_config_name": "routes"},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}}],
        "routes": [{"name": "routes", "virtual_hosts": [{"name": "svc", "domains": ["*"], "routes": routes}]}],
        "clusters": [{"name": "svc", "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}},
                      "lb_policy": "LEAST_REQUEST"}],
        "endpoints": [{"cluster_name": "svc", "endpoints": [{"locality": {"zone": "z"}, "lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": f"10.0.0.{i}", "port_value": 8080}}}}
            for i in range(1, 11)]}]}],
    }
    with open(path, "w") as f:
        json.dump(data, f)


@pytest.fixture(scope="module", params=["c", "py"])
def mesh(request, tmp_path_factory):
    from meshcore.mesh import MeshBase

    mod = import_module(f"meshcore._fast.call_{request.param}")
    path = str(tmp_path_factory.mktemp("request") / "resources.json")
    _resources(path)
    cls = type(f"Mesh_{request.param}", (MeshBase, mod.MeshCore), {"_core": mod})
    m = cls.from_file(path, watch=False, seed=1).start()
    m.wait_ready("svc.mesh.local:80", timeout=10)
    yield m
    m.close()


class _Response:
    status_code = 200


OK = _Response()


class _Failure:
    status_code = 503


FAILURE = _Failure()


@pytest.mark.benchmark(group="request-with")
def test_with_attempt(benchmark, mesh):
    def one():
        with mesh.request(URL) as attempt:
            attempt.status = 200

    benchmark(one)
    assert mesh.stats()["svc"]["upstream_rq_active"] == 0


HEADERS = {"accept": "application/json", "user-agent": "bench/1.0", "x-request-id": "5f1c0b9e-1d2b",
           "authorization": "Bearer abc", "content-type": "application/json"}


@pytest.mark.benchmark(group="request-with-headers")
def test_with_attempt_and_headers(benchmark, mesh):
    """Five ordinary request headers: the route's header matcher runs, and the request path
    looks for the router's x-envoy-* headers (none here)."""
    def one():
        with mesh.request(URL, "GET", HEADERS) as attempt:
            attempt.status = 200

    benchmark(one)
    assert mesh.stats()["svc"]["upstream_rq_active"] == 0


@pytest.mark.benchmark(group="request-run")
def test_run(benchmark, mesh):
    def send(attempt):
        return OK

    benchmark(lambda: mesh.request(URL).run(send))
    assert mesh.stats()["svc"]["upstream_rq_active"] == 0


@pytest.mark.benchmark(group="request-retry")
def test_run_with_one_retry(benchmark, mesh):
    def send(attempt):
        return FAILURE if attempt.number == 1 else OK

    def one():
        call = mesh.request(URL)
        assert call.run(send) is OK and len(call.attempts) == 2

    benchmark(one)
    st = mesh.stats()["svc"]
    assert st["upstream_rq_active"] == 0 and st["upstream_rq_retry_success"] >= 1


# -- the async router loop and cold caches --------------------------------------------------------

BATCH = 100


async def _send_ok(attempt):
    return OK


@pytest.mark.benchmark(group="request-run-async-x100")
def test_run_async_x100(benchmark, mesh):
    """``await mesh.request(url).run_async(send)`` 100 times in one coroutine (the route has a
    timeout, so each attempt registers its deadline): the figure / 100 is one request (plus
    1/100 of ``run_until_complete``)."""
    import asyncio

    async def many():
        for _ in range(BATCH):
            await mesh.request(URL).run_async(_send_ok)

    loop = asyncio.new_event_loop()
    try:
        benchmark(lambda: loop.run_until_complete(many()))
    finally:
        loop.close()
    assert mesh.stats()["svc"]["upstream_rq_active"] == 0


_THRASH = bytearray(32 << 20)  # larger than the last-level cache


def _thrash() -> None:
    """Evict the caches as a network wait does (every 64-byte line of 32 MB written)."""
    _THRASH[::64] = b"\x01" * (len(_THRASH) // 64)


@pytest.mark.benchmark(group="request-run-cold")
def test_run_cold(benchmark, mesh):
    """``run`` with the caches evicted before each request (the figure in situ, between waits)."""
    def send(attempt):
        return OK

    benchmark.pedantic(lambda: mesh.request(URL).run(send), setup=_thrash, rounds=300, iterations=1,
                       warmup_rounds=5)
    assert mesh.stats()["svc"]["upstream_rq_active"] == 0
