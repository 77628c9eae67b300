"""Packaging and the public surface: switch, exports, CLI."""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

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


# -- the distribution: meshcore-xds (PyPI's "meshcore" is an unrelated project) ----------------------

ROOT = Path(__file__).resolve().parent.parent
DIST = "meshcore-xds"
EXTRAS = {"httpx": "httpx", "httpx2": "httpx2", "requests": "requests", "aiohttp": "aiohttp",
          "prometheus": "prometheus_client", "otel": "opentelemetry-api", "istio-grpc": "hpack"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_distribution_is_meshcore_xds_and_versions_agree():
    dist = metadata.distribution(DIST)
    assert _norm(dist.metadata["Name"]) == DIST
    assert dist.version == meshcore.__version__
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == {"meshcore": "meshcore.cli:main"}


def test_no_distribution_under_the_old_name():
    # an installed "meshcore" is either a stale install of this tree or PyPI's unrelated project
    # (same import name): either way it must not be in the environment the tests run in
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.distribution("meshcore")


def test_extras_declared_with_their_requirements():
    dist = metadata.distribution(DIST)
    provided = set(dist.metadata.get_all("Provides-Extra") or [])
    assert set(EXTRAS) | {"test"} <= provided
    by_extra = {}
    for req in dist.requires or []:
        m = re.search(r"""extra\s*==\s*["']([^"']+)["']""", req)
        if m:
            by_extra.setdefault(m.group(1), set()).add(_norm(re.split(r"[\s<>=!~;\[]", req, 1)[0]))
    for extra, package in EXTRAS.items():
        assert _norm(package) in by_extra.get(extra, set()), (extra, by_extra.get(extra))
        assert _norm(package) in by_extra["test"]  # the test extra exercises every integration


OLD_INSTALL = re.compile(r"""pip3?\s+install\s+(?:-\S+\s+)*["']?meshcore(?![-\w.])""")


@pytest.mark.parametrize("line, old", [
    ("pip install meshcore[httpx]", True), ('pip install "meshcore[aiohttp]"', True),
    ("pip install meshcore", True), ("pip install -U meshcore ", True),
    ('pip install "meshcore-xds[httpx]"', False), ("pip install meshcore-xds", False),
])
def test_old_install_pattern(line, old):
    assert bool(OLD_INSTALL.search(line)) is old


def test_readme_installs_meshcore_xds_and_starts_with_the_dev_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert not [ln for ln in text.splitlines() if OLD_INSTALL.search(ln)]
    assert 'pip install "meshcore-xds[httpx]"' in text
    assert re.search(r"PyPI project named `meshcore` is a different, unrelated project", text)
    block = re.search(r"```sh\n(.*?)```", text, re.S).group(1)
    assert [ln.split("#")[0].strip() for ln in block.strip().splitlines()][:2] == ["./dev demo", "./dev test"]


def test_cli_version_is_the_distribution_version():
    want = f"meshcore {metadata.version(DIST)} ({meshcore.IMPLEMENTATION})"
    out = subprocess.run([sys.executable, "-m", "meshcore", "--version"], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == want
    script = Path(sysconfig.get_path("scripts")) / ("meshcore.exe" if os.name == "nt" else "meshcore")
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == want


def _load_ci(name: str):
    spec = importlib.util.spec_from_file_location(f"_ci_{name}", ROOT / ".ci" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _copy_tree(dst: Path) -> None:
    """The project's own files, as a clean clone (or the unpacked sdist) has them."""
    skip = shutil.ignore_patterns(".git", ".venv", "build", "dist", "wheelhouse", "__pycache__", "*.egg-info",
                                  ".hypothesis", ".pytest_cache", ".benchmarks", "*.so", "*.pyd", "*.c", "*.html")
    shutil.copytree(ROOT, dst, ignore=skip)


def test_sdist_carries_the_build_inputs_and_no_generated_files(tmp_path):
    src = tmp_path / "src"
    _copy_tree(src)
    # generated files a local build leaves beside the sources: the manifest must keep them out
    for junk in ("lb_c.c", "lb_c.cpython-311-x86_64-linux-gnu.so", "lb_c.html"):
        (src / "src/meshcore/_fast" / junk).write_text("generated")
    env = dict(os.environ, MESHCORE_NO_EXTENSIONS="1")  # the sdist needs no Cython run
    code = "import setuptools.build_meta as b, sys; print(b.build_sdist(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=src, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    sdist = tmp_path / "dist" / out.stdout.strip().splitlines()[-1]
    assert sdist.name == f"meshcore_xds-{meshcore.__version__}.tar.gz"
    check = _load_ci("check_sdist")
    members = check.sdist_members(str(sdist))
    assert check.problems(members, src) == []
    fast = {m.rsplit("/", 1)[1] for m in members if m.startswith("src/meshcore/_fast/")}
    assert {"lb_c.pyx", "lb_c.pxd", "routes_c.pyx", "routes_c.pxd", "call_c.pyx", "_build_c.pyx",
            "_common.pxd", "_debug.h"} <= fast
    assert not {"lb_c.c", "lb_c.cpython-311-x86_64-linux-gnu.so", "lb_c.html"} & fast
    assert "requirements/cython.txt" in members  # [tool.cibuildwheel.environment] PIP_CONSTRAINT


def test_sdist_checker_reports_what_is_wrong(tmp_path):
    check = _load_ci("check_sdist")
    tree = tmp_path / "tree"
    (tree / "src/meshcore/_fast").mkdir(parents=True)
    for f in ("__init__.py", "_fast/__init__.py", "_fast/lb_c.pyx", "_fast/lb_c.pxd", "_fast/_debug.h"):
        (tree / "src/meshcore" / f).write_text("")
    good = set(check.TOP_LEVEL) | {"tests/conftest.py", "src/meshcore/__init__.py", "src/meshcore/_fast/__init__.py",
                                   "src/meshcore/_fast/lb_c.pyx", "src/meshcore/_fast/lb_c.pxd",
                                   "src/meshcore/_fast/_debug.h"}
    assert check.problems(good, tree) == []
    assert check.problems(good - {"src/meshcore/_fast/_debug.h"}, tree) == ["missing: src/meshcore/_fast/_debug.h"]
    assert check.problems(good | {"src/meshcore/_fast/lb_c.c"}, tree) == ["generated file: src/meshcore/_fast/lb_c.c"]


def test_wheel_checker_rejects_stray_libraries_and_wrong_names():
    check = _load_ci("check_wheel")
    assert check.extension_modules(ROOT) == ("lb_c", "_build_c", "routes_c", "call_c")
    ok = {"pure": False, "overall_tag": "manylinux_2_17_x86_64", "external_libs": {}}
    assert check.auditwheel_problems(ok) == []
    assert check.auditwheel_problems(dict(ok, overall_tag="linux_x86_64"))
    assert check.auditwheel_problems(dict(ok, external_libs={"libssl.so.3": {}}))
    assert check.auditwheel_problems(dict(ok, pure=True))
    names = [f"meshcore/_fast/{m}.cpython-311-x86_64-linux-gnu.so" for m in ("lb_c", "routes_c")]
    meta = "Metadata-Version: 2.4\nName: meshcore-xds\nVersion: 0.1.0\n\n"
    assert check.wheel_problems(names, meta, ("lb_c", "routes_c")) == []
    assert check.wheel_problems(names, meta.replace("meshcore-xds", "meshcore"), ("lb_c",)) == [
        "distribution name 'meshcore', expected 'meshcore-xds'"]
    assert check.wheel_problems(names[:1], meta, ("lb_c", "routes_c")) == ["no compiled module for routes_c"]
