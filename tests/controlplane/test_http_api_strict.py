"""The HTTP API parses bodies as strictly as Envoy loads JSON/YAML: YAML bodies, and 400s that
name the resource and the field for unknown fields, unknown enum names and hostile input."""

from __future__ import annotations

import json
import textwrap
from typing import Iterator

import pytest

from meshcore.controlplane import ControlPlane
from meshcore.xds.model import CLUSTER

from .test_http_api import call

EDS = {"type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}}}


@pytest.fixture
def api() -> Iterator[ControlPlane]:
    with ControlPlane(http_address="127.0.0.1:0") as plane:
        yield plane


def test_yaml_body(api: ControlPlane) -> None:
    body = textwrap.dedent("""\
        clusters:
        - name: from-yaml
          type: EDS
          lbPolicy: LEAST_REQUEST
          eds_cluster_config: {eds_config: {ads: {}}}
        """).encode()
    status, answer = call(api, "PUT", "/v1/resources", raw=body)
    assert status == 200, answer
    assert api.resources(CLUSTER)["from-yaml"].lb_policy == 1  # LEAST_REQUEST
    status, answer = call(api, "PUT", "/v1/resources", raw=b"clusters:\n- name: x\n  type: [\n")
    assert status == 400 and answer["resource"] == "request body" and answer["field"] == "(document)"
    assert "line " in answer["error"] and "<unicode string>" not in answer["error"]


@pytest.mark.parametrize("cluster, field, words", [
    ({"lb_policy": "LEAST_REQUESTS"}, "clusters[0].lb_policy", ["unknown enum value", "LEAST_REQUESTS"]),
    ({"lb_polcy": "LEAST_REQUEST"}, "clusters[0].lb_polcy", ["unknown field"]),
    ({"type": "EDS\udcff"}, "clusters[0].type", ["lone surrogate"]),
    ({"transport_socket": {"name": "t", "typed_config": {"@type": 1.5}}},
     "clusters[0].transport_socket.typed_config.@type", ["must be a string"]),
    ({"metadata": {"filter_metadata": {"k": {"a": json.loads("[" * 40 + "]" * 40)}}}}, None, None),
])
def test_rejections_name_resource_and_field(api: ControlPlane, cluster: dict, field: str, words: list) -> None:
    doc = {"clusters": [{"name": "c1", **EDS, **cluster}]}
    status, answer = call(api, "PUT", "/v1/resources", raw=json.dumps(doc).encode())
    if field is None:  # a control: nesting well under the limit is fine
        assert status == 200, answer
        return
    assert status == 400, answer
    assert answer["resource"] == "request body" and answer["field"] == field
    assert "Cluster 'c1'" in answer["error"] and all(w in answer["error"] for w in words), answer
    assert api.resources(CLUSTER) == {}


def _deep_route(depth: int) -> bytes:
    deep = '{"a":' * depth + "{}" + "}" * depth
    return ('{"routes": [{"name": "r", "virtual_hosts": [{"name": "v", "domains": ["*"], "typed_per_filter_config": '
            '{"f": {"@type": "type.googleapis.com/xds.type.v3.TypedStruct", "type_url": "x.Y", "value": '
            + deep + "}}}]}]}").encode()


def test_deep_struct_is_rejected(api: ControlPlane) -> None:
    status, answer = call(api, "PUT", "/v1/resources", raw=_deep_route(150))
    assert status == 400, answer
    assert answer["field"] == "routes[0].virtual_hosts[0].typed_per_filter_config[f].value"
    assert "RouteConfiguration 'r'" in answer["error"] and "nested deeper than 100" in answer["error"]
    # too deep for the JSON decoder itself: the body as a whole is refused (no RecursionError)
    status, answer = call(api, "PUT", "/v1/resources", raw=_deep_route(1000))
    assert status == 400 and answer["field"] == "(document)" and "nested too deeply" in answer["error"], answer
    status, answer = call(api, "PUT", "/v1/resources", raw=_deep_route(30))
    assert status == 200, answer
