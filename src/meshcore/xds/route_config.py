"""RouteConfiguration (xDS v3) to meshcore's route model, with Envoy's validation.

:func:`route_config_spec` accepts an ``envoy.config.route.v3.RouteConfiguration`` message (or an
``Any`` holding one) or a proto3-JSON dict (camelCase or snake_case). Errors are
:class:`~meshcore.errors.ConfigError` naming the route configuration, and a field path that
names the virtual host and route (``virtual_hosts[vh-name].routes[route-name].match.safe_regex``).

Rejected (Envoy would NACK, or meshcore cannot decide like Envoy): duplicate domains, more than
one ``*``; a route without a path specifier; bad regexes and regexes whose RE2 program size is
over 100 (Envoy's default ``re2.max_program_size.error_level``); ``ignore_case`` on a
``safe_regex`` string matcher; ``weighted_clusters`` whose weights sum to 0 or over 2^32-1, or an
entry with both or neither of ``name``/``cluster_header``; direct response status outside
200..599 or a body from a file; ``connect_matcher``, ``path_match_policy``, ``tls_context``,
``dynamic_metadata``, ``filter_state`` matchers, cluster specifier plugins, the vhost
``matcher`` tree, ``path_rewrite_policy`` and ``filter_action`` (not supported yet).
"""

from __future__ import annotations

import hashlib
import threading

from typing import Any, Dict, List, Optional, Tuple

import re2
from envoy.config.route.v3 import route_components_pb2, route_pb2

from .._route_model import (
    DecoratorSpec,
    DirectResponseSpec,
    HashPolicySpec,
    HeaderMutation,
    HeaderMatchSpec,
    QueryMatchSpec,
    RedirectSpec,
    RetryPolicy,
    RouteConfigSpec,
    RouteSpec,
    StringMatchSpec,
    VirtualHostSpec,
    WeightedClusterSpec,
)
from .._routing import ascii_lower
from ..errors import ConfigError
from ._decode import _RE2_OPTIONS as _OPTIONS
from ._decode import MAX_PROGRAM_SIZE  # noqa: F401  (re-exported; lives in _decode with compile_regex)
from ._decode import MAX_DURATION_SECONDS, compile_regex, is_repeated, string_matcher, type_name
from .lb_config import _coerce

__all__ = ["check_pgv", "compile_regex", "route_config_spec"]

_UINT32_MAX = 0xFFFFFFFF
_REDIRECT_CODES = {0: 301, 1: 302, 2: 303, 3: 307, 4: 308}
_DENOMINATORS = {0: 100, 1: 10000, 2: 1000000}
_REQUIRE_TLS = {0: "NONE", 1: "EXTERNAL_ONLY", 2: "ALL"}


class _Ctx:
    __slots__ = ("resource",)

    def __init__(self, resource: str) -> None:
        self.resource = resource

    def error(self, where: str, reason: str) -> ConfigError:
        return ConfigError(self.resource, where, reason)


def _duration(d: Any) -> float:
    return d.seconds + d.nanos / 1e9


def _string_matcher(ctx: _Ctx, m: Any, where: str) -> StringMatchSpec:
    return string_matcher(m, ctx.resource, where)  # shared with cluster_config (_decode)


def _header_matcher(ctx: _Ctx, h: Any, where: str) -> HeaderMatchSpec:
    name = ascii_lower(h.name)
    if not name:
        raise ctx.error(where + ".name", "header name must not be empty")
    kind = h.WhichOneof("header_match_specifier")
    common = dict(invert=h.invert_match, treat_missing_as_empty=h.treat_missing_header_as_empty)
    if kind is None:
        return HeaderMatchSpec(name, "present", present=True, **common)
    if kind == "exact_match":
        if h.exact_match == "":
            return HeaderMatchSpec(name, "exact_any", **common)
        return HeaderMatchSpec(name, "string", StringMatchSpec("exact", h.exact_match), **common)
    if kind == "safe_regex_match":
        rx = compile_regex(h.safe_regex_match.regex, ctx.resource, where + ".safe_regex_match.regex")
        return HeaderMatchSpec(name, "string", StringMatchSpec("regex", h.safe_regex_match.regex, False, rx),
                               **common)
    if kind == "range_match":
        return HeaderMatchSpec(name, "range", range_start=h.range_match.start, range_end=h.range_match.end,
                               **common)
    if kind == "present_match":
        return HeaderMatchSpec(name, "present", present=h.present_match, **common)
    if kind in ("prefix_match", "suffix_match", "contains_match"):
        value = getattr(h, kind)
        if not value:
            raise ctx.error(f"{where}.{kind}", "value length must be at least 1")
        return HeaderMatchSpec(name, "string", StringMatchSpec(kind.split("_")[0], value), **common)
    if kind == "string_match":
        return HeaderMatchSpec(name, "string", _string_matcher(ctx, h.string_match, where + ".string_match"),
                               **common)
    raise ctx.error(f"{where}.{kind}", "unsupported header matcher")


def _query_matcher(ctx: _Ctx, q: Any, where: str) -> QueryMatchSpec:
    if not q.name:
        raise ctx.error(where + ".name", "query parameter name must not be empty")
    kind = q.WhichOneof("query_parameter_match_specifier")
    if kind == "string_match":
        return QueryMatchSpec(q.name, _string_matcher(ctx, q.string_match, where + ".string_match"))
    if kind == "present_match":
        return QueryMatchSpec(q.name, present=q.present_match)
    return QueryMatchSpec(q.name, present=True)


def _retry_policy(ctx: _Ctx, r: Any, where: str) -> RetryPolicy:
    retry_on = tuple(s.strip() for s in r.retry_on.split(",") if s.strip())
    back_off = r.retry_back_off if r.HasField("retry_back_off") else None
    base = 0.025
    max_interval = None
    if back_off is not None:
        if back_off.HasField("base_interval"):
            base = _duration(back_off.base_interval)
            if base <= 0:
                raise ctx.error(where + ".retry_back_off.base_interval", "must be greater than 0")
        if back_off.HasField("max_interval"):
            max_interval = _duration(back_off.max_interval)
            if max_interval < base:
                raise ctx.error(where + ".retry_back_off.max_interval",
                                "max_interval must be greater than or equal to the base_interval")
    return RetryPolicy(
        retry_on=retry_on,
        num_retries=r.num_retries.value if r.HasField("num_retries") else 1,
        per_try_timeout=_duration(r.per_try_timeout) if r.HasField("per_try_timeout") else None,
        per_try_idle_timeout=_duration(r.per_try_idle_timeout) if r.HasField("per_try_idle_timeout") else None,
        base_interval=base,
        max_interval=max_interval,
        retriable_status_codes=tuple(r.retriable_status_codes),
        retry_host_predicates=tuple(p.name for p in r.retry_host_predicate),
        host_selection_retry_max_attempts=r.host_selection_retry_max_attempts or 1,
    )


_APPEND_ACTIONS = {0: "append", 1: "add_if_absent", 2: "overwrite", 3: "overwrite_if_exists"}


def _mutations(ctx: _Ctx, adds: Any, removes: Any, where: str) -> Tuple[Tuple[HeaderMutation, ...], Tuple[str, ...]]:
    """request_headers_to_add / _to_remove. Values are literal (``%%`` is ``%``); Envoy's
    formatter commands (``%DOWNSTREAM_REMOTE_ADDRESS%``...) are kept as written."""
    out = []
    for i, opt in enumerate(adds):
        key = opt.header.key
        if not key:
            raise ctx.error(f"{where}.request_headers_to_add[{i}].header.key", "must not be empty")
        value = opt.header.value if opt.header.value else opt.header.raw_value.decode("utf-8", "replace")
        if opt.HasField("append"):
            action = "append" if opt.append.value else "overwrite"
        else:
            action = _APPEND_ACTIONS.get(opt.append_action, "append")
        out.append(HeaderMutation(ascii_lower(key), value.replace("%%", "%"), action, opt.keep_empty_value))
    return tuple(out), tuple(ascii_lower(n) for n in removes)


def _rewrite(ctx: _Ctx, rr: Any, where: str) -> Tuple[Any, str]:
    return (compile_regex(rr.pattern.regex, ctx.resource, where + ".pattern.regex"), rr.substitution)


def _hash_policy(ctx: _Ctx, h: Any, where: str) -> Optional[HashPolicySpec]:
    kind = h.WhichOneof("policy_specifier")
    if kind == "header":
        if not h.header.header_name:
            raise ctx.error(where + ".header.header_name", "must not be empty")
        rewrite = _rewrite(ctx, h.header.regex_rewrite, where + ".header.regex_rewrite") \
            if h.header.HasField("regex_rewrite") else None
        return HashPolicySpec("header", ascii_lower(h.header.header_name), h.terminal, rewrite)
    if kind == "cookie":
        ttl = _duration(h.cookie.ttl) if h.cookie.HasField("ttl") else None
        return HashPolicySpec("cookie", h.cookie.name, h.terminal, cookie_ttl=ttl, cookie_path=h.cookie.path)
    if kind == "connection_properties":
        if not h.connection_properties.source_ip:
            return None  # source_ip: false -> the policy is dropped (hash_policy.cc)
        return HashPolicySpec("source_ip", "", h.terminal)
    if kind == "query_parameter":
        if not h.query_parameter.name:
            raise ctx.error(where + ".query_parameter.name", "must not be empty")
        return HashPolicySpec("query_parameter", h.query_parameter.name, h.terminal)
    if kind == "filter_state":
        return None  # no filter state in process: never yields a hash
    raise ctx.error(where, "hash policy has no policy specifier")


_MATCH_UNSUPPORTED = frozenset({"tls_context", "dynamic_metadata", "filter_state", "connect_matcher",
                                "path_match_policy", "cel_expr"})
_ACTION_UNSUPPORTED = frozenset({"cluster_specifier_plugin", "inline_cluster_specifier_plugin",
                                 "path_rewrite_policy"})


def _filter_overrides(ctx: _Ctx, configs: Any, where: str) -> Dict[str, Any]:
    """``typed_per_filter_config`` -> {filter name: FaultSpec} for the fault filter; other
    filters' per-route configs are ignored (they configure filters meshcore does not run)."""
    from envoy.config.route.v3 import route_components_pb2 as rc
    from envoy.extensions.filters.http.fault.v3 import fault_pb2

    from ._decode import unpack
    from .listener_config import fault_spec

    out: Dict[str, Any] = {}
    for filter_name, any_ in configs.items():
        path = f"{where}.typed_per_filter_config[{filter_name}]"
        if any_.type_url.endswith("envoy.config.route.v3.FilterConfig"):
            wrapper = rc.FilterConfig()
            any_.Unpack(wrapper)
            if wrapper.disabled:
                out[filter_name] = None
                continue
            any_, path = wrapper.config, path + ".config"
        msg, _ = unpack(any_, {fault_pb2.HTTPFault.DESCRIPTOR.full_name: fault_pb2.HTTPFault}, ctx.resource, path)
        if msg is not None:
            out[filter_name] = fault_spec(msg, ctx.resource, path)
    return out


def _route(ctx: _Ctx, r: Any, index: int, vh_where: str, vh_retry: Optional[RetryPolicy],
           vh_overrides: Optional[Dict[str, Any]] = None) -> RouteSpec:
    # ListFields(): one protobuf call for all set fields (HasField per field costs far more).
    route_fields = {f.name: v for f, v in r.ListFields()}
    name = route_fields.get("name", "")
    where = f"{vh_where}.routes[{name or index}]"
    mw = where + ".match"
    mf = {f.name: v for f, v in route_fields["match"].ListFields()} if "match" in route_fields else {}
    for key in mf.keys() & _MATCH_UNSUPPORTED:
        raise ctx.error(f"{mw}.{key}", "unsupported route matcher")
    regex = None
    if "prefix" in mf:  # a oneof member set to "" is present, so it is listed
        path_kind, path_value = "prefix", mf["prefix"]
    elif "path" in mf:
        path_kind, path_value = "path", mf["path"]
    elif "safe_regex" in mf:
        path_kind, path_value = "regex", mf["safe_regex"].regex
        regex = compile_regex(path_value, ctx.resource, mw + ".safe_regex.regex")
    elif "path_separated_prefix" in mf:
        path_kind, path_value = "separated", mf["path_separated_prefix"]
        if "?" in path_value or "#" in path_value or path_value.endswith("/") or not path_value:
            raise ctx.error(mw + ".path_separated_prefix",
                            "must not be empty, end with '/' or contain '?' or '#'")
    else:
        raise ctx.error(mw, 'field "path_specifier" is required')
    runtime = None
    if "runtime_fraction" in mf:
        dv = mf["runtime_fraction"].default_value
        denom = _DENOMINATORS.get(dv.denominator)
        if denom is None:
            raise ctx.error(mw + ".runtime_fraction.default_value.denominator", "unknown denominator")
        runtime = (dv.numerator, denom)
    headers: Tuple[HeaderMatchSpec, ...] = ()
    if "headers" in mf:
        headers = tuple(_header_matcher(ctx, h, f"{mw}.headers[{i}]") for i, h in enumerate(mf["headers"]))
    query: Tuple[QueryMatchSpec, ...] = ()
    if "query_parameters" in mf:
        query = tuple(_query_matcher(ctx, q, f"{mw}.query_parameters[{i}]")
                      for i, q in enumerate(mf["query_parameters"]))
    fields: Dict[str, Any] = dict(
        name=name, index=index, path_kind=path_kind, path_value=path_value,
        case_sensitive=mf["case_sensitive"].value if "case_sensitive" in mf else True,
        regex=regex, headers=headers, query=query, runtime_fraction=runtime, grpc="grpc" in mf,
    )
    if "request_headers_to_add" in route_fields or "request_headers_to_remove" in route_fields:
        fields["headers_to_add"], fields["headers_to_remove"] = _mutations(
            ctx, route_fields.get("request_headers_to_add", ()), route_fields.get("request_headers_to_remove", ()),
            where)
    if "route" in route_fields:
        _route_action(ctx, route_fields["route"], where + ".route", fields, vh_retry)
    elif "redirect" in route_fields:
        fields["action"] = "redirect"
        fields["redirect"] = _redirect(ctx, route_fields["redirect"], where + ".redirect")
        fields["timeout"] = None
    elif "direct_response" in route_fields:
        d = route_fields["direct_response"]
        if not 200 <= d.status <= 599:
            raise ctx.error(where + ".direct_response.status", f"must be in [200, 599], got {d.status}")
        body = ""
        if d.HasField("body"):
            src = d.body.WhichOneof("specifier")
            if src == "inline_string":
                body = d.body.inline_string
            elif src == "inline_bytes":
                body = d.body.inline_bytes.decode("utf-8", "replace")
            elif src is not None:
                raise ctx.error(f"{where}.direct_response.body.{src}", "only inline bodies are supported")
        if len(body.encode()) > 4096:
            raise ctx.error(where + ".direct_response.body", "body is larger than 4096 bytes")
        fields["action"] = "direct"
        fields["direct_response"] = DirectResponseSpec(d.status, body)
        fields["timeout"] = None
    else:
        action = r.WhichOneof("action")
        raise ctx.error(f"{where}.{action or 'action'}", "unsupported route action" if action else "route has no action")
    if "decorator" in route_fields:
        d = route_fields["decorator"]
        if not d.operation:  # PGV min_len 1 (said here, before the generic check, with the route's path)
            raise ctx.error(where + ".decorator.operation", "value length must be at least 1 characters")
        fields["decorator"] = DecoratorSpec(d.operation, d.propagate.value if d.HasField("propagate") else True)
    overrides = dict(vh_overrides or {})
    if "typed_per_filter_config" in route_fields:
        overrides.update(_filter_overrides(ctx, r.typed_per_filter_config, where))
    if overrides:
        fields["filter_overrides"] = tuple(sorted(overrides.items()))
    return RouteSpec(**fields)


def _route_action(ctx: _Ctx, a: Any, where: str, fields: Dict[str, Any], vh_retry: Optional[RetryPolicy]) -> None:
    af = {f.name: v for f, v in a.ListFields()}
    for key in af.keys() & _ACTION_UNSUPPORTED:
        raise ctx.error(f"{where}.{key}", "unsupported")
    if "cluster" in af:
        fields["action"] = "cluster"
        fields["cluster"] = af["cluster"]
    elif "cluster_header" in af:
        fields["action"] = "cluster_header"
        fields["cluster_header"] = ascii_lower(af["cluster_header"])
    elif "weighted_clusters" in af:
        w = af["weighted_clusters"]
        entries: List[WeightedClusterSpec] = []
        total = 0
        for i, c in enumerate(w.clusters):
            cw = f"{where}.weighted_clusters.clusters[{c.name or i}]"
            if bool(c.name) == bool(c.cluster_header):
                raise ctx.error(cw, "exactly one of name and cluster_header must be set")
            weight = c.weight.value if c.HasField("weight") else 0
            total += weight
            adds, removes = _mutations(ctx, c.request_headers_to_add, c.request_headers_to_remove, cw)
            entries.append(WeightedClusterSpec(c.name, ascii_lower(c.cluster_header), weight, c.host_rewrite_literal,
                                               adds, removes))
        if not entries:
            raise ctx.error(where + ".weighted_clusters.clusters", "must have at least 1 item")
        if total == 0:
            raise ctx.error(where + ".weighted_clusters", "sum of weights must be greater than 0")
        if total > _UINT32_MAX:
            raise ctx.error(where + ".weighted_clusters", f"sum of weights {total} exceeds 4294967295")
        fields["action"] = "weighted"
        fields["weighted"] = tuple(entries)
        fields["weighted_total"] = total
        fields["weighted_header"] = ascii_lower(w.header_name)
    else:
        spec = a.WhichOneof("cluster_specifier")
        if spec == "cluster":
            raise ctx.error(where + ".cluster", "value length must be at least 1")
        raise ctx.error(f"{where}.{spec or 'cluster_specifier'}",
                        "unsupported cluster specifier" if spec else "cluster specifier is required")
    code = af.get("cluster_not_found_response_code", 0)
    fields["cluster_not_found_response_code"] = {0: 503, 1: 404, 2: 500}.get(code, 503)
    if "timeout" in af:
        fields["timeout"] = _duration(af["timeout"]) or None
    else:
        fields["timeout"] = 15.0
    if "retry_policy" in af:
        fields["retry_policy"] = _retry_policy(ctx, af["retry_policy"], where + ".retry_policy")
    else:
        fields["retry_policy"] = vh_retry
    if "hash_policy" in af:
        hashes = []
        for i, h in enumerate(af["hash_policy"]):
            hp = _hash_policy(ctx, h, f"{where}.hash_policy[{i}]")
            if hp is not None:
                hashes.append(hp)
        fields["hash_policies"] = tuple(hashes)
    if "prefix_rewrite" in af and "regex_rewrite" in af:
        raise ctx.error(where + ".regex_rewrite", "prefix_rewrite and regex_rewrite are mutually exclusive")
    if "prefix_rewrite" in af:
        fields["prefix_rewrite"] = af["prefix_rewrite"]
    if "regex_rewrite" in af:
        fields["regex_rewrite"] = _rewrite(ctx, af["regex_rewrite"], where + ".regex_rewrite")
    if "host_rewrite_literal" in af:
        fields["host_rewrite_literal"] = af["host_rewrite_literal"]


def _redirect(ctx: _Ctx, r: Any, where: str) -> RedirectSpec:
    scheme = ""
    which = r.WhichOneof("scheme_rewrite_specifier")
    if which == "https_redirect" and r.https_redirect:
        scheme = "https"
    elif which == "scheme_redirect":
        scheme = r.scheme_redirect  # used verbatim by Envoy
    path_which = r.WhichOneof("path_rewrite_specifier")
    path = r.path_redirect if path_which == "path_redirect" else ""
    prefix = (r.prefix_rewrite or None) if path_which == "prefix_rewrite" else None  # "": no rewrite
    regex = _rewrite(ctx, r.regex_rewrite, where + ".regex_rewrite") if path_which == "regex_rewrite" else None
    return RedirectSpec(scheme=scheme, host=r.host_redirect, port=r.port_redirect, path=path,
                        prefix_rewrite=prefix, regex_rewrite=regex,
                        response_code=_REDIRECT_CODES.get(r.response_code, 301), strip_query=r.strip_query)


#: per route configuration name, the virtual hosts of its last decoded version by a digest of their
#: serialized message (a virtual host's spec depends on its message alone): a new version of a large
#: Istio route configuration re-decodes only the virtual hosts that changed
_VHOST_CACHE: Dict[str, Dict[bytes, VirtualHostSpec]] = {}
_VHOST_CACHE_NAMES = 256
_VHOST_LOCK = threading.Lock()


def route_config_spec(route_configuration: Any) -> RouteConfigSpec:
    """Validate and convert a RouteConfiguration; raise ``ConfigError`` naming the field."""
    rc = _coerce(route_configuration, route_pb2.RouteConfiguration, "name", "RouteConfiguration")
    ctx = _Ctx(rc.name or "RouteConfiguration")
    for unsupported in ("cluster_specifier_plugins",):
        if len(getattr(rc, unsupported)):
            raise ctx.error(unsupported, "unsupported")
    seen_domains: Dict[str, str] = {}
    vhosts: List[VirtualHostSpec] = []
    fresh: List[Tuple[bytes, Any, str, VirtualHostSpec]] = []  # decoded here, PGV-checked below
    previous = _VHOST_CACHE.get(rc.name) or {}
    kept: Dict[bytes, VirtualHostSpec] = {}
    names = set()
    for vi, vh in enumerate(rc.virtual_hosts):
        vh_where = f"virtual_hosts[{vh.name or vi}]"
        if not vh.name:
            raise ctx.error(vh_where + ".name", "virtual host name must not be empty")
        if vh.name in names:
            raise ctx.error(vh_where + ".name", f"duplicate virtual host name {vh.name!r}")
        names.add(vh.name)
        if not len(vh.domains):
            raise ctx.error(vh_where + ".domains", "must have at least 1 item")
        if vh.HasField("matcher"):
            raise ctx.error(vh_where + ".matcher", "the matcher tree is not supported")
        domains = []
        for d in vh.domains:
            if not d:
                raise ctx.error(vh_where + ".domains", "domain must not be empty")
            key = ascii_lower(d)
            if key in seen_domains:
                raise ctx.error(
                    vh_where + ".domains",
                    f"Only unique values for domains are permitted. Duplicate entry of domain {key} "
                    f"in route {rc.name}",
                )
            seen_domains[key] = vh.name
            domains.append(key)
        digest = hashlib.blake2b(vh.SerializeToString(deterministic=True), digest_size=16).digest()
        cached = previous.get(digest)
        if cached is not None:  # decoded and checked in this route configuration's last version
            vhosts.append(cached)
            kept[digest] = cached
            continue
        vh_retry = _retry_policy(ctx, vh.retry_policy, vh_where + ".retry_policy") \
            if vh.HasField("retry_policy") else None
        vh_overrides = _filter_overrides(ctx, vh.typed_per_filter_config, vh_where) \
            if len(vh.typed_per_filter_config) else None
        routes = tuple(_route(ctx, r, i, vh_where, vh_retry, vh_overrides) for i, r in enumerate(vh.routes))
        vh_adds, vh_removes = _mutations(ctx, vh.request_headers_to_add, vh.request_headers_to_remove, vh_where)
        fresh.append((digest, vh, vh_where, VirtualHostSpec(
            vh.name, tuple(domains), routes, _REQUIRE_TLS.get(vh.require_tls, "NONE"), vh_retry, vh_adds, vh_removes)))
        vhosts.append(fresh[-1][3])
    rc_adds, rc_removes = _mutations(ctx, rc.request_headers_to_add, rc.request_headers_to_remove, "")
    # PGV after the checks above, whose messages are more specific: the configuration without its
    # virtual hosts, then each virtual host not seen before (a large Istio route configuration whose
    # one VirtualService changed re-checks that one virtual host only)
    if len(rc.virtual_hosts):
        top = route_pb2.RouteConfiguration()
        top.CopyFrom(rc)
        del top.virtual_hosts[:]
        check_pgv(top, ctx.resource)
    else:
        check_pgv(rc, ctx.resource)
    for digest, vh, vh_where, spec in fresh:
        check_pgv(vh, ctx.resource, vh_where)
    for digest, vh, vh_where, spec in fresh:
        kept[digest] = spec
    with _VHOST_LOCK:  # only this version's virtual hosts stay: memory follows the live configuration
        _VHOST_CACHE.pop(rc.name, None)
        if len(_VHOST_CACHE) >= _VHOST_CACHE_NAMES:
            del _VHOST_CACHE[next(iter(_VHOST_CACHE))]  # the least recently decoded name
        _VHOST_CACHE[rc.name] = kept
    return RouteConfigSpec(
        name=rc.name,
        virtual_hosts=tuple(vhosts),
        ignore_port_in_host_matching=rc.ignore_port_in_host_matching,
        ignore_path_parameters_in_path_matching=rc.ignore_path_parameters_in_path_matching,
        vhost_header=ascii_lower(rc.vhost_header),
        headers_to_add=rc_adds,
        headers_to_remove=rc_removes,
        most_specific_header_mutations_wins=rc.most_specific_header_mutations_wins,
    )


# -- Envoy's proto validation (PGV) and duration checks, from the descriptors' annotations ----------

_DURATION = "google.protobuf.Duration"
_ANY = "google.protobuf.Any"
_NO_NUL_CR_LF = re2.compile(r"^[^\x00\n\r]*$", _OPTIONS)
_HEADER_NAME_STRICT = re2.compile(r"^:?[0-9a-zA-Z!#$%&'*+\-.^_|~`]+$", _OPTIONS)
_HEADER_VALUE_STRICT = re2.compile(r"^[^\x00-\x08\x0A-\x1F\x7F]*$", _OPTIONS)
_PATTERNS: Dict[str, Any] = {}
_RULES: Dict[str, Any] = {}
_NUMERIC = ("uint32", "uint64", "int32", "int64", "sint32", "sint64", "fixed32", "fixed64", "sfixed32",
            "sfixed64", "double", "float")
_WRAPPER_RULES = {"google.protobuf.UInt32Value": "uint32", "google.protobuf.UInt64Value": "uint64",
                  "google.protobuf.Int32Value": "int32", "google.protobuf.Int64Value": "int64",
                  "google.protobuf.DoubleValue": "double", "google.protobuf.FloatValue": "float",
                  "google.protobuf.StringValue": "string", "google.protobuf.BoolValue": "bool"}
# Repeated messages named by their ``name`` in field paths (as the decoders name them).
_NAMED_ITEMS = frozenset({"envoy.config.route.v3.VirtualHost", "envoy.config.route.v3.Route",
                          "envoy.config.route.v3.WeightedCluster.ClusterWeight"})


class _TypeRules:
    """What :class:`_Pgv` checks on one message type: rules by field name, the fields checked
    even when unset (non-oneof scalars with rules, repeated fields with ``min_items``, required
    messages) and the required oneofs."""

    __slots__ = ("by_name", "always", "required", "oneofs")

    def __init__(self, desc: Any) -> None:
        from validate import validate_pb2

        self.by_name: Dict[str, Any] = {}
        self.always: List[Tuple[Any, Any]] = []
        self.required: List[str] = []
        for f in desc.fields:
            opts = f.GetOptions()
            if not opts.HasExtension(validate_pb2.rules):
                continue
            r = opts.Extensions[validate_pb2.rules]
            self.by_name[f.name] = r
            kind = r.WhichOneof("type")
            if is_repeated(f):
                if kind == "repeated" and r.repeated.min_items > 0:
                    self.always.append((f, r))
            elif f.message_type is not None:
                if kind is not None and getattr(getattr(r, kind), "required", False):
                    self.required.append(f.name)
            elif f.containing_oneof is None and kind is not None:
                self.always.append((f, r))
        self.oneofs = [o.name for o in desc.oneofs
                       if o.GetOptions().HasExtension(validate_pb2.required)
                       and o.GetOptions().Extensions[validate_pb2.required]]


def _rules_of(desc: Any) -> _TypeRules:
    rules = _RULES.get(desc.full_name)
    if rules is None:
        rules = _RULES[desc.full_name] = _TypeRules(desc)
    return rules


def _pattern(p: str) -> Any:
    compiled = _PATTERNS.get(p)
    if compiled is None:
        compiled = _PATTERNS[p] = re2.compile(p, _OPTIONS)
    return compiled


def _dur(d: Any) -> Tuple[int, int]:
    return (d.seconds, d.nanos)


def _fmt_dur(d: Any) -> str:
    return f"{d.seconds + d.nanos / 1e9:g}s"


class _Pgv:
    """Applies the PGV rules Envoy's generated validators apply (string lengths, well-known
    header regexes, patterns, defined enums, numeric and duration bounds, required fields and
    oneofs, item counts) and Envoy's check of every Duration (non-negative, in range). The first
    violation is a ConfigError naming the field; descends into Any payloads of registered types."""

    def __init__(self, resource: str) -> None:
        self.resource = resource

    def fail(self, path: str, reason: str) -> ConfigError:
        return ConfigError(self.resource, path, reason)

    def message(self, msg: Any, path: str, depth: int = 0) -> None:
        desc = msg.DESCRIPTOR
        if depth > 64:
            return
        name = desc.full_name
        if name == _DURATION:
            self.duration_range(msg, path)
            return
        if name == _ANY:
            self.any(msg, path, depth)
            return
        if name.startswith("google.protobuf."):
            return
        rules = _rules_of(desc)
        for oneof in rules.oneofs:
            if msg.WhichOneof(oneof) is None:
                raise self.fail(_at(path, oneof), f'field "{oneof}" is required (one of its members must be set)')
        for name in rules.required:
            if not msg.HasField(name):
                raise self.fail(_at(path, name), "value is required")
        for f, r in rules.always:
            value = getattr(msg, f.name)
            if is_repeated(f):
                if len(value) < r.repeated.min_items:
                    raise self.fail(_at(path, f.name), f"value must contain at least {r.repeated.min_items} item(s)")
            else:
                self.scalar(f, r, r.WhichOneof("type"), value, _at(path, f.name))
        by_name = rules.by_name
        for f, value in msg.ListFields():
            r = by_name.get(f.name)
            repeated = is_repeated(f)
            if not repeated and f.message_type is None and (r is None or f.containing_oneof is None):
                continue  # no rules, or checked above
            sub = _at(path, f.name)
            if not repeated:
                self.value(f, r, value, sub, depth)
                continue
            if f.message_type is not None and f.message_type.GetOptions().map_entry:
                self.map(f, r, value, sub, depth)
                continue
            items = None
            if r is not None and r.WhichOneof("type") == "repeated":
                rr = r.repeated
                n = len(value)
                if rr.HasField("max_items") and n > rr.max_items:
                    raise self.fail(sub, f"value must contain no more than {rr.max_items} item(s)")
                if rr.unique and f.message_type is None and len(set(value)) != n:
                    raise self.fail(sub, "repeated value must contain unique items")
                items = rr.items if rr.HasField("items") else None
            if f.message_type is None and items is None:
                continue
            named = f.message_type is not None and f.message_type.full_name in _NAMED_ITEMS
            for i, item in enumerate(value):
                key = (item.name or i) if named else i
                self.value(f, items, item, f"{sub}[{key}]", depth)

    def map(self, f: Any, r: Any, value: Any, path: str, depth: int) -> None:
        vf = f.message_type.fields_by_name["value"]
        mr = r.map if r is not None and r.WhichOneof("type") == "map" else None
        if mr is not None:
            if mr.HasField("min_pairs") and len(value) < mr.min_pairs:
                raise self.fail(path, f"value must contain at least {mr.min_pairs} pair(s)")
            if mr.HasField("max_pairs") and len(value) > mr.max_pairs:
                raise self.fail(path, f"value must contain no more than {mr.max_pairs} pair(s)")
        kf = f.message_type.fields_by_name["key"]
        for key in value:
            sub = f"{path}[{key}]"
            if mr is not None and mr.HasField("keys"):
                self.value(kf, mr.keys, key, sub, depth)
            self.value(vf, mr.values if mr is not None and mr.HasField("values") else None, value[key], sub, depth)

    def value(self, f: Any, r: Any, value: Any, path: str, depth: int) -> None:
        kind = r.WhichOneof("type") if r is not None else None
        mt = f.message_type
        if mt is not None:
            wrapped = _WRAPPER_RULES.get(mt.full_name)
            if wrapped is not None and kind == wrapped:
                self.scalar(f, r, kind, value.value, path)
            elif kind == "duration":
                self.duration(r.duration, value, path)
            elif kind == "any":
                ar = r.any
                if getattr(ar, 'in') and value.type_url not in getattr(ar, 'in'):
                    raise self.fail(path, f"type URL must be in list {list(getattr(ar, 'in'))}")
                if ar.not_in and value.type_url in ar.not_in:
                    raise self.fail(path, f"type URL must not be in list {list(ar.not_in)}")
            self.message(value, path, depth + 1)
            return
        if kind is not None:
            self.scalar(f, r, kind, value, path)

    def scalar(self, f: Any, r: Any, kind: str, value: Any, path: str) -> None:
        if kind == "string":
            self.string(r.string, value, path)
        elif kind == "enum":
            er = r.enum
            if er.defined_only and f.enum_type is not None and value not in f.enum_type.values_by_number:
                raise self.fail(path, f"value must be one of the defined enum values (got {value})")
            if getattr(er, 'in') and value not in getattr(er, 'in'):
                raise self.fail(path, f"value must be in list {list(getattr(er, 'in'))}")
            if er.not_in and value in er.not_in:
                raise self.fail(path, f"value must not be in list {list(er.not_in)}")
        elif kind in _NUMERIC:
            nr = getattr(r, kind)
            for rule, ok, text in (("const", lambda b: value == b, "equal"),
                                   ("lt", lambda b: value < b, "less than"),
                                   ("lte", lambda b: value <= b, "less than or equal to"),
                                   ("gt", lambda b: value > b, "greater than"),
                                   ("gte", lambda b: value >= b, "greater than or equal to")):
                if nr.HasField(rule) and not ok(getattr(nr, rule)):
                    raise self.fail(path, f"value must be {text} {getattr(nr, rule)} (got {value})")
            if getattr(nr, 'in') and value not in getattr(nr, 'in'):
                raise self.fail(path, f"value must be in list {list(getattr(nr, 'in'))}")

    def string(self, sr: Any, value: str, path: str) -> None:
        if sr.HasField("min_len") and len(value) < sr.min_len:
            raise self.fail(path, f"value length must be at least {sr.min_len} characters")
        if sr.HasField("max_len") and len(value) > sr.max_len:
            raise self.fail(path, f"value length must be at most {sr.max_len} characters")
        if sr.HasField("min_bytes") or sr.HasField("max_bytes"):
            size = len(value.encode("utf-8", "surrogatepass"))
            if sr.HasField("min_bytes") and size < sr.min_bytes:
                raise self.fail(path, f"value length must be at least {sr.min_bytes} bytes")
            if sr.HasField("max_bytes") and size > sr.max_bytes:
                raise self.fail(path, f"value length must be at most {sr.max_bytes} bytes")
        which = sr.WhichOneof("well_known")
        if which == "well_known_regex":
            strict = sr.strict if sr.HasField("strict") else True
            header_name = sr.well_known_regex == 1  # HTTP_HEADER_NAME (2: HTTP_HEADER_VALUE)
            if sr.well_known_regex in (1, 2):
                rx = _NO_NUL_CR_LF if not strict else (_HEADER_NAME_STRICT if header_name else _HEADER_VALUE_STRICT)
                if value and rx.search(value) is None:
                    raise self.fail(path, f"value does not match regex pattern {rx.pattern!r} (got {value!r})")
        if sr.HasField("pattern") and _pattern(sr.pattern).search(value) is None:
            raise self.fail(path, f"value does not match regex pattern {sr.pattern!r} (got {value!r})")
        if sr.prefix and not value.startswith(sr.prefix):
            raise self.fail(path, f"value does not have prefix {sr.prefix!r}")
        if getattr(sr, 'in') and value not in getattr(sr, 'in'):
            raise self.fail(path, f"value must be in list {list(getattr(sr, 'in'))}")

    def duration(self, dr: Any, d: Any, path: str) -> None:
        v = _dur(d)
        for rule, ok, text in (("const", lambda b: v == b, "equal to"),
                               ("lt", lambda b: v < b, "less than"),
                               ("lte", lambda b: v <= b, "less than or equal to"),
                               ("gt", lambda b: v > b, "greater than"),
                               ("gte", lambda b: v >= b, "greater than or equal to")):
            if dr.HasField(rule) and not ok(_dur(getattr(dr, rule))):
                raise self.fail(path, f"value must be {text} {_fmt_dur(getattr(dr, rule))}")

    def duration_range(self, d: Any, path: str) -> None:
        if d.seconds < 0 or d.nanos < 0:
            raise self.fail(path, "Invalid duration: Expected positive duration")
        if d.nanos > 999_999_999 or d.seconds > MAX_DURATION_SECONDS:
            raise self.fail(path, "Invalid duration: Duration out-of-range")

    def any(self, msg: Any, path: str, depth: int) -> None:
        from google.protobuf import descriptor_pool, message_factory

        if not msg.type_url:
            return
        try:
            desc = descriptor_pool.Default().FindMessageTypeByName(type_name(msg.type_url))
        except KeyError:
            return  # a type meshcore has no protos for: its users decide
        inner = message_factory.GetMessageClass(desc)()
        try:
            inner.ParseFromString(msg.value)
        except Exception:  # noqa: BLE001 -- undecodable payloads are their decoders' errors
            return
        self.message(inner, path, depth + 1)


def _at(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def check_pgv(message: Any, resource: str, prefix: str = "") -> None:
    """Raise ``ConfigError(resource, field, reason)`` for the first violation of Envoy's proto
    validation (PGV annotations) or duration range check in ``message`` (see :class:`_Pgv`)."""
    _Pgv(resource).message(message, prefix)


_ = route_components_pb2  # registers the route component messages used above
