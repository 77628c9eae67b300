"""Istio AuthorizationPolicy -> RBAC HTTP filter configs, the way istiod's proxyless generator
builds them (``security.md`` §4.2: ``pilot/pkg/security/authz/model`` with
``useAuthenticated=true``), as proto3-JSON dicts. Test-only; enough of Istio's translation for
realistic policies (principals, namespaces, service accounts, trust domains, IP blocks, methods,
paths, hosts, ports, ``when`` on request headers / ports / SNI), not a full port.

:func:`filters_for` -> ``[DENY filter, ALLOW filter]`` as grpcgen orders them (a filter only
when it has policies; AUDIT/CUSTOM dropped).
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"


def _sm(value: str, *, prefix: str = "", ignore_case: bool = False) -> Dict[str, Any]:
    """Istio's StringMatcher for a value with an optional leading/trailing ``*``."""
    if value == "*":
        m: Dict[str, Any] = {"safe_regex": {"regex": ".+"}}
    elif value.endswith("*"):
        m = {"prefix": prefix + value[:-1]}
    elif value.startswith("*"):
        if prefix:
            m = {"safe_regex": {"regex": _re_escape(prefix) + ".*" + _re_escape(value[1:])}}
        else:
            m = {"suffix": value[1:]}
    else:
        m = {"exact": prefix + value}
    if ignore_case and "safe_regex" not in m:
        m["ignore_case"] = True
    return m


def _re_escape(s: str) -> str:
    return "".join("\\" + c if c in ".^$*+?()[]{}|\\" else c for c in s)


def _or_ids(ids: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {"or_ids": {"ids": ids}}


def _or_rules(rules: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {"or_rules": {"rules": rules}}


def _cidr(block: str) -> Dict[str, Any]:
    addr, _, n = block.partition("/")
    return {"address_prefix": addr, "prefix_len": int(n) if n else (128 if ":" in addr else 32)}


def _header(name: str, value: str) -> Dict[str, Any]:
    if value == "*":
        return {"name": name, "present_match": True}
    if value.endswith("*"):
        return {"name": name, "prefix_match": value[:-1]}
    if value.startswith("*"):
        return {"name": name, "suffix_match": value[1:]}
    return {"name": name, "exact_match": value}


def _principal_values(key: str, values: Sequence[str], ns: str) -> List[Dict[str, Any]]:
    out: List[Dict[str, Any]] = []
    for v in values:
        if key == "principals":
            out.append({"authenticated": {"principal_name": _sm(v, prefix="spiffe://")}})
        elif key == "namespaces":
            rx = ".*/ns/" + (".*" if v == "*" else _re_escape(v)) + "/.*"
            out.append({"authenticated": {"principal_name": {"safe_regex": {"regex": rx}}}})
        elif key == "serviceAccounts":
            sns, _, sa = v.rpartition("/")
            sns = sns or ns
            rx = f"spiffe://.+/ns/{_re_escape(sns)}/(.+/|)sa/{_re_escape(sa)}(/.+)?"
            out.append({"authenticated": {"principal_name": {"safe_regex": {"regex": rx}}}})
        elif key == "trustDomains":
            if v == "*":
                out.append({"authenticated": {"principal_name": {"prefix": "spiffe://"}}})
            else:
                out.append({"authenticated": {"principal_name": {"prefix": f"spiffe://{v}/"}}})
        elif key == "ipBlocks":
            out.append({"direct_remote_ip": _cidr(v)})
        elif key == "remoteIpBlocks":
            out.append({"remote_ip": _cidr(v)})
        elif key == "requestPrincipals":
            out.append({"metadata": {"filter": "envoy.filters.http.jwt_authn",
                                     "path": [{"key": "payload"}, {"key": "sub"}],
                                     "value": {"string_match": _sm(v)}}})
        else:
            raise ValueError(f"unsupported source key {key}")
    return out


def _permission_values(key: str, values: Sequence[str]) -> List[Dict[str, Any]]:
    out: List[Dict[str, Any]] = []
    for v in values:
        if key == "methods":
            out.append({"header": {"name": ":method", "exact_match": v}})
        elif key == "paths":
            out.append({"url_path": {"path": _sm(v)}})
        elif key == "hosts":
            out.append({"header": {"name": ":authority", "string_match": _sm(v, ignore_case=True)}})
        elif key == "ports":
            out.append({"destination_port": int(v)})
        else:
            raise ValueError(f"unsupported operation key {key}")
    return out


_SOURCE_KEYS = ("principals", "requestPrincipals", "namespaces", "serviceAccounts", "trustDomains", "ipBlocks",
                "remoteIpBlocks")
_OPERATION_KEYS = ("hosts", "ports", "methods", "paths")


def _when(conditions: Sequence[Dict[str, Any]]) -> tuple:
    """(principal conditions, permission conditions) as and-set members."""
    ids: List[Dict[str, Any]] = []
    rules: List[Dict[str, Any]] = []
    for c in conditions:
        key = c["key"]
        for field, negate in (("values", False), ("notValues", True)):
            vals = c.get(field)
            if not vals:
                continue
            if key.startswith("request.headers["):
                name = key[len("request.headers["):-1]
                node = _or_ids([{"header": _header(name, v)} for v in vals])
                ids.append({"not_id": node} if negate else node)
            elif key == "source.ip":
                node = _or_ids([{"direct_remote_ip": _cidr(v)} for v in vals])
                ids.append({"not_id": node} if negate else node)
            elif key == "remote.ip":
                node = _or_ids([{"remote_ip": _cidr(v)} for v in vals])
                ids.append({"not_id": node} if negate else node)
            elif key == "source.namespace":
                node = _or_ids(_principal_values("namespaces", vals, ""))
                ids.append({"not_id": node} if negate else node)
            elif key == "source.principal":
                node = _or_ids(_principal_values("principals", vals, ""))
                ids.append({"not_id": node} if negate else node)
            elif key == "destination.port":
                node = _or_rules([{"destination_port": int(v)} for v in vals])
                rules.append({"not_rule": node} if negate else node)
            elif key == "destination.ip":
                node = _or_rules([{"destination_ip": _cidr(v)} for v in vals])
                rules.append({"not_rule": node} if negate else node)
            elif key == "connection.sni":
                node = _or_rules([{"requested_server_name": _sm(v)} for v in vals])
                rules.append({"not_rule": node} if negate else node)
            else:
                raise ValueError(f"unsupported condition {key}")
    return ids, rules


def policy(rule: Dict[str, Any], ns: str) -> Dict[str, Any]:
    """One AuthorizationPolicy rule -> an RBAC Policy."""
    cond_ids, cond_rules = _when(rule.get("when", ()))
    principals = []
    for f in rule.get("from") or [{}]:
        src = f.get("source", {})
        ids: List[Dict[str, Any]] = []
        for key in _SOURCE_KEYS:
            if src.get(key):
                ids.append(_or_ids(_principal_values(key, src[key], ns)))
            nkey = "not" + key[0].upper() + key[1:]
            if src.get(nkey):
                ids.append({"not_id": _or_ids(_principal_values(key, src[nkey], ns))})
        ids += cond_ids
        principals.append({"and_ids": {"ids": ids}} if ids else {"any": True})
    permissions = []
    for t in rule.get("to") or [{}]:
        op = t.get("operation", {})
        rules: List[Dict[str, Any]] = []
        for key in _OPERATION_KEYS:
            if op.get(key):
                rules.append(_or_rules(_permission_values(key, op[key])))
            nkey = "not" + key[0].upper() + key[1:]
            if op.get(nkey):
                rules.append({"not_rule": _or_rules(_permission_values(key, op[nkey]))})
        rules += cond_rules
        permissions.append({"and_rules": {"rules": rules}} if rules else {"any": True})
    return {"permissions": permissions, "principals": principals}


def filters_for(policies: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """AuthorizationPolicies (``{"name", "namespace", "action", "rules"}``) -> the HttpFilter
    dicts grpcgen sends: ``envoy.filters.http.rbac.DENY`` (if any DENY rules), then
    ``envoy.filters.http.rbac`` (if any ALLOW rules)."""
    by_action: Dict[str, Dict[str, Any]] = {"DENY": {}, "ALLOW": {}}
    for p in policies:
        action = p.get("action", "ALLOW")
        if action not in by_action:
            continue  # AUDIT, CUSTOM: dropped by grpcgen
        for i, rule in enumerate(p.get("rules") or []):
            by_action[action][f"ns[{p['namespace']}]-policy[{p['name']}]-rule[{i}]"] = policy(rule, p["namespace"])
    out = []
    for action, name in (("DENY", "envoy.filters.http.rbac.DENY"), ("ALLOW", "envoy.filters.http.rbac")):
        if by_action[action]:
            out.append({"name": name, "typed_config": {"@type": RBAC_TYPE,
                                                       "rules": {"action": action, "policies": by_action[action]}}})
    return out


def realistic_policies(n_rules: int = 10, ns: str = "prod") -> List[Dict[str, Any]]:
    """A realistic mesh policy set with ``n_rules`` rules in all (the benchmark's and tests'
    workload): an allow-list per caller (principals / namespaces / service accounts), methods,
    path prefixes, a header condition, hosts, one DENY."""
    rules: List[Dict[str, Any]] = []
    callers = ["frontend", "checkout", "cart", "payments", "shipping", "email", "ads", "reco", "search", "auth"]
    for i in range(n_rules - 1):
        c = callers[i % len(callers)]
        rule: Dict[str, Any] = {
            "from": [{"source": {"principals": [f"cluster.local/ns/{ns}/sa/{c}"]}}],
            "to": [{"operation": {"methods": ["GET", "POST"] if i % 2 else ["GET"],
                                  "paths": [f"/api/v{i % 3 + 1}/{c}/*", f"/{c}/health"]}}],
        }
        if i % 3 == 0:
            rule["from"] = [{"source": {"namespaces": [ns, "staging"]}}]
        if i % 3 == 1:
            rule["from"][0]["source"]["serviceAccounts"] = [f"{ns}/{c}-canary"]
        if i % 4 == 2:
            rule["when"] = [{"key": "request.headers[x-tenant]", "values": ["acme", "globex*"]}]
        if i % 5 == 4:
            rule["to"][0]["operation"]["hosts"] = [f"{c}.{ns}.svc.cluster.local", f"{c}.example.com*"]
        rules.append(rule)
    return [
        {"name": "deny-evil", "namespace": ns, "action": "DENY",
         "rules": [{"from": [{"source": {"namespaces": ["evil"]}}]}]},
        {"name": "allow-callers", "namespace": ns, "action": "ALLOW", "rules": rules},
    ]
