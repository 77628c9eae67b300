"""A real Envoy configured like an Istio STRICT sidecar *inbound* on an auto-detected port
(``security.md`` §3.1-3.3, §6.3), in front of an app on loopback.

Listener ``virtualInbound`` on 127.0.0.1 (port picked by Envoy, read back from admin), with a
``tls_inspector`` and two filter chains:

* :data:`HTTP_CHAIN` ``inbound-http-mtls``: ``{transport_protocol: tls, application_protocols:
  [istio-http/1.0, istio-http/1.1, istio-h2]}`` -> HCM (codec AUTO, XFCC ``APPEND_FORWARD`` +
  ``set_current_client_cert_details {subject, dns, uri}``, response header ``x-inbound-chain:
  %FILTER_CHAIN_NAME%``, RBAC ALLOW on the source principal, router). Server ALPN ``[h2, http/1.1]``.
* :data:`TCP_CHAIN` ``inbound-tcp-mtls``: ``{transport_protocol: tls}`` -> tcp_proxy. Server
  ALPN ``[istio-peer-exchange, h2, http/1.1]``.

Both: ``require_client_certificate``, the sidecar's cert/key from an Istio-layout directory,
``trusted_ca`` its ``root-cert.pem``, ``match_typed_subject_alt_names: URI prefix spiffe://<td>/``
per trusted trust domain, TLS 1.2-1.3 with Istio's cipher list.

The app is :class:`EchoApp` (threaded HTTP/1.1 in this process: 200 + JSON echo of path, method,
Host, ``x-forwarded-client-cert``) unless ``app_port`` is given (e.g. a grpcio server; pass
``app_http2=True`` so the app cluster speaks HTTP/2).

The process lifecycle (temp dir, admin on a port Envoy picks, ``/ready`` wait, dynamic
``--base-id``, ``--concurrency 1``, PDEATHSIG, kill by PID) is ``tests/envoy_process.py``'s
:class:`EnvoyProcess`.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Sequence, Tuple

from envoy_process import HCM_TYPE, LOOPBACK, ROUTER_TYPE, EnvoyProcess, find_envoy, socket_address, validate_config

from .pki import TRUST_DOMAIN, CertPaths, spiffe_id

HTTP_CHAIN = "inbound-http-mtls"
TCP_CHAIN = "inbound-tcp-mtls"
LISTENER_NAME = "virtualInbound"
APP_CLUSTER = "inbound|app"

# What a sidecar client sends (security.md §3.1); meshcore should send exactly these.
ALPN_HTTP10 = ("istio-http/1.0", "istio", "http/1.0")
ALPN_HTTP11 = ("istio-http/1.1", "istio", "http/1.1")
ALPN_H2 = ("istio-h2", "istio", "h2")
ALPN_TCP = ("istio-peer-exchange", "istio")
HTTP_CHAIN_ALPNS = ["istio-http/1.0", "istio-http/1.1", "istio-h2"]

ACCESS_LOG_FORMAT = "%FILTER_CHAIN_NAME% %RESPONSE_CODE% %DOWNSTREAM_PEER_URI_SAN% %REQUESTED_SERVER_NAME%\n"
ISTIO_CIPHERS = [
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256", "AES256-GCM-SHA384", "AES128-GCM-SHA256",
]

TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
TCP_PROXY_TYPE = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
FILE_LOG_TYPE = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
TLS_INSPECTOR_TYPE = "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
HTTP_OPTIONS_TYPE = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


class SidecarError(RuntimeError):
    """The harness failed (Envoy not ready, no listener)."""


class SidecarConfigError(SidecarError):
    """Envoy refused the configuration."""


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------


class EchoApp:
    """A threaded HTTP/1.1 server on 127.0.0.1 (port 0 -> :attr:`port`). Every request gets 200
    with a JSON body ``{"path", "method", "host", "xfcc", "headers"}`` (``xfcc``: the
    ``x-forwarded-client-cert`` value it received, or null; ``headers``: all, lower-cased names,
    the last value of a repeated one). :attr:`requests` records those dicts in arrival order."""

    def __init__(self) -> None:
        self.requests: List[Dict[str, Any]] = []
        app = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                info = {
                    "path": self.path, "method": self.command, "host": self.headers.get("Host"),
                    "xfcc": self.headers.get("x-forwarded-client-cert"),
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                }
                app.requests.append(info)
                body = json.dumps(info).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.port: int = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name=f"echo-app-{self.port}")
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def rbac_allow_principals(principals: Sequence[str], policy_name: str = "ns[default]-policy[allow]-rule[0]") -> dict:
    """Istio's translation of ``AuthorizationPolicy ALLOW from.source.principals`` (§4.2): one
    policy, any permission, principals ``and_ids{or_ids{authenticated.principal_name exact}}``."""
    return {"action": "ALLOW", "policies": {policy_name: {
        "permissions": [{"and_rules": {"rules": [{"any": True}]}}],
        "principals": [{"and_ids": {"ids": [{"or_ids": {"ids": [
            {"authenticated": {"principal_name": {"exact": p}}} for p in principals]}}]}}],
    }}}


def _access_log(path: str) -> list:
    return [{"name": "envoy.access_loggers.file", "typed_config": {
        "@type": FILE_LOG_TYPE, "path": path,
        "log_format": {"text_format_source": {"inline_string": ACCESS_LOG_FORMAT}}}}]


def _tls(paths: CertPaths, alpn: List[str], trust_domains: Sequence[str]) -> dict:
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": TLS_TYPE,
        "require_client_certificate": True,
        "common_tls_context": {
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3",
                           "cipher_suites": ISTIO_CIPHERS},
            "alpn_protocols": alpn,
            "tls_certificates": [{"certificate_chain": {"filename": paths.chain},
                                  "private_key": {"filename": paths.key}}],
            "validation_context": {
                "trusted_ca": {"filename": paths.roots},
                "match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"prefix": f"spiffe://{td}/"}} for td in trust_domains],
            },
        },
    }}


def inbound_bootstrap(paths: CertPaths, app_port: int, *, access_log_path: str,
                      allowed_principals: Optional[Sequence[str]] = (spiffe_id("client"),),
                      rbac: Optional[dict] = None, app_http2: bool = False,
                      trust_domains: Sequence[str] = (TRUST_DOMAIN,), port: int = 0) -> dict:
    """The Envoy bootstrap (a dict, JSON-ready). ``rbac`` (an RBAC ``rules`` dict) overrides
    ``allowed_principals``; both None -> no RBAC filter (everything the TLS layer admits)."""
    http_filters = []
    rules = rbac if rbac is not None else (
        rbac_allow_principals(allowed_principals) if allowed_principals is not None else None)
    if rules is not None:
        http_filters.append({"name": "envoy.filters.http.rbac", "typed_config": {"@type": RBAC_TYPE, "rules": rules}})
    http_filters.append({"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}})
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": "inbound_0.0.0.0_15006",
        "codec_type": "AUTO",
        "forward_client_cert_details": "APPEND_FORWARD",
        "set_current_client_cert_details": {"subject": True, "dns": True, "uri": True},
        "route_config": {"name": "inbound|http|0", "virtual_hosts": [{
            "name": "inbound|http|0", "domains": ["*"],
            "routes": [{"name": "default", "match": {"prefix": "/"},
                        "route": {"cluster": APP_CLUSTER, "timeout": "0s"}}],
            "response_headers_to_add": [{"header": {"key": "x-inbound-chain", "value": "%FILTER_CHAIN_NAME%"}}],
        }]},
        "http_filters": http_filters,
        "access_log": _access_log(access_log_path),
    }
    tcp_proxy = {"@type": TCP_PROXY_TYPE, "stat_prefix": APP_CLUSTER, "cluster": APP_CLUSTER,
                 "access_log": _access_log(access_log_path)}
    app_cluster: Dict[str, Any] = {
        "name": APP_CLUSTER, "type": "STATIC", "connect_timeout": "2s",
        "load_assignment": {"cluster_name": APP_CLUSTER, "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": socket_address(app_port)}}]}]},
    }
    if app_http2:
        app_cluster["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": HTTP_OPTIONS_TYPE, "explicit_http_config": {"http2_protocol_options": {}}}}
    listener = {
        "name": LISTENER_NAME,
        "address": socket_address(port),
        "listener_filters": [{"name": "envoy.filters.listener.tls_inspector",
                              "typed_config": {"@type": TLS_INSPECTOR_TYPE}}],
        "filter_chains": [
            {"name": HTTP_CHAIN,
             "filter_chain_match": {"transport_protocol": "tls", "application_protocols": HTTP_CHAIN_ALPNS},
             "transport_socket": _tls(paths, ["h2", "http/1.1"], trust_domains),
             "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]},
            {"name": TCP_CHAIN,
             "filter_chain_match": {"transport_protocol": "tls"},
             "transport_socket": _tls(paths, ["istio-peer-exchange", "h2", "http/1.1"], trust_domains),
             "filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": tcp_proxy}]},
        ],
    }
    return {
        "node": {"id": "sidecar~127.0.0.1~server.default~default.svc.cluster.local", "cluster": "server.default"},
        "admin": {"address": socket_address(0)},
        "static_resources": {"listeners": [listener], "clusters": [app_cluster]},
    }


# --------------------------------------------------------------------------------------------
# The process
# --------------------------------------------------------------------------------------------


class SidecarInbound(EnvoyProcess):
    """Envoy as an Istio STRICT inbound sidecar in front of an app. ``with`` or
    :meth:`start` / :meth:`stop`.

    ``paths``: the sidecar's Istio-layout directory (its cert, key and the roots it trusts).
    ``app_port``: None -> an :class:`EchoApp` is started (``.app``); else the port of the test's
    own app on 127.0.0.1 (``app_http2=True`` for a gRPC app). ``allowed_principals`` / ``rbac``:
    see :func:`inbound_bootstrap`.

    After start: ``port`` (the mTLS listener), ``app_port``, ``app`` (EchoApp or None),
    ``admin_url``, ``access_log_path``, ``config`` (the bootstrap dict), ``config_path``."""

    error = SidecarError
    config_error = SidecarConfigError

    def __init__(self, paths: CertPaths, *, app_port: Optional[int] = None, app_http2: bool = False,
                 allowed_principals: Optional[Sequence[str]] = (spiffe_id("client"),), rbac: Optional[dict] = None,
                 trust_domains: Sequence[str] = (TRUST_DOMAIN,), log_level: str = "warning",
                 startup_timeout: float = 30.0, keep_tmp: bool = False) -> None:
        self.paths = paths
        self.app_http2 = app_http2
        self.allowed_principals = allowed_principals
        self.rbac = rbac
        self.trust_domains = tuple(trust_domains)
        self.envoy_bin = find_envoy(SidecarError)
        self.log_level = log_level
        self.startup_timeout = startup_timeout
        self.keep_tmp = keep_tmp
        self.tmpdir: Optional[str] = None
        self.admin_url: Optional[str] = None
        self._envoy = None
        self._log_path = ""
        self.app: Optional[EchoApp] = None
        self._own_app = app_port is None
        self.app_port: int = app_port or 0
        self.port: int = 0
        self.access_log_path = ""
        self.config: Dict[str, Any] = {}
        self.config_path = ""

    # -- lifecycle -------------------------------------------------------------------------

    def write_config(self) -> str:
        """Create the temp dir and write the bootstrap (starting the EchoApp if it is ours, so
        the app port is known); returns the config path. :meth:`start` calls it."""
        if self.tmpdir is None:
            self.tmpdir = tempfile.mkdtemp(prefix="meshcore-sidecar-")
        if self._own_app and self.app is None:
            self.app = EchoApp()
            self.app_port = self.app.port
        self.access_log_path = os.path.join(self.tmpdir, "access.log")
        self.config = inbound_bootstrap(self.paths, self.app_port, access_log_path=self.access_log_path,
                                        allowed_principals=self.allowed_principals, rbac=self.rbac,
                                        app_http2=self.app_http2, trust_domains=self.trust_domains)
        self.config_path = os.path.join(self.tmpdir, "envoy.json")
        with open(self.config_path, "w") as f:
            json.dump(self.config, f, indent=1)
        return self.config_path

    def validate(self) -> Any:
        """``envoy --mode validate`` on the config (``subprocess.CompletedProcess``)."""
        if not self.config_path:
            self.write_config()
        assert self.tmpdir is not None
        return validate_config(self.envoy_bin, self.config_path, self.tmpdir, "warning")

    def _start(self) -> None:
        self.write_config()
        self._run_envoy(self.config_path)
        ports, body = self._listener_ports()
        if not ports.get(LISTENER_NAME):
            raise SidecarError(f"no listener {LISTENER_NAME!r} in Envoy:\n{body}")
        self.port = ports[LISTENER_NAME]

    def close(self) -> None:
        self._stop(None)
        if self.app is not None:
            self.app.close()
            self.app = None

    stop = close

    # -- observation -----------------------------------------------------------------------

    def flush_logs(self) -> None:
        """Make Envoy write its buffered access log now (admin ``POST /reopen_logs``)."""
        if self.admin_url:
            req = urllib.request.Request(self.admin_url + "/reopen_logs", data=b"", method="POST")
            with urllib.request.urlopen(req, timeout=2) as r:
                r.read()

    def access_log_lines(self, min_lines: int = 0, timeout: float = 3.0) -> List[str]:
        """The access log's lines (``"<chain> <code> <peer URI SAN or -> <SNI or ->"``), flushing
        Envoy's buffer first; waits up to ``timeout`` for at least ``min_lines``. One line per
        HTTP request on the HTTP chain, per connection on the TCP chain; TLS handshake failures
        log nothing."""
        deadline = time.monotonic() + timeout
        while True:
            self.flush_logs()
            try:
                with open(self.access_log_path, encoding="utf-8", errors="replace") as f:
                    lines = [ln for ln in f.read().splitlines() if ln]
            except OSError:
                lines = []
            if len(lines) >= min_lines or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)

    def access_log_entries(self, min_lines: int = 0, timeout: float = 3.0) -> List[Dict[str, Optional[str]]]:
        """:meth:`access_log_lines` parsed: ``{"chain", "code", "peer", "sni"}`` (``-`` -> None;
        ``code`` is ``"0"`` on the TCP chain)."""
        return [parse_access_log_line(ln) for ln in self.access_log_lines(min_lines, timeout)]

    def stats(self, prefix: str = "") -> Dict[str, int]:
        """Admin counters/gauges (``/stats``), optionally only those starting with ``prefix``,
        e.g. ``listener.127.0.0.1_0.ssl.`` (the listener's stats carry the *configured*
        address, port 0) or ``http.inbound_0.0.0.0_15006.rbac.``."""
        assert self.admin_url
        with urllib.request.urlopen(self.admin_url + "/stats", timeout=2) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            k, _, v = line.partition(": ")
            if k.startswith(prefix) and v.strip().lstrip("-").isdigit():
                out[k] = int(v)
        return out


# --------------------------------------------------------------------------------------------
# A stdlib client for tests
# --------------------------------------------------------------------------------------------


def parse_access_log_line(line: str) -> Dict[str, Optional[str]]:
    """One :data:`ACCESS_LOG_FORMAT` line -> ``{"chain", "code", "peer", "sni"}`` (``-`` -> None)."""
    parts = (line.split(" ") + ["-"] * 4)[:4]
    return dict(zip(("chain", "code", "peer", "sni"), (None if p == "-" else p for p in parts)))


class Response:
    """What :func:`https_get` got: ``status``, ``headers`` (lower-cased names, last value wins),
    ``body`` (bytes), ``json`` (parsed body or None), ``alpn`` (negotiated), ``tls_version``,
    ``peer_cert`` (``getpeercert()`` dict)."""

    def __init__(self, status: int, headers: Dict[str, str], body: bytes, alpn: Optional[str],
                 tls_version: Optional[str], peer_cert: Any) -> None:
        self.status, self.headers, self.body = status, headers, body
        self.alpn, self.tls_version, self.peer_cert = alpn, tls_version, peer_cert
        try:
            self.json: Any = json.loads(body) if body else None
        except ValueError:
            self.json = None

    def __repr__(self) -> str:
        return f"<Response {self.status} alpn={self.alpn} {self.tls_version} {self.body[:200]!r}>"


def https_get(port: int, ctx: ssl.SSLContext, path: str = "/", *, method: str = "GET",
              headers: Optional[Dict[str, str]] = None, body: Optional[bytes] = None,
              server_hostname: Optional[str] = None, timeout: float = 5.0) -> Response:
    """One HTTP/1.1 request over a fresh TLS connection to 127.0.0.1:``port`` with ``ctx`` (its
    ALPN list is used as is). ``server_hostname`` sets SNI (default: none). Errors propagate:
    ``ssl.SSLError`` / ``ConnectionError`` / ``http.client.RemoteDisconnected`` for a refusal."""
    raw = socket.create_connection((LOOPBACK, port), timeout=timeout)
    try:
        tls = ctx.wrap_socket(raw, server_hostname=server_hostname)
    except BaseException:
        raw.close()
        raise
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    conn.sock = tls
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data,
                        tls.selected_alpn_protocol(), tls.version(), tls.getpeercert())
    finally:
        conn.close()


def tls_attempt(port: int, ctx: ssl.SSLContext, *, server_hostname: Optional[str] = None,
                timeout: float = 5.0) -> Tuple[str, Any]:
    """Handshake, send ``GET /``, read: ``("ok", first response bytes)``, or where it failed:
    ``("handshake", exc)`` (TLS 1.2 refusals) / ``("io", exc)`` (TLS 1.3: the client's handshake
    completes and the refusal shows up as an alert or EOF on the first read) / ``("eof", b"")``
    (clean close before any response byte)."""
    raw = socket.create_connection((LOOPBACK, port), timeout=timeout)
    try:
        try:
            tls = ctx.wrap_socket(raw, server_hostname=server_hostname)
        except (ssl.SSLError, ConnectionError) as exc:
            return "handshake", exc
        try:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
            data = tls.recv(65536)
        except (ssl.SSLError, ConnectionError) as exc:
            return "io", exc
        finally:
            tls.close()
        return ("ok", data) if data else ("eof", b"")
    finally:
        raw.close()


__all__ = [
    "SidecarInbound", "EchoApp", "inbound_bootstrap", "parse_access_log_line", "rbac_allow_principals", "https_get", "tls_attempt",
    "Response", "SidecarError", "SidecarConfigError", "HTTP_CHAIN", "TCP_CHAIN", "LISTENER_NAME", "APP_CLUSTER",
    "ALPN_HTTP10", "ALPN_HTTP11", "ALPN_H2", "ALPN_TCP", "ACCESS_LOG_FORMAT",
]
