"""grpcio server interceptors: the mesh's inbound policy (gRFC A36 listener, A41 RBAC with
Envoy's semantics) per RPC, and the caller's verified identity for the servicer::

    import grpc
    from meshcore.integrations.grpc_server import MeshServerInterceptor, current_peer
    from meshcore.tls.server import ServerTls

    listener = mesh.serve(8443)
    tls = ServerTls(mesh.tls.workload_source())
    server = grpc.server(pool, interceptors=[MeshServerInterceptor(listener, mesh=mesh)])
    server.add_secure_port("0.0.0.0:8443", tls.grpc_server_credentials())

    class Echo(EchoServicer):
        def Say(self, request, context):
            who = current_peer()                    # meshcore.PeerCertificate or None
            principal = current_principal()         # "spiffe://cluster.local/ns/default/sa/client"
            ...

    # grpc.aio: AsyncMeshServerInterceptor, same arguments
    server = grpc.aio.server(interceptors=[AsyncMeshServerInterceptor(listener)])

Per RPC, before the servicer runs (:class:`~meshcore.integrations._inbound.InboundGate`, whose
module docstring has the whole order): the connection from ``context.peer()`` (the client's
address) and ``context.auth_context()`` (TLS, the verified client certificate:
:func:`~meshcore.tls.server.peer_from_grpc_context`, the SNI); the destination is the listener's
address (``None`` for a wildcard address: grpcio does not expose a connection's local address;
pass ``destination=(ip, port)`` to override) and port. RBAC sees A41's request: ``:method`` POST,
``:path`` the full method name, ``:authority`` (the call's host where grpcio has it: sync
servers; grpc.aio shows none, so there a chain whose DENY rules match on ``:authority`` -- Istio
``hosts`` -- denies every RPC rather than skip them; a local ``rbac=`` engine cannot be inspected
for such rules, which then do not apply), the invocation metadata as headers (``-bin`` values
base64, unpadded, as on the wire) plus ``content-type: application/grpc`` (what Envoy's filter
sees). Refusals abort the RPC:
RBAC denied -> ``PERMISSION_DENIED`` ``"RBAC: access denied"`` (Envoy's and gRPC's answer; the
servicer never runs); not serving (A36), a connection the current chain refuses, no route or a
route not served -> ``UNAVAILABLE``. A pushed policy applies to the next RPC (per RPC, not per
connection; see :mod:`meshcore.integrations._inbound`).

The servicer reads the caller with :func:`current_peer`, :func:`current_principal` or
:func:`current_caller` (a :class:`Caller`: principal, peer, policy, chain), set in a context
variable for the RPC (streaming behaviours included), or with :func:`caller_of` ``(context)``.

Stats: :attr:`MeshServerInterceptor.stats` (Envoy's names: ``http.<stat_prefix>.rbac.*``,
``downstream_rq_total``, ``downstream_rq_http2_total`` and ``downstream_rq_2xx`` for every RPC that
reached the connection manager: Envoy answers a refused gRPC request with HTTP 200 and a
``grpc-status``, so denials count as 2xx there too).
With a ``mesh`` whose ``telemetry`` has sinks, each RPC ends with a ``reporter="destination"``
:class:`~meshcore.telemetry.record.RequestRecord` (``protocol="grpc"``, ``grpc_status``).
"""

from __future__ import annotations

import base64
import contextvars
import logging
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import grpc
import grpc.aio

from ..tls.server import peer_from_grpc_context
from ._inbound import (
    ALLOWED, GateViews, InboundGate, InboundStats, Verdict, destination_sinks, emit, ip_or_none, listener_of, now,
    request_facts,
)

__all__ = ["MeshServerInterceptor", "AsyncMeshServerInterceptor", "Caller", "current_caller", "current_peer",
           "current_principal", "caller_of"]

log = logging.getLogger(__name__)

_ALPN_TLS = ("istio-h2", "istio", "h2")
_ALPN_PLAIN = ("h2c",)
_GRPC_CONTENT_TYPE = ("content-type", "application/grpc")
_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


class Caller(NamedTuple):
    """Who called this RPC: ``principal`` (the client certificate's first URI SAN: its SPIFFE
    ID; None for plaintext), ``peer`` (:class:`~meshcore.rbac.PeerCertificate` or None),
    ``policy`` (the RBAC policy that allowed the RPC, or None), ``chain`` (the filter chain's
    name, None without xDS)."""

    principal: Optional[str]
    peer: Any
    policy: Optional[str]
    chain: Optional[str]


_CURRENT: "contextvars.ContextVar[Optional[Caller]]" = contextvars.ContextVar("meshcore_grpc_caller", default=None)


def current_caller() -> Optional[Caller]:
    """The :class:`Caller` of the RPC being served (None outside an intercepted RPC)."""
    return _CURRENT.get()


def current_peer() -> Any:
    """The verified client certificate (:class:`~meshcore.rbac.PeerCertificate`) of the RPC being
    served; None for plaintext or outside an intercepted RPC."""
    c = _CURRENT.get()
    return c.peer if c is not None else None


def current_principal() -> Optional[str]:
    """The caller's SPIFFE ID (the certificate's first URI SAN) of the RPC being served, or None."""
    c = _CURRENT.get()
    return c.principal if c is not None else None


#: id(context) -> Caller for contexts that take no new attributes (grpc.aio's), while the RPC runs
_BY_CONTEXT: Dict[int, Caller] = {}


def caller_of(context: Any) -> Optional[Caller]:
    """The :class:`Caller` the interceptor attached to a servicer ``context`` (None if none)."""
    c = getattr(context, "_meshcore_caller", None)
    return c if c is not None else _BY_CONTEXT.get(id(context))


def _attach(context: Any, caller: Caller) -> bool:
    """Attach ``caller`` to ``context``; True when it went into :data:`_BY_CONTEXT` (to drop later)."""
    try:
        context._meshcore_caller = caller
        return False
    except AttributeError:  # cython contexts (grpc.aio) take no new attributes
        _BY_CONTEXT[id(context)] = caller
        return True


def _parse_peer(text: str) -> Tuple[Optional[str], int]:
    """``context.peer()`` (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``, ``unix:...``) -> (ip, port)."""
    if text.startswith("ipv4:"):
        host, _, port = text[5:].rpartition(":")
    elif text.startswith("ipv6:"):
        host, _, port = text[5:].rpartition(":")
        host = host.strip("[]")
        host = host.split("%", 1)[0]
    else:
        return None, 0
    try:
        return ip_or_none(host), int(port)
    except ValueError:
        return ip_or_none(host), 0


def _headers(metadata: Any) -> List[Tuple[str, str]]:
    out = [_GRPC_CONTENT_TYPE]
    for item in metadata or ():
        key, value = item[0], item[1]
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode("ascii").rstrip("=") if key.endswith("-bin") \
                else value.decode("latin-1")
        out.append((key.lower(), value))
    return out


def _authority(context: Any) -> Optional[str]:
    """The call's ``:authority`` where grpcio keeps it (sync servers: the call details' host)."""
    details = getattr(getattr(context, "_rpc_event", None), "call_details", None)
    host = getattr(details, "host", None)
    if isinstance(host, bytes):
        return host.decode("latin-1") or None
    return host or None


class _Base(GateViews):
    def __init__(self, listener: Any = None, rbac: Any = None, *, mesh: Any = None, stat_prefix: Optional[str] = None,
                 stats: Optional[InboundStats] = None, destination: Optional[Tuple[Optional[str], int]] = None) -> None:
        self.mesh = mesh
        self.gate = InboundGate(listener_of(mesh, listener, rbac), rbac, stat_prefix=stat_prefix, stats=stats)
        lst = self.gate.listener
        if destination is not None:
            ip, port = destination
            self._dst: Tuple[Optional[str], Optional[int]] = (ip_or_none(ip) if ip else None, int(port))
        elif lst is not None:
            addr = ip_or_none(lst.address)
            self._dst = (None if addr in ("0.0.0.0", "::") else addr, lst.port)
        else:
            self._dst = (None, None)

    def _admit(self, method: str, context: Any) -> Tuple[Verdict, Any, Tuple[Any, ...], float]:
        """The RPC's verdict, the status code it is refused with (``None``: allowed; a refusal is
        counted and recorded here, the caller aborts), the destination sinks and the start time."""
        sinks = destination_sinks(self.mesh) if self.mesh is not None else ()
        start = now() if sinks else 0.0
        verdict = self._decide(method, context)
        if verdict.outcome is ALLOWED:
            return verdict, None, sinks, start
        self._count(verdict)
        code = getattr(grpc.StatusCode, verdict.grpc_code or "UNAVAILABLE")
        if sinks:
            self._record(sinks, verdict, method, context, start, _code_value(code))
        return verdict, code, sinks, start

    def _decide(self, method: str, context: Any) -> Verdict:
        try:
            ac = context.auth_context()
        except Exception:  # noqa: BLE001 - no auth context: a plaintext call
            ac = {}
        tls = ac.get("transport_security_type") == [b"ssl"]
        peer = peer_from_grpc_context(context) if tls else None
        sni_v = ac.get("ssl_requested_server_name") if tls else None
        sni = sni_v[0].decode("latin-1") if sni_v else None
        src_ip, src_port = _parse_peer(context.peer() or "")
        dst_ip, dst_port = self._dst
        authority = _authority(context)
        return self.gate.check(src_ip, src_port, dst_ip, dst_port, tls, peer, sni, _ALPN_TLS if tls else _ALPN_PLAIN,
                               "POST", method, _headers(context.invocation_metadata()), authority,
                               authority_unknown=authority is None)

    def _count(self, verdict: Verdict) -> None:
        if verdict.prefix is not None:  # gRPC: HTTP 200 also for refusals (grpc-status in trailers)
            self.gate.stats.response(verdict.prefix, 200, True)

    def _leave(self, verdict: Verdict, sinks: Tuple[Any, ...], method: str, context: Any, start: float,
               error: Optional[BaseException]) -> None:
        _BY_CONTEXT.pop(id(context), None)
        self._count(verdict)
        if sinks:
            self._record(sinks, verdict, method, context, start, _code_of(context, error))

    def _record(self, sinks: Tuple[Any, ...], verdict: Verdict, method: str, context: Any, start: float,
                grpc_status: int) -> None:
        # HTTP 200 for every gRPC answer: Envoy answers a refused gRPC request (its local reply) with
        # 200 and the grpc-status, which is what its access log and Istio's metrics report
        try:
            request_id, peer, _ = request_facts(context.invocation_metadata() or ())
        except Exception:  # noqa: BLE001 - no metadata to read: no request ID, no peer
            request_id = peer = None
        emit(sinks, verdict, "POST", method, _authority(context), "grpc", 200, start, grpc_status=grpc_status,
             request_id=request_id, peer_metadata=peer)


def _code_value(code: Any) -> int:
    value = getattr(code, "value", None)
    return value[0] if isinstance(value, tuple) else 0


class MeshServerInterceptor(_Base, grpc.ServerInterceptor):
    """A ``grpc.ServerInterceptor`` (sync ``grpc.server``) applying the mesh's inbound policy per
    RPC (see the module docstring). ``listener``: an :class:`~meshcore.inbound.InboundListener`
    (``mesh.serve(port)``) or a port (with ``mesh``); ``rbac``: an
    :class:`~meshcore.rbac.RbacEngine` for use without xDS (not both; neither: identity and stats
    only); ``mesh``: telemetry; ``stat_prefix`` / ``stats`` as
    :class:`~meshcore.integrations.asgi.MeshAsgiMiddleware`'s; ``destination``: the ``(ip, port)``
    RBAC sees as the local address."""

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return _wrapped(handler, handler_call_details.method, self._wrap_unary, self._wrap_stream)

    def _enter(self, method: str, context: Any) -> Tuple[Verdict, Caller, Tuple[Any, ...], float]:
        verdict, refused, sinks, start = self._admit(method, context)
        if refused is not None:
            context.abort(refused, verdict.grpc_message)  # raises
        caller = Caller(verdict.principal, verdict.peer, verdict.policy, verdict.chain_name)
        _attach(context, caller)
        return verdict, caller, sinks, start

    def _wrap_unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        def run(request: Any, context: Any) -> Any:
            verdict, caller, sinks, start = self._enter(method, context)
            token = _CURRENT.set(caller)
            error: Optional[BaseException] = None
            try:
                return behavior(request, context)
            except BaseException as e:
                error = e
                raise
            finally:
                _CURRENT.reset(token)
                self._leave(verdict, sinks, method, context, start, error)
        return run

    def _wrap_stream(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        def run(request: Any, context: Any) -> Any:
            verdict, caller, sinks, start = self._enter(method, context)
            return self._stream(behavior, request, context, caller, verdict, sinks, method, start)
        return run

    def _stream(self, behavior: Callable[..., Any], request: Any, context: Any, caller: Caller, verdict: Verdict,
                sinks: Tuple[Any, ...], method: str, start: float) -> Any:
        error: Optional[BaseException] = None
        try:
            token = _CURRENT.set(caller)
            try:
                it = iter(behavior(request, context))
            finally:
                _CURRENT.reset(token)
            while True:
                token = _CURRENT.set(caller)  # per step: each next() may run on another thread
                try:
                    item = next(it)
                except StopIteration:
                    return
                finally:
                    _CURRENT.reset(token)
                yield item
        except BaseException as e:
            error = e
            raise
        finally:
            self._leave(verdict, sinks, method, context, start, error)

    def __repr__(self) -> str:
        return f"MeshServerInterceptor(listener={self.gate.listener!r}, rbac={self.gate.rbac!r})"


def _wrapped(handler: Any, method: str, unary: Callable[..., Any], stream: Callable[..., Any]) -> Any:
    """``handler`` with its behaviour wrapped (unary or streaming responses)."""
    for kind in _KINDS:
        behavior = getattr(handler, kind)
        if behavior is not None:
            wrap = stream if handler.response_streaming else unary
            make = getattr(grpc, kind + "_rpc_method_handler")
            return make(wrap(behavior, method), request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    return handler


def _code_of(context: Any, error: Optional[BaseException]) -> int:
    code = None
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - older grpcio: no code()
        pass
    if code is not None:
        return _code_value(code) if not isinstance(code, int) else code
    return 0 if error is None else 2  # OK / UNKNOWN


class AsyncMeshServerInterceptor(_Base, grpc.aio.ServerInterceptor):
    """A ``grpc.aio.ServerInterceptor`` (``grpc.aio.server``) applying the mesh's inbound policy per
    RPC; arguments as :class:`MeshServerInterceptor`'s."""

    async def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return _wrapped(handler, handler_call_details.method, self._wrap_unary, self._wrap_stream)

    async def _enter(self, method: str, context: Any) -> Tuple[Verdict, Caller, Tuple[Any, ...], float]:
        verdict, refused, sinks, start = self._admit(method, context)
        if refused is not None:
            await context.abort(refused, verdict.grpc_message)
        caller = Caller(verdict.principal, verdict.peer, verdict.policy, verdict.chain_name)
        _attach(context, caller)
        _CURRENT.set(caller)  # the RPC's own context (grpc.aio runs each RPC in a fresh one)
        return verdict, caller, sinks, start

    def _wrap_unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def run(request: Any, context: Any) -> Any:
            verdict, caller, sinks, start = await self._enter(method, context)
            error: Optional[BaseException] = None
            try:
                return await behavior(request, context)
            except BaseException as e:
                error = e
                raise
            finally:
                self._leave(verdict, sinks, method, context, start, error)
        return run

    def _wrap_stream(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def run(request: Any, context: Any) -> Any:
            verdict, caller, sinks, start = await self._enter(method, context)
            error: Optional[BaseException] = None
            try:
                result = behavior(request, context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        yield item
                else:  # a coroutine writing with context.write()
                    await result
            except BaseException as e:
                error = e
                raise
            finally:
                self._leave(verdict, sinks, method, context, start, error)
        return run

    def __repr__(self) -> str:
        return f"AsyncMeshServerInterceptor(listener={self.gate.listener!r}, rbac={self.gate.rbac!r})"
