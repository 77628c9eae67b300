"""Resources from a YAML/JSON file instead of a control plane (watched for changes).

The file holds the same Listener/RouteConfiguration/Cluster/ClusterLoadAssignment resources a
control plane would send (shapes: ``meshcore.xds.resource_file``). It is the complete state:
a resource missing from the file does not exist. A reload validates every resource; invalid
ones keep their last good value (as a NACK would) and valid ones apply; an invalid resource
without a last good value is unusable, and its entry (status NACKED, ``error``) says why. A file
that cannot be read or parsed at all changes nothing; the error is logged and shown in ``error``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Set, Tuple

from envoy.config.core.v3 import base_pb2

from ..errors import ConfigError
from .cache import DOES_NOT_EXIST, CacheEntry
from .model import TYPE_URLS
from .resource_types import RESOURCE_TYPES

__all__ = ["FileSource"]

log = logging.getLogger(__name__)
Key = Tuple[str, str]


class FileSource:
    """A resource source backed by one file; same ``watch``/``entry`` surface as the ADS client."""

    def __init__(self, path: str, on_update: Optional[Callable[[Set[Key]], None]] = None, *,
                 watch: bool = True, poll_interval: float = 1.0, node_id: str = "meshcore-static",
                 decoders: Optional[Mapping[str, Callable[..., object]]] = None) -> None:
        """``decoders``: type URL -> decoder replacing the default one (the Envoy shape decodes
        listeners as a sidecar gets them)."""
        self.path = os.fspath(path)
        self._decoders = dict(decoders or {})
        self.node = base_pb2.Node(id=node_id, user_agent_name="meshcore")
        self._on_update = on_update or (lambda changed: None)
        self._watch_file = watch
        self._poll_interval = poll_interval
        self._lock = threading.RLock()
        self._entries: Dict[str, Dict[str, CacheEntry]] = {t: {} for t in TYPE_URLS}
        self._watched: Dict[str, Set[str]] = {t: set() for t in TYPE_URLS}
        self._stamp: Optional[Tuple[float, int]] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.version = ""
        #: why the last reload failed as a whole (None when it was read)
        self.error: Optional[str] = None
        self.ambient_error: Optional[str] = None
        self.reloads = 0
        self.reload(notify=False)

    # -- source surface ------------------------------------------------------------------------

    def start(self) -> "FileSource":
        if self._watch_file and self._thread is None:
            self._thread = threading.Thread(target=self._poll, name="meshcore-file-source", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def watch(self, type_url: str, name: str) -> None:
        with self._lock:
            self._watched[type_url].add(name)
            if name not in self._entries[type_url]:
                e = CacheEntry(type_url, name)
                e.remove()  # the file is the whole state: absent means does not exist
                self._entries[type_url][name] = e

    def unwatch(self, type_url: str, name: str) -> None:
        with self._lock:
            self._watched[type_url].discard(name)

    def update_watches(self, add: Mapping[str, Iterable[str]], remove: Mapping[str, Iterable[str]]) -> None:
        with self._lock:
            for type_url, names in add.items():
                for name in names:
                    self.watch(type_url, name)
            for type_url, names in remove.items():
                for name in names:
                    self.unwatch(type_url, name)

    def entry(self, type_url: str, name: str) -> Optional[CacheEntry]:
        return self._entries[type_url].get(name)

    def entries(self) -> List[CacheEntry]:
        with self._lock:
            return [e for t in TYPE_URLS for e in self._entries[t].values()]

    def watched(self, type_url: str) -> List[str]:
        with self._lock:
            return sorted(self._watched[type_url])

    def names(self, type_url: str) -> List[str]:
        """Every resource of the type the file holds with a usable value (the wildcard view)."""
        with self._lock:
            return sorted(n for n, e in self._entries[type_url].items() if e.has_value)

    def wildcard_ready(self, type_url: str) -> bool:
        """The file is the whole state from the first read on."""
        return True

    # -- loading -------------------------------------------------------------------------------

    def _file_stamp(self) -> Optional[Tuple[float, int]]:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime, st.st_size)

    def reload(self, notify: bool = True) -> List[str]:
        """Read the file again; returns the validation errors (empty when all is well)."""
        from .resource_file import decode_document, parse_resources

        with self._lock:
            self._stamp = self._file_stamp()
            try:
                try:
                    with open(self.path, "rb") as f:
                        data = f.read()
                except OSError as e:
                    raise ConfigError(self.path, "(file)", f"cannot read: {e.strerror or e}") from None
                resources = parse_resources(decode_document(data, self.path), self.path)
            except ConfigError as e:
                self.error = str(e)  # names the file: its resource is the path
                self.ambient_error = self.error
                log.error("cannot load resources: %s", self.error)
                if self.reloads == 0 and not notify:
                    raise
                return [self.error]
            self.error = self.ambient_error = None
            version = hashlib.sha256(data).hexdigest()[:12]
            changed: Set[Key] = set()
            errors: List[str] = []
            for t in TYPE_URLS:
                rt = RESOURCE_TYPES[t]
                present = resources.get(t, {})
                for name, msg in present.items():
                    e = self._entries[t].get(name)
                    if e is None:
                        e = self._entries[t][name] = CacheEntry(t, name)
                    payload = msg.SerializeToString(deterministic=True)
                    if e.has_value and e.serialized == payload:
                        continue
                    try:
                        spec = self._decoders.get(t, rt.decode)(msg)
                    except (ConfigError, ValueError, TypeError) as err:
                        reason = str(err) if isinstance(err, ConfigError) else f"{name}: {err}"
                        kind = f"{t.rsplit('.', 1)[-1]} {name!r}"
                        if e.has_value:
                            errors.append(f"{kind} kept at its last good value: {reason}")
                        else:
                            errors.append(f"{kind} rejected (no last good value, unusable): {reason}")
                        e.reject(reason, version)
                        changed.add((t, name))
                        continue
                    from google.protobuf import any_pb2

                    packed = any_pb2.Any()
                    packed.Pack(msg)
                    e.accept(packed, payload, spec, version)
                    changed.add((t, name))
                for name, e in list(self._entries[t].items()):
                    if name not in present and e.status != DOES_NOT_EXIST:
                        e.remove()
                        changed.add((t, name))
                    if name not in present and name not in self._watched[t]:
                        del self._entries[t][name]
            self.version = version
            self.reloads += 1
            for msg in errors:
                log.warning("%s: invalid resource: %s", self.path, msg)
        if notify and changed:
            self._on_update(changed)
        return errors

    def _poll(self) -> None:
        while not self._stop.wait(self._poll_interval):
            if self._file_stamp() != self._stamp:
                try:
                    self.reload()
                except Exception:
                    log.exception("reloading %s failed", self.path)
