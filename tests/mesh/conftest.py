"""Fixtures for the Mesh tests: a reference control plane and meshes bootstrapped to it."""

from __future__ import annotations

import os
from typing import Any, List

import pytest

import meshcore
from meshcore.controlplane import ControlPlane

from .shapes import bootstrap, fast_backoff

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")


@pytest.fixture
def fixture_path():
    def path(rel: str) -> str:
        return os.path.join(FIXTURES, rel)

    return path


@pytest.fixture
def cp():
    with ControlPlane() as plane:
        yield plane


@pytest.fixture
def make_mesh(cp):
    meshes: List[meshcore.Mesh] = []

    def make(mode: str = "sotw", **kw: Any) -> meshcore.Mesh:
        boot = kw.pop("bootstrap", None) or bootstrap(cp)
        m = meshcore.Mesh(boot, delta=(mode == "delta"), backoff=fast_backoff(), **kw)
        meshes.append(m)
        return m.start()

    yield make
    for m in meshes:
        m.close()
