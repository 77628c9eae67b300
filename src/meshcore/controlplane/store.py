"""The control plane's versioned resource store.

Every change bumps a global counter; each type URL remembers the counter value at which it last
changed (its SotW ``version_info``) and each resource carries a short hash of its deterministic
serialization (its delta ``version``). Readers get immutable :class:`Snapshot` objects; writers
replace whole dictionaries (copy on write), so a snapshot never changes under a reader.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Dict, Iterable, List, Mapping, Tuple

from google.protobuf import any_pb2
from google.protobuf.message import Message

from ..xds.model import TYPE_URLS
from ..xds.resource_file import Resources, parse_resources, type_url_of

__all__ = ["Entry", "Snapshot", "SnapshotStore", "normalize_resources", "resource_version"]

logger = logging.getLogger(__name__)


def resource_version(message: Message) -> str:
    """A short, stable hash of a message's deterministic serialization (10 hex digits)."""
    return hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()[:10]


@dataclass(frozen=True)
class Entry:
    """One stored resource: the message, its packed ``Any``, its hash and the global version at which
    it last changed."""

    name: str
    message: Message
    packed: any_pb2.Any
    version: str  # content hash (delta ``Resource.version``)
    changed_at: int  # global counter value of the change that produced this content

    @classmethod
    def make(cls, name: str, message: Message, changed_at: int) -> "Entry":
        data = message.SerializeToString(deterministic=True)
        packed = any_pb2.Any(type_url=type_url_of(message), value=data)
        return cls(name, message, packed, hashlib.sha256(data).hexdigest()[:10], changed_at)


@dataclass(frozen=True)
class Snapshot:
    """An immutable view of the store at one global version."""

    version: int
    type_versions: Mapping[str, int]
    entries: Mapping[str, Mapping[str, Entry]]

    def type_version(self, type_url: str) -> str:
        """The SotW ``version_info`` of a type: the global version at which it last changed."""
        return str(self.type_versions.get(type_url, 0))

    def of_type(self, type_url: str) -> Mapping[str, Entry]:
        return self.entries.get(type_url, _EMPTY)


_EMPTY: Mapping[str, Entry] = MappingProxyType({})


def normalize_resources(resources: Any, source: str = "<resources>") -> Resources:
    """Accept ``{type_url: {name: message}}`` (from :mod:`meshcore.xds.resource_file`), an iterable of
    messages or dicts with ``@type``, or any shape :func:`parse_resources` accepts."""
    if isinstance(resources, (Message, Mapping)):
        return parse_resources(resources, source)
    if isinstance(resources, (str, bytes)):
        raise TypeError("resources must be messages, dicts or a {type_url: {name: message}} mapping")
    return parse_resources(list(resources), source)


class SnapshotStore:
    """Thread-safe versioned store; listeners are called (outside the lock) after each change."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: List[Callable[[Snapshot], None]] = []
        self._snapshot = Snapshot(0, MappingProxyType({url: 0 for url in TYPE_URLS}),
                                  MappingProxyType({url: _EMPTY for url in TYPE_URLS}))

    # -- reading ------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def version(self) -> str:
        return str(self._snapshot.version)

    def resources(self, type_url: str) -> Dict[str, Message]:
        return {name: e.message for name, e in self._snapshot.of_type(type_url).items()}

    # -- listening ----------------------------------------------------------------------------

    def add_listener(self, callback: Callable[[Snapshot], None]) -> None:
        with self._lock:
            self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[Snapshot], None]) -> None:
        with self._lock:
            if callback in self._listeners:
                self._listeners.remove(callback)

    # -- writing ------------------------------------------------------------------------------

    def set(self, resources: Resources) -> str:
        """Replace everything; returns the (possibly unchanged) global version."""
        with self._lock:
            old = self._snapshot
            types = set(old.entries) | set(resources)
            changes = {url: (dict(resources.get(url, {})), set(old.of_type(url)) - set(resources.get(url, {})))
                       for url in types}
            return self._apply(changes)

    def update(self, upserts: Resources, removes: Iterable[Tuple[str, str]] = ()) -> str:
        """Upsert ``upserts`` and delete ``removes`` (``(type_url, name)``; unknown names are ignored)."""
        changes: Dict[str, Tuple[Dict[str, Message], set]] = {}
        for url, by_name in upserts.items():
            changes.setdefault(url, ({}, set()))[0].update(by_name)
        for url, name in removes:
            changes.setdefault(url, ({}, set()))[1].add(name)
        with self._lock:
            return self._apply(changes, replace=False)

    def _apply(self, changes: Mapping[str, Tuple[Dict[str, Message], set]], replace: bool = True) -> str:
        old = self._snapshot
        version = old.version + 1
        entries = dict(old.entries)
        type_versions = dict(old.type_versions)
        changed_types = []
        for url, (upserts, removes) in changes.items():
            current = old.of_type(url)
            new: Dict[str, Entry] = dict(current)
            for name in removes:
                new.pop(name, None)
            for name, message in upserts.items():
                candidate = Entry.make(name, message, version)
                before = current.get(name)
                new[name] = before if before is not None and before.version == candidate.version else candidate
            if replace:
                new = {name: new[name] for name in upserts}
            if new.keys() != current.keys() or any(new[n] is not current[n] for n in new):
                entries[url] = MappingProxyType(new)
                type_versions[url] = version
                changed_types.append(url)
        if not changed_types:
            return str(old.version)
        snap = Snapshot(version, MappingProxyType(type_versions), MappingProxyType(entries))
        self._snapshot = snap
        listeners = list(self._listeners)
        logger.debug("store version %d: changed %s", version, changed_types)
        # Listeners only enqueue wake-ups; calling them under the lock keeps pushes in version order.
        for callback in listeners:
            try:
                callback(snap)
            except Exception:  # a broken listener must not break the store
                logger.exception("store listener failed")
        return str(version)

