"""The per-endpoint grpcio channels of a :class:`MeshChannel`: one per ``(endpoint, authority)``,
opened on first use, closed by :meth:`_EndpointPool.sweep` once idle and departed."""

from __future__ import annotations

import logging
import threading
from typing import Any, Dict, List, Optional, Set, Tuple

import grpc

from ._types import Options
from .status import MeshRpcError

log = logging.getLogger(__package__)  # "meshcore.integrations.grpc", as before the split


def _host_of(authority: str) -> str:
    if authority.startswith("["):
        return authority[: authority.find("]") + 1]
    host, sep, port = authority.rpartition(":")
    return host if sep and port.isdigit() else authority


class _EndpointChannel:
    """One grpcio channel to one endpoint under one authority, with its multicallables."""

    __slots__ = ("address", "authority", "channel", "inflight", "departed", "callables")

    def __init__(self, address: str, authority: str, channel: grpc.Channel) -> None:
        self.address = address
        self.authority = authority
        self.channel = channel
        self.inflight = 0
        self.departed = False  # left the target's endpoints while in use: closed by the last release
        #: the grpcio multicallables made on this channel, by the MeshChannel's slot of their
        #: signature (kind, path, serializers, registered)
        self.callables: Dict[object, Any] = {}

    def multicallable(self, slot: object, kind: str, path: str, serializer: Any, deserializer: Any,
                      registered: bool) -> Any:
        mc = self.callables.get(slot)
        if mc is None:
            factory = getattr(self.channel, kind)
            mc = factory(path, request_serializer=serializer, response_deserializer=deserializer,
                         _registered_method=registered)
            self.callables[slot] = mc
        return mc


class _EndpointPool:
    """The per-endpoint channels of one :class:`MeshChannel` (thread-safe)."""

    def __init__(self, credentials: Optional[grpc.ChannelCredentials], options: Options) -> None:
        self._credentials = credentials
        self._options = list(options)
        self._lock = threading.Lock()
        self._channels: Dict[Tuple[str, str], _EndpointChannel] = {}
        self._closed = False

    def _open(self, address: str, authority: str) -> grpc.Channel:
        given = {name for name, _ in self._options}
        options = list(self._options)
        if "grpc.default_authority" not in given:
            options.append(("grpc.default_authority", authority))
        if self._credentials is not None:
            if "grpc.ssl_target_name_override" not in given:
                options.append(("grpc.ssl_target_name_override", _host_of(authority)))
            return grpc.secure_channel(address, self._credentials, options)
        return grpc.insecure_channel(address, options)

    def acquire(self, address: str, authority: str) -> _EndpointChannel:
        """The channel to ``address`` (created on first use), counted as in use until released.
        (Blocking unary calls do the common case inline: ``_UnaryUnary.__call__``.)"""
        with self._lock:
            if self._closed:
                raise MeshRpcError(grpc.StatusCode.CANCELLED, "channel closed")
            ep = self._channels.get((address, authority))
            if ep is None:
                log.debug("opening a channel to %s (authority %s)", address, authority)
                ep = _EndpointChannel(address, authority, self._open(address, authority))
                self._channels[(address, authority)] = ep
            ep.inflight += 1
            return ep

    def release(self, ep: _EndpointChannel) -> None:
        """An RPC on ``ep`` finished (blocking unary calls do this inline, under the same lock)."""
        with self._lock:
            ep.inflight -= 1
            last = ep.departed and ep.inflight <= 0
        if last:
            self.close_departed(ep)

    def close_departed(self, ep: _EndpointChannel) -> None:
        """Close ``ep``, which left the target, now that its last RPC finished."""
        log.info("closing the channel to %s: its last RPC finished after it left the target", ep.address)
        ep.channel.close()

    def sweep(self, live: Set[str]) -> None:
        """Close the channels to endpoints not in ``live``: idle ones now, busy ones when their
        last RPC finishes (they leave the table now: a returning endpoint gets a new channel)."""
        with self._lock:
            gone = [key for key, ep in self._channels.items() if ep.address not in live]
            departed = [self._channels.pop(key) for key in gone]
            closing = []
            for ep in departed:
                ep.departed = True
                if ep.inflight <= 0:
                    closing.append(ep)
        for ep in closing:
            log.info("closing the channel to %s: no longer an endpoint of the target", ep.address)
            ep.channel.close()

    def addresses(self) -> List[str]:
        with self._lock:
            return sorted({ep.address for ep in self._channels.values()})

    def close(self) -> None:
        with self._lock:
            self._closed = True
            closing = list(self._channels.values())
            self._channels.clear()
        for ep in closing:
            ep.channel.close()
