"""Fixtures for the CLI tests: a resource set, served by a reference control plane or a file."""

from __future__ import annotations

import json
from typing import Any, Dict

import pytest

from meshcore.controlplane import ControlPlane

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
TARGET = "reviews:9080"


def _eds_cluster(name: str, **extra: Any) -> Dict[str, Any]:
    return {"name": name, "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}}, **extra}


def resources() -> Dict[str, Any]:
    """reviews:9080 -> RDS "9080": x-canary -> v2, /healthz direct, /old redirect, split v1 90 / v2 10."""
    return {
        "listeners": [{"name": TARGET, "api_listener": {"api_listener": {
            "@type": HCM, "rds": {"config_source": {"ads": {}}, "route_config_name": "9080"},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}]}}}],
        "routes": [{"name": "9080", "virtual_hosts": [{
            "name": "reviews", "domains": ["reviews", TARGET, "*.reviews.svc"],
            "routes": [
                {"name": "canary-header", "match": {"prefix": "/", "headers": [
                    {"name": "x-canary", "string_match": {"exact": "1"}}]}, "route": {"cluster": "reviews-v2"}},
                {"name": "health", "match": {"path": "/healthz"},
                 "direct_response": {"status": 200, "body": {"inline_string": "ok"}}},
                {"name": "old", "match": {"prefix": "/old"}, "redirect": {"prefix_rewrite": "/new"}},
                {"name": "split", "match": {"prefix": "/"}, "route": {
                    "weighted_clusters": {"clusters": [{"name": "reviews-v1", "weight": 90},
                                                       {"name": "reviews-v2", "weight": 10}]},
                    "timeout": "2s", "retry_policy": {"retry_on": "5xx", "num_retries": 2}}},
            ]}]}],
        "clusters": [_eds_cluster("reviews-v1", lb_policy="LEAST_REQUEST",
                                  outlier_detection={"consecutive_5xx": 3}),
                     _eds_cluster("reviews-v2")],
        "endpoints": [
            {"cluster_name": "reviews-v1", "endpoints": [{
                "locality": {"region": "us", "zone": "east"}, "load_balancing_weight": 1,
                "lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "10.0.0.1", "port_value": 9080}}}},
                    {"endpoint": {"address": {"socket_address": {"address": "10.0.0.2", "port_value": 9080}}},
                     "load_balancing_weight": 3}]}]},
            {"cluster_name": "reviews-v2", "endpoints": [{
                "locality": {"region": "us", "zone": "west"}, "load_balancing_weight": 1,
                "lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "10.0.1.1", "port_value": 9080}}},
                     "health_status": "DEGRADED"}]}]},
        ],
    }


@pytest.fixture
def plane():
    with ControlPlane() as cp:
        cp.set_resources(resources())
        yield cp


@pytest.fixture
def bootstrap_file(plane, tmp_path):
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps({
        "xds_servers": [{"server_uri": plane.address, "channel_creds": [{"type": "insecure"}],
                         "server_features": ["xds_v3"]}],
        "node": {"id": "cli-test", "cluster": "test"}}))
    return str(path)


@pytest.fixture
def resource_file(tmp_path):
    path = tmp_path / "mesh.json"
    path.write_text(json.dumps(resources()))
    return str(path)
