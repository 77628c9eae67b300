"""The README's Python examples and the files in ``examples/`` work as written.

How the README is run:

* Every fenced code block whose language is ``python`` (or ``py``) is a complete program: each one
  runs on its own (its own namespace, in order of appearance) as a fresh ``python`` process, the
  block's text unmodified. A block that raises, or exits non-zero, fails its test; the failure
  shows the block's output with tracebacks pointing at README lines (the script is padded so its
  line numbers are the README's).
* The blocks run in a temporary directory holding ``examples/`` as the README describes it: the
  upstreams of ``examples/upstreams.py`` are started by the test on free loopback ports, and
  ``examples/mesh.yaml`` there is the real file with only its endpoint ports changed to those. A
  reference control plane (``meshcore.controlplane``) serves that file, and
  ``GRPC_XDS_BOOTSTRAP`` points at ``examples/bootstrap.json`` with only its server address
  changed to that control plane's. So ``Mesh.from_file("examples/mesh.yaml")`` and ``Mesh()``
  both work in a block, as they do for a user running the README from the repository root.
* A block that cannot run here is marked in the README by the HTML comment
  ``<!-- readme-test: skip (why) -->`` on the line before its fence; the marker needs a reason.

The ``examples/`` files are also checked directly: ``mesh.yaml`` loads with ``Mesh.from_file``
without a warning and routes as its comments say (the weighted split and the header route), the
inspection CLI reads it, ``bootstrap.json`` loads with ``Bootstrap.load``.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import warnings
from collections import Counter
from contextlib import redirect_stdout
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, Iterator, List, NamedTuple, Optional

import pytest

import meshcore
from meshcore.controlplane import ControlPlane
from meshcore.xds.bootstrap import Bootstrap

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EXAMPLES = ROOT / "examples"
REVIEWS = "reviews.default.svc.cluster.local:9080"
ECHO = "echo.default.svc.cluster.local:8080"
BLOCK_TIMEOUT = 60.0

_FENCE = re.compile(r"^```(\w*)\s*$")
_SKIP = re.compile(r"^<!--\s*readme-test:\s*skip\s*\((?P<why>[^)]+)\)\s*-->\s*$")


class Block(NamedTuple):
    line: int  # README line of the block's first code line (1-based)
    code: str
    skip: Optional[str]  # the reason given by a skip marker


def python_blocks(text: str) -> List[Block]:
    """The ``python`` fenced blocks of a Markdown text, with their skip markers."""
    lines = text.splitlines()
    blocks: List[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        lang, start = m.group(1).lower(), i + 1
        end = start
        while end < len(lines) and lines[end].rstrip() != "```":
            end += 1
        if end == len(lines):
            raise AssertionError(f"README.md:{i + 1}: code fence never closed")
        if lang in ("python", "py"):
            before = i - 1
            while before >= 0 and not lines[before].strip():
                before -= 1
            marker = _SKIP.match(lines[before]) if before >= 0 else None
            blocks.append(Block(start + 1, "\n".join(lines[start:end]) + "\n", marker.group("why") if marker else None))
        i = end + 1
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def _load_upstreams() -> ModuleType:
    spec = importlib.util.spec_from_file_location("meshcore_example_upstreams", EXAMPLES / "upstreams.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


upstreams = _load_upstreams()


# -- the environment the README promises: examples/ in the working directory, upstreams running ------


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, Any]]:
    """A directory with ``examples/`` whose endpoints are served on loopback, a control plane
    serving ``examples/mesh.yaml``, and the environment pointing at its bootstrap."""
    root = tmp_path_factory.mktemp("readme")
    (root / "examples").mkdir()
    found = upstreams.endpoints(str(EXAMPLES / "mesh.yaml"))
    assert len({port for _, _, port, _ in found}) == len(found), "example endpoint ports must be distinct"
    stops: List[Any] = []
    ports: Dict[int, int] = {}
    served: Dict[str, List[int]] = {}
    plane: Optional[ControlPlane] = None
    try:
        for cluster, address, port, grpc in found:
            if grpc:
                server, bound = upstreams.serve_grpc(cluster, address, 0)
                stops.append(lambda s=server: s.stop(0))
            else:
                server = upstreams.serve_http(cluster, address, 0)
                bound = server.server_address[1]
                stops.append(lambda s=server: (s.shutdown(), s.server_close()))
            ports[port] = bound
            served.setdefault(cluster, []).append(bound)
        text = (EXAMPLES / "mesh.yaml").read_text(encoding="utf-8")
        for old, new in ports.items():
            text, n = re.subn(rf"\bport_value: {old}\b", f"port_value: {new}", text)
            assert n == 1, f"port {old} must appear once in examples/mesh.yaml"
        mesh_yaml = root / "examples" / "mesh.yaml"
        mesh_yaml.write_text(text, encoding="utf-8")
        plane = ControlPlane.from_file(mesh_yaml, watch=False).start()
        bootstrap = json.loads((EXAMPLES / "bootstrap.json").read_text(encoding="utf-8"))
        for server in bootstrap["xds_servers"]:
            server["server_uri"] = plane.address
        (root / "examples" / "bootstrap.json").write_text(json.dumps(bootstrap), encoding="utf-8")
        env = dict(os.environ)
        env.pop("GRPC_XDS_BOOTSTRAP_CONFIG", None)
        env["GRPC_XDS_BOOTSTRAP"] = str(root / "examples" / "bootstrap.json")
        yield {"root": root, "env": env, "served": served, "plane": plane}
    finally:
        if plane is not None:
            plane.stop()
        for stop in stops:
            stop()


# -- the README ------------------------------------------------------------------------------------------


def test_readme_has_runnable_blocks() -> None:
    # the extraction works (a README without python blocks would make the test below vacuous),
    # and skipping stays the exception
    assert len(BLOCKS) >= 4
    assert sum(1 for b in BLOCKS if b.skip) <= 1
    assert any("examples/mesh.yaml" in b.code for b in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{b.line}" for b in BLOCKS])
def test_readme_block_runs(block: Block, example_dir: Dict[str, Any]) -> None:
    if block.skip:
        pytest.skip(f"marked in the README: {block.skip}")
    root: Path = example_dir["root"]
    script = root / f"README_md_line_{block.line}.py"
    script.write_text("\n" * (block.line - 1) + block.code, encoding="utf-8")
    try:
        done = subprocess.run([sys.executable, str(script)], cwd=root, env=example_dir["env"],
                              capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"README.md:{block.line}: still running after {BLOCK_TIMEOUT:.0f} s\n{exc.stdout}\n{exc.stderr}")
    output = (done.stdout + done.stderr).replace(script.name, "README.md")
    assert done.returncode == 0, f"README.md:{block.line} failed (exit {done.returncode}):\n{output}"
    if 'Mesh.from_file("examples/mesh.yaml").start()' in block.code:
        # the quick start's requests really went to the example upstreams: its output names the
        # servers that answered (the four split requests: either version, whichever the weighted
        # pick chose; the plain API's header-routed one: reviews-v2; the gRPC call: echo)
        served = example_dir["served"]
        answers = re.findall(r"(reviews-v[12]) 127\.0\.0\.1:(\d+) GET /reviews/1", done.stdout)
        assert answers, output
        assert all(int(port) in served[cluster] for cluster, port in answers), (answers, served)
        assert f"reviews-v2 200 b'reviews-v2 127.0.0.1:{served['reviews-v2'][0]} GET /reviews/1'" in done.stdout, output
        assert f"echo 127.0.0.1:{served['echo'][0]} /example.Echo/Hello" in done.stdout, output


def test_block_extraction_and_skip_markers() -> None:
    text = "\n".join([
        "# t", "```python", "a = 1", "```", "", "<!-- readme-test: skip (needs istiod) -->", "",
        "```py", "b = 2", "```", "```sh", "echo no", "```", "```python", "c = 3", "", "```"])
    assert python_blocks(text) == [Block(3, "a = 1\n", None), Block(9, "b = 2\n", "needs istiod"),
                                   Block(15, "c = 3\n\n", None)]
    with pytest.raises(AssertionError, match="never closed"):
        python_blocks("```python\nx = 1\n")


# -- examples/ ----------------------------------------------------------------------------------------


def test_example_mesh_loads_without_warnings_and_routes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mesh = meshcore.Mesh.from_file(EXAMPLES / "mesh.yaml", watch=False, seed=7)
        with mesh:
            mesh.wait_ready(REVIEWS, timeout=5)
            mesh.wait_ready(ECHO, timeout=5)
            canary = mesh.pick(REVIEWS, "/reviews/1", headers={"x-canary": "1"})
            assert (canary.route_name, canary.cluster, canary.endpoint.port) == ("canary-header", "reviews-v2", 9083)
            assert canary.timeout == 2.0
            canary.done()
            clusters: Counter = Counter()
            ports: Counter = Counter()
            for _ in range(2000):
                p = mesh.pick(REVIEWS, "/reviews/1", headers={"x-canary": "0"})
                assert p.route_name == "canary-split" and p.timeout == 2.0
                clusters[p.cluster] += 1
                ports[p.endpoint.port] += 1
                p.done()
            policy = p.retry_policy
            assert (policy.retry_on, policy.num_retries, policy.per_try_timeout) == (
                ("5xx", "connect-failure", "reset"), 2, 1.0)
            # 90/10 split: 200 expected for v2, binomial sd ~13
            assert 140 <= clusters["reviews-v2"] <= 260, clusters
            assert set(ports) == {9081, 9082, 9083}
            echo = mesh.pick(ECHO, "/example.Echo/Hello", method="POST")
            assert (echo.cluster, echo.endpoint.port) == ("echo", 9090)
            echo.done()
            assert mesh.config(ECHO).clusters["echo"].spec.http2
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not problems, [r.getMessage() for r in problems]


def test_example_upstreams_cover_mesh_yaml() -> None:
    found = {(c, a, p, g) for c, a, p, g in upstreams.endpoints(str(EXAMPLES / "mesh.yaml"))}
    assert found == {("reviews-v1", "127.0.0.1", 9081, False), ("reviews-v1", "127.0.0.1", 9082, False),
                     ("reviews-v2", "127.0.0.1", 9083, False), ("echo", "127.0.0.1", 9090, True)}


def test_example_bootstrap_loads() -> None:
    b = Bootstrap.load(EXAMPLES / "bootstrap.json")
    server = b.xds_servers[0]
    assert server.server_uri == "127.0.0.1:18000"  # meshcore control-plane's default --address
    assert [c.type for c in server.channel_creds] == ["insecure"]
    assert server.server_features == ("xds_v3",)
    assert b.node.id and b.node.metadata  # the control plane sees who is asking
    from meshcore.controlplane.cli import add_arguments
    import argparse

    assert add_arguments(argparse.ArgumentParser()).parse_args([]).address == server.server_uri


def examples_commands(text: str) -> List[List[str]]:
    """The commands of the ``sh`` blocks in the README's "The examples" section, split as a
    shell would (comments dropped)."""
    section = text.split("\n## The examples\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"^```sh\n(.*?)^```", section, re.S | re.M):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def test_examples_section_commands_run(example_dir: Dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # The background servers (`... &`) are the ones the fixture runs; every other command runs
    # in the example directory: `meshcore ...` in process, `python ...` as a process.
    from meshcore.cli import main

    commands = examples_commands(README.read_text(encoding="utf-8"))
    assert len(commands) >= 5
    monkeypatch.chdir(example_dir["root"])
    for key, value in example_dir["env"].items():
        monkeypatch.setenv(key, value)
    background = [c[:-1] for c in commands if c[-1] == "&"]
    assert background == [["python", "examples/upstreams.py"],
                          ["meshcore", "control-plane", "--resources", "examples/mesh.yaml"]]
    ran = 0
    for words in commands:
        if words[-1] == "&":
            continue
        if words[0] == "meshcore":
            out = io.StringIO()
            with redirect_stdout(out):
                code = main(words[1:])
            assert code == 0, (words, out.getvalue())
            assert "reviews" in out.getvalue(), (words, out.getvalue())
        else:
            assert words[0] == "python", words
            done = subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True,
                                  timeout=BLOCK_TIMEOUT)
            assert done.returncode == 0, (words, done.stderr)
            assert "reviews-v" in done.stdout, (words, done.stdout)
        ran += 1
    assert ran >= 4


def _cli(*argv: str) -> str:
    from meshcore.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        code = main(list(argv))
    assert code == 0, (argv, out.getvalue())
    return out.getvalue()


def test_cli_reads_example_mesh() -> None:
    path = str(EXAMPLES / "mesh.yaml")
    status = _cli("status", "--file", path, "--json")
    assert REVIEWS in status and ECHO in status
    decision = json.loads(_cli("route", "GET", f"http://{REVIEWS}/reviews/1", "-H", "x-canary: 1",
                               "--file", path, "--json"))
    text = json.dumps(decision)
    assert "canary-header" in text and "reviews-v2" in text
    clusters = _cli("clusters", "--file", path, "--target", REVIEWS)
    assert "9081" in clusters and "9083" in clusters
