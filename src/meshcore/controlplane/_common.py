"""Small pieces shared by the SotW and delta stream protocols."""

from __future__ import annotations

import itertools
from typing import Iterable, List

from ..xds.model import CLUSTER, ENDPOINT, LISTENER, ROUTE

__all__ = ["FULL_STATE_TYPES", "PUSH_ORDER", "NonceCounter", "push_order"]

#: SotW types whose every response carries the full requested set (absence = deletion).
FULL_STATE_TYPES = frozenset({LISTENER, CLUSTER})

#: Order of pushes after a store change ("make before break": clusters and endpoints first).
PUSH_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)


def push_order(type_urls: Iterable[str]) -> List[str]:
    """``type_urls`` sorted CDS, EDS, LDS, RDS, then any others by name."""
    rank = {url: i for i, url in enumerate(PUSH_ORDER)}
    return sorted(type_urls, key=lambda url: (rank.get(url, len(rank)), url))


class NonceCounter:
    """Per-stream nonces: "1", "2", ... (only used from the stream's own thread)."""

    def __init__(self) -> None:
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return str(next(self._counter))
