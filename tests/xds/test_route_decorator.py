"""``Route.decorator`` (``operation``, ``propagate``) in the route model: decoded from xDS
(message, proto3 JSON in camelCase and snake_case, a resource file), rejected as Envoy rejects
it (an empty operation), and kept by both route-table twins in the match result."""

from __future__ import annotations

from typing import Any, Dict

import pytest

from meshcore._route_model import DecoratorSpec
from meshcore.errors import ConfigError
from meshcore.xds import route_config_spec
from meshcore.xds.resource_file import parse_resources


def _rc(**route: Any) -> Dict[str, Any]:
    r = {"name": "r0", "match": {"prefix": "/"}, "route": {"cluster": "c"}, **route}
    return {"name": "rc", "virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": [r]}]}


def _route(rc: Dict[str, Any]) -> Any:
    return route_config_spec(rc).virtual_hosts[0].routes[0]


def test_no_decorator():
    assert _route(_rc()).decorator is None


def test_operation_and_default_propagate():
    assert _route(_rc(decorator={"operation": "reviews:9080/*"})).decorator == DecoratorSpec("reviews:9080/*", True)


@pytest.mark.parametrize("value", [False, True])
def test_propagate(value):
    d = _route(_rc(decorator={"operation": "op", "propagate": value})).decorator
    assert d == DecoratorSpec("op", value)


def test_message_form():
    from envoy.config.route.v3 import route_pb2

    msg = route_pb2.RouteConfiguration()
    from google.protobuf import json_format

    json_format.ParseDict(_rc(decorator={"operation": "op", "propagate": False}), msg)
    assert _route(msg).decorator == DecoratorSpec("op", False)


def test_empty_operation_is_rejected():
    with pytest.raises(ConfigError) as e:
        _route(_rc(decorator={"operation": ""}))
    assert "decorator.operation" in str(e.value)
    with pytest.raises(ConfigError):
        _route(_rc(decorator={"propagate": False}))


def test_redirect_and_direct_routes_keep_it():
    r = {"name": "d", "match": {"prefix": "/"}, "direct_response": {"status": 200}, "decorator": {"operation": "x"}}
    rc = {"name": "rc", "virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": [r]}]}
    assert _route(rc).decorator == DecoratorSpec("x", True)


def test_resource_file_path():
    res = parse_resources({"routes": [_rc(decorator={"operation": "file-op", "propagate": False})]})
    (msg,) = [m for url, ms in res.items() if url.endswith("RouteConfiguration") for m in ms.values()]
    assert _route(msg).decorator == DecoratorSpec("file-op", False)


@pytest.mark.parametrize("impl", ["py", "c"])
def test_match_result_carries_it(impl):
    import importlib

    mod = importlib.import_module(f"meshcore._fast.routes_{impl}")
    spec = route_config_spec(_rc(decorator={"operation": "op"}))
    table = mod.RouteTable(spec)
    m = table.match("x", "/a", None, "GET", "http", None, None)
    assert m.route.decorator == DecoratorSpec("op", True)
