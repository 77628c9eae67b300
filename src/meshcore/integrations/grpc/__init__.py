"""gRPC through the mesh: a ``grpc.Channel`` look-alike that routes and balances every RPC.

grpcio has no resolver or LB-policy plugin API, so meshcore does not feed a grpcio channel;
it replaces it ("option C"). :func:`mesh_channel` returns a :class:`MeshChannel` that generated
stubs accept::

    mesh = meshcore.Mesh().start()
    channel = mesh_channel(mesh, "echo.default.svc.cluster.local:8080")
    reply = EchoStub(channel).Hello(request, timeout=2, metadata=[("x-canary", "1")])

Each RPC is routed by its method path (``/pkg.Service/Method``) and metadata, as Envoy routes
the HTTP/2 request a gRPC client sends (``content-type: application/grpc`` is added, so
``grpc: {}`` route matchers apply), then sent on a real grpcio channel to the chosen endpoint.
One channel is kept per ``(endpoint, authority)``; a channel whose endpoint left every cluster
of the target is closed by a periodic sweep once idle, and all of them by :meth:`MeshChannel.close`.

Semantics:

* **Unary-unary** calls (``__call__``, ``with_call``, ``future``) get the whole router
  behaviour of :meth:`meshcore.Call.run`: fault injection, retries (the route's ``retry_on``
  gRPC codes; ``connect-failure``/``reset``/``5xx`` for transport failures), per-try and route
  timeouts, circuit breakers, outlier detection. ``future`` runs that lifecycle on a small
  thread pool owned by the channel; cancelling it cancels the RPC in flight and stops retries.
* **Streaming** calls (unary-stream, stream-unary, stream-stream) pick once per call: fault
  injection and circuit breakers apply, but there is no retry (the request stream is consumed
  by the first attempt). The endpoint is released when the RPC terminates.
* **Deadlines**: the gRPC deadline of an attempt is ``min(caller timeout, route timeout)``, and
  the per-try timeout where the route has one (the route timeout applies to streams as well, as
  in Envoy: set it to ``0s`` for long-lived streams). An expired deadline is
  ``DEADLINE_EXCEEDED``, which is what a gRPC client sees from its own deadline.
* **Status accounting**: an RPC that got an answer from the server counts as HTTP 200 with its
  ``grpc-status`` (which is what Envoy's retry policy looks at: ``retry_on: 5xx`` does not retry
  gRPC errors, ``unavailable`` does). Failures to connect and transport resets are recognised
  from grpcio's status details and reported as ``connect-failure`` / ``reset``.
* **Mesh errors** become :class:`MeshRpcError` (a ``grpc.RpcError`` and ``grpc.Call``): no
  usable endpoint, open circuit breaker -> ``UNAVAILABLE``; no route -> ``UNIMPLEMENTED``; a
  fault abort -> its ``grpc_status`` or its HTTP status mapped to gRPC (gRPC's
  ``http-grpc-status-mapping``, also Envoy's ``httpToGrpcStatus``).
* **Mesh TLS**: an endpoint whose cluster socket has TLS (``transport_socket`` or Istio's
  ``transport_socket_matches``; ``Mesh.upstream_tls``) gets mTLS as a sidecar would add it,
  under the application's plaintext channel. grpcio cannot verify SPIFFE-only certificates,
  so its per-endpoint channel dials a private unix socket of :mod:`meshcore.tls.forwarder`,
  which connects to the endpoint with the cluster's TLS (Istio ALPN ``istio-h2, istio, h2``,
  SNI, the workload certificate current at that moment, chain and SAN checks before any byte
  of the call) and then copies bytes. Per-endpoint channels are kept per ``(endpoint,
  authority, UpstreamTls)``. A connection that cannot be made (refused, timed out, handshake or
  certificate check failed, missing certificates, a TLS 1.3 server refusing the client
  certificate) is ``UNAVAILABLE`` and a ``connect-failure`` (``retry_on: connect-failure``,
  outlier detection, ``upstream_cx_connect_fail``); unary calls carry the meshcore error
  (:class:`~meshcore.tls.TlsHandshakeError`: cluster, endpoint, reason) in their details and as
  ``__cause__``; streaming calls keep grpcio's details, and :meth:`MeshChannel.tls_failures`
  gives the reason. Never plaintext instead.
* **Istio telemetry** (``mesh.telemetry.enable_istio_metrics()``): every call carries this
  workload's ``x-envoy-peer-metadata(-id)`` (replacing any the application set). grpc-core hides
  the peer's ``x-envoy-peer-metadata`` answer from grpcio's caller, so while the exchange is on a
  per-endpoint channel connects through a tap (:mod:`._peer`, needs ``hpack``) that reads it from
  the server's HTTP/2 header blocks: the ``destination_*`` labels come from the peer, as behind a
  sidecar (else from the endpoint's EDS metadata). Records carry ``request_messages`` /
  ``response_messages`` (streams: the messages grpcio took from the request iterator and the
  messages the application read). The exchange pair is hidden from the application's view of
  every call: unary results, ``with_call``/``future`` calls, errors, streams (initial and trailing
  metadata). The tap costs one local hop per connection and an HPACK decode per response.
"""

from __future__ import annotations

from .channel import MeshChannel, mesh_channel
from .status import MeshRpcError, grpc_status_for_http

__all__ = ["MeshChannel", "MeshRpcError", "mesh_channel", "grpc_status_for_http"]
