"""Child process for ``test_bench_xds.test_full_snapshot_apply``: its own peak memory is the client's.

Usage: python xds_snapshot_probe.py ADDRESS TARGET N_CLUSTERS. Prints one JSON line: seconds to
ready, peak RSS growth (MB) while applying, and the client-side work of one EDS change (decode,
validate, cache, publish; no network) as p50/p99 ms over 50 changes. ``MESHCORE_NO_EXTENSIONS=1``
in the environment selects the pure twins.
"""

from __future__ import annotations

import json
import sys
import time


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    address, target, n_clusters = sys.argv[1], sys.argv[2], int(sys.argv[3])
    import meshcore
    from envoy.config.endpoint.v3 import endpoint_pb2
    from envoy.service.discovery.v3 import discovery_pb2
    from google.protobuf import any_pb2

    from meshcore.xds.model import ENDPOINT

    mesh = meshcore.Mesh({"xds_servers": [{"server_uri": address, "channel_creds": [{"type": "insecure"}]}],
                          "node": {"id": "bench-probe"}})
    base = _hwm_mb()
    t0 = time.perf_counter()
    mesh.start()
    mesh.wait_ready(target, timeout=300)
    seconds = time.perf_counter() - t0
    peak = _hwm_mb() - base
    assert len(mesh.config(target).clusters) == n_clusters
    client = mesh._source
    cla = endpoint_pb2.ClusterLoadAssignment()
    client.entry(ENDPOINT, "svc-7").resource.Unpack(cla)
    times = []
    for k in range(50):
        cla.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value = 9000 + k
        packed = any_pb2.Any()
        packed.Pack(cla)
        resp = discovery_pb2.DiscoveryResponse(version_info=f"probe-{k}", type_url=ENDPOINT, nonce=f"p{k}",
                                               resources=[packed])
        t = time.perf_counter()
        client._on_response(client._stream, resp)
        times.append(time.perf_counter() - t)
    assert any(e.port == 9049 for e in mesh.config(target).clusters["svc-7"].lb.endpoints)
    times.sort()
    print(json.dumps({"impl": meshcore.IMPLEMENTATION, "seconds": seconds, "peak_rss_mb": peak,
                      "eds_change_p50_ms": times[len(times) // 2] * 1e3,
                      "eds_change_p99_ms": times[int(0.99 * (len(times) - 1))] * 1e3}))
    mesh.close()


if __name__ == "__main__":
    main()
