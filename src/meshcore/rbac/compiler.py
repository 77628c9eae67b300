"""A chain of RBAC filters -> one generated Python function (the engine's ``evaluate``).

Compiled once per configuration: each policy becomes one inline boolean expression over the
request's inputs, each filter an ``if/elif`` chain over its policies in Envoy's order, the whole
chain one function, so a request costs one call and no allocation beyond the unavoidable
(the header map, built only when a header rule is reached; the outcome tuple).

Safety of the generated code: no configuration value ever appears in the source text. Strings,
sets, CIDR masks and memo tables are module globals of the generated code (``_k0``, ``_k1``,
...); the source holds only names this module makes up, operators and small integers.

Specialisations (they do not change any result; the tests compare with an interpreter):
``or`` of exact matches on one input -> a frozenset lookup; ``or`` of prefixes/suffixes ->
``str.startswith(tuple)``; exact ``principal_name`` -> ``in`` over the peer's names; RE2 and
case-insensitive matches -> per-string memo tables; CIDRs -> integer masks over memoised
address keys; ``and``/``or``/``not`` flattened and constant-folded (``config``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from .._route_model import StringMatchSpec
from .._routing import ascii_lower
from . import runtime
from .config import ALLOW, DENY, LOG, FilterSpec, HeaderMatch, Node, RulesSpec
from .peer import PeerCertificate

__all__ = ["CompiledChain", "compile_chain", "string_test"]

logger = logging.getLogger(__name__)

#: Sub-expressions nested deeper than this go into their own generated function (CPython's
#: parser refuses ~200 nested parentheses).
_MAX_INLINE_DEPTH = 24

#: The generated function's parameters (RbacEngine.evaluate's signature).
PARAMS = ("method", "path", "headers", "authority", "principal", "source_ip", "source_port",
          "destination_ip", "destination_port", "server_name")

#: Inputs a hoisted sub-function receives (the lazily computed ones evaluated at the call).
_SUB_PARAMS = ("method", "path", "upath", "authority", "HD", "ids", "tls", "source_ip", "destination_ip",
               "dport", "sni", "RK")


def string_test(sm: StringMatchSpec) -> Callable[[str], bool]:
    """A StringMatcher as a plain predicate (Envoy semantics: ASCII-only case folding; RE2
    full match)."""
    kind, value = sm.kind, sm.value
    if kind == "regex":
        return runtime.RegexMemo(value).matches
    if sm.ignore_case:
        v = ascii_lower(value)
        if kind == "exact":
            return lambda s: ascii_lower(s) == v
        if kind == "prefix":
            return lambda s: ascii_lower(s).startswith(v)
        if kind == "suffix":
            return lambda s: ascii_lower(s).endswith(v)
        return lambda s: v in ascii_lower(s)
    if kind == "exact":
        return lambda s: s == value
    if kind == "prefix":
        return lambda s: s.startswith(value)
    if kind == "suffix":
        return lambda s: s.endswith(value)
    return lambda s: value in s


class _Gen:
    def __init__(self) -> None:
        self.globals: Dict[str, Any] = {}
        self.helpers: List[str] = []
        self.uses: Set[str] = set()
        self._ids: Dict[Any, str] = {}
        self._n = 0

    # -- constants and helpers ---------------------------------------------------------------

    def const(self, value: Any, key: Any = None) -> str:
        """A global name bound to ``value`` (shared when ``key`` repeats)."""
        if key is not None and key in self._ids:
            return self._ids[key]
        name = f"_k{self._n}"
        self._n += 1
        self.globals[name] = value
        if key is not None:
            self._ids[key] = name
        return name

    def shared(self, key: Any, factory: Callable[[], Any]) -> str:
        """The global for ``key``, made by ``factory`` the first time."""
        name = self._ids.get(key)
        return name if name is not None else self.const(factory(), key)

    def fresh(self, prefix: str) -> str:
        name = f"{prefix}{self._n}"
        self._n += 1
        return name

    # -- string tests --------------------------------------------------------------------------

    def test(self, sm: StringMatchSpec, x: str) -> str:
        """Expression: StringMatcher ``sm`` on ``x`` (a local name)."""
        kind, value = sm.kind, sm.value
        if kind == "regex":
            return f"{self.shared(('rx', value), lambda: runtime.RegexMemo(value))}[{x}]"
        if sm.ignore_case:
            if kind == "exact":
                return f"_lower({x}) == {self.const(ascii_lower(value))}"
            return f"{self.shared(('ic', kind, value), lambda: runtime.Memo(string_test(sm)))}[{x}]"
        k = self.const(value)
        if kind == "exact":
            return f"{x} == {k}"
        if kind == "prefix":
            return f"{x}.startswith({k})"
        if kind == "suffix":
            return f"{x}.endswith({k})"
        return f"{k} in {x}"

    # -- nodes ---------------------------------------------------------------------------------

    def expr(self, node: Node, env: Dict[str, str], depth: int = 0) -> str:
        kind = node[0]
        if kind in ("and", "or", "not") and depth >= _MAX_INLINE_DEPTH:
            return self.hoist(node, env)
        if kind == "any":
            return "True"
        if kind == "never":
            return "False"
        if kind == "and":
            return "(" + " and ".join(self.expr(n, env, depth + 1) for n in node[1]) + ")"
        if kind == "or":
            return self.or_expr(node[1], env, depth)
        if kind == "not":
            return f"(not {self.expr(node[1], env, depth + 1)})"
        if kind == "path":
            self.uses.add("upath")
            return "(" + self.test(node[1], env["upath"]) + ")"
        if kind == "sni":
            self.uses.add("sni")
            return "(" + self.test(node[1], env["sni"]) + ")"
        if kind == "header":
            return self.header(node[1], env)
        if kind == "auth":
            self.uses.add("ids")
            sm = node[1]
            if sm is None:
                return env["tls"]
            if sm.kind == "exact" and not sm.ignore_case:
                return f"({self.const(sm.value)} in {env['ids']})"
            test = string_test(sm)
            memo = runtime.Memo(lambda names, _t=test: any(_t(n) for n in names))
            return f"{self.const(memo)}[{env['ids']}]"
        if kind == "ip":
            return self.ip_expr(node[1], [node[2]], env)
        if kind == "port":
            self.uses.add("dport")
            return f"({env['dport']} == {node[1]})"
        if kind == "port_range":
            self.uses.add("dport")
            return f"({node[1]} <= {env['dport']} < {node[2]})"
        raise AssertionError(f"unknown rule node {kind!r}")

    def hoist(self, node: Node, env: Dict[str, str]) -> str:
        """``node`` as its own generated function, called with the inputs (lazy ones forced)."""
        name = self.fresh("_sub")
        inner_env = _plain_env()
        body = self.expr(node, inner_env, 0)
        self.helpers.append(f"def {name}({', '.join(_SUB_PARAMS)}):\n    return {body}\n")
        self.uses.update(("upath", "ids", "dport", "sni", "authority", "H", "remote"))
        args = [env[p] if p in env else p for p in _SUB_PARAMS]
        return f"{name}({', '.join(args)})"

    def or_expr(self, nodes: Sequence[Node], env: Dict[str, str], depth: int) -> str:
        parts: List[str] = []
        exact: Dict[Tuple[str, str], List[str]] = {}  # (input, header name) -> exact values
        starts: Dict[str, List[str]] = {}
        ends: Dict[str, List[str]] = {}
        principals: List[str] = []
        ips: Dict[str, List[Tuple[int, int]]] = {}
        rest: List[Node] = []
        for n in nodes:
            k = n[0]
            if k in ("path", "sni") and not n[1].ignore_case and n[1].kind in ("exact", "prefix", "suffix"):
                bucket = exact if n[1].kind == "exact" else starts if n[1].kind == "prefix" else ends
                key = (k, "") if n[1].kind == "exact" else k
                bucket.setdefault(key, []).append(n[1].value)  # type: ignore[arg-type]
            elif k == "header" and _plain_exact(n[1]):
                exact.setdefault(("header", n[1].name), []).append(n[1].string.value)
            elif k == "auth" and n[1] is not None and n[1].kind == "exact" and not n[1].ignore_case:
                principals.append(n[1].value)
            elif k == "ip":
                ips.setdefault(n[1], []).append(n[2])
            else:
                rest.append(n)
        for (where, hname), values in exact.items():
            var = _INPUT.get(where, "")
            if len(values) == 1:
                node = ("header", HeaderMatch(hname, "string", StringMatchSpec("exact", values[0]))) \
                    if where == "header" else (where, StringMatchSpec("exact", values[0]))
                parts.append(self.expr(node, env, depth + 1))
                continue
            k = self.const(frozenset(values))
            if where == "header":
                parts.append(self.header(HeaderMatch(hname, "string"), env, set_name=k))
            else:
                self.uses.add(var)
                parts.append(f"({env[var]} in {k})")
        for bucket, method in ((starts, "startswith"), (ends, "endswith")):
            for where, values in bucket.items():
                var = _INPUT[where]
                self.uses.add(var)
                arg = self.const(values[0] if len(values) == 1 else tuple(values))
                parts.append(f"{env[var]}.{method}({arg})")
        if principals:
            self.uses.add("ids")
            if len(principals) == 1:
                parts.append(f"({self.const(principals[0])} in {env['ids']})")
            else:
                parts.append(f"(not {self.const(frozenset(principals))}.isdisjoint({env['ids']}))")
        for which, cidrs in ips.items():
            parts.append(self.ip_expr(which, cidrs, env))
        parts.extend(self.expr(n, env, depth + 1) for n in rest)
        return "(" + " or ".join(parts) + ")" if len(parts) > 1 else parts[0]

    def ip_expr(self, which: str, cidrs: List[Tuple[int, int]], env: Dict[str, str]) -> str:
        if which == "remote":
            self.uses.add("remote")
            key = env["RK"]
        else:
            arg = "destination_ip" if which == "destination" else "source_ip"
            key = f"_ipk[{env[arg]}]"
        v = self.fresh("_a")
        tests = []
        for i, (mask, net) in enumerate(cidrs):
            m, n = self.const(mask), self.const(net)
            tests.append(f"(({v} := {key}) & {m}) == {n}" if i == 0 else f"({v} & {m}) == {n}")
        return "(" + " or ".join(tests) + ")"

    def header(self, h: HeaderMatch, env: Dict[str, str], set_name: Optional[str] = None) -> str:
        """Expression for one header matcher (``set_name``: an exact-set test instead)."""
        name = h.name
        if set_name is not None:
            test: Callable[[str], str] = lambda x: f"{x} in {set_name}"  # noqa: E731
            const_value: Optional[bool] = None
            empty_result = False
        elif h.kind == "string":
            sm = h.string
            test = lambda x, _sm=sm: self.test(_sm, x)  # type: ignore[misc]  # noqa: E731
            const_value = None
            empty_result = string_test(sm)("")  # type: ignore[arg-type]
        elif h.kind == "range":
            lo, hi = h.start, h.end
            test = lambda x: f"_in_range({x}, {lo}, {hi})"  # noqa: E731
            const_value = None
            empty_result = False
        elif h.kind == "any_value":
            test = None  # type: ignore[assignment]
            const_value = True
            empty_result = True
        else:  # present
            test = None  # type: ignore[assignment]
            const_value = h.present
            empty_result = h.present
        # The result when the header is absent (Envoy: no match, unless treat_missing_header_as_empty
        # makes it "", or a presence check asks for absence).
        if h.treat_missing_as_empty:
            absent = empty_result != h.invert
        elif h.kind == "present" and set_name is None:
            absent = (not h.present) != h.invert
        else:
            absent = False

        if name in runtime.HOP_BY_HOP_HEADERS:
            return "True" if absent else "False"
        if name in (":method", ":path", ":authority", "te"):
            # single-valued inputs: :method and :path are always there, :authority when the
            # request has one, te as Envoy's connection manager leaves it ("trailers" or absent)
            if name == "te":
                self.uses.add("H")
                x = "_t"
                pres = f"((_t := _te({env['HD']})) is not None)"
            elif name == ":authority":
                self.uses.add("authority")
                x = env["authority"]
                pres = f"({x} is not None)"
            else:
                x = env[name[1:]]
                pres = "True"
            if const_value is not None:
                p = "True" if const_value != h.invert else "False"
            else:
                p = test(x)
                p = f"(not ({p}))" if h.invert else f"({p})"
            if pres == "True":
                return p
            if p in ("True", "False") and (p == "True") == absent:  # the same either way
                return p
            if absent:
                return f"(not {pres} or {p})"
            return f"({pres} and {p})"

        self.uses.add("H")
        key = self.const(name)
        get = f"{env['HD']}.get({key})"
        if const_value is not None:
            present_result = const_value != h.invert
            if present_result == absent:
                return "True" if absent else "False"
            return f"({get} is not None)" if present_result else f"({get} is None)"
        single = test("_v")
        multi = self.fresh("_hm")
        self.helpers.append(
            f"def {multi}(vs):\n    for _v in vs:\n        if {single}:\n            return True\n    return False\n")
        p = f"({single} if _v.__class__ is str else {multi}(_v))"
        p = f"(not {p})" if h.invert else p
        if absent:
            return f"((_v := {get}) is None or {p})"
        return f"((_v := {get}) is not None and {p})"


#: rule node kind -> the input (env key) its string matcher reads
_INPUT = {"path": "upath", "sni": "sni"}


def _plain_exact(h: HeaderMatch) -> bool:
    return (h.kind == "string" and h.string is not None and h.string.kind == "exact" and not h.string.ignore_case
            and not h.invert and not h.treat_missing_as_empty and h.name not in runtime.HOP_BY_HOP_HEADERS)


def _main_env() -> Dict[str, str]:
    return {
        "method": "method", "path": "path", "upath": "upath", "authority": "authority",
        "HD": "(H if H is not None else (H := _header_map(headers)))",
        "ids": "ids", "tls": "tls", "source_ip": "source_ip", "destination_ip": "destination_ip",
        "dport": "dport", "sni": "sni",
        "RK": "(R if R is not None else (R := _remote_key("
              "(H if H is not None else (H := _header_map(headers))), _ipk[source_ip], _hops)))",
    }


def _plain_env() -> Dict[str, str]:
    return {p: p for p in _SUB_PARAMS} | {"upath": "upath", "tls": "tls"}


# -- the chain ------------------------------------------------------------------------------------


class CompiledChain:
    """The generated ``evaluate`` function and what it needs to report decisions."""

    def __init__(self, function: Callable[..., Any], source: str, engines: Tuple[Tuple[int, str, Optional[RulesSpec]], ...]) -> None:
        self.function = function
        self.source = source
        #: per engine in run order: (filter index, "shadow"/"enforced", rules)
        self.engines = engines


def _policy_chain(gen: _Gen, rules: RulesSpec, var: str, env: Dict[str, str], out: List[str], indent: str) -> None:
    """``var = <index of the first matching policy, or -1>``."""
    first = True
    for i, p in enumerate(rules.policies):
        perm = gen.expr(p.permissions, env)
        if perm == "False":
            continue
        princ = gen.expr(p.principals, env)
        if princ == "False":
            continue
        cond = perm if princ == "True" else princ if perm == "True" else f"{perm} and {princ}"
        out.append(f"{indent}{'if' if first else 'elif'} {cond}:\n{indent}    {var} = {i}")
        first = False
    if first:
        out.append(f"{indent}{var} = -1")
    else:
        out.append(f"{indent}else:\n{indent}    {var} = -1")


def compile_chain(filters: Sequence[Optional[FilterSpec]], counter_slots: Sequence[Tuple[int, int, int, int]],
                  *, hops: int, use_remote_address: bool, decisions: Any, counters: List[int]) -> CompiledChain:
    """Generate ``evaluate`` for ``filters`` (None: a filter that does not run).

    ``counter_slots[i]``: indices in ``counters`` of filter i's allowed, denied, shadow_allowed,
    shadow_denied. ``decisions``: a mapping from the outcome tuple to the Decision to return."""
    gen = _Gen()
    env = _main_env()
    body: List[str] = []
    engines: List[Tuple[int, str, Optional[RulesSpec]]] = []
    outcome: List[str] = []  # expressions of the outcome tuple so far
    ind = "    "
    for fi, f in enumerate(filters):
        if f is None:
            continue
        a_slot, d_slot, sa_slot, sd_slot = counter_slots[fi]
        if f.shadow_rules is not None:
            var = f"o{len(engines)}"
            engines.append((fi, "shadow", f.shadow_rules))
            body.append(f"{ind}# filter {fi}: shadow rules ({f.shadow_rules.action})")
            _policy_chain(gen, f.shadow_rules, var, env, body, ind)
            action = f.shadow_rules.action
            if action == LOG:
                body.append(f"{ind}_c[{sa_slot}] += 1")
            else:
                allowed_if = f"{var} >= 0" if action == ALLOW else f"{var} < 0"
                body.append(f"{ind}if {allowed_if}:\n{ind}    _c[{sa_slot}] += 1\n{ind}else:\n{ind}    _c[{sd_slot}] += 1")
            outcome.append(var)
        if f.rules is not None:
            var = f"o{len(engines)}"
            engines.append((fi, "enforced", f.rules))
            action = f.rules.action
            body.append(f"{ind}# filter {fi}: rules ({action})")
            _policy_chain(gen, f.rules, var, env, body, ind)
            tup = "(" + ", ".join(outcome + [var]) + ",)"
            if action == ALLOW:
                body.append(f"{ind}if {var} < 0:\n{ind}    _c[{d_slot}] += 1\n{ind}    return _d[{tup}]")
                body.append(f"{ind}_c[{a_slot}] += 1")
                outcome.append(var)
            elif action == DENY:
                body.append(f"{ind}if {var} >= 0:\n{ind}    _c[{d_slot}] += 1\n{ind}    return _d[{tup}]")
                body.append(f"{ind}_c[{a_slot}] += 1")
                outcome.append("-1")
            else:  # LOG: evaluated (Envoy reports the matching policy), never denies
                body.append(f"{ind}_c[{a_slot}] += 1")
                outcome.append(var)
    final = "(" + ", ".join(outcome) + ",)" if outcome else "()"
    body.append(f"{ind}return _d[{final}]")

    uses = gen.uses
    pro: List[str] = []
    if "ids" in uses:
        pro.append(f"{ind}if peer is not None:\n"
                   f"{ind}    if peer.__class__ is not _Peer and not isinstance(peer, _Peer):\n"
                   f"{ind}        raise TypeError('peer must be a PeerCertificate')\n"
                   f"{ind}    ids = peer.names\n{ind}    tls = True\n"
                   f"{ind}elif principal is None:\n{ind}    ids = ()\n{ind}    tls = False\n"
                   f"{ind}elif principal.__class__ is str or isinstance(principal, str):\n{ind}    ids = (principal, '')\n{ind}    tls = True\n"
                   f"{ind}else:\n{ind}    raise TypeError('principal must be a str')")
    if engines:
        pro.append(f"{ind}if (method.__class__ is not str or path.__class__ is not str) and _bad_strings(method, path):\n"
                   f"{ind}    raise TypeError('method and path must be str')")
    if "upath" in uses:
        pro.append(f"{ind}upath = path if ('?' not in path and '#' not in path) else _cut_query(path)")
    if "authority" in uses:
        pro.append(f"{ind}if authority is None:\n{ind}    authority = _authority_of(headers)\n"
                   f"{ind}elif authority.__class__ is not str and not isinstance(authority, str):\n"
                   f"{ind}    raise TypeError('authority must be a str')")
    if "sni" in uses:
        pro.append(f"{ind}sni = _lower(server_name) if server_name else ''")
    if "dport" in uses:
        pro.append(f"{ind}dport = -1 if destination_port is None else destination_port\n"
                   f"{ind}if dport.__class__ is not int and not isinstance(dport, int):\n{ind}    raise TypeError('destination_port must be an int')")
    if "H" in uses or "remote" in uses:
        pro.append(f"{ind}H = None")
    if "remote" in uses:
        # Envoy (ConnectionManagerUtility::mutateRequestHeaders): with use_remote_address the
        # peer, unless trusted hops name an x-forwarded-for entry; else the XFF detection
        if use_remote_address and not hops:
            pro.append(f"{ind}R = _ipk[source_ip]")
        else:
            pro.append(f"{ind}R = None")

    sig = ", ".join(f"{p}={d}" for p, d in zip(PARAMS, _DEFAULTS)) + ", *, peer=None"
    source = "\n".join(gen.helpers) + (
        f"\ndef evaluate({sig}):\n" + "\n".join(pro + body) + "\n")
    namespace: Dict[str, Any] = dict(gen.globals)
    namespace.update({
        "_c": counters, "_d": decisions, "_ipk": runtime.IP_KEYS,
        "_hops": hops - 1 if use_remote_address else hops,
        "_bad_strings": _bad_strings,
        "_header_map": runtime.header_map, "_remote_key": runtime.remote_key, "_cut_query": runtime.cut_query,
        "_authority_of": runtime.authority_of, "_lower": ascii_lower, "_in_range": runtime.in_range,
        "_te": runtime.te_value, "_Peer": PeerCertificate,
        "__name__": "meshcore.rbac._generated",
    })
    code = compile(source, "<meshcore.rbac generated>", "exec")
    exec(code, namespace)  # noqa: S102  (generated from validated trees; values are globals, see module doc)
    logger.debug("compiled %d RBAC engines (%d policies) into %d lines", len(engines),
                 sum(len(r.policies) for _, _, r in engines if r is not None), source.count("\n"))
    return CompiledChain(namespace["evaluate"], source, tuple(engines))


def _bad_strings(*values: Any) -> bool:
    return not all(isinstance(v, str) for v in values)


_DEFAULTS = ("'GET'", "'/'", "None", "None", "None", "None", "0", "None", "None", "None")
