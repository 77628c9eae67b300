"""Incremental (delta) ADS protocol for one stream (no I/O: requests and store changes in, responses out).

Per type URL the stream keeps the subscribed names, the wildcard flag and what the client has
(name -> version, the version being the content hash from the store). Rules:

* first request of a type: wildcard if it subscribes ``"*"``, or (the legacy form, for any type)
  if its subscribe list is empty -- unless it also unsubscribes ``"*"`` (istiod's clients send
  ``"*"`` in both lists to start with nothing); ``initial_resource_versions`` seed what the client
  has, so only resources whose version differs are sent, plus ``removed_resources`` for claimed
  names we lack (if of interest).
  A first request without ``initial_resource_versions`` is always answered (possibly empty) so the
  client learns the server's state;
* request-driven: at most one response per type is outstanding (not yet ACKed/NACKed); what
  becomes owed meanwhile (store changes, subscriptions) is coalesced into one response with the
  newest state, sent when the outstanding one is answered;
* (un)subscriptions are applied whatever the nonce (a stale one too): newly subscribed names that
  exist are (re)sent, even if the client has them; unsubscribing a name still covered by the
  wildcard resends it;
* ACK / NACK (``response_nonce`` of the latest response, maybe ``error_detail``) -> the type is
  free again: what is owed is sent;
* store change -> changed and new resources, and ``removed_resources`` for deleted ones the client has.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Set, Tuple

from envoy.service.discovery.v3 import discovery_pb2

from ._common import NonceCounter, push_order
from .store import Entry, Snapshot

__all__ = ["DeltaStream", "DeltaResponse"]

logger = logging.getLogger(__name__)

#: A response and the names of the resources it carries, in order.
DeltaResponse = Tuple[discovery_pb2.DeltaDiscoveryResponse, List[str]]


@dataclass
class _TypeState:
    names: Set[str] = field(default_factory=set)
    wildcard: bool = False
    has: Dict[str, str] = field(default_factory=dict)  # what the client has: name -> version
    version: str = ""  # type version last looked at
    nonce: str = ""
    outstanding: bool = False  # the latest response is not yet ACKed / NACKed
    force: Set[str] = field(default_factory=set)  # owed even if the client has them (subscribed again)

    def interested(self, name: str) -> bool:
        return self.wildcard or name in self.names

    def changed(self, entries: Mapping[str, Entry]) -> Tuple[Dict[str, Entry], List[str]]:
        """Resources of interest whose version the client lacks, and names it has that are gone."""
        names = entries if self.wildcard else self.names
        fresh = {n: entries[n] for n in sorted(names) if n in entries and self.has.get(n) != entries[n].version}
        removed = sorted(n for n in self.has if n not in entries)
        return fresh, removed


class DeltaStream:
    """The delta half of one ADS stream."""

    def __init__(self) -> None:
        self._types: Dict[str, _TypeState] = {}
        self._nonce = NonceCounter()

    def on_request(self, request: discovery_pb2.DeltaDiscoveryRequest, snap: Snapshot) -> List[DeltaResponse]:
        url = request.type_url
        entries = snap.of_type(url)
        subscribe = list(request.resource_names_subscribe)
        unsubscribe = list(request.resource_names_unsubscribe)
        state = self._types.get(url)
        if state is None:
            state = self._types[url] = _TypeState()
            state.wildcard = ("*" in subscribe or not subscribe) and "*" not in unsubscribe
            state.names = {n for n in subscribe if n != "*"} - set(unsubscribe)
            claimed = dict(request.initial_resource_versions)
            state.has = {n: v for n, v in claimed.items() if state.interested(n)}
            state.version = snap.type_version(url)
            fresh, removed = state.changed(entries)
            if fresh or removed or not claimed:
                return [self._respond(url, state, snap, fresh, removed)]
            return []
        for name in subscribe:
            if name == "*":
                state.wildcard = True
                continue
            state.names.add(name)
            state.force.add(name)  # always resend what is explicitly subscribed
        for name in unsubscribe:
            if name == "*":
                state.wildcard = False
                state.has = {n: v for n, v in state.has.items() if n in state.names}
                state.force &= state.names
                continue
            state.names.discard(name)
            if state.wildcard:
                state.force.add(name)  # still covered by the wildcard: the server must answer
            else:
                state.force.discard(name)
                state.has.pop(name, None)
        nonce = request.response_nonce
        if nonce:
            if nonce == state.nonce:
                state.outstanding = False
                if request.HasField("error_detail"):
                    logger.debug("delta NACK for %s nonce %s: %s", url, nonce, request.error_detail.message)
            else:
                logger.debug("delta %s request with stale nonce %r (latest %r): subscriptions applied",
                             url, nonce, state.nonce)
        if state.outstanding:
            return []
        return self._owed(url, state, snap)

    def on_change(self, snap: Snapshot) -> List[DeltaResponse]:
        """Responses owed after the store changed to ``snap`` (none for a type with one outstanding)."""
        out: List[DeltaResponse] = []
        for url in push_order(self._types):
            state = self._types[url]
            if not state.outstanding and snap.type_version(url) != state.version:
                out.extend(self._owed(url, state, snap))
        return out

    def outstanding(self, type_url: str) -> bool:
        """Whether the latest response of ``type_url`` awaits its ACK/NACK."""
        state = self._types.get(type_url)
        return state is not None and state.outstanding

    def _owed(self, url: str, state: _TypeState, snap: Snapshot) -> List[DeltaResponse]:
        entries = snap.of_type(url)
        state.version = snap.type_version(url)
        fresh, removed = state.changed(entries)
        for name in state.force:
            if name in entries and state.interested(name):
                fresh[name] = entries[name]
        state.force.clear()
        if fresh or removed:
            return [self._respond(url, state, snap, dict(sorted(fresh.items())), removed)]
        return []

    def _respond(self, url: str, state: _TypeState, snap: Snapshot, fresh: Mapping[str, Entry],
                 removed: List[str]) -> DeltaResponse:
        state.nonce = self._nonce()
        state.outstanding = True
        for name in removed:
            state.has.pop(name, None)
        for name, entry in fresh.items():
            state.has[name] = entry.version
        response = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=snap.type_version(url), type_url=url, nonce=state.nonce,
            resources=[discovery_pb2.Resource(name=n, version=e.version, resource=e.packed) for n, e in fresh.items()],
            removed_resources=removed,
        )
        return response, list(fresh)
