"""Review findings in meshcore.tls.certificates (file sources keep their last good set)."""

from __future__ import annotations

from typing import Any

import pytest

from meshcore.tls import CertificatesUnavailable, FileCertificateSource

from .pki import Pki, spiffe_id, write_istio_dir


def test_an_encrypted_key_keeps_the_last_good_set(pki: Pki, tmp_path: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    d = str(tmp_path / "certs")
    leaf = pki.root.issue(spiffe_id("rotating"))
    write_istio_dir(d, leaf, roots=[pki.root])
    src = FileCertificateSource.from_directory(d, refresh_interval=0.05)
    first = src.current()
    with open(f"{d}/key.pem", "wb") as f:  # a key the agent (or an operator) wrote encrypted
        f.write(leaf.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(b"secret")))
    assert src.refresh(force=True) is False
    assert src.current() is first and "encrypted" in src.problem
    fresh = FileCertificateSource.from_directory(d)
    with pytest.raises(CertificatesUnavailable, match="encrypted"):
        fresh.current()
