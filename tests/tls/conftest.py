"""Fixtures for mTLS tests: ``pki`` (session), ``sidecar`` and ``sidecar_factory`` (module).

* ``pki``: :class:`tls.pki.Pki` in a session temp dir: ``pki.root`` / ``pki.intermediate`` /
  ``pki.evil_root`` (:class:`tls.pki.CA`), the identities of ``Pki.IDENTITIES`` as attributes
  (``pki.client`` ... :class:`tls.pki.Leaf`) and as Istio-layout directories
  (``pki.paths("client")`` -> :class:`tls.pki.CertPaths` with ``.dir .key .chain .roots``).
  Shared by the whole session: never rewrite its directories; write rotations into your own
  ``tmp_path`` with :func:`tls.pki.write_istio_dir`.
* ``sidecar``: a started :class:`tls.sidecar.SidecarInbound` (Envoy, STRICT inbound, auto-port)
  presenting ``pki.paths("sidecar")``, trusting ``pki.root``, RBAC allowing only
  ``spiffe://cluster.local/ns/default/sa/client``, in front of an :class:`tls.sidecar.EchoApp`.
* ``sidecar_factory(**kw)``: another started SidecarInbound (``paths`` defaults to the pki's
  sidecar directory; other keywords as ``SidecarInbound``), stopped at the end of the module.

Tests that use ``sidecar`` or ``sidecar_factory`` get the ``envoy`` marker automatically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, List

import pytest

from .pki import Pki, make_pki
from .sidecar import SidecarInbound

_ENVOY_FIXTURES = {"sidecar", "sidecar_factory"}
_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: List[pytest.Item]) -> None:
    for item in items:
        if _HERE in item.path.parents and _ENVOY_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.envoy)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def sidecar(pki: Pki) -> Iterator[SidecarInbound]:
    sc = SidecarInbound(pki.paths("sidecar"))
    sc.start()
    try:
        yield sc
    finally:
        sc.stop()


@pytest.fixture(scope="module")
def sidecar_factory(pki: Pki) -> Iterator[Callable[..., SidecarInbound]]:
    started: List[SidecarInbound] = []

    def make(**kw: Any) -> SidecarInbound:
        sc = SidecarInbound(kw.pop("paths", pki.paths("sidecar")), **kw)
        started.append(sc)
        sc.start()
        return sc

    try:
        yield make
    finally:
        for sc in reversed(started):
            sc.stop()
