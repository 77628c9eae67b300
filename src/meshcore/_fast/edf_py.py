"""Envoy's earliest-deadline-first scheduler (pure twin; the compiled one lives in lb_c).

Mirrors ``source/common/upstream/edf_scheduler.h`` (Envoy 1.40): entries are ordered by
``(deadline, order_offset)``; order offsets are unique, so the pop order does not depend on
the heap's internal layout. A weight is evaluated when an entry is (re)inserted.
"""

from __future__ import annotations

import heapq
from math import floor
from typing import Callable, List, Sequence, Tuple

__all__ = ["EdfScheduler"]

_INF = float("inf")
_PICKS_MODULUS = 429496729  # UINT_MAX / 10, Envoy's cap on createWithPicks' pre-picks


class EdfScheduler:
    """EDF over small integer items (host or locality indices)."""

    __slots__ = ("heap", "current_time", "order_offset")

    heap: List[Tuple[float, int, int]]
    current_time: float
    order_offset: int

    def __init__(self) -> None:
        self.heap = []
        self.current_time = 0.0
        self.order_offset = 0

    def add(self, weight: float, item: int) -> None:
        # Envoy divides doubles: a weight of 0 (least request with a huge active_request_bias)
        # gives an infinite deadline, as in the compiled twin, instead of ZeroDivisionError.
        step = 1.0 / weight if weight > 0.0 else _INF
        heapq.heappush(self.heap, (self.current_time + step, self.order_offset, item))
        self.order_offset += 1

    def pick_and_add(self, weight_of: Callable[[int], float]) -> int:
        """Pop the earliest deadline, advance time to it, re-add with its current weight."""
        deadline, _, item = heapq.heappop(self.heap)
        self.current_time = deadline
        self.add(weight_of(item), item)
        return item

    @classmethod
    def create_with_picks(
        cls, items: Sequence[int], weight_of: Callable[[int], float], picks: int
    ) -> "EdfScheduler":
        """``EdfScheduler::createWithPicks``: a scheduler as if ``picks`` picks had been made."""
        picks = (picks & 0xFFFFFFFF) % _PICKS_MODULUS
        scheduler = cls()
        if not items:
            return scheduler
        augmented = [weight_of(item) + 1e-13 for item in items]
        weights_sum = 0.0
        for w in augmented:
            weights_sum += w
        picks_per_weight = picks / weights_sum
        heap: List[Tuple[float, int, int]] = []
        max_pick_time = 0.0
        picks_so_far = 0
        for i, item in enumerate(items):
            w = augmented[i]
            floor_picks = int(floor(w * picks / weights_sum))
            if floor_picks > 0 and floor_picks / w >= picks_per_weight:
                floor_picks -= 1
            pick_time = floor_picks / w
            heap.append(((floor_picks + 1) / w, i, item))
            if pick_time > max_pick_time:
                max_pick_time = pick_time
            picks_so_far += floor_picks
        heapq.heapify(heap)
        scheduler.heap = heap
        scheduler.current_time = max_pick_time
        scheduler.order_offset = len(items)
        while picks_so_far < picks:
            scheduler.pick_and_add(weight_of)
            picks_so_far += 1
        return scheduler
