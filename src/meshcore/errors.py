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
