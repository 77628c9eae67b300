"""A route configuration real Envoy rejects by proto validation (an empty safe_regex, a negative
timeout) is NACKed over a real ADS stream, naming the field, and the last good one stays."""

from __future__ import annotations

from .shapes import TARGET, resources, route
from .test_ads_scenarios import status_of, wait
from meshcore.xds.model import ROUTE


def test_pgv_violation_is_nacked_and_last_good_kept(cp, make_mesh):
    cp.set_resources(resources())
    mesh = make_mesh("sotw")
    mesh.wait_ready(TARGET)
    mark = len(cp.history)
    bad = route("bad", "a", prefix="/bad", timeout="-1s")
    cp.set_resources(resources(extra_routes=[bad]))
    nack = cp.wait_for(lambda e: e["dir"] == "req" and e["type_url"] == ROUTE and e["error_detail"] is not None,
                       start=mark)
    message = nack["error_detail"]["message"]
    assert "routes[bad].route.timeout" in message and "Expected positive duration" in message, message
    assert "routes: routes:" not in message, message  # the resource is named once
    wait(lambda: status_of(mesh, ROUTE, "routes")["client_status"] == "NACKED")
    assert mesh.pick(TARGET, "/bad").route_name == "to-b"  # the last good table: no route "bad"
