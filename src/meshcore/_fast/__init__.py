"""The hot path: endpoint selection, compiled (``*_c``) or pure Python (``*_py``).

``IMPLEMENTATION`` says which core is live: ``"c"`` or ``"py"``. Set
``MESHCORE_NO_EXTENSIONS=1`` to force the pure-Python twins. Both twins are imported as a
set, so a half-built install cannot mix them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from .._compat import USE_EXTENSIONS

__all__ = ["IMPLEMENTATION", "LoadBalancer", "RouteTable", "xxh64"]

IMPLEMENTATION: Literal["c", "py"]
if TYPE_CHECKING or not USE_EXTENSIONS:
    from .lb_py import LoadBalancer, xxh64
    from .routes_py import RouteTable

    IMPLEMENTATION = "py"
else:
    try:
        from .lb_c import LoadBalancer, xxh64
        from .routes_c import RouteTable

        IMPLEMENTATION = "c"
    except ImportError:  # pragma: no cover  (sdist installed without a compiler)
        from .lb_py import LoadBalancer, xxh64
        from .routes_py import RouteTable

        IMPLEMENTATION = "py"
