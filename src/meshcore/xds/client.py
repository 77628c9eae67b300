"""The ADS client: one xDS stream (SotW or delta) in a background thread, and the resource cache.

Protocol rules (shared/docs/xds-client.md; Envoy's xDS protocol doc; gRPC A27/A46/A53/A57/A71):

* One ``AggregatedDiscoveryService`` stream at a time, to the first reachable server of the
  bootstrap's list (the others are fallbacks, tried in order when a stream fails before any
  response; the next stream after one that got a response starts at the primary again).
* Per type: SotW keeps the last accepted ``version_info`` (kept across streams), the last nonce
  (per stream) and the full name set, sent in every request. Requests are built when the
  transport asks for the next message, so several pending requests of one type coalesce into
  one carrying the newest state. Delta keeps per-resource versions for
  ``initial_resource_versions``, sends subscription changes as nonce-less requests and ACKs
  with the nonce only.
* Every response of a subscribed type is ACKed or NACKed. A NACK carries ``error_detail``
  (INVALID_ARGUMENT) listing every invalid resource; valid resources of the same response are
  still applied and invalid ones keep their last good value (A46). The SotW ``version_info``
  of a NACK is the last accepted one (Envoy, grpc-go).
* SotW LDS/CDS responses carry the full set: a cached, subscribed name missing from one is
  deleted (kept, marked DOES_NOT_EXIST, when the server has ``ignore_resource_deletion``).
  RDS/EDS are never deleted by absence. Delta deletes only through ``removed_resources``.
* The does-not-exist timer (15 s) starts for a name only once a request naming it has been
  written to a live stream (the transport asks for the next request only after the previous
  write completed), and not for names already cached; every timer of a stream is cancelled
  when the stream ends and re-armed on the next one.
* Reconnect: exponential backoff with jitter (1 s x 1.6, +-20 %, at most 120 s) after streams
  that got no response; at once after one that did (and the backoff restarts at 1 s after any
  response). A new stream re-sends the node, every subscription, the last versions and empty
  nonces. The cache keeps serving meanwhile. The schedule is owned here alone: grpc's channel
  has its own reconnect backoff (its subchannel waits 1 s, 1.6 s, ... after failed connects and
  fails RPCs fast meanwhile), which would stack on ours (a 3 s outage took 6.7 s to recover
  from instead of at most 3.1 s). So the channel of a stream that failed without a response is
  closed and the next attempt gets a fresh one (with its own subchannel pool, so no backoff
  state is shared): every attempt really connects, and nothing connects between attempts.
* No receive-size limit on the channel.

Wildcard subscriptions (:meth:`XdsClient.watch_all`, or ``wildcard_types=`` at construction;
what Envoy does for LDS and CDS, and what the "Envoy shape" uses against istiod's sidecar
generator): every resource of the type the server sends is cached, not only watched names.

* SotW: while the type has no named watch, its requests carry an empty ``resource_names``
  (the legacy wildcard, as Envoy sends it); with named watches too they carry ``"*"`` and the
  names (an empty list after explicit names would mean "unsubscribe all"). On LDS/CDS a
  response is the full set: every cached name of the type missing from it is deleted, and a
  named watch without a value that the response lacks is DOES_NOT_EXIST at once (no timer).
* Delta: ``resource_names_subscribe`` carries ``"*"`` (and any named watches); the first request
  on a new stream also carries ``initial_resource_versions`` for everything cached of the type;
  deletion only through ``removed_resources``.
* There is no does-not-exist timer for the wildcard itself: :meth:`XdsClient.wildcard_ready`
  turns true with the first response of the type after the wildcard request was written (and
  stays true across reconnects, the cache being kept), so a consumer can tell "not received
  yet" from "no such resource". ``on_update`` is called after every response, even one that
  changed nothing, so readiness is observable from the callback.
* A resource only the wildcard provides is dropped from the cache when the server deletes it
  (kept, DOES_NOT_EXIST, when also watched by name, or with ``ignore_resource_deletion``).
  :meth:`XdsClient.names` lists the cached names of a type. NACK rules are unchanged: a bad
  resource keeps its last good value (or is cached NACKED without one) and is named in the NACK.
* Named watches of a wildcard type go on the wire too (``["*", names...]``), which makes
  servers re-push the type whenever the named set changes (istiod ignores the names for a
  sidecar's LDS/CDS); a consumer of a wildcard type can read :meth:`XdsClient.entry` without
  watching.

Thread model: the stream thread reads responses and applies them; ``on_update`` is called on
it (and on the timer thread) with the set of ``(type_url, name)`` whose state changed, before
the next response is read. ``watch``/``unwatch`` may be called from any thread.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Dict, FrozenSet, Iterable, Iterator, List, Mapping, Optional, Set, Tuple

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import message as _message
from google.rpc import status_pb2

from ..errors import ConfigError
from .cache import ACKED, DOES_NOT_EXIST, NACKED, CacheEntry
from .model import SHORT_NAMES, TYPE_URLS
from .resource_types import RESOURCE_TYPES, RESOURCE_WRAPPER, ResourceType
from .timers import TimerQueue

__all__ = ["XdsClient", "Backoff", "WILDCARD"]

log = logging.getLogger(__name__)

Key = Tuple[str, str]
UpdateCallback = Callable[[Set[Key]], None]
Decoder = Callable[..., Any]  # (message, providers=None) -> model; raises ConfigError
_INVALID_ARGUMENT = 3


class Backoff:
    """Exponential backoff with jitter (gRPC's connection-backoff constants by default)."""

    def __init__(self, initial: float = 1.0, multiplier: float = 1.6, jitter: float = 0.2,
                 maximum: float = 120.0, rng: Optional[random.Random] = None) -> None:
        self.initial, self.multiplier, self.jitter, self.maximum = initial, multiplier, jitter, maximum
        self._rng = rng or random.Random()
        self._current = initial

    def reset(self) -> None:
        self._current = self.initial

    def next(self) -> float:
        """The next delay: the current base +- jitter; the base then grows (capped)."""
        delay = self._current * (1.0 + self._rng.uniform(-self.jitter, self.jitter))
        self._current = min(self._current * self.multiplier, self.maximum)
        return min(delay, self.maximum)


#: The wildcard resource name (xDS protocol: "*" subscribes to every resource of the type).
WILDCARD = "*"


class _Stream:
    """State of one ADS stream (nonces and what was sent are stream-scoped)."""

    def __init__(self, generation: int, server_index: int) -> None:
        self.generation = generation
        self.server_index = server_index
        self.pending: "OrderedDict[str, None]" = OrderedDict()  # types with something to send
        self.nonce: Dict[str, str] = {}
        # SotW: last names sent; delta: subscribed on stream. Holds WILDCARD while the type's
        # wildcard is on the wire (also for a legacy empty SotW list).
        self.sent_names: Dict[str, Set[str]] = {}
        self.explicit: Set[str] = set()  # SotW: types that sent a non-empty resource_names
        self.pending_error: Dict[str, status_pb2.Status] = {}
        self.ack_pending: Set[str] = set()  # delta: types whose last response is not yet ACKed
        self.seen: Dict[str, Set[str]] = {t: set() for t in TYPE_URLS}
        self.just_sent: List[Tuple[str, List[str]]] = []  # written once the transport asks again
        self.first = True  # the node goes in the first message only
        self.got_response = False
        self.closed = False
        self.call: Any = None
        self.responses = 0


class XdsClient:
    """ADS subscription client; see the module docstring for the protocol rules."""

    def __init__(
        self,
        bootstrap: Any,
        on_update: Optional[UpdateCallback] = None,
        *,
        delta: Optional[bool] = None,
        resource_timeout: float = 15.0,
        backoff: Optional[Backoff] = None,
        wildcard_types: Iterable[str] = (),
        decoders: Optional[Mapping[str, Decoder]] = None,
    ) -> None:
        """``wildcard_types``: type URLs subscribed as wildcards from the start (see
        :meth:`watch_all`). ``decoders``: per type URL, a replacement for the built-in decoder
        (``decoder(message, providers=None) -> model``, raising ``ConfigError`` to reject), e.g.
        one that accepts a sidecar's socket listeners."""
        wildcard_types = tuple(wildcard_types)
        for t in (*wildcard_types, *(decoders or {})):
            if t not in RESOURCE_TYPES:
                raise ValueError(f"unknown resource type {t!r}")
        self.bootstrap = bootstrap
        self.node = bootstrap.node
        self.delta = (getattr(bootstrap, "api_type", "GRPC") == "DELTA_GRPC") if delta is None else delta
        self._servers = tuple(bootstrap.xds_servers)
        # TLS contexts may name only these certificate provider instances (A29); None: unchecked
        providers = getattr(bootstrap, "certificate_providers", None)
        self._cert_providers = None if providers is None else frozenset(providers)
        self._on_update = on_update or (lambda changed: None)
        self._resource_timeout = resource_timeout
        self._backoff = backoff or Backoff()
        self._cond = threading.Condition(threading.RLock())
        self._entries: Dict[str, Dict[str, CacheEntry]] = {t: {} for t in TYPE_URLS}
        self._watched: Dict[str, Dict[str, None]] = {t: {} for t in TYPE_URLS}  # ordered sets
        self._wildcard: Set[str] = set(wildcard_types)  # types subscribed as wildcards
        self._wildcard_ready: Set[str] = set()  # wildcard types that got their first response
        self._types: Dict[str, ResourceType] = dict(RESOURCE_TYPES)
        for t, decode in (decoders or {}).items():
            self._types[t] = dataclasses.replace(self._types[t], decode=decode)
        self._versions: Dict[str, str] = {}  # SotW: last accepted version_info per type
        self._timers: Dict[Key, int] = {}
        self._timer_queue = TimerQueue("meshcore-xds-timers")
        self._stream: Optional[_Stream] = None
        self._generation = 0
        self._closed = False
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._channels: Dict[int, grpc.Channel] = {}
        #: why the control plane is not usable right now (None while a stream is healthy)
        self.ambient_error: Optional[str] = None
        self.server_index = 0
        self.streams_started = 0
        self.responses_received = 0

    # -- public API ------------------------------------------------------------------------------

    def start(self) -> "XdsClient":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="meshcore-xds", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            st = self._stream
            if st is not None:
                st.closed = True
            self._cond.notify_all()
        self._wake.set()
        if st is not None and st.call is not None:
            st.call.cancel()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self._timer_queue.close()
        with self._cond:
            channels = list(self._channels.values())
            self._channels.clear()
        for ch in channels:
            ch.close()

    def watch(self, type_url: str, name: str) -> None:
        """Subscribe to a resource (idempotent). Its entry is REQUESTED until data arrives."""
        self.update_watches({type_url: [name]}, {})

    def unwatch(self, type_url: str, name: str) -> None:
        """Unsubscribe; the cache entry is dropped (A28: the cache holds watched resources only)."""
        self.update_watches({}, {type_url: [name]})

    def update_watches(self, add: Mapping[str, Iterable[str]], remove: Mapping[str, Iterable[str]]) -> None:
        """Apply many subscription changes at once: each changed type gets one request."""
        with self._cond:
            for type_url, names in add.items():
                watched, entries = self._watched[type_url], self._entries[type_url]
                changed = False
                for name in names:
                    if name not in watched:
                        watched[name] = None
                        changed = True
                        if name not in entries:
                            entries[name] = CacheEntry(type_url, name)
                if changed:
                    self._mark(type_url)
            for type_url, names in remove.items():
                watched, entries = self._watched[type_url], self._entries[type_url]
                changed = False
                for name in names:
                    if watched.pop(name, 0) is None:
                        changed = True
                        e = entries.get(name)
                        if e is not None and not self._held_by_wildcard(e):
                            del entries[name]
                        self._timer_queue.cancel(self._timers.pop((type_url, name), None))
                if changed:
                    self._mark(type_url)

    def watch_all(self, type_url: str) -> None:
        """Subscribe to every resource of ``type_url`` (a wildcard; idempotent). Named watches of
        the type keep working alongside. See the module docstring for the wire format."""
        if type_url not in RESOURCE_TYPES:
            raise ValueError(f"unknown resource type {type_url!r}")
        with self._cond:
            if type_url in self._wildcard:
                return
            self._wildcard.add(type_url)
            self._mark(type_url)

    def unwatch_all(self, type_url: str) -> None:
        """End the wildcard subscription of ``type_url``: what only the wildcard provided leaves
        the cache; named watches stay. (A SotW stream that only ever sent the legacy empty list
        cannot say this to the server: it keeps sending everything, which is then ignored.)"""
        with self._cond:
            if type_url not in self._wildcard:
                return
            self._wildcard.discard(type_url)
            self._wildcard_ready.discard(type_url)
            watched, entries = self._watched[type_url], self._entries[type_url]
            for name in [n for n in entries if n not in watched]:
                del entries[name]
            self._mark(type_url)

    def is_wildcard(self, type_url: str) -> bool:
        """Whether ``type_url`` is subscribed as a wildcard."""
        return type_url in self._wildcard

    @property
    def wildcard_types(self) -> FrozenSet[str]:
        """The type URLs subscribed as wildcards."""
        with self._cond:
            return frozenset(self._wildcard)

    def wildcard_ready(self, type_url: str) -> bool:
        """Whether the wildcard subscription of ``type_url`` got its first response: from then on
        a name missing from :meth:`names` does not exist (until the server adds it)."""
        return type_url in self._wildcard_ready

    def wait_wildcard_ready(self, type_url: str, timeout: float) -> bool:
        """Block until :meth:`wildcard_ready` (True) or ``timeout`` seconds passed (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while type_url not in self._wildcard_ready:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return False
                self._cond.wait(remaining)
            return True

    def names(self, type_url: str) -> List[str]:
        """Sorted names of the cached resources of ``type_url`` that hold a value (received by
        name or through the wildcard; a rejected update keeps its last good value)."""
        with self._cond:
            return sorted(n for n, e in self._entries[type_url].items() if e.has_value)

    def watched(self, type_url: str) -> List[str]:
        with self._cond:
            return list(self._watched[type_url])

    def entry(self, type_url: str, name: str) -> Optional[CacheEntry]:
        return self._entries[type_url].get(name)

    def entries(self) -> List[CacheEntry]:
        with self._cond:
            return [e for t in TYPE_URLS for e in self._entries[t].values()]

    def version(self, type_url: str) -> str:
        """The last accepted ``version_info`` of a type (SotW)."""
        return self._versions.get(type_url, "")

    @property
    def connected(self) -> bool:
        st = self._stream
        return st is not None and st.got_response and not st.closed

    @property
    def server_uri(self) -> str:
        return self._servers[self.server_index].server_uri

    # -- sending -----------------------------------------------------------------------------------

    def _mark(self, type_url: str) -> None:
        st = self._stream
        if st is not None and not st.closed:
            st.pending[type_url] = None
            self._cond.notify_all()

    def _requests(self, st: _Stream) -> Iterator[Any]:
        """The request iterator handed to grpc; it is called for the next message only after the
        previous write completed, which is when the names just sent start their timers."""
        while True:
            with self._cond:
                self._arm_timers(st)
                while not st.pending and not st.closed:
                    self._cond.wait()
                if st.closed:
                    return
                type_url = next(iter(st.pending))
                request = self._build_delta(st, type_url) if self.delta else self._build_sotw(st, type_url)
                if request is None:
                    continue
                if st.first:
                    request.node.CopyFrom(self.node)
                    st.first = False
            if log.isEnabledFor(logging.DEBUG):
                log.debug("xDS request %s", _describe(request))
            yield request

    def _held_by_wildcard(self, e: CacheEntry) -> bool:
        """Whether an entry stays cached without a named watch: its type is a wildcard and the
        server sent it (a value, or a rejected first version)."""
        return e.type_url in self._wildcard and (e.has_value or e.status == NACKED)

    def _build_sotw(self, st: _Stream, t: str) -> Optional[Any]:
        del st.pending[t]
        names = list(self._watched[t])
        wildcard = t in self._wildcard
        if wildcard and (names or t in st.explicit):
            wire = [WILDCARD] + names  # explicit "*": an empty list no longer means wildcard
        elif wildcard:
            wire = []  # legacy wildcard, as Envoy sends it
        else:
            wire = names
            if not names and t not in st.sent_names:
                return None  # an empty first request would mean wildcard
        req = discovery_pb2.DiscoveryRequest(
            version_info=self._versions.get(t, ""), resource_names=wire, type_url=t,
            response_nonce=st.nonce.get(t, ""),
        )
        err = st.pending_error.pop(t, None)
        if err is not None:
            req.error_detail.CopyFrom(err)
        if wire:
            st.explicit.add(t)
        sent = set(names)
        if wildcard:
            sent.add(WILDCARD)
        st.sent_names[t] = sent
        st.just_sent.append((t, names))
        return req

    def _desired(self, t: str) -> List[str]:
        """Delta: the names the stream should be subscribed to (``"*"`` first for a wildcard)."""
        names = list(self._watched[t])
        return [WILDCARD] + names if t in self._wildcard else names

    def _build_delta(self, st: _Stream, t: str) -> Optional[Any]:
        desired = self._desired(t)
        req = discovery_pb2.DeltaDiscoveryRequest(type_url=t)
        if t not in st.sent_names:
            if not desired:
                del st.pending[t]
                return None
            req.resource_names_subscribe.extend(desired)
            watched, wildcard = self._watched[t], t in self._wildcard
            for n, e in self._entries[t].items():
                if e.has_value and e.version and (wildcard or n in watched):
                    req.initial_resource_versions[n] = e.version
            st.sent_names[t] = set(desired)
            st.just_sent.append((t, [n for n in desired if n != WILDCARD]))
        elif t in st.ack_pending:
            st.ack_pending.discard(t)
            req.response_nonce = st.nonce.get(t, "")
            err = st.pending_error.pop(t, None)
            if err is not None:
                req.error_detail.CopyFrom(err)
        else:
            subscribed = st.sent_names[t]
            added = [n for n in desired if n not in subscribed]
            wanted = set(desired)
            removed = sorted(n for n in subscribed if n not in wanted)
            if not added and not removed:
                del st.pending[t]
                return None
            req.resource_names_subscribe.extend(added)
            req.resource_names_unsubscribe.extend(removed)
            subscribed.update(added)
            subscribed.difference_update(removed)
            st.just_sent.append((t, [n for n in added if n != WILDCARD]))
        if t not in st.ack_pending and set(desired) == st.sent_names.get(t, set()):
            st.pending.pop(t, None)
        return req

    # -- timers ------------------------------------------------------------------------------------

    def _arm_timers(self, st: _Stream) -> None:
        if not st.just_sent or st.closed:
            st.just_sent.clear()
            return
        for t, names in st.just_sent:
            for n in names:
                e = self._entries[t].get(n)
                if e is None or e.has_value or e.status == DOES_NOT_EXIST or n in st.seen[t]:
                    continue
                key = (t, n)
                if key in self._timers:
                    continue
                self._timers[key] = self._timer_queue.call_later(
                    self._resource_timeout, lambda key=key, g=st.generation: self._timer_fired(key, g))
        st.just_sent.clear()

    def _timer_fired(self, key: Key, generation: int) -> None:
        with self._cond:
            if self._timers.get(key) is None or self._generation != generation:
                return
            del self._timers[key]
            e = self._entries[key[0]].get(key[1])
            if e is None or e.has_value:
                return
            e.remove()
            log.warning("xDS resource %s %r does not exist (no data within %.0f s)",
                        SHORT_NAMES[key[0]], key[1], self._resource_timeout)
        self._notify({key})

    def _cancel_stream_timers(self) -> None:
        for handle in self._timers.values():
            self._timer_queue.cancel(handle)
        self._timers.clear()

    # -- receiving ---------------------------------------------------------------------------------

    def _on_response(self, st: _Stream, resp: Any) -> None:
        t = resp.type_url
        rt = self._types.get(t)
        if rt is None or t not in st.sent_names:
            log.warning("ignoring xDS response for unrequested type %s", t)
            return  # no ACK, as gRPC does
        changed: Set[Key] = set()
        with self._cond:
            st.got_response = True
            st.responses += 1
            self.responses_received += 1
            self.ambient_error = None
            self._backoff.reset()
            st.nonce[t] = resp.nonce
            if self.delta:
                errors = self._apply_delta(st, rt, resp, changed)
                st.ack_pending.add(t)
            else:
                errors = self._apply_sotw(st, rt, resp, changed)
                if not errors:
                    self._versions[t] = resp.version_info
            if errors:
                detail = "xDS response validation errors: [" + "; ".join(errors) + "]"
                st.pending_error[t] = status_pb2.Status(code=_INVALID_ARGUMENT, message=detail)
                log.warning("NACK %s version %r: %s", SHORT_NAMES[t], resp.version_info if not self.delta
                            else resp.system_version_info, detail)
            else:
                st.pending_error.pop(t, None)
            if self._wild(st, t) and t not in self._wildcard_ready:
                self._wildcard_ready.add(t)
                log.info("xDS wildcard %s: first response (%d resources cached)", SHORT_NAMES[t],
                         sum(1 for e in self._entries[t].values() if e.has_value))
            st.pending[t] = None
            self._cond.notify_all()
        self._notify(changed)

    def _wild(self, st: _Stream, t: str) -> bool:
        """Whether responses of ``t`` on this stream answer a wildcard subscription: the type is
        a wildcard and a wildcard request of it was written."""
        return t in self._wildcard and WILDCARD in st.sent_names.get(t, ())

    def _apply_sotw(self, st: _Stream, rt: ResourceType, resp: Any, changed: Set[Key]) -> List[str]:
        t = rt.type_url
        wild = self._wild(st, t)
        errors: List[str] = []
        seen: Set[str] = set()
        for index, any_ in enumerate(resp.resources):
            name, payload, problem = self._unwrap(rt, any_)
            if problem is not None:
                errors.append(f"resource index {index}: {problem}")
                continue
            if payload is None:  # TTL heartbeat: the resource still exists, unchanged
                seen.add(name)
                st.seen[t].add(name)
                self._timer_queue.cancel(self._timers.pop((t, name), None))
                continue
            if name in seen:
                errors.append(f"resource index {index}: {name}: duplicate resource name in one response")
                continue
            seen.add(name)
            self._apply_one(st, rt, name, payload, resp.version_info, index, errors, changed, wild)
        if rt.full_state_in_sotw:
            watched, entries = self._watched[t], self._entries[t]
            for name in list(entries) if wild else list(watched):
                if name in seen:
                    continue
                e = entries[name]
                if e.has_value:
                    if not e.deleted:
                        self._delete(e, changed)
                elif name not in watched:
                    del entries[name]  # a rejected first version the server no longer has
                    changed.add((t, name))
                elif wild and e.status != DOES_NOT_EXIST:
                    # the full set of the type lacks it: no need to wait for the timer
                    self._timer_queue.cancel(self._timers.pop((t, name), None))
                    st.seen[t].add(name)
                    e.remove()
                    changed.add((t, name))
        return errors

    def _apply_delta(self, st: _Stream, rt: ResourceType, resp: Any, changed: Set[Key]) -> List[str]:
        t = rt.type_url
        wild = self._wild(st, t)
        errors: List[str] = []
        seen: Set[str] = set()
        for index, res in enumerate(resp.resources):
            if not res.HasField("resource"):
                continue  # TTL refresh of what we have
            any_ = res.resource
            if any_.type_url != t:
                errors.append(f"resource index {index}: {res.name}: type_url {any_.type_url} is not {t}")
                continue
            name = res.name
            if name in seen:
                errors.append(f"resource index {index}: {name}: duplicate resource name in one response")
                continue
            seen.add(name)
            self._apply_one(st, rt, name, any_, res.version, index, errors, changed, wild)
        watched = self._watched[t]
        for name in resp.removed_resources:
            e = self._entries[t].get(name)
            if e is None or (name not in watched and not wild):
                continue
            st.seen[t].add(name)
            self._timer_queue.cancel(self._timers.pop((t, name), None))
            if e.has_value:
                if not e.deleted:
                    self._delete(e, changed)
            elif name not in watched:
                del self._entries[t][name]  # a rejected first version, now gone
                changed.add((t, name))
            elif e.status != DOES_NOT_EXIST:
                e.remove()  # the server says it does not exist
                changed.add((t, name))
        return errors

    def _unwrap(self, rt: ResourceType, any_: Any) -> Tuple[str, Any, Optional[str]]:
        """``(name, Any of the resource or None for a heartbeat, problem)``."""
        name = ""
        if any_.type_url == RESOURCE_WRAPPER:
            try:
                wrapper = discovery_pb2.Resource.FromString(any_.value)
            except _message.DecodeError as e:
                return "", None, f"cannot decode Resource wrapper: {e}"
            if not wrapper.HasField("resource"):
                return wrapper.name, None, None
            name, any_ = wrapper.name, wrapper.resource
        if any_.type_url != rt.type_url:
            return name, None, f"{name or '?'}: type_url {any_.type_url!r} is not {rt.type_url!r}"
        if not name:
            try:
                msg = rt.message_class.FromString(any_.value)
            except _message.DecodeError as e:
                return "", None, f"cannot decode {rt.message_class.DESCRIPTOR.name}: {e}"
            name = rt.name_of(msg)
            if not name:
                return "", None, f"{rt.message_class.DESCRIPTOR.name} has no name"
        return name, any_, None

    def _apply_one(self, st: _Stream, rt: ResourceType, name: str, any_: Any, version: str, index: int,
                   errors: List[str], changed: Set[Key], wild: bool = False) -> None:
        t = rt.type_url
        st.seen[t].add(name)
        self._timer_queue.cancel(self._timers.pop((t, name), None))
        e = self._entries[t].get(name)
        if e is None or name not in self._watched[t] and not wild and not self._held_by_wildcard(e):
            if not wild:
                return  # servers may send more than asked; not validated, not cached
            e = self._entries[t][name] = CacheEntry(t, name)
        data = any_.value
        if e.has_value and e.serialized == data and not e.deleted:
            if e.status == NACKED:  # back to the value we hold
                e.status, e.error = ACKED, None
                changed.add((t, name))
            e.version = version
            return
        try:
            msg = rt.message_class.FromString(data)
            spec = rt.decode(msg, providers=self._cert_providers)
        except ConfigError as err:
            reason = str(err)  # names the resource already when the decoder knew its name
            self._reject(e, reason if reason.startswith(f"{name}: ") else f"{name}: {reason}",
                         version, index, errors, changed)
            return
        except _message.DecodeError as err:
            self._reject(e, f"{name}: cannot decode: {err}", version, index, errors, changed)
            return
        except Exception as err:  # a decoder bug must not kill the stream
            log.exception("decoding %s %r failed", SHORT_NAMES[t], name)
            self._reject(e, f"{name}: {type(err).__name__}: {err}", version, index, errors, changed)
            return
        stored = type(any_)()
        stored.CopyFrom(any_)
        e.accept(stored, data, spec, version)
        changed.add((t, name))

    def _reject(self, e: CacheEntry, message: str, version: str, index: int, errors: List[str],
                changed: Set[Key]) -> None:
        errors.append(f"resource index {index}: {message}")
        e.reject(message, version)
        changed.add((e.type_url, e.name))

    def _delete(self, e: CacheEntry, changed: Set[Key]) -> None:
        """The server deleted a resource we hold. Kept as DOES_NOT_EXIST while watched by name;
        one only the wildcard provided leaves the cache (kept with ``ignore_resource_deletion``)."""
        server = self._servers[self.server_index]
        if getattr(server, "ignore_resource_deletion", False):
            log.warning("xDS server deleted %s %r; kept (ignore_resource_deletion)", SHORT_NAMES[e.type_url], e.name)
            e.status = DOES_NOT_EXIST
            e.deleted = True
        else:
            log.info("xDS server deleted %s %r", SHORT_NAMES[e.type_url], e.name)
            e.remove()
            if e.name not in self._watched[e.type_url]:
                self._entries[e.type_url].pop(e.name, None)
        changed.add((e.type_url, e.name))

    def _notify(self, changed: Set[Key]) -> None:
        try:
            self._on_update(changed)
        except Exception:
            log.exception("meshcore: applying an xDS update failed")

    # -- the stream loop -----------------------------------------------------------------------------

    def _channel(self, index: int) -> grpc.Channel:
        with self._cond:
            ch = self._channels.get(index)
            if ch is None:
                server = self._servers[index]
                creds = server.channel_credentials()
                # A private subchannel pool: a fresh channel must not inherit a shared subchannel
                # still in grpc's connect backoff (see the module docstring).
                options = list(server.channel_options()) + [("grpc.use_local_subchannel_pool", 1)]
                target = server.grpc_target()
                ch = grpc.secure_channel(target, creds, options) if creds is not None else \
                    grpc.insecure_channel(target, options)
                self._channels[index] = ch
            return ch

    def _drop_channel(self, index: int) -> None:
        """Close the channel of a failed attempt: the next attempt connects on a fresh one, when
        meshcore's backoff says so (and not on grpc's own reconnect schedule)."""
        with self._cond:
            ch = self._channels.pop(index, None)
        if ch is not None:
            ch.close()

    def _run(self) -> None:
        index = 0
        while True:
            with self._cond:
                if self._closed:
                    return
                self._generation += 1
                st = _Stream(self._generation, index)
                self.server_index = index
                for t in TYPE_URLS:
                    if self._watched[t] or t in self._wildcard:
                        st.pending[t] = None
                self._stream = st
                self.streams_started += 1
            status = self._run_stream(st)
            with self._cond:
                st.closed = True
                self._cancel_stream_timers()
                self._cond.notify_all()
                if self._closed:
                    return
                if st.got_response:
                    delay = 0.0
                    index = 0
                    log.info("xDS stream to %s ended (%s); reconnecting", self._servers[st.server_index].server_uri,
                             status)
                else:
                    delay = self._backoff.next()
                    self.ambient_error = (f"xDS server {self._servers[st.server_index].server_uri} unavailable: "
                                          f"{status} (node {self.node.id!r})")
                    log.warning("%s; retrying in %.2f s", self.ambient_error, delay)
                    if len(self._servers) > 1:
                        index = (index + 1) % len(self._servers)
            if not st.got_response:
                self._drop_channel(st.server_index)
                self._notify(set())
            if delay:
                self._wake.wait(delay)

    def _run_stream(self, st: _Stream) -> str:
        try:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel(st.server_index))
            method = stub.DeltaAggregatedResources if self.delta else stub.StreamAggregatedResources
            call = method(self._requests(st))
            with self._cond:
                st.call = call
                if self._closed:
                    call.cancel()
            for resp in call:
                self._on_response(st, resp)
            return "stream closed by the server"
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            details = e.details() if hasattr(e, "details") else str(e)
            return f"{code.name if code else 'UNKNOWN'}: {details}"
        except Exception as e:  # pragma: no cover  (defensive: keep the loop alive)
            log.exception("xDS stream failed")
            return f"{type(e).__name__}: {e}"


def _describe(req: Any) -> str:
    t = SHORT_NAMES.get(req.type_url, req.type_url)
    if isinstance(req, discovery_pb2.DeltaDiscoveryRequest):
        return (f"{t} +{list(req.resource_names_subscribe)} -{list(req.resource_names_unsubscribe)} "
                f"nonce={req.response_nonce!r} nack={req.HasField('error_detail')}")
    return (f"{t} names={list(req.resource_names)} version={req.version_info!r} nonce={req.response_nonce!r} "
            f"nack={req.HasField('error_detail')}")


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.005) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
