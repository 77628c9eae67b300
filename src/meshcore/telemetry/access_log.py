"""Access logs: one line per finished request, through :mod:`logging`, as an Envoy sidecar writes it.

Off by default. ``mesh.telemetry.enable_access_log(format="envoy", logger=None)`` registers an
:class:`AccessLog` sink (returned; ``mesh.telemetry.remove_sink(sink)`` stops it) that renders each
:class:`~meshcore.telemetry.record.RequestRecord` with an Envoy format and logs it at ``INFO`` on
the ``meshcore.access`` logger (or the one given). Formats:

* ``"envoy"``: Envoy's default format (:data:`ENVOY_FORMAT`, envoyproxy/envoy docs
  configuration/observability/access_log "Default Format String");
* ``"istio"``: what a sidecar writes when ``meshConfig.accessLogFile`` is set (:data:`ISTIO_FORMAT`,
  istio/istio pilot/pkg/model/telemetry_logging.go ``EnvoyTextLogFormat``);
* ``"json"``: Istio's ``accessLogEncoding: JSON`` (:data:`ISTIO_JSON_FORMAT`, ``EnvoyJSONLogFormatIstio``)
  rendered as Envoy's ``json_format``: one object per line, keys sorted, numbers for the numeric
  operators, ``null`` for unknown values;
* any Envoy format string (``"%RESPONSE_CODE% %RESPONSE_FLAGS%"``), or a dict (a ``json_format``).

The formatter (:func:`compile_format`) parses as Envoy's ``SubstitutionFormatParser`` does
(``%%`` is a ``%``, ``%OPERATOR(args):max_length%``, unknown operators refused at enable time) and
answers the command operators a record can answer; the others Envoy knows render ``-`` (``null``
in JSON), as Envoy renders a value it does not have. meshcore runs in the application's process,
so there is no downstream connection: downstream addresses, TLS and SNI are ``-``. Answered:
``START_TIME``/``START_TIME_LOCAL``/``EMIT_TIME`` (strftime and Envoy's ``%s``, ``%f``, ``%<n>f``,
``%E<n>S``), ``REQ``/``REQ_WITHOUT_QUERY`` for ``:method``, ``:path``, ``:authority``/``host``,
``x-request-id`` (and a gRPC request's ``content-type``), ``RESPONSE_CODE`` (0: no response),
``RESPONSE_FLAGS[_LONG]``, ``RESPONSE_CODE_DETAILS``, ``BYTES_RECEIVED``/``BYTES_SENT`` (the bodies
meshcore knows of), ``DURATION``, ``PROTOCOL`` (``HTTP/2`` for gRPC; an HTTP client's version is not
known), ``UPSTREAM_HOST``/``UPSTREAM_REMOTE_ADDRESS[_WITHOUT_PORT]``/``UPSTREAM_REMOTE_PORT`` (the
last attempt's endpoint), ``UPSTREAM_CLUSTER[_RAW]``, ``ROUTE_NAME``, ``UPSTREAM_REQUEST_ATTEMPT_COUNT``,
``GRPC_STATUS[(CAMEL_STRING|SNAKE_STRING|NUMBER)]``/``GRPC_STATUS_NUMBER``, ``DOWNSTREAM_PEER_URI_SAN``
(server side), ``HOSTNAME``, ``UNIQUE_ID``.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import time
import uuid
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from .record import NO_FLAGS, RequestRecord

__all__ = ["AccessLog", "ENVOY_FORMAT", "ISTIO_FORMAT", "ISTIO_JSON_FORMAT", "FORMATS", "LOGGER_NAME", "LONG_FLAGS",
           "compile_format", "enable_access_log"]

log = logging.getLogger(__name__)

#: the logger the lines go to unless another is given
LOGGER_NAME = "meshcore.access"

#: Envoy's default access log format
ENVOY_FORMAT = ('[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
                '%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% '
                '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
                '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"\n')

#: Istio's text format (``EnvoyTextLogFormat``, Istio 1.9 on)
ISTIO_FORMAT = ('[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
                '%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% '
                '"%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% '
                '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
                '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER_RAW% '
                '%UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% '
                '%REQUESTED_SERVER_NAME% %ROUTE_NAME%\n')

#: Istio's JSON format (``EnvoyJSONLogFormatIstio``)
ISTIO_JSON_FORMAT: Dict[str, str] = {
    "start_time": "%START_TIME%",
    "route_name": "%ROUTE_NAME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "response_code_details": "%RESPONSE_CODE_DETAILS%",
    "connection_termination_details": "%CONNECTION_TERMINATION_DETAILS%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "duration": "%DURATION%",
    "upstream_service_time": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    "x_forwarded_for": "%REQ(X-FORWARDED-FOR)%",
    "user_agent": "%REQ(USER-AGENT)%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "authority": "%REQ(:AUTHORITY)%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_cluster": "%UPSTREAM_CLUSTER_RAW%",
    "upstream_local_address": "%UPSTREAM_LOCAL_ADDRESS%",
    "downstream_local_address": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "requested_server_name": "%REQUESTED_SERVER_NAME%",
    "upstream_transport_failure_reason": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
}

FORMATS: Dict[str, Union[str, Dict[str, str]]] = {"envoy": ENVOY_FORMAT, "istio": ISTIO_FORMAT,
                                                  "json": ISTIO_JSON_FORMAT}

#: Envoy's long response flag names (``%RESPONSE_FLAGS_LONG%``; source/common/stream_info/utility.h)
LONG_FLAGS: Dict[str, str] = {
    "LH": "FailedLocalHealthCheck", "UH": "NoHealthyUpstream", "UT": "UpstreamRequestTimeout",
    "LR": "LocalReset", "UR": "UpstreamRemoteReset", "UF": "UpstreamConnectionFailure",
    "UC": "UpstreamConnectionTermination", "UO": "UpstreamOverflow", "NR": "NoRouteFound",
    "DI": "DelayInjected", "FI": "FaultInjected", "RL": "RateLimited", "UAEX": "UnauthorizedExternalService",
    "RLSE": "RateLimitServiceError", "DC": "DownstreamConnectionTermination", "URX": "UpstreamRetryLimitExceeded",
    "SI": "StreamIdleTimeout", "IH": "InvalidEnvoyRequestHeaders", "DPE": "DownstreamProtocolError",
    "UMSDR": "UpstreamMaxStreamDurationReached", "RFCF": "ResponseFromCacheFilter",
    "NFCF": "NoFilterConfigFound", "DT": "DurationTimeout", "UPE": "UpstreamProtocolError",
    "NC": "NoClusterFound", "OM": "OverloadManagerTerminated", "DF": "DnsResolutionFailed",
    "DO": "DropOverload", "DR": "DownstreamRemoteReset", "UDO": "UnconditionalDropOverload",
}

#: ``%GRPC_STATUS%`` spellings: CAMEL_STRING (Envoy's ``Grpc::Utility::grpcStatusToString``) and
#: SNAKE_STRING (``absl::StatusCodeToString``), by code
_GRPC_CAMEL = ("OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound", "AlreadyExists",
               "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange",
               "Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated")
_GRPC_SNAKE = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
               "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
               "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")

# -- values ------------------------------------------------------------------------------------------
# A compiled operator is ``value(record) -> str | int | None`` (None: unknown; "-" in text, null in JSON).

Value = Union[str, int, None]
Getter = Callable[[RequestRecord], Value]

_HOSTNAME = socket.gethostname()


def _or_none(v: Any) -> Optional[str]:
    return v if v else None


def _flags_long(r: RequestRecord) -> str:
    flags = r.response_flags or NO_FLAGS
    if flags == NO_FLAGS:
        return NO_FLAGS
    return ",".join(LONG_FLAGS.get(f, f) for f in flags.split(","))


def _protocol(r: RequestRecord) -> Optional[str]:
    # gRPC is HTTP/2; for HTTP meshcore does not know which version the client spoke
    return "HTTP/2" if r.protocol == "grpc" else None


def _grpc_status(r: RequestRecord) -> Optional[int]:
    return r.grpc_status if r.protocol == "grpc" and r.grpc_status is not None else None


def _host_part(r: RequestRecord, port: bool) -> Optional[str]:
    h = r.upstream_host
    if not h:
        return None
    host, sep, p = h.rpartition(":")
    if not sep:
        return None if port else h
    return p if port else host.strip("[]")


def _without_query(v: Optional[str]) -> Optional[str]:
    if v is None:
        return None
    q = v.find("?")
    return v if q < 0 else v[:q]


#: the request headers a record keeps (lower case): everything else is unknown
_REQUEST_HEADERS: Dict[str, Callable[[RequestRecord], Optional[str]]] = {
    ":method": lambda r: _or_none(r.method),
    ":path": lambda r: _or_none(r.path),
    ":authority": lambda r: _or_none(r.authority),
    "host": lambda r: _or_none(r.authority),
    "x-request-id": lambda r: _or_none(r.request_id),
    "content-type": lambda r: "application/grpc" if r.protocol == "grpc" else None,
}

_NO_ARGS: Dict[str, Getter] = {
    "RESPONSE_CODE": lambda r: r.response_code or 0,
    "RESPONSE_FLAGS": lambda r: r.response_flags or NO_FLAGS,
    "RESPONSE_FLAGS_LONG": _flags_long,
    "RESPONSE_CODE_DETAILS": lambda r: _or_none(r.response_code_details),
    "BYTES_RECEIVED": lambda r: r.request_bytes or 0,
    "BYTES_SENT": lambda r: r.response_bytes or 0,
    "DURATION": lambda r: int(r.duration_ms),
    "PROTOCOL": _protocol,
    "UPSTREAM_HOST": lambda r: _or_none(r.upstream_host),
    "UPSTREAM_REMOTE_ADDRESS": lambda r: _or_none(r.upstream_host),
    "UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": lambda r: _host_part(r, False),
    "UPSTREAM_REMOTE_PORT": lambda r: _host_part(r, True),
    "UPSTREAM_CLUSTER": lambda r: _or_none(r.cluster),
    "UPSTREAM_CLUSTER_RAW": lambda r: _or_none(r.cluster),
    "ROUTE_NAME": lambda r: _or_none(r.route_name),
    "UPSTREAM_REQUEST_ATTEMPT_COUNT": lambda r: r.attempts or 0,
    "GRPC_STATUS_NUMBER": _grpc_status,
    "DOWNSTREAM_PEER_URI_SAN": lambda r: _or_none(r.principal),
    "HOSTNAME": lambda r: _HOSTNAME,
    "UNIQUE_ID": lambda r: str(uuid.uuid4()),
}

#: operators Envoy knows whose value meshcore does not have: "-" (null in JSON)
_UNKNOWN = frozenset({
    "UPSTREAM_TRANSPORT_FAILURE_REASON", "CONNECTION_TERMINATION_DETAILS", "UPSTREAM_LOCAL_ADDRESS",
    "UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT", "UPSTREAM_LOCAL_PORT", "UPSTREAM_HOST_NAME",
    "UPSTREAM_HOST_NAME_WITHOUT_PORT", "DOWNSTREAM_LOCAL_ADDRESS",
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT", "DOWNSTREAM_LOCAL_PORT", "DOWNSTREAM_REMOTE_ADDRESS",
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT", "DOWNSTREAM_REMOTE_PORT", "DOWNSTREAM_DIRECT_REMOTE_ADDRESS",
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT", "DOWNSTREAM_DIRECT_REMOTE_PORT",
    "DOWNSTREAM_DIRECT_LOCAL_ADDRESS", "DOWNSTREAM_DIRECT_LOCAL_ADDRESS_WITHOUT_PORT",
    "DOWNSTREAM_DIRECT_LOCAL_PORT", "REQUESTED_SERVER_NAME", "REQUEST_DURATION", "REQUEST_TX_DURATION",
    "RESPONSE_DURATION", "RESPONSE_TX_DURATION", "DOWNSTREAM_HANDSHAKE_DURATION", "ROUNDTRIP_DURATION",
    "UPSTREAM_CONNECTION_POOL_READY_DURATION", "CONNECTION_ID", "UPSTREAM_CONNECTION_ID", "STREAM_ID",
    "DOWNSTREAM_TLS_VERSION", "DOWNSTREAM_TLS_CIPHER", "DOWNSTREAM_TLS_SESSION_ID", "DOWNSTREAM_PEER_SUBJECT",
    "DOWNSTREAM_PEER_ISSUER", "DOWNSTREAM_PEER_SERIAL", "DOWNSTREAM_PEER_FINGERPRINT_256",
    "DOWNSTREAM_PEER_FINGERPRINT_1", "DOWNSTREAM_PEER_CERT", "DOWNSTREAM_PEER_DNS_SAN",
    "DOWNSTREAM_LOCAL_URI_SAN", "DOWNSTREAM_LOCAL_DNS_SAN", "DOWNSTREAM_LOCAL_SUBJECT",
    "UPSTREAM_TLS_VERSION", "UPSTREAM_TLS_CIPHER", "UPSTREAM_TLS_SESSION_ID", "UPSTREAM_PEER_URI_SAN",
    "UPSTREAM_PEER_DNS_SAN", "UPSTREAM_PEER_SUBJECT", "UPSTREAM_PEER_ISSUER", "UPSTREAM_PEER_CERT",
    "UPSTREAM_LOCAL_URI_SAN", "UPSTREAM_LOCAL_DNS_SAN", "UPSTREAM_LOCAL_SUBJECT", "VIRTUAL_CLUSTER_NAME",
    "LOCAL_REPLY_BODY", "UPSTREAM_WIRE_BYTES_SENT", "UPSTREAM_WIRE_BYTES_RECEIVED", "UPSTREAM_HEADER_BYTES_SENT",
    "UPSTREAM_HEADER_BYTES_RECEIVED", "DOWNSTREAM_WIRE_BYTES_SENT", "DOWNSTREAM_WIRE_BYTES_RECEIVED",
    "DOWNSTREAM_HEADER_BYTES_SENT", "DOWNSTREAM_HEADER_BYTES_RECEIVED", "BYTES_RETRANSMITTED",
    "PACKETS_RETRANSMITTED", "UPSTREAM_BYTES_RETRANSMITTED", "UPSTREAM_PACKETS_RETRANSMITTED",
    "DOWNSTREAM_TRANSPORT_FAILURE_REASON", "TRACE_ID", "ACCESS_LOG_TYPE",
    "CUSTOM_FLAGS", "UPSTREAM_PROTOCOL",
})

#: operators with arguments: the request/response headers, metadata and filter state, times
_WITH_ARGS = frozenset({"REQ", "RESP", "TRAILER", "START_TIME", "START_TIME_LOCAL", "EMIT_TIME",
                        "EMIT_TIME_LOCAL", "GRPC_STATUS", "REQ_WITHOUT_QUERY", "DYNAMIC_METADATA",
                        "CLUSTER_METADATA", "UPSTREAM_METADATA", "FILTER_STATE", "UPSTREAM_FILTER_STATE",
                        "COMMON_DURATION", "ENVIRONMENT", "METADATA", "CEL"})

#: the operators that take a ``:max_length``
_WITH_LENGTH = frozenset({"REQ", "RESP", "TRAILER", "REQ_WITHOUT_QUERY", "DYNAMIC_METADATA", "CLUSTER_METADATA",
                          "UPSTREAM_METADATA", "FILTER_STATE", "UPSTREAM_FILTER_STATE", "ENVIRONMENT", "METADATA",
                          "CEL"})

_COMMAND = re.compile(r"%([A-Z0-9_]+)(\([^)]*\))?(:[0-9]+)?%")
_TIME_SPEC = re.compile(r"%(?:E(\d|\*)S|E(\d|\*)f|(\d)?f|s|%)")
_DEFAULT_TIME = "%Y-%m-%dT%H:%M:%E3SZ"


def _time_getter(fmt: str, local: bool, emit: bool) -> Getter:
    """``START_TIME(fmt)`` & co: ``fmt`` (default Envoy's) is strftime plus ``%s`` (epoch seconds),
    ``%f``/``%<n>f`` (fraction, 9/n digits), ``%E<n>S``/``%E*S`` (seconds with n/6 digits) and
    ``%E<n>f``/``%E*f`` (fraction digits), as Envoy/absl. The strftime parts are cached per second."""
    fmt = fmt or _DEFAULT_TIME
    # the format as strftime segments (even positions) and the specs between them (odd): ("s",),
    # ("S", n) seconds with n digits, ("f", n) n fraction digits
    pieces: List[Any] = []
    pos = 0
    for m in _TIME_SPEC.finditer(fmt):
        text = m.group(0)
        if text == "%%":
            continue  # strftime's own
        pieces.append(fmt[pos:m.start()])
        if text == "%s":
            pieces.append(("s", 0))
        elif m.group(1) is not None:
            pieces.append(("S", 6 if m.group(1) == "*" else int(m.group(1))))
        elif m.group(2) is not None:
            pieces.append(("f", 6 if m.group(2) == "*" else int(m.group(2))))
        else:
            pieces.append(("f", int(m.group(3)) if m.group(3) else 9))
        pos = m.end()
    pieces.append(fmt[pos:])
    convert = time.localtime if local else time.gmtime
    cache: List[Any] = [(None, None)]  # [(epoch second, its strftime segments and tm_sec)]

    def at(t: float) -> str:
        micros = int(round(t * 1_000_000))
        secs, frac_us = divmod(micros, 1_000_000)
        cached_secs, done = cache[0]
        if cached_secs != secs:
            tm = convert(secs)
            done = ([time.strftime(p, tm) if i % 2 == 0 else p for i, p in enumerate(pieces)], tm.tm_sec)
            cache[0] = (secs, done)
        segments, sec = done
        if len(segments) == 1:
            return segments[0]
        nanos = f"{frac_us:06d}000"
        out = []
        for i, p in enumerate(segments):
            if i % 2 == 0:
                out.append(p)
                continue
            kind, n = p
            if kind == "s":
                out.append(str(secs))
            elif kind == "S":
                out.append(f"{sec:02d}.{nanos[:n]}" if n else f"{sec:02d}")
            else:
                out.append(nanos[:n])
        return "".join(out)

    if emit:
        return lambda r: at(time.time())
    return lambda r: at(r.start_time)


def _header_getter(args: str, name: str, strip_query: bool = False) -> Getter:
    if not args:
        raise ValueError(f"{name} requires parameters")
    parts = args.split("?")
    if len(parts) > 2:
        raise ValueError(f"More than 1 alternative header specified in token: {args}")
    if name in ("RESP", "TRAILER"):
        return lambda r: None
    getters = [_REQUEST_HEADERS.get(p.strip().lower()) for p in parts]
    found = [g for g in getters if g is not None]
    if not found:
        return lambda r: None
    if len(found) == 1:
        g = found[0]
        return (lambda r: _without_query(g(r))) if strip_query else g
    a, b = found

    def both(r: RequestRecord) -> Optional[str]:
        v = a(r)
        v = v if v is not None else b(r)
        return _without_query(v) if strip_query else v

    return both


def _grpc_getter(args: str) -> Getter:
    kind = args or "CAMEL_STRING"
    if kind == "NUMBER":
        return _grpc_status
    if kind not in ("CAMEL_STRING", "SNAKE_STRING"):
        raise ValueError(f"GrpcStatusFormatter only supports CAMEL_STRING, SNAKE_STRING or NUMBER. Got: {args}")
    names = _GRPC_CAMEL if kind == "CAMEL_STRING" else _GRPC_SNAKE

    def status(r: RequestRecord) -> Optional[str]:
        s = _grpc_status(r)
        if s is None:
            return None
        return names[s] if 0 <= s < len(names) else str(s)

    return status


def _operator(name: str, args: Optional[str]) -> Getter:
    """The getter of ``%name(args)%`` (``args`` None: no parentheses); ValueError as Envoy refuses."""
    if name in _NO_ARGS or name in _UNKNOWN:
        if args is not None:
            raise ValueError(f"{name} does not take any parameters")
        return _NO_ARGS.get(name) or (lambda r: None)
    if name not in _WITH_ARGS:
        raise ValueError(f"Not supported field in StreamInfo: {name}")
    a = args or ""
    if name in ("REQ", "RESP", "TRAILER"):
        return _header_getter(a, name)
    if name == "REQ_WITHOUT_QUERY":
        return _header_getter(a, name, strip_query=True)
    if name in ("START_TIME", "START_TIME_LOCAL", "EMIT_TIME", "EMIT_TIME_LOCAL"):
        return _time_getter(a, name.endswith("_LOCAL"), name.startswith("EMIT"))
    if name == "GRPC_STATUS":
        return _grpc_getter(a)
    if not a and name not in ("COMMON_DURATION",):
        raise ValueError(f"{name} requires parameters")
    return lambda r: None  # metadata, filter state, environment, ...: meshcore has none


# -- formats -----------------------------------------------------------------------------------------

Part = Union[str, Tuple[Getter, Optional[int]]]


def _parse(fmt: str) -> List[Part]:
    """Literals and ``(getter, max_length)`` of an Envoy format string (``SubstitutionFormatParser``)."""
    parts: List[Part] = []
    literal: List[str] = []
    i, n = 0, len(fmt)
    while i < n:
        c = fmt[i]
        if c != "%":
            j = fmt.find("%", i)
            j = n if j < 0 else j
            literal.append(fmt[i:j])
            i = j
            continue
        if fmt.startswith("%%", i):
            literal.append("%")
            i += 2
            continue
        m = _COMMAND.match(fmt, i)
        if m is None:
            raise ValueError(f"Incorrect configuration: {fmt}. Couldn't find valid command at position {i}")
        name, args, length = m.group(1), m.group(2), m.group(3)
        getter = _operator(name, args[1:-1] if args is not None else None)
        if length is not None and name not in _WITH_LENGTH:
            raise ValueError(f"{name} does not take any parameters or length")
        if literal:
            parts.append("".join(literal))
            literal = []
        parts.append((getter, int(length[1:]) if length is not None else None))
        i = m.end()
    if literal:
        parts.append("".join(literal))
    return parts


def _text(v: Value, max_length: Optional[int]) -> str:
    if v is None:
        return "-"
    s = v if isinstance(v, str) else str(v)
    return s[:max_length] if max_length is not None else s


def _text_renderer(fmt: str) -> Callable[[RequestRecord], str]:
    if fmt.endswith("\n"):  # Envoy's formats end a line; logging ends its records
        fmt = fmt[:-1]
    parts = _parse(fmt)
    if len(parts) == 1 and not isinstance(parts[0], str):
        g, ml = parts[0]
        return lambda r: _text(g(r), ml)
    if all(isinstance(p, str) for p in parts):
        text = "".join(parts)  # type: ignore[arg-type]
        return lambda r: text

    def render(r: RequestRecord) -> str:
        return "".join(p if isinstance(p, str) else _text(p[0](r), p[1]) for p in parts)

    return render


def _json_value(spec: Any) -> Callable[[RequestRecord], Any]:
    """A ``json_format`` value: a lone operator keeps its type (numbers; null when unknown),
    anything else is text; nested objects recurse; other JSON values stay as they are."""
    if isinstance(spec, Mapping):
        items = [(str(k), _json_value(v)) for k, v in sorted(spec.items(), key=lambda kv: str(kv[0]))]
        return lambda r: {k: f(r) for k, f in items}
    if not isinstance(spec, str):
        return lambda r: spec
    parts = _parse(spec)
    if len(parts) == 1 and not isinstance(parts[0], str):
        g, ml = parts[0]

        def typed(r: RequestRecord) -> Any:
            v = g(r)
            return v[:ml] if ml is not None and isinstance(v, str) else v

        return typed
    return _text_renderer(spec)


def compile_format(fmt: Union[str, Mapping[str, Any]]) -> Callable[[RequestRecord], str]:
    """``render(record) -> line`` for a format: a name of :data:`FORMATS`, an Envoy format string
    or a ``json_format`` dict. ValueError for what Envoy would refuse (or meshcore does not know)."""
    if isinstance(fmt, str) and fmt in FORMATS:
        fmt = FORMATS[fmt]
    if isinstance(fmt, Mapping):
        if not fmt:
            raise ValueError("an empty json_format")
        obj = _json_value(fmt)
        dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode
        return lambda r: dumps(obj(r))
    if not isinstance(fmt, str):
        raise TypeError(f"an access log format is a str or a dict, not {type(fmt).__name__}")
    return _text_renderer(fmt)


# -- the sink ----------------------------------------------------------------------------------------


class AccessLog:
    """The sink: renders every record with ``format`` and logs it at ``INFO`` on ``logger``
    (``meshcore.access`` unless given; a name or a :class:`logging.Logger`). ``filter(record)``
    (optional) keeps the records it returns true for (Envoy's access log filters; e.g.
    ``lambda r: r.response_code >= 400 or r.response_flags != "-"``). The log record carries the
    request as ``request_record`` (``extra``) for handlers that want the fields."""

    __slots__ = ("format", "logger", "filter", "render")

    def __init__(self, format: Union[str, Mapping[str, Any]] = "envoy",
                 logger: Union[logging.Logger, str, None] = None,
                 filter: Optional[Callable[[RequestRecord], Any]] = None) -> None:  # noqa: A002
        self.format = format
        self.render = compile_format(format)
        if logger is None or isinstance(logger, str):
            logger = logging.getLogger(logger or LOGGER_NAME)
        self.logger: logging.Logger = logger
        self.filter = filter

    def __call__(self, record: RequestRecord) -> None:
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        if self.filter is not None and not self.filter(record):
            return
        logger.info(self.render(record), extra={"request_record": record})

    def __repr__(self) -> str:
        name = self.format if isinstance(self.format, str) and self.format in FORMATS else "custom"
        return f"AccessLog({name} -> {self.logger.name})"


def enable_access_log(telemetry: Any, format: Union[str, Mapping[str, Any]] = "envoy",  # noqa: A002
                      logger: Union[logging.Logger, str, None] = None,
                      filter: Optional[Callable[[RequestRecord], Any]] = None) -> AccessLog:  # noqa: A002
    """Make an :class:`AccessLog` and register it with ``telemetry`` (``mesh.telemetry``); returns it
    (``telemetry.remove_sink(sink)`` stops it). Each call adds one more sink."""
    sink = AccessLog(format, logger, filter)
    telemetry.add_sink(sink)
    return sink
