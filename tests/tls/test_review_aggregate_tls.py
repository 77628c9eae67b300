"""An aggregate cluster's endpoint that no child holds any more (EDS removed it between the pick
and the connection) must not be connected to in plaintext when its children use TLS."""

from __future__ import annotations

import json
from typing import Any

import pytest

import meshcore
from meshcore.tls import TlsHandshakeError

from .httpx_mesh import TARGET, assignment, plain_cluster, resources, route, tls_cluster

AGG = {"name": "agg", "connect_timeout": "1s", "lb_policy": "CLUSTER_PROVIDED",
       "cluster_type": {"name": "envoy.clusters.aggregate", "typed_config": {
           "@type": "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig",
           "clusters": ["child"]}}}


def _mesh(tmp_path: Any, child: Any, port: int, mtls: bool) -> Any:
    path = tmp_path / "mesh.json"
    path.write_text(json.dumps(resources([child, AGG], [assignment("child", [(port, mtls)])], [route("/", "agg")])))
    mesh = meshcore.Mesh.from_file(path, watch=False, seed=1, certificates=None).start()
    mesh.wait_ready(TARGET, timeout=5)
    return mesh, path


def _move_endpoint(mesh: Any, path: Any, child: Any, port: int, mtls: bool) -> None:
    path.write_text(json.dumps(resources([child, AGG], [assignment("child", [(port, mtls)])], [route("/", "agg")])))
    mesh._source.reload()


def test_an_endpoint_gone_from_a_tls_child_is_not_connected_in_plaintext(tmp_path: Any) -> None:
    child = tls_cluster("child", ["spiffe://cluster.local/ns/default/sa/x"])
    mesh, path = _mesh(tmp_path, child, 9, True)
    try:
        ep = mesh.pick(TARGET, "/").endpoint
        _move_endpoint(mesh, path, child, 10, True)  # EDS: the picked endpoint left
        with pytest.raises(TlsHandshakeError, match="agg"):
            mesh.upstream_tls("agg", ep)
    finally:
        mesh.close()


def test_an_endpoint_gone_from_a_plaintext_child_stays_plaintext(tmp_path: Any) -> None:
    child = plain_cluster("child")
    mesh, path = _mesh(tmp_path, child, 9, False)
    try:
        ep = mesh.pick(TARGET, "/").endpoint
        _move_endpoint(mesh, path, child, 10, False)
        assert mesh.upstream_tls("agg", ep) is None
    finally:
        mesh.close()
