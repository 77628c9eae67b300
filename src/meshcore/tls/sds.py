"""Workload certificates fetched over SDS, as Istio sidecars get them from the Istio agent.

An :class:`SdsCertificateSource` opens one ``SecretDiscoveryService/StreamSecrets`` stream (SotW)
to ``target`` -- Istio's agent socket ``unix:///var/run/secrets/workload-spiffe-uds/socket``
(older agents: ``unix:./etc/istio/proxy/SDS``), or ``host:port`` -- with insecure channel
credentials, asking for two secrets in one request: ``default`` (the workload identity,
``tls_certificate{certificate_chain, private_key}``) and ``ROOTCA`` (the roots,
``validation_context{trusted_ca}``). Each is a ``DataSource``: ``inline_bytes`` (what Istio's
agent sends), ``inline_string``, ``filename`` (read when the secret arrives, not watched) or
``environment_variable``. It offers the interface of
:class:`~meshcore.tls.certificates.FileCertificateSource` (``current``, ``peek``, ``identity``,
``problem``, ``reloads``, ``reload_failures``, ...), so TLS contexts are built per
:class:`~meshcore.tls.certificates.CertificateSet` generation just the same.

Rules:

* a response may carry only some of the secrets (Istio's agent pushes the one that changed): the
  others keep their last accepted value; names not asked for are ignored;
* each accepted change of either secret, once both are known, is one new ``CertificateSet``
  generation (a response that changes nothing makes none);
* a response that cannot be used -- a half-updated pair (new key, old chain), unparsable PEM, a
  secret of the wrong kind, another resource type -- is NACKed as a whole (``error_detail``
  INVALID_ARGUMENT naming the secret and the reason; ``version_info`` the last accepted one) and
  the last good set stays in use; every response is ACKed or NACKed with its nonce;
* the stream runs in a daemon thread; when it fails or ends it is opened again on a fresh channel
  after 0.1 s, doubling up to 5 s while no response arrives (back to 0.1 s after one). Nothing is
  raised into the caller's threads: the failure is in :attr:`SdsCertificateSource.problem`;
* until the first complete set arrives, :meth:`~SdsCertificateSource.current` raises
  :class:`~meshcore.tls.certificates.CertificatesUnavailable` (no TLS without certificates);
  :meth:`~SdsCertificateSource.wait` blocks until then;
* :meth:`~SdsCertificateSource.close` cancels the stream and ends the thread (also done, without
  waiting, when the source is garbage collected).

Importing this module imports neither grpc nor the protobuf modules; the stream thread does.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import weakref
from typing import Any, List, Optional, Tuple

from .certificates import CertificatesUnavailable, CertificateSet, FileCertificateSource, WorkloadIdentity

__all__ = ["SdsCertificateSource", "SECRET_TYPE_URL", "ISTIO_SDS_SOCKET", "default_node"]

log = logging.getLogger(__name__)

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
#: the Istio agent's SDS socket (what sidecars use; ``unix:./etc/istio/proxy/SDS`` on older agents)
ISTIO_SDS_SOCKET = "/var/run/secrets/workload-spiffe-uds/socket"

_BACKOFF_INITIAL = 0.1
_BACKOFF_MAX = 5.0
_INVALID_ARGUMENT = 3
_RESOURCE_WRAPPER = "type.googleapis.com/envoy.service.discovery.v3.Resource"


def default_node() -> Any:
    """The ``envoy.config.core.v3.Node`` sent when none is given: a sidecar-like id from
    ``$POD_NAME``/``$POD_NAMESPACE``/``$INSTANCE_IP`` when any is set
    (``sidecar~<ip>~<pod>.<ns>~<ns>.svc.cluster.local``), else
    ``meshcore~127.0.0.1~meshcore.default~default.svc.cluster.local``."""
    from envoy.config.core.v3 import base_pb2

    from .. import __version__

    pod, ns, ip = (os.environ.get(k, "") for k in ("POD_NAME", "POD_NAMESPACE", "INSTANCE_IP"))
    if pod or ns or ip:
        ns = ns or "default"
        node_id = f"sidecar~{ip or '127.0.0.1'}~{pod or socket.gethostname()}.{ns}~{ns}.svc.cluster.local"
    else:
        node_id = "meshcore~127.0.0.1~meshcore.default~default.svc.cluster.local"
    return base_pb2.Node(id=node_id, user_agent_name="meshcore", user_agent_version=__version__)


class _Rejected(Exception):
    """A response that cannot be used (its message becomes the NACK's error_detail)."""


def _data(ds: Any, what: str) -> bytes:
    kind = ds.WhichOneof("specifier")
    if kind == "inline_bytes":
        data = bytes(ds.inline_bytes)
    elif kind == "inline_string":
        data = ds.inline_string.encode("utf-8")
    elif kind == "filename":
        try:
            with open(ds.filename, "rb") as f:
                data = f.read()
        except OSError as e:
            raise _Rejected(f"{what}: cannot read {ds.filename!r}: {type(e).__name__}: {e}") from None
    elif kind == "environment_variable":
        value = os.environ.get(ds.environment_variable)
        if value is None:
            raise _Rejected(f"{what}: environment variable {ds.environment_variable!r} is not set")
        data = value.encode("utf-8")
    else:
        raise _Rejected(f"{what}: no data (DataSource {kind or 'unset'} is not supported)")
    if not data.strip():
        raise _Rejected(f"{what}: empty")
    return data


class _Stream:
    """The state and the thread behind one :class:`SdsCertificateSource` (the thread refers to
    this object only, so a source nobody holds any more can be collected and its stream closed)."""

    def __init__(self, target: str, name: str, identity_secret: Optional[str], roots_secret: Optional[str],
                 node: Any) -> None:
        self.target = target
        self.name = name
        self.identity_secret = identity_secret
        self.roots_secret = roots_secret
        self.names = [n for n in (identity_secret, roots_secret) if n is not None]
        self.node = node
        self.lock = threading.Lock()
        self.set: Optional[CertificateSet] = None
        self.generation = 0
        self.ready = threading.Event()
        # last accepted secret contents (None: not received yet) and SotW version
        self.chain: Optional[bytes] = None
        self.key: Optional[bytes] = None
        self.roots: Optional[bytes] = None
        self.version = ""
        self.problem: Optional[str] = None
        self.reloads = 0
        self.reload_failures = 0
        self.responses = 0
        self.streams = 0
        self.closed = False
        self.wake = threading.Event()
        self.call: Any = None
        self.requests: Optional["queue.SimpleQueue[Any]"] = None
        self.thread = threading.Thread(target=self._run, name=f"meshcore-sds[{name}]", daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------------

    def close(self, join: bool = True) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            call, requests = self.call, self.requests
        self.wake.set()
        if requests is not None:
            requests.put(None)
        if call is not None:
            call.cancel()
        if join and self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=5)

    def missing(self) -> List[str]:
        have = {self.identity_secret: self.chain, self.roots_secret: self.roots}
        return [n for n in self.names if have.get(n) is None]

    # -- the stream loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        delay = _BACKOFF_INITIAL
        last_status = None
        while not self.closed:
            self.wake.clear()
            got_response, status = self._run_stream()
            if self.closed:
                return
            if got_response:
                delay = _BACKOFF_INITIAL
            with self.lock:
                self.problem = f"SDS stream to {self.target} failed: {status}; retrying in {delay:.1f} s"
            if got_response or status != last_status:  # once per outage, not once per attempt
                log.warning("certificates %r: %s%s", self.name, self.problem,
                            " (keeping the last good ones)" if self.set is not None else "")
            last_status = status
            self.wake.wait(delay)
            if not got_response:
                delay = min(delay * 2, _BACKOFF_MAX)

    def _request(self, nonce: str = "", error: Optional[str] = None, first: bool = False) -> Any:
        from envoy.service.discovery.v3 import discovery_pb2

        req = discovery_pb2.DiscoveryRequest(version_info=self.version, resource_names=self.names,
                                             type_url=SECRET_TYPE_URL, response_nonce=nonce)
        if first:
            req.node.CopyFrom(self.node)
        if error is not None:
            req.error_detail.code = _INVALID_ARGUMENT
            req.error_detail.message = error
        return req

    def _run_stream(self) -> Tuple[bool, str]:
        """One stream, until it ends; returns (a response arrived, why it ended)."""
        got_response = False
        channel = call = None
        requests: "queue.SimpleQueue[Any]" = queue.SimpleQueue()

        def request_iterator() -> Any:
            while True:
                req = requests.get()
                if req is None:
                    return
                yield req

        try:
            import grpc
            from envoy.service.secret.v3 import sds_pb2_grpc

            if self.node is None:
                self.node = default_node()
            # a fresh channel (and subchannel pool) per stream: reconnecting follows the backoff
            # here, not grpc's own connect backoff stacked on it
            channel = grpc.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)])
            requests.put(self._request(first=True))
            call = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets(request_iterator())
            with self.lock:
                self.streams += 1
                self.call, self.requests = call, requests
                if self.closed:
                    call.cancel()
            for resp in call:
                got_response = True
                requests.put(self._on_response(resp))
            return got_response, "stream closed by the server"
        except Exception as e:  # grpc.RpcError, or anything else: the loop must go on
            code = getattr(e, "code", None)
            if callable(code) and callable(getattr(e, "details", None)):
                c = code()
                return got_response, f"{getattr(c, 'name', c)}: {e.details()}"  # type: ignore[attr-defined]
            log.exception("certificates %r: SDS stream failed", self.name)
            return got_response, f"{type(e).__name__}: {e}"
        finally:
            requests.put(None)  # ends grpc's request-consuming thread
            with self.lock:
                self.call = self.requests = None
            if call is not None:
                call.cancel()
            if channel is not None:
                channel.close()

    # -- responses ----------------------------------------------------------------------------------

    def _on_response(self, resp: Any) -> Any:
        """Apply one response; returns the ACK or NACK to send."""
        self.responses += 1
        try:
            chain, key, roots = self._decode(resp)
        except _Rejected as e:
            return self._nack(resp, str(e))
        except Exception as e:  # noqa: BLE001  (never let a bad response end the thread)
            return self._nack(resp, f"{type(e).__name__}: {e}")
        complete = all(v is not None for n, v in ((self.identity_secret, chain), (self.roots_secret, roots))
                       if n is not None)
        with self.lock:
            new: Optional[CertificateSet] = None
            if (chain, key, roots) != (self.chain, self.key, self.roots):
                # checked as CertificateSet checks them (a half-updated pair raises ValueError);
                # the roots alone first, so the NACK names the secret at fault
                which = self.roots_secret
                try:
                    if roots is not None and roots != self.roots:
                        CertificateSet(0, None, None, roots)
                    which = self.identity_secret
                    new = CertificateSet(self.generation + 1, chain, key, roots)
                except Exception as e:  # noqa: BLE001  (ValueError from the checks, or a parser's own)
                    return self._nack_locked(resp, f"secret {which!r}: {e}")
            self.chain, self.key, self.roots = chain, key, roots
            self.version = resp.version_info
            self.problem = None
            if new is not None and complete:
                self.generation += 1
                self.set = new
                self.reloads += 1
                log.log(logging.INFO if new.generation > 1 else logging.DEBUG,
                        "certificates %r: generation %d from SDS (%s)", self.name, new.generation,
                        new.spiffe_id or f"{new.root_count} roots")
        if complete:
            self.ready.set()
        return self._request(resp.nonce)

    def _decode(self, resp: Any) -> Tuple[Optional[bytes], Optional[bytes], Optional[bytes]]:
        """The secret contents this response leaves in force (raises _Rejected)."""
        from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
        from envoy.service.discovery.v3 import discovery_pb2

        if resp.type_url != SECRET_TYPE_URL:
            raise _Rejected(f"unexpected type_url {resp.type_url!r} (asked for {SECRET_TYPE_URL})")
        chain, key, roots = self.chain, self.key, self.roots
        for any_ in resp.resources:
            if any_.type_url == _RESOURCE_WRAPPER:
                wrapper = discovery_pb2.Resource()
                any_.Unpack(wrapper)
                any_ = wrapper.resource
            if any_.type_url != SECRET_TYPE_URL:
                raise _Rejected(f"a resource of type {any_.type_url!r} in an SDS response")
            secret = secret_pb2.Secret()
            try:
                any_.Unpack(secret)
            except Exception as e:  # noqa: BLE001  (protobuf's DecodeError)
                raise _Rejected(f"a Secret that does not parse: {e}") from None
            name = secret.name
            if name == self.identity_secret:
                if not secret.HasField("tls_certificate"):
                    raise _Rejected(f"secret {name!r}: expected a tls_certificate, got "
                                    f"{secret.WhichOneof('type') or 'nothing'}")
                tc = secret.tls_certificate
                if tc.HasField("private_key_provider"):
                    raise _Rejected(f"secret {name!r}: private_key_provider is not supported")
                chain = _data(tc.certificate_chain, f"secret {name!r} certificate_chain")
                key = _data(tc.private_key, f"secret {name!r} private_key")
            elif name == self.roots_secret:
                if not secret.HasField("validation_context"):
                    raise _Rejected(f"secret {name!r}: expected a validation_context, got "
                                    f"{secret.WhichOneof('type') or 'nothing'}")
                roots = _data(secret.validation_context.trusted_ca, f"secret {name!r} trusted_ca")
            else:
                log.debug("certificates %r: ignoring SDS secret %r (not asked for)", self.name, name)
        return chain, key, roots

    def _nack(self, resp: Any, message: str) -> Any:
        with self.lock:
            return self._nack_locked(resp, message)

    def _nack_locked(self, resp: Any, message: str) -> Any:
        self.reload_failures += 1
        problem = f"SDS response (version {resp.version_info!r}) rejected: {message}"
        if problem != self.problem:
            log.warning("certificates %r: %s; %s", self.name, problem,
                        "keeping the last good ones" if self.set is not None else "no TLS until fixed")
        self.problem = problem
        return self._request(resp.nonce, error=message)


class SdsCertificateSource:
    """A workload identity and root bundle pushed over SDS (see the module docstring).

    ``target``: a gRPC target (``unix:///path``, ``unix:relative/path``, ``host:port``).
    ``identity_secret``/``roots_secret``: the secret names (Istio: ``default``, ``ROOTCA``); one
    of them may be ``None`` for a roots-only or identity-only source. ``node``: the
    ``envoy.config.core.v3.Node`` to send (default :func:`default_node`). The stream starts at
    once, in a daemon thread. Thread-safe.
    """

    def __init__(self, target: str, *, name: str = "sds", identity_secret: Optional[str] = "default",
                 roots_secret: Optional[str] = "ROOTCA", node: Any = None) -> None:
        if not target:
            raise ValueError("an SDS certificate source needs a gRPC target")
        if identity_secret is None and roots_secret is None:
            raise ValueError("an SDS certificate source needs identity_secret or roots_secret")
        if identity_secret == roots_secret:
            raise ValueError(f"identity_secret and roots_secret are both {identity_secret!r}")
        self.name = name
        self.target = target
        self._s = _Stream(target, name, identity_secret, roots_secret, node)
        self._finalizer = weakref.finalize(self, self._s.close, False)
        self._s.thread.start()

    def __repr__(self) -> str:
        return f"SdsCertificateSource({self.target!r}, name={self.name!r}, generation={self._s.generation})"

    @property
    def files(self) -> List[str]:
        """No files to watch (the secrets are pushed)."""
        return []

    @property
    def problem(self) -> Optional[str]:
        """Why the last response was rejected or the stream is down (``None``: all well)."""
        return self._s.problem

    @property
    def reloads(self) -> int:
        """Good certificate sets loaded."""
        return self._s.reloads

    @property
    def reload_failures(self) -> int:
        """Responses rejected (NACKed)."""
        return self._s.reload_failures

    @property
    def streams(self) -> int:
        """SDS streams opened so far."""
        return self._s.streams

    def _waiting_for(self) -> str:
        missing = self._s.missing()
        if self._s.responses == 0 or len(missing) == len(self._s.names):
            return f"nothing received yet from the SDS server {self.target}"
        return f"waiting for SDS secret {', '.join(repr(n) for n in missing)} from {self.target}"

    def current(self) -> CertificateSet:
        """The good set to use now. Raises :class:`CertificatesUnavailable` before the first one."""
        s = self._s.set
        if s is None:
            raise CertificatesUnavailable(
                f"certificates {self.name!r} are not available: {self._s.problem or self._waiting_for()}")
        return s

    def peek(self) -> Optional[CertificateSet]:
        """The good set in use (``None`` before the first)."""
        return self._s.set

    def refresh(self, force: bool = False) -> bool:
        """SDS pushes, so there is nothing to look at: ``force`` cuts short a reconnect backoff.
        Returns ``False`` (a new set arrives on its own; see :meth:`wait`)."""
        if force:
            self._s.wake.set()
        return False

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the first good set has arrived; returns whether it has."""
        return self._s.ready.wait(timeout)

    def identity(self) -> WorkloadIdentity:
        """What this source presents now (as :meth:`FileCertificateSource.identity`)."""
        if self._s.set is None:
            return WorkloadIdentity(self.name, None, (), (), None, None, None, 0, 0,
                                    self._s.problem or self._waiting_for())
        return FileCertificateSource.identity(self)  # type: ignore[arg-type]  (same duck-typed fields)

    def close(self) -> None:
        """Cancel the stream and end the thread (idempotent). The last good set stays readable."""
        self._finalizer.detach()
        self._s.close()

    @property
    def closed(self) -> bool:
        return self._s.closed

    def __enter__(self) -> "SdsCertificateSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
