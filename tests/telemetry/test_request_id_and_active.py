"""The record's request ID is the ``x-request-id`` the upstream received, also when tracing made it
(a real loopback upstream echoing its headers; httpx and the plain API, both twins), and
``record.ACTIVE`` (the request path's first test) stays exact while many meshes add and remove
sinks at once."""

from __future__ import annotations

import sys
import threading
import uuid
from typing import Any, List

import pytest

import opentelemetry.sdk  # noqa: E402,F401  (a test dependency: the test extras install it)

from meshcore.telemetry import record as record_mod  # noqa: E402
from meshcore.telemetry.record import Telemetry  # noqa: E402

from .test_tracing import URL, _get, echo, mesh, spans  # noqa: E402,F401  (fixtures)


@pytest.fixture
def records(mesh):
    """The records of the mesh's requests (the sink is removed before tracing is turned off)."""
    got: List[Any] = []
    mesh.telemetry.add_sink(got.append)
    yield got
    mesh.telemetry.remove_sink(got.append)


def test_generated_request_id_is_the_records(mesh, echo, spans, records):
    seen = _get(mesh, "/gen").json()
    sent = seen["x-request-id"]
    assert str(uuid.UUID(sent)) == sent  # a UUID made by tracing (not the application)
    (r,) = records
    assert r.request_id == sent


def test_generated_request_id_on_a_retried_request_is_the_last_attempts(mesh, echo, spans, records):
    echo.fail_first = 1
    seen = _get(mesh, "/retry/x").json()
    (r,) = records
    assert r.attempts == 2 and r.response_code == 200
    assert r.request_id == seen["x-request-id"] == echo.seen[0]["x-request-id"]  # one ID per request


def test_the_applications_request_id_is_kept(mesh, echo, spans, records):
    seen = _get(mesh, "/own", headers={"x-request-id": "app-rid-7"}).json()
    assert seen["x-request-id"] == "app-rid-7"
    assert records[0].request_id == "app-rid-7"



def test_plain_api_request_id(mesh, echo, spans, records):
    from meshcore.telemetry import tracing

    sent: List[str] = []

    def send(attempt: Any) -> Any:
        sent.append(dict(tracing.headers_of(attempt))["x-request-id"])
        return type("R", (), {"status_code": 204})()

    mesh.request(f"{URL}/plain").run(send)
    assert records[0].request_id == sent[0]


def test_no_request_id_without_tracing(mesh, echo, records):
    seen = _get(mesh, "/off").json()
    assert "x-request-id" not in seen and records[0].request_id is None


def test_active_is_exact_under_concurrent_meshes():
    before = record_mod.ACTIVE[0]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: a racy += would lose updates
    try:
        def churn() -> None:
            tels = [Telemetry() for _ in range(4)]
            sinks = [lambda r: None for _ in range(4)]
            for _ in range(3000):
                for t, s in zip(tels, sinks):
                    t.add_sink(s)
                for t, s in zip(tels, sinks):
                    t.remove_sink(s)
                tels[0].add_sink(sinks[0])
                tels[0].close()

        threads = [threading.Thread(target=churn) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert record_mod.ACTIVE[0] == before
