"""Shared by tests/xds/test_{listener,cluster,endpoint}_config.py.

* Fixture loading (``tests/fixtures``, see its README) and :func:`resources`, which finds every
  resource of one type in a config dump by its ``@type``.
* The differential tests against Envoy 1.40. Each :class:`Case` is one generated resource with
  two declared verdicts: meshcore's (accepted, or the exact :class:`ConfigError` field) and
  Envoy's (accepted, or a piece of its error message). :func:`check_meshcore` checks the first;
  :func:`envoy_verdicts` runs ``envoy --mode validate`` for the second. When the two verdicts
  differ the case must say why (``why``): those are the documented places where meshcore follows
  gRPC or cannot do what Envoy does. Envoy stops at the first error, so every case Envoy should
  reject gets its own run, while all the cases it should accept share one bootstrap (and are
  retried one by one only if that bootstrap fails). Runs go two at a time.

Envoy's validate mode builds clusters and listeners but does not initialise clusters, so rules
Envoy applies only when hosts are loaded (the weight-sum limits, for example) cannot be checked
this way; the unit tests cover those.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import pytest

from meshcore.errors import ConfigError

TESTS = pathlib.Path(__file__).resolve().parent.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
from envoy_process import find_envoy  # noqa: E402

FIXTURES = TESTS / "fixtures"
TYPE = "type.googleapis.com/"
HCM = TYPE + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = TYPE + "envoy.extensions.filters.http.router.v3.Router"
FAULT = TYPE + "envoy.extensions.filters.http.fault.v3.HTTPFault"
TLS = TYPE + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
RAW_BUFFER = TYPE + "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
HPO_NAME = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
AGGREGATE = TYPE + "envoy.extensions.clusters.aggregate.v3.ClusterConfig"
XDS_TYPED_STRUCT = TYPE + "xds.type.v3.TypedStruct"
UDPA_TYPED_STRUCT = TYPE + "udpa.type.v1.TypedStruct"


# -- fixtures -------------------------------------------------------------------------------------


def load_json(rel: str) -> Any:
    return json.loads((FIXTURES / rel).read_text())


def load_yaml(rel: str) -> Any:
    import yaml

    return yaml.safe_load((FIXTURES / rel).read_text())


def resources(node: Any, type_name: str) -> Iterator[Dict[str, Any]]:
    """Every dict whose ``@type`` names ``type_name`` (a full message name), at any depth."""
    if isinstance(node, dict):
        if str(node.get("@type", "")).rsplit("/", 1)[-1] == type_name:
            yield node
            return
        for value in node.values():
            yield from resources(value, type_name)
    elif isinstance(node, list):
        for value in node:
            yield from resources(value, type_name)


# -- small builders -------------------------------------------------------------------------------


def socket_address(address: str, port: int) -> Dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}


def lb_endpoint(address: str = "10.0.0.1", port: int = 8080, **fields: Any) -> Dict[str, Any]:
    endpoint = {"address": socket_address(address, port)}
    endpoint.update(fields.pop("endpoint", {}))
    return {"endpoint": endpoint, **fields}


def router(name: str = "envoy.filters.http.router", **fields: Any) -> Dict[str, Any]:
    return {"name": name, "typed_config": {"@type": ROUTER}, **fields}


def fault(
    config: Optional[Dict[str, Any]] = None, name: str = "envoy.filters.http.fault", **fields: Any
) -> Dict[str, Any]:
    return {"name": name, "typed_config": {"@type": FAULT, **(config or {})}, **fields}


# -- meshcore side --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One generated resource and the verdicts meshcore and Envoy give it."""

    name: str
    config: Dict[str, Any]  # proto3 JSON of the resource meshcore decodes
    field: Optional[str] = None  # meshcore: None = accepted, else the ConfigError field
    envoy: Optional[str] = None  # Envoy: None = accepted, else a substring of its error message
    why: str = ""  # required when the verdicts differ

    def __str__(self) -> str:
        return self.name


def check_meshcore(decode: Callable[[Any], Any], case: Case, resource: str) -> Any:
    """Decode ``case.config``; assert the declared verdict (and the error's resource). Returns
    the model, or ``None`` for a rejected case."""
    if case.field is None:
        return decode(case.config)
    with pytest.raises(ConfigError) as info:
        decode(case.config)
    assert (info.value.resource, info.value.field) == (resource, case.field), info.value
    return None


def check_documented(cases: Sequence[Case]) -> None:
    """Every disagreement with Envoy carries its reason; names are unique."""
    names = [c.name for c in cases]
    assert len(names) == len(set(names))
    for c in cases:
        assert (c.field is None) == (c.envoy is None) or c.why, f"{c.name}: verdicts differ, no reason given"


# -- Envoy side -----------------------------------------------------------------------------------

_XDS_CLUSTER = {
    "name": "xds", "type": "STATIC",
    "typed_extension_protocol_options": {HPO_NAME: {
        "@type": TYPE + HPO_NAME, "explicit_http_config": {"http2_protocol_options": {}}}},
    "load_assignment": {"cluster_name": "xds", "endpoints": [{"lb_endpoints": [lb_endpoint("127.0.0.1", 1)]}]},
}


def bootstrap(clusters: Sequence[Dict[str, Any]] = (), listeners: Sequence[Dict[str, Any]] = ()) -> Dict[str, Any]:
    """A static Envoy bootstrap with an ADS server (so that ``ads`` config sources are valid)."""
    return {
        "node": {"id": "meshcore-test", "cluster": "meshcore-test"},
        "static_resources": {"clusters": [_XDS_CLUSTER, *clusters], "listeners": list(listeners)},
        "dynamic_resources": {"ads_config": {
            "api_type": "GRPC", "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]}},
    }


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    message: str


def _validate_config(envoy: str, path: str, cwd: str) -> subprocess.CompletedProcess:
    """``envoy --mode validate``, like ``envoy_process.validate_config`` but without a
    ``preexec_fn``: with one CPython must fork(), and once a gRPC channel or server has run in
    this process (the xDS client tests), grpcio's fork handlers sometimes abort the child before
    it execs (rc -6, "epoll_wait error: Bad file descriptor"). Without it CPython uses vfork and
    no fork handlers run. A validate run ends by itself, so the death signal is not needed."""
    return subprocess.run([envoy, "--mode", "validate", "-c", path, "-l", "error", "--use-dynamic-base-id"],
                          capture_output=True, text=True, timeout=60, cwd=cwd)


def _validate_all(configs: Dict[str, Dict[str, Any]]) -> Dict[str, Verdict]:
    envoy = find_envoy()
    with tempfile.TemporaryDirectory(prefix="meshcore-validate-") as tmp:
        def one(item: Any) -> Any:
            index, (key, config) = item
            path = os.path.join(tmp, f"{index}.json")
            with open(path, "w") as f:
                json.dump(config, f)
            result = _validate_config(envoy, path, tmp)
            return key, Verdict(result.returncode == 0, (result.stdout + result.stderr).strip())

        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            return dict(pool.map(one, enumerate(configs.items())))


def envoy_verdicts(
    cases: Sequence[Case], bootstrap_of: Callable[[Sequence[Case]], Dict[str, Any]]
) -> Dict[str, Verdict]:
    """Envoy's verdict on each case (see the module docstring for how runs are batched)."""
    accepted = [c for c in cases if c.envoy is None]
    configs = {c.name: bootstrap_of([c]) for c in cases if c.envoy is not None}
    if accepted:
        configs[""] = bootstrap_of(accepted)
    verdicts = _validate_all(configs)
    batch = verdicts.pop("", None)
    if batch is not None:
        if batch.accepted:
            verdicts.update({c.name: batch for c in accepted})
        else:  # some case Envoy should accept is refused: find which
            verdicts.update(_validate_all({c.name: bootstrap_of([c]) for c in accepted}))
    return verdicts


def check_envoy(case: Case, verdict: Verdict) -> None:
    if case.envoy is None:
        assert verdict.accepted, f"Envoy rejects {case.name}:\n{verdict.message[-3000:]}"
    else:
        assert not verdict.accepted, f"Envoy accepts {case.name} (expected an error with {case.envoy!r})"
        assert case.envoy in verdict.message, f"{case.name}: expected {case.envoy!r} in:\n{verdict.message[-3000:]}"


def runs(cases: Sequence[Case]) -> int:
    """How many Envoy runs :func:`envoy_verdicts` makes when every verdict is as declared."""
    return sum(1 for c in cases if c.envoy is not None) + (1 if any(c.envoy is None for c in cases) else 0)


__all__: List[str] = [
    "AGGREGATE", "Case", "FAULT", "HCM", "HPO_NAME", "RAW_BUFFER", "ROUTER", "TLS", "UDPA_TYPED_STRUCT",
    "Verdict", "XDS_TYPED_STRUCT", "bootstrap", "check_documented", "check_envoy", "check_meshcore",
    "envoy_verdicts", "fault", "lb_endpoint", "load_json", "load_yaml", "resources", "router", "runs",
    "socket_address",
]
