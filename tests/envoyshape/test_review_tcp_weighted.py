"""A ``tcp_proxy`` with ``weighted_clusters`` (Istio: a VirtualService's tcp route over subsets):
Envoy picks a cluster per connection by weight; meshcore's tcp_endpoint must too."""

from __future__ import annotations

import copy
import json
from collections import Counter
from typing import Any

import meshcore
from meshcore.controlplane import istio_sidecar as sidecar

from .test_envoy_shape_mesh import _desc

DB = "outbound|5432||db.default.svc.cluster.local"
DB2 = "outbound|5432|v2|db.default.svc.cluster.local"


def _weighted_doc() -> Any:
    from google.protobuf import json_format

    res = sidecar.build(_desc(tcp_target=5432), istio_proxy_extensions=False)
    doc = {key: [json_format.MessageToDict(m) for m in res[key]] for key in ("listeners", "routes", "clusters",
                                                                              "endpoints")}
    hits = 0
    for listener in doc["listeners"]:
        for chain in listener.get("filterChains", []):
            for f in chain.get("filters", []):
                tc = f.get("typedConfig", {})
                if tc.get("cluster") == DB:
                    del tc["cluster"]
                    tc["weightedClusters"] = {"clusters": [{"name": DB, "weight": 1}, {"name": DB2, "weight": 3}]}
                    hits += 1
    assert hits
    c2 = copy.deepcopy(next(c for c in doc["clusters"] if c["name"] == DB))
    c2["name"] = DB2
    c2.setdefault("edsClusterConfig", {})["serviceName"] = DB2
    doc["clusters"].append(c2)
    e2 = copy.deepcopy(next(e for e in doc["endpoints"] if e["clusterName"] == DB))
    e2["clusterName"] = DB2
    doc["endpoints"].append(e2)
    return doc


def test_weighted_tcp_proxy_clusters_are_picked_by_weight(tmp_path: Any) -> None:
    path = tmp_path / "sidecar.json"
    path.write_text(json.dumps(_weighted_doc()))
    with meshcore.Mesh.from_file(str(path), xds_shape="envoy", seed=7) as m:
        seen: Counter = Counter()
        for _ in range(400):
            with m.tcp_endpoint("db:5432") as pick:
                seen[pick.cluster] += 1
    assert set(seen) == {DB, DB2}
    assert 0.15 < seen[DB] / 400 < 0.35  # weight 1 of 4
