"""xDS resources (Envoy v3 protos or proto3-JSON dicts) to meshcore objects."""

from __future__ import annotations

from .lb_config import load_balancer_arguments

__all__ = ["load_balancer_arguments"]
