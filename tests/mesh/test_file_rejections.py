"""A resource rejected in a file says why where the user looks: the Unavailable error of a target
using it, the publisher's problems() (for ``meshcore status``) and config_dump's error_state."""

from __future__ import annotations

import json
import logging

import pytest

import meshcore
from meshcore.errors import ConfigError, Unavailable

from .shapes import assignment, cluster, mesh_resources, route

TARGET = "echo.local:8080"


def _mesh(tmp_path, mutate=None, text=None):
    doc = mesh_resources(TARGET, [route("default", "a")], [cluster("a")], [assignment("a", [9001])], "rc")
    if mutate is not None:
        mutate(doc)
    path = tmp_path / "mesh.yaml"
    path.write_text(text if text is not None else json.dumps(doc))
    return meshcore.Mesh.from_file(path, watch=False), path


def _socket(doc):
    return doc["endpoints"][0]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]


@pytest.mark.parametrize("kind, mutate, field", [
    ("Listener 'echo.local:8080'",
     lambda d: d["listeners"][0]["api_listener"]["api_listener"].update(http_filters=[]),
     "field api_listener.api_listener.http_filters"),
    ("RouteConfiguration 'rc'",
     lambda d: d["routes"][0]["virtual_hosts"][0]["routes"][0]["route"].update(timeout="-1s"),
     "field virtual_hosts[vh].routes[default].route.timeout"),
    ("Cluster 'a'", lambda d: d["clusters"][0].update(connect_timeout="-1s"), "field connect_timeout"),
    ("ClusterLoadAssignment 'a'", lambda d: _socket(d).update(port_value=0),
     "field endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value"),
])
def test_rejection_reason_is_visible(tmp_path, caplog, kind, mutate, field) -> None:
    with caplog.at_level(logging.WARNING, logger="meshcore.xds.file_source"):
        mesh, path = _mesh(tmp_path, mutate)
    # logged once, without claiming a last good value that never existed
    logs = [r.getMessage() for r in caplog.records]
    assert any("rejected (no last good value" in m and field in m for m in logs), logs
    assert not any("last good value:" in m for m in logs), logs
    with mesh:
        try:
            mesh.pick(TARGET, "/")
        except Unavailable as e:
            text = str(e)
        else:
            pytest.fail("picked from a rejected configuration")
        problems = mesh._publisher.problems()[TARGET]
        assert any(kind in p and "rejected: " + field in p for p in problems), problems
        if not kind.startswith("ClusterLoadAssignment"):  # an EDS rejection leaves an empty balancer
            assert kind in text and "rejected: " + field in text, text
            assert text.count(TARGET + ":") <= 1, text  # no doubled prefixes
        nacked = [r for r in mesh.config_dump(False)["generic_xds_configs"] if r.get("error_state")]
        assert len(nacked) == 1 and field in nacked[0]["error_state"]["details"]


def test_endpoints_recover_from_rejection(tmp_path) -> None:
    mesh, path = _mesh(tmp_path, lambda d: _socket(d).update(port_value=0))
    with mesh:
        with pytest.raises(Unavailable):
            mesh.pick(TARGET, "/")
        assert TARGET in mesh._publisher.problems()
        doc = mesh_resources(TARGET, [route("default", "a")], [cluster("a")], [assignment("a", [9001])], "rc")
        path.write_text(json.dumps(doc))
        mesh._source.reload()
        assert mesh.pick(TARGET, "/").endpoint.port == 9001
        assert mesh._publisher.problems() == {}


def test_file_errors_are_not_doubled(tmp_path) -> None:
    with pytest.raises(ConfigError) as info:
        _mesh(tmp_path, text="listeners:\n- name: x\n  address: [\n")
    text = str(info.value)
    assert text.count("mesh.yaml") == 1 and "line 4" in text and "<unicode string>" not in text, text
    with pytest.raises(ConfigError) as info:
        _mesh(tmp_path, lambda d: d["clusters"][0].update(lb_policy="LEAST_REQUESTS"))
    e = info.value
    assert e.field == "clusters[0].lb_policy" and "Cluster 'a'" in e.reason and str(e).count("mesh.yaml") == 1


def test_unreadable_reload_keeps_serving(tmp_path) -> None:
    mesh, path = _mesh(tmp_path)
    with mesh:
        assert mesh.pick(TARGET, "/").endpoint.port == 9001
        path.write_text("clusters: [{name: a, lb_polcy: RANDOM}]")
        errors = mesh._source.reload()
        assert len(errors) == 1 and errors[0].count("mesh.yaml") == 1 and "lb_polcy" in errors[0]
        assert mesh.pick(TARGET, "/").endpoint.port == 9001
        with pytest.raises(Unavailable, match="lb_polcy"):
            mesh.pick("other:1", "/")
