"""Differential oracle for upstream certificate checks: real Envoy vs ``meshcore.tls``.

* :data:`CERTS`: server certificates with varied SAN mixes (DNS incl. mixed case and wildcards,
  URIs, e-mail, IPv4/IPv6 incl. embedded-IPv4 forms, none at all), plus an expired one and one
  from a foreign CA; :func:`issue` makes them with ``cryptography`` in the shape of ``pki.py``.
* :func:`matcher_sets`: ~50 generated SAN matcher sets (typed ``match_typed_subject_alt_names``
  of every type and string-matcher kind, with and without ``ignore_case``, the deprecated untyped
  ``match_subject_alt_names``, empty), values taken from the certificates plus near misses.
* :class:`TlsHttpServers`: one loopback TLS server per certificate (stdlib ``ssl``, no client
  certificate), answering any HTTP/1.1 request with 200.
* :class:`SanOracleEnvoy`: ONE Envoy with a plaintext HTTP listener whose route sends
  ``x-cluster: <name>`` to cluster ``<name>``; one STATIC cluster per (matcher set, certificate)
  with an ``UpstreamTlsContext`` (``trusted_ca`` + the matchers). :meth:`SanOracleEnvoy.verdicts`
  sends one request per pair and reads the cluster's ``ssl.*`` stats.
* :func:`meshcore_verdicts`: the same pairs through ``UpstreamTls.wrap_socket``.

A verdict is ``"ok"`` (accepted) or the Envoy stat naming the rejection
(``ssl.fail_verify_san``, ``ssl.fail_verify_error``, ...), so the tables compare *why* too.
"""

from __future__ import annotations

import datetime as _dt
import http.client
import ipaddress
import json
import os
import re
import socket
import ssl
import tempfile
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from envoy_process import LOOPBACK, EnvoyProcess, find_envoy, http_listener, socket_address

from .pki import CA, Leaf, cert_pem, key_pem, new_key, spiffe_id

UPSTREAM_TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
LISTENER = "san_oracle"
CLUSTER_HEADER = "x-cluster"
OK = "ok"

# --------------------------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------------------------

SERVER_ID = spiffe_id("server")


@dataclass(frozen=True)
class SanCert:
    """A server certificate to make: SANs as ``(type, value)`` with Envoy's type names (DNS, URI,
    EMAIL, IP_ADDRESS); ``cn`` puts a subject CN (no SANs at all: CN only); ``issuer`` "root"
    (the test root both sides trust) or "foreign"; ``expired``: validity ended yesterday."""

    name: str
    sans: Tuple[Tuple[str, str], ...]
    cn: str = ""
    issuer: str = "root"
    expired: bool = False

    def describe(self) -> str:
        parts = [f"{t}:{v}" for t, v in self.sans] or [f"(no SAN; CN={self.cn})"]
        extra = " [EXPIRED]" if self.expired else " [FOREIGN CA]" if self.issuer != "root" else ""
        return "[" + ", ".join(parts) + "]" + extra


CERTS: Tuple[SanCert, ...] = (
    SanCert("spiffe", (("URI", SERVER_ID),)),
    SanCert("dns_case", (("DNS", "api.example.com"), ("DNS", "Mixed.Example.COM"))),
    SanCert("dns_wild", (("DNS", "*.example.com"),)),
    SanCert("dns_wild_upper", (("DNS", "*.SVC.Example.ORG"), ("DNS", "exact.svc.example.org"))),
    # partial-label wildcards (Envoy's labelWildcardMatch) and an A-label one (never a wildcard)
    SanCert("dns_partial", (("DNS", "ba*.example.net"), ("DNS", "*z.example.io"), ("DNS", "xn--*.example.info"))),
    SanCert("dns_odd", (("DNS", "*"), ("DNS", "*.*.example.edu"), ("DNS", "f*o*.example.edu"),
                        ("DNS", "trailing.example.com."))),
    SanCert("ipv4", (("IP_ADDRESS", "127.0.0.1"), ("IP_ADDRESS", "10.1.2.3"))),
    SanCert("ipv6", (("IP_ADDRESS", "2001:db8::1"), ("IP_ADDRESS", "::1"), ("IP_ADDRESS", "2001:db8:0:0:1:0:0:1"))),
    SanCert("ipv6_v4", (("IP_ADDRESS", "::ffff:10.0.0.1"), ("IP_ADDRESS", "::10.0.0.2"),
                        ("IP_ADDRESS", "64:ff9b::10.0.0.3"), ("IP_ADDRESS", "::2"))),
    SanCert("email", (("EMAIL", "Admin@Example.com"), ("EMAIL", "ops@example.org"))),
    SanCert("multi_uri", (("URI", "spiffe://cluster.local/ns/a/sa/x"), ("URI", "spiffe://other.domain/ns/b/sa/y"),
                          ("URI", "https://Example.com/Path?q=1"))),
    SanCert("mixed", (("DNS", "db.internal"), ("URI", "spiffe://cluster.local/ns/db/sa/db"),
                      ("IP_ADDRESS", "192.168.0.10"), ("EMAIL", "dba@db.internal"))),
    SanCert("cn_only", (), cn="cn-only.example.com"),
    SanCert("expired", (("URI", SERVER_ID), ("DNS", "api.example.com")), expired=True),
    SanCert("foreign", (("URI", SERVER_ID), ("DNS", "api.example.com")), issuer="foreign"),
)


def _general_name(kind: str, value: str) -> x509.GeneralName:
    if kind == "DNS":
        return x509.DNSName(value)
    if kind == "URI":
        return x509.UniformResourceIdentifier(value)
    if kind == "EMAIL":
        return x509.RFC822Name(value)
    if kind == "IP_ADDRESS":
        return x509.IPAddress(ipaddress.ip_address(value))
    raise ValueError(kind)


def issue(ca: CA, spec: SanCert) -> Leaf:
    """A leaf for ``spec`` signed by ``ca``, shaped like ``CA.issue`` (EC P-256, KeyUsage, EKU,
    BasicConstraints CA:false, AKI); the SAN extension is critical when the subject is empty."""
    key = new_key("ec")
    now = _dt.datetime.now(_dt.timezone.utc)
    if spec.expired:
        nb, na = now - _dt.timedelta(days=2), now - _dt.timedelta(days=1)
    else:
        nb, na = now - _dt.timedelta(minutes=2), now + _dt.timedelta(hours=24)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, spec.cn)] if spec.cn else [])
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(nb)
        .not_valid_after(na)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=True,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if spec.sans:
        b = b.add_extension(x509.SubjectAlternativeName([_general_name(t, v) for t, v in spec.sans]),
                            critical=not spec.cn)
    cert = b.sign(ca.key, hashes.SHA256())
    return Leaf(cert=cert, key=key, chain=(), root=ca.cert)


# --------------------------------------------------------------------------------------------
# Matcher sets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class M:
    """One SAN matcher: ``san_type`` DNS/URI/EMAIL/IP_ADDRESS, or "" for the deprecated untyped
    ``match_subject_alt_names``; ``kind`` exact/prefix/suffix/contains/regex."""

    san_type: str
    kind: str
    value: str
    ignore_case: bool = False

    def envoy(self) -> dict:
        if self.kind == "regex":
            return {"safe_regex": {"regex": self.value}}
        out: Dict[str, Any] = {self.kind: self.value}
        if self.ignore_case:
            out["ignore_case"] = True
        return out

    def describe(self) -> str:
        return f"{self.san_type or 'untyped'} {self.kind}{' (ignore_case)' if self.ignore_case else ''} {self.value!r}"


@dataclass(frozen=True)
class MatcherSet:
    name: str
    matchers: Tuple[M, ...]
    note: str = ""

    @property
    def typed(self) -> Tuple[M, ...]:
        return tuple(m for m in self.matchers if m.san_type)

    @property
    def untyped(self) -> Tuple[M, ...]:
        return tuple(m for m in self.matchers if not m.san_type)

    def validation_context(self, root_file: str) -> dict:
        vc: Dict[str, Any] = {"trusted_ca": {"filename": root_file}}
        if self.typed:
            vc["match_typed_subject_alt_names"] = [{"san_type": m.san_type, "matcher": m.envoy()} for m in self.typed]
        if self.untyped:
            vc["match_subject_alt_names"] = [m.envoy() for m in self.untyped]
        return vc

    def describe(self) -> str:
        return "[" + "; ".join(m.describe() for m in self.matchers) + "]" if self.matchers else "[] (no matchers)"


def _swap(s: str) -> str:
    """Flip the case of the first ASCII letter that has a case (a near miss that differs by case only)."""
    for i, c in enumerate(s):
        if c.isascii() and c.isalpha():
            return s[:i] + c.swapcase() + s[i + 1:]
    return s


def _generated(seeds: Sequence[Tuple[str, str]]) -> List[Tuple[str, Tuple[M, ...]]]:
    """Every string-matcher kind, with and without ``ignore_case``, on values from the
    certificates, each applied to exact values and to case-changed near misses."""
    out: List[Tuple[str, Tuple[M, ...]]] = []
    for t, v in seeds:
        half = max(1, len(v) // 2)
        tag = t.lower()
        out += [
            (f"{tag}-exact", (M(t, "exact", v),)),
            (f"{tag}-exact-casemiss", (M(t, "exact", _swap(v)),)),
            (f"{tag}-exact-ic", (M(t, "exact", v.upper(), True),)),
            (f"{tag}-prefix-casemiss-ic", (M(t, "prefix", _swap(v[:half]), True),)),
            (f"{tag}-suffix-casemiss", (M(t, "suffix", _swap(v[-half:])),)),
            (f"{tag}-contains-ic", (M(t, "contains", v[1:-1].upper(), True),)),
            (f"{tag}-regex", (M(t, "regex", re.escape(v)),)),
            (f"{tag}-regex-partial", (M(t, "regex", re.escape(v[:half])),)),  # RE2 full match: no
            (f"{tag}-untyped-exact", (M("", "exact", v),)),
        ]
    return out


SEEDS: Tuple[Tuple[str, str], ...] = (
    ("URI", SERVER_ID),
    ("DNS", "Mixed.Example.COM"),
    ("EMAIL", "Admin@Example.com"),
    ("IP_ADDRESS", "2001:db8::1"),
)

CURATED: Tuple[Tuple[str, Tuple[M, ...], str], ...] = (
    ("empty", (), "no matchers: chain only"),
    # DNS exact = dnsNameMatch: case-insensitive, wildcards in the certificate
    ("dns-under-wildcard", (M("DNS", "exact", "foo.example.com"),), ""),
    ("dns-under-wildcard-case", (M("DNS", "exact", "FOO.Example.Com"),), ""),
    ("dns-wildcard-misses", (M("DNS", "exact", "a.b.example.com"), M("DNS", "exact", "example.com")),
     "a wildcard covers one label, never none"),
    ("dns-empty-label", (M("DNS", "exact", ".example.com"),), "'*' matches an empty label in Envoy"),
    ("dns-literal-wildcard", (M("DNS", "exact", "*.example.com"),), ""),
    ("dns-upper-wildcard", (M("DNS", "exact", "x.svc.example.org"),), ""),
    ("dns-partial-wildcard-head", (M("DNS", "exact", "bar.example.net"),), "'ba*'"),
    ("dns-partial-wildcard-tail", (M("DNS", "exact", "quiz.example.io"),), "'*z'"),
    ("dns-partial-wildcard-empty", (M("DNS", "exact", "ba.example.net"),), "'ba*' matches 'ba'"),
    ("dns-wildcard-never", (M("DNS", "exact", "foo.example.net"), M("DNS", "exact", "xn--abc.example.info"),
                            M("DNS", "exact", "a.b.example.edu"), M("DNS", "exact", "foo.example.edu"),
                            M("DNS", "exact", "anything"), M("DNS", "exact", "trailing.example.com")),
     "no: partial miss, A-label, '*' in a later label, two '*', a lone '*', trailing dot"),
    ("dns-prefix-wildcard", (M("DNS", "prefix", "foo."),), "non-exact: no wildcard semantics"),
    ("dns-regex-wildcard", (M("DNS", "regex", r"[a-z]+\.example\.com"),), ""),
    ("dns-cn-only", (M("DNS", "exact", "cn-only.example.com"),), "the CN is never consulted"),
    # IP: the certificate address as glibc inet_ntop prints it, compared as text
    ("ip-v6-long", (M("IP_ADDRESS", "exact", "2001:DB8:0:0:0:0:0:1"), M("IP_ADDRESS", "exact", "2001:db8:0:0:0:0:0:1")),
     ""),
    ("ip-v6-long-upper-ic", (M("IP_ADDRESS", "exact", "2001:DB8:0:0:0:0:0:1", True),), ""),
    ("ip-v6-two-runs", (M("IP_ADDRESS", "exact", "2001:db8::1:0:0:1"),), ""),
    ("ip-v6-loopback", (M("IP_ADDRESS", "exact", "::1"),), ""),
    ("ip-v4-mapped-dotted", (M("IP_ADDRESS", "exact", "::ffff:10.0.0.1"),), ""),
    ("ip-v4-mapped-hex", (M("IP_ADDRESS", "exact", "::ffff:a00:1"),), ""),
    ("ip-v4-compat-dotted", (M("IP_ADDRESS", "exact", "::10.0.0.2"),), ""),
    ("ip-v4-compat-hex", (M("IP_ADDRESS", "exact", "::a00:2"),), ""),
    ("ip-low-hex", (M("IP_ADDRESS", "exact", "::2"),), ""),
    ("ip-low-dotted", (M("IP_ADDRESS", "exact", "::0.0.0.2"),), ""),
    ("ip-nat64", (M("IP_ADDRESS", "exact", "64:ff9b::a00:3"),), ""),
    ("ip-nat64-dotted", (M("IP_ADDRESS", "exact", "64:ff9b::10.0.0.3"),), ""),
    ("ip-v4-prefix", (M("IP_ADDRESS", "prefix", "10."),), ""),
    ("ip-untyped", (M("", "exact", "192.168.0.10"),), ""),
    # e-mail, URIs, types
    ("email-suffix", (M("EMAIL", "suffix", "@example.org"),), ""),
    ("uri-other-domain", (M("URI", "prefix", "spiffe://other.domain/"),), ""),
    ("uri-https-ic", (M("URI", "exact", "https://example.com/path?q=1", True),), ""),
    ("typed-wrong-type", (M("URI", "exact", "api.example.com"), M("EMAIL", "exact", "db.internal"),
                          M("DNS", "exact", "127.0.0.1"), M("IP_ADDRESS", "exact", "dba@db.internal")),
     "typed: other types never match"),
    ("any-of-two", (M("DNS", "exact", "nomatch.example"), M("URI", "prefix", "spiffe://cluster.local/ns/")), ""),
    ("untyped-wildcard", (M("", "exact", "foo.example.com"),), "untyped DNS exact: dnsNameMatch too"),
    ("untyped-regex-email", (M("", "regex", r".+@.+"),), ""),
    ("untyped-suffix", (M("", "suffix", ".internal"),), ""),
    ("untyped-contains-ic", (M("", "contains", "EXAMPLE", True),), ""),
)

#: typed and untyped in one validation context: Envoy 1.40 accepts it and checks the typed list
#: only (the untyped ``api.example.com`` would match ``dns_case``; Envoy rejects it)
BOTH_TYPED_AND_UNTYPED = MatcherSet(
    "typed-and-untyped", (M("URI", "exact", "spiffe://nope/"), M("", "exact", "api.example.com")))


def matcher_sets() -> Tuple[MatcherSet, ...]:
    out = [MatcherSet(n, ms, note) for n, ms, note in CURATED]
    out += [MatcherSet(n, ms) for n, ms in _generated(SEEDS)]
    out.append(BOTH_TYPED_AND_UNTYPED)
    names = [s.name for s in out]
    assert len(set(names)) == len(names), "duplicate matcher set names"
    return tuple(out)


def san_specs(ms: MatcherSet) -> tuple:
    """The same matchers as meshcore's model: what ``cluster_config`` decodes the validation
    context to (typed list if any, else the untyped one, as Envoy: see :data:`BOTH_TYPED_AND_UNTYPED`)."""
    from meshcore._route_model import StringMatchSpec
    from meshcore.xds.model import SanMatcherSpec
    from meshcore.xds.route_config import compile_regex

    def sm(m: M) -> Any:
        if m.kind == "regex":
            return StringMatchSpec("regex", m.value, False, compile_regex(m.value, ms.name, "san"))
        return StringMatchSpec(m.kind, m.value, m.ignore_case)

    return tuple(SanMatcherSpec(m.san_type, sm(m)) for m in (ms.typed or ms.untyped))


# --------------------------------------------------------------------------------------------
# Loopback TLS servers
# --------------------------------------------------------------------------------------------


class TlsHttpServers:
    """One TLS server on 127.0.0.1 per ``(name, chain file, key file)``; ``ports[name]``. Any
    HTTP/1.1 request gets ``200`` (``Connection: close``). A failed handshake is just dropped."""

    RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"

    def __init__(self, certs: Iterable[Tuple[str, str, str]]) -> None:
        self.ports: Dict[str, int] = {}
        self._socks: List[socket.socket] = []
        self._closed = False
        for name, chain, key in certs:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(chain, key)
            sock = socket.create_server((LOOPBACK, 0), backlog=256)
            self._socks.append(sock)
            self.ports[name] = sock.getsockname()[1]
            threading.Thread(target=self._accept, args=(sock, ctx), daemon=True, name=f"tls-{name}").start()

    def _accept(self, sock: socket.socket, ctx: ssl.SSLContext) -> None:
        while not self._closed:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, ctx), daemon=True).start()

    def _serve(self, conn: socket.socket, ctx: ssl.SSLContext) -> None:
        conn.settimeout(10)
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                buf = b""
                while b"\r\n\r\n" not in buf:
                    chunk = tls.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                tls.sendall(self.RESPONSE)
        except (OSError, ValueError):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._closed = True
        for s in self._socks:
            s.close()


# --------------------------------------------------------------------------------------------
# Envoy
# --------------------------------------------------------------------------------------------


class SanOracleError(RuntimeError):
    pass


def cluster_name(ms_index: int, cert_index: int) -> str:
    """Stat-friendly (no dots)."""
    return f"s{ms_index:03d}_c{cert_index:02d}"


def tls_cluster(name: str, port: int, vc: dict) -> dict:
    return {
        "name": name, "type": "STATIC", "connect_timeout": "3s",
        "load_assignment": {"cluster_name": name, "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": socket_address(port)}}]}]},
        "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": UPSTREAM_TLS_TYPE, "common_tls_context": {"validation_context": vc}}},
    }


def bootstrap(clusters: List[dict]) -> dict:
    route_config = {"name": "by_header", "virtual_hosts": [{
        "name": "all", "domains": ["*"],
        "routes": [{"match": {"prefix": "/"}, "route": {"cluster_header": CLUSTER_HEADER, "timeout": "5s"}}]}]}
    return {
        "node": {"id": "san-oracle", "cluster": "san-oracle"},
        "admin": {"address": socket_address(0)},
        "static_resources": {"listeners": [http_listener(LISTENER, route_config)], "clusters": clusters},
    }


class SanOracleEnvoy(EnvoyProcess):
    """One Envoy over ``clusters`` (see :func:`tls_cluster`)."""

    error = SanOracleError
    config_error = SanOracleError

    def __init__(self, clusters: List[dict], *, log_level: str = "error", startup_timeout: float = 30.0) -> None:
        self.clusters = clusters
        self.envoy_bin = find_envoy(SanOracleError)
        self.log_level = log_level
        self.startup_timeout = startup_timeout
        self.keep_tmp = False
        self.tmpdir: Optional[str] = None
        self.admin_url: Optional[str] = None
        self._envoy = None
        self._log_path = ""
        self.port = 0
        self._local = threading.local()

    def _start(self) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="meshcore-san-oracle-")
        cfg = os.path.join(self.tmpdir, "envoy.json")
        with open(cfg, "w") as f:
            json.dump(bootstrap(self.clusters), f)
        self._run_envoy(cfg)
        ports, body = self._listener_ports()
        if not ports.get(LISTENER):
            raise SanOracleError(f"no listener {LISTENER!r}:\n{body}")
        self.port = ports[LISTENER]

    def close(self) -> None:
        self._stop(None)

    def request(self, cluster: str) -> Tuple[int, str]:
        """One GET through Envoy to ``cluster``: ``(status, body)`` (a kept-alive connection per thread)."""
        for attempt in range(2):
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=10)
            try:
                conn.request("GET", "/", headers={CLUSTER_HEADER: cluster})
                resp = conn.getresponse()
                return resp.status, resp.read().decode("utf-8", "replace")
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def ssl_stats(self) -> Dict[str, Dict[str, int]]:
        """``{cluster: {"ssl.handshake": n, "ssl.fail_verify_san": n, ...}}`` (non-zero ones)."""
        assert self.admin_url
        url = self.admin_url + "/stats?format=json&filter=" + urllib.request.quote(r"^cluster\..*\.ssl\.")
        with urllib.request.urlopen(url, timeout=5) as r:
            stats = json.load(r)["stats"]
        out: Dict[str, Dict[str, int]] = {}
        for s in stats:
            if "value" not in s or not s["value"]:
                continue
            m = re.fullmatch(r"cluster\.([^.]+)\.(ssl\.[a-z_]+)", s["name"])
            if m:
                out.setdefault(m.group(1), {})[m.group(2)] = int(s["value"])
        return out

    def verdicts(self, names: Sequence[str], workers: int = 16) -> Dict[str, str]:
        """Per cluster: ``"ok"`` (200) or the ``ssl.*`` failure stat Envoy counted (503)."""
        with ThreadPoolExecutor(workers) as pool:
            results = dict(zip(names, pool.map(self.request, names)))
        stats = self.ssl_stats()
        out: Dict[str, str] = {}
        for name, (status, body) in results.items():
            st = stats.get(name, {})
            if status == 200:
                out[name] = OK if st.get("ssl.handshake") else f"200 without ssl.handshake? {st}"
            elif status == 503:
                fails = sorted(k for k in st if k.startswith("ssl.fail_verify") or k == "ssl.connection_error")
                out[name] = fails[0] if len(fails) == 1 else f"503 {fails or body[:200]!r}"
            else:
                out[name] = f"HTTP {status}: {body[:200]!r}"
        return out


# --------------------------------------------------------------------------------------------
# meshcore
# --------------------------------------------------------------------------------------------


def meshcore_verdicts(root_file: str, pairs: Sequence[Tuple[str, MatcherSet, int]],
                      workers: int = 16) -> Dict[str, str]:
    """``pairs``: ``(cluster name, matcher set, server port)`` -> the same verdicts as
    :meth:`SanOracleEnvoy.verdicts`, from ``UpstreamTls.wrap_socket``."""
    from meshcore.tls import FileCertificateSource, TlsHandshakeError, TlsManager
    from meshcore.xds.model import CertificateRef, UpstreamTlsSpec

    mgr = TlsManager(None, FileCertificateSource(ca_certificate_file=root_file))
    roots = CertificateRef("sds", "ROOTCA")
    ups = {}
    for _, ms, _ in pairs:
        if ms.name not in ups:
            ups[ms.name] = mgr.upstream(ms.name, UpstreamTlsSpec(roots=roots, san_matchers=san_specs(ms)))

    def one(item: Tuple[str, MatcherSet, int]) -> str:
        _, ms, port = item
        sock = socket.create_connection((LOOPBACK, port), timeout=10)
        try:
            tls = ups[ms.name].wrap_socket(sock, "ep")
        except TlsHandshakeError as e:
            return e.stat
        tls.close()
        return OK

    with ThreadPoolExecutor(workers) as pool:
        return dict(zip((p[0] for p in pairs), pool.map(one, pairs)))


def write_leaf(d: str, name: str, leaf: Leaf) -> Tuple[str, str]:
    chain, key = os.path.join(d, f"{name}.crt"), os.path.join(d, f"{name}.key")
    with open(chain, "wb") as f:
        f.write(cert_pem(leaf.cert))
    with open(key, "wb") as f:
        f.write(key_pem(leaf.key))
    return chain, key


__all__ = ["CERTS", "SanCert", "M", "MatcherSet", "matcher_sets", "san_specs", "issue", "TlsHttpServers",
           "SanOracleEnvoy", "tls_cluster", "cluster_name", "meshcore_verdicts", "write_leaf",
           "BOTH_TYPED_AND_UNTYPED", "OK"]
