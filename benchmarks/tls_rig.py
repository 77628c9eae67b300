"""The rig shared by the per-library mesh-mTLS benchmarks (``test_bench_tls_{httpx,requests,aiohttp}``).

:class:`SidecarTlsRig`: the test PKI (``tests/tls/pki.py``), an upstream Envoy answering
``direct_response`` (the app), in front of it a real Envoy configured as an Istio STRICT sidecar
inbound (``tests/tls/sidecar.py``: mTLS, the HTTP filter chain chosen by Istio's ALPN, RBAC on the
client's SPIFFE ID, XFCC), and a file-fed ``Mesh`` holding the workload certificates of ``client``
whose resources a benchmark builds for the sidecar's port (each library's tests have their own
builders of the same Istio-sidecar cluster shape). Both Envoys are pinned to the other CPU;
``close()`` (or ``with``) stops everything.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence

from integration_harness import PinnedRig  # (puts tests/ on sys.path)

__all__ = ["SidecarTlsRig"]


class SidecarTlsRig(PinnedRig):
    """``resources_of(sidecar_port)``: the mesh's resource file (a dict) routing ``target`` to the
    sidecar; ``allowed_principals``: the sidecar's RBAC (its default when ``None``)."""

    def __init__(self, resources_of: Callable[[int], Dict[str, Any]], target: str, *, pin_cpus: bool = True,
                 allowed_principals: Optional[Sequence[str]] = None, prefix: str = "meshcore-bench-tls-") -> None:
        import meshcore
        from test_bench_sidecar import StaticEnvoy, upstream_bootstrap
        from tls.pki import make_pki
        from tls.sidecar import SidecarInbound

        self._init_pinning(pin_cpus)
        self.tmpdir = tempfile.mkdtemp(prefix=prefix)
        self.upstream: Any = None
        self.sidecar: Any = None
        self.mesh: Any = None
        try:
            self.pki = make_pki(os.path.join(self.tmpdir, "pki"))
            self.upstream = StaticEnvoy("upstream", upstream_bootstrap(1)).start()
            kw = {} if allowed_principals is None else {"allowed_principals": tuple(allowed_principals)}
            self.sidecar = SidecarInbound(self.pki.paths("sidecar"), app_port=self.upstream.ports["u0"], **kw)
            self.sidecar.start()
            path = os.path.join(self.tmpdir, "mesh.json")
            with open(path, "w") as f:
                json.dump(resources_of(self.sidecar.port), f)
            self.mesh = meshcore.Mesh.from_file(path, watch=False, seed=1,
                                                certificates=self.pki.paths("client").dir).start()
            self.mesh.wait_ready(target, timeout=15)
            self.mesh_url = f"http://{target}"
            self.direct_url = f"https://127.0.0.1:{self.sidecar.port}"
            self.pin_all()
        except BaseException:
            self.close()
            raise

    def _helpers(self) -> List[Any]:
        return [self.upstream, self.sidecar._envoy if self.sidecar is not None else None]

    def pids(self) -> Dict[str, int]:
        return {"proxy": self.sidecar._envoy.pid, "upstream": self.upstream.pid}

    def close(self) -> None:
        if self.mesh is not None:
            self.mesh.close()
            self.mesh = None
        for envoy in (self.sidecar, self.upstream):
            if envoy is not None:
                envoy.close()
        self.sidecar = self.upstream = None
        if self.saved_affinity is not None:
            from test_bench_sidecar import pin

            pin(os.getpid(), self.saved_affinity)
            self.saved_affinity = None
        shutil.rmtree(self.tmpdir, ignore_errors=True)
