"""The ``meshcore`` command line.

* ``meshcore demo``: a control plane, local services and a mesh client on loopback, and what the
  mesh does with them (canary split, header routing, least request, outlier ejection, live
  pushes); ``--json`` for machine-readable results, ``--tour`` for the offline balancer tour;
* ``meshcore status | config-dump | clusters | route``: what a mesh client sees, from a bootstrap
  or a resource file (``meshcore <command> --help``);
* ``meshcore control-plane``: the reference xDS control plane.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Dict, MutableMapping, Optional, Sequence, Tuple

from . import IMPLEMENTATION, __version__

__all__ = ["main"]

log = logging.getLogger(__name__)


def _quiet_grpc_core(verbosity: int, environ: MutableMapping[str, str] = os.environ) -> None:
    """Keep gRPC core's own log lines (``E1206 ... add_port.cc:83] ...``) off stderr.

    gRPC core writes them straight to fd 2 at ``GRPC_VERBOSITY`` (its default: ERROR), read once
    when ``grpc`` is first imported -- so this runs before any command imports it. Everything they
    say reaches the user anyway, as one line of the command or a ``meshcore.*`` log record.
    ``-v`` gives gRPC's own default back (ERROR), ``-vv`` its INFO. A ``GRPC_VERBOSITY`` the user
    set wins, and so does ``GRPC_TRACE`` (tracers need gRPC's own verbosity). Nothing is set when
    ``grpc`` is already imported (``main`` called inside a program: too late to matter, and the
    host's child processes keep their environment). The library never does this: ``import
    meshcore`` leaves the host application's gRPC logging alone.
    """
    if "grpc" in sys.modules or "GRPC_VERBOSITY" in environ or environ.get("GRPC_TRACE"):
        return
    environ["GRPC_VERBOSITY"] = "NONE" if verbosity <= 0 else "ERROR" if verbosity == 1 else "INFO"


def _configure_logging(verbosity: int) -> None:
    """Log to stderr: warnings by default, ``-v`` info, ``-vv`` debug (the CLI's own choice)."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


def _parser() -> Tuple[argparse.ArgumentParser, Dict[str, Callable[[argparse.Namespace], int]]]:
    parser = argparse.ArgumentParser(
        prog="meshcore", description="meshcore: a proxyless service-mesh data plane (Envoy's decisions, in process). "
                                     "See 'meshcore COMMAND --help'.")
    parser.add_argument("--version", action="version", version=f"meshcore {__version__} ({IMPLEMENTATION})")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser("demo", help="run the built-in mesh scenario on loopback (a few seconds)")
    d.add_argument("--json", action="store_true",
                   help="print the results as JSON instead of the report (not with --tour)")
    d.add_argument("--only", action="append", default=[], metavar="SCENARIO",
                   choices=["canary_split", "header_routing", "least_request", "outlier_ejection", "live_push"],
                   help="run only this scenario (repeatable)")
    d.add_argument("--tour", action="store_true",
                   help="instead: the offline tour of the balancers and route tables (no network)")
    d.add_argument("--picks", type=int, default=20000, help="picks per table in the --tour (default %(default)s)")
    from .cli_inspect import add_commands
    from .controlplane import cli as control_plane_cli

    handlers = add_commands(sub)
    control_plane_cli.add_arguments(sub.add_parser(
        "control-plane", help="run the reference xDS control plane (ADS, SotW and delta)"))
    handlers["control-plane"] = control_plane_cli.run
    for command in sub.choices.values():  # `meshcore status ... -v` works as well as `meshcore -v status ...`
        if "-v" not in command._option_string_actions:
            command.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                                 help="log more (-vv: debug)")
    return parser, handlers


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser, handlers = _parser()  # imports no grpc (tests/cli/test_cli_basics.py checks)
    args = parser.parse_args(argv)
    if args.command == "demo" and args.tour and args.json:
        parser.error("--json does not apply to demo --tour (a printed walk-through)")
    _quiet_grpc_core(args.verbose)
    _configure_logging(args.verbose)
    try:
        return _dispatch(args, handlers)
    except BrokenPipeError:  # e.g. `meshcore config-dump | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug, not the user's doing: one line, the traceback with -vv
        if args.verbose >= 2:
            log.exception("meshcore %s failed", args.command)
        print(f"meshcore {args.command}: internal error: {type(exc).__name__}: {exc}"
              f"{'' if args.verbose >= 2 else ' (-vv shows the traceback)'}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace, handlers: Dict[str, Callable[[argparse.Namespace], int]]) -> int:
    if args.command == "demo":
        if args.tour:
            from .demo.tour import tour

            return tour(args.picks)
        from .demo import run_demo

        return run_demo(json_output=args.json, only=args.only or None)
    return handlers[args.command](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
