"""Envoy's upstream resilience policies, per cluster and per request: retries, outlier detection
and fault injection. Pure Python, off the pick path. (Circuit breakers are counted on the
request path itself: ``ClusterCounters`` in ``meshcore._fast.call_c`` / ``call_py``.)"""

from __future__ import annotations

from .fault import FaultDecision, decide_fault
from .outlier import OutlierDetector
from .retry import RetryState, classify_status

__all__ = ["FaultDecision", "OutlierDetector", "RetryState", "classify_status", "decide_fault"]
