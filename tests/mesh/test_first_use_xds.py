"""First use of a target over xDS: the first pick/request waits for the configuration (and only
as long as it must), a target the control plane says does not exist fails fast (first and later
requests), an event loop's thread is never blocked, and a closed mesh refuses everything."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from meshcore.errors import MeshClosed, NotReady, Unavailable

from .shapes import TARGET, mesh_resources, resources

NEAR_MISS = "echo.default.svc.cluster.locl:8080"


def test_first_pick_waits_for_configuration(cp, make_mesh):
    cp.set_resources(resources())
    mesh = make_mesh()
    p = mesh.pick(TARGET, "/x")  # no wait_ready: the first pick waits for the configuration
    assert p.cluster == "a" and p.endpoint.port in (9001, 9002)
    p.done()


def test_first_request_waits_for_late_configuration(cp, make_mesh):
    mesh = make_mesh(ready_timeout=5.0)
    timer = threading.Timer(0.5, lambda: cp.set_resources(resources()))
    timer.start()
    try:
        started = time.monotonic()
        call = mesh.request(f"http://{TARGET}/x")
        waited = time.monotonic() - started
    finally:
        timer.cancel()
    assert call.cluster == "a"
    assert 0.4 < waited < 3.0


@pytest.mark.parametrize("mode", ["sotw", "delta"])
def test_missing_listener_fails_fast(cp, make_mesh, mode):
    """SotW has no "not found": the name is declared missing by the does-not-exist timer
    (``resource_timeout``, 1 s here); delta servers say it with ``removed_resources``. Either
    way the first request fails when that is known, before the 8 s ``ready_timeout``, and
    later ones at once."""
    cp.set_resources(resources())
    mesh = make_mesh(mode, ready_timeout=8.0, resource_timeout=1.0)
    mesh.wait_ready(TARGET)
    started = time.monotonic()
    with pytest.raises(Unavailable) as info:
        mesh.pick(NEAR_MISS, "/")  # the server answers without it: does not exist
    first = time.monotonic() - started
    assert "does not exist" in str(info.value)
    assert f"nearest known targets: {TARGET}" in str(info.value)
    assert first < 3.0  # not the 8 s ready_timeout
    started = time.monotonic()
    with pytest.raises(Unavailable, match="does not exist"):
        mesh.request(f"http://{NEAR_MISS}/")
    assert time.monotonic() - started < 0.5


def test_timed_out_target_fails_fast_afterwards(make_mesh):
    mesh = make_mesh(ready_timeout=0.3)  # the control plane has nothing, and says nothing
    started = time.monotonic()
    with pytest.raises(Unavailable, match="waited 0.3 s"):
        mesh.pick(TARGET, "/")
    assert 0.25 < time.monotonic() - started < 2.0
    started = time.monotonic()
    with pytest.raises(Unavailable, match="waiting for"):
        mesh.pick(TARGET, "/")
    assert time.monotonic() - started < 0.2


def test_event_loop_thread_is_never_blocked(cp, make_mesh):
    mesh = make_mesh(ready_timeout=5.0)

    async def main():
        started = time.monotonic()
        with pytest.raises(NotReady) as info:
            mesh.request(f"http://{TARGET}/")
        assert time.monotonic() - started < 0.5
        assert info.value.target == TARGET
        cp.set_resources(resources())
        await asyncio.to_thread(mesh.wait_ready, info.value.target)
        return mesh.request(f"http://{TARGET}/").cluster

    assert asyncio.run(main()) == "a"


def test_close_and_restart(cp, make_mesh):
    cp.set_resources(resources())
    mesh = make_mesh()
    mesh.pick(TARGET, "/").done()
    mesh.close()
    with pytest.raises(MeshClosed):
        mesh.pick(TARGET, "/")
    with pytest.raises(MeshClosed):
        mesh.request(f"http://{TARGET}/")
    with pytest.raises(MeshClosed):
        mesh.start()
    # the control plane changing things afterwards publishes nothing
    cp.set_resources(mesh_resources(TARGET, [], [], [], "echo-routes"))
    time.sleep(0.1)
    assert mesh.config(TARGET) is None


def test_unreachable_control_plane_names_the_node_once(make_mesh):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    from .shapes import bootstrap

    mesh = make_mesh(bootstrap=bootstrap(None, node_id="lonely-node", uri=f"127.0.0.1:{dead}"), ready_timeout=1.0)
    with pytest.raises(Unavailable) as info:
        mesh.pick(TARGET, "/")
    assert str(info.value).count("lonely-node") == 1, str(info.value)
