"""Mesh.from_file: the embedded/static source (no control plane), reloads and last-good semantics."""

from __future__ import annotations

import os
import time

import pytest

import meshcore
from meshcore.errors import ConfigError, NoRoute, Unavailable

from .shapes import assignment, cluster, mesh_resources, route

TARGET = "echo.local:8080"


def _resources(ports=(("a", [9001, 9002]), ("b", [9003])), timeout="2s", extra_route=None,
               bad_cluster=False, drop_cluster_b=False):
    routes = ([extra_route] if extra_route else []) + [route("default", "a", timeout=timeout)]
    clusters = [cluster(n, **({"connect_timeout": "-1s"} if bad_cluster and n == "a" else {}))
                for n, _ in ports if not (drop_cluster_b and n == "b")]
    return mesh_resources(TARGET, routes, clusters, [assignment(n, p) for n, p in ports], "echo-routes")


def _write(path, data):
    import json

    tmp = str(path) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)
    # make sure the mtime moves even on coarse-grained file systems
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def _wait(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


@pytest.fixture
def mesh_file(tmp_path):
    path = tmp_path / "mesh.json"
    _write(path, _resources())
    mesh = meshcore.Mesh.from_file(path, poll_interval=0.02)
    with mesh:
        yield mesh, path


def test_pick_from_file(mesh_file):
    mesh, _ = mesh_file
    mesh.wait_ready(TARGET, timeout=5)
    seen = set()
    for _ in range(4):
        p = mesh.pick(TARGET, "/x")
        assert p.cluster == "a" and p.route_name == "default" and p.timeout == 2.0
        seen.add(p.endpoint.port)
        p.done()
    assert seen == {9001, 9002}  # round robin over both endpoints


def test_reload_applies_changes_atomically(mesh_file):
    mesh, path = mesh_file
    mesh.wait_ready(TARGET)
    old = mesh.config(TARGET)
    canary = {"name": "canary", "match": {"prefix": "/", "headers": [
        {"name": "x-canary", "string_match": {"exact": "1"}}]}, "route": {"cluster": "b"}}
    _write(path, _resources(extra_route=canary))
    assert _wait(lambda: mesh.config(TARGET) is not old)
    p = mesh.pick(TARGET, "/x", headers={"x-canary": "1"})
    assert (p.cluster, p.endpoint.port) == ("b", 9003)
    assert mesh.pick(TARGET, "/x").cluster == "a"


def test_invalid_resource_keeps_last_good(mesh_file):
    mesh, path = mesh_file
    mesh.wait_ready(TARGET)
    source = mesh._source
    before = source.reloads
    _write(path, _resources(bad_cluster=True, ports=(("a", [9001, 9002, 9005]), ("b", [9003]))))
    assert _wait(lambda: source.reloads > before)
    dump = {(c["type_url"].rsplit(".", 1)[-1], c["name"]): c for c in mesh.config_dump()["generic_xds_configs"]}
    bad = dump[("Cluster", "a")]
    assert bad["client_status"] == "NACKED"
    assert "connect_timeout" in bad["error_state"]["details"]
    # the valid sibling change (a third endpoint of a's assignment) applied; cluster a kept serving
    ports = {mesh.pick(TARGET, "/").endpoint.port for _ in range(6)}
    assert ports == {9001, 9002, 9005}


def test_removed_resources_do_not_exist(mesh_file):
    mesh, path = mesh_file
    mesh.wait_ready(TARGET)
    route_b = {"name": "to-b", "match": {"prefix": "/b"}, "route": {"cluster": "b"}}
    _write(path, _resources(extra_route=route_b))
    assert _wait(lambda: "b" in mesh.config(TARGET).clusters)
    assert mesh.pick(TARGET, "/b").cluster == "b"
    _write(path, _resources(extra_route=route_b, drop_cluster_b=True))
    assert _wait(lambda: mesh.config(TARGET).clusters["b"].lb is None)
    with pytest.raises(Unavailable, match="does not exist"):
        mesh.pick(TARGET, "/b")
    assert mesh.pick(TARGET, "/a").cluster == "a"  # errors in one cluster stay local


def test_unknown_target_and_no_route(mesh_file):
    mesh, path = mesh_file
    with pytest.raises(Unavailable, match="does not exist"):
        mesh.wait_ready("nope.local:1", timeout=1)
    data = _resources()
    data["routes"][0]["virtual_hosts"][0]["routes"][0]["match"] = {"prefix": "/api"}
    _write(path, data)
    mesh.wait_ready(TARGET)
    assert _wait(lambda: mesh.config(TARGET).route_table.spec.virtual_hosts[0].routes[0].path_value == "/api")
    assert mesh.pick(TARGET, "/api/x").cluster == "a"
    with pytest.raises(NoRoute):
        mesh.pick(TARGET, "/other")


def test_broken_file_is_a_clear_error_at_start(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("listeners: [ {name: x\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        meshcore.Mesh.from_file(path)


def test_route_table_cache_forgets_route_configs_no_longer_used(mesh_file):
    mesh, path = mesh_file
    mesh.wait_ready(TARGET)
    for i in range(3):  # the listener moves to a new route configuration each time
        ports = (("a", [9001, 9002]), ("b", [9003]))
        data = mesh_resources(TARGET, [route("default", "a")], [cluster(n) for n, _ in ports],
                              [assignment(n, p) for n, p in ports], f"routes-{i}")
        old = mesh.config(TARGET)
        _write(path, data)
        assert _wait(lambda: mesh.config(TARGET) is not old)
        p = mesh.pick(TARGET, "/x")
        assert p.cluster == "a"
        p.done()
        assert set(mesh._publisher._tables) == {f"routes-{i}"}
