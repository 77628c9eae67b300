"""Inbound authorization: Envoy's RBAC HTTP filter (``envoy.extensions.filters.http.rbac.v3``)
as a compiled, in-process engine, within gRPC A41's scope.

    from meshcore import RbacEngine, PeerCertificate
    engine = RbacEngine.from_xds([deny_filter_config, allow_filter_config])
    d = engine.evaluate(method="GET", path="/x?q=1", headers=[("x-user", "a")], authority="svc:80",
                        principal="spiffe://td/ns/n/sa/s", source_ip="10.0.0.1", destination_ip="10.0.0.2",
                        destination_port=8080, server_name=None)
    d.allowed, d.policy

Semantics (Envoy 1.40 wins where it differs from A41; ``security.md`` §4):

* Filters run in order. Each first evaluates its ``shadow_rules`` (counted, reported, never
  enforced), then its ``rules``: a DENY filter whose policy matches denies and stops the chain;
  an ALLOW filter with no matching policy denies (an empty policy map denies everything); LOG,
  and a filter without ``rules``, never deny.
* A policy matches when any permission and any principal match; the policy reported is the
  first matching one in byte order of the policy names (Envoy keeps them in a ``std::map``).
* ``header``: name lower-cased, ``host`` read as ``:authority``; ``:method``, ``:path`` (with the
  query) and ``:authority`` come from the request line. A repeated header is matched one value
  at a time (``invert_match`` inverts "some value matches"), except the headers Envoy stores
  inline, whose values its codec joins with ``,``. The legacy ``exact_match: ""`` matches any
  present value; ``treat_missing_header_as_empty`` matches an absent header as ``""``. An
  absent header matches nothing else, inverted or not (but ``present_match: false``).
* ``url_path``: the path up to ``?`` or ``#``. All regexes are RE2, full match.
* ``authenticated.principal_name``: tried against every URI SAN, then every DNS SAN, then the
  subject (so a matcher accepting ``""`` matches every TLS peer of an Istio mesh, whose
  certificates have an empty subject); no ``principal_name``: any TLS peer; plaintext: never.
* ``requested_server_name``: the real SNI, lower-cased ("" without one; A41 always uses "").
* ``source_ip`` / ``direct_remote_ip``: the peer; ``remote_ip``: the last valid
  ``x-forwarded-for`` address, else the peer (Envoy's default ``use_remote_address: false``;
  ``RbacEngine.from_xds(..., use_remote_address=True)`` makes it the peer, as in A41).
  ``destination_ip`` / ``destination_port`` / ``destination_port_range``: the local address.
* ``metadata`` / ``sourced_metadata``: never match (``invert``: always).
* Rejected (``ConfigError`` naming the field, i.e. NACK): CEL ``condition`` /
  ``checked_condition``, ``Permission.matcher`` / ``uri_template``, ``Principal.filter_state``
  / ``custom``, ``RBAC.matcher`` / ``shadow_matcher``, header matchers on ``:scheme`` or
  ``grpc-*`` names, and what Envoy's own validation refuses.
* Per route (``RBACPerRoute`` in ``typed_per_filter_config``): :meth:`RbacEngine.for_route`.
* Of Envoy's connection-manager rewrites before the filter, only these are applied: hop-by-hop
  headers removed, ``te`` kept only as ``trailers``, inline headers joined. Not emulated (a
  proxyless server never does them; a request carries the headers its client sent): dropping a
  Referer that is not a valid URI reference, stripping ``x-envoy-*`` / sanitising
  ``x-forwarded-client-cert``, generating ``x-request-id`` / ``x-forwarded-proto``.
"""

from __future__ import annotations

from .engine import Decision, RbacEngine
from .peer import PeerCertificate

__all__ = ["Decision", "PeerCertificate", "RbacEngine"]
