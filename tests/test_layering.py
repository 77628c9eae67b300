"""Layering: nothing in ``meshcore._fast`` imports from the layers above it.

``_fast`` (the hot path, both twins) may import itself and the base modules at the package root;
everything else (``meshcore.xds``, ``telemetry``, ``lifecycle``, ``resilience``, ``stats``,
``mesh``, ...) sits above it. Every source in ``src/meshcore/_fast`` is checked: ``.py`` files
with ``ast`` (imports nested in functions and classes included, and ``import_module`` /
``__import__`` of a literal name), ``.pyx`` / ``.pxd`` files with a regex over their import lines
(any indentation, so lazy imports count too).

The request path (``call_c`` / ``call_py``) calls into the layers above through entries they
register in ``meshcore._fast._hooks`` when imported; the tests below check that every entry is in
both twins once ``meshcore.mesh`` is imported, and that the names moved down into ``_fast`` are
still the same objects under their old names.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import pytest

FAST = Path(__file__).resolve().parent.parent / "src" / "meshcore" / "_fast"
PACKAGE = "meshcore._fast"

#: Base modules ``_fast`` may import (the foundation under it).
ALLOWED_BASE = {"_model", "_options", "_route_model", "_routing", "_url", "errors", "_compat"}

def _resolve(module: Optional[str], level: int) -> str:
    """The absolute name of ``from <level dots><module> import ...`` inside ``meshcore._fast``."""
    if level == 0:
        return module or ""
    parts = PACKAGE.split(".")
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _imported(base: str, names: List[str]) -> Iterator[str]:
    """What ``from base import names`` can load: the module, or ``base.name`` for a package's names."""
    if base in ("meshcore", PACKAGE):  # ``from .. import lifecycle`` loads meshcore.lifecycle
        for name in names:
            yield f"{base}.{name}" if name != "*" else base
    else:
        yield base


def _allowed(name: str) -> bool:
    if not (name == "meshcore" or name.startswith("meshcore.")):
        return True  # stdlib and third-party
    if name == PACKAGE or name.startswith(PACKAGE + "."):
        return True
    parts = name.split(".")
    return len(parts) >= 2 and parts[1] in ALLOWED_BASE


def _py_imports(source: str) -> Iterator[Tuple[int, str]]:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module, node.level)
            for name in _imported(base, [a.name for a in node.names]):
                yield node.lineno, name
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                target = node.args[0].value
                if target.startswith("."):
                    dots = len(target) - len(target.lstrip("."))
                    target = _resolve(target[dots:] or None, dots)
                yield node.lineno, target


_FROM = re.compile(r"^[ \t]*from[ \t]+(\.*)([\w.]*)[ \t]+c?import[ \t]+(\([^)]*\)|[^\n#]*)", re.M)
_IMPORT = re.compile(r"^[ \t]*c?import[ \t]+([^\n#]+)", re.M)


def _pyx_imports(source: str) -> Iterator[Tuple[int, str]]:
    def line(m: re.Match) -> int:
        return source.count("\n", 0, m.start()) + 1

    for m in _FROM.finditer(source):
        names = [n.split()[0] for n in m.group(3).strip("()").replace("\\\n", " ").split(",") if n.strip()]
        for name in _imported(_resolve(m.group(2) or None, len(m.group(1))), names):
            yield line(m), name
    for m in _IMPORT.finditer(source):
        for alias in m.group(1).split(","):
            if alias.strip():
                yield line(m), alias.split()[0]


def upward_imports(path: Path) -> List[str]:
    source = path.read_text(encoding="utf-8")
    found = _py_imports(source) if path.suffix == ".py" else _pyx_imports(source)
    return [f"{path.name}:{lineno}: {name}" for lineno, name in found if not _allowed(name)]


SOURCES = sorted(p for p in FAST.iterdir() if p.suffix in (".py", ".pyx", ".pxd"))


def test_the_sources_are_found():
    names = {p.name for p in SOURCES}
    assert {"lb_py.py", "lb_c.pyx", "routes_py.py", "routes_c.pyx", "_build.py", "__init__.py", "call_py.py",
            "call_c.pyx", "_hooks.py", "_consts.py", "_outcome.py"} <= names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_fast_imports_nothing_above_it(path: Path):
    assert upward_imports(path) == []


def test_the_checker_sees_every_form():
    py = ("from .. import lifecycle, errors\nfrom ..xds.lb_config import x\nfrom .._model import Endpoint\n"
          "def f():\n    from ..telemetry import record\n    import meshcore.stats\n"
          "    importlib.import_module('meshcore.mesh')\nfrom . import _build\nimport os\n")
    assert [n for _, n in _py_imports(py) if not _allowed(n)] == [
        "meshcore.lifecycle", "meshcore.xds.lb_config", "meshcore.telemetry", "meshcore.stats", "meshcore.mesh"]
    pyx = ("from .. import lifecycle\nfrom .._routing import (a,\n    b)\nfrom ..stats import (X,\n  Y)\n"
           "cdef f():\n    from ..xds.route_config import route_config_spec\n    import meshcore.mesh as m\n"
           "from .lb_c cimport lb_pick\nfrom libc.stdint cimport uint64_t\n")
    assert [n for _, n in _pyx_imports(pyx) if not _allowed(n)] == [
        "meshcore.lifecycle", "meshcore.stats", "meshcore.xds.route_config", "meshcore.mesh"]


def test_from_xds_works_on_every_twin_without_importing_the_xds_layer_first():
    """The decoders are plugged in by ``import meshcore``; ``meshcore.xds`` loads on first use."""
    import subprocess
    import sys

    code = (
        "import sys, meshcore\n"
        "assert 'meshcore.xds' not in sys.modules\n"
        "from meshcore._fast import lb_py, routes_py\n"
        "mods = [(lb_py, routes_py)]\n"
        "if meshcore.IMPLEMENTATION == 'c':\n"
        "    from meshcore._fast import lb_c, routes_c\n"
        "    mods.append((lb_c, routes_c))\n"
        "cluster = {'name': 'c', 'type': 'STATIC', 'lb_policy': 'ROUND_ROBIN', 'load_assignment': {\n"
        "    'cluster_name': 'c', 'endpoints': [{'lb_endpoints': [{'endpoint': {'address': {\n"
        "    'socket_address': {'address': '10.0.0.1', 'port_value': 80}}}}]}]}}\n"
        "rc = {'name': 'r', 'virtual_hosts': [{'name': 'v', 'domains': ['*'], 'routes': [\n"
        "    {'match': {'prefix': '/'}, 'route': {'cluster': 'c'}}]}]}\n"
        "for lb, rt in mods:\n"
        "    assert lb.LoadBalancer.from_xds(cluster, seed=1).pick().key == '10.0.0.1:80'\n"
        "    assert rt.RouteTable.from_xds(rc).match('h', '/x').cluster == 'c'\n"
        "assert meshcore.LoadBalancer.from_xds(cluster).pick().key == '10.0.0.1:80'\n"
        "assert 'meshcore.xds' in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok"]


# -- the request path (call_c / call_py) and what the layers above register with it --------------


def _fresh(code: str) -> str:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_the_request_path_gets_every_entry_before_a_mesh_exists():
    """Twins imported before the layers above hold placeholders that raise a clear error; importing
    ``meshcore.mesh`` registers every entry, in both twins, as the upper modules' own objects."""
    code = (
        "import meshcore\n"
        "from meshcore._fast import _hooks, call_py\n"
        "mods = [call_py]\n"
        "if meshcore.IMPLEMENTATION == 'c':\n"
        "    from meshcore._fast import call_c\n"
        "    mods.append(call_c)\n"
        "assert sorted(_hooks.missing()) == sorted(_hooks.NAMES)\n"
        "for mod in mods:\n"
        "    assert set(mod._installed()) == set(_hooks.NAMES)\n"
        "    try:\n"
        "        mod._installed()['run'](None, None, None, None, None)\n"
        "    except RuntimeError as e:\n"
        "        assert 'run is not registered yet: import meshcore.lifecycle' in str(e), e\n"
        "    else:\n"
        "        raise AssertionError('placeholder did not raise')\n"
        "import meshcore.mesh\n"
        "from meshcore import lifecycle\n"
        "from meshcore.resilience import fault, retry, router_headers\n"
        "from meshcore.telemetry import outcome\n"
        "from meshcore.xds import snapshot\n"
        "assert _hooks.missing() == []\n"
        "want = {n: getattr(lifecycle, n) for n in ('run', 'run_async', 'run_reported', 'run_async_reported',\n"
        "        'report_single', 'begin_single', 'fault_filter_for', 'fault_decision', 'fault_step')}\n"
        "want.update(final_answer=lifecycle._final_answer, NO_FAULT=fault.NO_FAULT,\n"
        "            FaultDecision=fault.FaultDecision, RetryState=retry.RetryState,\n"
        "            router_headers_of=router_headers.router_headers_of,\n"
        "            is_internal_request=router_headers.is_internal_request,\n"
        "            apply_router_headers=router_headers.apply_router_headers,\n"
        "            report_refusal=outcome.report_refusal, AggregateBalancer=snapshot.AggregateBalancer)\n"
        "assert set(want) == set(_hooks.NAMES)\n"
        "for mod in mods:\n"
        "    got = mod._installed()\n"
        "    assert all(got[n] is want[n] for n in want), [n for n in want if got[n] is not want[n]]\n"
        "print('ok')\n"
    )
    assert _fresh(code).split() == ["ok"]


def test_a_twin_imported_after_registration_gets_the_entries_too():
    code = (
        "import meshcore.mesh, meshcore.lifecycle as l\n"
        "from meshcore._fast import call_py\n"
        "assert call_py._installed()['run'] is l.run\n"
        "print('ok')\n"
    )
    assert _fresh(code).split() == ["ok"]


def test_register_rejects_unknown_entries():
    from meshcore._fast import _hooks

    with pytest.raises(ValueError, match="unknown request-path entries"):
        _hooks.register(not_an_entry=object())


def test_moved_names_are_the_same_objects_under_their_old_names():
    """Constants and leaf helpers of the request path live in ``_fast``; the layers above re-export them."""
    from meshcore import call, lifecycle, stats
    from meshcore._fast import _consts, _outcome, call_py
    from meshcore.resilience import retry, router_headers
    from meshcore.telemetry import outcome, record

    assert stats.BUCKETS_MS is _consts.BUCKETS_MS is call_py.BUCKETS_MS
    assert stats.COUNTER_NAMES is _consts.COUNTER_NAMES is call_py.COUNTER_NAMES
    assert (retry.CONNECT_FAILURE, retry.RESET, retry.TIMEOUT) == ("connect-failure", "reset", "timeout")
    assert router_headers.ROUTER_HEADERS is _consts.ROUTER_HEADERS
    assert record.ACTIVE is _consts.ACTIVE
    for name in ("_length", "_scan_request", "_scan_response", "_is_grpc"):
        assert getattr(outcome, name) is getattr(_outcome, name)
    assert lifecycle.default_classify is call.default_classify is _outcome.default_classify
    assert lifecycle.default_status_of is call.default_status_of is _outcome.default_status_of
    assert call.Call.run.__kwdefaults__ == {"status_of": lifecycle.default_status_of, "grpc_status_of": None,
                                            "classify": lifecycle.default_classify}
