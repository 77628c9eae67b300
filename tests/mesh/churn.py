"""Churn harness: a control plane changing EDS every 10 ms, RDS every 100 ms and adding/removing a
cluster every 500 ms, with a real meshcore ``Mesh`` (SotW or delta) following it.

Measures, from the control plane's request/response log and the mesh's published configuration:

* requests of each type whose nonce was stale when they arrived (the server does not answer them);
* the delay from each store change to the mesh publishing it (or something newer);
* whether a response was ever sent for a type while the previous one was not yet ACKed/NACKed;
* subscription changes the server never applied (names the client asked for but never got).

Run as a script for the figures: ``python -m tests.mesh.churn [--seconds 10] [--mode sotw|delta]``.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import meshcore
from meshcore.controlplane import ControlPlane
from meshcore.xds.model import CLUSTER, ENDPOINT, SHORT_NAMES
from meshcore.xds.resource_file import parse_resources

from .shapes import TARGET, assignment, bootstrap, cluster, fast_backoff, mesh_resources, route

EDS_PERIOD, RDS_PERIOD, CDS_PERIOD = 0.010, 0.100, 0.500
CHURN_CLUSTERS = 3  # x0..x2: one of them is absent at any time, re-added later


@dataclass
class ChurnResult:
    seconds: float
    requests: Dict[str, int] = field(default_factory=dict)  # type short name -> requests with a nonce
    stale: Dict[str, int] = field(default_factory=dict)  # type short name -> of those, stale on arrival
    double_outstanding: List[Tuple[int, str, str]] = field(default_factory=list)  # (stream, type, nonce)
    delays: Dict[str, List[float]] = field(default_factory=dict)  # kind -> store change to publication
    unseen: Dict[str, int] = field(default_factory=dict)  # kind -> changes never published
    lost_subscriptions: List[Tuple[str, str]] = field(default_factory=list)  # (type, name) asked, never sent
    changes: Dict[str, int] = field(default_factory=dict)

    def stale_percent(self, short: str) -> float:
        n = self.requests.get(short, 0)
        return 100.0 * self.stale.get(short, 0) / n if n else 0.0

    def max_delay(self, kind: str) -> float:
        return max(self.delays.get(kind) or [0.0])

    def report(self) -> str:
        lines = [f"churn for {self.seconds:.1f} s"]
        for short in ("LDS", "RDS", "CDS", "EDS"):
            if short in self.requests:
                lines.append(f"  {short}: {self.requests[short]} requests with a nonce, "
                             f"{self.stale.get(short, 0)} with a stale nonce ({self.stale_percent(short):.1f} %)")
        for kind, values in sorted(self.delays.items()):
            if values:
                q = sorted(values)
                lines.append(f"  {kind}: {self.changes.get(kind, 0)} changes, delay median "
                             f"{statistics.median(q) * 1000:.0f} ms, p99 {q[int(0.99 * (len(q) - 1))] * 1000:.0f} ms, "
                             f"max {q[-1] * 1000:.0f} ms, never published {self.unseen.get(kind, 0)}")
        lines.append(f"  responses sent while one was outstanding: {len(self.double_outstanding)}")
        lines.append(f"  subscriptions never answered: {self.lost_subscriptions}")
        return "\n".join(lines)


def _state(eds: int, rds: int, present: List[int]) -> Dict[str, Any]:
    routes = [route(f"gen-{rds}", "a", prefix="/gen")]
    routes += [route(f"to-x{k}", f"x{k}", prefix=f"/x{k}") for k in present]
    routes.append(route("default", "a"))
    return mesh_resources(TARGET, routes, [cluster("a")] + [cluster(f"x{k}") for k in present],
                          [assignment("a", [20000 + eds % 40000])] + [assignment(f"x{k}", [30000 + k])
                                                                       for k in present])


def _published(mesh: meshcore.Mesh) -> Tuple[Optional[int], Optional[int], frozenset]:
    cfg = mesh.config(TARGET)
    if cfg is None or cfg.error is not None:
        return None, None, frozenset()
    eds = rds = None
    a = cfg.clusters.get("a")
    if a is not None and a.eds_spec is not None and a.eds_spec.endpoints:
        eds = a.eds_spec.endpoints[0].port - 20000
    if cfg.route_table is not None:
        name = cfg.route_table.spec.virtual_hosts[0].routes[0].name
        if name.startswith("gen-"):
            rds = int(name[4:])
    ready = frozenset(n for n, rt in cfg.clusters.items() if rt.lb is not None and rt.error is None
                      and rt.eds_spec is not None and rt.eds_spec.endpoints)
    return eds, rds, ready


def run_churn(mode: str = "sotw", seconds: float = 3.0, settle: float = 1.0, lag: float = 0.0) -> ChurnResult:
    """Run the churn for ``seconds`` and measure (see the module docstring). ``lag``: seconds the
    mesh spends on each update (a busy or slow client: it falls behind the 10 ms EDS pushes)."""
    changes: Dict[str, List[Tuple[float, Any]]] = {"EDS": [], "RDS": [], "cluster re-added": []}
    seen: List[Tuple[float, Tuple[Optional[int], Optional[int], frozenset]]] = []
    with ControlPlane() as cp:
        present = list(range(CHURN_CLUSTERS - 1))
        eds = rds = 0
        cp.set_resources(parse_resources(_state(eds, rds, present)))
        mesh = meshcore.Mesh(bootstrap(cp), delta=(mode == "delta"), backoff=fast_backoff())
        original = mesh._source._on_update

        def on_update(changed: Any) -> None:
            original(changed)
            if lag:
                time.sleep(lag)
            seen.append((time.monotonic(), _published(mesh)))

        mesh._source._on_update = on_update
        try:
            mesh.start()
            mesh.wait_ready(TARGET, timeout=10)
            stop = threading.Event()

            def drive() -> None:
                nonlocal eds, rds
                start = time.monotonic()
                next_rds, next_cds = start + RDS_PERIOD, start + CDS_PERIOD
                while not stop.is_set():
                    now = time.monotonic()
                    kinds = ["EDS"]
                    eds += 1
                    if now >= next_rds:
                        rds += 1
                        next_rds += RDS_PERIOD
                        kinds.append("RDS")
                    added = None
                    if now >= next_cds:  # re-add the absent cluster, remove the next one
                        next_cds += CDS_PERIOD
                        added = next(k for k in range(CHURN_CLUSTERS) if k not in present)
                        present.remove((added + 1) % CHURN_CLUSTERS)
                        present.append(added)
                    cp.set_resources(parse_resources(_state(eds, rds, sorted(present))))
                    t = time.monotonic()
                    changes["EDS"].append((t, eds))
                    if "RDS" in kinds:
                        changes["RDS"].append((t, rds))
                    if added is not None:
                        changes["cluster re-added"].append((t, f"x{added}"))
                    stop.wait(max(0.0, now + EDS_PERIOD - time.monotonic()))

            driver = threading.Thread(target=drive, daemon=True)
            driver.start()
            time.sleep(seconds)
            stop.set()
            driver.join()
            time.sleep(settle)  # let the last changes arrive
            final = _published(mesh)
            history = cp.history
        finally:
            mesh.close()
    result = ChurnResult(seconds)
    _count_requests(history, result)
    _delays(changes, seen, result)
    _lost_subscriptions(history, result, final, present)
    return result


def _count_requests(history: List[Dict[str, Any]], result: ChurnResult) -> None:
    latest: Dict[Tuple[int, str], str] = {}
    outstanding: Dict[Tuple[int, str], Optional[str]] = {}
    for e in history:
        key = (e["stream"], e["type_url"])
        short = SHORT_NAMES.get(e["type_url"], e["type_url"])
        if e["dir"] == "resp":
            if outstanding.get(key):
                result.double_outstanding.append((e["stream"], short, e["nonce"]))
            latest[key] = outstanding[key] = e["nonce"]
            continue
        if not e["nonce"]:
            outstanding[key] = None  # (re)subscription: supersedes what was outstanding
            continue
        result.requests[short] = result.requests.get(short, 0) + 1
        if e["nonce"] != latest.get(key):
            result.stale[short] = result.stale.get(short, 0) + 1
        elif outstanding.get(key) == e["nonce"]:
            outstanding[key] = None


def _delays(changes: Dict[str, List[Tuple[float, Any]]], seen: List[Tuple[float, Any]],
            result: ChurnResult) -> None:
    for kind, items in changes.items():
        result.changes[kind] = len(items)
        delays: List[float] = []
        unseen = 0
        for t, marker in items:
            when = None
            for ts, (eds, rds, ready) in seen:
                if ts < t:
                    continue
                if kind == "EDS" and eds is not None and eds >= marker:
                    when = ts
                elif kind == "RDS" and rds is not None and rds >= marker:
                    when = ts
                elif kind == "cluster re-added" and marker in ready:
                    when = ts
                if when is not None:
                    break
            if when is None:
                unseen += 1
            else:
                delays.append(when - t)
        result.delays[kind] = delays
        result.unseen[kind] = unseen


def _lost_subscriptions(history: List[Dict[str, Any]], result: ChurnResult, final: Any,
                        present: List[int]) -> None:
    """Names of present clusters that the mesh subscribed to but that were never sent on the stream."""
    asked: Dict[Tuple[str, str], bool] = {}
    for e in history:
        if e["type_url"] not in (CLUSTER, ENDPOINT):
            continue
        for name in e["names"]:
            if e["dir"] == "req":
                asked.setdefault((e["type_url"], name), False)
            else:
                asked[(e["type_url"], name)] = True
    for k in present:
        for t in (CLUSTER, ENDPOINT):
            if asked.get((t, f"x{k}")) is False:
                result.lost_subscriptions.append((SHORT_NAMES[t], f"x{k}"))
    eds, rds, ready = final
    for k in present:
        if f"x{k}" not in ready:
            result.lost_subscriptions.append(("published", f"x{k}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--mode", choices=["sotw", "delta", "both"], default="both")
    parser.add_argument("--lag", type=float, default=0.02, help="seconds the mesh spends per update")
    args = parser.parse_args()
    for mode in (["sotw", "delta"] if args.mode == "both" else [args.mode]):
        print(f"[{mode}]", run_churn(mode, args.seconds, lag=args.lag).report(), flush=True)


if __name__ == "__main__":
    main()
