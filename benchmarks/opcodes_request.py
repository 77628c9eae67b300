"""Python opcodes executed per request by the router loop (``run`` / ``run_async``), c and py
twins: ``python benchmarks/opcodes_request.py``. Counts every opcode of Python frames (the
compiled twin's own work is invisible here; ``send`` and ``status_of`` included)."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from importlib import import_module

sys.path.insert(0, os.path.dirname(__file__))
from test_bench_request import OK, URL, _resources  # noqa: E402

from meshcore.mesh import MeshBase  # noqa: E402

N = 200


def _count(fn) -> float:
    n = 0

    def tracer(frame, event, arg):
        nonlocal n
        frame.f_trace_opcodes = True
        if event == "opcode":
            n += 1
        return tracer

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return n / N


def main() -> None:
    for twin in ("c", "py"):
        mod = import_module(f"meshcore._fast.call_{twin}")
        path = os.path.join(tempfile.mkdtemp(), "resources.json")
        _resources(path)
        cls = type(f"Mesh_{twin}", (MeshBase, mod.MeshCore), {"_core": mod})
        mesh = cls.from_file(path, watch=False, seed=1).start()
        mesh.wait_ready("svc.mesh.local:80", timeout=10)

        def send(attempt):
            return OK

        async def asend(attempt):
            return OK

        def sync_batch():
            for _ in range(N):
                mesh.request(URL).run(send)

        async def abatch():
            for _ in range(N):
                await mesh.request(URL).run_async(asend)

        async def empty():
            for _ in range(N):
                pass

        loop = asyncio.new_event_loop()
        sync_batch()
        loop.run_until_complete(abatch())
        base = _count(lambda: [None for _ in range(N)])
        run = _count(sync_batch) - base
        arun = _count(lambda: loop.run_until_complete(abatch())) - _count(lambda: loop.run_until_complete(empty()))
        print(f"{twin}: run {run:.0f} opcodes/request, run_async {arun:.0f} opcodes/request")
        loop.close()
        mesh.close()


if __name__ == "__main__":
    main()
