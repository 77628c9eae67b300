"""The control plane's record of every discovery request received and response sent.

Each event is a plain dict (see :func:`request_event` / :func:`response_event`); tests and
debugging read them with :meth:`History.events` and :meth:`History.wait_for`.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from google.protobuf import json_format
from google.protobuf.message import Message

from ..xds.model import SHORT_NAMES
from ..xds.resource_file import MESSAGE_CLASSES, resource_name

__all__ = ["Event", "History", "request_event", "response_event"]

Event = Dict[str, Any]


def _status(message: Message, field: str) -> Optional[Dict[str, Any]]:
    if not message.HasField(field):
        return None
    status = getattr(message, field)
    return {"code": status.code, "message": status.message}


def _node(message: Message, with_node: bool) -> Optional[Dict[str, Any]]:
    if not with_node or not message.HasField("node"):
        return None
    return json_format.MessageToDict(message.node, preserving_proto_field_name=True)


def request_event(stream: int, mode: str, request: Message, with_node: bool) -> Event:
    """Event for a DiscoveryRequest (``mode="sotw"``) or DeltaDiscoveryRequest (``"delta"``).

    For delta requests ``names`` is the subscribe list and ``version_info`` is empty.
    """
    if mode == "sotw":
        names, subscribe, unsubscribe, initial = list(request.resource_names), [], [], {}
        version = request.version_info
    else:
        subscribe = list(request.resource_names_subscribe)
        names, unsubscribe = subscribe, list(request.resource_names_unsubscribe)
        initial, version = dict(request.initial_resource_versions), ""
    return {
        "dir": "req", "stream": stream, "mode": mode, "type_url": request.type_url,
        "version_info": version, "nonce": request.response_nonce, "names": names,
        "subscribe": subscribe, "unsubscribe": unsubscribe, "initial_resource_versions": initial,
        "removed": [], "error_detail": _status(request, "error_detail"),
        "node": _node(request, with_node), "time": time.monotonic(),
    }


def response_event(stream: int, mode: str, response: Message, names: Optional[List[str]] = None) -> Event:
    """Event for a DiscoveryResponse or DeltaDiscoveryResponse (``version_info`` = system version).

    ``names``: the SotW response's resource names, in order (decoded from the ``Any`` if omitted).
    """
    if mode == "sotw":
        version = response.version_info
        if names is None:
            names = [_name_of_any(a) for a in response.resources]
        removed: List[str] = []
    else:
        version = response.system_version_info
        names = [r.name for r in response.resources]
        removed = list(response.removed_resources)
    return {
        "dir": "resp", "stream": stream, "mode": mode, "type_url": response.type_url,
        "version_info": version, "nonce": response.nonce, "names": names, "subscribe": [],
        "unsubscribe": [], "initial_resource_versions": {}, "removed": removed,
        "error_detail": None, "node": None, "time": time.monotonic(),
    }


def _name_of_any(packed: Any) -> str:
    cls = MESSAGE_CLASSES.get(packed.type_url)
    if cls is None:
        return ""
    message = cls()
    packed.Unpack(message)
    return resource_name(message)


def describe(event: Event) -> str:
    """One line per event, for error messages."""
    kind = SHORT_NAMES.get(event["type_url"], event["type_url"])
    parts = [f"#{event['stream']} {event['dir']} {event['mode']} {kind}", f"v={event['version_info']!r}",
             f"nonce={event['nonce']!r}", f"names={event['names']}"]
    if event["removed"]:
        parts.append(f"removed={event['removed']}")
    if event["unsubscribe"]:
        parts.append(f"unsubscribe={event['unsubscribe']}")
    if event["initial_resource_versions"]:
        parts.append(f"initial={json.dumps(event['initial_resource_versions'], sort_keys=True)}")
    if event["error_detail"]:
        parts.append(f"error={event['error_detail']}")
    return " ".join(parts)


class History:
    """An append-only, thread-safe event list with waiting.

    ``limit`` (None: unbounded) keeps only about the last ``limit`` events, for long-running
    servers; indices given to :meth:`wait_for` then count from the oldest event kept.
    """

    def __init__(self, limit: Optional[int] = None) -> None:
        self._events: List[Event] = []
        self._cond = threading.Condition()
        self._limit = limit

    def append(self, event: Event) -> None:
        with self._cond:
            self._events.append(event)
            if self._limit is not None and len(self._events) > self._limit + self._limit // 10:
                del self._events[: len(self._events) - self._limit]
            self._cond.notify_all()

    def events(self) -> List[Event]:
        with self._cond:
            return list(self._events)

    def __len__(self) -> int:
        with self._cond:
            return len(self._events)

    def clear(self) -> None:
        with self._cond:
            self._events.clear()

    def wait_for(self, predicate: Callable[[Event], bool], timeout: float = 5.0, start: int = 0) -> Event:
        """The first event at index >= ``start`` matching ``predicate``; waits up to ``timeout`` seconds.

        Raises ``TimeoutError`` listing the recent events.
        """
        deadline = time.monotonic() + timeout
        index = start
        with self._cond:
            while True:
                while index < len(self._events):
                    event = self._events[index]
                    index += 1
                    if predicate(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    recent = "\n".join("  " + describe(e) for e in self._events[-40:]) or "  (no events)"
                    raise TimeoutError(f"no matching xDS event after {timeout}s; recent history:\n{recent}")
                self._cond.wait(remaining)
