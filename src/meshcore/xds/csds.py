"""Client status (CSDS, gRPC A40): the cache as ``envoy.service.status.v3.ClientConfig``.

:func:`client_config` renders every cached resource as a ``GenericXdsConfig`` (name, version,
the resource as received, last update, ACKED/NACKED/REQUESTED/DOES_NOT_EXIST and the last
error). :class:`CsdsServicer` serves it as the ClientStatusDiscoveryService, so tools such as
``grpcdebug <addr> xds status`` can read a meshcore process.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, List

import grpc
from envoy.admin.v3 import config_dump_shared_pb2 as _shared
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc
from google.protobuf import json_format, timestamp_pb2

from .cache import ACKED, DOES_NOT_EXIST, NACKED, REQUESTED

__all__ = ["client_config", "config_dump", "CsdsServicer", "add_csds_servicer"]

_STATUS = {
    REQUESTED: _shared.REQUESTED,
    DOES_NOT_EXIST: _shared.DOES_NOT_EXIST,
    ACKED: _shared.ACKED,
    NACKED: _shared.NACKED,
}
_CONFIG_STATUS = {
    REQUESTED: csds_pb2.CLIENT_REQUESTED,
    ACKED: csds_pb2.CLIENT_ACKED,
    NACKED: csds_pb2.CLIENT_NACKED,
    DOES_NOT_EXIST: csds_pb2.CLIENT_UNKNOWN,
}


def _timestamp(t: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def client_config(entries: Iterable[Any], node: Any, scope: str = "", static: bool = False,
                  include_resources: bool = True) -> Any:
    """A ``ClientConfig`` for the given cache entries (in type order, then subscription order)."""
    cc = csds_pb2.ClientConfig(client_scope=scope)
    cc.node.CopyFrom(node)
    for e in entries:
        g = cc.generic_xds_configs.add(type_url=e.type_url, name=e.name, version_info=e.version,
                                       client_status=_STATUS[e.status], config_status=_CONFIG_STATUS[e.status],
                                       is_static_resource=static)
        if include_resources and e.resource is not None:
            g.xds_config.CopyFrom(e.resource)
        if e.last_updated is not None:
            g.last_updated.CopyFrom(_timestamp(e.last_updated))
        if e.error is not None:
            g.error_state.details = e.error
            g.error_state.version_info = e.error_version
            if e.error_time is not None:
                g.error_state.last_update_attempt.CopyFrom(_timestamp(e.error_time))
    return cc


def config_dump(cc: Any) -> dict:
    """A ``ClientConfig`` as a plain dict (proto3 JSON with snake_case field names)."""
    return json_format.MessageToDict(cc, preserving_proto_field_name=True)


class CsdsServicer(csds_pb2_grpc.ClientStatusDiscoveryServiceServicer):
    """Serves ``ClientConfig`` objects produced by ``configs(include_resources)``."""

    def __init__(self, configs: Callable[[bool], List[Any]]) -> None:
        self._configs = configs

    def _respond(self, request: Any, context: Any) -> Any:
        if len(request.node_matchers):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "node_matchers are not supported")
        resp = csds_pb2.ClientStatusResponse()
        resp.config.extend(self._configs(not request.exclude_resource_contents))
        return resp

    def FetchClientStatus(self, request: Any, context: Any) -> Any:  # noqa: N802  (gRPC's name)
        return self._respond(request, context)

    def StreamClientStatus(self, request_iterator: Iterator[Any], context: Any) -> Iterator[Any]:  # noqa: N802
        for request in request_iterator:
            yield self._respond(request, context)


def add_csds_servicer(server: Any, configs: Callable[[bool], List[Any]]) -> None:
    csds_pb2_grpc.add_ClientStatusDiscoveryServiceServicer_to_server(CsdsServicer(configs), server)
