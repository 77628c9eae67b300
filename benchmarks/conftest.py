"""Benchmarks run the compiled and pure twins side by side (ids c / py) in one run."""

from __future__ import annotations

from importlib import import_module

import pytest

from meshcore import Endpoint


@pytest.fixture(scope="session", params=["c", "py"])
def LB(request):  # noqa: N802
    return import_module(f"meshcore._fast.lb_{request.param}").LoadBalancer


def endpoints(n: int, weighted: bool = False) -> list:
    return [
        Endpoint(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 8080 + i % 7,
                 weight=(1 + i % 3) if weighted else 1)
        for i in range(n)
    ]
