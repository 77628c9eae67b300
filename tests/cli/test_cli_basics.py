"""The small things a user hits: ``--json`` on every command, why a resource was rejected, one-line
errors without doubled prefixes, and no gRPC core log lines on stderr."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from typing import Dict, List, Tuple

import pytest

from meshcore.cli import main

from .conftest import TARGET, _eds_cluster, resources

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
GRPC_CORE_LINE = re.compile(r"^[EWIDF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]|absl::InitializeLog", re.M)
DOUBLED = re.compile(r"(?:^|\s)(\S+): \1:")  # "x.yaml: x.yaml:", "meshcore: meshcore:"


def run(capsys, *args: str) -> Tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def cli(*args: str, env: Dict[str, str] = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """The real ``meshcore`` process, with no gRPC logging settings of the test run's own."""
    base = {k: v for k, v in os.environ.items() if k not in ("GRPC_VERBOSITY", "GRPC_TRACE")}
    return subprocess.run([sys.executable, "-m", "meshcore", *args], capture_output=True, text=True,
                          timeout=timeout, env={**base, **(env or {})})


def write(tmp_path, name: str, data) -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def one_error_line(err: str, prog: str) -> str:
    """``err`` is exactly one line, ``prog: ...``, with no traceback and no doubled prefix."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: ") and "Traceback" not in err
    assert not DOUBLED.search(lines[0]), lines[0]
    return lines[0]


@pytest.fixture(params=["bootstrap", "file"])
def source(request) -> List[str]:
    if request.param == "bootstrap":
        return ["--bootstrap", request.getfixturevalue("bootstrap_file"), "--target", TARGET]
    return ["--file", request.getfixturevalue("resource_file")]


# -- --json everywhere ----------------------------------------------------------------------------------


def test_every_inspect_command_takes_json(capsys, source):
    code, out, _ = run(capsys, "status", *source, "--json")
    assert code == 0
    status = json.loads(out)
    assert status["targets"][0]["target"] == TARGET and status["targets"][0]["ready"] is True
    assert {(r["type"], r["name"], r["status"]) for r in status["resources"]} == {
        ("LDS", TARGET, "ACKED"), ("RDS", "9080", "ACKED"), ("CDS", "reviews-v1", "ACKED"),
        ("CDS", "reviews-v2", "ACKED"), ("EDS", "reviews-v1", "ACKED"), ("EDS", "reviews-v2", "ACKED")}

    code, out, _ = run(capsys, "config-dump", *source, "--json")
    assert code == 0
    dump = json.loads(out)
    assert sorted(c["name"] for c in dump["generic_xds_configs"]) == sorted(
        [TARGET, "9080", "reviews-v1", "reviews-v2", "reviews-v1", "reviews-v2"])

    code, out, _ = run(capsys, "clusters", *source, "--json")
    assert code == 0
    assert [c["name"] for c in json.loads(out)["clusters"]] == ["reviews-v1", "reviews-v2"]

    code, out, _ = run(capsys, "route", "GET", f"http://{TARGET}/healthz", *source, "--json")
    assert code == 0
    assert json.loads(out)["action"] == {"kind": "direct_response", "status": 200, "body": "ok"}


def test_config_dump_json_is_the_same_dump(capsys, resource_file):
    _, plain, _ = run(capsys, "config-dump", "--file", resource_file, "--no-resources")
    _, with_flag, _ = run(capsys, "config-dump", "--file", resource_file, "--no-resources", "--json")
    strip = [{k: v for k, v in c.items() if k != "last_updated"}
             for c in json.loads(plain)["generic_xds_configs"]]
    assert strip == [{k: v for k, v in c.items() if k != "last_updated"}
                     for c in json.loads(with_flag)["generic_xds_configs"]]


def test_demo_tour_refuses_json_instead_of_ignoring_it(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--tour", "--json"])
    assert exc.value.code == 2
    assert "--json does not apply to demo --tour" in capsys.readouterr().err


# -- why a resource was rejected ---------------------------------------------------------------------------


def _table(out: str) -> Dict[Tuple[str, str], List[str]]:
    """The status resource table: ``{(type, name): [version-or-status..., error words]}``."""
    rows = {}
    for line in out.splitlines():
        words = line.split()
        if words[:1] and words[0] in ("LDS", "RDS", "CDS", "EDS"):
            rows[(words[0], words[1])] = line
    return rows


def test_status_of_a_file_names_the_rejected_cluster_and_why(capsys, tmp_path):
    res = resources()
    res["clusters"][1]["connect_timeout"] = "-1s"
    path = write(tmp_path, "mesh.json", res)
    code, out, _ = run(capsys, "status", "--file", path, "--timeout", "0.5")
    assert code == 1
    row = _table(out)[("CDS", "reviews-v2")]
    assert row.split()[2] == "NACKED"
    assert row.endswith("field connect_timeout: Invalid duration: Expected positive duration"), row
    assert "reviews-v2: field" not in row  # the NAME column names it already
    assert _table(out)[("CDS", "reviews-v1")].split()[3] == "ACKED"
    assert "1 resource rejected (NACKED)" in out
    code, out, _ = run(capsys, "status", "--file", path, "--timeout", "0.5", "--json")
    bad = next(r for r in json.loads(out)["resources"] if r["name"] == "reviews-v2" and r["type"] == "CDS")
    assert bad["status"] == "NACKED" and "Expected positive duration" in bad["error"]


def test_status_shows_a_control_plane_nack_with_its_reason(capsys, plane, bootstrap_file):
    plane.update([{"@type": CLUSTER, **_eds_cluster("reviews-v2", connect_timeout="-1s")}])
    code, out, _ = run(capsys, "status", "--bootstrap", bootstrap_file, "--target", TARGET)
    assert code == 1
    row = _table(out)[("CDS", "reviews-v2")]
    assert "NACKED" in row.split() and row.endswith("Expected positive duration"), row


def test_status_says_why_a_resource_does_not_exist(capsys, resource_file):
    code, out, _ = run(capsys, "status", "--file", resource_file, "--target", "nope:1", "--timeout", "0.5")
    assert code == 1
    row = _table(out)[("LDS", "nope:1")]
    assert row.split()[2] == "DOES_NOT_EXIST" and row.endswith("not in the resource file")
    target_row = next(line for line in out.splitlines() if line.startswith("nope:1 "))
    assert "NOT READY" in target_row and "does not exist" in target_row
    assert "nope:1: " not in target_row  # the TARGET column names it already


def test_unknown_lb_policy_in_a_file_is_no_traceback(tmp_path):
    """A cluster whose ``lb_policy`` is no enum value: a non-zero exit that names it, never a traceback."""
    res = resources()
    res["clusters"][1]["lb_policy"] = 77
    proc = cli("status", "--file", write(tmp_path, "mesh.json", res), "--timeout", "0.5")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "77" in proc.stdout + proc.stderr


# -- error texts ---------------------------------------------------------------------------------------------


def test_missing_resource_file(capsys, tmp_path):
    path = str(tmp_path / "absent.yaml")
    code, out, err = run(capsys, "status", "--file", path)
    assert code == 2 and out == ""
    assert one_error_line(err, "meshcore status") == f"meshcore status: {path}: cannot read: No such file or directory"


def test_bad_yaml_names_the_file_and_the_line_once(capsys, tmp_path):
    path = write(tmp_path, "mesh.yaml", "clusters:\n  - name: x\n   type: EDS\n")
    code, out, err = run(capsys, "clusters", "--file", path)
    assert code == 2 and out == ""
    line = one_error_line(err, "meshcore clusters")
    assert line.startswith(f"meshcore clusters: bad resource file {path}: invalid YAML/JSON: ")
    assert line.count(path) == 1 and "line 3, column 4" in line and "field (document)" not in line


def test_bad_resource_in_a_file(capsys, tmp_path):
    path = write(tmp_path, "mesh.json", {"clusters": [{"name": "c", "type": "EDS", "bogus_field": 1}]})
    code, _, err = run(capsys, "status", "--file", path)
    assert code == 2
    line = one_error_line(err, "meshcore status")
    assert line.count(path) == 1 and "bogus_field" in line


@pytest.mark.parametrize("content,expected", [
    ("{not json", "not valid JSON"),
    ("[]", "expected an object"),
    (json.dumps({"xds_servers": [{"server_uri": ""}], "node": {"id": "x"}}),
     "field xds_servers[0].server_uri: must not be empty"),
])
def test_bad_bootstrap(capsys, tmp_path, content, expected):
    path = write(tmp_path, "bootstrap.json", content)
    code, out, err = run(capsys, "status", "--bootstrap", path, "--target", TARGET)
    assert code == 2 and out == ""
    line = one_error_line(err, "meshcore status")
    assert line.startswith(f"meshcore status: bad xDS bootstrap: {path}: ") and expected in line
    assert "field (root)" not in line


def test_unknown_target(capsys, resource_file):
    code, out, err = run(capsys, "route", "GET", "http://nope:9080/", "--file", resource_file, "--timeout", "0.5")
    assert code == 1 and err == ""
    assert "nope:9080" in out and "does not exist" in out


def test_internal_errors_are_one_line(capsys, monkeypatch, resource_file):
    import meshcore.admin

    def broken(mesh, targets):
        raise KeyError("boom")

    monkeypatch.setattr(meshcore.admin, "clusters", broken)  # stands in for a bug anywhere in a command
    code, out, err = run(capsys, "clusters", "--file", resource_file)
    assert code == 1
    assert one_error_line(err, "meshcore clusters") == (
        "meshcore clusters: internal error: KeyError: 'boom' (-vv shows the traceback)")


# -- gRPC core's own log lines --------------------------------------------------------------------------------


@pytest.fixture
def dead_bootstrap(tmp_path) -> str:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return write(tmp_path, "bootstrap.json", {
        "xds_servers": [{"server_uri": f"127.0.0.1:{port}", "channel_creds": [{"type": "insecure"}],
                         "server_features": ["xds_v3"]}], "node": {"id": "dead"}})


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_status_against_a_dead_control_plane_is_quiet(dead_bootstrap):
    proc = cli("status", "--bootstrap", dead_bootstrap, "--target", TARGET, "--timeout", "1.5")
    assert proc.returncode == 1
    assert "NOT READY" in proc.stdout and "Connection refused" in proc.stdout
    assert not GRPC_CORE_LINE.search(proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr


def test_control_plane_on_a_busy_port_says_one_line(busy_port):
    proc = cli("control-plane", "--address", f"127.0.0.1:{busy_port}", timeout=30)
    assert proc.returncode != 0
    assert not GRPC_CORE_LINE.search(proc.stderr), proc.stderr
    one_error_line(proc.stderr, "meshcore control-plane")


@pytest.mark.parametrize("how", ["-v", "-v after the command", "GRPC_VERBOSITY"])
def test_grpc_core_lines_come_back_when_asked(busy_port, how):
    """``-v`` (before or after the command) re-enables gRPC's own logging; a GRPC_VERBOSITY the user
    set wins."""
    args = ["control-plane", "--address", f"127.0.0.1:{busy_port}"]
    if how == "GRPC_VERBOSITY":
        proc = cli(*args, env={"GRPC_VERBOSITY": "ERROR"}, timeout=30)
    else:
        proc = cli("-v", *args, timeout=30) if how == "-v" else cli(*args, "-v", timeout=30)
    assert proc.returncode != 0
    assert GRPC_CORE_LINE.search(proc.stderr), proc.stderr


def test_the_parser_imports_no_grpc():
    """The CLI sets GRPC_VERBOSITY after parsing: that only works while grpc is not yet imported."""
    code = ("import sys; from meshcore.cli import _parser; _parser(); "
            "assert 'grpc' not in sys.modules, sorted(m for m in sys.modules if 'grpc' in m)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
