"""``meshcore control-plane``: run the reference control plane until SIGINT/SIGTERM.

Addresses must name a host (``127.0.0.1:18000``; ``0.0.0.0:18000`` or ``[::]:18000`` to listen on
every interface): a bare port is refused rather than silently bound to all interfaces. The
command logs to stderr at INFO (``--log-level``): clients connecting and disconnecting (node id,
SotW or delta), ACKs and NACKs (type, version, nonce, the NACK's error) and pushes (type,
version, resource count).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any, Optional, Sequence

__all__ = ["add_arguments", "main", "run"]

_HISTORY_LIMIT = 10000  # a long-running server keeps only the recent request/response log


def listen_address(value: str, unix: bool = True) -> str:
    """``host:port`` (or ``unix:PATH`` when ``unix``); a missing host is an error naming the fix."""
    if unix and value.startswith("unix:"):
        return value
    host, sep, port = value.rpartition(":")
    if not sep and value.isdigit():
        host, port = "", value
    if not port.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not host:port (e.g. 127.0.0.1:18000)")
    if not host:
        raise argparse.ArgumentTypeError(
            f"{value!r} names no host: use 127.0.0.1:{port} (loopback), or 0.0.0.0:{port} to listen on "
            f"every interface")
    return value


def _http_address(value: str) -> str:
    return listen_address(value, unix=False)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the control plane's options to ``parser`` (used by ``meshcore control-plane``)."""
    parser.add_argument("--address", default="127.0.0.1:18000", type=listen_address, metavar="HOST:PORT",
                        help="ADS gRPC address (default %(default)s; unix:PATH for a Unix socket)")
    parser.add_argument("--http-address", default=None, type=_http_address, metavar="HOST:PORT",
                        help="serve the HTTP API on this address (e.g. 127.0.0.1:18001; off by default)")
    parser.add_argument("--resources", metavar="FILE", help="YAML or JSON resource file to serve")
    parser.add_argument("--no-watch", action="store_true", help="do not reload the resource file when it changes")
    parser.add_argument("--log-level", choices=["debug", "info", "warning"], default=None,
                        help="what the control plane logs to stderr (default: info; -vv: debug)")
    return parser


def _configure_logging(level_name: Optional[str]) -> None:
    """The command's logging (the library modules only log): INFO for the control plane unless
    told otherwise; a root handler on stderr if the program has none yet."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level_name is not None:
        level = getattr(logging, level_name.upper())
    else:
        level = min(logging.INFO, root.getEffectiveLevel())  # -vv (DEBUG) stays DEBUG
    logging.getLogger("meshcore.controlplane").setLevel(level)


def run(args: argparse.Namespace) -> int:
    """Start the control plane described by ``args``, print its addresses, wait for a signal."""
    from ..errors import ConfigError
    from .plane import ControlPlane

    _configure_logging(getattr(args, "log_level", None))
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
