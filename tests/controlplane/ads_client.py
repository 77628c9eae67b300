"""A raw ADS client for driving the control plane from tests (SotW or delta), no xDS logic."""

from __future__ import annotations

import itertools
import queue
import threading
from typing import Any, List, Optional

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

_END = object()
_barrier_ids = itertools.count(1)


class AdsStream:
    """One ADS stream: :meth:`send` requests, :meth:`recv` responses; :meth:`barrier` proves that no
    response is pending (the server handles a stream's requests in order)."""

    def __init__(self, address: str, mode: str = "sotw", node_id: str = "test-node") -> None:
        self.mode = mode
        self.node = base_pb2.Node(id=node_id, cluster="meshcore-test")
        self._first = True
        self.channel = grpc.insecure_channel(address)
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self._out: "queue.Queue[Any]" = queue.Queue()
        self._in: "queue.Queue[Any]" = queue.Queue()
        method = stub.StreamAggregatedResources if mode == "sotw" else stub.DeltaAggregatedResources
        self.call = method(iter(self._out.get, _END))
        self.ended: Optional[grpc.RpcError] = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self._in.put(response)
        except grpc.RpcError as exc:
            self.ended = exc
        self._in.put(_END)

    # -- sending ------------------------------------------------------------------------------

    def send(self, type_url: str, names: Optional[List[str]] = None, version: str = "", nonce: str = "",
             error: Optional[str] = None, subscribe: Optional[List[str]] = None,
             unsubscribe: Optional[List[str]] = None, initial: Optional[dict] = None, code: int = 3) -> Any:
        if self.mode == "sotw":
            req = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names or [], version_info=version,
                                                 response_nonce=nonce)
        else:
            req = discovery_pb2.DeltaDiscoveryRequest(
                type_url=type_url, resource_names_subscribe=subscribe or [],
                resource_names_unsubscribe=unsubscribe or [],
                initial_resource_versions=initial or {}, response_nonce=nonce)
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=code, message=error))
        if self._first:
            req.node.CopyFrom(self.node)
            self._first = False
        self._out.put(req)
        return req

    def ack(self, response: Any, names: Optional[List[str]] = None) -> Any:
        """ACK ``response`` (SotW: with ``names``, defaulting to the names it carried)."""
        if self.mode == "sotw":
            return self.send(response.type_url, names if names is not None else resource_names(response),
                             version=response.version_info, nonce=response.nonce)
        return self.send(response.type_url, nonce=response.nonce)

    # -- receiving ----------------------------------------------------------------------------

    def recv(self, timeout: float = 5.0) -> Any:
        try:
            item = self._in.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no response within {timeout}s") from None
        if item is _END:
            self._in.put(_END)
            raise AssertionError(f"stream ended: {self.ended}")
        return item

    def barrier(self) -> None:
        """Assert that no response is pending: request a fresh dummy type; the next response must be its."""
        url = f"type.googleapis.com/meshcore.test.Barrier{next(_barrier_ids)}"
        if self.mode == "sotw":
            self.send(url, ["x"])
        else:
            self.send(url, subscribe=["x"])
        response = self.recv()
        assert response.type_url == url, f"unexpected response before the barrier: {summary(response)}"

    def wait_end(self, timeout: float = 5.0) -> None:
        item = self._in.get(timeout=timeout)
        while item is not _END:
            item = self._in.get(timeout=timeout)

    def close(self) -> None:
        self._out.put(_END)
        self.call.cancel()
        self.channel.close()


def resource_names(response: Any) -> List[str]:
    """Names in a DiscoveryResponse (decoded) or DeltaDiscoveryResponse."""
    if isinstance(response, discovery_pb2.DeltaDiscoveryResponse):
        return [r.name for r in response.resources]
    from meshcore.xds.resource_file import parse_resource

    return [parse_resource(a)[1] for a in response.resources]


def delta_versions(response: discovery_pb2.DeltaDiscoveryResponse) -> dict:
    return {r.name: r.version for r in response.resources}


def summary(response: Any) -> str:
    if isinstance(response, discovery_pb2.DeltaDiscoveryResponse):
        return (f"delta {response.type_url} nonce={response.nonce} resources={delta_versions(response)} "
                f"removed={list(response.removed_resources)}")
    return f"sotw {response.type_url} v={response.version_info} nonce={response.nonce} names={resource_names(response)}"
