"""A cluster whose endpoints were rejected (or do not exist) says why when nothing can be picked,
through pick, request and the router loop, not only "no healthy upstream"."""

from __future__ import annotations

import json

import pytest

import meshcore
from meshcore.errors import Unavailable

from .shapes import assignment, cluster, mesh_resources, route

TARGET = "echo.local:8080"


@pytest.fixture
def mesh(tmp_path):
    bad = assignment("a", [9001])
    bad["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["address"] = "10.0.0.1\x00"
    path = tmp_path / "mesh.json"
    path.write_text(json.dumps(mesh_resources(TARGET, [route("default", "a")], [cluster("a")], [bad], "r")))
    m = meshcore.Mesh.from_file(path, watch=False).start()
    yield m
    m.close()


def test_rejected_assignment_reason_in_errors(mesh):
    for attempt in (lambda: mesh.pick(TARGET, "/"),
                    lambda: mesh.request(f"http://{TARGET}/").run(lambda a: 200)):
        with pytest.raises(Unavailable) as info:
            attempt()
        text = str(info.value)
        assert "no healthy upstream in cluster 'a'" in text
        assert "rejected" in text and "socket_address.address" in text
    assert any("socket_address.address" in r for r in mesh.problems()[TARGET])
