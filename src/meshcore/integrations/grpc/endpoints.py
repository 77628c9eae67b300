"""The per-endpoint grpcio channels of a :class:`MeshChannel`: one per ``(endpoint, authority,
TLS)``, opened on first use, closed by :meth:`_EndpointPool.sweep` once idle and departed.

TLS is the cluster socket's :class:`~meshcore.tls.UpstreamTls` for the endpoint (``None``:
plaintext). A TLS endpoint's grpcio channel is a plaintext one to a private unix socket of a
:class:`~meshcore.tls.forwarder.Forward`, which makes the mesh TLS connection (grpcio cannot
verify SPIFFE-only certificates itself); the forward lives and dies with the channel."""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

import grpc

from ...errors import UpstreamError
from ._types import Options
from .status import MeshRpcError

log = logging.getLogger(__package__)  # "meshcore.integrations.grpc", as before the split


def _host_of(authority: str) -> str:
    if authority.startswith("["):
        return authority[: authority.find("]") + 1]
    host, sep, port = authority.rpartition(":")
    return host if sep and port.isdigit() else authority


class _EndpointChannel:
    """One grpcio channel to one endpoint under one authority and TLS, with its multicallables
    (and, for TLS, the forward carrying its connections)."""

    __slots__ = ("address", "authority", "channel", "active", "departed", "closed", "callables", "tls", "forward",
                 "tap")

    def __init__(self, address: str, authority: str, channel: grpc.Channel, tls: Any = None,
                 forward: Any = None, tap: Any = None) -> None:
        self.address = address
        self.authority = authority
        self.channel = channel
        self.tls = tls
        self.forward = forward
        #: the :class:`~._peer.PeerTap` the channel connects through (Istio's exchange on), or None
        self.tap = tap
        #: one item per RPC in flight on the channel: ``append``/``pop`` are atomic, so RPCs count
        #: themselves in and out without the pool's lock (an RPC appends, then checks
        #: ``departed``; a release pops, then checks ``departed``; the sweep sets ``departed``,
        #: then checks this under the lock: whoever sees the channel departed and idle closes it).
        #: A deque, not a list: a list going from empty to one item and back reallocates its
        #: storage each time (~500 instructions per RPC); a deque keeps its block
        self.active: Deque[None] = collections.deque()
        self.departed = False  # left the target's endpoints while in use: closed by the last release
        self.closed = False  # (set under the pool's lock: closing happens once)
        #: the grpcio multicallables made on this channel, by the MeshChannel's slot of their
        #: signature (kind, path, serializers, registered)
        self.callables: Dict[object, Any] = {}

    @property
    def inflight(self) -> int:
        """The RPCs in flight on this channel."""
        return len(self.active)

    def close(self) -> None:
        self.channel.close()
        if self.tap is not None:
            self.tap.close()
        if self.forward is not None:
            self.forward.close()

    def multicallable(self, slot: object, kind: str, path: str, serializer: Any, deserializer: Any,
                      registered: bool) -> Any:
        mc = self.callables.get(slot)
        if mc is None:
            factory = getattr(self.channel, kind)
            mc = factory(path, request_serializer=serializer, response_deserializer=deserializer,
                         _registered_method=registered)
            self.callables[slot] = mc
        return mc


#: a ``sweep`` entry ``(address, ANY_TLS)`` keeps every channel to the address (its TLS unknown)
ANY_TLS = object()


class _EndpointPool:
    """The per-endpoint channels of one :class:`MeshChannel` (thread-safe). ``connect_timeout``
    gives a cluster's connect timeout (seconds) for the TLS forwards."""

    def __init__(self, credentials: Optional[grpc.ChannelCredentials], options: Options,
                 connect_timeout: Optional[Callable[[Optional[str]], float]] = None) -> None:
        self._credentials = credentials
        self._options = list(options)
        self._connect_timeout = connect_timeout
        self._lock = threading.Lock()
        #: by (address, authority, TLS, tapped)
        self._channels: Dict[Tuple[str, str, Any, bool], _EndpointChannel] = {}
        self._closed = False

    def _open(self, address: str, authority: str, tls: Any = None, attempt: Any = None,
              tap: bool = False) -> _EndpointChannel:
        given = {name for name, _ in self._options}
        options = list(self._options)
        if "grpc.default_authority" not in given:
            options.append(("grpc.default_authority", authority))
        forward = None
        target = address
        if tls is not None:
            forward = self._forward(address, tls, attempt)
            target = forward.target
        peer_tap = None
        try:
            if tap:
                from ._peer import PeerTap

                peer_tap = PeerTap(target)
                target = peer_tap.target
            if self._credentials is not None:
                # the application's own TLS, inside the mesh's when the cluster has mesh TLS
                if "grpc.ssl_target_name_override" not in given:
                    options.append(("grpc.ssl_target_name_override", _host_of(authority)))
                channel = grpc.secure_channel(target, self._credentials, options)
            else:
                channel = grpc.insecure_channel(target, options)
        except BaseException:
            if peer_tap is not None:
                peer_tap.close()
            if forward is not None:
                forward.close()
            raise
        return _EndpointChannel(address, authority, channel, tls, forward, peer_tap)

    def _forward(self, address: str, tls: Any, attempt: Any) -> Any:
        """The forward carrying a TLS endpoint's connections (a connect failure if it cannot be made)."""
        from ...tls.forwarder import forward

        cluster = getattr(tls, "cluster", None) or getattr(attempt, "cluster", None)  # (an aggregate's child)
        timeout = self._connect_timeout(cluster) if self._connect_timeout is not None else 5.0
        try:
            return forward(tls, attempt.endpoint, protocol="h2", connect_timeout=timeout)
        except OSError as e:
            raise UpstreamError("connect-failure", f"cannot forward TLS to {address} (cluster {cluster}): {e}",
                                e) from None

    def acquire(self, address: str, authority: str, tls: Any = None, attempt: Any = None,
                tap: bool = False) -> _EndpointChannel:
        """The channel to ``address`` under ``tls`` (created on first use: ``attempt`` gives the
        endpoint and cluster then), counted as in use until released. (Blocking unary calls do
        the common case inline: ``_UnaryUnary.__call__``.) Raises ``UpstreamError``
        (connect-failure) when a TLS endpoint's forward cannot be made. ``tap``: a channel through a
        :class:`~._peer.PeerTap` (Istio's exchange on: the peer's metadata read)."""
        key = (address, authority, tls, tap)
        with self._lock:
            if self._closed:
                raise MeshRpcError(grpc.StatusCode.CANCELLED, "channel closed")
            ep = self._channels.get(key)
            if ep is None:
                log.debug("opening a channel to %s (authority %s, %s)", address, authority, tls or "plaintext")
                ep = self._channels[key] = self._open(address, authority, tls, attempt, tap)
            ep.active.append(None)
            return ep

    def release(self, ep: _EndpointChannel) -> None:
        """An RPC on ``ep`` finished (blocking unary calls do this inline)."""
        active = ep.active
        active.pop()
        if ep.departed and not active:
            self.close_departed(ep)

    def close_departed(self, ep: _EndpointChannel) -> None:
        """Close ``ep``, which left the target, now that its last RPC finished (once)."""
        with self._lock:
            if ep.closed:
                return
            ep.closed = True
        log.info("closing the channel to %s: its last RPC finished after it left the target", ep.address)
        ep.close()

    def sweep(self, live: Set[Tuple[str, Any]]) -> None:
        """Close the channels whose ``(address, tls)`` is not in ``live`` (``(address, ANY_TLS)``
        keeps every TLS of the address): idle ones now, busy ones when their last RPC finishes
        (they leave the table now: a returning endpoint gets a new channel)."""
        with self._lock:
            gone = [key for key, ep in self._channels.items()
                    if (ep.address, ep.tls) not in live and (ep.address, ANY_TLS) not in live]
            departed = [self._channels.pop(key) for key in gone]
            closing = []
            for ep in departed:
                ep.departed = True
                if not ep.active and not ep.closed:
                    ep.closed = True
                    closing.append(ep)
        for ep in closing:
            log.info("closing the channel to %s: no longer an endpoint of the target%s", ep.address,
                     "" if ep.tls is None else f" under {ep.tls!r}")
            ep.close()

    def forwards(self) -> List[Any]:
        """The TLS forwards of the open channels."""
        with self._lock:
            return [ep.forward for ep in self._channels.values() if ep.forward is not None]

    def addresses(self) -> List[str]:
        with self._lock:
            return sorted({ep.address for ep in self._channels.values()})

    def close(self) -> None:
        with self._lock:
            self._closed = True
            closing = [ep for ep in self._channels.values() if not ep.closed]
            for ep in self._channels.values():
                ep.departed = True  # (RPCs that counted themselves in find it so)
            for ep in closing:
                ep.closed = True
            self._channels.clear()
        for ep in closing:
            ep.close()
