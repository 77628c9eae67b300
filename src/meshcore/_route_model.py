"""Validated, protobuf-free description of a RouteConfiguration (what the route tables build on).

``meshcore.xds.route_config`` produces these from xDS; both route-table twins consume them.
Semantics are Envoy 1.40's (source/common/router/config_impl.cc, header_utility.cc,
matchers.cc); the comments name the rule each field carries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

__all__ = [
    "DecoratorSpec",
    "DirectResponseSpec",
    "HashPolicySpec",
    "HeaderMatchSpec",
    "HeaderMutation",
    "QueryMatchSpec",
    "RedirectSpec",
    "RetryPolicy",
    "RouteConfigSpec",
    "RouteSpec",
    "StringMatchSpec",
    "VirtualHostSpec",
    "WeightedClusterSpec",
]


@dataclass(frozen=True, slots=True)
class StringMatchSpec:
    """``envoy.type.matcher.v3.StringMatcher``. ``kind``: exact/prefix/suffix/contains/regex.

    Frozen and hashable (it sits in the hashable ``xds.model.SanMatcherSpec``); equality and hash
    leave out the compiled ``regex``, which ``value`` (the pattern) already determines.
    """

    kind: str
    value: str
    ignore_case: bool = False
    regex: Any = field(default=None, compare=False)  # compiled RE2 (google-re2) for kind == "regex"; full match

    def matches(self, s: str) -> bool:
        kind = self.kind
        if kind == "regex":
            try:
                return self.regex.fullmatch(s) is not None
            except UnicodeEncodeError:  # lone surrogates: RE2 reads them as _routing.match_bytes does
                return self.regex.fullmatch(s.encode("utf-8", "surrogatepass")) is not None
        if self.ignore_case:
            # absl::EqualsIgnoreCase / StartsWithIgnoreCase: ASCII case folding only.
            s = _ascii_lower(s)
            value = _ascii_lower(self.value)
        else:
            value = self.value
        if kind == "exact":
            return s == value
        if kind == "prefix":
            return s.startswith(value)
        if kind == "suffix":
            return s.endswith(value)
        return value in s  # contains


_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LOWER_TABLE = str.maketrans(_UPPER, _UPPER.lower())


def _ascii_lower(s: str) -> str:
    return s.translate(_LOWER_TABLE) if not s.isascii() else s.lower()


@dataclass(slots=True)
class HeaderMatchSpec:
    """``config.route.v3.HeaderMatcher``.

    ``kind``: "string" (``string``), "range" (``range_start`` <= n < ``range_end``),
    "present" (``present``), "exact_any" (legacy ``exact_match: ""``: any present value).
    """

    name: str  # lower-cased
    kind: str
    string: Optional[StringMatchSpec] = None
    range_start: int = 0
    range_end: int = 0
    present: bool = True
    invert: bool = False
    treat_missing_as_empty: bool = False


@dataclass(slots=True)
class QueryMatchSpec:
    """``config.route.v3.QueryParameterMatcher``: ``string`` or presence (``present``)."""

    name: str
    string: Optional[StringMatchSpec] = None
    present: Optional[bool] = None


@dataclass(slots=True)
class WeightedClusterSpec:
    """One ``WeightedCluster.ClusterWeight``: a fixed ``name`` or a ``cluster_header``."""

    name: str
    cluster_header: str
    weight: int
    host_rewrite_literal: str = ""
    headers_to_add: Tuple["HeaderMutation", ...] = ()
    headers_to_remove: Tuple[str, ...] = ()


@dataclass(slots=True)
class HeaderMutation:
    """One ``request_headers_to_add`` entry. ``action``: append / add_if_absent / overwrite /
    overwrite_if_exists (``HeaderValueOption.append_action``)."""

    name: str  # lower-cased
    value: str
    action: str = "append"
    keep_empty_value: bool = False


@dataclass(slots=True)
class RedirectSpec:
    """``config.route.v3.RedirectAction``."""

    scheme: str = ""  # "" keeps the request's scheme; https_redirect -> "https"
    host: str = ""
    port: int = 0
    path: str = ""
    prefix_rewrite: Optional[str] = None
    regex_rewrite: Optional[Tuple[Any, str]] = None  # (compiled RE2, substitution)
    response_code: int = 301
    strip_query: bool = False


@dataclass(slots=True)
class DirectResponseSpec:
    status: int
    body: str = ""


@dataclass(frozen=True, slots=True)
class DecoratorSpec:
    """``config.route.v3.Decorator``: the route's name for tracing. ``operation`` replaces the
    span's default name (``egress <authority>``; Istio sets ``<host>:<port>/*``); ``propagate``
    (default true) sends it upstream as ``x-envoy-decorator-operation`` so the server's sidecar
    names its span the same (Envoy's ``ConnectionManagerImpl::ActiveStream::traceRequest``)."""

    operation: str
    propagate: bool = True


@dataclass(slots=True)
class RetryPolicy:
    """``config.route.v3.RetryPolicy`` (what the request lifecycle needs)."""

    retry_on: Tuple[str, ...] = ()
    num_retries: int = 1
    per_try_timeout: Optional[float] = None  # seconds; None: the route timeout applies
    per_try_idle_timeout: Optional[float] = None
    base_interval: float = 0.025
    max_interval: Optional[float] = None  # None: 10 x base_interval
    retriable_status_codes: Tuple[int, ...] = ()
    retry_host_predicates: Tuple[str, ...] = ()
    host_selection_retry_max_attempts: int = 1
    #: the lifecycle's compiled form (``resilience.retry``), made on first use; lives and dies
    #: with the policy, so nothing keeps policies of replaced route tables alive
    compiled: Any = field(default=None, init=False, repr=False, compare=False)


@dataclass(slots=True)
class HashPolicySpec:
    """``RouteAction.HashPolicy``. ``kind``: header/cookie/source_ip/query_parameter."""

    kind: str
    name: str = ""  # header name (lower-cased), cookie name or query parameter name
    terminal: bool = False
    regex_rewrite: Optional[Tuple[Any, str]] = None  # header values: (compiled RE2, substitution)
    cookie_ttl: Optional[float] = None
    cookie_path: str = ""


@dataclass(slots=True)
class RouteSpec:
    """One ``config.route.v3.Route`` with its match and action."""

    name: str
    index: int  # position in its virtual host (first match wins)
    path_kind: str  # prefix / path / regex / separated
    path_value: str
    case_sensitive: bool = True
    regex: Any = None
    headers: Tuple[HeaderMatchSpec, ...] = ()
    query: Tuple[QueryMatchSpec, ...] = ()
    runtime_fraction: Optional[Tuple[int, int]] = None  # (numerator, denominator)
    grpc: bool = False
    action: str = "cluster"  # cluster / weighted / cluster_header / direct / redirect
    cluster: str = ""
    cluster_header: str = ""
    weighted: Tuple[WeightedClusterSpec, ...] = ()
    weighted_total: int = 0
    weighted_header: str = ""
    direct_response: Optional[DirectResponseSpec] = None
    redirect: Optional[RedirectSpec] = None
    timeout: Optional[float] = 15.0  # seconds; None: disabled (0 in the config)
    retry_policy: Optional[RetryPolicy] = None
    hash_policies: Tuple[HashPolicySpec, ...] = ()
    prefix_rewrite: Optional[str] = None
    regex_rewrite: Optional[Tuple[Any, str]] = None
    host_rewrite_literal: str = ""
    cluster_not_found_response_code: int = 503
    headers_to_add: Tuple[HeaderMutation, ...] = ()
    headers_to_remove: Tuple[str, ...] = ()
    # typed_per_filter_config (route over virtual host): (HTTP filter name, FaultSpec or None=disabled)
    filter_overrides: Tuple[Tuple[str, Any], ...] = ()
    decorator: Optional[DecoratorSpec] = None  # the route's tracing decorator (None: Envoy's default span name)


@dataclass(slots=True)
class VirtualHostSpec:
    name: str
    domains: Tuple[str, ...]
    routes: Tuple[RouteSpec, ...]
    require_tls: str = "NONE"  # NONE / EXTERNAL_ONLY / ALL
    retry_policy: Optional[RetryPolicy] = None
    headers_to_add: Tuple[HeaderMutation, ...] = ()
    headers_to_remove: Tuple[str, ...] = ()


@dataclass(slots=True)
class RouteConfigSpec:
    name: str
    virtual_hosts: Tuple[VirtualHostSpec, ...]
    ignore_port_in_host_matching: bool = False
    ignore_path_parameters_in_path_matching: bool = False
    vhost_header: str = ""  # lower-cased; "" means :authority
    headers_to_add: Tuple[HeaderMutation, ...] = ()
    headers_to_remove: Tuple[str, ...] = ()
    most_specific_header_mutations_wins: bool = False
