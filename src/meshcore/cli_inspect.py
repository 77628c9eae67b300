"""``meshcore status | config-dump | clusters | route``: look at what a mesh client sees.

Each command builds a :class:`~meshcore.Mesh` like an application would -- from a bootstrap
(``--bootstrap FILE``, else ``GRPC_XDS_BOOTSTRAP`` / ``GRPC_XDS_BOOTSTRAP_CONFIG``) or from a
resource file (``--file resources.yaml``, no control plane) -- subscribes to the ``--target``
``host:port`` names, waits up to ``--timeout`` seconds for them and prints, in the manner of
``istioctl proxy-config``:

* ``status``: per resource type, name, version and ACKED / NACKED / REQUESTED / DOES_NOT_EXIST,
  with why a resource was rejected (its NACK's error text) or does not exist;
* ``config-dump``: the CSDS ``ClientConfig`` as JSON (``Mesh.config_dump``);
* ``clusters``: per cluster its policy and endpoints (health, weight, priority, locality, ejected);
* ``route METHOD URL [-H 'name: value']``: the routing decision, explained (:mod:`meshcore.explain`).

Every command takes ``--json`` (``config-dump`` always prints JSON). Errors are one line on stderr,
``meshcore COMMAND: ...``. Exit status: 0 fine, 1 the mesh could not do it (a target not ready, a
NACKed resource, no route), 2 bad usage or configuration (bootstrap, resource file, arguments).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from typing import IO, Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["add_commands", "CliError"]

log = logging.getLogger(__name__)


class CliError(Exception):
    """Ends a command with ``message`` on stderr and exit status ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


_MARK = re.compile(r'^\s+in "[^"]*", line (\d+), column (\d+):?$')  # a YAML error's position line
_ERRNO = re.compile(r"\[Errno \d+\] ([^:]+)(?:: '.*')?")  # "[Errno 2] No such file or directory: 'x'"


def one_line(text: str) -> str:
    """``text`` on one line: a YAML error's snippet and caret lines dropped, its ``in "<...>",
    line 3, column 4:`` marks shortened to ``(line 3, column 4)``, an OSError's ``[Errno N]`` and
    repeated path dropped."""
    parts: List[str] = []
    for line in text.splitlines():
        mark = _MARK.match(line)
        if mark:
            if parts:
                parts[-1] += f" (line {mark.group(1)}, column {mark.group(2)})"
        elif line.strip() and not line[:1].isspace():
            parts.append(line.strip())
    return _ERRNO.sub(r"\1", "; ".join(parts))


def config_error_text(exc: Exception, source: str = "") -> str:
    """A ``ConfigError`` for one line of the CLI: ``source`` named once, a pseudo field such as
    ``(document)`` or ``(root)`` left out."""
    resource, field, reason = (getattr(exc, a, None) for a in ("resource", "field", "reason"))
    if not isinstance(reason, str):
        text = str(exc)
        if source and text.startswith(f"{source}: "):
            text = text[len(source) + 2:]
        return one_line(f"{source}: {text}" if source else text)
    where = [str(resource)] if resource else []
    if field and not str(field).startswith("("):
        where.append(f"field {field}")
    return one_line(": ".join(where + [reason]))


# -- arguments ----------------------------------------------------------------------------------------


def _source_arguments(p: argparse.ArgumentParser, targets_help: str) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--bootstrap", metavar="FILE",
                     help="xDS bootstrap file (default: GRPC_XDS_BOOTSTRAP or GRPC_XDS_BOOTSTRAP_CONFIG)")
    src.add_argument("--file", metavar="FILE",
                     help="resource file (YAML/JSON Listeners, RouteConfigurations, Clusters, "
                          "ClusterLoadAssignments) instead of a control plane")
    p.add_argument("--target", action="append", default=[], metavar="HOST:PORT", help=targets_help)
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="how long to wait for the targets' configuration (default %(default)s)")
    p.add_argument("--delta", action="store_true", help="use the incremental (delta) ADS variant")
    p.add_argument("--certificates", metavar="DIR", default=None,
                   help="the workload's certificates for mesh TLS (Istio layout: cert-chain.pem, key.pem, "
                        "root-cert.pem; default: MESHCORE_CERTIFICATES, the bootstrap's provider \"default\", "
                        "Istio's output directory)")


def add_commands(sub: Any) -> Dict[str, Callable[[argparse.Namespace], int]]:
    """Add the four commands to the ``meshcore`` sub-parsers; returns ``{name: handler}``."""
    many = "a target to subscribe to (repeatable); with --file, default: every listener in the file"
    p = sub.add_parser("status", help="xDS resources of a client: version and ACKED/NACKED status")
    _source_arguments(p, many)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("config-dump", help="the client's configuration as CSDS ClientConfig JSON")
    _source_arguments(p, many)
    p.add_argument("--type", action="append", default=[], choices=["lds", "rds", "cds", "eds"],
                   help="only resources of this type (repeatable)")
    p.add_argument("--no-resources", action="store_true", help="leave the resources out (status only)")
    p.add_argument("--json", action="store_true", help="accepted like the other commands' (this is always JSON)")
    p = sub.add_parser("clusters", help="clusters of the targets: policy, endpoints, health, ejection")
    _source_arguments(p, many)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("route", help="explain the routing decision for one request")
    p.add_argument("method", metavar="METHOD", help="HTTP method, e.g. GET")
    p.add_argument("url", metavar="URL", help="http(s)://host[:port]/path?query; the target is host:port")
    p.add_argument("-H", "--header", action="append", default=[], dest="headers", metavar="'NAME: VALUE'",
                   help="a request header (repeatable)")
    _source_arguments(p, "the target (listener) to route with, instead of the URL's host:port")
    p.add_argument("--random-value", type=int, default=None, metavar="N",
                   help="the random value for weighted clusters and runtime fractions (default: random)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return {"status": lambda a: _run(a, _status), "config-dump": lambda a: _run(a, _config_dump),
            "clusters": lambda a: _run(a, _clusters), "route": lambda a: _run(a, _route)}


# -- the mesh -----------------------------------------------------------------------------------------


def _run(args: argparse.Namespace, command: Callable[[Any, List[str], Dict[str, str], argparse.Namespace], int]) -> int:
    from .errors import ConfigError

    prog = f"meshcore {args.command}"
    mesh = None
    try:
        targets = list(args.target)
        if args.command == "route" and not targets:
            from .explain import target_for_url

            try:
                targets = [target_for_url(args.url)[0]]
            except ValueError as exc:
                raise CliError(str(exc)) from None
        mesh, targets = _open_mesh(args, targets)
        errors = _wait(mesh, targets, args.timeout)
        return command(mesh, targets, errors, args)
    except CliError as exc:
        print(f"{prog}: {one_line(str(exc))}", file=sys.stderr)
        return exc.code
    except ConfigError as exc:
        print(f"{prog}: invalid configuration: {config_error_text(exc)}", file=sys.stderr)
        return 2
    finally:
        if mesh is not None:
            mesh.close()


def _open_mesh(args: argparse.Namespace, targets: List[str]) -> Tuple[Any, List[str]]:
    from .errors import ConfigError
    from .mesh import Mesh

    if args.file:
        from .xds.model import LISTENER
        from .xds.resource_file import load_resource_file

        try:
            resources = load_resource_file(args.file)
        except OSError as exc:
            raise CliError(f"cannot read {args.file}: {exc.strerror or exc}") from None
        except ConfigError as exc:
            if exc.field == "(file)":  # the loader's "cannot read: [Errno 2] ..."
                raise CliError(config_error_text(exc)) from None
            raise CliError(f"bad resource file {config_error_text(exc, args.file)}") from None
        except ValueError as exc:
            raise CliError(f"bad resource file {config_error_text(exc, args.file)}") from None
        if not targets:
            targets = sorted(resources.get(LISTENER, {}))
            if not targets:
                raise CliError(f"{args.file} has no listeners; give --target")
        mesh = Mesh.from_file(args.file, watch=False, certificates=args.certificates)
    else:
        try:
            mesh = Mesh(args.bootstrap, delta=True if args.delta else None, certificates=args.certificates)
        except ConfigError as exc:
            raise CliError(f"bad xDS bootstrap: {config_error_text(exc)}") from None
        if not targets:
            mesh.close()
            raise CliError("give --target host:port (the client subscribes to the targets it is asked about)")
    mesh.start()
    return mesh, targets


def _wait(mesh: Any, targets: Sequence[str], timeout: float) -> Dict[str, str]:
    """Wait for every target (one shared deadline); returns ``{target: why not ready}``."""
    from .errors import Unavailable

    for t in targets:
        mesh.watch(t)
    deadline = time.monotonic() + timeout
    errors: Dict[str, str] = {}
    for t in targets:
        try:
            mesh.wait_ready(t, timeout=max(0.0, deadline - time.monotonic()))
        except Unavailable as exc:
            errors[t] = str(exc)
        except ValueError as exc:  # a malformed target
            raise CliError(f"bad target {t!r}: {exc}") from None
    return errors


# -- output helpers -----------------------------------------------------------------------------------


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str], indent: str = "",
           out: Optional[IO[str]] = None) -> None:
    out = out if out is not None else sys.stdout
    cells = [[str(c) for c in header]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for row in cells:
        print(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), file=out)


def _dump_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _target_rows(mesh: Any, targets: Sequence[str], errors: Dict[str, str]) -> List[Dict[str, Any]]:
    rows = []
    for t in targets:
        cfg = mesh.config(t)
        rows.append({"target": t, "ready": t not in errors, "version": cfg.version if cfg is not None else None,
                     "error": errors.get(t, "")})
    return rows


def _source_line(mesh: Any) -> str:
    boot = mesh.bootstrap
    if boot is None:
        return f"node {mesh.node_id!r}, resources from a file"
    servers = ", ".join(s.server_uri for s in boot.xds_servers)
    return f"node {mesh.node_id!r}, xDS server {servers} ({boot.api_type})"


# -- the commands -------------------------------------------------------------------------------------


def _status(mesh: Any, targets: List[str], errors: Dict[str, str], args: argparse.Namespace) -> int:
    from .admin import resource_status

    rows = resource_status(mesh)
    tgt = _target_rows(mesh, targets, errors)
    nacked = [r for r in rows if r["status"] == "NACKED"]
    ident = mesh.identity()
    if args.json:
        _dump_json({"node": mesh.node_id, "identity": ident.as_dict() if ident is not None else None,
                    "targets": tgt, "resources": rows})
    else:
        print(_source_line(mesh))
        print(identity_line(ident))
        print()
        _table([(t["target"], "READY" if t["ready"] else "NOT READY", _unprefixed(t["error"], t["target"]))
                for t in tgt], ("TARGET", "STATE", "REASON"))
        print()
        _table([(r["type"], r["name"], r["version"], r["status"], _why(mesh, r)) for r in rows],
               ("TYPE", "NAME", "VERSION", "STATUS", "ERROR"))
        if nacked:
            print()
            print(f"{_plural(len(nacked), 'resource')} rejected (NACKED): see ERROR")
    return 1 if errors or nacked else 0


def identity_line(ident: Any) -> str:
    """One line on the workload identity mesh TLS presents (``Mesh.identity()``)."""
    if ident is None:
        return "identity: none (no workload certificates: mesh TLS clusters cannot be used)"
    if ident.generation == 0:
        return f"identity: UNAVAILABLE from {ident.source}: {one_line(ident.problem or '')}"
    who = ident.spiffe_id or (", ".join(ident.uri_sans + ident.dns_sans) or "(roots only)")
    text = f"identity: {who}, {_plural(ident.root_count, 'root')}"
    if ident.not_after is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ident.not_after))
        left = ident.seconds_left or 0.0
        text += f", expires {when} (in {_duration_text(left)})" if left > 0 else f", EXPIRED {when}"
    if ident.problem:
        text += f"; WARNING: {one_line(ident.problem)}"
    return text


def _duration_text(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def _unprefixed(text: str, name: str) -> str:
    """``text`` on one line without a leading ``name: `` (the table names it already)."""
    text = one_line(text)
    return text[len(name) + 2:] if name and text.startswith(f"{name}: ") else text


def _why(mesh: Any, row: Dict[str, Any]) -> str:
    """The ERROR cell: the rejection reason, or why a resource does not exist."""
    if row["error"]:
        return _unprefixed(row["error"], row["name"])
    if row["status"] == "DOES_NOT_EXIST":
        return "not in the resource file" if mesh.bootstrap is None else "the xDS server does not have it"
    return ""


def _config_dump(mesh: Any, targets: List[str], errors: Dict[str, str], args: argparse.Namespace) -> int:
    from .admin import short_type

    dump = mesh.config_dump(include_resources=not args.no_resources)
    if args.type:
        wanted = {t.upper() for t in args.type}
        dump["generic_xds_configs"] = [g for g in dump.get("generic_xds_configs", [])
                                       if short_type(g.get("type_url", "")) in wanted]
    _dump_json(dump)
    for why in errors.values():
        print(f"meshcore config-dump: {why}", file=sys.stderr)
    return 1 if errors else 0


def _clusters(mesh: Any, targets: List[str], errors: Dict[str, str], args: argparse.Namespace) -> int:
    from .admin import clusters

    data = clusters(mesh, targets)
    if args.json:
        _dump_json({"node": mesh.node_id, "targets": _target_rows(mesh, targets, errors), "clusters": data})
    else:
        print(_source_line(mesh))
        for why in errors.values():
            print(f"not ready: {why}")
        for c in data:
            print()
            extra = [c["type"], c["policy"]]
            if c["lb_options"]:
                extra.append(", ".join(f"{k}={v}" for k, v in c["lb_options"].items()))
            print(f"{c['name']}  ({'; '.join(x for x in extra if x)})  used by {', '.join(c['targets'])}")
            if c["children"]:
                print(f"  aggregate of {', '.join(c['children'])}")
            if c["outlier_detection"]:
                print("  outlier detection: " + ", ".join(f"{k}={v}" for k, v in c["outlier_detection"].items()))
            if c["stats"]:
                print("  stats: " + ", ".join(f"{k}={v}" for k, v in c["stats"].items()))
            if c["error"]:
                print(f"  error: {c['error']}")
            if c["endpoints"]:
                _table([(e["address"], e["health"], e["weight"], e["priority"], e["locality"] or "-",
                         "yes" if e["ejected"] else "no", e["active_requests"]) for e in c["endpoints"]],
                       ("ENDPOINT", "HEALTH", "WEIGHT", "PRIORITY", "LOCALITY", "EJECTED", "ACTIVE"), indent="  ")
            else:
                print("  no endpoints")
    return 1 if errors else 0


def _route(mesh: Any, targets: List[str], errors: Dict[str, str], args: argparse.Namespace) -> int:
    from .explain import explain_request, headers_from_args

    try:
        headers = headers_from_args(args.headers)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    try:
        result = explain_request(mesh, args.method.upper(), args.url, headers, target=targets[0],
                                 random_value=args.random_value)
        if result["outcome"] == "unavailable" and targets[0] in errors and "route" not in result:
            result["error"] = errors[targets[0]]
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        _dump_json(result)
    else:
        _print_route(result)
    return 0 if result["outcome"] in ("cluster", "direct_response", "redirect") else 1


def _print_route(x: Dict[str, Any]) -> None:
    req = x["request"]
    hdrs = "".join(f" -H '{k}: {v}'" for k, v in req["headers"])
    print(f"{req['method']} {req['url']}{hdrs}")
    rows: List[Tuple[str, str]] = [("target", req["target"] + (f" (authority {req['authority']})"
                                                              if req.get("authority") not in (None, req["target"])
                                                              else ""))]
    if "listener" in x:
        rows.append(("listener", f"{x['listener']} -> route configuration {x['route_configuration']}"))
    vh = x.get("virtual_host")
    if vh:
        rows.append(("virtual host", f"{vh['name']}: {vh['host']!r} matched domain {vh['domain']!r} ({vh['kind']})"))
    route = x.get("route")
    if route:
        rows.append(("route", f"#{route['index']} {route['name'] or '(unnamed)'}: {route['match']}"))
        for r in x.get("routes", [])[:route["index"] or 0]:
            rows.append(("", f"(#{r['index']} {r['name'] or '(unnamed)'} did not match: {r['match']})"))
    action = x.get("action")
    if action:
        rows.append(("action", _action_text(action)))
    cluster = x.get("cluster")
    if cluster and "policy" in cluster:
        size = _plural(cluster.get("endpoints", 0), "endpoint")
        rows.append(("cluster", f"{cluster['name']} ({cluster['type']}, {cluster['policy']}, {size}, "
                                f"{cluster.get('ejected', 0)} ejected)"))
        picked = cluster.get("picked")
        if picked:
            rows.append(("endpoint", f"{picked['address']} ({picked['health']}, weight {picked['weight']}, "
                                     f"priority {picked['priority']}, locality {picked['locality'] or '-'})"))
    if route:
        timeout = x.get("timeout")
        rows.append(("timeout", "disabled" if not timeout else f"{timeout:g} s"))
        rows.append(("retry policy", _retry_text(x.get("retry_policy"))))
        if x.get("hash") is not None:
            rows.append(("hash", f"{x['hash']:#018x}"))
        if x.get("path_rewrite"):
            rows.append(("path rewrite", x["path_rewrite"]))
        if x.get("host_rewrite"):
            rows.append(("host rewrite", x["host_rewrite"]))
    if x.get("error"):
        rows.append(("result", x["error"]))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _action_text(a: Dict[str, Any]) -> str:
    kind = a["kind"]
    if kind == "weighted_clusters":
        split = ", ".join(f"{c['cluster']} {c['weight']}" for c in a["clusters"])
        source = f"header {a['header']}" if a.get("header") else "random value"
        return f"weighted clusters {split}: {source} % {a['total']} = {a['selection']} -> {a['chosen']}"
    if kind == "cluster_header":
        return f"cluster from header {a['header']} -> {a['chosen']!r}"
    if kind == "direct_response":
        body = f", body {a['body']!r}" if a.get("body") else ""
        return f"direct response {a['status']}{body}"
    if kind == "redirect":
        return f"redirect {a['status']} to {a['location']}"
    return f"cluster {a['chosen']}"


def _retry_text(p: Optional[Dict[str, Any]]) -> str:
    if not p:
        return "none"
    text = f"retry_on {','.join(p['retry_on']) or '-'}, num_retries {p['num_retries']}"
    if p.get("per_try_timeout"):
        text += f", per_try_timeout {p['per_try_timeout']:g} s"
    if p.get("retriable_status_codes"):
        text += f", retriable_status_codes {p['retriable_status_codes']}"
    return text
