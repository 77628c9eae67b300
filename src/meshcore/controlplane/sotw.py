"""State-of-the-world ADS protocol for one stream (no I/O: requests and store changes in, responses out).

Per type URL the stream keeps the subscribed names (or wildcard), the last nonce and version sent
and the content hash of every resource sent. Rules (what Envoy, grpcio and istiod agree on):

* empty ``response_nonce`` (new subscription, reconnect) -> send every requested resource that exists;
* a ``response_nonce`` that is not the latest one sent for the type -> ignore the request entirely;
* a NACK (``error_detail``) -> record, do not resend (unless the name set changed);
* a changed name set -> send every requested resource that exists; an ACK -> nothing;
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
            return [self._respond(url, state, snap, state.requested(snap.of_type(url)))]
        if request.response_nonce != state.nonce:
            logger.debug("ignoring %s request with stale nonce %r (latest %r)", url, request.response_nonce,
                         state.nonce)
            return []
        changed = state.set_names(names)
        if request.HasField("error_detail"):
            logger.info("NACK for %s version %s nonce %s: %s", url, state.version, request.response_nonce,
                        request.error_detail.message)
        if changed:
            return [self._respond(url, state, snap, state.requested(snap.of_type(url)))]
        return []

    def on_change(self, snap: Snapshot) -> List[SotwResponse]:
        """Responses owed after the store changed to ``snap``."""
        out: List[SotwResponse] = []
        for url in push_order(self._types):
            state = self._types[url]
            if snap.type_version(url) == state.version:
                continue
            requested = state.requested(snap.of_type(url))
            current = {n: e.version for n, e in requested.items()}
            if url in FULL_STATE_TYPES:
                if current != state.sent:
                    out.append(self._respond(url, state, snap, requested))
                continue
            for gone in [n for n in state.sent if n not in current]:
                del state.sent[gone]
            fresh = {n: e for n, e in requested.items() if state.sent.get(n) != e.version}
            if fresh:
                out.append(self._respond(url, state, snap, fresh, replace_sent=False))
        return out

    def _respond(self, url: str, state: _TypeState, snap: Snapshot, entries: Mapping[str, Entry],
                 replace_sent: bool = True) -> SotwResponse:
        state.nonce = self._nonce()
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
