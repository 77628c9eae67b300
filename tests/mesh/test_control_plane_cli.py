"""``meshcore control-plane`` as a real subprocess: it refuses addresses without a host, and logs
(INFO, stderr) clients connecting and disconnecting, ACKs, NACKs and pushes while a meshcore Mesh
and a raw delta stream talk to it."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

import meshcore
from meshcore.xds.model import CLUSTER

from .shapes import TARGET, assignment, bootstrap, cluster, mesh_resources, route


def _write(path: Path, port: int) -> None:
    data = mesh_resources(TARGET, [route("default", "a")], [cluster("a")], [assignment("a", [port])])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
    st = path.stat()  # a distinct stamp even on coarse-mtime filesystems
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + port * 1_000_000))


@pytest.mark.parametrize("flag, value, hint", [
    ("--http-address", "18011", "127.0.0.1:18011"),
    ("--http-address", ":18011", "127.0.0.1:18011"),
    ("--address", "18000", "127.0.0.1:18000"),
    ("--address", "localhost", "host:port"),
])
def test_address_without_host_is_refused(flag, value, hint):
    proc = subprocess.run([sys.executable, "-m", "meshcore", "control-plane", flag, value],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert hint in proc.stderr and flag in proc.stderr


def test_library_refuses_an_empty_host():
    from meshcore.controlplane import ControlPlane

    with pytest.raises(ValueError, match="127.0.0.1:18000"):
        ControlPlane(address=":18000")


def _delta_nack(address: str, node_id: str, error: str) -> None:
    """A raw delta stream: subscribe to every cluster, NACK the response with ``error``."""
    requests: "queue.Queue" = queue.Queue()
    with grpc.insecure_channel(address) as channel:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).DeltaAggregatedResources(
            iter(requests.get, None))
        requests.put(discovery_pb2.DeltaDiscoveryRequest(node=base_pb2.Node(id=node_id), type_url=CLUSTER))
        response = next(call)
        requests.put(discovery_pb2.DeltaDiscoveryRequest(
            type_url=CLUSTER, response_nonce=response.nonce, error_detail=status_pb2.Status(code=3, message=error)))
        time.sleep(0.3)
        requests.put(None)
        call.cancel()


def test_cli_logs_connections_acks_nacks_and_pushes(tmp_path: Path) -> None:
    f = tmp_path / "resources.json"
    _write(f, 9001)
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshcore", "control-plane", "--address", "127.0.0.1:0", "--resources", str(f)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        m = re.search(r"xds=(127\.0\.0\.1:\d+)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        address = m.group(1)
        mesh = meshcore.Mesh(bootstrap(None, uri=address))
        try:
            mesh.wait_ready(TARGET, timeout=10)
            assert mesh.pick(TARGET, "/").endpoint.port == 9001
            _write(f, 9002)  # reloaded by the watcher and pushed
            deadline = time.monotonic() + 10
            while mesh.pick(TARGET, "/").endpoint.port != 9002:
                assert time.monotonic() < deadline, "the EDS change was not pushed"
                time.sleep(0.02)
            time.sleep(0.5)  # the ACK follows the update it acknowledges: let it reach the server first
        finally:
            mesh.close()
        _delta_nack(address, "nacking-node", "cluster a: not for me")
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # connections and disconnections, with node id and stream type
    assert re.search(r"INFO .*client connected: node 'meshcore-test', SotW ADS stream \d+", err), err
    assert re.search(r"INFO .*client disconnected: node 'meshcore-test', SotW ADS stream \d+", err), err
    assert re.search(r"INFO .*client connected: node 'nacking-node', delta ADS stream \d+", err), err
    assert re.search(r"INFO .*client disconnected: node 'nacking-node', delta", err), err
    # pushes: type, version, resource count; the reload's EDS push among them
    pushes = re.findall(r"INFO .*push (LDS|RDS|CDS|EDS) version (\d+) nonce \S+ to node '([^']*)' "
                        r"\(stream \d+\): (\d+) resources", err)
    assert {p[0] for p in pushes if p[2] == "meshcore-test"} == {"LDS", "RDS", "CDS", "EDS"}, err
    eds_versions = [int(p[1]) for p in pushes if p[0] == "EDS" and p[2] == "meshcore-test"]
    assert len(eds_versions) >= 2 and eds_versions[-1] > eds_versions[0], err
    assert all(p[3] == "1" for p in pushes if p[2] == "meshcore-test"), err
    # every SotW push ACKed with its version and nonce
    for kind, version in {(p[0], p[1]) for p in pushes if p[2] == "meshcore-test"}:
        assert re.search(rf"INFO .*ACK {kind} version {version} nonce \S+ from node 'meshcore-test'", err), \
            (kind, version, err)
    # the NACK with its error
    assert re.search(r"INFO .*NACK CDS version \d+ nonce \S+ from node 'nacking-node' \(stream \d+\): "
                     r"cluster a: not for me", err), err
