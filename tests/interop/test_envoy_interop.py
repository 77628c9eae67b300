"""A real Envoy 1.40 against meshcore's control plane over ADS (SotW ``GRPC`` and ``DELTA_GRPC``).

The control plane serves a socket Listener (HCM with RDS) + RouteConfiguration + EDS Cluster +
ClusterLoadAssignment pointing at small HTTP upstreams run by the test (each answers with its own
name). Real HTTP requests through Envoy must reach the right upstream; the history must show Envoy
ACKing every type; route and endpoint pushes must move traffic; an invalid Cluster must be NACKed
while traffic keeps flowing on the last good config.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest
from envoy_process import EnvoyProcess, find_envoy, socket_address

from meshcore.controlplane import ControlPlane
from meshcore.controlplane import builders as b
from meshcore.xds.model import CLUSTER, ENDPOINT, LISTENER, ROUTE, SHORT_NAMES

pytestmark = pytest.mark.envoy

LISTENER_NAME = "listener_0"


class _Upstream:
    """A threaded HTTP/1.1 server on 127.0.0.1 answering every GET with its name."""

    def __init__(self, name: str) -> None:
        body = name.encode()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class AdsEnvoy(EnvoyProcess):
    """An Envoy whose listeners, routes, clusters and endpoints all come from ADS."""

    def __init__(self, xds_port: int, api_type: str, node_id: str) -> None:
        self.bootstrap: Dict[str, Any] = {
            "node": {"id": node_id, "cluster": "meshcore-test"},
            "admin": {"address": socket_address(0)},
            "dynamic_resources": {
                "ads_config": {
                    "api_type": api_type, "transport_api_version": "V3", "set_node_on_first_message_only": True,
                    "grpc_services": [{"envoy_grpc": {"cluster_name": "xds_cluster"}}],
                },
                "lds_config": {"ads": {}, "resource_api_version": "V3"},
                "cds_config": {"ads": {}, "resource_api_version": "V3"},
            },
            "static_resources": {"clusters": [{
                "name": "xds_cluster", "type": "STATIC", "connect_timeout": "1s",
                "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}}},
                "load_assignment": {"cluster_name": "xds_cluster", "endpoints": [
                    {"lb_endpoints": [{"endpoint": {"address": socket_address(xds_port)}}]}]},
            }]},
        }
        self.envoy_bin = find_envoy()
        self.log_level = "warning"
        self.startup_timeout = 30.0
        self.keep_tmp = False
        self.tmpdir: Optional[str] = None
        self.admin_url: Optional[str] = None
        self._envoy = None
        self._log_path = ""

    def _start(self) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="meshcore-ads-envoy-")
        cfg = os.path.join(self.tmpdir, "envoy.json")
        with open(cfg, "w") as f:
            json.dump(self.bootstrap, f)
        self._run_envoy(cfg)

    def close(self) -> None:
        self._stop(None)

    def listener_port(self, name: str) -> int:
        ports, body = self._listener_ports()
        if not ports.get(name):
            raise AssertionError(f"no listener {name!r} in Envoy:\n{body}")
        return ports[name]


def _get(port: int, path: str = "/", headers: Optional[Dict[str, str]] = None) -> tuple:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=3) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _until(check: Callable[[], Any], what: str, envoy: AdsEnvoy, cp: ControlPlane, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (OSError, AssertionError) as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})\nEnvoy log:\n{envoy.envoy_log()[-3000:]}\n"
                         f"history:\n" + "\n".join(_describe(e) for e in cp.history[-30:]))


def _describe(e: Dict[str, Any]) -> str:
    return (f"{e['stream']} {e['dir']} {SHORT_NAMES.get(e['type_url'], e['type_url'])} v={e['version_info']!r} "
            f"nonce={e['nonce']!r} names={e['names']} removed={e['removed']} err={e['error_detail']}")


def _resources(a_port: int) -> List[Any]:
    return [
        b.http_listener(LISTENER_NAME, 0, route_config_name="local_route", stat_prefix="ingress"),
        b.route_config("local_route", [b.virtual_host("local", ["*"], [
            b.route(prefix="/", cluster="upstream", name="default")])]),
        b.cluster("upstream", eds_service_name="upstream_eds"),
        b.assignment("upstream_eds", [("127.0.0.1", a_port)]),
    ]


def _assert_acked(cp: ControlPlane, stream: int, mode: str, type_url: str, since: int = 0) -> None:
    """Every response of ``type_url`` on ``stream`` (from history index ``since``) gets an ACK."""
    responses = [e for e in cp.history[since:]
                 if e["dir"] == "resp" and e["stream"] == stream and e["type_url"] == type_url]
    assert responses, f"no {SHORT_NAMES[type_url]} response on stream {stream}"
    for resp in responses:
        def is_ack(e: Dict[str, Any], resp: Dict[str, Any] = resp) -> bool:
            return (e["dir"] == "req" and e["stream"] == stream and e["type_url"] == type_url
                    and e["nonce"] == resp["nonce"])
        ack = cp.wait_for(is_ack, timeout=10, start=since)
        assert ack["error_detail"] is None, f"{SHORT_NAMES[type_url]} NACKed: {ack['error_detail']}"
        if mode == "sotw":
            assert ack["version_info"] == resp["version_info"]


@pytest.fixture
def upstreams() -> Iterator[Dict[str, _Upstream]]:
    ups = {"A": _Upstream("A"), "B": _Upstream("B")}
    yield ups
    for u in ups.values():
        u.close()


@pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC"])
def test_envoy_over_ads(api_type: str, upstreams: Dict[str, _Upstream]) -> None:
    mode = "sotw" if api_type == "GRPC" else "delta"
    node_id = f"envoy-{mode}"
    with ControlPlane() as cp:
        cp.set_resources(_resources(upstreams["A"].port))
        with AdsEnvoy(cp.port, api_type, node_id) as envoy:  # ready = initial CDS and LDS applied
            port = _until(lambda: envoy.listener_port(LISTENER_NAME), "the ADS listener", envoy, cp)
            _until(lambda: _get(port) == (200, "A"), "traffic to upstream A", envoy, cp)

            first = cp.wait_for(lambda e: e["dir"] == "req" and e["node"] is not None)
            assert first["node"]["id"] == node_id and first["mode"] == mode
            assert first["type_url"] == CLUSTER  # Envoy starts with CDS
            stream = first["stream"]
            for type_url in (CLUSTER, ENDPOINT, LISTENER, ROUTE):
                _assert_acked(cp, stream, mode, type_url)
            assert {e["stream"] for e in cp.history} == {stream}  # one ADS stream for everything

            # route change: a header-matched route to a new cluster (B); CDS/EDS pushed before RDS
            mark = len(cp.history)
            cp.update([
                b.cluster("upstream_b", eds_service_name="upstream_b_eds"),
                b.assignment("upstream_b_eds", [("127.0.0.1", upstreams["B"].port)]),
                b.route_config("local_route", [b.virtual_host("local", ["*"], [
                    b.route(prefix="/", headers={"x-target": "b"}, cluster="upstream_b", name="to-b"),
                    b.route(prefix="/", cluster="upstream", name="default")])]),
            ])
            _until(lambda: _get(port, headers={"x-target": "b"}) == (200, "B"), "header route to B", envoy, cp)
            assert _get(port) == (200, "A")
            pushed = [e["type_url"] for e in cp.history[mark:] if e["dir"] == "resp"]
            assert pushed[:3] == [CLUSTER, ENDPOINT, ROUTE] or pushed[:2] == [CLUSTER, ROUTE], pushed
            for type_url in (CLUSTER, ROUTE):
                _assert_acked(cp, stream, mode, type_url, since=mark)

            # endpoint change: the default cluster now points at B
            mark = len(cp.history)
            cp.update([b.assignment("upstream_eds", [("127.0.0.1", upstreams["B"].port)])])
            _until(lambda: _get(port) == (200, "B"), "EDS move to B", envoy, cp)
            eds = [e for e in cp.history[mark:] if e["dir"] == "resp"]
            assert [(e["type_url"], e["names"]) for e in eds] == [(ENDPOINT, ["upstream_eds"])]
            _assert_acked(cp, stream, mode, ENDPOINT, since=mark)

            # an invalid cluster is NACKed; traffic keeps flowing on the last good config
            mark = len(cp.history)
            cp.update([b.cluster("upstream", eds_service_name="upstream_eds", connect_timeout=-1)])
            bad = cp.wait_for(lambda e: e["dir"] == "resp" and e["type_url"] == CLUSTER, start=mark)
            nack = cp.wait_for(lambda e: e["dir"] == "req" and e["type_url"] == CLUSTER and e["nonce"] == bad["nonce"],
                               timeout=10, start=mark)
            assert nack["error_detail"] is not None and nack["error_detail"]["code"] != 0
            assert nack["error_detail"]["message"]
            if mode == "sotw":  # NACK carries the last accepted version
                assert nack["version_info"] != bad["version_info"]
            for _ in range(5):
                assert _get(port) == (200, "B")
                assert _get(port, headers={"x-target": "b"}) == (200, "B")
            # the server does not resend the rejected config by itself
            time.sleep(0.2)
            assert not [e for e in cp.history[mark:] if e["dir"] == "resp" and e["nonce"] != bad["nonce"]]
