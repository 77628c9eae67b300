"""Exceptions raised for invalid configuration."""

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
        super().__init__(f"{resource}: field {field}: {reason}")


class MeshError(Exception):
    """A request cannot be routed or balanced (the data plane's answer, not a config error)."""


class Unavailable(MeshError):
    """No usable configuration or endpoint (Envoy/gRPC: 503 / UNAVAILABLE).

    The message names the target, what is missing and the xDS node id, so it can be acted on
    from a log line alone.
    """


class NoRoute(MeshError):
    """No virtual host or route matches the request (Envoy: 404, response flag NR)."""

    def __init__(self, target: str, path: str, detail: str = "") -> None:
        self.target = target
        self.path = path
        super().__init__(f"no route for {target}{path}" + (f": {detail}" if detail else ""))
