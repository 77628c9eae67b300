"""Envoy's upstream resilience policies, per cluster and per request: retries, circuit breakers,
outlier detection and fault injection. Pure Python, off the pick path."""

from __future__ import annotations

from .circuit import CircuitBreakerState
from .fault import FaultDecision, decide_fault
from .outlier import OutlierDetector
from .retry import RetryState, classify_status

__all__ = ["CircuitBreakerState", "FaultDecision", "OutlierDetector", "RetryState", "classify_status", "decide_fault"]
