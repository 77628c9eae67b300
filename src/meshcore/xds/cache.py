"""The client's resource cache: one entry per (type_url, name), in CSDS's terms.

An entry holds the last *accepted* value of a resource (the raw ``Any`` as received, its
serialized bytes for change detection, and the decoded model) plus the state CSDS reports:
REQUESTED, ACKED, NACKED (a rejected update; the last good value stays), DOES_NOT_EXIST
(the 15 s timer fired, or the server deleted it) and the last error. Entries are mutated only
by the source that owns them (ADS client or file source), under that source's lock.
"""

from __future__ import annotations

import time
from typing import Any, Optional

__all__ = ["REQUESTED", "DOES_NOT_EXIST", "ACKED", "NACKED", "CacheEntry"]

# envoy.admin.v3.ClientResourceStatus names (the numbers are the enum values).
REQUESTED = "REQUESTED"
DOES_NOT_EXIST = "DOES_NOT_EXIST"
ACKED = "ACKED"
NACKED = "NACKED"


class CacheEntry:
    """The client's view of one resource."""

    __slots__ = (
        "type_url", "name", "status", "spec", "resource", "serialized", "version", "last_updated",
        "error", "error_version", "error_time", "deleted",
    )

    def __init__(self, type_url: str, name: str) -> None:
        self.type_url = type_url
        self.name = name
        self.status = REQUESTED
        self.spec: Any = None  # decoded model of the accepted value; None: nothing accepted
        self.resource: Any = None  # the accepted value as received (google.protobuf.Any)
        self.serialized: Optional[bytes] = None  # bytes of the accepted value
        self.version = ""  # version_info (SotW) or resource version (delta) of the accepted value
        self.last_updated: Optional[float] = None  # wall-clock time of the last accepted update
        self.error: Optional[str] = None  # why the last update was rejected
        self.error_version = ""
        self.error_time: Optional[float] = None
        self.deleted = False  # the server deleted it, but it is kept (ignore_resource_deletion)

    @property
    def has_value(self) -> bool:
        return self.spec is not None

    def accept(self, resource: Any, serialized: bytes, spec: Any, version: str) -> None:
        self.status = ACKED
        self.resource = resource
        self.serialized = serialized
        self.spec = spec
        self.version = version
        self.last_updated = time.time()
        self.error = None
        self.error_version = ""
        self.error_time = None
        self.deleted = False

    def reject(self, error: str, version: str) -> None:
        self.status = NACKED
        self.error = error
        self.error_version = version
        self.error_time = time.time()

    def remove(self) -> None:
        """The resource does not exist (timer fired, or deleted by the server)."""
        self.status = DOES_NOT_EXIST
        self.spec = None
        self.resource = None
        self.serialized = None
        self.version = ""
        self.last_updated = time.time()

    def __repr__(self) -> str:
        return f"CacheEntry({self.type_url.rsplit('.', 1)[-1]} {self.name!r} {self.status} v={self.version!r})"
