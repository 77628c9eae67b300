"""RBAC filter configurations -> validated, protobuf-free rule trees (what :mod:`.compiler` turns
into code).

Accepted inputs (:func:`filter_configs`, :func:`per_route_config`): ``envoy.extensions.filters.
http.rbac.v3.RBAC`` / ``RBACPerRoute`` messages, an ``Any`` (or ``TypedStruct``) holding one,
their proto3-JSON dicts, ``HttpFilter`` messages or dicts (``name`` + ``typed_config``), and
``(name, config)`` pairs; per route also ``envoy.config.route.v3.FilterConfig`` and ``None``
(the filter disabled on the route).

What gRPC A41 (and grpc-go's ``internal/xds/rbac``) rejects is a :class:`~meshcore.errors.
ConfigError` naming the field, so a listener carrying it is NACKed: ``Policy.condition`` /
``checked_condition`` (CEL), ``Permission.matcher`` and ``uri_template``, ``Principal.
filter_state`` and ``custom``, the filter-level unified matchers ``matcher`` /
``shadow_matcher``, and a header matcher on ``:scheme`` or a ``grpc-`` header. Envoy's own
proto and constructor checks are applied too (a policy needs a permission and a principal,
``any`` must be true, ports and CIDRs in range, non-empty prefix/suffix/contains, RE2 syntax
and program size), so meshcore never accepts what Envoy would refuse.

``metadata`` and ``sourced_metadata`` never match (``invert`` -> always): gRPC has no Envoy
dynamic metadata, and nothing in meshcore writes any.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .._route_model import StringMatchSpec
from .._routing import ascii_lower
from ..errors import ConfigError

__all__ = [
    "ALLOW", "DENY", "LOG", "HeaderMatch", "Node", "PolicySpec", "RulesSpec", "FilterSpec", "RouteOverride",
    "filter_configs", "per_route_config", "rules_spec", "cidr_key",
]

logger = logging.getLogger(__name__)

ALLOW, DENY, LOG = "ALLOW", "DENY", "LOG"
_ACTIONS = {0: ALLOW, 1: DENY, 2: LOG}

RBAC_TYPE = "envoy.extensions.filters.http.rbac.v3.RBAC"
RBAC_PER_ROUTE_TYPE = "envoy.extensions.filters.http.rbac.v3.RBACPerRoute"
_HTTP_FILTER_TYPE = "envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter"
_FILTER_CONFIG_TYPE = "envoy.config.route.v3.FilterConfig"

#: A rule tree node: ``("any",)``, ``("never",)``, ``("and", nodes)``, ``("or", nodes)``,
#: ``("not", node)``, ``("path", StringMatchSpec)`` (url_path), ``("sni", StringMatchSpec)``,
#: ``("header", HeaderMatch)``, ``("auth", StringMatchSpec | None)``,
#: ``("ip", "source" | "direct" | "remote" | "destination", (mask, net))``, ``("port", n)``,
#: ``("port_range", start, end)``.
Node = Tuple[Any, ...]

ANY: Node = ("any",)
NEVER: Node = ("never",)

#: Envoy's ``HTTP_HEADER_NAME`` well-known regex with ``strict: false``: no NUL, CR or LF.
_BAD_HEADER_NAME_CHARS = ("\x00", "\r", "\n")


@dataclass(frozen=True)
class HeaderMatch:
    """One ``config.route.v3.HeaderMatcher`` (name lower-cased, ``host`` -> ``:authority``).

    ``kind``: ``string`` (``string``: the matcher), ``any_value`` (the legacy ``exact_match: ""``,
    which Envoy matches against any present value), ``present`` (``present``: the wanted
    presence), ``range`` (``[start, end)`` of a decimal int64 value).
    """

    name: str
    kind: str
    string: Optional[StringMatchSpec] = None
    present: bool = True
    start: int = 0
    end: int = 0
    invert: bool = False
    treat_missing_as_empty: bool = False


@dataclass(frozen=True)
class PolicySpec:
    name: str
    permissions: Node  # an "or" over the policy's permissions (simplified)
    principals: Node


@dataclass(frozen=True)
class RulesSpec:
    """``config.rbac.v3.RBAC``: the action and the policies in Envoy's order (byte order of names)."""

    action: str
    policies: Tuple[PolicySpec, ...]


@dataclass(frozen=True)
class FilterSpec:
    """One RBAC HTTP filter: its enforced and shadow rules (None: no such engine), the stat
    prefixes (also the prefixes of its dynamic-metadata keys), and whether it runs only where a
    route enables it (``HttpFilter.disabled``)."""

    name: str
    rules: Optional[RulesSpec]
    shadow_rules: Optional[RulesSpec]
    rules_stat_prefix: str = ""
    shadow_rules_stat_prefix: str = ""
    disabled: bool = False


@dataclass(frozen=True)
class RouteOverride:
    """``RBACPerRoute`` for one filter: ``filter`` None means the filter does not run on the
    route (``FilterConfig.disabled``, or a ``None`` override); an RBACPerRoute whose ``rbac`` is
    absent is a filter with no engines, which also lets every request through."""

    filter: Optional[FilterSpec]


# -- inputs -----------------------------------------------------------------------------------


def _messages() -> Dict[str, Any]:
    from envoy.config.route.v3 import route_components_pb2
    from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

    return {
        RBAC_TYPE: rbac_pb2.RBAC,
        RBAC_PER_ROUTE_TYPE: rbac_pb2.RBACPerRoute,
        _HTTP_FILTER_TYPE: hcm.HttpFilter,
        _FILTER_CONFIG_TYPE: route_components_pb2.FilterConfig,
    }


def _type_name(type_url: Any) -> str:
    return type_url.rpartition("/")[2] if isinstance(type_url, str) else ""


def _from_any(any_: Any, wanted: Sequence[str], resource: str, where: str) -> Tuple[Any, str]:
    from ..xds._decode import unpack

    classes = _messages()
    msg, name = unpack(any_, {n: classes[n] for n in wanted}, resource, where)
    if msg is None:
        raise ConfigError(resource, where, f"expected {' or '.join(wanted)}, got {name or any_.type_url!r}")
    return msg, name


def _known_anys(node: Any, depth: int = 0) -> Any:
    """``node`` with every ``Any`` whose type the protobuf pool does not know replaced by an
    ``Empty``: in an RBAC config those sit only in fields meshcore rejects (uri_template,
    matcher, custom) or ignores (audit loggers), so the NACK can name the field instead of
    failing on the type."""
    if depth > 200:
        return node
    if isinstance(node, Mapping):
        t = node.get("@type")
        if isinstance(t, str) and depth:
            from google.protobuf import descriptor_pool, empty_pb2

            try:
                descriptor_pool.Default().FindMessageTypeByName(_type_name(t))
            except KeyError:  # the placeholder (importing empty_pb2 registers it)
                return {"@type": "type.googleapis.com/" + empty_pb2.Empty.DESCRIPTOR.full_name}
        return {k: _known_anys(v, depth + 1) for k, v in node.items()}
    if isinstance(node, list):
        return [_known_anys(v, depth + 1) for v in node]
    return node


def _from_dict(data: Mapping[str, Any], type_name: str, resource: str, where: str) -> Any:
    from google.protobuf import json_format

    cls = _messages()[type_name]
    body = dict(data)
    declared = body.pop("@type", None)
    if declared is not None and _type_name(declared) != type_name:
        raise ConfigError(resource, where + ".@type", f"expected {type_name}, got {declared!r}")
    for attempt in (0, 1):
        msg = cls()
        try:
            json_format.ParseDict(body, msg)
            return msg
        except RecursionError:
            raise ConfigError(resource, where, f"invalid {type_name}: nested too deep") from None
        except (json_format.ParseError, TypeError, ValueError, AttributeError) as e:
            if attempt:
                raise ConfigError(resource, where, f"invalid {type_name}: {e}") from None
            body = _known_anys(body)  # an Any of an unknown type? then the validation names its field
    raise AssertionError("unreachable")  # pragma: no cover


def _coerce(obj: Any, wanted: Sequence[str], resource: str, where: str) -> Tuple[Any, str]:
    """A message of one of the ``wanted`` types (and its type name) from a message, an Any or a
    dict (a dict's ``@type`` picks the type; without one, the first wanted type)."""
    from google.protobuf import any_pb2
    from google.protobuf import message as _message

    if isinstance(obj, any_pb2.Any):
        return _from_any(obj, wanted, resource, where)
    if isinstance(obj, _message.Message):
        name = obj.DESCRIPTOR.full_name
        if name not in wanted:
            raise TypeError(f"expected a {' or '.join(wanted)} message, got {name}")
        cls = _messages()[name]
        if type(obj) is not cls:  # the same message from another generated module
            msg = cls()
            msg.ParseFromString(obj.SerializeToString())
            return msg, name
        return obj, name
    if isinstance(obj, Mapping):
        declared = _type_name(obj.get("@type"))
        name = declared if declared in wanted else wanted[0]
        if declared and declared not in wanted:
            raise ConfigError(resource, where + ".@type", f"expected {' or '.join(wanted)}, got {obj.get('@type')!r}")
        return _from_dict(obj, name, resource, where), name
    raise TypeError(f"expected a {' or '.join(wanted)} message, Any or dict, got {type(obj).__name__}")


def filter_configs(filters: Any) -> List[FilterSpec]:
    """The RBAC filters of ``filters`` (in order), validated."""
    if isinstance(filters, (str, bytes)) or isinstance(filters, Mapping):
        raise TypeError("filters must be a sequence of RBAC filter configurations")
    out: List[FilterSpec] = []
    for i, item in enumerate(filters):
        name, config, disabled = _split_named(item, i)
        out.append(_filter_spec(config, name, f"http_filters[{i}]", disabled))
    return out


def _split_named(item: Any, index: int) -> Tuple[str, Any, bool]:
    """``(filter name, RBAC config, disabled by default)`` of one ``filters`` entry."""
    from google.protobuf import message as _message

    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        return item[0], item[1], False
    if isinstance(item, _message.Message) and item.DESCRIPTOR.full_name == _HTTP_FILTER_TYPE:
        if item.WhichOneof("config_type") != "typed_config":
            raise ConfigError(item.name or f"http_filters[{index}]", "typed_config", "an RBAC filter needs a typed_config")
        return item.name, item.typed_config, item.disabled
    if isinstance(item, Mapping) and ("typed_config" in item or "typedConfig" in item) and "@type" not in item:
        name = item.get("name") or f"http_filters[{index}]"
        if not isinstance(name, str):
            raise TypeError("an HttpFilter's name must be a str")
        return name, item.get("typed_config", item.get("typedConfig")), bool(item.get("disabled", False))
    return f"http_filters[{index}]", item, False


def _filter_spec(config: Any, name: str, where: str, disabled: bool = False) -> FilterSpec:
    msg, _ = _coerce(config, (RBAC_TYPE,), name, "typed_config" if where.startswith("http_filters") else where)
    return _rbac_filter(msg, name, disabled)


def _rbac_filter(msg: Any, name: str, disabled: bool = False) -> FilterSpec:
    for field in ("matcher", "shadow_matcher"):
        if msg.HasField(field):
            raise ConfigError(name, field, "the unified matcher API is not supported (gRPC A41: only rules)")
    rules = rules_spec(msg.rules, name, "rules") if msg.HasField("rules") else None
    shadow = rules_spec(msg.shadow_rules, name, "shadow_rules") if msg.HasField("shadow_rules") else None
    if msg.track_per_rule_stats:
        logger.debug("RBAC filter %s: track_per_rule_stats is not kept (only the filter totals)", name)
    return FilterSpec(name, rules, shadow, msg.rules_stat_prefix, msg.shadow_rules_stat_prefix, disabled)


def per_route_config(override: Any, name: str) -> RouteOverride:
    """One ``typed_per_filter_config`` value for RBAC filter ``name``."""
    if override is None:
        return RouteOverride(None)
    where = f"typed_per_filter_config[{name}]"
    msg, type_name = _coerce(override, (RBAC_PER_ROUTE_TYPE, _FILTER_CONFIG_TYPE), name, where)
    if type_name == _FILTER_CONFIG_TYPE:
        if msg.disabled:
            return RouteOverride(None)
        if not msg.HasField("config"):
            raise ConfigError(name, where + ".config", "FilterConfig has no config")
        msg, _ = _from_any(msg.config, (RBAC_PER_ROUTE_TYPE,), name, where + ".config")
    if not msg.HasField("rbac"):
        return RouteOverride(FilterSpec(name, None, None))
    return RouteOverride(_rbac_filter(msg.rbac, name))


# -- rules and policies -----------------------------------------------------------------------


def rules_spec(rules: Any, resource: str, where: str) -> RulesSpec:
    action = _ACTIONS.get(rules.action)
    if action is None:
        raise ConfigError(resource, where + ".action", f"unknown action {rules.action}")
    if rules.HasField("audit_logging_options"):
        logger.debug("RBAC %s: %s.audit_logging_options ignored (no audit loggers in meshcore)", resource, where)
    policies = []
    for pname in sorted(rules.policies):  # Envoy keeps policies in a std::map: byte order of names
        pw = f"{where}.policies[{pname}]"
        p = rules.policies[pname]
        if p.HasField("condition"):
            raise ConfigError(resource, pw + ".condition", "CEL conditions are not supported (gRPC A41)")
        if p.HasField("checked_condition"):
            raise ConfigError(resource, pw + ".checked_condition", "CEL conditions are not supported (gRPC A41)")
        if not len(p.permissions):
            raise ConfigError(resource, pw + ".permissions", "value must contain at least 1 item(s)")
        if not len(p.principals):
            raise ConfigError(resource, pw + ".principals", "value must contain at least 1 item(s)")
        perms = _or([_permission(x, resource, f"{pw}.permissions[{i}]") for i, x in enumerate(p.permissions)])
        ids = _or([_principal(x, resource, f"{pw}.principals[{i}]") for i, x in enumerate(p.principals)])
        policies.append(PolicySpec(pname, perms, ids))
    return RulesSpec(action, tuple(policies))


def _and(nodes: List[Node]) -> Node:
    flat: List[Node] = []
    for n in nodes:
        if n[0] == "never":
            return NEVER
        if n[0] == "any":
            continue
        flat.extend(n[1]) if n[0] == "and" else flat.append(n)
    if not flat:
        return ANY
    return flat[0] if len(flat) == 1 else ("and", tuple(flat))


def _or(nodes: List[Node]) -> Node:
    flat: List[Node] = []
    for n in nodes:
        if n[0] == "any":
            return ANY
        if n[0] == "never":
            continue
        flat.extend(n[1]) if n[0] == "or" else flat.append(n)
    if not flat:
        return NEVER
    return flat[0] if len(flat) == 1 else ("or", tuple(flat))


def _not(node: Node) -> Node:
    if node[0] == "any":
        return NEVER
    if node[0] == "never":
        return ANY
    if node[0] == "not":
        return node[1]
    return ("not", node)


def _combined(group: Any, field: str, combine: Callable[[List[Node]], Node],
              decode: Callable[[Any, str, str], Node], resource: str, where: str) -> Node:
    """An ``and_*``/``or_*`` rule: its ``field`` list (at least one item), each decoded, combined."""
    items = getattr(group, field)
    if not len(items):
        raise ConfigError(resource, f"{where}.{field}", "value must contain at least 1 item(s)")
    return combine([decode(x, resource, f"{where}.{field}[{i}]") for i, x in enumerate(items)])


def _shared_rule(p: Any, kind: str, resource: str, where: str) -> Optional[Node]:
    """The rules a Permission and a Principal both have (``any``, ``header``, ``url_path``,
    ``metadata``, ``sourced_metadata``); ``None`` for any other kind."""
    if kind == "any":
        if not p.any:
            raise ConfigError(resource, where, "value must equal true")
        return ANY
    if kind == "header":
        return _header(p.header, resource, where)
    if kind == "url_path":
        return _url_path(p.url_path, resource, where)
    if kind == "metadata":  # dynamic metadata is never set here: only an inverted matcher matches
        return ANY if p.metadata.invert else NEVER
    if kind == "sourced_metadata":
        return ANY if p.sourced_metadata.metadata_matcher.invert else NEVER
    return None


def _permission(p: Any, resource: str, where: str) -> Node:
    kind = p.WhichOneof("rule")
    if kind is None:
        raise ConfigError(resource, where, "value is required (a Permission needs a rule)")
    w = f"{where}.{kind}"
    if kind == "and_rules":
        return _combined(p.and_rules, "rules", _and, _permission, resource, w)
    if kind == "or_rules":
        return _combined(p.or_rules, "rules", _or, _permission, resource, w)
    if kind == "not_rule":
        return _not(_permission(p.not_rule, resource, w))
    shared = _shared_rule(p, kind, resource, w)
    if shared is not None:
        return shared
    if kind == "destination_ip":
        return ("ip", "destination", _cidr(p.destination_ip, resource, w))
    if kind == "destination_port":
        if p.destination_port > 65535:
            raise ConfigError(resource, w, "value must be less than or equal to 65535")
        return ("port", p.destination_port)
    if kind == "destination_port_range":
        start, end = p.destination_port_range.start, p.destination_port_range.end
        # Envoy's PortRangeMatcher constructor
        if start < 0 or start > 65536:
            raise ConfigError(resource, w, f"range start {start} is out of bounds")
        if end < 0 or end > 65536:
            raise ConfigError(resource, w, f"range end {end} is out of bounds")
        if start >= end:
            raise ConfigError(resource, w, f"range start {start} cannot be greater or equal than range end {end}")
        return ("port_range", start, end)
    if kind == "requested_server_name":
        return ("sni", _string(p.requested_server_name, resource, w))
    # matcher (the unified matcher as a permission), uri_template: grpc-go NACKs these
    raise ConfigError(resource, w, f"unsupported permission {kind!r} (gRPC A41)")


def _principal(p: Any, resource: str, where: str) -> Node:
    kind = p.WhichOneof("identifier")
    if kind is None:
        raise ConfigError(resource, where, "value is required (a Principal needs an identifier)")
    w = f"{where}.{kind}"
    if kind == "and_ids":
        return _combined(p.and_ids, "ids", _and, _principal, resource, w)
    if kind == "or_ids":
        return _combined(p.or_ids, "ids", _or, _principal, resource, w)
    if kind == "not_id":
        return _not(_principal(p.not_id, resource, w))
    shared = _shared_rule(p, kind, resource, w)
    if shared is not None:
        return shared
    if kind == "authenticated":
        a = p.authenticated
        if not a.HasField("principal_name"):
            return ("auth", None)
        return ("auth", _string(a.principal_name, resource, w + ".principal_name"))
    if kind == "source_ip":
        return ("ip", "source", _cidr(p.source_ip, resource, w))
    if kind == "direct_remote_ip":
        return ("ip", "direct", _cidr(p.direct_remote_ip, resource, w))
    if kind == "remote_ip":
        return ("ip", "remote", _cidr(p.remote_ip, resource, w))
    # filter_state, custom (extensions): grpc-go NACKs these
    raise ConfigError(resource, w, f"unsupported principal {kind!r} (gRPC A41)")


# -- leaves -----------------------------------------------------------------------------------


def _string(m: Any, resource: str, where: str) -> StringMatchSpec:
    from ..xds._decode import string_matcher

    if m.WhichOneof("match_pattern") == "safe_regex" and not m.safe_regex.regex:
        raise ConfigError(resource, where + ".safe_regex.regex", "value length must be at least 1 characters")
    return string_matcher(m, resource, where)


def _url_path(pm: Any, resource: str, where: str) -> Node:
    kind = pm.WhichOneof("rule")
    if kind != "path":
        raise ConfigError(resource, where, "value is required (a PathMatcher needs a path)")
    return ("path", _string(pm.path, resource, where + ".path"))


def _header(h: Any, resource: str, where: str) -> Node:
    raw = h.name
    if not raw:
        raise ConfigError(resource, where + ".name", "value length must be at least 1 characters")
    if any(c in raw for c in _BAD_HEADER_NAME_CHARS):
        raise ConfigError(resource, where + ".name", "value does not match regex pattern (HTTP_HEADER_NAME)")
    name = ascii_lower(raw)
    if name == ":scheme":
        raise ConfigError(resource, where + ".name", "a header matcher on :scheme is not supported (gRPC A41)")
    if name.startswith("grpc-"):
        raise ConfigError(resource, where + ".name", f"a header matcher on {raw!r} (grpc-) is not supported (gRPC A41)")
    if name == "host":
        name = ":authority"  # Envoy aliases Host and :authority (A41)
    common = dict(invert=h.invert_match, treat_missing_as_empty=h.treat_missing_header_as_empty)
    kind = h.WhichOneof("header_match_specifier")
    if kind is None:
        return ("header", HeaderMatch(name, "present", present=True, **common))
    if kind == "exact_match":
        if h.exact_match == "":
            return ("header", HeaderMatch(name, "any_value", **common))
        return ("header", HeaderMatch(name, "string", StringMatchSpec("exact", h.exact_match), **common))
    if kind == "safe_regex_match":
        from ..xds._decode import compile_regex

        pattern = h.safe_regex_match.regex
        if not pattern:
            raise ConfigError(resource, where + ".safe_regex_match.regex", "value length must be at least 1 characters")
        rx = compile_regex(pattern, resource, where + ".safe_regex_match.regex")
        return ("header", HeaderMatch(name, "string", StringMatchSpec("regex", pattern, False, rx), **common))
    if kind == "range_match":
        r = h.range_match
        return ("header", HeaderMatch(name, "range", start=r.start, end=r.end, **common))
    if kind == "present_match":
        return ("header", HeaderMatch(name, "present", present=h.present_match, **common))
    if kind in ("prefix_match", "suffix_match", "contains_match"):
        value = getattr(h, kind)
        if not value:
            raise ConfigError(resource, f"{where}.{kind}", "value length must be at least 1 characters")
        return ("header", HeaderMatch(name, "string", StringMatchSpec(kind.split("_")[0], value), **common))
    if kind == "string_match":
        return ("header", HeaderMatch(name, "string", _string(h.string_match, resource, where + ".string_match"),
                                      **common))
    raise ConfigError(resource, f"{where}.{kind}", "unsupported header matcher")


# -- addresses --------------------------------------------------------------------------------

#: Address keys: an IPv4 address is ``TAG_V4 | ip``, an IPv6 one ``TAG_V6 | ip`` (so a CIDR of
#: one family never matches an address of the other); 0 is "no IP address".
TAG_V4 = 1 << 129
TAG_V6 = 1 << 130
_TAGS = TAG_V4 | TAG_V6


def cidr_key(address: str, prefix_len: int) -> Optional[Tuple[int, int]]:
    """``(mask, net)`` with ``key & mask == net`` for the addresses in the range; None if
    ``address`` is not an IP address."""
    for family, tag, bits in ((socket.AF_INET, TAG_V4, 32), (socket.AF_INET6, TAG_V6, 128)):
        try:
            packed = socket.inet_pton(family, address)
        except (OSError, ValueError):
            continue
        n = min(prefix_len, bits)  # Envoy's CidrRange clamps the length to the family's width
        prefix_mask = ((1 << n) - 1) << (bits - n)
        return _TAGS | prefix_mask, tag | (int.from_bytes(packed, "big") & prefix_mask)
    return None


def _cidr(c: Any, resource: str, where: str) -> Tuple[int, int]:
    if not c.address_prefix:
        raise ConfigError(resource, where + ".address_prefix", "value length must be at least 1 characters")
    n = c.prefix_len.value if c.HasField("prefix_len") else 0
    if n > 128:
        raise ConfigError(resource, where + ".prefix_len", "value must be less than or equal to 128")
    key = cidr_key(c.address_prefix, n)
    if key is None:
        raise ConfigError(resource, where + ".address_prefix", f"malformed IP address: {c.address_prefix}")
    return key
