"""Load-balancer options in Envoy's names, validated once and shared by both twins."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ConfigError

__all__ = ["LbConfig", "POLICIES", "is_prime"]

#: Policy name -> small integer code used inside the compiled core.
POLICIES: Mapping[str, int] = {
    "ROUND_ROBIN": 0,
    "LEAST_REQUEST": 1,
    "RANDOM": 2,
    "RING_HASH": 3,
    "MAGLEV": 4,
}

# Envoy defaults (api/envoy/config/cluster/v3/cluster.proto and the typed LB protos).
DEFAULT_CHOICE_COUNT = 2
DEFAULT_ACTIVE_REQUEST_BIAS = 1.0
DEFAULT_MIN_RING = 1024
DEFAULT_MAX_RING = 8 * 1024 * 1024  # also the PGV maximum for both fields
DEFAULT_TABLE_SIZE = 65537
MAX_TABLE_SIZE = 5000011  # PGV lte on Maglev.table_size
DEFAULT_OVERPROVISIONING = 140
DEFAULT_PANIC_THRESHOLD = 50

_OPTION_NAMES = frozenset(
    {
        "choice_count",
        "active_request_bias",
        "minimum_ring_size",
        "maximum_ring_size",
        "table_size",
        "overprovisioning_factor",
        "healthy_panic_threshold",
        "locality_weighted",
        "use_hostname_for_hashing",
        "weighted_priority_health",
    }
)


@functools.lru_cache(maxsize=64)
def is_prime(n: int) -> bool:
    """Deterministic primality test (Envoy's ``Primes::isPrime``: trial division)."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    i = 3
    while i * i <= n:
        if n % i == 0:
            return False
        i += 2
    return True


@dataclass(frozen=True)
class LbConfig:
    """Validated load-balancer configuration (immutable)."""

    policy: str = "ROUND_ROBIN"
    policy_code: int = 0
    choice_count: int = DEFAULT_CHOICE_COUNT
    active_request_bias: float = DEFAULT_ACTIVE_REQUEST_BIAS
    minimum_ring_size: int = DEFAULT_MIN_RING
    maximum_ring_size: int = DEFAULT_MAX_RING
    table_size: int = DEFAULT_TABLE_SIZE
    overprovisioning_factor: int = DEFAULT_OVERPROVISIONING
    healthy_panic_threshold: int = DEFAULT_PANIC_THRESHOLD
    locality_weighted: bool = False
    use_hostname_for_hashing: bool = False
    weighted_priority_health: bool = False

    @classmethod
    def from_options(
        cls, policy: str, options: Mapping[str, Any], resource: str = "LoadBalancer"
    ) -> "LbConfig":
        """Validate ``policy`` and keyword ``options``; raise ``ConfigError`` naming the field."""
        if not isinstance(policy, str) or policy.upper() not in POLICIES:
            raise ConfigError(
                resource, "policy", f"unsupported policy {policy!r}; expected one of {sorted(POLICIES)}"
            )
        policy = policy.upper()
        unknown = sorted(set(options) - _OPTION_NAMES)
        if unknown:
            raise ConfigError(resource, unknown[0], "unknown option")
        values: dict[str, Any] = {}

        def integer(name: str, lo: int, hi: int) -> None:
            if name not in options or options[name] is None:
                return
            value = options[name]
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(resource, name, f"must be an integer, got {value!r}")
            if not lo <= value <= hi:
                raise ConfigError(resource, name, f"must be in [{lo}, {hi}], got {value}")
            values[name] = value

        def boolean(name: str) -> None:
            if name in options and options[name] is not None:
                values[name] = bool(options[name])

        integer("choice_count", 2, 0xFFFFFFFF)
        integer("minimum_ring_size", 1, DEFAULT_MAX_RING)
        integer("maximum_ring_size", 1, DEFAULT_MAX_RING)
        integer("table_size", 2, MAX_TABLE_SIZE)
        integer("overprovisioning_factor", 1, 0xFFFFFFFF)
        boolean("locality_weighted")
        boolean("use_hostname_for_hashing")
        boolean("weighted_priority_health")
        bias = options.get("active_request_bias")
        if bias is not None:
            if not isinstance(bias, (int, float)) or isinstance(bias, bool):
                raise ConfigError(resource, "active_request_bias", f"must be a number, got {bias!r}")
            bias = float(bias)
            # Envoy warns and uses 1.0 for negative or NaN values (least_request_lb.cc). An
            # explicit bias does not force EDF with equal weights in Envoy 1.40.0 (a later
            # runtime guard does), and neither does meshcore.
            values["active_request_bias"] = 1.0 if (math.isnan(bias) or bias < 0.0) else bias
        threshold = options.get("healthy_panic_threshold")
        if threshold is not None:
            if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
                raise ConfigError(resource, "healthy_panic_threshold", f"must be a number, got {threshold!r}")
            threshold = float(threshold)
            if math.isnan(threshold) or not 0.0 <= threshold <= 100.0:
                raise ConfigError(resource, "healthy_panic_threshold", f"must be in [0, 100], got {threshold}")
            # Envoy keeps an integer percent, truncated: ProtobufPercentHelper::convertPercent
            # returns uint64_t(100 * (percent / 100.0)), so 29.0 -> 28.999999999999996 -> 28.
            # Observed on a real Envoy 1.40 (tests/test_envoy_distribution_oracle.py).
            values["healthy_panic_threshold"] = int(100 * (threshold / 100.0))
        lo = values.get("minimum_ring_size", DEFAULT_MIN_RING)
        hi = values.get("maximum_ring_size", DEFAULT_MAX_RING)
        if lo > hi:
            raise ConfigError(
                resource, "minimum_ring_size", f"minimum_ring_size ({lo}) > maximum_ring_size ({hi})"
            )
        table_size = values.get("table_size", DEFAULT_TABLE_SIZE)
        if not is_prime(table_size):
            raise ConfigError(resource, "table_size", f"the table size of maglev must be prime number, got {table_size}")
        return cls(policy=policy, policy_code=POLICIES[policy], **values)
