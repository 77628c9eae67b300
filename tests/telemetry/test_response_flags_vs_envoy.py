"""Response codes and flags in the access log: meshcore against a real Envoy 1.40.

Envoy (a socket listener) and meshcore (an API listener) get the same routes, clusters, endpoints
and fault filter over ADS from meshcore's control plane, and the same misbehaving loopback
upstreams (503s, slow, refused, closed or reset connections, a one-request circuit breaker, a zero
retry budget). Each case is one request, named by its ``x-request-id``. Envoy's file access log
and meshcore's (``mesh.telemetry.enable_access_log``) use the same format strings; the line of
each case must be the same: ``%RESPONSE_CODE% %RESPONSE_FLAGS%``, the route and cluster, and
Istio's JSON format for every field meshcore knows (the others ``null``).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.request
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

import meshcore
from envoy.extensions.access_loggers.file.v3 import file_pb2  # noqa: F401  (the Any type in the HCM)
from interop.test_envoy_interop import AdsEnvoy, _until
from interop.test_resilience_vs_envoy import TARGET, fault_filters, with_hcm
from meshcore.controlplane import ControlPlane
from meshcore.controlplane import builders as b
from meshcore.telemetry.access_log import ISTIO_JSON_FORMAT
from meshcore.xds.client import Backoff
from meshcore.xds.resource_file import parse_resources
from resilience.test_lifecycle import Upstream, closed_port, send

pytestmark = pytest.mark.envoy

#: what both sides log for every request: compared field by field
FLAGS_FORMAT = "%REQ(X-REQUEST-ID)% %RESPONSE_CODE% %RESPONSE_FLAGS%\n"
ROUTE_FORMAT = "%REQ(X-REQUEST-ID)% %ROUTE_NAME% %UPSTREAM_CLUSTER% %REQ(:METHOD)% %REQ(:PATH)% %REQ(:AUTHORITY)%\n"
#: logged for the report only (meshcore's details are its own approximation of Envoy's)
DETAILS_FORMAT = "%REQ(X-REQUEST-ID)% %RESPONSE_CODE_DETAILS% %UPSTREAM_HOST% %UPSTREAM_REQUEST_ATTEMPT_COUNT%\n"
FORMATS = {"flags": FLAGS_FORMAT, "route": ROUTE_FORMAT, "details": DETAILS_FORMAT}

FAULT = "envoy.filters.http.fault"
FAULT_TYPE = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
BACKOFF = {"base_interval": "0.001s", "max_interval": "0.002s"}

#: case -> (request path, expected "code flags" on both sides: what Envoy 1.40 logs)
CASES: Dict[str, Tuple[str, str]] = {
    "ok": ("/ok", "200 -"),
    "upstream_503": ("/5xx", "503 -"),
    "no_route": ("/nowhere", "404 NR"),
    "no_healthy_upstream": ("/uh", "503 UH"),
    "connect_failure": ("/uf", "503 UF"),
    "connect_failure_retried": ("/uf-retry", "503 URX,UF"),
    "route_timeout": ("/ut", "504 UT"),
    "per_try_timeout_retried": ("/ut-try", "504 URX,UT"),
    "circuit_breaker_overflow": ("/uo", "503 UO"),
    "retry_overflow": ("/uo-retry", "503 UO"),
    "retries_exhausted": ("/urx", "503 URX"),
    "upstream_closed": ("/uc", "503 UC"),
    "upstream_closed_retried": ("/uc-retry", "503 URX,UC"),
    "upstream_reset": ("/rst", "503 UC"),
    "fault_delay": ("/di", "200 DI"),
    "fault_abort": ("/fi", "503 FI"),
    "fault_delay_and_abort": ("/difi", "503 DI,FI"),
}


class Dropper:
    """A loopback TCP server that reads a request head and then closes the connection without
    answering: with a FIN (``mode="close"``) or a TCP reset (``"rst"``, SO_LINGER 0)."""

    def __init__(self, mode: str) -> None:
        self.mode, self.hits = mode, 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            buf = b""
            conn.settimeout(2)
            try:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    buf += chunk
            except OSError:
                return
            self.hits += 1
            if self.mode == "rst":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    def close(self) -> None:
        self.sock.close()


def _fault(delay: bool, abort: bool) -> Dict[str, Any]:
    cfg: Dict[str, Any] = {"@type": FAULT_TYPE}
    if delay:
        cfg["delay"] = {"fixed_delay": "0.05s", "percentage": {"numerator": 100}}
    if abort:
        cfg["abort"] = {"http_status": 503, "percentage": {"numerator": 100}}
    return {FAULT: cfg}


def _route(name: str, prefix: str, cluster: str, fault: Optional[Dict[str, Any]] = None,
           **action: Any) -> Dict[str, Any]:
    r: Dict[str, Any] = {"name": name, "match": {"prefix": prefix}, "route": {"cluster": cluster, **action}}
    if fault is not None:
        r["typed_per_filter_config"] = fault
    return r


def _cluster(name: str, ports: List[int], **extra: Any) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    return ({"name": name, "type": "EDS", "connect_timeout": "0.5s", "lb_policy": "ROUND_ROBIN",
             "eds_cluster_config": {"eds_config": {"ads": {}}}, **extra},
            {"cluster_name": name, "endpoints": [{"locality": {"zone": "z"}, "lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
                for p in ports]}]})


def resources(ports: Dict[str, List[int]]) -> Dict[str, Any]:
    """Routes, clusters and endpoints of every case (``ports``: the upstreams per cluster)."""
    clusters = [
        _cluster("ok", ports["ok"]),
        _cluster("fail", ports["fail"]),
        _cluster("empty", []),
        _cluster("refused", ports["refused"]),
        _cluster("slow", ports["slow"]),
        _cluster("limited", ports["limited"], circuit_breakers={"thresholds": [{"max_requests": 1}]}),
        _cluster("no_budget", ports["fail"], circuit_breakers={"thresholds": [{"retry_budget": {
            "budget_percent": {"value": 0.0}, "min_retry_concurrency": 0}}]}),
        _cluster("close", ports["close"]),
        _cluster("rst", ports["rst"]),
    ]
    retry_5xx = {"retry_on": "5xx", "num_retries": 2, "retry_back_off": BACKOFF}
    routes = [
        _route("ok", "/ok", "ok"),
        _route("5xx", "/5xx", "fail"),
        _route("uh", "/uh", "empty"),
        _route("uf-retry", "/uf-retry", "refused",
               retry_policy={"retry_on": "connect-failure", "num_retries": 1, "retry_back_off": BACKOFF}),
        _route("uf", "/uf", "refused"),
        _route("ut-try", "/ut-try", "slow", timeout="3s",
               retry_policy={"retry_on": "5xx", "num_retries": 1, "per_try_timeout": "0.1s",
                             "retry_back_off": BACKOFF}),
        _route("ut", "/ut", "slow", timeout="0.2s"),
        _route("uo-retry", "/uo-retry", "no_budget", retry_policy=retry_5xx),
        _route("uo", "/uo", "limited"),
        _route("urx", "/urx", "fail", retry_policy=retry_5xx),
        _route("uc-retry", "/uc-retry", "close",
               retry_policy={"retry_on": "reset", "num_retries": 1, "retry_back_off": BACKOFF}),
        _route("uc", "/uc", "close"),
        _route("rst", "/rst", "rst"),
        _route("difi", "/difi", "ok", _fault(True, True)),
        _route("di", "/di", "ok", _fault(True, False)),
        _route("fi", "/fi", "ok", _fault(False, True)),
    ]
    return parse_resources({
        "routes": [{"name": "r", "virtual_hosts": [{"name": "shop", "domains": ["*"], "routes": routes}]}],
        "clusters": [c for c, _ in clusters],
        "endpoints": [e for _, e in clusters],
    })


def file_log(path: str, fmt: Any) -> Dict[str, Any]:
    log_format = {"json_format": fmt} if isinstance(fmt, dict) else {"text_format_source": {"inline_string": fmt}}
    return {"name": "envoy.access_loggers.file", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "path": path, "log_format": log_format}}


def envoy_get(port: int, path: str, request_id: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers={"Host": "shop.local", "x-request-id": request_id})
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def mesh_get(mesh: meshcore.Mesh, path: str, request_id: str) -> Any:
    try:
        return mesh.request("http://shop.local" + path, headers={"x-request-id": request_id}).run(send).status_code
    except Exception as e:  # noqa: BLE001  (the request's failure, raised: its line is what counts)
        return type(e).__name__


def run_cases(get: Any, slow_limited: Upstream) -> None:
    """Every case once; the circuit breaker case while another request holds the cluster's one
    request slot (its slow upstream has seen it)."""
    for case, (path, _) in CASES.items():
        if case == "circuit_breaker_overflow":
            hits = slow_limited.hits
            held = threading.Thread(target=get, args=(path, "held"))
            held.start()
            deadline = time.monotonic() + 5
            while slow_limited.hits == hits and time.monotonic() < deadline:
                time.sleep(0.005)
            get(path, case)
            held.join()
        else:
            get(path, case)


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def by_request_id(lines: List[str], json_lines: bool = False) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for line in lines:
        if json_lines:
            obj = json.loads(line)
            out[obj["request_id"]] = obj
        elif line.strip():
            rid, _, rest = line.strip().partition(" ")
            out[rid] = rest
    return out


def read_envoy_logs(paths: Dict[str, str], envoy: AdsEnvoy) -> Dict[str, Dict[str, Any]]:
    """Envoy's lines per log, once every case is there (admin ``/reopen_logs`` flushes the files,
    which Envoy otherwise writes out every 10 s)."""
    urllib.request.urlopen(urllib.request.Request(envoy.admin_url + "/reopen_logs", method="POST"), timeout=3).read()
    deadline = time.monotonic() + 5
    while True:
        logs = {}
        for name, p in paths.items():
            lines = open(p).read().splitlines() if os.path.exists(p) else []
            logs[name] = by_request_id(lines, name == "json")
        if all(set(CASES) <= set(v) for v in logs.values()):
            return logs
        if time.monotonic() > deadline:
            raise AssertionError(f"Envoy's access logs lack cases: {logs}\n{envoy.envoy_log()[-3000:]}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def logs() -> Iterator[Dict[str, Dict[str, Dict[str, Any]]]]:
    """``{"envoy"|"meshcore": {log name: {request id: line}}}`` for every case."""
    ups = {"ok": [Upstream("ok", "ok")], "fail": [Upstream("f0", "fail"), Upstream("f1", "fail")],
           "slow": [Upstream("s0", "slow", delay=0.6)], "limited": [Upstream("l0", "slow", delay=0.6)]}
    droppers = {"close": Dropper("close"), "rst": Dropper("rst")}
    ports = {k: [u.port for u in v] for k, v in ups.items()}
    ports.update({k: [d.port] for k, d in droppers.items()})
    ports["refused"] = [closed_port()]
    res = resources(ports)
    filters = fault_filters({})
    tmp = tempfile.mkdtemp(prefix="meshcore-flags-")
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    try:
        paths = {name: os.path.join(tmp, f"{name}.log") for name in (*FORMATS, "json")}
        access_logs = [file_log(paths[name], fmt) for name, fmt in FORMATS.items()]
        access_logs.append(file_log(paths["json"], ISTIO_JSON_FORMAT))
        with ControlPlane() as cp:
            cp.set_resources([with_hcm(b.http_listener("ingress", 0, route_config_name="r", stat_prefix="ingress",
                                                       filters=filters), {"access_log": access_logs}),
                              *[m for t in res.values() for m in t.values()]])
            with AdsEnvoy(cp.port, "GRPC", "envoy-flags") as envoy:
                port = _until(lambda: envoy.listener_port("ingress"), "listener", envoy, cp)
                _until(lambda: envoy_get(port, "/ok", "warmup") == 200, "the routes", envoy, cp)
                run_cases(lambda path, rid: envoy_get(port, path, rid), ups["limited"][0])
                out["envoy"] = read_envoy_logs(paths, envoy)

        with ControlPlane() as cp:
            cp.set_resources([b.api_listener(TARGET, route_config_name="r", filters=filters),
                              *[m for t in res.values() for m in t.values()]])
            boot = {"xds_servers": [{"server_uri": cp.address, "channel_creds": [{"type": "insecure"}]}],
                    "node": {"id": "mesh-flags"}}
            handlers = {name: ListHandler() for name in (*FORMATS, "json")}
            with meshcore.Mesh(boot, backoff=Backoff(0.05, 1.6, 0.2, 0.5)) as mesh:
                mesh.wait_ready(TARGET, timeout=10)
                sinks = []
                for name, h in handlers.items():
                    logger = logging.getLogger(f"meshcore.access.test.{name}")
                    logger.addHandler(h)
                    logger.setLevel(logging.INFO)
                    logger.propagate = False
                    sinks.append(mesh.telemetry.enable_access_log(
                        ISTIO_JSON_FORMAT if name == "json" else FORMATS[name], logger=logger))
                try:
                    run_cases(lambda path, rid: mesh_get(mesh, path, rid), ups["limited"][0])
                finally:
                    for s in sinks:
                        mesh.telemetry.remove_sink(s)
                    for name, h in handlers.items():
                        logging.getLogger(f"meshcore.access.test.{name}").removeHandler(h)
            out["meshcore"] = {name: by_request_id(h.lines, name == "json") for name, h in handlers.items()}
        yield out
    finally:
        for group in (*ups.values(),):
            for u in group:
                u.close()
        for d in droppers.values():
            d.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _where(logs: Dict[str, Any], case: str) -> str:
    return "\n".join(f"{side:8} {name:7} {logs[side][name].get(case)}" for side in ("envoy", "meshcore")
                     for name in (*FORMATS, "json"))


@pytest.mark.parametrize("case", list(CASES))
def test_response_code_and_flags_match_envoy(logs: Dict[str, Any], case: str) -> None:
    envoy, ours = logs["envoy"], logs["meshcore"]
    assert envoy["flags"][case] == CASES[case][1], _where(logs, case)  # the case is what it says
    assert ours["flags"].get(case) == envoy["flags"][case], _where(logs, case)


@pytest.mark.parametrize("case", list(CASES))
def test_route_and_cluster_match_envoy(logs: Dict[str, Any], case: str) -> None:
    assert logs["meshcore"]["route"].get(case) == logs["envoy"]["route"][case], _where(logs, case)


#: Istio JSON fields meshcore knows (the others are Envoy's downstream connection, upstream TLS,
#: timings it does not measure, the client's protocol: null)
KNOWN_JSON = ("authority", "method", "path", "request_id", "response_code", "response_flags", "route_name",
              "upstream_cluster")


@pytest.mark.parametrize("case", list(CASES))
def test_istio_json_line_matches_envoy(logs: Dict[str, Any], case: str) -> None:
    envoy, ours = logs["envoy"]["json"][case], logs["meshcore"]["json"].get(case)
    assert ours is not None and set(ours) == set(envoy), _where(logs, case)
    for key in KNOWN_JSON:
        assert ours[key] == envoy[key], (key, _where(logs, case))
    for key in ("bytes_received", "bytes_sent", "duration"):
        assert type(ours[key]) is type(envoy[key]) is int, (key, _where(logs, case))
    assert isinstance(ours["start_time"], str) and len(ours["start_time"]) == len(envoy["start_time"])
