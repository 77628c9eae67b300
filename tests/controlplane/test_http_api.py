"""The control plane's HTTP API through urllib, with pushes reaching a connected ADS stream."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, Iterator, Optional, Tuple
from urllib.parse import quote

import pytest

from meshcore.controlplane import ControlPlane
from meshcore.controlplane import builders as b
from meshcore.controlplane.store import resource_version
from meshcore.xds.model import CLUSTER, ENDPOINT, LISTENER, ROUTE

from .ads_client import AdsStream, resource_names

ISTIO_NAME = "outbound|9080||reviews.default.svc.cluster.local"


@pytest.fixture
def api() -> Iterator[ControlPlane]:
    with ControlPlane(http_address="127.0.0.1:0") as plane:
        yield plane


def call(plane: ControlPlane, method: str, path: str, body: Optional[Any] = None,
         raw: Optional[bytes] = None) -> Tuple[int, Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(f"http://127.0.0.1:{plane.http_port}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_no_http_api_by_default(cp: ControlPlane) -> None:
    assert cp.http_port is None


def test_put_get_delete_and_push(api: ControlPlane) -> None:
    assert api.http_port
    s = AdsStream(api.address)
    try:
        s.send(CLUSTER, [])
        first = s.recv()
        assert resource_names(first) == []
        s.ack(first, names=[])  # the control plane is request-driven: the next push waits for this ACK
        # PUT one resource
        status, body = call(api, "PUT", "/v1/resources",
                            {"@type": CLUSTER, "name": ISTIO_NAME, "type": "EDS", "connectTimeout": "1s"})
        assert status == 200 and body == {"version": api.version}
        r = s.recv()
        assert (r.version_info, resource_names(r)) == (body["version"], [ISTIO_NAME])
        s.ack(r, names=[])
        # GET the listing and the resource (name with '|' URL-encoded)
        status, listing = call(api, "GET", "/v1/resources")
        assert status == 200
        assert listing[CLUSTER] == {ISTIO_NAME: resource_version(api.resources(CLUSTER)[ISTIO_NAME])}
        assert listing[LISTENER] == {} and set(listing) == {LISTENER, ROUTE, CLUSTER, ENDPOINT}
        for type_part in ("CDS", "cds", "envoy.config.cluster.v3.Cluster", quote(CLUSTER, safe=""), CLUSTER):
            status, got = call(api, "GET", f"/v1/resources/{type_part}/{quote(ISTIO_NAME, safe='')}")
            assert status == 200, (type_part, got)
            assert got["@type"] == CLUSTER and got["name"] == ISTIO_NAME and got["connectTimeout"] == "1s"
        # PUT a list and a by-kind document
        status, _ = call(api, "PUT", "/v1/resources", [{"@type": CLUSTER, "name": "c2"}])
        r = s.recv()
        assert status == 200 and resource_names(r) == ["c2", ISTIO_NAME]
        s.ack(r, names=[])
        status, _ = call(api, "PUT", "/v1/resources", {"endpoints": [b_json_cla("c2")]})
        assert status == 200 and "c2" in api.resources(ENDPOINT)
        # DELETE
        status, body = call(api, "DELETE", f"/v1/resources/CDS/{quote(ISTIO_NAME, safe='')}")
        assert status == 200
        r = s.recv()
        assert (r.version_info, resource_names(r)) == (body["version"], ["c2"])
        s.ack(r, names=[])
        # PUT /v1/snapshot replaces everything
        status, body = call(api, "PUT", "/v1/snapshot", {"clusters": [{"name": "only", "type": "EDS"}]})
        assert status == 200
        assert set(api.resources(CLUSTER)) == {"only"} and api.resources(ENDPOINT) == {}
        assert resource_names(s.recv()) == ["only"]
        status, st = call(api, "GET", "/v1/status")
        assert status == 200 and st == {"version": body["version"], "connected_streams": 1}
    finally:
        s.close()


def b_json_cla(name: str) -> dict:
    from google.protobuf import json_format

    return json_format.MessageToDict(b.assignment(name, [("127.0.0.1", 8080)]))


def test_errors(api: ControlPlane) -> None:
    status, body = call(api, "PUT", "/v1/resources", [{"@type": CLUSTER, "name": "ok"},
                                                      {"@type": "type.googleapis.com/x.Y", "name": "bad"}])
    assert status == 400 and "request body" in body["error"] and "resources[1]" in body["error"]
    assert api.resources(CLUSTER) == {}  # nothing applied
    status, body = call(api, "PUT", "/v1/resources", raw=b"{not json")
    assert status == 400 and "invalid YAML/JSON" in body["error"] and body["field"] == "(document)"
    status, body = call(api, "PUT", "/v1/snapshot", {"clusters": [{"name": "x", "connect_timeout": "never"}]})
    assert status == 400 and "clusters[0]" in body["error"]
    assert call(api, "GET", "/v1/resources/CDS/nope")[0] == 404
    assert call(api, "DELETE", "/v1/resources/CDS/nope")[0] == 404
    assert call(api, "GET", "/v1/resources/XDS/x")[0] == 404
    assert call(api, "GET", "/v2/whatever")[0] == 404
    assert call(api, "DELETE", "/v1/resources")[0] == 404
