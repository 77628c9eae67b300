"""RbacEngine: the RBAC HTTP filters of one HTTP connection manager, compiled, and the decisions
they make (Envoy 1.40 semantics within gRPC A41's scope; see the package docstring)."""

from __future__ import annotations

import logging
from types import MappingProxyType
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from . import config as _config
from .compiler import CompiledChain, compile_chain
from .config import ALLOW, DENY, LOG, FilterSpec, RouteOverride
from .peer import PeerCertificate

__all__ = ["Decision", "RbacEngine"]

logger = logging.getLogger(__name__)

_EMPTY_METADATA: Mapping[str, str] = MappingProxyType({})


class Decision:
    """What the RBAC filters decided for one request. Shared and immutable: equal outcomes
    return the same object.

    * ``allowed``: False when a DENY filter matched or an ALLOW filter matched no policy (Envoy:
      403 ``RBAC: access denied``; gRPC: PERMISSION_DENIED). ``bool(decision)`` is ``allowed``.
    * ``policy``: Envoy's ``enforced_effective_policy_id``: the DENY policy that denied, or the
      policy of the last ALLOW (or LOG) filter that matched; None when none did.
    * ``shadow_allowed`` / ``shadow_policy``: the last shadow engine's result and matching
      policy (None: no shadow rules ran / none matched). Never enforced.
    * ``metadata``: the ``envoy.filters.http.rbac`` dynamic metadata Envoy would leave, keys
      with their stat prefixes (``enforced_effective_policy_id``, ``enforced_engine_result``,
      ``shadow_effective_policy_id``, ``shadow_engine_result``).
    * ``filter``: the name of the filter that denied (None when allowed).
    """

    __slots__ = ("allowed", "policy", "shadow_allowed", "shadow_policy", "metadata", "filter")

    def __init__(self, allowed: bool, policy: Optional[str] = None, shadow_allowed: Optional[bool] = None,
                 shadow_policy: Optional[str] = None, metadata: Mapping[str, str] = _EMPTY_METADATA,
                 filter: Optional[str] = None) -> None:
        object.__setattr__(self, "allowed", allowed)
        object.__setattr__(self, "policy", policy)
        object.__setattr__(self, "shadow_allowed", shadow_allowed)
        object.__setattr__(self, "shadow_policy", shadow_policy)
        object.__setattr__(self, "metadata", metadata)
        object.__setattr__(self, "filter", filter)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Decision is immutable")

    def __bool__(self) -> bool:
        return self.allowed

    @property
    def details(self) -> Optional[str]:
        """Envoy's response code details for a denial (``rbac_access_denied_matched_policy[...]``),
        None when allowed."""
        if self.allowed:
            return None
        return f"rbac_access_denied_matched_policy[{self.policy if self.policy is not None else 'none'}]"

    def __repr__(self) -> str:
        parts = [f"allowed={self.allowed}", f"policy={self.policy!r}"]
        if self.shadow_allowed is not None:
            parts += [f"shadow_allowed={self.shadow_allowed}", f"shadow_policy={self.shadow_policy!r}"]
        if self.filter is not None:
            parts.append(f"filter={self.filter!r}")
        return f"Decision({', '.join(parts)})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Decision):
            return NotImplemented
        return (self.allowed, self.policy, self.shadow_allowed, self.shadow_policy, dict(self.metadata),
                self.filter) == (other.allowed, other.policy, other.shadow_allowed, other.shadow_policy,
                                 dict(other.metadata), other.filter)

    def __hash__(self) -> int:
        return hash((self.allowed, self.policy, self.shadow_allowed, self.shadow_policy, self.filter))


#: No filter ran, or none had anything to say.
ALLOWED = Decision(True)


def _result(action: str, index: int) -> bool:
    """handleAction: ALLOW -> matched; DENY -> not matched; LOG -> allowed."""
    if action == ALLOW:
        return index >= 0
    if action == DENY:
        return index < 0
    return True


class _Decisions(dict):
    """outcome tuple -> Decision, replaying Envoy's dynamic-metadata writes once per outcome."""

    __slots__ = ("chain", "filters", "prefixes")

    def __init__(self, filters: Sequence[Optional[FilterSpec]], prefixes: Sequence[Tuple[str, str]]) -> None:
        super().__init__()
        self.filters = filters
        self.prefixes = prefixes  # per filter: (rules prefix, shadow rules prefix) for metadata keys
        self.chain: Optional[CompiledChain] = None

    def __missing__(self, outcome: Tuple[int, ...]) -> Decision:
        assert self.chain is not None
        md: Dict[str, str] = {}
        allowed = True
        policy = shadow_policy = denied_by = None
        shadow_allowed: Optional[bool] = None
        for (fi, mode, rules), index in zip(self.chain.engines, outcome):
            assert rules is not None
            rp, sp = self.prefixes[fi]
            name = rules.policies[index].name if index >= 0 else ""
            ok = _result(rules.action, index)
            if mode == "shadow":
                if name:
                    md[sp + "shadow_effective_policy_id"] = name
                    shadow_policy = name
                md[sp + "shadow_engine_result"] = "allowed" if ok else "denied"
                shadow_allowed = ok
            else:
                if name:
                    md[rp + "enforced_effective_policy_id"] = name
                    policy = name
                md[rp + "enforced_engine_result"] = "allowed" if ok else "denied"
                if not ok:
                    allowed = False
                    f = self.filters[fi]
                    denied_by = f.name if f is not None else None
        d = Decision(allowed, policy, shadow_allowed, shadow_policy,
                     MappingProxyType(md) if md else _EMPTY_METADATA, denied_by)
        if len(self) >= 4096:
            self.clear()
        self[outcome] = d
        return d


def _stat(prefix: str, name: str) -> str:
    """Envoy's statPrefixJoin: a non-empty prefix gets a "." unless it ends with one."""
    if prefix and not prefix.endswith("."):
        return f"{prefix}.{name}"
    return prefix + name


class _Stats:
    """The filters' counters (shared by an engine and its per-route variants, as Envoy counts
    per-route decisions in the listener filter's stats)."""

    def __init__(self, filters: Sequence[FilterSpec]) -> None:
        self.counters: List[int] = [0] * (4 * len(filters))
        self.names: List[Tuple[str, str, str, str]] = [
            (_stat(f.rules_stat_prefix, "allowed"), _stat(f.rules_stat_prefix, "denied"),
             _stat(f.shadow_rules_stat_prefix, "shadow_allowed"), _stat(f.shadow_rules_stat_prefix, "shadow_denied"))
            for f in filters
        ]

    def slots(self, i: int) -> Tuple[int, int, int, int]:
        return (4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3)

    def totals(self) -> Dict[str, int]:
        c = self.counters
        return {"allowed": sum(c[0::4]), "denied": sum(c[1::4]), "shadow_allowed": sum(c[2::4]),
                "shadow_denied": sum(c[3::4])}

    def by_name(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for i, names in enumerate(self.names):
            for j, name in enumerate(names):
                out[name] = out.get(name, 0) + self.counters[4 * i + j]
        return out


FilterInput = Any
OverrideInput = Any


class RbacEngine:
    """The RBAC HTTP filters of an HTTP connection manager, in filter order, compiled into one
    function.

    Build with :meth:`from_xds`; decide with :meth:`evaluate`; per route, :meth:`for_route`.
    ``engine.stats``: Envoy's counters summed over the filters (``allowed``, ``denied``,
    ``shadow_allowed``, ``shadow_denied``); ``engine.stat_counters``: by Envoy's stat names
    (with each filter's ``rules_stat_prefix`` / ``shadow_rules_stat_prefix``). Counters are
    plain integers: exact under the GIL for one thread, approximate under heavy thread
    contention. Immutable otherwise; safe to share between threads and event loops.
    """

    def __init__(self, filters: Sequence[FilterSpec], *, use_remote_address: bool = False,
                 xff_num_trusted_hops: int = 0, _active: Optional[Sequence[Optional[FilterSpec]]] = None,
                 _stats: Optional[_Stats] = None) -> None:
        if not isinstance(use_remote_address, bool):
            raise TypeError("use_remote_address must be a bool")
        if type(xff_num_trusted_hops) is not int or xff_num_trusted_hops < 0:
            raise ValueError("xff_num_trusted_hops must be an int >= 0")
        self._filters: Tuple[FilterSpec, ...] = tuple(filters)
        self._use_remote_address = use_remote_address
        self._hops = xff_num_trusted_hops
        self._stats = _stats if _stats is not None else _Stats(self._filters)
        # the filters that run (a per-route variant replaces or disables some)
        active = list(_active) if _active is not None else [None if f.disabled else f for f in self._filters]
        self._active: Tuple[Optional[FilterSpec], ...] = tuple(active)
        base = {i: f for i, f in enumerate(self._filters)}
        prefixes = []
        for i, f in enumerate(active):  # metadata key prefixes: the route's if set, else the filter's
            b = base[i]
            prefixes.append(((f.rules_stat_prefix if f is not None and f.rules_stat_prefix else b.rules_stat_prefix),
                             (f.shadow_rules_stat_prefix if f is not None and f.shadow_rules_stat_prefix
                              else b.shadow_rules_stat_prefix)))
        decisions = _Decisions(active, prefixes)
        chain = compile_chain(active, [self._stats.slots(i) for i in range(len(active))],
                              hops=self._hops, use_remote_address=use_remote_address,
                              decisions=decisions, counters=self._stats.counters)
        decisions.chain = chain
        self._chain = chain
        self._decisions = decisions
        # evaluate() is the generated function itself, no wrapper
        fn = chain.function
        fn.__doc__ = RbacEngine.evaluate.__doc__
        fn.__qualname__ = "RbacEngine.evaluate"
        self.evaluate = fn  # type: ignore[method-assign]

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_xds(cls, filters: Iterable[FilterInput], *, per_route: Optional[Mapping[Union[str, int], OverrideInput]] = None,
                 use_remote_address: bool = False, xff_num_trusted_hops: int = 0) -> "RbacEngine":
        """An engine for RBAC HTTP filters ``filters``, in filter order.

        Each entry: an ``envoy.extensions.filters.http.rbac.v3.RBAC`` message, an ``Any``
        holding one, its proto3-JSON dict, an ``HttpFilter`` (message or dict: its ``name``
        keys :meth:`for_route` overrides; ``disabled: true`` runs it only on routes that enable
        it), or a ``(name, config)`` pair. Unnamed filters are named ``http_filters[<i>]``.

        ``per_route``: apply :meth:`for_route` at once. ``use_remote_address`` /
        ``xff_num_trusted_hops``: the HTTP connection manager's fields that decide ``remote_ip``,
        as Envoy does: by default (false / 0) ``remote_ip`` is the last ``x-forwarded-for``
        address when that is a valid IP, else the peer; ``xff_num_trusted_hops=N`` skips N
        entries from the right first. With ``use_remote_address=True`` it is the peer (gRPC
        A41's meaning), or with N > 0 trusted hops the N-th address from the right of the
        incoming ``x-forwarded-for`` when valid.

        Raises :class:`~meshcore.errors.ConfigError` (filter name, field path, reason) for what
        gRPC A41 or Envoy rejects; TypeError for arguments of the wrong kind.
        """
        specs = _config.filter_configs(list(filters))
        engine = cls(specs, use_remote_address=use_remote_address, xff_num_trusted_hops=xff_num_trusted_hops)
        if per_route:
            return engine.for_route(per_route)
        return engine

    def for_route(self, overrides: Optional[Mapping[Union[str, int], OverrideInput]]) -> "RbacEngine":
        """The engine for a route whose ``typed_per_filter_config`` (the most specific one: route,
        else virtual host, else route configuration, as Envoy resolves it) holds ``overrides``:
        filter name (or index) -> ``RBACPerRoute`` (message, Any or dict; ``rbac`` replaces the
        filter's rules and shadow rules for the route, an absent ``rbac`` disables them),
        ``envoy.config.route.v3.FilterConfig`` (``disabled: true``: the filter does not run), or
        None (does not run). Filters without an entry keep their configuration.

        Compile once per route configuration, not per request. The new engine shares this one's
        counters (Envoy counts per-route decisions in the filter's stats)."""
        if not overrides:
            return self
        if not isinstance(overrides, Mapping):
            raise TypeError("overrides must be a mapping of filter name -> RBACPerRoute")
        by_name = {f.name: i for i, f in enumerate(self._filters)}
        active = list(None if f.disabled else f for f in self._filters)
        for key, value in overrides.items():
            if isinstance(key, int) and not isinstance(key, bool):
                if not 0 <= key < len(self._filters):
                    raise ValueError(f"no RBAC filter at index {key}")
                i = key
            elif isinstance(key, str):
                i = by_name.get(key)  # type: ignore[assignment]
                if i is None:
                    logger.debug("per-route config for %r: no such RBAC filter here, ignored", key)
                    continue
            else:
                raise TypeError(f"override keys must be filter names or indexes, got {type(key).__name__}")
            o: RouteOverride = _config.per_route_config(value, self._filters[i].name)
            active[i] = o.filter
        return RbacEngine(self._filters, use_remote_address=self._use_remote_address,
                          xff_num_trusted_hops=self._hops, _active=active, _stats=self._stats)

    # -- use ----------------------------------------------------------------------------------

    def evaluate(self, method: str = "GET", path: str = "/", headers: Any = None, authority: Optional[str] = None,
                 principal: Optional[str] = None, source_ip: Optional[str] = None, source_port: int = 0,
                 destination_ip: Optional[str] = None, destination_port: Optional[int] = None,
                 server_name: Optional[str] = None, *, peer: Optional[PeerCertificate] = None) -> Decision:
        """Decide one request. (Replaced per instance by the compiled function; this is its
        documentation.)

        * ``method``, ``path`` (with the query; ``url_path`` rules see it without ``?...``/``#...``),
          ``authority`` (``:authority``; None: the headers' ``:authority`` or ``host``).
        * ``headers``: ``(name, value)`` pairs (str or bytes; any case) or a mapping; repeated
          headers are matched one value at a time, except those Envoy joins with ``,``
          (user-agent, content-type, authorization, referer, accept, x-forwarded-for, ...).
          Hop-by-hop headers (connection, keep-alive, proxy-connection, transfer-encoding,
          upgrade) count as absent.
        * The peer: ``peer=PeerCertificate(...)`` for a TLS connection (``PeerCertificate()``:
          TLS without a client certificate), or ``principal="spiffe://..."`` as shorthand for a
          certificate with that one URI SAN; neither: plaintext (``authenticated`` never matches).
        * ``source_ip`` / ``destination_ip`` (str; None: not an IP connection, no CIDR matches),
          ``destination_port`` (int), ``server_name`` (the TLS SNI; None or "": none).
          ``source_port`` is accepted for symmetry; no RBAC rule reads it.

        Returns a shared :class:`Decision`. TypeError/ValueError for arguments of the wrong
        type or an unparsable IP address (never an "allowed" guess)."""
        raise AssertionError("replaced by the compiled function in __init__")  # pragma: no cover

    def evaluate_peer(self, peer: Optional[PeerCertificate], **request: Any) -> Decision:
        """:meth:`evaluate` with the peer first (None: plaintext)."""
        return self.evaluate(peer=peer, **request)

    @property
    def stats(self) -> Dict[str, int]:
        return self._stats.totals()

    @property
    def stat_counters(self) -> Dict[str, int]:
        return self._stats.by_name()

    @property
    def filters(self) -> Tuple[str, ...]:
        """The filter names, in order."""
        return tuple(f.name for f in self._filters)

    @property
    def enforcing(self) -> bool:
        """Whether any filter can deny a request here (an ALLOW or DENY engine runs)."""
        return any(f is not None and f.rules is not None and f.rules.action != LOG for f in self._active)

    @property
    def source(self) -> str:
        """The generated code (for debugging)."""
        return self._chain.source

    def __repr__(self) -> str:
        parts = []
        for f, a in zip(self._filters, self._active):
            if a is None:
                parts.append(f"{f.name}: off")
                continue
            desc = []
            if a.rules is not None:
                desc.append(f"{a.rules.action} {len(a.rules.policies)} policies")
            if a.shadow_rules is not None:
                desc.append(f"shadow {a.shadow_rules.action} {len(a.shadow_rules.policies)}")
            parts.append(f"{f.name}: {', '.join(desc) or 'no rules'}")
        return f"RbacEngine({'; '.join(parts)})"
