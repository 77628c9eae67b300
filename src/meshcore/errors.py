"""Exceptions: invalid configuration, and the data plane's answers to a request."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid.

    ``resource`` names the resource (cluster or assignment name, or ``"LoadBalancer"``) and
    ``field`` the offending field path, so messages can be NACKed or logged verbatim.
    """

    def __init__(self, resource: str, field: str, reason: str) -> None:
        self.resource = resource
        self.field = field
        self.reason = reason
        # a pseudo field ("(document)", "(file)", "(root)": the whole thing) is not worth a word
        where = f"field {field}: " if field and not field.startswith("(") else ""
        super().__init__(f"{resource}: {where}{reason}")


class MeshError(Exception):
    """A request cannot be routed or balanced (the data plane's answer, not a config error)."""


class Unavailable(MeshError):
    """No usable configuration or endpoint (Envoy/gRPC: 503 / UNAVAILABLE).

    The message names the target, what is missing and the xDS node id, so it can be acted on
    from a log line alone.
    """


class NotReady(Unavailable):
    """The target's configuration has not arrived yet and this call could not wait for it (an
    event-loop thread, or ``ready_timeout=0``): wait with ``Mesh.wait_ready`` (or
    ``await asyncio.to_thread(mesh.wait_ready, target)``) and try again."""

    def __init__(self, target: str, message: str) -> None:
        self.target = target
        super().__init__(message)


class MeshClosed(MeshError):
    """The mesh was closed: it routes nothing any more and cannot be started again."""


class NoRoute(MeshError):
    """No virtual host or route matches the request (Envoy: 404, response flag NR)."""

    def __init__(self, target: str, path: str, detail: str = "") -> None:
        self.target = target
        self.path = path
        super().__init__(f"no route for {target}{path}" + (f": {detail}" if detail else ""))


class UpstreamError(MeshError):
    """The upstream did not answer: ``kind`` is ``connect-failure``, ``reset`` or ``timeout``."""

    def __init__(self, kind: str, detail: str = "", cause: "BaseException | None" = None) -> None:
        self.kind = kind
        self.cause = cause
        super().__init__(f"upstream {kind}" + (f": {detail}" if detail else ""))


class CircuitBreakerOpen(Unavailable):
    """A cluster circuit breaker overflowed (Envoy: 503, response flag UO)."""


class FaultAbort(MeshError):
    """The fault filter aborted the request: answer ``http_status`` (or ``grpc_status``)."""

    def __init__(self, http_status: "int | None", grpc_status: "int | None") -> None:
        self.http_status = http_status
        self.grpc_status = grpc_status
        super().__init__(f"fault filter abort (http {http_status}, grpc {grpc_status})")


class UpstreamTimeout(MeshError):
    """The route timeout elapsed (Envoy: 504, response flag UT)."""
