"""The ADS servicer: ``StreamAggregatedResources`` (SotW) and ``DeltaAggregatedResources`` (delta).

Each stream is a generator on a server worker thread. A reader thread per stream moves incoming
requests into the stream's inbox; store changes put a wake-up into every inbox; :meth:`close_all`
puts a stop marker that ends the stream (the client sees it end with status OK and reconnects).
The protocol itself lives in :mod:`.sotw` and :mod:`.delta`; every request and response is recorded
in the :class:`~.history.History`.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from typing import Any, Dict, Iterator, Union

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

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
        self._inboxes: Dict[int, "queue.SimpleQueue[Any]"] = {}
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
            inbox.put(_WAKE)

    def _serve(self, requests: Iterator[Any], context: grpc.ServicerContext, mode: str) -> Iterator[Any]:
        stream_id = next(self._ids)
        inbox: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        with self._lock:
            if self._closed:
                context.abort(grpc.StatusCode.UNAVAILABLE, "control plane is stopping")
            self._inboxes[stream_id] = inbox
        context.add_callback(lambda: inbox.put(_END))
        reader = threading.Thread(target=_read_requests, args=(requests, inbox), daemon=True,
                                  name=f"ads-reader-{stream_id}")
        reader.start()
        logger.debug("%s stream %d opened by %s", mode, stream_id, context.peer())
        protocol: Union[SotwStream, DeltaStream] = SotwStream() if mode == "sotw" else DeltaStream()
        first = True
        try:
            while True:
                item = inbox.get()
                if item is _END or item is _STOP:
                    break
                snap = self._store.snapshot()
                if item is _WAKE:
                    responses = protocol.on_change(snap)
                else:
                    self._history.append(request_event(stream_id, mode, item, with_node=first))
                    first = False
                    responses = protocol.on_request(item, snap)
                for response, names in responses:
                    self._history.append(response_event(stream_id, mode, response, names))
                    yield response
        finally:
            with self._lock:
                self._inboxes.pop(stream_id, None)
            logger.debug("%s stream %d closed", mode, stream_id)


def _read_requests(requests: Iterator[Any], inbox: "queue.SimpleQueue[Any]") -> None:
    try:
        for request in requests:
            inbox.put(request)
    except Exception as exc:  # cancelled or broken stream: the handler just ends
        logger.debug("ADS request stream ended: %r", exc)
    finally:
        inbox.put(_END)
