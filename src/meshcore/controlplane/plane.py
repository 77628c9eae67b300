"""``ControlPlane``: the store, the ADS gRPC server, the optional HTTP API and the file watcher together."""

from __future__ import annotations

import logging
import os
from concurrent import futures
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc
from google.protobuf.message import Message

from ..xds.resource_file import Resources, load_resource_file
from .history import Event, History
from .http_api import HttpApi
from .server import AdsServicer
from .store import SnapshotStore, normalize_resources
from .watch import FileWatcher

__all__ = ["ControlPlane"]

logger = logging.getLogger(__name__)

_GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
]


def _split(address: str) -> Tuple[str, int]:
    if address.startswith("unix:"):
        return address, -1
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address must be host:port, got {address!r}")
    if not host:  # grpc would bind every interface: say so explicitly instead
        raise ValueError(f"address {address!r} names no host: use 127.0.0.1:{port}, or 0.0.0.0:{port} "
                         f"for every interface")
    return host, int(port)


class ControlPlane:
    """A reference xDS control plane (ADS, SotW and delta) serving an in-memory resource store.

    ``address`` is where the gRPC server listens (``"127.0.0.1:0"`` picks a port; ``"unix:///path"``
    serves a Unix domain socket, then :attr:`port` is None); ``http_address``
    enables the HTTP API (:mod:`.http_api`). Use as a context manager or call :meth:`start` /
    :meth:`stop`. Resources can be set before or after starting; every change is pushed to the
    connected streams, request-driven: a type whose last response is not yet ACKed/NACKed gets
    the newest state (all changes made meanwhile, coalesced) right after that ACK/NACK.
    ``history_limit`` bounds :attr:`history` (None: keep every event).
    """

    def __init__(self, address: str = "127.0.0.1:0", http_address: Optional[str] = None,
                 max_workers: int = 64, history_limit: Optional[int] = None) -> None:
        self._host, self._requested_port = _split(address)
        self._http_address = http_address
        self._max_workers = max_workers
        self._store = SnapshotStore()
        self._history = History(history_limit)
        self._servicer: Optional[AdsServicer] = None
        self._server: Optional[grpc.Server] = None
        self._executor: Optional[futures.ThreadPoolExecutor] = None
        self._http: Optional[HttpApi] = None
        self._watcher: Optional[FileWatcher] = None
        self._port: Optional[int] = None
        self._started = False

    @classmethod
    def from_file(cls, path: "str | os.PathLike[str]", watch: bool = True, poll_interval: float = 0.5,
                  **kwargs: Any) -> "ControlPlane":
        """A control plane serving a resource file (:func:`~meshcore.xds.resource_file.load_resource_file`).

        The file is loaded now (errors raise ``ConfigError``); with ``watch`` it is reloaded whenever
        its mtime or size changes while the control plane runs (a broken version is logged and skipped).
        """
        plane = cls(**kwargs)
        source = os.fspath(path)
        plane.set_resources(load_resource_file(source))
        if watch:
            plane._watcher = FileWatcher(source, plane.set_resources, poll_interval)
        return plane

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> "ControlPlane":
        if self._server is not None:
            return self
        self._executor = futures.ThreadPoolExecutor(max_workers=self._max_workers, thread_name_prefix="meshcore-cp")
        server = grpc.server(self._executor, options=_GRPC_OPTIONS)
        self._servicer = AdsServicer(self._store, self._history)
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self._servicer, server)
        target = self._host if self._requested_port < 0 else f"{self._host}:{self._requested_port}"
        try:
            port = server.add_insecure_port(target)
        except RuntimeError as exc:
            port, error = 0, exc
        else:
            error = None
        if not port:
            self._executor.shutdown(wait=False)
            self._servicer.close_all()
            raise OSError(f"cannot listen on {target}: {error or 'bind failed'}")
        server.start()
        self._server, self._port = server, (None if self._requested_port < 0 else port)
        self._started = True
        try:
            if self._http_address is not None:
                self._http = HttpApi(self, self._http_address).start()
            if self._watcher is not None:
                self._watcher.start()
        except BaseException:
            self.stop()
            raise
        logger.info("control plane listening on %s%s", self.address,
                    f", HTTP API on port {self.http_port}" if self._http else "")
        return self

    def stop(self, grace: float = 0) -> None:
        """Stop serving: ends every open stream (clients see it end), then stops the server."""
        if self._watcher is not None:
            self._watcher.stop()
        if self._http is not None:
            self._http.stop()
            self._http = None
        if self._servicer is not None:
            self._servicer.close_all()
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace).wait()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        self._servicer = None

    def __enter__(self) -> "ControlPlane":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- addresses ----------------------------------------------------------------------------

    @property
    def port(self) -> Optional[int]:
        """The gRPC server's TCP port (after :meth:`start`; None for a Unix socket)."""
        if not self._started:
            raise RuntimeError("control plane not started")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` of the gRPC server (after :meth:`start`), or the ``unix:`` address as given."""
        port = self.port
        return self._host if port is None else f"{self._host}:{port}"

    @property
    def http_port(self) -> Optional[int]:
        return self._http.port if self._http is not None else None

    # -- resources ----------------------------------------------------------------------------

    @property
    def version(self) -> str:
        """The global version (bumped by every change)."""
        return self._store.version

    def set_resources(self, resources: Any) -> str:
        """Replace every resource; returns the new global version (unchanged if nothing changed).

        ``resources``: messages (or ``Any``), dicts with ``@type``, or ``{type_url: {name: message}}``.
        """
        return self._store.set(normalize_resources(resources, "set_resources"))

    def update(self, upserts: Any = (), removes: Iterable[Tuple[str, str]] = ()) -> str:
        """Upsert resources and delete ``(type_url, name)`` pairs; returns the global version."""
        parsed: Resources = normalize_resources(upserts, "update") if upserts else {}
        return self._store.update(parsed, list(removes))

    def resources(self, type_url: str) -> Dict[str, Message]:
        """``{name: message}`` of one type."""
        return self._store.resources(type_url)

    def resource_versions(self) -> Dict[str, Dict[str, str]]:
        """``{type_url: {name: content hash}}`` (the delta versions)."""
        snap = self._store.snapshot()
        return {url: {name: e.version for name, e in sorted(entries.items())} for url, entries in snap.entries.items()}

    # -- observation --------------------------------------------------------------------------

    @property
    def history(self) -> List[Event]:
        """Every request received and response sent, in order (a copy)."""
        return self._history.events()

    def wait_for(self, predicate: Callable[[Event], bool], timeout: float = 5.0, start: int = 0) -> Event:
        """The first history event at index >= ``start`` matching ``predicate`` (waits; TimeoutError)."""
        return self._history.wait_for(predicate, timeout, start)

    def clear_history(self) -> None:
        self._history.clear()

    @property
    def connected_streams(self) -> int:
        return self._servicer.connected_streams if self._servicer is not None else 0

    def __repr__(self) -> str:
        where = self.address if self._started else "not started"
        return f"<ControlPlane {where} version {self.version}>"

