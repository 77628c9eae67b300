"""Shared fixtures: every _fast test runs against both twins (ids ``c`` and ``py``).

The compiled twin is imported directly, so a missing build fails the ``c`` tests instead of
silently testing Python twice. ``-m "not c_extension"`` deselects them for pure installs.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

import pytest

C_EXT = pytest.mark.c_extension


@pytest.fixture(scope="session", params=[pytest.param("c", marks=C_EXT), "py"])
def impl(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def lbmod(impl: str) -> ModuleType:
    return import_module(f"meshcore._fast.lb_{impl}")


@pytest.fixture(scope="session")
def LB(lbmod: ModuleType):  # noqa: N802  (a class, named like one)
    return lbmod.LoadBalancer


@pytest.fixture(scope="session")
def mesh_cls(impl: str):
    """``meshcore.Mesh`` whose request path (``Mesh.request``, Call, Attempt, ClusterCounters)
    is the ``impl`` twin; the balancers and route tables are whichever core is live."""
    from meshcore.mesh import Mesh, MeshBase

    mod = import_module(f"meshcore._fast.call_{impl}")
    if Mesh._core is mod:
        return Mesh
    return type(f"Mesh_{impl}", (MeshBase, mod.MeshCore), {"_core": mod})
