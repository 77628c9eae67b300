"""State-of-the-world ADS protocol for one stream (no I/O: requests and store changes in, responses out).

Per type URL the stream keeps the subscribed names (or wildcard), the last nonce and version sent,
the content hash of every resource sent, and whether the last response is still *outstanding*
(not yet ACKed or NACKed). The stream is request-driven: at most one response per type is
outstanding; store changes made meanwhile are coalesced into one response with the newest state,
sent when the outstanding one is answered. Rules (what Envoy, grpcio and istiod agree on):

* empty ``response_nonce`` (new subscription, reconnect) -> send every requested resource that exists;
* a ``response_nonce`` that is not the latest one sent for the type (the client had not yet seen
  the latest response) -> no response, but its name list is applied: a subscription change it
  carries is answered together with the outstanding response's ACK, never lost;
* ACK or NACK (``error_detail``) of the latest response -> the type is free again: send what is
  owed since (a changed name set: every requested resource; store changes: as below), else nothing.
  A NACKed content is not resent unless it changed;
* store change -> LDS/CDS: the full requested set if any of it changed (absence = deletion);
  RDS/EDS and other types: only the resources that changed or appeared.

Wildcard: ``"*"`` in the names, or (legacy) an empty list while the stream has never sent an
explicit name for the type.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Set, Tuple

from envoy.service.discovery.v3 import discovery_pb2

from ._common import FULL_STATE_TYPES, NonceCounter, push_order
from .store import Entry, Snapshot

__all__ = ["SotwStream", "SotwResponse"]

logger = logging.getLogger(__name__)

#: A response and the names of the resources it carries, in order.
SotwResponse = Tuple[discovery_pb2.DiscoveryResponse, List[str]]


@dataclass
class _TypeState:
    names: Set[str] = field(default_factory=set)
    wildcard: bool = False
    explicit_seen: bool = False  # a non-empty name list was sent for this type on this stream
    nonce: str = ""  # latest nonce sent
    version: str = ""  # type version of the latest response
    sent: Dict[str, str] = field(default_factory=dict)  # name -> content hash sent
    outstanding: bool = False  # the latest response is not yet ACKed / NACKed
    resubscribed: bool = False  # the name set changed since the latest response: the full set is owed

    def set_names(self, names: List[str]) -> bool:
        """Apply a request's name list; True if the subscription changed."""
        explicit = {n for n in names if n != "*"}
        if "*" in names:
            wildcard = True
        else:
            wildcard = not names and not self.explicit_seen
        if explicit:
            self.explicit_seen = True
        changed = wildcard != self.wildcard or explicit != self.names
        self.names, self.wildcard = explicit, wildcard
        return changed

    def requested(self, entries: Mapping[str, Entry]) -> Dict[str, Entry]:
        names = entries if self.wildcard else self.names
        return {n: entries[n] for n in sorted(names) if n in entries}


class SotwStream:
    """The SotW half of one ADS stream."""

    def __init__(self) -> None:
        self._types: Dict[str, _TypeState] = {}
        self._nonce = NonceCounter()

    def on_request(self, request: discovery_pb2.DiscoveryRequest, snap: Snapshot) -> List[SotwResponse]:
        """Responses owed to ``request`` (none or one)."""
        url = request.type_url
        state = self._types.get(url)
        names = list(request.resource_names)
        if state is None or not request.response_nonce:
            if state is None:
                state = self._types[url] = _TypeState()
            state.set_names(names)
            state.resubscribed = False
            return [self._respond(url, state, snap, state.requested(snap.of_type(url)))]
        if state.set_names(names):
            state.resubscribed = True
        if request.response_nonce != state.nonce:
            logger.debug("%s request with stale nonce %r (latest %r): not answered%s", url,
                         request.response_nonce, state.nonce,
                         ", its subscription change is kept" if state.resubscribed else "")
            if state.outstanding:
                return []  # the outstanding response's ACK will carry the answer
            return self._owed(url, state, snap)
        state.outstanding = False
        if request.HasField("error_detail"):
            logger.debug("NACK for %s version %s nonce %s: %s", url, state.version, request.response_nonce,
                         request.error_detail.message)
        return self._owed(url, state, snap)

    def on_change(self, snap: Snapshot) -> List[SotwResponse]:
        """Responses owed after the store changed to ``snap`` (none for a type with one outstanding)."""
        out: List[SotwResponse] = []
        for url in push_order(self._types):
            state = self._types[url]
            if not state.outstanding:
                out.extend(self._owed(url, state, snap))
        return out

    def outstanding(self, type_url: str) -> bool:
        """Whether the latest response of ``type_url`` awaits its ACK/NACK."""
        state = self._types.get(type_url)
        return state is not None and state.outstanding

    def _owed(self, url: str, state: _TypeState, snap: Snapshot) -> List[SotwResponse]:
        """What the free type ``url`` is owed now: the full requested set after a subscription change;
        after store changes LDS/CDS the full set if any of it changed, other types what changed."""
        requested = state.requested(snap.of_type(url))
        if state.resubscribed:
            state.resubscribed = False
            return [self._respond(url, state, snap, requested)]
        if snap.type_version(url) == state.version:
            return []
        current = {n: e.version for n, e in requested.items()}
        if url in FULL_STATE_TYPES:
            if current != state.sent:
                return [self._respond(url, state, snap, requested)]
            return []
        for gone in [n for n in state.sent if n not in current]:
            del state.sent[gone]
        fresh = {n: e for n, e in requested.items() if state.sent.get(n) != e.version}
        if fresh:
            return [self._respond(url, state, snap, fresh, replace_sent=False)]
        return []

    def _respond(self, url: str, state: _TypeState, snap: Snapshot, entries: Mapping[str, Entry],
                 replace_sent: bool = True) -> SotwResponse:
        state.nonce = self._nonce()
        state.outstanding = True
        state.version = snap.type_version(url)
        sent = {n: e.version for n, e in entries.items()}
        if replace_sent:
            state.sent = sent
        else:
            state.sent.update(sent)
        response = discovery_pb2.DiscoveryResponse(
            version_info=state.version, type_url=url, nonce=state.nonce,
            resources=[e.packed for e in entries.values()],
        )
        return response, list(entries)
