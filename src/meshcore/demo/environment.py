"""The demo's world: local upstreams, the reference control plane and a mesh client, on loopback.

:class:`DemoEnvironment` starts everything (``start``), offers one way to send a request
through the mesh (``request``: ``mesh.request(url).run(send)``, so retries, breakers, outlier
detection and stats are the real ones) and stops everything again (``close``: the mesh, the
control plane, the upstreams and every client connection), leaving no thread behind.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from .. import Mesh
from ..controlplane import ControlPlane
from . import resources
from .client import HttpSender
from .upstreams import Upstream, UpstreamGroup

__all__ = ["DemoEnvironment", "Outcome", "SLOW_DELAY"]

log = logging.getLogger(__name__)

#: How long the slow ``ratings`` instance takes to answer (seconds).
SLOW_DELAY = 0.2


@dataclass
class Outcome:
    """One request as the application saw it."""

    status: Optional[int]
    instance: str
    attempts: List[str] = field(default_factory=list)  # endpoint keys, in order
    route: str = ""
    cluster: str = ""
    error: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.error and self.status is not None and self.status < 500


class DemoEnvironment:
    """Upstreams + control plane + mesh client. Use as a context manager."""

    def __init__(self) -> None:
        self.upstreams = UpstreamGroup()
        self.plane: Optional[ControlPlane] = None
        self.mesh: Optional[Mesh] = None
        self.sender = HttpSender()
        self.ready_seconds = 0.0
        self.targets = tuple(resources.TARGETS)

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self, ready_timeout: float = 10.0) -> "DemoEnvironment":
        ups = self.upstreams
        for name in ("a", "b"):
            ups.add("reviews", "v1", f"reviews-v1-{name}")
        ups.add("reviews", "v2", "reviews-v2-a")
        for name in ("a", "b", "c"):
            ups.add("ratings", "v1", f"ratings-{name}")
        ups.add("ratings", "v1", "ratings-slow", delay=SLOW_DELAY)
        for name in ("a", "b", "c"):
            ups.add("details", "v1", f"details-{name}")
        instances: Dict[str, Sequence[Upstream]] = {
            "reviews-v1": ups.of("reviews", "v1"), "reviews-v2": ups.of("reviews", "v2"),
            "ratings": ups.of("ratings"), "ratings-rr": ups.of("ratings"), "details": ups.of("details"),
        }
        self.plane = ControlPlane("127.0.0.1:0", history_limit=1000).start()
        self.plane.set_resources(resources.topology(instances))
        started = time.monotonic()
        self.mesh = Mesh(self.bootstrap()).start()
        for target in resources.TARGETS:
            self.mesh.wait_ready(target, timeout=ready_timeout)
        self.ready_seconds = time.monotonic() - started
        log.info("demo ready: control plane %s, %d upstreams", self.plane.address, len(list(ups)))
        return self

    def bootstrap(self) -> Dict[str, Any]:
        """The gRPC-style bootstrap the mesh client uses (the control plane on loopback)."""
        assert self.plane is not None
        return {"xds_servers": [{"server_uri": self.plane.address, "channel_creds": [{"type": "insecure"}],
                                 "server_features": ["xds_v3"]}],
                "node": {"id": "meshcore-demo", "cluster": "demo", "locality": {"zone": "zone-a"}}}

    def close(self) -> None:
        """Stop everything (idempotent): connections, mesh, control plane, upstreams."""
        self.sender.close()
        if self.mesh is not None:
            self.mesh.close()
            self.mesh = None
        if self.plane is not None:
            self.plane.stop()
            self.plane = None
        self.upstreams.stop()

    def __enter__(self) -> "DemoEnvironment":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- sending ------------------------------------------------------------------------------------

    def request(self, url: str, headers: Optional[Mapping[str, str]] = None) -> Outcome:
        """One request through the mesh; never raises (the error is in the outcome)."""
        assert self.mesh is not None
        started = time.monotonic()
        call = None
        try:
            call = self.mesh.request(url, "GET", headers)
            resp = call.run(self.sender)
            out = Outcome(resp.status, resp.instance)
        except Exception as exc:  # noqa: BLE001  (reported, not raised: the demo counts failures)
            out = Outcome(None, "", error=f"{type(exc).__name__}: {exc}")
        if call is not None:
            out.attempts = [a.endpoint.key for a in call.attempts]
            out.route = call.route.route_name
            out.cluster = call.cluster or ""
        out.seconds = time.monotonic() - started
        return out

    def burst(self, url: str, count: int, headers: Optional[Mapping[str, str]] = None, workers: int = 1,
              on_progress: Optional[Callable[[int], None]] = None) -> List[Outcome]:
        """``count`` requests, sequentially or from ``workers`` threads; outcomes in completion order."""
        out: List[Outcome] = []
        if workers <= 1:
            for i in range(count):
                out.append(self.request(url, headers))
                if on_progress is not None:
                    on_progress(i + 1)
            return out
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="demo-client") as pool:
            futures = [pool.submit(self.request, url, headers) for _ in range(count)]
            for i, f in enumerate(as_completed(futures)):
                out.append(f.result())
                if on_progress is not None:
                    on_progress(i + 1)
        return out
