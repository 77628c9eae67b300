"""Shared pieces of the differential (real-Envoy oracle) tests: importing meshcore, endpoint
addresses, scenario parametrisation and per-scenario Envoy run caching, and meshcore's route table
twins."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import sys
from types import ModuleType
from typing import Any, Callable, Sequence, TypeVar

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

T = TypeVar("T")


def import_meshcore() -> ModuleType:
    """Import meshcore (installed, or from ../src).  ImportError -> test failure, never a skip."""
    try:
        return importlib.import_module("meshcore")
    except ImportError:
        src = os.path.join(os.path.dirname(HERE), "src")
        if src not in sys.path:
            sys.path.insert(0, src)
        return importlib.import_module("meshcore")


def route_table_class(impl: str) -> Any:
    """meshcore's route table, compiled (``c``) or pure (``py``) twin, imported directly."""
    return importlib.import_module(f"meshcore._fast.routes_{impl}").RouteTable


@pytest.fixture(scope="session")
def RouteTable(impl: str):  # noqa: N802  (a class, named like one)
    """meshcore's route table, compiled (c) or pure (py) twin, imported directly (as conftest's
    ``lbmod``): a missing build fails the c tests instead of silently testing Python twice."""
    return route_table_class(impl)


@dataclasses.dataclass
class EnvoyRun:
    """One scenario through Envoy: the config it was given (subclasses add its answers)."""

    scenario: Any
    cluster: dict
    cla: dict
    specs: list  # EndpointSpec, with concrete ports, CLA host order


def loopback_addr(i: int, base: int) -> str:
    # distinct loopback addresses per scenario: 127.<base>.<i // 250>.<2 + i % 250>
    return f"127.{base}.{i // 250}.{2 + i % 250}"


def all_checks(*checks: Callable[[T], None]) -> Callable[[T], None]:
    """One check that runs every one of ``checks``."""

    def check(run: T) -> None:
        for c in checks:
            c(run)

    return check


def per_scenario(scenarios: Sequence[Any]) -> pytest.MarkDecorator:
    """``@pytest.mark.parametrize("scn", scenarios)`` with each scenario's (unique) name as id."""
    ids = [s.name for s in scenarios]
    assert len(set(ids)) == len(ids)
    return pytest.mark.parametrize("scn", scenarios, ids=ids)


def once_per_scenario(run: Callable[[Any], T]) -> Callable[[Any], T]:
    """Cache ``run(scn)`` by ``scn.name``: Envoy runs once per scenario, shared by its tests."""
    runs: dict[str, T] = {}

    @functools.wraps(run)
    def cached(scn: Any) -> T:
        if scn.name not in runs:
            runs[scn.name] = run(scn)
        return runs[scn.name]

    return cached
