"""The peer's Istio metadata under grpcio: a tap on the endpoint channel's connections.

grpc-core parses the ``x-envoy-peer-metadata`` response header into its own metadata trait (for
its CSM observability plugin) and never shows it to the application, so a server's (or its
sidecar's) answer to Istio's metadata exchange is invisible to grpcio's caller. While the
exchange is on (``mesh.telemetry.enable_istio_metrics()``), a per-endpoint channel therefore
connects through a :class:`PeerTap`: a unix socket in a fresh private directory (mode 0700) of
this process (connections from other processes refused, as the TLS forwarder does) whose
connections are copied byte for byte to the endpoint (or to its TLS forward),
the server's bytes read as HTTP/2 frames on their way back, their header blocks decoded with
``hpack`` (the same HPACK state the client keeps), and the last ``x-envoy-peer-metadata`` value
kept (:attr:`PeerTap.peer`). The value is recorded before the bytes are passed on, so it is
known when grpcio reports the RPC. One connection is one server, whose value is the same on
every response: the value of the tap is the value of any RPC on it.

Cost (only while the exchange is on): one more local hop per connection (two copying threads)
and an HPACK decode per response header block, about 90 µs per call here; so only the first call
to an endpoint address (and one a minute after, :data:`RELEARN_S`) goes through a tapped channel:
what it learned (the server's value, or that it sent none) stands for the calls to that address in
between, which take the direct channel (:func:`needs_tap`, :func:`peer_of`). Without ``hpack`` installed there is no tap
(logged once): destination labels then come from the endpoint's EDS metadata.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from ...tls.forwarder import _peer_is_this_process

log = logging.getLogger(__name__)

_HEADERS, _PUSH_PROMISE, _CONTINUATION = 1, 5, 9
_END_HEADERS, _PADDED, _PRIORITY = 0x4, 0x8, 0x20
_PEER = b"x-envoy-peer-metadata"
_STATUS = b":status"
_AVAILABLE: List[Optional[bool]] = [None]  # whether hpack imports (asked once)


def available() -> bool:
    """Whether taps can be made (``hpack`` importable; tried once per process)."""
    ok = _AVAILABLE[0]
    if ok is None:
        try:
            import hpack  # noqa: F401
            ok = True
        except ImportError:
            ok = False
            log.info("gRPC: hpack is not installed, so the peer's x-envoy-peer-metadata cannot be read "
                     "(grpcio hides it); destination labels come from EDS metadata")
        _AVAILABLE[0] = ok
    return ok


class H2HeaderSniffer:
    """Reads one direction of an HTTP/2 connection (the server's: no preface) frame by frame and
    calls ``on_header(name, value)`` (bytes) for every header of every header block. A frame it
    cannot parse stops the sniffing (never the connection)."""

    def __init__(self, on_header: Callable[[bytes, bytes], None]) -> None:
        import hpack

        self._decoder = hpack.Decoder()
        self._decoder.max_allowed_table_size = 1 << 20  # the encoder's size updates, whatever the client allowed
        self._buf = bytearray()
        self._block: Optional[bytearray] = None
        self._on_header = on_header
        self.broken = False

    def feed(self, data: bytes) -> None:
        if self.broken:
            return
        buf = self._buf
        buf += data
        try:
            while len(buf) >= 9:
                length = int.from_bytes(buf[0:3], "big")
                if len(buf) < 9 + length:
                    break
                ftype, flags = buf[3], buf[4]
                payload = bytes(buf[9:9 + length])
                del buf[:9 + length]
                if ftype == _HEADERS or ftype == _PUSH_PROMISE:
                    start, pad = 0, 0
                    if flags & _PADDED:
                        pad = payload[0]
                        start = 1
                    if ftype == _HEADERS and flags & _PRIORITY:
                        start += 5
                    elif ftype == _PUSH_PROMISE:
                        start += 4
                    self._block = bytearray(payload[start:len(payload) - pad])
                elif ftype == _CONTINUATION and self._block is not None:
                    self._block += payload
                else:
                    continue
                if flags & _END_HEADERS:
                    block, self._block = self._block, None
                    for name, value in self._decoder.decode(bytes(block), raw=True):
                        self._on_header(name, value)
        except Exception:  # noqa: BLE001  (not HTTP/2 as expected: stop reading, keep copying)
            log.debug("peer tap: cannot parse the server's HTTP/2 frames; no more peer metadata", exc_info=True)
            self.broken = True
            buf.clear()


def _connect(upstream: str) -> socket.socket:
    if upstream.startswith("unix:"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(upstream[5:])
        return s
    host, _, port = upstream.rpartition(":")
    # bounded: the accept thread must not hang on a blackholed endpoint (grpcio reconnects queue)
    s = socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S)
    s.settimeout(None)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


class PeerTap:
    """A local socket whose connections go to ``upstream`` (``host:port`` or ``unix:<path>``),
    recording the last ``x-envoy-peer-metadata`` the server sent (:attr:`peer`). ``target`` is
    what a grpcio channel dials."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.peer: Optional[str] = None
        self.answered = False
        self._dir = tempfile.mkdtemp(prefix="meshcore-peer-")
        os.chmod(self._dir, 0o700)
        path = os.path.join(self._dir, "s")
        self.target = "unix:" + path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(64)
        self._lock = threading.Lock()
        self._socks: List[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, name="meshcore-grpc-peer-tap", daemon=True).start()

    def _on_header(self, name: bytes, value: bytes) -> None:
        self.answered = True  # the server sent a header block (with or without the exchange)
        if name == _STATUS:  # a new response: its own exchange value, or none (a server restarted without it)
            self.peer = None
        elif name == _PEER:
            self.peer = value.decode("latin-1")

    def _accept(self) -> None:
        while True:
            try:
                local, _ = self._listener.accept()
            except OSError:
                return  # closed
            if not _peer_is_this_process(local):  # as the TLS forwarder: this process's channels only
                log.warning("peer tap %s: refused a connection from another process", self.target)
                local.close()
                continue
            try:
                up = _connect(self.upstream)
            except OSError as e:
                log.debug("peer tap: cannot connect to %s: %s", self.upstream, e)
                local.close()  # grpcio sees the connection fail, as it would have
                continue
            with self._lock:
                if self._closed:
                    local.close()
                    up.close()
                    return
                self._socks += (local, up)
            sniffer = H2HeaderSniffer(self._on_header)
            threading.Thread(target=self._copy, args=(local, up, None), daemon=True,
                             name="meshcore-grpc-peer-tap-up").start()
            threading.Thread(target=self._copy, args=(up, local, sniffer.feed), daemon=True,
                             name="meshcore-grpc-peer-tap-down").start()

    def _copy(self, src: socket.socket, dst: socket.socket, sniff: Optional[Callable[[bytes], None]]) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if sniff is not None:
                    sniff(data)  # before the client gets the bytes: known when grpcio reports the RPC
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._lock:
                for s in (src, dst):
                    if s in self._socks:
                        self._socks.remove(s)
                        s.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            socks, self._socks = self._socks, []
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"PeerTap({self.upstream!r} via {self.target!r})"


#: seconds a tap's connection to its endpoint may take
CONNECT_TIMEOUT_S = 10.0
#: seconds a learned answer (or the lack of one) stands before an endpoint's next call is tapped again
RELEARN_S = 60.0
#: (endpoint address, authority) -> (the peer metadata its server answered with, or None, when it
#: was read); by authority too: one address can front several services (an east-west gateway)
_LEARNED: Dict[Tuple[str, str], Tuple[Optional[str], float]] = {}
_LEARNED_MAX = 4096


def needs_tap(address: str, authority: str) -> bool:
    """Whether the next call to ``address`` for ``authority`` should go through a tap: nothing
    learned of its server yet, or what was learned is older than :data:`RELEARN_S`. (One server
    per address and authority answers the same metadata every time: one tapped call a minute is
    enough, and the calls in between take the direct channel, without the tap's local hop; a pod
    that took over a recycled address is learned at the next relearn.)"""
    hit = _LEARNED.get((address, authority))
    return hit is None or time.monotonic() - hit[1] > RELEARN_S


def peer_of(ep: Any) -> Optional[str]:
    """The peer metadata of the server behind endpoint channel ``ep``: what its tap saw last
    (learned for the address, also when the server sent none), else what a tapped call to the
    same address learned (None: nothing known; the EDS metadata then names the destination)."""
    tap = getattr(ep, "tap", None)
    if tap is None:
        hit = _LEARNED.get((getattr(ep, "address", ""), getattr(ep, "authority", "")))
        return None if hit is None else hit[0]
    peer = tap.peer
    if peer is not None or tap.answered:  # (a call that failed before any answer teaches nothing)
        if len(_LEARNED) >= _LEARNED_MAX:
            _LEARNED.clear()
        _LEARNED[(ep.address, ep.authority)] = (peer, time.monotonic())
    return peer
