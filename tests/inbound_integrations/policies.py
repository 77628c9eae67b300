"""Istio AuthorizationPolicies for the server integrations' tests, translated as istiod's proxyless
generator does (``tests/rbac/istio_authz.py``) and put into grpcgen-shaped inbound listeners
(``tests/inbound/grpcgen_inbound.py``)."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

from envoy.config.listener.v3 import listener_pb2

from inbound.grpcgen_inbound import TEMPLATE, inbound_listener
from rbac.istio_authz import filters_for
from tls.pki import certificate_providers

NODE_ID = "sidecar~127.0.0.1~server-0.default~default.svc.cluster.local"
SIDECAR_SA = "cluster.local/ns/default/sa/sidecar"
CLIENT_SA = "cluster.local/ns/default/sa/client"
ALLOW_POLICY = "ns[default]-policy[allow-callers]-rule[0]"
DENY_POLICY = "ns[default]-policy[deny-block]-rule[0]"


def authorization(allow: Sequence[str] = (SIDECAR_SA,), deny_header: str = "block") -> List[Dict[str, Any]]:
    """ALLOW ``principals: allow``; DENY ``when request.headers[echo] == deny_header``."""
    return [
        {"name": "deny-block", "namespace": "default", "action": "DENY",
         "rules": [{"when": [{"key": "request.headers[echo]", "values": [deny_header]}]}]},
        {"name": "allow-callers", "namespace": "default", "action": "ALLOW",
         "rules": [{"from": [{"source": {"principals": list(allow)}}]}]},
    ]


def listener(port: int, policies: Sequence[Dict[str, Any]], *, mode: str = "STRICT") -> listener_pb2.Listener:
    """istiod's grpcgen inbound listener for ``0.0.0.0:<port>`` with ``policies``' RBAC filters."""
    by_name = {f["name"]: f["typed_config"]["rules"]["policies"] for f in filters_for(policies)}
    return inbound_listener(port, mode=mode, deny=by_name.get("envoy.filters.http.rbac.DENY"),
                            allow=by_name.get("envoy.filters.http.rbac"))


def bootstrap(cp_port: int, cert_dir: Any) -> Dict[str, Any]:
    """A proxyless bootstrap (Istio agent shape) for the server workload."""
    return {"xds_servers": [{"server_uri": f"127.0.0.1:{cp_port}", "channel_creds": [{"type": "insecure"}]}],
            "node": {"id": NODE_ID}, "certificate_providers": certificate_providers(cert_dir),
            "server_listener_resource_name_template": TEMPLATE}
