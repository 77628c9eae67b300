"""Fixtures for the server integrations' tests: ``pki`` (the Istio-shaped test PKI of
``tests/tls/pki.py``, one per session) and ``plane`` (meshcore's reference control plane, one
per module). Tests in ``test_envoy_*.py`` run a real Envoy: they get the ``envoy`` marker."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, List

import pytest

from meshcore.controlplane import ControlPlane
from tls.pki import Pki, make_pki

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: List[pytest.Item]) -> None:
    for item in items:
        if item.path.parent == _HERE and item.path.name.startswith("test_envoy_"):
            item.add_marker(pytest.mark.envoy)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def plane() -> Iterator[ControlPlane]:
    with ControlPlane() as cp:
        yield cp
