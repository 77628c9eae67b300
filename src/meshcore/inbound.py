"""The server side of the mesh: ``Mesh.serve(port)`` -> :class:`InboundListener` (gRFC A36).

::

    lst = mesh.serve(8080)                      # subscribes the server Listener for 0.0.0.0:8080
    if not lst.wait_serving(10):
        log.warning("not serving yet: %s", lst.error)
    ...
    chain = lst.select(peer_ip, peer_port, local_ip, 8080, tls=first_byte_is_tls_handshake)
    if chain is None or chain.unsupported:      # no chain: close without sending a byte
        conn.close()
    # chain.tls: the server TLS (DownstreamTlsSpec, None: plaintext); per request:
    # chain.route(authority, path, headers, method) and chain.rbac (meshcore.RbacEngine)

Which Listener:

* gRPC shape (``mesh.xds_shape == "grpc"``): the bootstrap's
  ``server_listener_resource_name_template`` with ``%s`` replaced by ``ip:port`` (``[ip]:port``
  for IPv6; A36), e.g. ``xds.istio.io/grpc/lds/inbound/0.0.0.0:8080`` -- istiod matches only the
  port against the workload's Service ports and sends nothing for other ports. No template:
  :class:`~meshcore.errors.ConfigError`. The listener is decoded with gRPC's server rules
  (:mod:`meshcore.xds.server_listener`; a bad one is NACKed on the wire), and its ``address``
  (or one of its ``additional_addresses``) must be the listening address, else not serving.
  Route configurations named by ``rds`` are subscribed too.
* Envoy shape (``"envoy"``; LDS is a wildcard there): the sidecar's ``virtualInbound`` (else an
  inbound original-destination listener), decoded with
  :func:`~meshcore.xds.server_listener.server_listener_spec` (``shape="envoy"``); ``select``
  then matches the port's chains (``destination_port``, Istio's ``tls``/``raw_buffer`` and
  ALPN chains) and Istio's passthrough chains for ports no Service declares.

Serving (A36): an :class:`InboundListener` serves once its listener (and the route
configurations it names) arrived and was accepted. It does not serve while the listener is
missing (not yet received, or the control plane says it does not exist: istiod sends none for a
port no Service of the workload targets), rejected with no earlier good version (``error``
holds the NACK text), or not usable (address mismatch, a client listener, listener-wide
problems in the Envoy shape). A rejected *update* keeps serving the last good version
(``nack`` holds the rejection); a deletion stops serving. Losing the control plane changes
nothing: the last configuration keeps serving. A closed mesh or listener does not serve.

Updates are atomic: each accepted change builds a new :class:`InboundSnapshot` and swaps one
reference, so ``select`` sees the old or the new configuration, never a mix. A connection keeps
the :class:`~meshcore.xds.server_listener.InboundChain` it was accepted with (integrations hold
it for the connection's life); A36 says that when the server stops serving, existing
connections are closed (gracefully) -- integrations do that from an :meth:`InboundListener.on_change`
callback. Callbacks run on the xDS client's thread after each state change and must not block;
without callbacks, changes are logged (not serving: WARNING, serving again: INFO).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

from .errors import ConfigError
from .xds.cache import DOES_NOT_EXIST, NACKED
from .xds.model import LISTENER, ROUTE
from .xds.server_listener import (
    InboundChain, InboundRoute, InboundRouteConfig, ServerListenerSpec, ServerResourceDecoder, server_listener_spec,
)

if TYPE_CHECKING:
    from .mesh import MeshBase

__all__ = ["InboundListener", "InboundSnapshot", "InboundChain", "InboundRoute", "InboundRouteConfig", "serve",
           "listening_name", "VIRTUAL_INBOUND"]

log = logging.getLogger(__name__)

#: Istio's inbound listener of a sidecar (Envoy shape).
VIRTUAL_INBOUND = "virtualInbound"

ChangeCallback = Callable[["InboundListener", Optional["InboundSnapshot"], Optional["InboundSnapshot"]], None]


@dataclass(frozen=True)
class InboundSnapshot:
    """One accepted configuration of an :class:`InboundListener` (immutable; replaced whole).

    ``listener``: the decoded :class:`~meshcore.xds.server_listener.ServerListenerSpec` (RDS
    route configurations filled in); ``version``: a counter of this listener's snapshots;
    ``resource_version``: the xDS version it came with."""

    version: int
    listener: ServerListenerSpec
    resource_version: str = ""

    @property
    def chains(self) -> Tuple[InboundChain, ...]:
        return self.listener.chains

    def select(self, source_ip: Optional[str], source_port: int, destination_ip: Optional[str],
               destination_port: int, tls: bool, server_name: Optional[str] = None,
               alpn: Optional[Iterable[str]] = None) -> Optional[InboundChain]:
        return self.listener.select(source_ip, source_port, destination_ip, destination_port, tls, server_name, alpn)


def listening_name(address: str, port: int) -> str:
    """``ip:port`` as A36 puts it in the template (``[ip]:port`` for IPv6)."""
    ip = ipaddress.ip_address(address)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


class InboundListener:
    """The server listener of one listening address (see the module docstring)."""

    def __init__(self, mesh: "MeshBase", hub: "_Hub", port: int, address: str, resource_name: str) -> None:
        self._mesh = mesh
        self._hub = hub
        #: the listening port and address (``address`` normalized)
        self.port = port
        self.address = address
        #: the Listener resource: the LDS name (gRPC shape) or ``virtualInbound`` (Envoy shape)
        self.resource_name = resource_name
        self.shape: str = mesh.xds_shape
        self._cond = threading.Condition(threading.RLock())
        self._refresh_lock = threading.RLock()
        self._snapshot: Optional[InboundSnapshot] = None
        self._error: Optional[str] = f"waiting for Listener {resource_name!r} from the control plane"
        self._nack: Optional[str] = None
        self._key: Any = None
        self._decoded: Tuple[Any, Any] = (None, None)  # Envoy shape: (serialized bytes, spec or error)
        self._routes: Tuple[str, ...] = ()  # RDS names this listener needs
        self._filled: Optional[Tuple[Any, Any, ServerListenerSpec]] = None  # (spec, route key, spec with routes)
        self._callbacks: List[ChangeCallback] = []
        self._versions = 0
        self._closed = False
        self._announced = False  # logged "not serving" once; the next serving is logged

    # -- state --------------------------------------------------------------------------------------

    @property
    def snapshot(self) -> Optional[InboundSnapshot]:
        """The configuration in use (``None``: not serving)."""
        return self._snapshot if self.serving else None

    @property
    def serving(self) -> bool:
        return self._snapshot is not None and not self._closed and not self._mesh.closed

    @property
    def error(self) -> Optional[str]:
        """Why the listener does not serve (``None`` while serving)."""
        if self._closed:
            return "the inbound listener is closed"
        if self._mesh.closed:
            return "the mesh is closed"
        return None if self._snapshot is not None else self._error

    @property
    def nack(self) -> Optional[str]:
        """The last rejected update while the previous good configuration keeps serving."""
        return self._nack

    def wait_serving(self, timeout: Optional[float] = None) -> bool:
        """Block until serving (``True``) or ``timeout`` seconds passed (``False``; ``None``: no
        limit). Never raises for a missing configuration (A36: a server's start must not fail on
        transient xDS problems); read :attr:`error` for why."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self.serving:
                if self._closed or self._mesh.closed:
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(0.5 if remaining is None else min(remaining, 0.5))
            return True

    def select(self, source_ip: Optional[str], source_port: int, destination_ip: Optional[str],
               destination_port: int, tls: bool, server_name: Optional[str] = None,
               alpn: Optional[Iterable[str]] = None) -> Optional[InboundChain]:
        """The filter chain of a new connection, or ``None``: not serving, or no chain matches and
        there is no default chain (close the connection without sending a byte). See
        :meth:`ServerListenerSpec.select <meshcore.xds.server_listener.ServerListenerSpec.select>`
        for the arguments (``destination_*``: the connection's local address). A chain with
        ``unsupported`` entries must be refused too."""
        snap = self._snapshot
        if snap is None or self._closed or self._mesh.closed:
            return None
        return snap.listener.select(source_ip, source_port, destination_ip, destination_port, tls, server_name, alpn)

    def on_change(self, callback: ChangeCallback) -> ChangeCallback:
        """Call ``callback(listener, old_snapshot, new_snapshot)`` after every change: a new
        snapshot, serving starting or stopping (a snapshot is ``None`` when not serving), or a
        new reason (``error``, ``nack``) with the same snapshot. Returns the callback (usable as
        a decorator). Runs on the xDS client's thread: do not block."""
        with self._cond:
            self._callbacks.append(callback)
        return callback

    def remove_on_change(self, callback: ChangeCallback) -> None:
        with self._cond:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

    def close(self) -> None:
        """Stop serving and drop the subscription (when no other listener shares it)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            old = self._snapshot
            self._snapshot = None
            self._cond.notify_all()
        self._hub.remove(self)
        self._fire(old, None)

    def __enter__(self) -> "InboundListener":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "serving" if self.serving else f"not serving: {self.error}"
        return f"InboundListener({self.address}:{self.port} {self.resource_name!r}, {state})"

    # -- updates (the hub calls these on the xDS thread) --------------------------------------------

    def _refresh(self) -> None:
        # serialized: a state computed from older entries must never be applied after a newer one
        with self._refresh_lock:
            self._refresh_locked()

    def _refresh_locked(self) -> None:
        if self._closed:
            return
        source = self._mesh._source
        if self.shape == "envoy":
            spec, error, key, version = self._envoy_listener(source)
        else:
            spec, error, key, version = self._grpc_listener(source)
        routes: Tuple[str, ...] = spec.route_config_names if spec is not None else ()
        if routes != self._routes:
            self._hub.need_routes(self, routes)
            self._routes = routes
        if spec is not None and routes:
            nack = error
            spec, error, rkey = self._with_routes(source, spec, routes)
            key = (key, rkey)
            if spec is not None:
                error = nack
        with self._cond:
            if self._closed or _same_key(key, self._key):
                return
            self._key = key
            old, old_error, old_nack = self._snapshot, self._error, self._nack
            if spec is None:
                self._snapshot = None
                self._error = error
                self._nack = None
            else:
                if old is None or old.listener is not spec:
                    self._versions += 1
                    self._snapshot = InboundSnapshot(self._versions, spec, version)
                self._error = None
                self._nack = error  # a rejected update while the last good version serves
            new = self._snapshot
            changed = old is not new or old_error != self._error or old_nack != self._nack
            self._cond.notify_all()
        if changed:
            self._log(old, new)
            self._fire(old, new)

    def _grpc_listener(self, source: Any) -> Tuple[Optional[ServerListenerSpec], Optional[str], Any, str]:
        name = self.resource_name
        e = source.entry(LISTENER, name)
        if e is None:
            return None, f"waiting for Listener {name!r} from the control plane", None, ""
        key = (e.spec, e.status, e.error)
        if not e.has_value:
            if e.status == NACKED:
                return None, f"Listener {name!r} rejected: {_strip(e.error, name)}", key, ""
            if e.status == DOES_NOT_EXIST:
                return None, (f"Listener {name!r} does not exist (istiod sends a server listener only for a port a "
                              "Service of this workload targets)"), key, ""
            return None, f"waiting for Listener {name!r} from the control plane", key, ""
        spec = e.spec
        if not isinstance(spec, ServerListenerSpec):
            return None, f"Listener {name!r} is a client (API) listener, not a server listener", key, ""
        if not self._address_matches(spec):
            where = ", ".join(f"{a}:{p}" for a, p in spec.addresses) or "none"
            return None, (f"Listener {name!r} has address {where}, which is not the listening address "
                          f"{self.address}:{self.port} (A36)"), key, ""
        nack = f"Listener {name!r} update rejected: {_strip(e.error, name)}" if e.status == NACKED else None
        return spec, nack, key, e.version

    def _address_matches(self, spec: ServerListenerSpec) -> bool:
        want = ipaddress.ip_address(self.address)
        for host, port in spec.addresses:
            if port != self.port:
                continue
            try:
                if ipaddress.ip_address(host) == want:
                    return True
            except ValueError:
                continue
        return False

    def _envoy_listener(self, source: Any) -> Tuple[Optional[ServerListenerSpec], Optional[str], Any, str]:
        if not source.wildcard_ready(LISTENER):
            return None, "waiting for the sidecar's listeners (LDS) from the control plane", None, ""
        e = source.entry(LISTENER, VIRTUAL_INBOUND)
        if e is None or not e.has_value:
            e = self._inbound_listener(source)
        if e is None or not e.has_value:
            return None, (f"no {VIRTUAL_INBOUND} listener (nor another inbound original-destination listener) in the "
                          "sidecar's configuration"), ("absent",), ""
        self.resource_name = e.name
        data = e.serialized
        if self._decoded[0] is not data:
            try:
                decoded: Any = server_listener_spec(e.resource, getattr(source, "_cert_providers", None),
                                                    shape="envoy")
            except (ConfigError, TypeError) as err:
                decoded = f"Listener {e.name!r}: {err}"
            self._decoded = (data, decoded)
        spec = self._decoded[1]
        key = (data, e.status)
        if isinstance(spec, str):
            return None, spec, key, ""
        if spec.unsupported:
            return None, (f"Listener {e.name!r} uses what meshcore cannot honour: " + "; ".join(spec.unsupported)), \
                key, ""
        return spec, None, key, e.version

    @staticmethod
    def _inbound_listener(source: Any) -> Any:
        for name in source.names(LISTENER):
            e = source.entry(LISTENER, name)
            spec = getattr(e, "spec", None)
            if spec is None or getattr(spec, "traffic_direction", "") != "INBOUND":
                continue
            if spec.use_original_dst or any("original_dst" in f for f in spec.listener_filters):
                return e
        return None

    def _with_routes(self, source: Any, spec: ServerListenerSpec,
                     names: Tuple[str, ...]) -> Tuple[Optional[ServerListenerSpec], Optional[str], Any]:
        configs: Dict[str, InboundRouteConfig] = {}
        key = []
        for name in names:
            e = source.entry(ROUTE, name)
            key.append((e.spec, e.status, e.error) if e is not None else None)
            if e is None or not e.has_value:
                if e is not None and e.status == NACKED:
                    return None, f"RouteConfiguration {name!r} rejected: {_strip(e.error, name)}", tuple(key)
                if e is not None and e.status == DOES_NOT_EXIST:
                    return None, f"RouteConfiguration {name!r} does not exist", tuple(key)
                return None, f"waiting for RouteConfiguration {name!r}", tuple(key)
            if not isinstance(e.spec, InboundRouteConfig):
                return None, (f"RouteConfiguration {name!r} is also a client route configuration; a server cannot "
                              "share it"), tuple(key)
            configs[name] = e.spec
        cached = self._filled
        if cached is not None and cached[0] is spec and _same_key(cached[1], tuple(key)):
            return cached[2], None, tuple(key)
        filled = spec.with_route_configs(configs)
        self._filled = (spec, tuple(key), filled)
        return filled, None, tuple(key)

    def _log(self, old: Optional[InboundSnapshot], new: Optional[InboundSnapshot]) -> None:
        """A36: without a serving-state callback, errors and each resumption after an error are
        logged at a default-visible level."""
        where = f"inbound listener {self.address}:{self.port} ({self.resource_name})"
        if new is None:
            if old is not None or not (self._error or "").startswith("waiting"):
                log.warning("%s not serving: %s", where, self._error)
                self._announced = True
        elif old is None:
            if self._announced:
                log.warning("%s serving again (%s)", where, _describe(new))
                self._announced = False
            else:
                log.info("%s serving (%s)", where, _describe(new))
        elif old is not new:
            log.info("%s updated (%s)", where, _describe(new))
        if new is not None and self._nack:
            log.warning("%s keeps its last good configuration: %s", where, self._nack)

    def _fire(self, old: Optional[InboundSnapshot], new: Optional[InboundSnapshot]) -> None:
        with self._cond:
            callbacks = list(self._callbacks)
        for cb in callbacks:
            try:
                cb(self, old, new)
            except Exception:  # an integration's bug must not break configuration updates
                log.exception("inbound listener on_change callback %r failed", cb)


def _same_key(a: Any, b: Any) -> bool:
    """Whether two state keys are the same: objects by identity (a key holds the objects, so an
    identity is never reused while compared), strings and numbers by value."""
    if a is b:
        return True
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same_key(x, y) for x, y in zip(a, b))
    return isinstance(a, (str, int)) and type(a) is type(b) and a == b


def _describe(snap: InboundSnapshot) -> str:
    parts = []
    for c in snap.chains:
        mode = "mTLS" if c.mtls else ("TLS" if c.tls is not None else "plaintext")
        parts.append(f"{c.name or '(unnamed)'}: {mode}" + (f", {len(c.rbac_filters)} RBAC" if c.rbac_filters else ""))
    return f"version {snap.version}; " + "; ".join(parts)


def _strip(error: Optional[str], name: str) -> str:
    text = error or ""
    return text[len(name) + 2:] if text.startswith(name + ": ") else text


# -- the per-mesh hub -------------------------------------------------------------------------------


class _Hub:
    """Per mesh: its inbound listeners, the server-resource decoders installed in its xDS client,
    the shared subscriptions, and the update fan-out from the client's callback."""

    def __init__(self, mesh: "MeshBase") -> None:
        self.mesh = mesh
        self.lock = threading.RLock()
        self.listeners: List[InboundListener] = []
        self.route_users: Dict[str, Set[int]] = {}
        source = mesh._source
        self.decoders: Dict[str, ServerResourceDecoder] = {}
        if hasattr(source, "_types"):  # an XdsClient (a file source has no server resources)
            self.decoders[ROUTE] = self._install(source, ROUTE, "route")
            if mesh.xds_shape == "grpc":
                self.decoders[LISTENER] = self._install(source, LISTENER, "listener")
        previous = source._on_update

        def on_update(changed: Any) -> None:
            try:
                previous(changed)
            finally:
                self.refresh()

        source._on_update = on_update

    def _install(self, source: Any, type_url: str, kind: str) -> ServerResourceDecoder:
        # XdsClient: per-type decoders are fixed at construction; meshcore adds the server
        # resources' decoder in front of the one it has (only for the names registered here).
        with source._cond:
            rt = source._types[type_url]
            decoder = ServerResourceDecoder(rt.decode, kind, self.mesh.xds_shape)
            source._types[type_url] = dataclasses.replace(rt, decode=decoder)
        return decoder

    def add(self, lst: InboundListener) -> None:
        with self.lock:
            self.listeners.append(lst)
            if self.mesh.xds_shape == "grpc":
                decoder = self.decoders.get(LISTENER)
                if decoder is not None:
                    decoder.names.add(lst.resource_name)
                self.mesh._source.watch(LISTENER, lst.resource_name)
        lst._refresh()

    def remove(self, lst: InboundListener) -> None:
        with self.lock:
            if lst in self.listeners:
                self.listeners.remove(lst)
            self.need_routes(lst, ())
            name = lst.resource_name
            if self.mesh.xds_shape == "grpc" and not any(o.resource_name == name for o in self.listeners):
                decoder = self.decoders.get(LISTENER)
                if decoder is not None:
                    decoder.names.discard(name)
                if not self.mesh.closed:
                    self.mesh._source.unwatch(LISTENER, name)

    def need_routes(self, lst: InboundListener, names: Tuple[str, ...]) -> None:
        """Subscribe the RDS names ``lst`` needs; drop those nobody needs any more."""
        key = id(lst)
        source = self.mesh._source
        with self.lock:
            drop = []
            for name, users in self.route_users.items():
                if name not in names and key in users:
                    users.discard(key)
                    if not users:
                        drop.append(name)
            for name in drop:
                del self.route_users[name]
                decoder = self.decoders.get(ROUTE)
                if decoder is not None:
                    decoder.names.discard(name)
                wanted = getattr(self.mesh._publisher, "_wanted", {}).get(ROUTE, ())
                if name not in wanted and not self.mesh.closed:
                    source.unwatch(ROUTE, name)
            for name in names:
                self.route_users.setdefault(name, set()).add(key)
                decoder = self.decoders.get(ROUTE)
                if decoder is not None:
                    decoder.names.add(name)
            add = [n for n in names if n not in source.watched(ROUTE)] if hasattr(source, "watched") else list(names)
        if add and not self.mesh.closed:
            source.update_watches({ROUTE: add}, {})

    def refresh(self) -> None:
        with self.lock:
            listeners = list(self.listeners)
        for lst in listeners:
            try:
                lst._refresh()
            except Exception:  # pragma: no cover  (a bug here must not break the mesh's updates)
                log.exception("refreshing inbound listener %r failed", lst)


_HUB_LOCK = threading.Lock()


def _hub(mesh: "MeshBase") -> _Hub:
    with _HUB_LOCK:
        hub = mesh.__dict__.get("_inbound_hub")
        if hub is None:
            hub = mesh.__dict__["_inbound_hub"] = _Hub(mesh)
        return hub  # type: ignore[no-any-return]


def serve(mesh: "MeshBase", port: int, *, address: str = "0.0.0.0") -> InboundListener:
    """``Mesh.serve``: the :class:`InboundListener` of ``address:port`` (subscribed at once; the
    mesh is started). ``ValueError``/``TypeError`` for a bad port or address;
    :class:`~meshcore.errors.ConfigError` when the gRPC shape's bootstrap has no
    ``server_listener_resource_name_template``."""
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"port must be an int, got {type(port).__name__}")
    if not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535, got {port} (A36: no ephemeral ports)")
    if not isinstance(address, str):
        raise TypeError(f"address must be a str, got {type(address).__name__}")
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        raise ValueError(f"address must be an IP address (the listening address), got {address!r}") from None
    host = str(ip)
    if mesh.closed:
        from .errors import MeshClosed

        raise MeshClosed("mesh is closed: serve() after close() (make a new Mesh)")
    if mesh.xds_shape == "envoy":
        name = VIRTUAL_INBOUND
    else:
        bootstrap = mesh.bootstrap
        template = getattr(bootstrap, "server_listener_resource_name_template", None)
        if not template:
            raise ConfigError("bootstrap", "server_listener_resource_name_template",
                              "is not set: a server needs it to name its Listener (A36; Istio: "
                              "\"xds.istio.io/grpc/lds/inbound/%s\")")
        name = template.replace("%s", listening_name(host, port))
    hub = _hub(mesh)
    lst = InboundListener(mesh, hub, port, host, name)
    hub.add(lst)
    mesh.start()
    return lst
