"""Plain value types shared by both implementations: endpoints, localities, health.

These are ordinary Python objects. The compiled core reads their attributes only while it
builds a table (off the hot path); a pick returns the stored ``Endpoint`` object as-is.
"""

from __future__ import annotations

import ipaddress
from enum import IntEnum
from typing import Any, Mapping, NamedTuple, Optional

__all__ = ["Endpoint", "HealthStatus", "Locality", "host_key"]

_UINT32_MAX = 0xFFFFFFFF


class HealthStatus(IntEnum):
    """EDS ``envoy.config.core.v3.HealthStatus``, with Envoy's numeric values.

    How Envoy treats each (source/common/upstream/upstream_impl.cc, ``setEdsHealthFlag``):
    UNKNOWN and HEALTHY are healthy; UNHEALTHY and TIMEOUT are unhealthy (routable only in
    panic); DRAINING is unhealthy *and excluded* from the health denominators; DEGRADED is
    used only when healthy capacity runs out.
    """

    UNKNOWN = 0
    HEALTHY = 1
    UNHEALTHY = 2
    DRAINING = 3
    TIMEOUT = 4
    DEGRADED = 5


class Locality(NamedTuple):
    """``envoy.config.core.v3.Locality``. Orders like Envoy's ``LocalityLess``."""

    region: str = ""
    zone: str = ""
    sub_zone: str = ""


_NO_LOCALITY = Locality()


def _normalise_address(address: str) -> str:
    """Return the address as Envoy prints it (``Address::Instance::asString`` without port).

    IP literals are canonicalised (IPv6 compressed and lower-cased, IPv4-mapped IPv6 in
    dotted form, as ``inet_ntop`` does); anything else (a DNS name) is kept verbatim.
    """
    try:
        ip = ipaddress.ip_address(address.strip("[]") if address.startswith("[") else address)
    except ValueError:
        return address
    if ip.version == 6 and ip.ipv4_mapped is not None:  # type: ignore[union-attr]
        return f"::ffff:{ip.ipv4_mapped}"  # type: ignore[union-attr]
    return ip.compressed


def host_key(address: str, port: int) -> str:
    """Envoy's ``address().asString()``: ``1.2.3.4:80`` or ``[::1]:80``."""
    if ":" in address:
        return f"[{address}]:{port}"
    return f"{address}:{port}"


class Endpoint:
    """One upstream host, as an EDS ``LbEndpoint`` describes it.

    Immutable once built. ``weight`` 0 or unset becomes 1 (Envoy's ``max(1, w)``).
    ``locality_weight`` is the ``LocalityLbEndpoints.load_balancing_weight`` of the
    locality the endpoint belongs to (``None``: unset, which Envoy treats as 0 when
    locality-weighted balancing is on). ``hash_key`` is the ``envoy.lb`` ``hash_key``
    metadata value used by ring hash and Maglev instead of the address.
    """

    __slots__ = (
        "address",
        "port",
        "weight",
        "health",
        "priority",
        "locality",
        "locality_weight",
        "hostname",
        "metadata",
        "hash_key",
        "key",
    )

    address: str
    port: int
    weight: int
    health: HealthStatus
    priority: int
    locality: Locality
    locality_weight: Optional[int]
    hostname: str
    metadata: Optional[Mapping[str, Any]]
    hash_key: Optional[str]
    key: str  # "address:port", Envoy's host address string; identity across updates

    def __init__(
        self,
        address: str,
        port: int,
        weight: Optional[int] = 1,
        health: "HealthStatus | int" = HealthStatus.HEALTHY,
        priority: int = 0,
        locality: "Locality | tuple[str, ...] | None" = None,
        locality_weight: Optional[int] = None,
        hostname: str = "",
        metadata: Optional[Mapping[str, Any]] = None,
        hash_key: Optional[str] = None,
    ) -> None:
        if not isinstance(address, str) or not address:
            raise ValueError(f"Endpoint.address must be a non-empty string, got {address!r}")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise ValueError(f"Endpoint {address}: port must be an integer 0..65535, got {port!r}")
        if weight is None:
            weight = 1
        if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= _UINT32_MAX:
            raise ValueError(f"Endpoint {address}:{port}: weight must be 0..2^32-1, got {weight!r}")
        try:
            health = HealthStatus(health)
        except ValueError:
            raise ValueError(f"Endpoint {address}:{port}: unknown health status {health!r}") from None
        if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= _UINT32_MAX:
            raise ValueError(f"Endpoint {address}:{port}: priority must be 0..2^32-1, got {priority!r}")
        if locality is None:
            locality = _NO_LOCALITY
        elif not isinstance(locality, Locality):
            locality = Locality(*locality)
        if locality_weight is not None and (
            not isinstance(locality_weight, int)
            or isinstance(locality_weight, bool)
            or not 0 <= locality_weight <= _UINT32_MAX
        ):
            raise ValueError(
                f"Endpoint {address}:{port}: locality_weight must be 0..2^32-1, got {locality_weight!r}"
            )
        if hash_key is not None and not isinstance(hash_key, str):
            raise ValueError(f"Endpoint {address}:{port}: hash_key must be a string")
        address = _normalise_address(address)
        setattr_ = object.__setattr__
        setattr_(self, "address", address)
        setattr_(self, "port", port)
        setattr_(self, "weight", weight if weight > 0 else 1)
        setattr_(self, "health", health)
        setattr_(self, "priority", priority)
        setattr_(self, "locality", locality)
        setattr_(self, "locality_weight", locality_weight)
        setattr_(self, "hostname", hostname or "")
        setattr_(self, "metadata", metadata or None)
        setattr_(self, "hash_key", hash_key or None)
        setattr_(self, "key", host_key(address, port))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Endpoint is immutable; build a new one with replace()")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Endpoint is immutable")

    def replace(self, **changes: Any) -> "Endpoint":
        """Return a copy with some fields changed."""
        fields = {
            name: getattr(self, name)
            for name in (
                "address", "port", "weight", "health", "priority", "locality",
                "locality_weight", "hostname", "metadata", "hash_key",
            )
        }
        fields.update(changes)
        return Endpoint(**fields)

    def _astuple(self) -> tuple[Any, ...]:
        return (
            self.address, self.port, self.weight, int(self.health), self.priority,
            self.locality, self.locality_weight, self.hostname, self.hash_key,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Endpoint):
            return NotImplemented
        return self._astuple() == other._astuple() and self.metadata == other.metadata

    def __hash__(self) -> int:
        return hash(self._astuple())

    def __reduce__(self) -> tuple[Any, ...]:
        return (Endpoint, self._astuple()[:7] + (self.hostname, self.metadata, self.hash_key))

    def __repr__(self) -> str:
        extra = []
        if self.weight != 1:
            extra.append(f"weight={self.weight}")
        if self.health is not HealthStatus.HEALTHY:
            extra.append(f"health={self.health.name}")
        if self.priority:
            extra.append(f"priority={self.priority}")
        if self.locality != _NO_LOCALITY:
            extra.append(f"locality={tuple(self.locality)!r}")
        if self.locality_weight is not None:
            extra.append(f"locality_weight={self.locality_weight}")
        if self.hostname:
            extra.append(f"hostname={self.hostname!r}")
        if self.hash_key:
            extra.append(f"hash_key={self.hash_key!r}")
        tail = (", " + ", ".join(extra)) if extra else ""
        return f"Endpoint({self.address!r}, {self.port}{tail})"


def trusted_endpoint(
    address: str, port: int, weight: int, health: HealthStatus, priority: int, locality: Locality,
    locality_weight: Optional[int], hostname: str, metadata: Optional[Mapping[str, Any]], hash_key: Optional[str],
) -> Endpoint:
    """``Endpoint(...)`` for trusted decoders (xDS): values that are already valid and an ``address`` already normalised
    like ``Endpoint`` does (non-empty, port 1..65535, uint32 weights and priority), without the
    constructor's type and range checks: they cost more than the rest of the decoding, and a
    protobuf message cannot violate them. The result equals what the constructor builds
    (tests/xds/test_endpoint_config.py checks this)."""
    ep = Endpoint.__new__(Endpoint)
    _set = object.__setattr__
    _set(ep, "address", address)
    _set(ep, "port", port)
    _set(ep, "weight", weight or 1)
    _set(ep, "health", health)
    _set(ep, "priority", priority)
    _set(ep, "locality", locality)
    _set(ep, "locality_weight", locality_weight)
    _set(ep, "hostname", hostname)
    _set(ep, "metadata", metadata or None)
    _set(ep, "hash_key", hash_key or None)
    _set(ep, "key", host_key(address, port))
    return ep
