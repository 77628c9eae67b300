"""Smoke test of an installed meshcore-xds, run by the installed interpreter from a directory
outside the source tree: the compiled core is live, a Mesh built from a resource file makes real
routing and balancing decisions, and ``meshcore --version`` reports the distribution's version.

Usage: VENV/bin/python smoke_installed.py   (from any directory but the checkout)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from importlib.metadata import distribution

import meshcore
from meshcore import _fast

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
TARGET = "reviews.local:9080"


def _endpoints(cluster: str, ports: list) -> dict:
    return {"cluster_name": cluster, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}} for p in ports]}]}


def resources() -> dict:
    """One listener; /v2 goes to cluster v2, the rest round-robins over v1's two endpoints."""
    eds = {"type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}}, "lb_policy": "ROUND_ROBIN"}
    return {
        "listeners": [{"name": TARGET, "api_listener": {"api_listener": {
            "@type": HCM, "rds": {"config_source": {"ads": {}}, "route_config_name": "reviews"},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}]}}}],
        "routes": [{"name": "reviews", "virtual_hosts": [{"name": "reviews", "domains": ["reviews.local", TARGET],
                    "routes": [{"name": "v2", "match": {"prefix": "/v2"}, "route": {"cluster": "v2"}},
                               {"name": "default", "match": {"prefix": "/"}, "route": {"cluster": "v1"}}]}]}],
        "clusters": [dict(eds, name="v1"), dict(eds, name="v2")],
        "endpoints": [_endpoints("v1", [9001, 9002]), _endpoints("v2", [9003])],
    }


def check_installed() -> str:
    dist = distribution("meshcore-xds")
    here = os.path.realpath(meshcore.__file__)
    assert here.startswith(os.path.realpath(sys.prefix) + os.sep), f"meshcore imported from {here}, not the venv"
    assert meshcore.IMPLEMENTATION == "c" and _fast.IMPLEMENTATION == "c", meshcore.IMPLEMENTATION
    mods = (meshcore.LoadBalancer.__module__, meshcore.RouteTable.__module__)
    assert mods == ("meshcore._fast.lb_c", "meshcore._fast.routes_c"), mods
    assert dist.version == meshcore.__version__, (dist.version, meshcore.__version__)
    return dist.version


def check_routing(workdir: str) -> list:
    path = os.path.join(workdir, "mesh.json")
    with open(path, "w") as f:
        json.dump(resources(), f)
    with meshcore.Mesh.from_file(path, watch=False) as mesh:
        mesh.wait_ready(TARGET, timeout=10)
        seen = []
        for p in ("/v2/books", "/reviews/1", "/reviews/2", "/reviews/3"):
            pick = mesh.pick(TARGET, p)
            seen.append((p, pick.route_name, pick.cluster, pick.endpoint.port))
            pick.done()
    assert seen[0][1:] == ("v2", "v2", 9003), seen
    assert {s[2] for s in seen[1:]} == {"v1"} and {s[3] for s in seen[1:]} == {9001, 9002}, seen
    assert seen[1][3] != seen[2][3], seen  # round robin alternates
    return seen


def check_cli(version: str) -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "meshcore")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    assert out == f"meshcore {version} (c)", out
    return out


def main() -> int:
    version = check_installed()
    with tempfile.TemporaryDirectory() as workdir:
        seen = check_routing(workdir)
    cli = check_cli(version)
    print(f"smoke: meshcore-xds {version} from {os.path.dirname(meshcore.__file__)}", file=sys.stderr)
    print(f"smoke: picks {seen}", file=sys.stderr)
    print(f"smoke: `meshcore --version` -> {cli!r}: ok", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
