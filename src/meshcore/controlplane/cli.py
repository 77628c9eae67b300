"""``meshcore control-plane``: run the reference control plane until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any, Optional, Sequence

__all__ = ["add_arguments", "main", "run"]

_HISTORY_LIMIT = 10000  # a long-running server keeps only the recent request/response log


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the control plane's options to ``parser`` (used by ``meshcore control-plane``)."""
    parser.add_argument("--address", default="127.0.0.1:18000", help="ADS gRPC address (default %(default)s)")
    parser.add_argument("--http-address", default=None, metavar="ADDRESS",
                        help="serve the HTTP API on this address (e.g. 127.0.0.1:18001)")
    parser.add_argument("--resources", metavar="FILE", help="YAML or JSON resource file to serve")
    parser.add_argument("--no-watch", action="store_true", help="do not reload the resource file when it changes")
    return parser


def run(args: argparse.Namespace) -> int:
    """Start the control plane described by ``args``, print its addresses, wait for a signal."""
    from ..errors import ConfigError
    from .plane import ControlPlane

    try:
        if args.resources:
            plane = ControlPlane.from_file(args.resources, watch=not args.no_watch, address=args.address,
                                           http_address=args.http_address, history_limit=_HISTORY_LIMIT)
        else:
            plane = ControlPlane(address=args.address, http_address=args.http_address,
                                 history_limit=_HISTORY_LIMIT)
        plane.start()
    except (ConfigError, OSError, ValueError) as exc:
        print(f"meshcore control-plane: {exc}", file=sys.stderr)
        return 1
    done = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        done.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        http = ""
        if plane.http_port is not None:
            http = f" http={args.http_address.rpartition(':')[0]}:{plane.http_port}"
        print(f"meshcore control plane: xds={plane.address}{http} version={plane.version}", flush=True)
        while not done.wait(0.5):
            pass
    finally:
        plane.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Standalone entry point (``python -m meshcore.controlplane.cli``)."""
    parser = add_arguments(argparse.ArgumentParser(prog="meshcore control-plane", description=__doc__))
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
