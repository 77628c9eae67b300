"""httpx transports keep the upstream header pairs per header list and metadata exchange
(``_MeshTransportBase._mesh_headers``). A sync transport is shared by threads: a list made for
the exchange a request read must never be kept under a newer exchange (Istio metrics turned off
and on again meanwhile, e.g. with other node metadata), or later requests would send the old
workload's metadata. Checked at every point of one thread's ``_mesh_headers`` (stepped with
``sys.settrace``) at which another thread switches to the new exchange."""

from __future__ import annotations

import sys
import threading
from typing import Any, List

import httpx

from meshcore.integrations.httpx import MeshTransport, _MeshTransportBase
from meshcore.telemetry import peer_metadata

from .conftest import URL, resources, route
from .exchange_support import echo  # noqa: F401  (fixture)


def _interleaved(mesh: Any, old: Any, new: Any, pause_at: int) -> Any:
    """Thread B makes the list of ``req`` for ``old``, paused at its ``pause_at``-th line event
    while this thread makes another list for ``new``; returns what ``req`` gets for ``new``
    afterwards (None: B ran through without reaching that line event)."""
    transport = MeshTransport(mesh)
    req = httpx.Request("GET", f"{URL}/x", headers={"X-Other": "1"})
    other = httpx.Request("GET", f"{URL}/x", headers={"X-Another": "2"})
    transport._mesh_headers(other, old)  # the transport's lists are old's
    code = _MeshTransportBase._mesh_headers.__code__
    paused, resume = threading.Event(), threading.Event()
    count: List[int] = [0]

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            count[0] += 1
            if count[0] == pause_at:
                paused.set()
                resume.wait(5)
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        return local if frame.f_code is code else None

    def b() -> None:
        sys.settrace(tracer)
        try:
            transport._mesh_headers(req, old)
        finally:
            sys.settrace(None)
            paused.set()  # (ran through)

    thread = threading.Thread(target=b)
    thread.start()
    assert paused.wait(5)
    reached = count[0] >= pause_at
    transport._mesh_headers(other, new)  # another thread: the exchange is now new
    resume.set()
    thread.join(5)
    if not reached:
        return None
    return transport._mesh_headers(req, new)[1]


def test_a_list_made_for_the_old_exchange_is_not_kept_under_the_new_one(echo, make_mesh):  # noqa: F811
    mesh = make_mesh(resources({"echo": [echo.port]}, [route("/", "echo", timeout="5s")]))
    workload = mesh.telemetry.enable_istio_metrics() and mesh.telemetry.exchange.workload
    try:
        old = peer_metadata.Exchange("sidecar~10.0.0.1~old.shop~shop.svc.cluster.local", workload)
        new = peer_metadata.Exchange("sidecar~10.0.0.2~new.shop~shop.svc.cluster.local", workload)
        assert old.headers_bytes != new.headers_bytes
        step = 1
        while True:
            upstream = _interleaved(mesh, old, new, step)
            if upstream is None:
                break
            for pair in old.headers_bytes:
                if pair not in new.headers_bytes:
                    assert pair not in upstream, f"old exchange's {pair!r} kept for the new one (step {step})"
            for pair in new.headers_bytes:
                assert pair in upstream
            step += 1
        assert step > 5  # (the steps were walked)
    finally:
        mesh.telemetry.disable_istio_metrics()
