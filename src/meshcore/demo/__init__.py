"""``meshcore demo``: a whole proxyless mesh on loopback, in one process, in a few seconds.

:func:`run_demo` starts the reference control plane, a dozen small HTTP services and a
:class:`~meshcore.Mesh` client bootstrapped to the control plane over ADS, then runs the
scenarios of :mod:`.scenario` (weighted canary, header routing, least request vs a slow
instance, outlier ejection, live pushes under load) with real requests, prints a report and
stops everything again. ``--json`` prints the results as JSON instead (what the tests read).

Modules: :mod:`.upstreams` (the services), :mod:`.client` (the stdlib HTTP ``send``),
:mod:`.resources` (the xDS resources), :mod:`.environment` (set-up and tear-down),
:mod:`.scenario` (the scenarios), :mod:`.report` (the terminal report), :mod:`.tour` (the
offline balancer tour, ``meshcore demo --tour``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import IO, Any, Dict, List, Optional, Sequence

__all__ = ["run_demo"]

log = logging.getLogger(__name__)


def run_demo(json_output: bool = False, stream: Optional[IO[str]] = None,
             only: Optional[Sequence[str]] = None) -> int:
    """Run the demo; returns the exit status (0: every check held, 1: some did not)."""
    import sys

    from .. import IMPLEMENTATION, __version__
    from .environment import DemoEnvironment
    from .report import Reporter

    out = stream if stream is not None else sys.stdout
    r = Reporter(out, quiet=json_output)
    started = time.monotonic()
    threads_before = {t.ident for t in threading.enumerate()}
    results: Dict[str, Any] = {}
    r.title(f"meshcore {__version__} demo: a proxyless service mesh in one process (compiled core: {IMPLEMENTATION})")
    try:
        _run_scenarios(DemoEnvironment(), r, results, only)
    except KeyboardInterrupt:
        r.write()
        r.write("interrupted; control plane, upstreams and mesh client stopped")
        return 130
    leftover = _leftover_threads(threads_before)
    wall = time.monotonic() - started
    ok = all(res["ok"] for res in results.values())
    summary = {"ok": ok, "wall_seconds": round(wall, 3), "implementation": IMPLEMENTATION,
               "version": __version__, "leftover_threads": leftover, "scenarios": results}
    if json_output:
        out.write(json.dumps(summary, indent=2, sort_keys=False) + "\n")
        out.flush()
    else:
        r.write()
        verdict = r.paint("all checks passed", "green", "bold") if ok else r.paint(
            f"{r.failed_checks} check(s) failed", "red", "bold")
        r.write(f"{verdict} in {wall:.1f} s; control plane, upstreams and mesh client stopped.")
        if leftover:
            r.write(r.paint(f"threads still running: {', '.join(leftover)}", "yellow"))
    return 0 if ok else 1


def _run_scenarios(env: Any, r: Any, results: Dict[str, Any], only: Optional[Sequence[str]]) -> None:
    """Start ``env``, print the set-up, run the scenarios into ``results``, stop ``env`` (always)."""
    from .scenario import SCENARIOS

    with env:
        assert env.plane is not None and env.mesh is not None
        services: Dict[str, List[str]] = {}
        for up in env.upstreams:
            services.setdefault(up.service, []).append(up.name + (" (slow)" if up.delay else ""))
        r.kv([("control plane", f"{env.plane.address} (ADS, state of the world), version {env.plane.version}"),
              ("upstreams", "; ".join(f"{s}: {', '.join(n)}" for s, n in services.items())),
              ("mesh client", f"node {env.mesh.node_id!r}, {len(env.targets)} targets ready in "
                              f"{env.ready_seconds * 1000:.0f} ms"),
              ("requests", "mesh.request(url).run(send): routing, balancing, retries, outlier detection in process")])
        for name, scenario in SCENARIOS.items():
            if not only or name in only:
                results[name] = scenario(env, r)


def _leftover_threads(before: set, grace: float = 2.0) -> List[str]:
    """Names of non-daemon threads started by the demo that are still alive (after ``grace``)."""
    deadline = time.monotonic() + grace
    while True:
        left = [t for t in threading.enumerate()
                if t.ident not in before and t.is_alive() and not t.daemon]
        if not left or time.monotonic() > deadline:
            return [t.name for t in left]
        time.sleep(0.05)
