"""A real Envoy as an oracle for route ``hash_policy``: which upstream host a RING_HASH / MAGLEV
cluster picks for a request, given a RouteConfiguration whose route carries a ``hash_policy`` list.

Usage::

    from hash_policy_oracle import HashPolicyOracle, Send, route_config
    from route_oracle import Request

    rc = route_config("hp_cookie", "ring", [{"cookie": {"name": "sid"}}])
    with HashPolicyOracle(
        clusters={"ring": {"policy": "RING_HASH"}, "maglev": {"policy": "MAGLEV"}},   # build_xds options
        n_hosts=20,
        listeners={"cookie": (rc, {})},     # name -> (RouteConfiguration, extra HCM fields)
    ) as oracle:
        oracle.route_configs["cookie"]                     # the RouteConfiguration Envoy was given
        oracle.clusters["ring"], oracle.clas["ring"]       # the Cluster / ClusterLoadAssignment dicts
        a = oracle.send("cookie", Send(Request("svc", "/", headers=[("cookie", "sid=1")])))
        a.host                                             # "ip:port" that answered (None: 503 UH)
        a.headers                                          # Envoy's response headers (Set-Cookie...)

What it does (built from the shared pieces of the other oracles):

* ONE upstream helper (``envoy_oracle.py --serve-upstreams``) serves every host address
  (``127.<base>.0.<2+i>``, ports picked by the OS); each answers with ``x-served-by: ip:port``.
* every cluster is :func:`envoy_oracle.build_xds` over the same hosts (weights ``1 + i % 3``), so
  ``LoadBalancer.from_xds(cluster, cla)`` gets exactly what Envoy got;
* one plain-text HTTP/1 listener per RouteConfiguration (HCM with the config inline, optional HCM
  fields such as ``use_remote_address``), router filter only; Envoy runs with
  ``--concurrency 1``; ``--mode validate`` first;
* every RouteConfiguration adds ``x-upstream-host: %UPSTREAM_HOST%`` and ``x-response-flags:
  %RESPONSE_FLAGS%`` response headers (response headers do not affect routing or hashing), which
  are cross-checked against the upstream's own ``x-served-by``;
* requests go over raw sockets byte for byte (:class:`route_oracle.Request` wire format: repeated
  header names, several ``Cookie`` headers, any ``Host``), keep-alive per (listener, source
  address); ``Send.source_ip`` binds the client socket to that loopback address, so Envoy's
  downstream address (what ``connection_properties.source_ip`` hashes) is chosen by the test.
* nothing is retried upstream (no retry policy; ``upstream_rq_retry`` is checked to stay 0).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.parse
from typing import Any, Mapping

import envoy_oracle
from envoy_oracle import EndpointSpec, build_xds
from envoy_process import ConnectionClosedEarly, EnvoyProcess, helper_reply, http_get, http_listener, parse_head
from envoy_process import close_sockets, recv_some, socket_address, spawn_helper, tail, validate_config
from route_oracle import Request

__all__ = ["Answer", "HashPolicyError", "HashPolicyConfigError", "HashPolicyOracle", "Send", "route_config"]

SERVED_BY_HEADER = "x-served-by"
UPSTREAM_HOST_HEADER = "x-upstream-host"
FLAGS_HEADER = "x-response-flags"


class HashPolicyError(RuntimeError):
    """The harness failed (Envoy died, an answer is inconsistent...)."""


class HashPolicyConfigError(HashPolicyError):
    """Envoy rejected the bootstrap."""


@dataclasses.dataclass(frozen=True)
class Send:
    """One request as sent: ``source_ip`` = the client socket's loopback source address."""

    request: Request
    source_ip: str = "127.0.0.1"


@dataclasses.dataclass
class Answer:
    status: int
    host: str | None  # the upstream "ip:port" that answered; None = 503 no healthy upstream
    headers: list[tuple[str, str]]
    client: str = ""  # the client socket's "ip:port" (Envoy's downstream remote address)
    listener: str = ""  # the listener's "ip:port" (Envoy's downstream local address)


def route_config(name: str, cluster: str, hash_policy: list, route_fields: Mapping[str, Any] | None = None,
                 **action_extra: Any) -> dict:
    """A RouteConfiguration: one virtual host ``*``, one route ``prefix: /`` to ``cluster`` with
    ``hash_policy`` (plus ``action_extra`` RouteAction fields and ``route_fields`` Route fields),
    and the response headers that identify the upstream host."""
    action: dict[str, Any] = {"cluster": cluster, "hash_policy": hash_policy, "timeout": "10s"}
    action.update(action_extra)
    route: dict[str, Any] = {"name": "r", "match": {"prefix": "/"}, "route": action}
    route.update(route_fields or {})
    return {
        "name": name,
        "virtual_hosts": [
            {
                "name": "vh",
                "domains": ["*"],
                "routes": [route],
            }
        ],
        "response_headers_to_add": [
            {"header": {"key": UPSTREAM_HOST_HEADER, "value": "%UPSTREAM_HOST%"}},
            {"header": {"key": FLAGS_HEADER, "value": "%RESPONSE_FLAGS%"}},
        ],
    }


class HashPolicyOracle(EnvoyProcess):
    """Context manager: the upstream hosts + one Envoy with the clusters and one listener per
    RouteConfiguration."""

    error = HashPolicyError
    config_error = HashPolicyConfigError

    def __init__(
        self,
        *,
        clusters: Mapping[str, Mapping[str, Any]],
        listeners: Mapping[str, tuple[dict, Mapping[str, Any]]],
        n_hosts: int = 20,
        address_base: int = 90,
        envoy_bin: str | None = None,
        log_level: str = "warning",
        startup_timeout: float = 30.0,
        keep_tmp: bool = False,
    ) -> None:
        """``clusters``: name -> :func:`envoy_oracle.build_xds` options (``policy=...``);
        ``listeners``: name -> (RouteConfiguration dict, extra HCM fields)."""
        self.cluster_options = {k: dict(v) for k, v in clusters.items()}
        self.route_configs = {k: json.loads(json.dumps(rc)) for k, (rc, _) in listeners.items()}
        self.hcm_extras = {k: dict(extra) for k, (_, extra) in listeners.items()}
        self.n_hosts = n_hosts
        self.address_base = address_base
        self.envoy_bin = envoy_bin or envoy_oracle.find_envoy()
        self.log_level = log_level
        self.startup_timeout = startup_timeout
        self.keep_tmp = keep_tmp
        self.clusters: dict[str, dict] = {}
        self.clas: dict[str, dict] = {}
        self.hosts: list[str] = []
        self.tmpdir: str | None = None
        self.admin_url: str | None = None
        self.ports: dict[str, int] = {}
        self.bootstrap: dict | None = None
        self.timings: dict[str, float] = {}
        self.requests_sent = 0
        self._envoy: subprocess.Popen | None = None
        self._servers: subprocess.Popen | None = None
        self._socks: dict[tuple[str, str], list] = {}
        self._log_path = ""

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        close_sockets(self._socks)
        self._stop(self._servers)
        self._envoy = self._servers = None

    def _start(self) -> None:
        t0 = time.monotonic()
        self.tmpdir = tempfile.mkdtemp(prefix="hash-policy-oracle-")
        addrs = [f"127.{self.address_base}.{i // 250}.{2 + i % 250}" for i in range(self.n_hosts)]
        self._servers = spawn_helper(envoy_oracle.__file__, "--serve-upstreams")
        assert self._servers.stdin is not None
        self._servers.stdin.write((json.dumps([[a, 0] for a in addrs]) + "\n").encode())
        self._servers.stdin.flush()
        got = json.loads(helper_reply(self._servers, "upstream server", HashPolicyError))
        if "error" in got:
            raise HashPolicyError(f"upstream server helper: {got['error']}")
        bound = [tuple(x) for x in got["bound"]]
        self.hosts = [f"{a}:{p}" for a, p in bound]
        self.timings["servers"] = time.monotonic() - t0

        for name, opts in self.cluster_options.items():
            specs = [EndpointSpec(a, p, weight=1 + i % 3) for i, (a, p) in enumerate(bound)]
            self.clusters[name], self.clas[name] = build_xds(specs, cluster_name=name, **opts)
        listeners = []
        for name, rc in self.route_configs.items():
            ls = http_listener(name, rc)
            ls["filter_chains"][0]["filters"][0]["typed_config"].update(self.hcm_extras[name])
            listeners.append(ls)
        self.bootstrap = {
            "node": {"id": "meshcore-hash-policy-oracle", "cluster": "meshcore-hash-policy-oracle"},
            "admin": {"address": socket_address(0)},
            "static_resources": {"listeners": listeners, "clusters": list(self.clusters.values())},
        }
        cfg = os.path.join(self.tmpdir, "envoy.json")
        with open(cfg, "w") as f:
            json.dump(self.bootstrap, f, indent=1)
        t1 = time.monotonic()
        r = validate_config(self.envoy_bin, cfg, self.tmpdir, "warning")
        self.timings["validate"] = time.monotonic() - t1
        if r.returncode != 0:
            raise HashPolicyConfigError(
                f"envoy --mode validate rejected the config (rc={r.returncode}):\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
            )
        t2 = time.monotonic()
        self._run_envoy(cfg)
        ports, body = self._listener_ports()
        self.ports = {n: ports[n] for n in self.route_configs if n in ports}
        missing = sorted(set(self.route_configs) - set(self.ports))
        if missing:
            raise HashPolicyError(f"listeners {missing} not found in admin /listeners: {body[:2000]}")
        self.timings["envoy_start"] = time.monotonic() - t2
        self.timings["total_start"] = time.monotonic() - t0

    # -- queries ---------------------------------------------------------------------------

    def send(self, listener: str, s: Send) -> Answer:
        """Send one request on ``listener`` from ``s.source_ip``; which host answered."""
        key = (listener, s.source_ip)
        data = s.request.wire()
        for attempt in (0, 1):
            entry = self._socks.get(key)
            fresh = entry is None
            if entry is None:
                sock = socket.create_connection(
                    ("127.0.0.1", self.ports[listener]), timeout=15, source_address=(s.source_ip, 0)
                )
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                entry = self._socks[key] = [sock, b""]
            sock, buf = entry
            try:
                sock.sendall(data)
                status, headers, body, rest = self._read_response(sock, buf)
            except (ConnectionClosedEarly, BrokenPipeError, ConnectionResetError):
                # Envoy closed the idle keep-alive connection: reconnect once (the request never
                # reached the router).
                sock.close()
                del self._socks[key]
                if fresh or attempt or (self._envoy is not None and self._envoy.poll() is not None):
                    raise HashPolicyError(f"request {s} failed; envoy log:\n{tail(self._log_path)}")
                continue
            entry[1] = rest
            self.requests_sent += 1
            client, listener_addr = "%s:%d" % sock.getsockname()[:2], "%s:%d" % sock.getpeername()[:2]
            if any(k == "connection" and v.lower() == "close" for k, v in headers):
                sock.close()
                del self._socks[key]
            return Answer(status, self._classify(s, status, headers, body), headers, client, listener_addr)
        raise AssertionError("unreachable")

    def _read_response(self, sock: socket.socket, buf: bytes) -> tuple[int, list[tuple[str, str]], bytes, bytes]:
        got_any = bool(buf)
        while (end := buf.find(b"\r\n\r\n")) < 0:
            buf += recv_some(sock, buf, got_any, HashPolicyError)
            got_any = True
        status, headers = parse_head(buf[:end], HashPolicyError)
        hd = dict(headers)
        if "transfer-encoding" in hd:
            raise HashPolicyError(f"unexpected transfer-encoding response: {headers}")
        need = end + 4 + int(hd.get("content-length", "0"))
        while len(buf) < need:
            buf += recv_some(sock, buf, True, HashPolicyError)
        return status, headers, buf[end + 4 : need], buf[need:]

    def _classify(self, s: Send, status: int, headers: list[tuple[str, str]], body: bytes) -> str | None:
        hd = dict(headers)
        served, uh, flags = hd.get(SERVED_BY_HEADER), hd.get(UPSTREAM_HOST_HEADER), hd.get(FLAGS_HEADER)
        if status == 200 and served:
            if uh != served or body.decode() != served:
                raise HashPolicyError(f"{s}: upstream says {served}, envoy says {uh}, body {body!r}")
            if served not in self.hosts:
                raise HashPolicyError(f"{s}: answered by unknown host {served}")
            return served
        if status == 503 and flags and "UH" in flags.split(","):
            return None
        raise HashPolicyError(f"{s}: unexpected response {status} {headers} {body[:300]!r}")

    def upstream_retries(self) -> int:
        status, body = http_get(self.admin_url + "/stats?filter=" + urllib.parse.quote(r"\.upstream_rq_retry$"))
        if status != 200:
            raise HashPolicyError(f"admin /stats: HTTP {status}: {body[:300]}")
        return sum(int(line.rpartition(": ")[2]) for line in body.splitlines() if line.strip())
