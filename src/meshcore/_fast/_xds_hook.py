"""Where the layer above plugs in the xDS decoding behind ``from_xds``.

``_fast`` imports nothing from the layers above it, but ``LoadBalancer.from_xds`` and
``RouteTable.from_xds`` (both twins) need the xDS decoders of ``meshcore.xds``. They call
:func:`decoder`, which returns what :func:`register` was given. ``meshcore/__init__.py``
registers both decoders when the package is imported (as shims that import ``meshcore.xds``
on first use: it loads protobuf and grpc), so ``from_xds`` works exactly as before right after
``import meshcore``, whichever twin is called. Used only when a table is built from xDS, never
on a pick or a match.

The decoders:

* ``"load_balancer"``: ``(cluster, load_assignment) -> (endpoints, policy, options)``
  (``meshcore.xds.lb_config.load_balancer_arguments``);
* ``"route_config"``: ``(route_configuration) -> RouteConfigSpec``
  (``meshcore.xds.route_config.route_config_spec``).
"""

from __future__ import annotations

from typing import Any, Callable, Dict

__all__ = ["decoder", "register"]

_DECODERS: Dict[str, Callable[..., Any]] = {}
_KINDS = ("load_balancer", "route_config")


def register(kind: str, fn: Callable[..., Any]) -> None:
    """Make ``fn`` the ``kind`` decoder (the last registration wins)."""
    if kind not in _KINDS:
        raise ValueError(f"unknown xDS decoder kind {kind!r}; expected one of {_KINDS}")
    _DECODERS[kind] = fn


def decoder(kind: str) -> Callable[..., Any]:
    """The registered ``kind`` decoder."""
    fn = _DECODERS.get(kind)
    if fn is None:
        raise RuntimeError(f"no xDS {kind} decoder registered: import meshcore (not only meshcore._fast) first")
    return fn
