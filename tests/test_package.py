"""Packaging and the public surface: switch, exports, CLI."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest

import meshcore
from meshcore._fast import lb_py


def test_public_api_exported():
    for name in meshcore.__all__:
        assert hasattr(meshcore, name), name
    expected = "py" if os.environ.get("MESHCORE_NO_EXTENSIONS") else "c"
    assert meshcore.IMPLEMENTATION == expected


@pytest.mark.c_extension
def test_twins_have_the_same_public_surface():
    from meshcore._fast import lb_c

    def public(cls):
        return {n for n in dir(cls) if not n.startswith("_")}

    assert public(lb_c.LoadBalancer) == public(lb_py.LoadBalancer)
    sig_py = inspect.signature(lb_py.LoadBalancer.pick)
    assert list(sig_py.parameters) == ["self", "hash"]


def test_no_extensions_switch_selects_pure_twin():
    env = dict(os.environ, MESHCORE_NO_EXTENSIONS="1")
    code = ("import meshcore as m; lb = m.LoadBalancer([m.Endpoint('10.0.0.1', 80)], seed=1);"
            "print(m.IMPLEMENTATION, lb.pick().key, type(lb).__module__)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["py", "10.0.0.1:80", "meshcore._fast.lb_py"]


def test_demo_runs_and_reports():
    out = subprocess.run([sys.executable, "-m", "meshcore", "demo", "--tour", "--picks", "3000"],
                         capture_output=True, text=True, check=True, timeout=120)
    assert "MAGLEV" in out.stdout and "of keys moved" in out.stdout
    assert "healthy=[28, 72]" in out.stdout  # the failover step spills to P1 as Envoy would
    assert "route canary: reviews-v3" in out.stdout
    assert "redirect 308 http://reviews/v2/books?id=7" in out.stdout
