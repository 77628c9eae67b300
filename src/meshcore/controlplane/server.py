"""The ADS servicer: ``StreamAggregatedResources`` (SotW) and ``DeltaAggregatedResources`` (delta).

Each stream is a generator on a server worker thread. A reader thread per stream moves incoming
requests into the stream's inbox; a store change puts one wake-up into every inbox that has none
pending (so a burst of changes costs one look at the newest snapshot); :meth:`close_all` puts a
stop marker that ends the stream (the client sees it end with status OK and reconnects).
The protocol itself (request-driven: one outstanding response per type) lives in :mod:`.sotw` and
:mod:`.delta`; every request and response is recorded in the :class:`~.history.History`.

Logged at INFO (``meshcore.controlplane.server``): streams opening and closing (node id, SotW or
delta, peer), ACKs and NACKs (type, version, nonce, the NACK's error) and pushes (type, version,
nonce, resource count); requests with a stale nonce at DEBUG.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from typing import Any, Dict, Iterator, Tuple, Union

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from ..xds.model import SHORT_NAMES
from .delta import DeltaStream
from .history import History, request_event, response_event
from .sotw import SotwStream
from .store import Snapshot, SnapshotStore

__all__ = ["AdsServicer"]

logger = logging.getLogger(__name__)

_WAKE = object()  # the store changed
_END = object()  # the client side ended (half-close, cancel, error)
_STOP = object()  # the server closes the stream


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """Serves a :class:`SnapshotStore` over ADS, recording to a :class:`History`."""

    def __init__(self, store: SnapshotStore, history: History) -> None:
        self._store = store
        self._history = history
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._inboxes: Dict[int, "_Inbox"] = {}
        self._closed = False
        store.add_listener(self._on_store_change)

    # -- gRPC methods -------------------------------------------------------------------------

    def StreamAggregatedResources(self, request_iterator: Iterator[discovery_pb2.DiscoveryRequest],
                                  context: grpc.ServicerContext) -> Iterator[discovery_pb2.DiscoveryResponse]:
        return self._serve(request_iterator, context, "sotw")

    def DeltaAggregatedResources(self, request_iterator: Iterator[discovery_pb2.DeltaDiscoveryRequest],
                                 context: grpc.ServicerContext) -> Iterator[discovery_pb2.DeltaDiscoveryResponse]:
        return self._serve(request_iterator, context, "delta")

    # -- streams ------------------------------------------------------------------------------

    @property
    def connected_streams(self) -> int:
        with self._lock:
            return len(self._inboxes)

    def close_all(self) -> None:
        """End every open stream, and refuse new ones."""
        with self._lock:
            self._closed = True
            inboxes = list(self._inboxes.values())
        for inbox in inboxes:
            inbox.put(_STOP)
        self._store.remove_listener(self._on_store_change)

    def _on_store_change(self, snap: Snapshot) -> None:
        with self._lock:
            inboxes = list(self._inboxes.values())
        for inbox in inboxes:
            inbox.wake()

    def _serve(self, requests: Iterator[Any], context: grpc.ServicerContext, mode: str) -> Iterator[Any]:
        stream_id = next(self._ids)
        inbox = _Inbox()
        with self._lock:
            if self._closed:
                context.abort(grpc.StatusCode.UNAVAILABLE, "control plane is stopping")
            self._inboxes[stream_id] = inbox
        context.add_callback(lambda: inbox.put(_END))
        reader = threading.Thread(target=_read_requests, args=(requests, inbox), daemon=True,
                                  name=f"ads-reader-{stream_id}")
        reader.start()
        peer = context.peer()
        kind = "SotW" if mode == "sotw" else "delta"
        logger.debug("%s stream %d opened by %s", kind, stream_id, peer)
        protocol: Union[SotwStream, DeltaStream] = SotwStream() if mode == "sotw" else DeltaStream()
        node = ""
        first = True
        sent: Dict[str, Tuple[str, str]] = {}  # type URL -> (nonce, version) of the latest response
        reason = "client went away"
        try:
            while True:
                item = inbox.get()
                if item is _END or item is _STOP:
                    reason = "server stopping" if item is _STOP else reason
                    break
                snap = self._store.snapshot()
                if item is _WAKE:
                    responses = protocol.on_change(snap)
                else:
                    self._history.append(request_event(stream_id, mode, item, with_node=first))
                    if first:
                        node = item.node.id if item.HasField("node") else ""
                        logger.info("client connected: node %r, %s ADS stream %d from %s", node, kind, stream_id,
                                    peer)
                        first = False
                    if item.response_nonce:
                        _log_reply(item, mode, node, stream_id, sent)
                    responses = protocol.on_request(item, snap)
                for response, names in responses:
                    self._history.append(response_event(stream_id, mode, response, names))
                    version = response.version_info if mode == "sotw" else response.system_version_info
                    sent[response.type_url] = (response.nonce, version)
                    if logger.isEnabledFor(logging.INFO):
                        removed = "" if mode == "sotw" else f", {len(response.removed_resources)} removed"
                        logger.info("push %s version %s nonce %s to node %r (stream %d): %d resources%s",
                                    _short(response.type_url), version, response.nonce, node, stream_id,
                                    len(response.resources), removed)
                    yield response
        finally:
            with self._lock:
                self._inboxes.pop(stream_id, None)
            logger.info("client disconnected: node %r, %s ADS stream %d (%s)", node, kind, stream_id, reason)


class _Inbox:
    """A stream's queue of requests and markers; at most one store wake-up is pending at a time."""

    def __init__(self) -> None:
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._woken = False

    def put(self, item: Any) -> None:
        self._queue.put(item)

    def wake(self) -> None:
        with self._lock:
            if self._woken:
                return
            self._woken = True
        self._queue.put(_WAKE)

    def get(self) -> Any:
        item = self._queue.get()
        if item is _WAKE:
            with self._lock:
                self._woken = False  # later changes wake again; this one reads the newest snapshot
        return item


def _short(type_url: str) -> str:
    return SHORT_NAMES.get(type_url, type_url)


def _log_reply(request: Any, mode: str, node: str, stream_id: int, sent: Dict[str, Tuple[str, str]]) -> None:
    """Log a request answering a response (``response_nonce`` set): ACK or NACK, or stale."""
    url = request.type_url
    nonce = request.response_nonce
    latest_nonce, latest_version = sent.get(url, ("", ""))
    version = request.version_info if mode == "sotw" else latest_version
    if nonce != latest_nonce:
        logger.debug("stale %s request from node %r (stream %d): nonce %s, latest %s", _short(url), node,
                     stream_id, nonce, latest_nonce)
    elif request.HasField("error_detail"):
        logger.info("NACK %s version %s nonce %s from node %r (stream %d): %s", _short(url), version, nonce, node,
                    stream_id, request.error_detail.message)
    else:
        logger.info("ACK %s version %s nonce %s from node %r (stream %d)", _short(url), version, nonce, node,
                    stream_id)


def _read_requests(requests: Iterator[Any], inbox: _Inbox) -> None:
    try:
        for request in requests:
            inbox.put(request)
    except Exception as exc:  # cancelled or broken stream: the handler just ends
        logger.debug("ADS request stream ended: %r", exc)
    finally:
        inbox.put(_END)
