"""Transport details: backoff constants, big responses, unrequested types, ambient errors."""

from __future__ import annotations

import random
import time

import pytest

from meshcore.xds.client import Backoff
from meshcore.xds.model import ENDPOINT
from meshcore.xds.resource_file import parse_resources

from .shapes import TARGET, assignment, resources


def test_backoff_follows_grpc_constants():
    # gRPC connection backoff (doc/connection-backoff.md, C-core RetryableCall): initial 1 s,
    # multiplier 1.6, jitter +-20 %, capped at 120 s; reset after a response.
    b = Backoff(rng=random.Random(7))
    base = 1.0
    for _ in range(20):
        d = b.next()
        assert base * 0.8 - 1e-9 <= d <= min(base * 1.2, 120.0) + 1e-9
        base = min(base * 1.6, 120.0)
    assert base == 120.0 and b.next() <= 120.0
    b.reset()
    assert 0.8 <= b.next() <= 1.2


def test_response_bigger_than_grpc_default_limit(cp, make_mesh):
    """A 5 MB EDS response (grpc's default receive limit is 4 MiB) is received and applied."""
    res = resources()
    cla = assignment("a", [9001])
    cla["endpoints"][0]["lb_endpoints"][0]["metadata"] = {"filter_metadata": {"pad": {"x": "p" * 5_000_000}}}
    big = parse_resources({"endpoints": [cla]})[ENDPOINT]["a"]
    assert big.ByteSize() > 4 * 1024 * 1024
    res[ENDPOINT]["a"] = big
    cp.set_resources(res)
    mesh = make_mesh("sotw")
    mesh.wait_ready(TARGET, timeout=10)
    assert mesh.pick(TARGET, "/x").endpoint.port == 9001


def test_ambient_error_named_in_failures_while_server_away(cp, make_mesh):
    cp.set_resources(resources())
    mesh = make_mesh("sotw")
    mesh.wait_ready(TARGET)
    cp.stop()
    deadline = time.monotonic() + 5
    while mesh._source.ambient_error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "unavailable" in mesh._source.ambient_error and "meshcore-test" in mesh._source.ambient_error
    assert mesh.pick(TARGET, "/x").cluster == "a"  # cached configuration keeps serving
    with pytest.raises(Exception, match="meshcore-test"):  # node id in the error (grpc-go#7931)
        mesh.pick("other.default.svc.cluster.local:80", "/")
