"""What ``import meshcore`` and ``meshcore.Mesh`` load: no grpc until something needs it (an xDS
client's stream, CSDS, TLS credentials); a file-fed mesh routes without it."""

from __future__ import annotations

import json
import subprocess
import sys


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_meshcore_loads_no_grpc_protobuf_or_asyncio():
    got = _run("import sys, json, meshcore; "
               "print(json.dumps({m: m in sys.modules for m in ('grpc', 'google.protobuf', 'asyncio')}))")
    assert got == {"grpc": False, "google.protobuf": False, "asyncio": False}


def test_mesh_class_and_file_mesh_load_no_grpc(tmp_path):
    res = tmp_path / "res.json"
    res.write_text(json.dumps({
        "listeners": [{"name": "a.svc:80", "api_listener": {"api_listener": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                     ".HttpConnectionManager",
            "route_config": {"name": "r", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
                {"match": {"prefix": "/"}, "route": {"cluster": "c"}}]}]},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}}],
        "clusters": [{"name": "c", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
            "cluster_name": "c", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": 9}}}}]}]}}]}))
    got = _run("import sys, json, meshcore; meshcore.Mesh; a = 'grpc' in sys.modules; "
               f"m = meshcore.Mesh.from_file({str(res)!r}, watch=False); m.wait_ready('a.svc:80', 5); "
               "p = m.pick('a.svc:80', '/x'); p.done(); b = 'grpc' in sys.modules; d = m.config_dump(); m.close(); "
               "print(json.dumps({'class': a, 'file_mesh': b, "
               "'endpoint': p.endpoint.key, 'dump': bool(d)}))")
    assert got == {"class": False, "file_mesh": False, "endpoint": "127.0.0.1:9", "dump": True}
