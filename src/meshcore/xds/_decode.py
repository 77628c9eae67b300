"""Small helpers shared by the xDS decoders: typed ``Any`` values, durations, percentages, RE2
regexes and ``StringMatcher``.

Each helper raises :class:`~meshcore.errors.ConfigError` naming the resource and field path it is
given, with Envoy's wording where Envoy has one.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import re2
from google.protobuf import json_format
from google.protobuf import message as _message
from xds.type.v3 import typed_struct_pb2 as _xds_typed_struct

from .._route_model import StringMatchSpec
from ..errors import ConfigError

try:
    from udpa.type.v1 import typed_struct_pb2 as _udpa_typed_struct
except ImportError:  # pragma: no cover  (older xds-protos)
    _udpa_typed_struct = None

__all__ = ["MAX_DURATION_SECONDS", "MAX_PROGRAM_SIZE", "compile_regex", "json_fields", "is_map", "is_repeated",
           "per_million", "seconds", "string_matcher", "type_name", "unpack"]

#: Envoy converts durations to int64 nanoseconds; from this many seconds on it reports
#: "Duration out-of-range" (measured on Envoy 1.40: 9223372035.999999999 s passes).
MAX_DURATION_SECONDS = 9223372035

_TYPED_STRUCTS = {"xds.type.v3.TypedStruct": _xds_typed_struct.TypedStruct}
if _udpa_typed_struct is not None:
    _TYPED_STRUCTS["udpa.type.v1.TypedStruct"] = _udpa_typed_struct.TypedStruct

# FractionalPercent.DenominatorType (HUNDRED, TEN_THOUSAND, MILLION) -> factor to per-million
_PER_MILLION = {0: 10_000, 1: 100, 2: 1}


def type_name(type_url: str) -> str:
    """The message name of a type URL (``type.googleapis.com/a.b.C`` -> ``a.b.C``); ``""`` for
    anything but a string (a JSON ``@type`` can be any value), which names no message."""
    if not isinstance(type_url, str):
        return ""
    return type_url.rpartition("/")[2]


def unpack(
    any_: Any, classes: Mapping[str, Any], resource: str, path: str
) -> Tuple[Optional[_message.Message], str]:
    """``(message, type name)`` of a typed config ``Any``.

    The message is ``None`` when the type, or the type a ``TypedStruct`` wraps, is not in
    ``classes`` (message name -> class); the type name is then the wrapped one, so callers can
    name it. Bytes that do not decode, and TypedStruct contents that do not fit the message
    (unknown fields, wrong types), raise ``ConfigError`` on ``path`` (``path.value`` for a
    TypedStruct's contents).
    """
    name = type_name(any_.type_url)
    wrapper = _TYPED_STRUCTS.get(name)
    if wrapper is not None:
        ts = wrapper()
        _decode(any_, ts, name, resource, path)
        name = type_name(ts.type_url)
        cls = classes.get(name)
        if cls is None:
            return None, name
        msg = cls()
        try:
            json_format.ParseDict(json_format.MessageToDict(ts.value), msg)
        except RecursionError:  # a Struct nested deeper than the stack (protobuf stops at 100)
            raise ConfigError(resource, f"{path}.value", f"invalid {name}: nested too deep") from None
        except (json_format.ParseError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(resource, f"{path}.value", f"invalid {name}: {e}") from None
        return msg, name
    cls = classes.get(name)
    if cls is None:
        return None, name
    msg = cls()
    _decode(any_, msg, name, resource, path)
    return msg, name


def _decode(any_: Any, msg: Any, name: str, resource: str, path: str) -> None:
    try:
        msg.ParseFromString(any_.value)
    except _message.DecodeError as e:
        raise ConfigError(resource, path, f"cannot decode {name}: {e}") from None


def seconds(duration: Any, resource: str, path: str, *, positive: bool = False) -> float:
    """A ``google.protobuf.Duration`` in seconds, checked the way Envoy checks durations.

    Negative durations and nanos outside 0..999999999 are "Invalid duration"; more than
    :data:`MAX_DURATION_SECONDS` is out of range. ``positive`` adds the ``gt: 0s`` rule that
    Envoy's proto validation puts on most timeouts.
    """
    s, n = duration.seconds, duration.nanos
    if s < 0 or n < 0:
        raise ConfigError(resource, path, "Invalid duration: Expected positive duration")
    if n > 999_999_999 or s > MAX_DURATION_SECONDS:
        raise ConfigError(resource, path, "Invalid duration: Duration out-of-range")
    if positive and not (s or n):
        raise ConfigError(resource, path, "value must be greater than 0s")
    return s + n / 1e9


def per_million(fraction: Any, resource: str, path: str) -> int:
    """An ``envoy.type.v3.FractionalPercent`` as parts per million, capped at 100%."""
    factor = _PER_MILLION.get(fraction.denominator)
    if factor is None:
        raise ConfigError(resource, f"{path}.denominator", f"unknown denominator {fraction.denominator}")
    return min(fraction.numerator * factor, 1_000_000)


# -- regexes and string matchers -----------------------------------------------------------------

MAX_PROGRAM_SIZE = 100  # runtime re2.max_program_size.error_level default
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


def compile_regex(pattern: str, resource: str, where: str) -> Any:
    """Compile with RE2 semantics, rejecting what Envoy rejects (bad syntax; an RE2 program
    larger than :data:`MAX_PROGRAM_SIZE`)."""
    try:
        compiled = re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as e:
        raise ConfigError(resource, where, f"invalid regex {pattern!r}: {e}") from None
    size = compiled.programsize
    if size > MAX_PROGRAM_SIZE:
        raise ConfigError(
            resource, where,
            f"regex {pattern!r} is too complex: RE2 program size {size} > max program size {MAX_PROGRAM_SIZE}",
        )
    return compiled


def string_matcher(m: Any, resource: str, where: str) -> StringMatchSpec:
    """An ``envoy.type.matcher.v3.StringMatcher`` as a :class:`StringMatchSpec`, with Envoy's
    checks: a match pattern is required, ``prefix``/``suffix``/``contains`` must not be empty,
    ``ignore_case`` is refused on ``safe_regex``, ``custom`` (extension matchers) is unsupported."""
    kind = m.WhichOneof("match_pattern")
    if kind is None:
        raise ConfigError(resource, where, "string matcher has no match pattern")
    if kind == "safe_regex":
        if m.ignore_case:
            raise ConfigError(resource, where + ".ignore_case", "ignore_case has no effect for safe_regex")
        return StringMatchSpec("regex", m.safe_regex.regex, False,
                               compile_regex(m.safe_regex.regex, resource, where + ".safe_regex.regex"))
    if kind not in ("exact", "prefix", "suffix", "contains"):
        raise ConfigError(resource, where + "." + kind, "unsupported string matcher")
    value = getattr(m, kind)
    if kind != "exact" and not value:
        raise ConfigError(resource, where + "." + kind, "value length must be at least 1")
    return StringMatchSpec(kind, value, m.ignore_case)


# -- protobuf descriptors (the JSON/YAML readers of resource files and of typed LB configs) ------

_JSON_FIELDS: Dict[str, Dict[str, Any]] = {}


def json_fields(desc: Any) -> Dict[str, Any]:
    """A message's fields by both spellings: snake_case name and lowerCamel ``json_name``."""
    fields = _JSON_FIELDS.get(desc.full_name)
    if fields is None:
        fields = {}
        for f in desc.fields:
            fields[f.name] = f
            fields[f.json_name] = f
        _JSON_FIELDS[desc.full_name] = fields
    return fields


def is_repeated(field: Any) -> bool:
    flag = getattr(field, "is_repeated", None)  # protobuf >= 6; ``label`` is deprecated there
    return bool(flag) if flag is not None else field.label == field.LABEL_REPEATED


def is_map(field: Any) -> bool:
    mt = field.message_type
    return mt is not None and mt.GetOptions().map_entry
