"""The server side's per-request decision, shared by the ASGI, WSGI and grpcio server integrations
(:mod:`meshcore.integrations.asgi`, :mod:`~meshcore.integrations.wsgi`,
:mod:`~meshcore.integrations.grpc_server`); not public API except :class:`InboundStats`.

:class:`InboundGate` decides one request from what the server knows of its connection (addresses,
TLS, the verified client certificate, SNI) and the request (method, raw path with the query,
headers, authority):

1. **Serving** (gRFC A36): with an :class:`~meshcore.inbound.InboundListener`, nothing is served
   while it is not serving (no listener from the control plane yet, deleted, rejected):
   ``NOT_SERVING``.
2. **Filter chain**: ``listener.select(...)`` for the connection, cached per connection (its
   addresses, TLS, SNI) within one configuration snapshot. Refused (``NO_CHAIN``) when no chain
   matches, the chain has ``unsupported`` entries or is neither HTTP nor Envoy's ``tcp_proxy``,
   or the connection does not meet the chain's TLS: a TLS chain on a plaintext connection, an
   mTLS chain (``require_client_certificate``) without a verified client certificate, or a
   client certificate that fails the chain's SAN matchers (a sidecar's ``spiffe://<td>/``
   prefixes). Never a plaintext or unverified fallback.
3. **Path**: the chain's ``normalize_path`` / ``merge_slashes`` (Envoy shape; Istio turns
   ``normalize_path`` on) apply before routing and RBAC, and the application gets that path.
4. **Route** (the chain's route configuration) and the **RBAC** engine for it
   (``chain.rbac_for(route)``: ``RBACPerRoute`` overrides). RBAC runs first, as Envoy's filter
   runs before its router: denied -> ``DENIED`` (403 ``RBAC: access denied`` /
   ``PERMISSION_DENIED``); then no route -> ``NO_ROUTE`` (404 / ``UNAVAILABLE``); a route the
   server does not serve itself (not ``non_forwarding`` in the gRPC shape; a redirect or direct
   response) -> ``UNSERVED_ROUTE`` (503 / ``UNAVAILABLE``).

**Per request, not per connection.** gRFC A36 keeps a connection on the chain it was accepted
with and drains it on an update. A Python server gives an ASGI/WSGI app or a grpcio servicer no
connection lifetime to hang that on, so the gate reads the listener's *current* snapshot for
every request (cached per connection only until the snapshot changes): a pushed policy applies
to the next request, also on a connection that is already open -- as if Envoy's drain had
already moved the client to a new connection. The connection's transport itself (TLS or not,
the client certificate) is what the server negotiated at accept time; the gate checks it against
the current chain on every request, so a switch to STRICT refuses the requests of plaintext
connections opened before it.

Without a listener, ``rbac=`` (an :class:`~meshcore.rbac.RbacEngine`) is the policy, swappable at
any time (``gate.rbac = new_engine``: the next request uses it); with neither, every request is
allowed and only identity and stats are provided.

:class:`InboundStats`: Envoy's stat names, ``http.<stat_prefix>.rbac.allowed`` / ``denied`` /
``shadow_allowed`` / ``shadow_denied`` (exactly the RBAC engine's own per-filter counters, with
each filter's ``rules_stat_prefix`` / ``shadow_rules_stat_prefix``: Istio's DENY + ALLOW pair
counts an allowed request once per filter, as Envoy does), ``http.<stat_prefix>.downstream_rq_total``,
``downstream_rq_1xx`` .. ``5xx``, ``downstream_rq_completed``, ``downstream_rq_http1_total`` /
``http2_total``; ``listener.<address>_<port>.no_filter_chain_match`` (Envoy's) and
``listener.<address>_<port>.not_serving`` (meshcore's: requests refused while not serving).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
import weakref
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

__all__ = ["GatedMiddleware", "InboundGate", "InboundStats", "Verdict", "ALLOWED", "DENIED", "NOT_SERVING", "NO_CHAIN",
           "NO_ROUTE", "UNSERVED_ROUTE", "DENIED_BODY", "destination_sinks", "emit", "now", "listener_of", "ip_or_none",
           "request_facts", "answer_exchange", "str_headers"]

log = logging.getLogger(__name__)

# outcomes
ALLOWED = "allowed"
DENIED = "denied"
NOT_SERVING = "not_serving"
NO_CHAIN = "no_chain"
NO_ROUTE = "no_route"
UNSERVED_ROUTE = "unserved_route"

#: Envoy's local reply for an RBAC denial (content-type text/plain)
DENIED_BODY = b"RBAC: access denied"
_BODIES = {
    DENIED: DENIED_BODY,
    NOT_SERVING: b"meshcore: not serving (no server configuration from the control plane)",
    NO_CHAIN: b"meshcore: the server's configuration refuses this connection",
    NO_ROUTE: b"",  # Envoy's 404 (route_not_found) has no body
    UNSERVED_ROUTE: b"meshcore: the route is not served here",
}
_STATUS = {DENIED: 403, NOT_SERVING: 503, NO_CHAIN: 503, NO_ROUTE: 404, UNSERVED_ROUTE: 503}
#: grpc.StatusCode names per refusal (A36/A41: no route and unserved routes are UNAVAILABLE)
_GRPC = {DENIED: "PERMISSION_DENIED", NOT_SERVING: "UNAVAILABLE", NO_CHAIN: "UNAVAILABLE",
         NO_ROUTE: "UNAVAILABLE", UNSERVED_ROUTE: "UNAVAILABLE"}
_GRPC_MESSAGE = {DENIED: "RBAC: access denied", NOT_SERVING: "meshcore: not serving",
                 NO_CHAIN: "meshcore: the server's configuration refuses this connection",
                 NO_ROUTE: "meshcore: no route", UNSERVED_ROUTE: "meshcore: the route is not served here"}

_CACHE_MAX = 4096
_LIVE_ENGINES_MAX = 64


class Verdict:
    """What the gate decided for one request.

    ``outcome`` (:data:`ALLOWED`, :data:`DENIED`, ...), ``status`` (the HTTP status of a refusal,
    0 when allowed), ``body`` (a refusal's body), ``grpc_code`` (a ``grpc.StatusCode`` name) and
    ``grpc_message``; ``peer`` (:class:`~meshcore.rbac.PeerCertificate` of a verified client
    certificate, or None), ``principal`` (its first URI SAN: the caller's SPIFFE ID), ``policy``
    (the RBAC policy that allowed or denied, Envoy's ``enforced_effective_policy_id``),
    ``decision`` (the RBAC :class:`~meshcore.rbac.Decision`, None when no RBAC ran), ``chain`` /
    ``route`` (xDS), ``path`` (the path the app must see: normalized per the chain), ``prefix``
    (the HTTP stat prefix; None when the request never reached an HTTP connection manager),
    ``mtls`` (a verified client certificate was presented)."""

    __slots__ = ("outcome", "peer", "principal", "policy", "decision", "chain", "route", "path", "prefix", "mtls",
                 "reason")

    def __init__(self, outcome: str, peer: Any = None, decision: Any = None, chain: Any = None, route: Any = None,
                 path: Optional[str] = None, prefix: Optional["_HcmNames"] = None, mtls: bool = False,
                 reason: str = "") -> None:
        self.outcome = outcome
        self.peer = peer
        uris = peer.uri_sans if peer is not None else ()
        self.principal: Optional[str] = uris[0] if uris else None
        self.decision = decision
        self.policy: Optional[str] = decision.policy if decision is not None else None
        self.chain = chain
        self.route = route
        self.path = path
        self.prefix = prefix
        self.mtls = mtls
        self.reason = reason

    @property
    def allowed(self) -> bool:
        return self.outcome is ALLOWED

    @property
    def status(self) -> int:
        return _STATUS.get(self.outcome, 0)

    @property
    def body(self) -> bytes:
        return _BODIES.get(self.outcome, b"")

    @property
    def grpc_code(self) -> Optional[str]:
        return _GRPC.get(self.outcome)

    @property
    def grpc_message(self) -> str:
        return _GRPC_MESSAGE.get(self.outcome, "")

    @property
    def chain_name(self) -> Optional[str]:
        return self.chain.name if self.chain is not None else None

    def __repr__(self) -> str:
        extra = f", reason={self.reason!r}" if self.reason else ""
        return (f"Verdict({self.outcome}, principal={self.principal!r}, policy={self.policy!r}, "
                f"chain={self.chain_name!r}{extra})")


# -- stats ------------------------------------------------------------------------------------------


class _HcmNames:
    """The downstream request counters of one HTTP connection manager prefix (``http.<prefix>.``):
    ``counts`` in the order of ``stats``."""

    __slots__ = ("prefix", "base", "stats", "counts")

    TOTAL, COMPLETED, HTTP1, HTTP2, CLASSES = 0, 1, 2, 3, 4  # CLASSES + 0: no response; + n: nxx

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.base = f"http.{prefix}."
        self.stats = ("downstream_rq_total", "downstream_rq_completed", "downstream_rq_http1_total",
                      "downstream_rq_http2_total") + tuple(f"downstream_rq_{i}xx" for i in range(6))
        self.counts = [0] * len(self.stats)


_ALWAYS = frozenset({"downstream_rq_total", "downstream_rq_completed", "downstream_rq_2xx", "downstream_rq_4xx",
                     "downstream_rq_5xx"})


class InboundStats:
    """Envoy-named counters of the requests a server integration decided (see the module
    docstring for the names). Shared by every integration on one :class:`InboundListener`
    (:meth:`for_listener`), so the RBAC engines' own counters are read once.

    :meth:`snapshot` -> ``{stat name: value}``; ``stats[name]`` one value (0 when unknown);
    :meth:`prometheus_collector` a ``prometheus_client`` collector (``meshcore_http_<stat>`` with
    label ``stat_prefix``, ``meshcore_listener_<stat>`` with label ``listener``)."""

    _by_listener: "weakref.WeakKeyDictionary[Any, InboundStats]" = weakref.WeakKeyDictionary()
    _by_listener_lock = threading.Lock()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: Dict[str, int] = {}
        self._names: Dict[str, _HcmNames] = {}
        # RBAC engines whose counters are read live (bounded; strong refs), what was already folded
        # into _retired per engine (weak: a dead engine cannot count again)
        self._live: Dict[int, Tuple[Any, str]] = {}
        self._folded: "weakref.WeakKeyDictionary[Any, Dict[str, int]]" = weakref.WeakKeyDictionary()
        self._retired: Dict[str, int] = {}
        self._parts: Dict[str, Tuple[str, str, str]] = {}  # full name -> (kind, scope, stat)

    @classmethod
    def for_listener(cls, listener: Any) -> "InboundStats":
        """The stats object of ``listener`` (one per listener, made on first use)."""
        with cls._by_listener_lock:
            stats = cls._by_listener.get(listener)
            if stats is None:
                stats = cls._by_listener[listener] = cls()
            return stats

    # -- counting (the request path) ------------------------------------------------------------------

    def names(self, prefix: str) -> _HcmNames:
        n = self._names.get(prefix)
        if n is None:
            n = _HcmNames(prefix)
            with self._lock:
                for stat in n.stats:
                    self._parts[n.base + stat] = ("http", prefix, stat)
                n = self._names.setdefault(prefix, n)
        return n

    def listener_stat(self, listener: str, stat: str) -> str:
        """The full name of listener stat ``stat`` (``listener.<listener>.<stat>``), registered."""
        full = f"listener.{listener}.{stat}"
        with self._lock:
            self._parts[full] = ("listener", listener, stat)
        return full

    def _rbac_name(self, prefix: str, name: str) -> str:  # under the lock
        full = f"http.{prefix}.rbac.{name}"
        if full not in self._parts:
            self._parts[full] = ("http", prefix, "rbac." + name)
        return full

    def inc(self, name: str, by: int = 1) -> None:
        with self._lock:
            c = self._counters
            c[name] = c.get(name, 0) + by

    def response(self, names: _HcmNames, status: int, http2: bool) -> None:
        """One request finished at the HTTP connection manager ``names`` with ``status`` (0: no
        response was sent)."""
        cls = 4 + status // 100 if 100 <= status < 600 else 4
        c = names.counts
        with self._lock:
            c[0] += 1
            c[1] += 1
            c[3 if http2 else 2] += 1
            c[cls] += 1

    def track(self, engine: Any, prefix: str) -> None:
        """Report ``engine``'s own RBAC counters under ``http.<prefix>.rbac.``."""
        key = id(engine)
        if key in self._live:
            return
        with self._lock:
            if key in self._live:
                return
            self._live[key] = (engine, prefix)
            while len(self._live) > _LIVE_ENGINES_MAX:
                old = next(iter(self._live))
                self._fold(*self._live.pop(old))

    def _fold(self, engine: Any, prefix: str) -> None:  # under the lock
        current = dict(engine.stat_counters)
        before = self._folded.get(engine, {})
        for name, value in current.items():
            full = self._rbac_name(prefix, name)
            self._retired[full] = self._retired.get(full, 0) + value - before.get(name, 0)
        try:
            self._folded[engine] = current
        except TypeError:  # pragma: no cover - an engine that cannot be weakly referenced
            pass

    # -- reading --------------------------------------------------------------------------------------

    def snapshot(self) -> Dict[str, int]:
        with self._lock:
            out = dict(self._counters)
            for n in self._names.values():
                if n.counts[0]:
                    for stat, value in zip(n.stats, n.counts):
                        if value or stat in _ALWAYS:
                            out[n.base + stat] = value
            for name, value in self._retired.items():
                out[name] = out.get(name, 0) + value
            for engine, prefix in self._live.values():
                before = self._folded.get(engine, {})
                for name, value in engine.stat_counters.items():
                    full = self._rbac_name(prefix, name)
                    out[full] = out.get(full, 0) + value - before.get(name, 0)
        return out

    def rows(self) -> List[Tuple[str, str, str, int]]:
        """``(kind, scope, stat, value)`` per counter: kind ``http`` (scope: the stat prefix) or
        ``listener`` (scope: ``<address>_<port>``)."""
        snap = self.snapshot()
        with self._lock:
            parts = dict(self._parts)
        return [parts.get(name, ("other", "", name)) + (value,) for name, value in sorted(snap.items())]

    def __getitem__(self, name: str) -> int:
        return self.snapshot().get(name, 0)

    def get(self, name: str, default: int = 0) -> int:
        return self.snapshot().get(name, default)

    def prometheus_collector(self) -> Any:
        """A ``prometheus_client`` collector of :meth:`snapshot` (register it with
        ``prometheus_client.REGISTRY.register``)."""
        from prometheus_client.core import CounterMetricFamily

        stats = self

        class InboundCollector:
            def collect(self) -> Iterator[Any]:
                families: Dict[str, Any] = {}
                for kind, scope, stat, value in stats.rows():
                    if kind == "http":
                        label, metric = "stat_prefix", "meshcore_http_" + stat.replace(".", "_")
                    else:
                        label, metric = "listener", "meshcore_listener_" + stat.replace(".", "_")
                    fam = families.get(metric)
                    if fam is None:
                        fam = families[metric] = CounterMetricFamily(metric, f"Envoy {kind} stat {stat}",
                                                                     labels=[label])
                    fam.add_metric([scope], value)
                yield from families.values()

            def describe(self) -> List[Any]:
                return []

        return InboundCollector()

    def __repr__(self) -> str:
        return f"InboundStats({len(self.snapshot())} counters)"


# -- telemetry -------------------------------------------------------------------------------------


def destination_sinks(mesh: Any) -> Tuple[Any, ...]:
    """The telemetry sinks a served request's record goes to: ``mesh.telemetry``'s (Istio's
    standard-metrics sink included: it reports a ``reporter="destination"`` record with a server
    sidecar's labels)."""
    telemetry = getattr(mesh, "telemetry", None) if mesh is not None else None
    if telemetry is None:
        return ()
    return telemetry.sinks


def request_facts(headers: Any) -> Tuple[Optional[str], Any, bool]:
    """``(x-request-id, x-envoy-peer-metadata, asked)`` of a request's header pairs (bytes names, as
    ASGI gives them, or lower-case str names, as the WSGI and gRPC integrations make them);
    ``asked``: the request carried Istio's metadata exchange (either header), so a server sidecar
    answers with its own pair (istio/proxy peer_metadata filter: ``request_peer_received_``)."""
    request_id = peer = None
    asked = False
    for k, v in headers:
        n = len(k)
        if n == 12 and (k == b"x-request-id" or k == "x-request-id"):
            request_id = v.decode("latin-1") if isinstance(v, bytes) else v
        elif n == 21 and (k == b"x-envoy-peer-metadata" or k == "x-envoy-peer-metadata"):
            peer = v
            asked = True
        elif n == 24 and (k == b"x-envoy-peer-metadata-id" or k == "x-envoy-peer-metadata-id"):
            asked = True
    return request_id, peer, asked


def answer_exchange(mesh: Any, asked: bool) -> Any:
    """The mesh's metadata exchange (``peer_metadata.Exchange``: this workload's pair) to add to the
    response of a request that carried the caller's (``asked``), as a server sidecar does; None
    when the request did not ask or the exchange is off."""
    if not asked or mesh is None:
        return None
    telemetry = getattr(mesh, "telemetry", None)
    return telemetry.exchange if telemetry is not None else None


_failed_sinks: Dict[int, None] = {}
_CLOCK = [time.time() - time.monotonic(), 0.0]  # [epoch - monotonic, when to measure again]


def now() -> float:
    """The monotonic clock requests are timed with (:func:`emit`'s ``start``)."""
    return time.monotonic()


def emit(sinks: Sequence[Any], verdict: Verdict, method: str, path: str, authority: Optional[str], protocol: str,
         status: int, start: float, request_bytes: int = 0, response_bytes: int = 0,
         grpc_status: Optional[int] = None, request_id: Optional[str] = None, peer_metadata: Any = None) -> None:
    """Hand one ``reporter="destination"`` :class:`~meshcore.telemetry.record.RequestRecord` of a
    served (or refused) request to ``sinks`` (a sink's exception is logged once per sink, never
    raised). ``start``: :func:`now` when the request arrived; ``peer_metadata``: the request's raw
    ``x-envoy-peer-metadata`` (the caller's workload, Istio's metadata exchange), if any."""
    from ..telemetry.peer_metadata import decode_cached
    from ..telemetry.record import RequestRecord

    t = time.monotonic()
    c = _CLOCK
    if t > c[1]:
        c[0], c[1] = time.time() - t, t + 1.0
    outcome = verdict.outcome
    r = RequestRecord.__new__(RequestRecord)
    r.reporter = "destination"
    r.target = r.authority = authority or ""
    r.method = method
    r.path = path
    r.protocol = protocol
    route = verdict.route
    r.route_name = (route.name or None) if route is not None else None
    r.cluster = r.upstream_host = r.endpoint = r.upstream_failure = None
    r.peer_metadata = decode_cached(peer_metadata) if peer_metadata else None
    r.response_code = status
    r.grpc_status = grpc_status
    r.response_flags = "NR" if outcome is NO_ROUTE or outcome is NO_CHAIN else "-"
    r.attempts = 0
    r.start_time = start + c[0]
    r.duration_ms = (t - start) * 1000.0
    r.request_bytes = request_bytes
    r.response_bytes = response_bytes
    r.request_id = request_id
    r.connection_security_policy = "mutual_tls" if verdict.mtls else "none"
    r.principal = verdict.principal
    r.request_messages = r.response_messages = 1 if protocol == "grpc" else 0
    if outcome is ALLOWED:
        r.response_code_details = "via_upstream" if status else None
    elif outcome is DENIED:
        r.response_code_details = verdict.decision.details if verdict.decision is not None else "rbac_access_denied"
    else:
        r.response_code_details = _DETAILS.get(outcome)
    for sink in sinks:
        try:
            sink(r)
        except Exception:  # noqa: BLE001 - a sink never fails the request
            if id(sink) not in _failed_sinks:
                _failed_sinks[id(sink)] = None
                log.exception("telemetry sink %r failed on a served request (logged once)", sink)


_DETAILS = {NO_ROUTE: "route_not_found", NOT_SERVING: "meshcore_not_serving", NO_CHAIN: "filter_chain_not_found",
            UNSERVED_ROUTE: "meshcore_route_not_served"}


def listener_of(mesh: Any, listener: Any, rbac: Any) -> Any:
    """The ``listener`` argument of the server integrations: an InboundListener, a port
    (``mesh.serve(port)``), or None. A mesh without ``listener`` or ``rbac`` is refused: it would
    serve without the mesh's policy."""
    if isinstance(listener, bool):
        raise TypeError("listener must be an InboundListener or a port")
    if isinstance(listener, int):
        if mesh is None:
            raise ValueError("listener=<port> needs the mesh (mesh.serve(port)); or pass listener=mesh.serve(port)")
        return mesh.serve(listener)
    if listener is None and rbac is None and mesh is not None:
        raise ValueError("a mesh without listener= or rbac= would serve without the mesh's policy: pass "
                         "listener=mesh.serve(port) (or the port), or rbac=RbacEngine (local policy)")
    return listener


# -- the gate --------------------------------------------------------------------------------------

_NO_CERT: Any = None  # PeerCertificate(): a TLS connection without a client certificate


def _no_cert() -> Any:
    global _NO_CERT
    if _NO_CERT is None:
        from ..rbac import PeerCertificate

        _NO_CERT = PeerCertificate()
    return _NO_CERT


_ips: Dict[Any, Optional[str]] = {}


def ip_or_none(host: Any) -> Optional[str]:
    """``host`` when it is an IP address literal (normalized), else None: not an IP connection,
    no CIDR rule matches it (e.g. a unix socket path, Starlette's ``"testclient"``)."""
    try:
        return _ips[host]
    except KeyError:
        pass
    except TypeError:
        return None
    try:
        out: Optional[str] = str(ipaddress.ip_address(host.strip("[]") if isinstance(host, str) else host))
    except (ValueError, TypeError, AttributeError):
        out = None
    if len(_ips) >= _CACHE_MAX:
        _ips.clear()
    _ips[host] = out
    return out


_AUTHORITY_NAMES = frozenset({":authority", "host"})


def _deny_reads_authority(rbac: Any) -> bool:
    """Whether an RBAC HTTP filter config's DENY rules (enforced or shadow) have a header matcher on
    ``:authority`` / ``host`` anywhere."""
    for field in ("rules", "shadow_rules"):
        if not rbac.HasField(field):
            continue
        rules = getattr(rbac, field)
        if rules.action != rules.DENY:
            continue
        stack = [rules]
        while stack:
            msg = stack.pop()
            if msg.DESCRIPTOR.full_name == "envoy.config.route.v3.HeaderMatcher" and \
                    msg.name.lower() in _AUTHORITY_NAMES:
                return True
            for fd, value in msg.ListFields():
                if fd.message_type is None:
                    continue
                if hasattr(value, "ListFields"):  # a message
                    stack.append(value)
                elif fd.message_type.GetOptions().map_entry:  # a map (policies: name -> Policy)
                    stack.extend(v for v in value.values() if hasattr(v, "ListFields"))
                else:  # a repeated message field
                    stack.extend(value)
    return False


def _matches_headers(spec: Any) -> bool:
    if getattr(spec, "vhost_header", ""):
        return True
    for vh in spec.virtual_hosts:
        for r in vh.routes:
            if r.headers or r.grpc:
                return True
    return False


def str_headers(headers: Any) -> Any:
    """``(name, value)`` pairs as str (ASGI gives bytes); str pairs unchanged."""
    if headers and isinstance(headers[0][0], bytes):
        return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]
    return headers


class _ChainInfo:
    """What the gate precomputes for one filter chain (per gate, per snapshot)."""

    __slots__ = ("chain", "refusal", "names", "normalize", "merge", "tcp", "matchers", "admitted", "route_headers",
                 "_deny_authority")

    def __init__(self, chain: Any, names: Optional[_HcmNames], refusal: str) -> None:
        self.chain = chain
        self.refusal = refusal
        self.names = names
        self.normalize = bool(getattr(chain, "normalize_path", False))
        self.merge = bool(getattr(chain, "merge_slashes", False))
        self.tcp = getattr(chain, "kind", "http") == "tcp"
        rc = getattr(chain, "route_config", None)
        #: the route configuration matches on headers (else routing gets none: cheaper)
        self.route_headers = rc is not None and _matches_headers(rc.spec)
        self._deny_authority: Optional[bool] = None
        tls = getattr(chain, "tls", None)
        self.matchers = tuple(tls.san_matchers) if tls is not None else ()
        # (tls, id(peer)) -> (peer, "" or why refused); the entry holds the peer, so its id is not reused
        self.admitted: Dict[Tuple[bool, int], Tuple[Any, str]] = {}

    @property
    def deny_reads_authority(self) -> bool:
        """A DENY RBAC filter of the chain matches on ``:authority`` / ``host`` (Istio ``hosts``)."""
        if self._deny_authority is None:
            self._deny_authority = any(_deny_reads_authority(msg) for _, msg in
                                       getattr(self.chain, "rbac_filters", ()))
        return self._deny_authority

    def admits(self, tls: bool, peer: Any) -> str:
        """"" when a connection with this transport may use the chain, else why not (cached per
        peer object: servers keep one per connection)."""
        hit = self.admitted.get((tls, id(peer)))
        if hit is not None and hit[0] is peer:
            return hit[1]
        why = self._admits(tls, peer)
        if len(self.admitted) >= 256:
            self.admitted.clear()
        self.admitted[(tls, id(peer))] = (peer, why)
        return why

    def _admits(self, tls: bool, peer: Any) -> str:
        spec = getattr(self.chain, "tls", None)
        if spec is None:
            return ""
        if not tls:
            return f"chain {self.chain.name!r} requires TLS; the connection is plaintext"
        if spec.require_client_certificate and peer is None:
            return f"chain {self.chain.name!r} requires a client certificate; the client sent none"
        if self.matchers and peer is not None:
            from ..tls.san import describe_matchers, sans_match

            sans = {"URI": list(peer.uri_sans), "DNS": list(peer.dns_sans), "EMAIL": [], "IP_ADDRESS": []}
            if not sans_match(self.matchers, sans):
                return (f"chain {self.chain.name!r}: the client certificate's SANs match none of "
                        f"{describe_matchers(self.matchers)}")
        return ""


class _Cache(NamedTuple):
    snap: Any
    conns: Dict[Any, _ChainInfo]
    chains: Dict[int, _ChainInfo]


class InboundGate:
    """Decides requests for one server (see the module docstring). ``listener``: an
    :class:`~meshcore.inbound.InboundListener` (``mesh.serve(port)``); ``rbac``: an
    :class:`~meshcore.rbac.RbacEngine` for use without xDS (not both); ``stat_prefix``: the HTTP
    stat prefix (default: the chain's HCM ``stat_prefix``, else ``inbound_<address>_<port>`` of the
    listener, else ``inbound``); ``stats``: an :class:`InboundStats` (default: the listener's
    shared one, else a new one)."""

    def __init__(self, listener: Any = None, rbac: Any = None, *, stat_prefix: Optional[str] = None,
                 stats: Optional[InboundStats] = None) -> None:
        if listener is not None and rbac is not None:
            raise ValueError("give listener= (policy from xDS) or rbac= (a local RbacEngine), not both")
        if listener is not None and not (hasattr(listener, "select") and hasattr(listener, "snapshot")):
            raise TypeError(f"listener must be an InboundListener (mesh.serve(port)), got {type(listener).__name__}")
        if rbac is not None and not callable(getattr(rbac, "evaluate", None)):
            raise TypeError(f"rbac must be a meshcore.RbacEngine, got {type(rbac).__name__}")
        if stat_prefix is not None and (not isinstance(stat_prefix, str) or not stat_prefix):
            raise TypeError("stat_prefix must be a non-empty str")
        if stats is not None and not isinstance(stats, InboundStats):
            raise TypeError(f"stats must be an InboundStats, got {type(stats).__name__}")
        self.listener = listener
        self._rbac = rbac
        self._explicit_prefix = stat_prefix
        self.stats = stats if stats is not None else (
            InboundStats.for_listener(listener) if listener is not None else InboundStats())
        if listener is not None:
            self._default_prefix = f"inbound_{listener.address}_{listener.port}"
            scope = f"{listener.address}_{listener.port}"
            self._not_serving = self.stats.listener_stat(scope, "not_serving")
            self._no_chain = self.stats.listener_stat(scope, "no_filter_chain_match")
        else:
            self._default_prefix = "inbound"
        self._static_names = self.stats.names(stat_prefix or self._default_prefix)
        #: the stat names of requests decided without a chain (no listener)
        self.default_names = self._static_names
        if rbac is not None:
            self.stats.track(rbac, self._static_names.prefix)
        # (snapshot, connection key -> chain info, id(chain) -> chain info): replaced whole when the
        # listener's snapshot changes, so an entry is only ever read with the snapshot it came from
        self._cache: _Cache = _Cache(None, {}, {})
        self._lock = threading.Lock()
        self._warned: Dict[str, None] = {}

    @property
    def rbac(self) -> Any:
        """The local RBAC engine (no listener); assign a new one to change the policy for the next
        requests."""
        return self._rbac

    @rbac.setter
    def rbac(self, engine: Any) -> None:
        if self.listener is not None:
            raise ValueError("this gate takes its policy from its listener (xDS); rbac cannot be set")
        if engine is not None and not callable(getattr(engine, "evaluate", None)):
            raise TypeError(f"rbac must be a meshcore.RbacEngine, got {type(engine).__name__}")
        if engine is not None:
            self.stats.track(engine, self._static_names.prefix)
        self._rbac = engine

    @property
    def port(self) -> Optional[int]:
        return self.listener.port if self.listener is not None else None

    # -- one request ---------------------------------------------------------------------------------

    def check(self, source_ip: Optional[str], source_port: int, destination_ip: Optional[str],
              destination_port: Optional[int], tls: bool, peer: Any, server_name: Optional[str],
              alpn: Optional[Tuple[str, ...]], method: str, path: str, headers: Any,
              authority: Optional[str], authority_unknown: bool = False) -> Verdict:
        """Decide one request. ``source_ip``/``destination_ip``: IP literals or None (see
        :func:`ip_or_none`); ``tls``: the connection is TLS; ``peer``: its verified client
        certificate (None: none / plaintext); ``alpn``: what Envoy's inspectors would report (see
        the integrations); ``path``: the raw path with the query; ``headers``: ``(name, value)``
        pairs, str or bytes (ASGI's, passed as they are: RBAC builds its header map only when
        a rule reads a header), names lower-case. ``authority_unknown``: the request had an
        ``:authority`` the server does not show (grpc.aio): a chain whose DENY rules read it then
        denies, rather than guess (fail closed)."""
        rbac_peer = peer if peer is not None else (_no_cert() if tls else None)
        mtls = peer is not None
        lst = self.listener
        if lst is None:
            engine = self._rbac
            decision = None
            if engine is not None:
                decision = engine.evaluate(method, path, headers, authority, None, source_ip, source_port,
                                           destination_ip, destination_port, server_name, peer=rbac_peer)
                if not decision.allowed:
                    return Verdict(DENIED, peer, decision, None, None, path, self._static_names, mtls)
            return Verdict(ALLOWED, peer, decision, None, None, path, self._static_names, mtls)

        snap = lst.snapshot
        if snap is None:
            self.stats.inc(self._not_serving)
            return Verdict(NOT_SERVING, peer, mtls=mtls, reason=lst.error or "not serving")
        cache = self._cache
        if cache.snap is not snap:
            cache = self._new_snapshot(snap)
        key = (source_ip, source_port, destination_ip, destination_port, tls, server_name, alpn)
        info = cache.conns.get(key)
        if info is None:
            info = self._select(cache, key)
        why = info.refusal or info.admits(tls, peer)
        if why:
            self.stats.inc(self._no_chain)
            self._warn_once(why)
            return Verdict(NO_CHAIN, peer, chain=info.chain, mtls=mtls, reason=why)
        chain = info.chain
        if info.tcp:  # Envoy shape tcp_proxy: no L7 policy, as a sidecar would pass the bytes through
            return Verdict(ALLOWED, peer, None, chain, None, path, None, mtls)
        if info.normalize or info.merge:
            from ..xds.envoy_shape import normalize_path

            path = normalize_path(path, canonical=info.normalize, merge_slashes=info.merge)
        route = chain.route(authority, path, str_headers(headers) if info.route_headers else None, method) \
            if chain.route_config is not None else None
        try:
            engine = chain.rbac_for(route)
        except Exception as e:  # ConfigError: RBAC filters but no engine -- refuse, never "no RBAC"
            self._warn_once(f"chain {chain.name!r}: {e}")
            return Verdict(NO_CHAIN, peer, chain=chain, mtls=mtls, reason=str(e))
        decision = None
        if engine is not None:
            decision = engine.evaluate(method, path, headers, authority, None, source_ip, source_port,
                                       destination_ip, destination_port, server_name, peer=rbac_peer)
            if not decision.allowed:
                return Verdict(DENIED, peer, decision, chain, route, path, info.names, mtls)
            if authority_unknown and authority is None and info.deny_reads_authority:
                why = (f"chain {chain.name!r}: a DENY rule matches on :authority, which this server does not "
                       "expose (grpc.aio): denied rather than guessed")
                self._warn_once(why)
                return Verdict(DENIED, peer, None, chain, route, path, info.names, mtls, reason=why)
        if route is None:
            if chain.route_config is not None:
                return Verdict(NO_ROUTE, peer, decision, chain, None, path, info.names, mtls)
        elif not route.serves:
            return Verdict(UNSERVED_ROUTE, peer, decision, chain, route, path, info.names, mtls,
                           reason=f"route action {route.action!r}")
        return Verdict(ALLOWED, peer, decision, chain, route, path, info.names, mtls)

    # -- chains ---------------------------------------------------------------------------------------

    def _new_snapshot(self, snap: Any) -> "_Cache":
        """The cache of ``snap``: a new one installed when ``snap`` is newer than the current
        one; for an older snapshot (a request that read it just before an update) a throwaway."""
        with self._lock:
            cur = self._cache
            if cur.snap is snap:
                return cur
            cache = _Cache(snap, {}, {})
            if cur.snap is None or snap.version > cur.snap.version:
                self._cache = cache
            return cache

    def _select(self, cache: "_Cache", key: Tuple[Any, ...]) -> _ChainInfo:
        src, sport, dst, dport, tls, sni, alpn = key
        chain = cache.snap.select(src, sport, dst, dport or 0, tls, sni, alpn)
        info = cache.chains.get(id(chain)) if chain is not None else None
        if info is None or info.chain is not chain:
            info = self._chain_info(chain)
            if chain is not None:
                cache.chains[id(chain)] = info
        conns = cache.conns
        if len(conns) >= _CACHE_MAX:
            conns.clear()
        conns[key] = info
        return info

    def _chain_info(self, chain: Any) -> _ChainInfo:
        if chain is None:
            return _ChainInfo(None, None, "no filter chain matches the connection (and no default chain)")
        refusal = ""
        if chain.unsupported:
            refusal = f"chain {chain.name!r} uses what meshcore cannot honour: " + "; ".join(chain.unsupported)
        elif chain.kind not in ("http", "tcp"):
            refusal = f"chain {chain.name!r} is not an HTTP (or tcp_proxy) chain"
        prefix = self._explicit_prefix or chain.stat_prefix or self._default_prefix
        names = self.stats.names(prefix)
        if not refusal and chain.kind == "http":
            try:
                engine = chain.rbac
            except Exception as e:  # noqa: BLE001 - refused per request with the reason
                refusal = f"chain {chain.name!r}: {e}"
            else:
                if engine is not None:
                    self.stats.track(engine, prefix)
        return _ChainInfo(chain, names, refusal)

    def _warn_once(self, why: str) -> None:
        if why not in self._warned:
            if len(self._warned) > 256:
                self._warned.clear()
            self._warned[why] = None
            log.warning("inbound: refusing requests: %s", why)


class GateViews:
    """``listener`` / ``rbac`` (settable) / ``stats`` views of an object's :class:`InboundGate`
    (``self.gate``): the server integrations' shared surface."""

    gate: InboundGate

    @property
    def listener(self) -> Any:
        return self.gate.listener

    @property
    def rbac(self) -> Any:
        return self.gate.rbac

    @rbac.setter
    def rbac(self, engine: Any) -> None:
        self.gate.rbac = engine

    @property
    def stats(self) -> InboundStats:
        return self.gate.stats


class GatedMiddleware(GateViews):
    """What the ASGI and WSGI middlewares share: the application and its :class:`InboundGate`
    (the listener or local RBAC engine, stats), with ``listener`` / ``rbac`` / ``stats`` views."""

    _kind = "an"

    def __init__(self, app: Any, mesh: Any = None, *, listener: Any = None, rbac: Any = None,
                 stat_prefix: Optional[str] = None, stats: Optional[InboundStats] = None) -> None:
        if not callable(app):
            raise TypeError(f"app must be {self._kind} application, got {type(app).__name__}")
        self.app = app
        self.mesh = mesh
        self.gate = InboundGate(listener_of(mesh, listener, rbac), rbac, stat_prefix=stat_prefix, stats=stats)
