"""A reference xDS control plane (ADS over gRPC, SotW and delta) for tests, demos and interop.

>>> from meshcore.controlplane import ControlPlane
>>> with ControlPlane() as cp:            # doctest: +SKIP
...     cp.set_resources([listener, route_config, cluster, assignment])
...     cp.wait_for(lambda e: e["dir"] == "req" and e["nonce"])

Modules: :mod:`.plane` (``ControlPlane``), :mod:`.server` (the ADS servicer), :mod:`.sotw` and
:mod:`.delta` (the per-stream protocols), :mod:`.store` (the versioned store), :mod:`.history`,
:mod:`.http_api`, :mod:`.watch` (file reload), :mod:`.builders` (message helpers), :mod:`.cli`.
``ControlPlane`` is imported lazily so that ``meshcore --help`` does not load gRPC.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ControlPlane"]


def __getattr__(name: str) -> Any:
    if name == "ControlPlane":
        from .plane import ControlPlane

        return ControlPlane
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
