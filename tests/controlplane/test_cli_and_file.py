"""``ControlPlane.from_file`` (with reload) and ``meshcore control-plane`` run as a real subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from meshcore.controlplane import ControlPlane
from meshcore.errors import ConfigError
from meshcore.xds.model import CLUSTER

from .ads_client import AdsStream, resource_names


def _write(path: Path, names: list, extra: str = "") -> None:
    lines = ["clusters:"] + [f"- {{name: {n}, type: EDS, connect_timeout: 1s}}" for n in names]
    path.write_text("\n".join(lines) + "\n" + extra)
    # make sure the stamp changes even on coarse-mtime filesystems
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000 * len(names) + len(extra)))


def test_from_file_serves_and_reloads(tmp_path: Path) -> None:
    f = tmp_path / "resources.yaml"
    _write(f, ["c1"])
    with ControlPlane.from_file(f, poll_interval=0.02) as cp:
        s = AdsStream(cp.address)
        try:
            s.send(CLUSTER, [])
            r = s.recv()
            assert resource_names(r) == ["c1"]
            s.ack(r, names=[])
            _write(f, ["c1", "c2"])
            r = s.recv()
            assert resource_names(r) == ["c1", "c2"]
            s.ack(r, names=[])
            # a broken edit is skipped (logged); the previous resources stay
            f.write_text("clusters: [{name: c3, connect_timeout: never}]\n")
            time.sleep(0.15)
            assert set(cp.resources(CLUSTER)) == {"c1", "c2"}
            _write(f, ["c3"])
            r = s.recv()
            assert resource_names(r) == ["c3"]
        finally:
            s.close()


def test_from_file_errors_and_no_watch(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {name: x}\n")
    with pytest.raises(ConfigError) as info:
        ControlPlane.from_file(bad)
    assert info.value.resource == str(bad)
    f = tmp_path / "ok.json"
    f.write_text(json.dumps({"clusters": [{"name": "c1"}]}))
    with ControlPlane.from_file(f, watch=False, poll_interval=0.01) as cp:
        f.write_text(json.dumps({"clusters": [{"name": "c2"}]}))
        os.utime(f, ns=(0, 10**18))
        time.sleep(0.1)
        assert list(cp.resources(CLUSTER)) == ["c1"]


def test_cli_subprocess(tmp_path: Path) -> None:
    f = tmp_path / "resources.yaml"
    _write(f, ["from-file"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshcore", "control-plane", "--address", "127.0.0.1:0",
         "--http-address", "127.0.0.1:0", "--resources", str(f), "--no-watch"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(r"xds=(127\.0\.0\.1:\d+) http=127\.0\.0\.1:(\d+)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        with urllib.request.urlopen(f"http://127.0.0.1:{m.group(2)}/v1/resources", timeout=5) as resp:
            assert list(json.loads(resp.read())[CLUSTER]) == ["from-file"]
        s = AdsStream(m.group(1))
        try:
            s.send(CLUSTER, [])
            assert resource_names(s.recv()) == ["from-file"]
        finally:
            s.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_reports_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("clusters: [{name: x, connect_timeout: never}]\n")
    proc = subprocess.run([sys.executable, "-m", "meshcore", "control-plane", "--address", "127.0.0.1:0",
                           "--resources", str(bad)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and str(bad) in proc.stderr and "clusters[0]" in proc.stderr
