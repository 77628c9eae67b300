"""Differential oracle for ``meshcore.rbac``: a real Envoy 1.40 running RBAC HTTP filters decides
the same requests as :class:`meshcore.rbac.RbacEngine`.

* :func:`make_identities`: client certificates (``tests/tls/pki.py`` shapes) with generated
  SPIFFE IDs, DNS SANs and subjects, written to a temp dir; one CA.
* :class:`RbacOracleEnvoy`: ONE Envoy with several listeners (TLS with a TLS inspector, client
  certificate optional, and plaintext; on 127.0.0.1/127.0.0.2, several ports), all with the same
  HTTP connection manager: the RBAC filters (fixed names, base configs), then the router. Each
  *case* is a route selected by the ``x-case`` header, answering 200 with a direct response and
  carrying the case's ``RBACPerRoute`` per filter, so hundreds of configurations share one
  process. The access log (a JSON line per request, flushed every 100 ms) gives each request's
  ``envoy.filters.http.rbac`` dynamic metadata, keyed by the ``x-seq`` header the client adds
  (a response header cannot carry it: Envoy writes the metadata after sending the 403).
* :meth:`RbacOracleEnvoy.send`: the requests over raw HTTP/1.1 sockets (TLS with the chosen
  client certificate and SNI, or plaintext), bound to the chosen 127.0.0.x source, kept alive
  per (listener, identity, SNI, source) and spread over a few threads.
* :meth:`RbacOracleEnvoy.stats`: the filters' counters from admin ``/stats``.

Only the standard library, ``cryptography`` and the test PKI helpers.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from envoy_process import (HCM_TYPE, ROUTER_TYPE, EnvoyProcess, die_with_parent, find_envoy, free_port, http_get,
                           tail)

from tls.pki import CA, Leaf, cert_pem, key_pem, new_key

RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
RBAC_PER_ROUTE_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute"
FILTER_CONFIG_TYPE = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
TLS_INSPECTOR_TYPE = "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
CASE_HEADER = "x-case"
SEQ_HEADER = "x-seq"
FILE_LOG_TYPE = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
STAT_PREFIX = "rbac_oracle"

#: A per-route entry that turns the filter off: Envoy's FilterConfig{disabled: true}.
DISABLED = {"@type": FILTER_CONFIG_TYPE, "disabled": True}


class OracleError(RuntimeError):
    """The harness failed."""


class OracleConfigError(OracleError):
    """Envoy refused the configuration."""


# --------------------------------------------------------------------------------------------
# Client identities
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """A client certificate to make: URI SANs, DNS SANs, subject attributes ((oid name, value),
    in order). ``subject`` is the RFC 2253 string Envoy prints for it."""

    name: str
    uris: Tuple[str, ...] = ()
    dns: Tuple[str, ...] = ()
    subject_attrs: Tuple[Tuple[str, str], ...] = ()

    @property
    def subject(self) -> str:
        return _name(self.subject_attrs).rfc4514_string()


_OIDS = {"CN": NameOID.COMMON_NAME, "O": NameOID.ORGANIZATION_NAME, "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
         "C": NameOID.COUNTRY_NAME}


def _name(attrs: Sequence[Tuple[str, str]]) -> x509.Name:
    return x509.Name([x509.NameAttribute(_OIDS[k], v) for k, v in attrs])


def issue(ca: CA, ident: Identity) -> Leaf:
    key = new_key("ec")
    now = _dt.datetime.now(_dt.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(ident.subject_attrs))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=2))
        .not_valid_after(now + _dt.timedelta(hours=24))
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=True,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    sans: List[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in ident.uris]
    sans += [x509.DNSName(d) for d in ident.dns]
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=not ident.subject_attrs)
    return Leaf(cert=b.sign(ca.key, hashes.SHA256()), key=key, chain=(), root=ca.cert)


@dataclass
class Identities:
    """The CA, the server certificate files and one (chain, key) file pair per identity."""

    dir: str
    root_file: str
    server: Tuple[str, str]
    clients: Dict[str, Tuple[str, str]]
    idents: Dict[str, Identity]


def make_identities(base: str, idents: Sequence[Identity]) -> Identities:
    root = CA.new("rbac-oracle-root")
    root_file = os.path.join(base, "root.pem")
    with open(root_file, "wb") as f:
        f.write(root.cert_pem)

    def write(name: str, leaf: Leaf) -> Tuple[str, str]:
        c, k = os.path.join(base, f"{name}.crt"), os.path.join(base, f"{name}.key")
        with open(c, "wb") as f:
            f.write(cert_pem(leaf.cert))
        with open(k, "wb") as f:
            f.write(key_pem(leaf.key))
        return c, k

    server = write("server", root.issue("spiffe://cluster.local/ns/default/sa/server", dns=("localhost",)))
    clients = {i.name: write(i.name, issue(root, i)) for i in idents}
    return Identities(base, root_file, server, clients, {i.name: i for i in idents})


# --------------------------------------------------------------------------------------------
# Envoy
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listener:
    """``hcm``: extra HttpConnectionManager fields for this listener (e.g. use_remote_address)."""

    name: str
    address: str
    port: int
    tls: bool
    hcm: Tuple[Tuple[str, Any], ...] = ()


@dataclass
class Request:
    """One request: the case (route), the connection (listener, client identity or None for no
    certificate, SNI, source address) and the HTTP request (``authority`` is the Host line)."""

    case: int
    listener: str
    identity: Optional[str]
    sni: Optional[str]
    source: str
    method: str
    path: str
    authority: str
    headers: List[Tuple[str, str]] = field(default_factory=list)


@dataclass
class Response:
    status: int
    metadata: Dict[str, Any]


def bootstrap(listeners: Sequence[Listener], filters: Sequence[Tuple[str, dict]], cases: Sequence[Dict[str, Any]],
              ids: Identities, access_log: str) -> dict:
    routes = []
    for i, overrides in enumerate(cases):
        route: Dict[str, Any] = {
            "match": {"prefix": "/", "headers": [{"name": CASE_HEADER, "string_match": {"exact": str(i)}}]},
            "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
        }
        if overrides:
            route["typed_per_filter_config"] = {
                name: (o if "@type" in o else {"@type": RBAC_PER_ROUTE_TYPE, **o}) for name, o in overrides.items()}
        routes.append(route)
    http_filters = [{"name": name, "typed_config": {"@type": RBAC_TYPE, **cfg}} for name, cfg in filters]
    http_filters.append({"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}})
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": STAT_PREFIX,
        "codec_type": "HTTP1",
        "route_config": {"name": "rbac_cases", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
        "http_filters": http_filters,
        "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": FILE_LOG_TYPE, "path": access_log,
            "log_format": {"json_format": {"seq": f"%REQ({SEQ_HEADER})%", "code": "%RESPONSE_CODE%",
                                           "md": "%DYNAMIC_METADATA(envoy.filters.http.rbac)%"}}}}],
    }
    out_listeners = []
    for ls in listeners:
        chain: Dict[str, Any] = {"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                              "typed_config": {**hcm, **dict(ls.hcm)}}]}
        entry: Dict[str, Any] = {"name": ls.name,
                                 "address": {"socket_address": {"address": ls.address, "port_value": ls.port}}}
        if ls.tls:
            chain["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": TLS_TYPE,
                "require_client_certificate": False,
                "common_tls_context": {
                    "tls_certificates": [{"certificate_chain": {"filename": ids.server[0]},
                                          "private_key": {"filename": ids.server[1]}}],
                    "validation_context": {"trusted_ca": {"filename": ids.root_file}},
                },
            }}
            entry["listener_filters"] = [{"name": "envoy.filters.listener.tls_inspector",
                                          "typed_config": {"@type": TLS_INSPECTOR_TYPE}}]
        entry["filter_chains"] = [chain]
        out_listeners.append(entry)
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": out_listeners},
    }


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def default_listeners() -> List[Listener]:
    """Two TLS ports on 127.0.0.1, one on 127.0.0.2, a plaintext one on each address; a TLS and a
    plaintext one on ::1 when the host has IPv6 loopback."""
    specs = [("tls_a", "127.0.0.1", True), ("tls_b", "127.0.0.1", True), ("tls_c", "127.0.0.2", True),
             ("plain_a", "127.0.0.1", False), ("plain_b", "127.0.0.2", False)]
    if ipv6_loopback():
        specs += [("tls_v6", "::1", True), ("plain_v6", "::1", False)]
    return [Listener(n, a, free_port(a) if ":" not in a else _free_port6(), t) for n, a, t in specs]


def _free_port6() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::1", 0))
        return s.getsockname()[1]


class _BytesSni(ssl.SSLContext):
    """Sends the SNI exactly as given (the stdlib IDNA-encodes, i.e. lower-cases, str names)."""

    def _encode_hostname(self, hostname: Any) -> Any:  # type: ignore[override]
        return hostname.decode("ascii") if isinstance(hostname, bytes) else hostname


class RbacOracleEnvoy(EnvoyProcess):
    error = OracleError
    config_error = OracleConfigError

    def __init__(self, filters: Sequence[Tuple[str, dict]], cases: Sequence[Dict[str, Any]], ids: Identities,
                 listeners: Optional[Sequence[Listener]] = None, *, log_level: str = "error",
                 startup_timeout: float = 30.0, keep_tmp: bool = False) -> None:
        self.envoy_bin = find_envoy(OracleError)
        self.filters = list(filters)
        self.cases = list(cases)
        self.ids = ids
        self.listeners = {ls.name: ls for ls in (listeners or default_listeners())}
        self.log_level = log_level
        self.startup_timeout = startup_timeout
        self.keep_tmp = keep_tmp
        self.tmpdir: Optional[str] = None
        self.admin_url: Optional[str] = None
        self._envoy = None
        self._log_path = ""
        self._contexts: Dict[Optional[str], ssl.SSLContext] = {}
        self._seq = 0
        self._access_log = ""

    def _start(self) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="meshcore-rbac-oracle-")
        self._access_log = os.path.join(self.tmpdir, "access.log")
        cfg = bootstrap(list(self.listeners.values()), self.filters, self.cases, self.ids, self._access_log)
        path = os.path.join(self.tmpdir, "envoy.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        self._run_envoy(path)
        ports, body = self._listener_ports()
        for name in self.listeners:
            if name not in ports:
                raise OracleError(f"listener {name} not up: {body[:2000]}")

    def close(self) -> None:
        self._stop(None)

    def _run_envoy(self, cfg_path: str) -> None:
        """EnvoyProcess._run_envoy with the access log flushed every 100 ms."""
        admin_path = os.path.join(self.tmpdir, "admin.txt")
        self._log_path = os.path.join(self.tmpdir, "envoy.log")
        with open(self._log_path, "wb") as log:
            self._envoy = subprocess.Popen(
                die_with_parent([
                    self.envoy_bin, "-c", cfg_path, "--concurrency", "1", "--use-dynamic-base-id",
                    "--base-id-path", os.path.join(self.tmpdir, "base-id"), "--file-flush-interval-msec", "100",
                    "--admin-address-path", admin_path, "-l", self.log_level,
                ]),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.tmpdir,
            )
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._envoy.poll() is not None:
                raise OracleConfigError(f"envoy exited with rc={self._envoy.returncode}:\n{tail(self._log_path)}")
            if time.monotonic() > deadline:
                raise OracleError(f"envoy not ready after {self.startup_timeout}s:\n{tail(self._log_path)}")
            if self.admin_url is None and os.path.exists(admin_path):
                with open(admin_path) as f:
                    a = f.read().strip()
                if a:
                    self.admin_url = "http://" + a
            if self.admin_url is not None:
                try:
                    if http_get(self.admin_url + "/ready", timeout=1)[0] == 200:
                        return
                except OSError:
                    pass
            time.sleep(0.02)

    # -- clients ------------------------------------------------------------------------------

    def _context(self, identity: Optional[str]) -> ssl.SSLContext:
        ctx = self._contexts.get(identity)
        if ctx is None:
            ctx = _BytesSni(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            if identity is not None:
                ctx.load_cert_chain(*self.ids.clients[identity])
            self._contexts[identity] = ctx
        return ctx

    def _connect(self, listener: Listener, identity: Optional[str], sni: Optional[str], source: str) -> socket.socket:
        sock = socket.socket(socket.AF_INET6 if ":" in listener.address else socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((source, 0))
        sock.connect((listener.address, listener.port))
        if not listener.tls:
            return sock
        ctx = self._context(identity)
        return ctx.wrap_socket(sock, server_hostname=sni)

    def _one(self, sock: socket.socket, req: Request, seq: int, buf: bytearray) -> int:
        lines = [f"{req.method} {req.path} HTTP/1.1", f"Host: {req.authority}"]
        lines += [f"{k}: {v}" for k, v in req.headers]
        lines.append(f"{CASE_HEADER}: {req.case}")
        lines.append(f"{SEQ_HEADER}: {seq}")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        end = buf.index(b"\r\n\r\n")
        head = bytes(buf[:end]).decode("latin-1").split("\r\n")
        del buf[:end + 4]
        status = int(head[0].split(" ", 2)[1])
        hdrs = {}
        for line in head[1:]:
            k, _, v = line.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        n = int(hdrs.get("content-length", "0"))
        while len(buf) < n:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed mid-body")
            buf += chunk
        del buf[:n]
        if status not in (200, 403):
            raise OracleError(f"unexpected status {status} for {req}: {head}")
        if status == 200 and hdrs.get("grpc-status") == "7":
            # a gRPC request's local replies are gRPC-shaped: RBAC's 403 is 200 + grpc-status 7
            # (PERMISSION_DENIED); the direct response 200 becomes grpc-status 2 "ok"
            return 403
        return status

    def send(self, requests: Sequence[Request], workers: int = 4) -> List[Response]:
        """The responses, in request order."""
        groups: Dict[Tuple[str, Optional[str], Optional[str], str], List[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.listener, r.identity, r.sni, r.source), []).append(i)
        statuses: List[Optional[int]] = [None] * len(requests)
        base = self._seq
        self._seq += len(requests)

        def run(key: Tuple[str, Optional[str], Optional[str], str]) -> None:
            listener = self.listeners[key[0]]
            sock = None
            buf = bytearray()
            for i in groups[key]:
                for attempt in range(3):
                    try:
                        if sock is None:
                            sock = self._connect(listener, key[1], key[2], key[3])
                            buf = bytearray()
                        statuses[i] = self._one(sock, requests[i], base + i, buf)
                        break
                    except (ConnectionError, ssl.SSLError, OSError):
                        if sock is not None:
                            sock.close()
                        sock = None
                        if attempt == 2:
                            raise OracleError(f"request failed 3 times: {requests[i]}\n{tail(self._log_path)}")
            if sock is not None:
                sock.close()

        with ThreadPoolExecutor(workers) as pool:
            for f in [pool.submit(run, k) for k in groups]:
                f.result()
        logged = self._wait_logged(range(base, base + len(requests)))
        out = []
        for i, status in enumerate(statuses):
            entry = logged[base + i]
            if int(entry["code"]) not in (status, 200):
                raise OracleError(f"access log says {entry['code']} for request {base + i}, the client got {status}")
            md = entry.get("md")
            out.append(Response(status, md if isinstance(md, dict) else {}))
        return out

    def _wait_logged(self, seqs: range, timeout: float = 20.0) -> Dict[int, Dict[str, Any]]:
        """The access-log entries of requests ``seqs`` (waiting for the flush)."""
        deadline = time.monotonic() + timeout
        while True:
            got: Dict[int, Dict[str, Any]] = {}
            try:
                with open(self._access_log) as f:
                    for line in f:
                        if line.strip():
                            e = json.loads(line)
                            if e.get("seq") is not None:
                                got[int(e["seq"])] = e
            except FileNotFoundError:
                pass
            if all(s in got for s in seqs):
                return got
            if time.monotonic() > deadline:
                missing = [s for s in seqs if s not in got][:5]
                raise OracleError(f"access log lacks requests {missing}...")
            time.sleep(0.05)

    def stats(self) -> Dict[str, int]:
        """``http.<prefix>.rbac.*`` counters, by the name after ``rbac.``."""
        with urllib.request.urlopen(self.admin_url + "/stats?format=json&filter=rbac", timeout=5) as r:
            data = json.load(r)
        out = {}
        head = f"http.{STAT_PREFIX}.rbac."
        for s in data.get("stats", []):
            name = s.get("name", "")
            if name.startswith(head) and "value" in s:
                out[name[len(head):]] = int(s["value"])
        return out


__all__ = ["DISABLED", "Identities", "Identity", "Listener", "OracleConfigError", "OracleError", "RbacOracleEnvoy",
           "Request", "Response", "bootstrap", "default_listeners", "issue", "make_identities"]
