"""ClusterLoadAssignment (xDS v3) to :class:`~meshcore.xds.model.EndpointsSpec`.

:func:`endpoints_spec` accepts an ``envoy.config.endpoint.v3.ClusterLoadAssignment`` message, an
``Any`` holding one, or a proto3-JSON dict, and validates it with
:func:`~meshcore.xds.lb_config.assignment_arguments` as an EDS assignment (its docstring, and
``lb_config``'s module docstring, list the rules: IP-literal socket addresses, Envoy's weight and
priority limits, contiguous priorities, no LEDS, named endpoints or drop overloads). Errors are
:class:`~meshcore.errors.ConfigError` naming the assignment's ``cluster_name`` and the field path.
"""

from __future__ import annotations

from typing import Any

from envoy.config.endpoint.v3 import endpoint_pb2

from .lb_config import _coerce, assignment_arguments
from .model import EndpointsSpec

__all__ = ["endpoints_spec"]

_Cla = endpoint_pb2.ClusterLoadAssignment


def endpoints_spec(load_assignment: Any) -> EndpointsSpec:
    """Validate and convert an EDS ClusterLoadAssignment; raise ``ConfigError`` naming the field."""
    cla = _coerce(load_assignment, _Cla, "cluster_name", "ClusterLoadAssignment")
    endpoints, options = assignment_arguments(cla)
    return EndpointsSpec(cla.cluster_name, tuple(endpoints), tuple(sorted(options.items())))
