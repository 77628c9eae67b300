"""The workload identity where a user looks: ``meshcore status``, ``Mesh.identity()``, Prometheus."""

from __future__ import annotations

import json
import re
import os
from typing import Any

from meshcore import Mesh
from meshcore.cli import main

from .pki import Pki, spiffe_id

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "mesh.yaml")


def status(capsys: Any, *args: str) -> str:
    main(["status", "--file", EXAMPLE, *args])
    return capsys.readouterr().out


def test_status_shows_the_identity(capsys: Any, pki: Pki, monkeypatch: Any) -> None:
    monkeypatch.delenv("MESHCORE_CERTIFICATES", raising=False)
    out = status(capsys, "--certificates", pki.paths("client").dir)
    line = [x for x in out.splitlines() if x.startswith("identity:")][0]
    assert line.startswith(f"identity: {spiffe_id('client')}, 1 root, expires ") and re.search(r"\(in 2[34]\.\d h\)$", line)
    data = json.loads(status(capsys, "--certificates", pki.paths("client").dir, "--json"))
    assert data["identity"]["spiffe_id"] == spiffe_id("client") and data["identity"]["root_count"] == 1


def test_status_warns_about_expired_and_missing_certificates(capsys: Any, pki: Pki, tmp_path: Any,
                                                             monkeypatch: Any) -> None:
    monkeypatch.delenv("MESHCORE_CERTIFICATES", raising=False)
    out = status(capsys, "--certificates", pki.paths("expired_client").dir)
    assert "EXPIRED" in out and "WARNING: the certificate expired" in out
    out = status(capsys, "--certificates", str(tmp_path))
    assert "identity: UNAVAILABLE from" in out and "cert-chain.pem" in out
    assert "identity: none" in status(capsys)


def test_mesh_identity_and_certificate_metrics(pki: Pki) -> None:
    from prometheus_client import CollectorRegistry

    mesh = Mesh.from_file(EXAMPLE, watch=False, certificates=pki.paths("server").dir)
    try:
        ident = mesh.identity()
        assert ident is not None and ident.spiffe_id == spiffe_id("server")
        reg = CollectorRegistry()
        reg.register(mesh.prometheus_collector())
        left = reg.get_sample_value("meshcore_certificate_expiry_seconds", {"source": "workload"})
        assert left is not None and 23 * 3600 < left <= 24 * 3600
        assert reg.get_sample_value("meshcore_certificate_loaded", {"source": "workload"}) == 1
        assert reg.get_sample_value("meshcore_certificate_reload_failures_total", {"source": "workload"}) == 0
    finally:
        mesh.close()
