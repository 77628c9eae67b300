"""Mesh TLS under a client that cannot do it itself: an in-process TLS forwarder.

grpcio cannot verify a server whose certificate carries only a SPIFFE URI SAN (every Istio
workload: C-core's host name check looks at DNS/IP SANs only, and Python has no verify callback;
``security.md`` §5.5), and ``xds_channel_credentials`` only work under C-core's own ``xds:///``
resolver. So meshcore keeps grpcio's channel in plaintext and makes the TLS connection itself,
with the same :class:`~meshcore.tls.UpstreamTls` every other integration uses:

* :func:`forward` opens a :class:`Forward`: a unix socket in a fresh private directory (mode
  0700, so only this user's processes can reach it; every accepted connection must moreover
  come from this very process, checked with ``SO_PEERCRED`` on Linux). The client (a grpcio
  channel to ``unix:<path>``) connects there in plaintext.
* For every connection accepted, a NEW upstream connection is made to the endpoint: TCP
  connect, TLS handshake with ``tls.context(protocol)`` taken at that moment (a rotated
  certificate is used by new connections, open ones keep theirs), SNI
  ``tls.server_hostname(endpoint)``, then ``tls.check_peer`` (chain, SAN matchers). Not one byte
  of the client's is read, let alone forwarded, before all of that succeeded. Any failure
  (refused, timed out after the cluster's ``connect_timeout``, handshake refused, SAN mismatch)
  closes the client's connection at once, records the error on the :class:`Forward`
  (``failure``, a :class:`~meshcore.errors.UpstreamError` of kind ``connect-failure``; the
  TLS ones are :class:`~meshcore.tls.TlsHandshakeError`, counted in the cluster's ``ssl.*``
  stats) and logs it. A TLS 1.3 server refusing the client certificate after the handshake is
  seen as an error or close on the first read, before any byte from the server: that is
  recorded as the same kind of failure (``UpstreamTls.deferred_rejection``).
* Then bytes are copied both ways until either side closes (then both are closed).

One background thread (``meshcore-tls-forwarder``) runs every forward of the process on one
``epoll`` (``poll`` elsewhere) loop: non-blocking sockets, the handshake driven by the loop,
large reads into one shared buffer, a write straight after each read (data is only copied when
the peer cannot take it all), and back-pressure (a side whose peer is not writable is not read).
The thread starts with the first forward and ends when the last forward and connection are gone.

This is a sidecar in the process: what it verifies is exactly what :class:`UpstreamTls`
verifies. What it does not protect against: other processes of the same user that can
``ptrace`` this one or read its key files (they have the identity anyway).
"""

from __future__ import annotations

import atexit
import errno
import ipaddress
import logging
import os
import select
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

from ..errors import UpstreamError
from .upstream import TlsHandshakeError, is_deferred_rejection

__all__ = ["Forward", "forward", "forwarder_stats"]

log = logging.getLogger(__name__)

#: the shared read buffer (the loop is single-threaded: one buffer serves every connection)
_BUF_SIZE = 256 * 1024
#: a TLS record's plaintext is at most 16 KiB: a read that big suggests more is queued
_RECORD = 16 * 1024
_LOG_EVERY = 30.0  # seconds: the same failure of a forward is logged again after this long

if hasattr(select, "epoll"):
    _IN, _OUT = select.EPOLLIN, select.EPOLLOUT
    _ERR = select.EPOLLERR | select.EPOLLHUP
else:  # pragma: no cover  (macOS / BSD: poll)
    _IN, _OUT = select.POLLIN, select.POLLOUT
    _ERR = select.POLLERR | select.POLLHUP

_CONNECTING, _HANDSHAKING, _OPEN, _CLOSED = "connecting", "handshaking", "open", "closed"
_PARKED = -2  # the upstream descriptor is not in the poller (hung up, data left to deliver)
_UCRED = struct.Struct("3i")


class _Poller:
    """``epoll`` (or ``poll``) with timeouts in seconds (None: wait)."""

    def __init__(self) -> None:
        if hasattr(select, "epoll"):
            self._p: Any = select.epoll()
            self._ms = False
        else:  # pragma: no cover
            self._p = select.poll()
            self._ms = True

    def register(self, fd: int, mask: int) -> None:
        self._p.register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        self._p.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        try:
            self._p.unregister(fd)
        except (KeyError, OSError, ValueError):
            pass

    def poll(self, timeout: Optional[float]) -> List[Tuple[int, int]]:
        if self._ms:  # pragma: no cover
            return self._p.poll(None if timeout is None else max(0, int(timeout * 1000) + 1))
        return self._p.poll(-1 if timeout is None else timeout)

    def close(self) -> None:
        close = getattr(self._p, "close", None)
        if close is not None:
            close()


def _peer_is_this_process(conn: socket.socket) -> bool:
    """Whether the connecting socket belongs to this process (Linux ``SO_PEERCRED``; elsewhere
    the directory's 0700 mode is the only gate)."""
    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None:  # pragma: no cover
        return True
    try:
        pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, opt, _UCRED.size))
    except OSError:
        return False
    return pid == os.getpid() and uid == os.getuid()


def _sockaddr(host: str, port: int) -> Tuple[int, Tuple[Any, ...]]:
    """``(family, address)`` to connect to; a host name is resolved (blocking: EDS addresses
    are IP literals, so this is the exception)."""
    h = host[1:-1] if host.startswith("[") else host
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        info = socket.getaddrinfo(h, port, type=socket.SOCK_STREAM)
        family, _, _, _, addr = info[0]
        return family, addr
    if ip.version == 6:
        return socket.AF_INET6, (h, port, 0, 0)
    return socket.AF_INET, (h, port)


def _private_dir() -> str:
    """A new 0700 directory for one socket, short enough for ``sun_path`` (108 bytes)."""
    base = tempfile.gettempdir()
    if len(base) > 60:
        base = "/tmp"
    return tempfile.mkdtemp(prefix="meshcore-tls-", dir=base)


class Forward:
    """One forwarded endpoint: a private unix socket whose connections are carried over mesh
    TLS to ``endpoint``. Made by :func:`forward`; :meth:`close` when the endpoint is gone.

    ``target`` is what a grpcio channel dials (``unix:<path>``). ``failure`` is the error of
    the last upstream connection that failed (``None`` once one succeeded since: a byte came
    back from the server); ``failures`` / ``handshakes`` count them; ``open_connections`` is
    the number of connections being carried now.
    """

    def __init__(self, tls: Any, endpoint: Any, protocol: str, connect_timeout: float,
                 server_hostname: Optional[str]) -> None:
        self.tls = tls
        self.endpoint = endpoint
        self.endpoint_key: str = endpoint.key
        self.protocol = protocol
        self.connect_timeout = connect_timeout
        self.server_hostname = server_hostname
        self._family, self._addr = _sockaddr(endpoint.address, int(endpoint.port))
        self.dir = _private_dir()
        self.path = os.path.join(self.dir, "s")
        self.target = "unix:" + self.path
        self.failure: Optional[UpstreamError] = None
        self.failed_at = 0.0
        self.failures = 0
        self.handshakes = 0
        self.closed = False
        self._logged: Tuple[str, float] = ("", 0.0)
        self._pipes: Set["_Pipe"] = set()
        self._done = threading.Event()
        self._loop: Optional["_Loop"] = None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            sock.listen(64)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            self._remove_files()
            raise
        self.sock = sock

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._pipes)} open"
        return f"Forward({self.endpoint_key} via {self.tls!r}, {state})"

    @property
    def open_connections(self) -> int:
        return len(self._pipes)

    def close(self, wait: float = 0.0) -> None:
        """Stop listening (the socket file is gone when this returns) and have the forwarder
        thread close every connection carried, both sides; ``wait``: seconds to wait until it
        did (not when called on that thread)."""
        if self.closed:
            return
        self.closed = True
        self._remove_files()  # nothing new can connect from now on
        loop = self._loop
        if loop is None or not loop.post(self._shutdown):
            self._shutdown()  # no loop thread: nothing else uses the sockets
            return
        if wait > 0 and threading.current_thread() is not loop.thread:
            self._done.wait(wait)

    # -- on the loop thread -----------------------------------------------------------------------

    def _shutdown(self, loop: Optional["_Loop"] = None) -> None:
        for pipe in list(self._pipes):
            pipe.close()
        if loop is not None and self in loop.forwards:
            loop.remove(self.sock.fileno())
            loop.forwards.discard(self)
        self.sock.close()
        self._done.set()

    def _remove_files(self) -> None:
        for f in (lambda: os.unlink(self.path), lambda: os.rmdir(self.dir)):
            try:
                f()
            except OSError:
                pass

    def _accept(self, loop: "_Loop", events: int) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("forwarder for %s: accept failed: %s", self.endpoint_key, e)
                return
            if self.closed:
                conn.close()  # closing: the loop shuts the forward down next
                continue
            if not _peer_is_this_process(conn):
                log.warning("forwarder for %s: refused a connection from another process", self.endpoint_key)
                conn.close()
                continue
            conn.setblocking(False)
            pipe = _Pipe(loop, self, conn)
            self._pipes.add(pipe)
            pipe.start()

    def _failed(self, err: UpstreamError) -> None:
        self.failure = err
        self.failed_at = time.monotonic()
        self.failures += 1
        text, at = self._logged
        msg = str(err)
        if msg != text or self.failed_at - at > _LOG_EVERY:
            self._logged = (msg, self.failed_at)
            log.warning("%s", msg)

    def _succeeded(self) -> None:
        if self.failure is not None:
            log.info("TLS to %s (cluster %s) works again", self.endpoint_key, getattr(self.tls, "cluster", "?"))
            self.failure = None
            self._logged = ("", 0.0)


class _Pipe:
    """One client connection and its upstream TLS connection (loop thread only)."""

    __slots__ = ("loop", "fwd", "local", "raw", "up", "state", "deadline", "up_pending", "down_pending",
                 "got_any", "read_wants_write", "closing", "lmask", "umask", "lfd", "ufd")

    def __init__(self, loop: "_Loop", fwd: Forward, local: socket.socket) -> None:
        self.loop = loop
        self.fwd = fwd
        self.local = local
        self.lfd = local.fileno()
        self.raw: Optional[socket.socket] = None
        self.up: Any = None  # the SSLSocket once wrapped
        self.ufd = -1
        self.state = _CONNECTING
        self.deadline = 0.0
        self.up_pending = b""    # client -> server bytes the server could not take yet
        self.down_pending = b""  # server -> client bytes the client could not take yet
        self.got_any = False     # a byte came from the server (the connection is proven)
        self.read_wants_write = False
        self.closing = False     # the server closed: close once down_pending is delivered
        self.lmask = -1
        self.umask = -1

    # -- connecting ---------------------------------------------------------------------------------

    def start(self) -> None:
        fwd = self.fwd
        self.deadline = time.monotonic() + fwd.connect_timeout
        try:
            raw = socket.socket(fwd._family, socket.SOCK_STREAM)
        except OSError as e:
            self.fail(UpstreamError("connect-failure", f"cannot make a socket to {fwd.endpoint_key}: {e}", e))
            return
        self.raw = raw
        self.ufd = raw.fileno()
        raw.setblocking(False)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        err = raw.connect_ex(fwd._addr)
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            self.fail(self._connect_error(err))
            return
        self.loop.pending.add(self)
        self.loop.add(self.ufd, _OUT, self.on_upstream)
        self.umask = _OUT
        # the client's socket is not read (nor watched) until the upstream is proven
        if err == 0:
            self.connected()

    def _connect_error(self, err: int) -> UpstreamError:
        fwd = self.fwd
        return UpstreamError("connect-failure", f"connection to {fwd.endpoint_key} (cluster "
                             f"{getattr(fwd.tls, 'cluster', '?')}) failed: {os.strerror(err)}")

    def connected(self) -> None:
        fwd = self.fwd
        assert self.raw is not None
        err = self.raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.fail(self._connect_error(err))
            return
        try:
            ctx = fwd.tls.context(fwd.protocol)  # the current certificates, per new connection
            self.up = ctx.wrap_socket(self.raw, server_hostname=fwd.server_hostname,
                                      do_handshake_on_connect=False, suppress_ragged_eofs=False)
        except TlsHandshakeError as e:
            self.fail(e)
            return
        except (OSError, ValueError) as e:
            self.fail(fwd.tls.handshake_error(e, fwd.endpoint_key))
            return
        self.raw = None  # the SSLSocket owns the descriptor (same number) now
        self.state = _HANDSHAKING
        self.handshake()

    def handshake(self) -> None:
        fwd = self.fwd
        try:
            self.up.do_handshake()
        except ssl.SSLWantReadError:
            self._umask(_IN)
            return
        except ssl.SSLWantWriteError:
            self._umask(_OUT)
            return
        except (OSError, ValueError) as e:
            self.fail(fwd.tls.handshake_error(e, fwd.endpoint_key))
            return
        try:
            fwd.tls.check_peer(self.up, fwd.endpoint_key)  # before any byte of the client's
        except TlsHandshakeError as e:
            self.fail(e)
            return
        except Exception as e:  # noqa: BLE001  (a bug must not let the connection through)
            self.fail(TlsHandshakeError(getattr(fwd.tls, "cluster", "?"), fwd.endpoint_key,
                                        f"peer check failed: {type(e).__name__}: {e}", cause=e))
            return
        fwd.handshakes += 1
        self.state = _OPEN
        self.loop.pending.discard(self)
        self.loop.add(self.lfd, _IN, self.on_local)
        self.lmask = _IN
        self._umask(_IN)
        if self.up.pending():
            self.pump_down()

    def fail(self, err: UpstreamError) -> None:
        """The upstream connection could not be made: record why, close the client's side."""
        self.fwd._failed(err)
        self.close()

    def expire(self) -> None:
        fwd = self.fwd
        if self.state == _CONNECTING:
            self.fail(UpstreamError("connect-failure", f"connection to {fwd.endpoint_key} (cluster "
                                    f"{getattr(fwd.tls, 'cluster', '?')}) timed out after "
                                    f"{fwd.connect_timeout:g}s"))
        else:
            self.fail(fwd.tls.handshake_error(
                TimeoutError(f"no handshake within the cluster's connect timeout ({fwd.connect_timeout:g}s)"),
                fwd.endpoint_key))

    # -- events ------------------------------------------------------------------------------------

    def on_upstream(self, events: int) -> None:
        state = self.state
        if state == _OPEN:
            if self.up_pending and events & (_OUT | _IN | _ERR):
                self.flush_up()
                if self.state != _OPEN:
                    return
            if self.read_wants_write and events & _OUT:
                self.read_wants_write = False
                self.pump_down()
            elif events & (_IN | _ERR):
                if not self.down_pending:
                    self.pump_down()
                elif events & _ERR:
                    # the server hung up while the client is slow to read: stop watching the
                    # server (a hang-up is reported until unregistered); what it sent is read
                    # once the client has taken the rest (flush_down)
                    self.loop.remove(self.ufd)
                    self.umask = _PARKED
        elif state == _HANDSHAKING:
            self.handshake()
        elif state == _CONNECTING:
            self.connected()

    def on_local(self, events: int) -> None:
        if events & _ERR and not events & _IN:
            self.close()  # the client is gone
            return
        if self.down_pending and events & _OUT:
            self.flush_down()
            if self.state != _OPEN:
                return
        if events & _IN:
            if not self.up_pending:
                self.pump_up()
            elif events & _ERR:
                self.close()  # the client hung up with data the server cannot take: nobody to answer

    # -- copying -----------------------------------------------------------------------------------

    def pump_up(self) -> None:
        """Client -> server: one read, written at once (the rest kept if the server is slow)."""
        buf = self.loop.view
        try:
            n = self.local.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not n:
            self.close()  # the client closed (channel closed or idle)
            return
        try:
            sent = self.up.send(buf[:n])
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0
        except OSError as e:
            self.upstream_error(e)
            return
        if sent < n:
            self.up_pending = bytes(buf[sent:n])
            self._update()

    def flush_up(self) -> None:
        data = self.up_pending
        try:
            sent = self.up.send(data)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return
        except OSError as e:
            self.upstream_error(e)
            return
        self.up_pending = data[sent:]
        self._update()

    def pump_down(self) -> None:
        """Server -> client: read what TLS has (records until the buffer is full or the socket
        is drained), write it at once."""
        buf = self.loop.view
        size = len(buf)
        up = self.up
        n = 0
        eof = False
        while n < size:
            try:
                k = up.recv_into(buf[n:] if n else buf)
            except ssl.SSLWantReadError:
                if self.umask == _PARKED and not n:
                    self.close()  # hung up, nothing more to read
                    return
                break
            except ssl.SSLWantWriteError:
                self.read_wants_write = True
                break
            except OSError as e:
                if n:
                    self.deliver(n)
                self.upstream_error(e)
                return
            if not k:
                eof = True
                break
            n += k
            if k < _RECORD - 64 and not up.pending():
                break  # most likely drained; the poller says if more comes
        if n:
            self.deliver(n)
            if self.state != _OPEN:
                return
        if eof:
            if not self.got_any:
                self.upstream_error(ConnectionResetError("the server closed the connection"))
            elif self.down_pending:
                self.closing = True
                self._update()
            else:
                self.close()
        elif self.read_wants_write:
            self._update()

    def deliver(self, n: int) -> None:
        if not self.got_any:
            self.got_any = True
            self.fwd._succeeded()
        buf = self.loop.view
        try:
            sent = self.local.send(buf[:n])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        if sent < n:
            self.down_pending = bytes(buf[sent:n])
            self._update()

    def flush_down(self) -> None:
        data = self.down_pending
        try:
            sent = self.local.send(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        self.down_pending = data[sent:]
        if self.down_pending:
            return
        if self.closing:
            self.close()
            return
        self._update()
        if self.umask == _PARKED or self.up.pending():  # bytes the poller cannot tell us about
            self.pump_down()

    def upstream_error(self, exc: BaseException) -> None:
        fwd = self.fwd
        if not self.got_any and is_deferred_rejection(exc):
            # TLS 1.3: the server refused our certificate after our handshake finished; nothing
            # reached the application: a connect failure
            self.fail(fwd.tls.deferred_rejection(exc, fwd.endpoint_key))
            return
        log.debug("forwarder for %s: upstream connection ended: %s", fwd.endpoint_key, exc)
        self.close()

    # -- registration --------------------------------------------------------------------------------

    def _umask(self, mask: int) -> None:
        if mask != self.umask and self.umask != _PARKED:
            self.loop.poller.modify(self.ufd, mask)
            self.umask = mask

    def _update(self) -> None:
        lm = (0 if self.up_pending or self.closing else _IN) | (_OUT if self.down_pending else 0)
        um = (0 if self.down_pending or self.closing else _IN) | (
            _OUT if self.up_pending or self.read_wants_write else 0)
        if lm != self.lmask:
            self.loop.poller.modify(self.lfd, lm)
            self.lmask = lm
        if um != self.umask and self.umask != _PARKED:
            self.loop.poller.modify(self.ufd, um)
            self.umask = um

    def close(self) -> None:
        if self.state == _CLOSED:
            return
        self.state = _CLOSED
        loop = self.loop
        loop.pending.discard(self)
        if self.lmask != -1:
            loop.remove(self.lfd)
        if self.umask not in (-1, _PARKED):
            loop.remove(self.ufd)
        for s in (self.local, self.up, self.raw):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass
        self.up = self.raw = None
        self.up_pending = self.down_pending = b""
        self.fwd._pipes.discard(self)


class _Loop:
    """The forwarder thread: one poller for every forward's listening socket and connection."""

    def __init__(self) -> None:
        self.poller = _Poller()
        self.handlers: Dict[int, Callable[[int], None]] = {}
        self.forwards: Set[Forward] = set()
        self.pending: Set[_Pipe] = set()  # connecting / handshaking: they have deadlines
        self.buffer = bytearray(_BUF_SIZE)
        self.view = memoryview(self.buffer)
        self.commands: Deque[Callable[["_Loop"], None]] = deque()
        self.stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.add(self._wake_r.fileno(), _IN, self._on_wake)
        self.thread = threading.Thread(target=self._run, name="meshcore-tls-forwarder", daemon=True)

    def add(self, fd: int, mask: int, handler: Callable[[int], None]) -> None:
        self.poller.register(fd, mask)
        self.handlers[fd] = handler

    def remove(self, fd: int) -> None:
        self.poller.unregister(fd)
        self.handlers.pop(fd, None)

    def post(self, command: Callable[["_Loop"], None]) -> bool:
        """Run ``command(loop)`` on the loop thread; False if the loop has stopped."""
        with _LOCK:
            if self.stopping:
                return False
            self.commands.append(command)
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, InterruptedError):
            pass  # the pipe is full: the loop is awake anyway
        except OSError:
            return True
        return True

    def _on_wake(self, events: int) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while self.commands:
            cmd = self.commands.popleft()
            try:
                cmd(self)
            except Exception:  # noqa: BLE001
                log.exception("forwarder command failed")

    def _timeout(self) -> Optional[float]:
        if not self.pending:
            return None
        now = time.monotonic()
        first = min(p.deadline for p in self.pending)
        return max(0.0, first - now)

    def _expire(self) -> None:
        now = time.monotonic()
        for p in [p for p in self.pending if p.deadline <= now]:
            p.expire()

    def _run(self) -> None:
        global _LOOP
        handlers = self.handlers
        poll = self.poller.poll
        try:
            while True:
                try:
                    events = poll(self._timeout())
                except InterruptedError:
                    continue
                for fd, ev in events:
                    h = handlers.get(fd)
                    if h is not None:
                        try:
                            h(ev)
                        except Exception:  # noqa: BLE001  (one connection's bug must not stop the others)
                            log.exception("forwarder: error on descriptor %d", fd)
                if self.pending:
                    self._expire()
                if not self.forwards and not self.pending and len(handlers) == 1:
                    with _LOCK:  # (forward() registers under it)
                        if not self.commands and not self.forwards and len(handlers) == 1:
                            self.stopping = True
                            if _LOOP is self:
                                _LOOP = None
                            break
        except BaseException:  # noqa: BLE001
            log.exception("forwarder loop crashed")
            with _LOCK:
                self.stopping = True
                if _LOOP is self:
                    _LOOP = None
            raise
        finally:
            self._close()

    def _close(self) -> None:
        for fwd in list(self.forwards):
            fwd._shutdown(self)
        for cmd in list(self.commands):  # posted after we decided to stop: cannot happen, but be safe
            try:
                cmd(self)
            except Exception:  # noqa: BLE001
                pass
        self.remove(self._wake_r.fileno())
        self.poller.close()
        self._wake_r.close()
        self._wake_w.close()


_LOCK = threading.Lock()
_LOOP: Optional[_Loop] = None


def forward(tls: Any, endpoint: Any, *, protocol: str = "h2", connect_timeout: float = 5.0,
            server_hostname: Optional[str] = None) -> Forward:
    """A :class:`Forward` to ``endpoint`` (``.key``, ``.address``, ``.port``) over ``tls`` (an
    :class:`~meshcore.tls.UpstreamTls`): listening as soon as this returns. ``server_hostname``:
    the SNI (default ``tls.server_hostname(endpoint)``). Raises
    :class:`~meshcore.tls.TlsHandshakeError` when the certificates are missing, ``OSError`` when
    the socket cannot be made."""
    global _LOOP
    # certificates must be there (raises TlsHandshakeError otherwise); a streamed source's first
    # wait happens here, on the caller's thread, never on the forwarder's
    tls.context(protocol)
    sni = server_hostname if server_hostname is not None else tls.server_hostname(endpoint)
    fwd = Forward(tls, endpoint, protocol, connect_timeout, sni)
    try:
        with _LOCK:
            loop = _LOOP
            if loop is None or loop.stopping:
                loop = _LOOP = _Loop()
                loop.thread.start()
            # registered from this thread (no wake-up needed: the poller reports the first
            # connection); the loop decides to stop only under the same lock
            fwd._loop = loop
            loop.forwards.add(fwd)
            loop.add(fwd.sock.fileno(), _IN, lambda ev: fwd._accept(loop, ev))
    except BaseException:
        fwd.sock.close()
        fwd._remove_files()
        raise
    return fwd


def forwarder_stats() -> Dict[str, Any]:
    """The forwarder thread's state (tests, debugging): running, forwards, open connections."""
    loop = _LOOP
    if loop is None:
        return {"running": False, "forwards": 0, "connections": 0}
    return {"running": loop.thread.is_alive(), "forwards": len(loop.forwards),
            "connections": sum(f.open_connections for f in list(loop.forwards))}


def _remove_files_at_exit() -> None:
    """Unlink the sockets of forwards still open when the interpreter exits (the daemon thread
    just stops; the directories would stay behind in the temp directory)."""
    loop = _LOOP
    if loop is not None:
        for fwd in list(loop.forwards):
            fwd._remove_files()


atexit.register(_remove_files_at_exit)


def _after_fork() -> None:  # the child has no forwarder thread; its forwards are the parent's
    global _LOOP, _LOCK
    _LOCK = threading.Lock()
    _LOOP = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
