# cython: language_level=3, embedsignature=True
"""LoadBalancer, compiled twin of ``lb_py`` (same behaviour, same pick sequences per seed).

The pick path touches only C arrays built at update time and the Endpoint objects it
returns; it never calls back into Python code. Tables are built off to the side (partition
in ``_build_c``, rings and Maglev tables here) and published by one reference assignment,
which, under the GIL, no pick can observe half-done.

Large sets: what a pick reads per host lives in compact C arrays indexed by host (``HostSlot``:
the Endpoint pointer and its in-flight count, 16 bytes), placed on huge pages when they span
2 MiB or more. A pick touches the Endpoint object once, to return it; a release finds the
host by the object's address (``by_ptr``), by key only for an equal object that is not the
table's own. Random and least-request picks over large tables prefetch for the picks ahead
(``_look_ahead_random``, ``_look_ahead``), which hides most of the cache misses on Endpoint
objects. A ring-hash pick cannot be predicted (the caller brings the hash): its bucket index
resolves most hashes to the host and its Endpoint in one read (``RingBucket``), so the slot and
the object are then fetched in parallel.

Implementation note: every pick and every publish runs with the GIL held and without
releasing it, so a pick sees exactly one table and counter updates are not torn. The
module therefore does not declare itself free-threading compatible: on a free-threaded
interpreter importing it re-enables the GIL.
"""

from cpython.long cimport PyLong_AsUnsignedLongLongMask
from cpython.object cimport PyObject
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.math cimport ceil, floor, pow
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset
cimport cython

from ._common cimport (bytes_cmp, hot_alloc, meshcore_hot_alloc, meshcore_hot_free, prefetch_r, prefetch_w, qsort,
                      splitmix_at, splitmix_next, zalloc)

import os
import threading

from .._model import Endpoint
from .._options import LbConfig
from . import _build_c as _build
from . import _xds_hook

cdef extern from "_debug.h":
    cdef int MESHCORE_DEBUG

__all__ = ["LoadBalancer", "xxh64"]

cdef enum:
    EDF_ARITY = 2   # children per node of the host EDF heap
    LOOKAHEAD_MAX_CHOICES = 4
    # Random picks (_look_ahead_random): how many picks ahead a host slot, then its Endpoint
    # object and by_ptr entry, are prefetched. A pick+release is ~1 DRAM latency (~130 ns
    # here) apart from the next, so the slot is asked for two picks before it is read.
    RANDOM_SLOT_AHEAD = 4
    RANDOM_EP_AHEAD = 2
    RANDOM_PREDICTIONS = 4  # >= RANDOM_SLOT_AHEAD - RANDOM_EP_AHEAD + 1

cdef uint64_t GOLDEN = 0x9E3779B97F4A7C15ULL  # SplitMix64's increment

# Tables with at least this many hosts prefetch for the picks ahead (_look_ahead): the
# Endpoint objects of such a set no longer stay in cache between two picks of one.
cdef Py_ssize_t _lookahead_min_hosts = 8192


def _set_lookahead_min_hosts(n):
    """Benchmarks and tests only: the look-ahead threshold for tables built from now on;
    returns the previous one."""
    global _lookahead_min_hosts
    previous = _lookahead_min_hosts
    _lookahead_min_hosts = n
    return previous

def _memory_latency_ns(size_t nbytes, uint64_t steps=2_000_000, bint hot=True, uint64_t seed=1):
    """Benchmarks only: this machine's latency of one dependent random memory access, in ns
    of thread CPU time, over an array of ``nbytes`` (>= 128). A pointer chase: one pointer per
    64-byte line, the lines linked in one random cycle (Sattolo's shuffle), so every load waits
    for the one before and no prefetcher can guess it. ``hot``: allocated as the pick path's
    arrays are (``hot_alloc``: huge pages from 2 MiB); else PyMem_Malloc (small pages, as
    Python objects such as Endpoints live)."""
    import time

    cdef size_t n = nbytes // 64, i, j
    if n < 2:
        raise ValueError("nbytes must be at least 128")
    cdef char* base = <char*>(hot_alloc(n * 64) if hot else PyMem_Malloc(n * 64))
    if base == NULL:
        raise MemoryError()
    cdef size_t* order = <size_t*>PyMem_Malloc(sizeof(size_t) * n)
    cdef uint64_t state = seed, k
    cdef void** p
    try:
        if order == NULL:
            raise MemoryError()
        for i in range(n):
            order[i] = i
        for i in range(n - 1, 0, -1):  # Sattolo: a single cycle through every line
            j = splitmix_next(&state) % i
            order[i], order[j] = order[j], order[i]
        for i in range(n):
            (<void**>(base + order[i] * 64))[0] = base + order[(i + 1) % n] * 64
        p = <void**>base
        for k in range(n):  # one lap: pages touched, TLB and caches in their steady state
            p = <void**>p[0]
        start = time.thread_time_ns()
        for k in range(steps):
            p = <void**>p[0]
        elapsed = time.thread_time_ns() - start
        if p == NULL:  # never: keeps the chase from being optimised away
            raise AssertionError
        return elapsed / <double>steps
    finally:
        PyMem_Free(order)
        if hot:
            meshcore_hot_free(base, n * 64)
        else:
            PyMem_Free(base)


cdef enum Policy:
    RR = 0
    LR = 1
    RANDOM = 2
    RING = 3
    MAGLEV = 4

# ---------------------------------------------------------------------------------------
# XXH64 (Envoy's HashUtil::xxHash64) and SplitMix64
# ---------------------------------------------------------------------------------------

cdef uint64_t P1 = 0x9E3779B185EBCA87ULL
cdef uint64_t P2 = 0xC2B2AE3D27D4EB4FULL
cdef uint64_t P3 = 0x165667B19E3779F9ULL
cdef uint64_t P4 = 0x85EBCA77C2B2AE63ULL
cdef uint64_t P5 = 0x27D4EB2F165667C5ULL


cdef inline uint64_t _rotl(uint64_t x, int r) noexcept nogil:
    return (x << r) | (x >> (64 - r))


cdef inline uint64_t _read64(const unsigned char* p) noexcept nogil:
    # Little-endian read, independent of the host byte order.
    return (<uint64_t>p[0] | (<uint64_t>p[1] << 8) | (<uint64_t>p[2] << 16) | (<uint64_t>p[3] << 24)
            | (<uint64_t>p[4] << 32) | (<uint64_t>p[5] << 40) | (<uint64_t>p[6] << 48)
            | (<uint64_t>p[7] << 56))


cdef inline uint64_t _read32(const unsigned char* p) noexcept nogil:
    return (<uint64_t>p[0] | (<uint64_t>p[1] << 8) | (<uint64_t>p[2] << 16) | (<uint64_t>p[3] << 24))


cdef inline uint64_t _round(uint64_t acc, uint64_t lane) noexcept nogil:
    acc = acc + lane * P2
    return _rotl(acc, 31) * P1


cdef inline uint64_t _merge(uint64_t acc, uint64_t val) noexcept nogil:
    acc ^= _round(0, val)
    return acc * P1 + P4


cdef uint64_t c_xxh64(const unsigned char* data, size_t n, uint64_t seed) noexcept nogil:
    cdef size_t i = 0
    cdef uint64_t h, v1, v2, v3, v4
    if n >= 32:
        v1 = seed + P1 + P2
        v2 = seed + P2
        v3 = seed
        v4 = seed - P1
        while i + 32 <= n:
            v1 = _round(v1, _read64(data + i))
            v2 = _round(v2, _read64(data + i + 8))
            v3 = _round(v3, _read64(data + i + 16))
            v4 = _round(v4, _read64(data + i + 24))
            i += 32
        h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
        h = _merge(h, v1)
        h = _merge(h, v2)
        h = _merge(h, v3)
        h = _merge(h, v4)
    else:
        h = seed + P5
    h += <uint64_t>n
    while i + 8 <= n:
        h ^= _round(0, _read64(data + i))
        h = _rotl(h, 27) * P1 + P4
        i += 8
    if i + 4 <= n:
        h ^= _read32(data + i) * P1
        h = _rotl(h, 23) * P2 + P3
        i += 4
    while i < n:
        h ^= (<uint64_t>data[i]) * P5
        h = _rotl(h, 11) * P1
        i += 1
    h ^= h >> 33
    h *= P2
    h ^= h >> 29
    h *= P3
    h ^= h >> 32
    return h


def xxh64(data, seed=0):
    """XXH64 of ``data`` (``str`` is UTF-8 encoded) with a 64-bit ``seed``."""
    if isinstance(data, str):
        data = (<str>data).encode()
    cdef const unsigned char[::1] view = data
    cdef uint64_t s = PyLong_AsUnsignedLongLongMask(seed)
    if view.shape[0] == 0:
        return c_xxh64(<const unsigned char*>b"", 0, s)
    return c_xxh64(&view[0], view.shape[0], s)



# ---------------------------------------------------------------------------------------
# EDF scheduler (source/common/upstream/edf_scheduler.h): binary min-heap ordered by
# (deadline, order_offset). Offsets are unique, so the pop order is fully determined.
# ---------------------------------------------------------------------------------------

ctypedef struct EdfEntry:
    double deadline
    uint64_t order
    int32_t item

ctypedef struct EdfClass:
    # Entries of one static weight, sorted by (deadline, order): a ring buffer of fixed
    # capacity (a pick pops one entry of the class and pushes one back into it).
    EdfEntry* q
    Py_ssize_t head
    Py_ssize_t count
    Py_ssize_t cap
    double weight

ctypedef struct Edf:
    EdfEntry* heap      # heap mode: size entries, capacity == size (pop one, push one)
    Py_ssize_t size
    double current_time
    uint64_t order_offset
    # Class mode (static weights, i.e. round robin): one sorted queue per distinct weight
    # and a binary heap of class ids keyed by each queue's head. Re-added entries of a
    # class almost always go to its tail (time only moves forward and 1/w is the same);
    # when rounding says otherwise they are inserted in order, so the pop sequence is
    # exactly the heap's.
    EdfClass* classes   # NULL in heap mode
    int32_t* class_heap
    Py_ssize_t n_classes


cdef inline Py_ssize_t _edf_less_flag(EdfEntry* a, EdfEntry* b) noexcept nogil:
    # 1 if a orders before b, else 0, computed without short-circuit branches.
    return (<Py_ssize_t>(a.deadline < b.deadline)) | (
        (<Py_ssize_t>(a.deadline == b.deadline)) & (<Py_ssize_t>(a.order < b.order)))


cdef inline bint _edf_less(EdfEntry* a, EdfEntry* b) noexcept nogil:
    return a.deadline < b.deadline or (a.deadline == b.deadline and a.order < b.order)


@cython.boundscheck(False)
@cython.cdivision(True)
cdef void _edf_sift_down(Edf* e, Py_ssize_t pos) noexcept nogil:
    # A 4-ary heap: the children of i are 4i+1..4i+4. Invariant: 0 <= pos < e.size and every
    # child index is compared with e.size before it is read. Hole-based: the moving entry is
    # written once at its final place.
    cdef Py_ssize_t n = e.size, child, last, best
    cdef EdfEntry moving = e.heap[pos]
    while True:
        child = EDF_ARITY * pos + 1
        if child >= n:
            break
        last = child + EDF_ARITY
        if last > n:
            last = n
        best = child
        child += 1
        while child < last:
            if _edf_less(&e.heap[child], &e.heap[best]):
                best = child
            child += 1
        if not _edf_less(&e.heap[best], &moving):
            break
        e.heap[pos] = e.heap[best]
        pos = best
    e.heap[pos] = moving


cdef void _edf_heapify(Edf* e) noexcept nogil:
    cdef Py_ssize_t i = (e.size - 2) // EDF_ARITY + 1 if e.size > 1 else 0
    while i > 0:
        i -= 1
        _edf_sift_down(e, i)


@cython.boundscheck(False)
@cython.cdivision(True)
cdef inline void _edf_replace_top(Edf* e, double weight) noexcept nogil:
    # pickAndAdd: time advances to the popped deadline, the item is re-added with `weight`.
    # Replacing the root equals pop+push, since order offsets make the order total.
    # Bottom-up (Floyd): the re-added entry usually has the latest deadline, so walk the hole
    # down the smaller-child path to a leaf, then sift the entry up from there.
    # Indices: pos < n always; children are compared with n before they are read.
    cdef Py_ssize_t n = e.size, pos = 0, child, parent
    cdef EdfEntry moving = e.heap[0]
    e.current_time = moving.deadline
    moving.deadline = e.current_time + 1.0 / weight
    moving.order = e.order_offset
    e.order_offset += 1
    while True:
        child = EDF_ARITY * pos + 1
        if child >= n:
            break
        if child + 1 < n:
            child += _edf_less_flag(&e.heap[child + 1], &e.heap[child])  # branch-free
        e.heap[pos] = e.heap[child]
        pos = child
    while pos > 0:
        parent = (pos - 1) // EDF_ARITY
        if not _edf_less(&moving, &e.heap[parent]):
            break
        e.heap[pos] = e.heap[parent]
        pos = parent
    e.heap[pos] = moving


cdef void _edf_free(Edf* e) noexcept:
    cdef Py_ssize_t c
    if e != NULL:
        meshcore_hot_free(e.heap, sizeof(EdfEntry) * e.size)  # NULL in class mode
        if e.classes != NULL:
            for c in range(e.n_classes):
                PyMem_Free(e.classes[c].q)
            PyMem_Free(e.classes)
        PyMem_Free(e.class_heap)
        PyMem_Free(e)


cdef inline EdfEntry* _class_head(Edf* e, int32_t c) noexcept nogil:
    return &e.classes[c].q[e.classes[c].head]


@cython.boundscheck(False)
@cython.cdivision(True)
cdef void _class_sift_down(Edf* e, Py_ssize_t pos) noexcept nogil:
    # Binary heap over class ids; every class is non-empty (counts never change).
    cdef Py_ssize_t n = e.n_classes, child
    cdef int32_t moving = e.class_heap[pos]
    while True:
        child = 2 * pos + 1
        if child >= n:
            break
        if child + 1 < n and _edf_less(_class_head(e, e.class_heap[child + 1]), _class_head(e, e.class_heap[child])):
            child += 1
        if not _edf_less(_class_head(e, e.class_heap[child]), _class_head(e, moving)):
            break
        e.class_heap[pos] = e.class_heap[child]
        pos = child
    e.class_heap[pos] = moving


@cython.boundscheck(False)
@cython.cdivision(True)
cdef inline int32_t _edf_class_pick(Edf* e) noexcept nogil:
    """pickAndAdd in class mode: pop the global minimum, re-add it to its class."""
    cdef EdfClass* c = &e.classes[e.class_heap[0]]
    cdef EdfEntry popped = c.q[c.head]
    cdef EdfEntry fresh
    cdef Py_ssize_t pos, prev
    e.current_time = popped.deadline
    c.head = (c.head + 1) % c.cap
    c.count -= 1
    fresh.deadline = e.current_time + 1.0 / c.weight
    fresh.order = e.order_offset
    fresh.item = popped.item
    e.order_offset += 1
    pos = (c.head + c.count) % c.cap
    # Insert keeping the queue sorted; almost always a plain append at the tail.
    while c.count > 0:
        prev = (pos + c.cap - 1) % c.cap
        if not _edf_less(&fresh, &c.q[prev]):
            break
        c.q[pos] = c.q[prev]
        pos = prev
        if pos == c.head:
            break
    c.q[pos] = fresh
    c.count += 1
    _class_sift_down(e, 0)
    return popped.item


cdef int _entry_cmp(const void* a, const void* b) noexcept nogil:
    cdef EdfEntry* x = <EdfEntry*>a
    cdef EdfEntry* y = <EdfEntry*>b
    if _edf_less(x, y):
        return -1
    return 1 if _edf_less(y, x) else 0


cdef int _edf_to_classes(Edf* e, double* weight_of) except -1:
    """Re-organise a heap-mode scheduler with static weights into class mode."""
    cdef Py_ssize_t n = e.size, i, c, k
    cdef EdfEntry* sorted_entries = <EdfEntry*>zalloc(sizeof(EdfEntry) * n)
    cdef double* class_weight = <double*>zalloc(sizeof(double) * n)
    cdef Py_ssize_t* class_count = <Py_ssize_t*>zalloc(sizeof(Py_ssize_t) * n)
    cdef Py_ssize_t n_classes = 0
    cdef double w
    try:
        memcpy(sorted_entries, e.heap, sizeof(EdfEntry) * n)
        qsort(sorted_entries, n, sizeof(EdfEntry), _entry_cmp)
        for i in range(n):
            w = weight_of[sorted_entries[i].item]
            for c in range(n_classes):
                if class_weight[c] == w:
                    break
            else:
                c = n_classes
                class_weight[c] = w
                n_classes += 1
                if n_classes > 64:
                    return 0  # many distinct weights: the heap is as good; stay in heap mode
            class_count[c] += 1
        e.classes = <EdfClass*>zalloc(sizeof(EdfClass) * n_classes)
        e.class_heap = <int32_t*>zalloc(sizeof(int32_t) * n_classes)
        e.n_classes = n_classes
        for c in range(n_classes):
            e.classes[c].q = <EdfEntry*>zalloc(sizeof(EdfEntry) * class_count[c])
            e.classes[c].cap = class_count[c]
            e.classes[c].weight = class_weight[c]
            e.class_heap[c] = <int32_t>c
        for i in range(n):
            w = weight_of[sorted_entries[i].item]
            for c in range(n_classes):
                if class_weight[c] == w:
                    break
            k = e.classes[c].count
            e.classes[c].q[k] = sorted_entries[i]
            e.classes[c].count = k + 1
        c = n_classes // 2
        while c > 0:
            c -= 1
            _class_sift_down(e, c)
        meshcore_hot_free(e.heap, sizeof(EdfEntry) * n)
        e.heap = NULL
        return 0
    finally:
        PyMem_Free(sorted_entries)
        PyMem_Free(class_weight)
        PyMem_Free(class_count)


cdef Edf* _edf_create(int32_t* items, Py_ssize_t n, double* weight_of, uint64_t seed) except? NULL:
    """EdfScheduler::createWithPicks over ``items[0:n]``; ``weight_of[item]`` is an item's weight.

    Weights are evaluated once by the caller: for least request they depend on live
    counters, which cannot change while the GIL is held during construction.
    """
    cdef uint32_t picks = (<uint32_t>seed) % 429496729U
    cdef Edf* e = <Edf*>PyMem_Malloc(sizeof(Edf))
    if e == NULL:
        raise MemoryError()
    e.heap = <EdfEntry*>meshcore_hot_alloc(sizeof(EdfEntry) * n)  # hot: heap picks walk it
    if e.heap == NULL:
        PyMem_Free(e)
        raise MemoryError()
    e.size = n
    e.current_time = 0.0
    e.order_offset = 0
    e.classes = NULL
    e.class_heap = NULL
    e.n_classes = 0
    cdef double weights_sum = 0.0, w, pick_time, max_pick_time = 0.0
    cdef double picks_per_weight
    cdef uint32_t floor_picks
    cdef uint64_t picks_so_far = 0
    cdef Py_ssize_t k
    for k in range(n):
        weights_sum += weight_of[items[k]] + 1e-13
    picks_per_weight = picks / weights_sum
    for k in range(n):
        w = weight_of[items[k]] + 1e-13
        floor_picks = <uint32_t>(w * picks / weights_sum)
        if floor_picks > 0 and floor_picks / w >= picks_per_weight:
            floor_picks -= 1
        pick_time = floor_picks / w
        e.heap[k].deadline = (floor_picks + 1) / w
        e.heap[k].order = <uint64_t>k
        e.heap[k].item = items[k]
        if pick_time > max_pick_time:
            max_pick_time = pick_time
        picks_so_far += floor_picks
    _edf_heapify(e)
    e.current_time = max_pick_time
    e.order_offset = <uint64_t>n
    while picks_so_far < picks:
        # Leftover picks re-add with the un-augmented weight of the popped item.
        _edf_replace_top(e, weight_of[e.heap[0].item])
        picks_so_far += 1
    return e

# ---------------------------------------------------------------------------------------
# Per-host state and the table
# ---------------------------------------------------------------------------------------

ctypedef struct HostSlot:
    # The per-pick data of one host, 16 bytes: a P2C candidate's counter and, if it wins,
    # the Endpoint to return share a cache line.
    PyObject* ep        # borrowed: _Table.eps holds the reference for the table's lifetime
    int64_t active      # in-flight requests (carried over at publish)


ctypedef struct RingSlot:
    uint64_t hash
    int64_t host        # host index (int64: 16-byte entries, never straddling a line)


ctypedef struct RingBucket:
    # One bucket of a ring's direct-mapped index (``_ring_buckets``), 32 bytes: two per cache
    # line, never straddling one. A bucket holding at most one ring entry answers a lookup by
    # itself, Endpoint pointer included, so a ring-hash pick reads this line and then the
    # host's slot and Endpoint object in parallel (no ring entry, no slot-then-object chain).
    uint64_t split      # the bucket's one ring hash (UINT64_MAX when it holds none)
    PyObject* ep_le     # borrowed (_Table.eps): the Endpoint for h <= split
    PyObject* ep_gt     # the Endpoint for h > split
    int32_t host_le     # its host index; < 0: the bucket holds 2+ entries, the first at -1 - host_le
    int32_t host_gt


@cython.final
cdef class _Table:
    """One snapshot. Set up in ``LoadBalancer._build``, read-only afterwards except for
    the EDF heaps (advanced by picks) and the host slots' counters.

    The per-pick arrays (slots, by_ptr, src_hosts, rings, Maglev tables) come from
    ``hot_alloc`` (huge pages when large); each records its byte size for ``hot_free``."""
    cdef list eps                   # Endpoint per host index (owns the slots' references)
    cdef dict index                 # host key -> host index
    cdef HostSlot* slots            # per host index; one hot block with by_ptr after it
    cdef size_t hot_bytes           # size of that block
    cdef int32_t* by_ptr            # open addressing (linear probing): Endpoint address -> host
    cdef uint64_t by_ptr_mask       # index, -1 = empty; capacity a power of two >= 2 n_hosts,
    cdef int by_ptr_shift           # so it always has empty entries; 64 - log2(capacity), 1..63
    cdef int64_t* carry             # host index in the previous table, or -1; NULL once published
    cdef uint32_t* weights          # host weight per host index
    cdef Py_ssize_t n_hosts
    cdef int32_t n_prio
    cdef uint32_t* healthy_load     # per priority, percent
    cdef uint32_t* degraded_load
    cdef uint8_t* panic
    cdef int32_t* source_base       # per priority: id of its AllHosts source
    cdef Py_ssize_t n_sources
    cdef int64_t* src_off           # per source: offset into src_hosts
    cdef int64_t* src_len
    cdef int64_t* src_first         # per source: h if its hosts are h, h+1, ..., else -1
    cdef int64_t* src_rr            # per source: slot in LoadBalancer._rr, or -1
    cdef Edf** src_edf              # per source: host EDF or NULL
    cdef int32_t* src_hosts         # all sources' host indices, concatenated
    cdef size_t src_hosts_bytes
    cdef Edf** loc_edf              # per priority x {healthy, degraded}: locality EDF or NULL
    cdef double** loc_weights       # matching effective locality weights (by locality index)
    cdef RingSlot** ring            # per priority: ring entries sorted by (hash, order)
    cdef int64_t* ring_len
    cdef RingBucket** ring_bucket   # per priority: 2^bits entries, see _ring_buckets
    cdef int32_t* ring_shift        # per priority: 64 - bits
    cdef size_t* ring_bytes         # per priority: one hot block, the buckets then the ring
    cdef int32_t** maglev           # per priority: table of table_size host indices, or NULL
    cdef uint64_t maglev_size
    cdef bint lookahead             # n_hosts >= _lookahead_min_hosts when built

    def __dealloc__(self):
        cdef Py_ssize_t i
        meshcore_hot_free(self.slots, self.hot_bytes)
        PyMem_Free(self.carry)
        PyMem_Free(self.weights)
        PyMem_Free(self.healthy_load)
        PyMem_Free(self.degraded_load)
        PyMem_Free(self.panic)
        PyMem_Free(self.source_base)
        PyMem_Free(self.src_off)
        PyMem_Free(self.src_len)
        PyMem_Free(self.src_first)
        PyMem_Free(self.src_rr)
        meshcore_hot_free(self.src_hosts, self.src_hosts_bytes)
        if self.src_edf != NULL:
            for i in range(self.n_sources):
                _edf_free(self.src_edf[i])
            PyMem_Free(self.src_edf)
        if self.loc_edf != NULL:
            for i in range(2 * self.n_prio):
                _edf_free(self.loc_edf[i])
                PyMem_Free(self.loc_weights[i])
            PyMem_Free(self.loc_edf)
            PyMem_Free(self.loc_weights)
        if self.ring != NULL:
            if self.ring_bucket != NULL and self.ring_bytes != NULL:  # (NULL: an allocation failed)
                for i in range(self.n_prio):
                    meshcore_hot_free(self.ring_bucket[i], self.ring_bytes[i])
            PyMem_Free(self.ring)
            PyMem_Free(self.ring_bytes)
            PyMem_Free(self.ring_len)
            PyMem_Free(self.ring_bucket)
            PyMem_Free(self.ring_shift)
        if self.maglev != NULL:
            for i in range(self.n_prio):
                meshcore_hot_free(self.maglev[i], sizeof(int32_t) * self.maglev_size)
            PyMem_Free(self.maglev)


@cython.boundscheck(False)
@cython.cdivision(True)
cdef inline Py_ssize_t _by_ptr(_Table t, PyObject* ep) noexcept:
    """Host index of the Endpoint object at ``ep`` (identity), or -1: one probe, as a rule,
    whose host slot is the one a release then updates."""
    # Fibonacci hashing of the address; i is masked to the capacity. Entries are -1 or a
    # host index < n_hosts (filled in _build), and the table always has an empty entry.
    cdef uint64_t i = ((<uint64_t><size_t>ep) * 0x9E3779B97F4A7C15ULL) >> t.by_ptr_shift
    cdef int32_t v
    while True:
        v = t.by_ptr[i]
        if v < 0:
            return -1
        if t.slots[v].ep == ep:
            return v
        i = (i + 1) & t.by_ptr_mask


ctypedef struct RingEntry:
    uint64_t hash
    int64_t order
    int32_t host




ctypedef struct MaglevEntry:
    const char* key
    Py_ssize_t key_len
    Py_ssize_t pos
    int32_t host
    double weight
    uint64_t offset
    uint64_t skip


cdef int _maglev_cmp(const void* a, const void* b) noexcept nogil:
    # bytes ordering (memcmp, then length), then input position: Python's sorted() order.
    cdef MaglevEntry* x = <MaglevEntry*>a
    cdef MaglevEntry* y = <MaglevEntry*>b
    cdef int r = bytes_cmp(x.key, x.key_len, y.key, y.key_len)
    if r != 0:
        return r
    return -1 if x.pos < y.pos else (1 if x.pos > y.pos else 0)


cdef int _ring_cmp(const void* a, const void* b) noexcept nogil:
    cdef RingEntry* x = <RingEntry*>a
    cdef RingEntry* y = <RingEntry*>b
    if x.hash != y.hash:
        return -1 if x.hash < y.hash else 1
    return -1 if x.order < y.order else (1 if x.order > y.order else 0)


@cython.final
cdef class LoadBalancer:
    """Envoy-exact endpoint selection over one cluster's endpoints (compiled twin)."""

    cdef object _config
    cdef int _code
    cdef uint32_t _choice_count
    cdef double _bias
    cdef uint64_t _rng                 # SplitMix64 state
    cdef uint64_t _seed                # Envoy's seed_
    cdef set _ejected                  # keys of outlier-ejected hosts (FAILED_OUTLIER_CHECK)
    cdef dict _rr_slots                # (priority, source type, locality) -> slot in _rr
    cdef uint64_t* _rr                 # round-robin indexes, one per hosts source ever seen
    cdef Py_ssize_t _rr_len
    cdef Py_ssize_t _rr_cap
    cdef _Table _table
    cdef uint64_t _gen                 # tables published so far (look-ahead validity)
    # Look-ahead (see _look_ahead): host candidates of the pick that starts at RNG state
    # _ahead_state on table number _ahead_gen; _ahead_n == 0 when nothing is cached.
    cdef uint64_t _ahead_state
    cdef uint64_t _ahead_gen
    cdef int32_t _ahead_n
    cdef int64_t _ahead_host[LOOKAHEAD_MAX_CHOICES]
    # Random look-ahead (see _look_ahead_random): the host of the pick that draws at RNG state
    # _rnd_state[k], on table number _rnd_gen[k]; the last RANDOM_PREDICTIONS predictions.
    cdef uint64_t _rnd_state[RANDOM_PREDICTIONS]
    cdef uint64_t _rnd_gen[RANDOM_PREDICTIONS]
    cdef int64_t _rnd_host[RANDOM_PREDICTIONS]
    cdef uint32_t _rnd_next
    cdef object _update_lock           # serialises builders: carry indices refer to _table
    cdef object __weakref__

    def __init__(self, endpoints=(), policy="ROUND_ROBIN", seed=None, **options):
        cfg = LbConfig.from_options(policy, options)
        self._config = cfg
        self._code = cfg.policy_code
        self._choice_count = cfg.choice_count
        self._bias = cfg.active_request_bias
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        self._rng = PyLong_AsUnsignedLongLongMask(seed)
        self._seed = splitmix_next(&self._rng)
        self._ejected = set()
        self._rr_slots = {}
        self._update_lock = threading.Lock()
        self._publish(self._build(list(endpoints)))

    def __dealloc__(self):
        PyMem_Free(self._rr)

    @classmethod
    def from_xds(cls, cluster, load_assignment=None, seed=None):
        """Build from an xDS ``Cluster`` and ``ClusterLoadAssignment`` (messages or dicts)."""
        endpoints, policy, options = _xds_hook.decoder("load_balancer")(cluster, load_assignment)
        return cls(endpoints, policy=policy, seed=seed, **options)

    @property
    def policy(self):
        return self._config.policy

    @property
    def config(self):
        return self._config

    @property
    def endpoints(self):
        """The current endpoints (after de-duplication), in the order given."""
        return list(self._table.eps)

    cdef Py_ssize_t _rr_slot(self, tuple key) except -1:
        slot = self._rr_slots.get(key)
        if slot is not None:
            return slot
        cdef Py_ssize_t new_cap
        cdef uint64_t* grown
        if self._rr_len == self._rr_cap:
            new_cap = 16 if self._rr_cap == 0 else 2 * self._rr_cap
            grown = <uint64_t*>PyMem_Realloc(self._rr, sizeof(uint64_t) * new_cap)
            if grown == NULL:
                raise MemoryError()
            self._rr = grown
            self._rr_cap = new_cap
        self._rr[self._rr_len] = self._seed  # rr_indexes_.insert({source, seed_})
        self._rr_slots[key] = self._rr_len
        self._rr_len += 1
        return self._rr_len - 1

    cdef inline double _host_weight(self, _Table t, int32_t host) noexcept:
        """hostWeight(): the host's EDF weight now (least request scales by active)."""
        cdef double w = <double>t.weights[host]
        cdef int64_t active
        if self._code != LR or self._bias == 0.0:
            return w
        active = t.slots[host].active + 1
        if self._bias == 1.0:
            return w / <double>active
        return w / pow(<double>active, self._bias)

    cdef _Table _build(self, list endpoints):
        cfg = self._config
        layout = _build.layout(endpoints, cfg)
        cdef list eps = layout.endpoints
        cdef Py_ssize_t n = len(eps), i, j, k, p, total
        cdef _Table old = self._table
        cdef dict old_index = old.index if old is not None else {}
        cdef set ejected_keys = self._ejected
        cdef list ejected = []
        cdef _Table t = _Table()
        t.eps = eps
        t.index = layout.index
        t.n_hosts = n
        _alloc_hosts(t, n)
        t.lookahead = n >= _lookahead_min_hosts
        t.carry = <int64_t*>zalloc(sizeof(int64_t) * n)
        i = 0
        for ep in eps:
            key = (<object>ep).key
            j = old_index.get(key, -1)
            t.carry[i] = j
            t.slots[i].ep = <PyObject*>ep
            # Counters as of now (least-request EDF weights); refreshed again at publish.
            t.slots[i].active = old.slots[j].active if j >= 0 else 0
            ejected.append(key in ejected_keys)
            i += 1
        _fill_by_ptr(t)
        groups = _build.partition(layout, ejected, cfg)
        plan = groups.plan
        t.n_prio = layout.priorities
        t.weights = <uint32_t*>zalloc(sizeof(uint32_t) * n)
        i = 0
        for w in layout.weights:
            t.weights[i] = <uint32_t>w
            i += 1
        t.healthy_load = <uint32_t*>zalloc(sizeof(uint32_t) * t.n_prio)
        t.degraded_load = <uint32_t*>zalloc(sizeof(uint32_t) * t.n_prio)
        t.panic = <uint8_t*>zalloc(sizeof(uint8_t) * t.n_prio)
        for p in range(t.n_prio):
            t.healthy_load[p] = plan.healthy_load[p]
            t.degraded_load[p] = plan.degraded_load[p]
            t.panic[p] = plan.panic[p]
        if self._code == RING or self._code == MAGLEV:
            self._build_hash_tables(t, layout, groups, cfg)
            return t
        # Hosts sources, flattened.
        cdef list sources = groups.sources
        t.n_sources = len(sources)
        t.source_base = <int32_t*>zalloc(sizeof(int32_t) * t.n_prio)
        for p in range(t.n_prio):
            t.source_base[p] = layout.source_base[p]
        t.src_off = <int64_t*>zalloc(sizeof(int64_t) * t.n_sources)
        t.src_len = <int64_t*>zalloc(sizeof(int64_t) * t.n_sources)
        t.src_first = <int64_t*>zalloc(sizeof(int64_t) * t.n_sources)
        t.src_rr = <int64_t*>zalloc(sizeof(int64_t) * t.n_sources)
        t.src_edf = <Edf**>zalloc(sizeof(Edf*) * t.n_sources)
        # A source whose hosts are consecutive indices (all hosts of a priority, or its healthy
        # ones when all are healthy: the common case) is stored as its first index only;
        # the others are listed in src_hosts.
        cdef int64_t first
        total = 0
        for i in range(t.n_sources):
            hosts = sources[i][1]
            t.src_len[i] = len(hosts)
            first = hosts[0] if t.src_len[i] > 0 else -1
            for j in range(1, t.src_len[i]):
                if <int64_t>hosts[j] != first + j:
                    first = -1
                    break
            t.src_first[i] = first
            if first < 0:
                t.src_off[i] = total
                total += t.src_len[i]
            else:
                t.src_off[i] = 0  # no list; never read
        t.src_hosts_bytes = sizeof(int32_t) * total
        t.src_hosts = <int32_t*>hot_alloc(t.src_hosts_bytes)
        # Host weights by host index, evaluated once (hostWeight at build time).
        cdef double* weight_buf = <double*>zalloc(sizeof(double) * (n if n > 0 else 1))
        cdef int32_t* range_buf = NULL
        cdef int32_t* host_buf
        cdef bint equal
        for j in range(n):
            weight_buf[j] = self._host_weight(t, <int32_t>j)
        try:
            for i in range(t.n_sources):
                key, hosts = sources[i]
                first = t.src_first[i]
                if first < 0:
                    host_buf = t.src_hosts + t.src_off[i]
                    k = 0
                    for h in hosts:
                        host_buf[k] = h
                        k += 1
                t.src_rr[i] = self._rr_slot(key) if self._code == RR else -1
                if self._code == RANDOM or t.src_len[i] <= 1:
                    continue
                if first >= 0:  # the EDF takes a host list: first, first + 1, ...
                    if range_buf == NULL:
                        range_buf = <int32_t*>zalloc(sizeof(int32_t) * n)
                    for j in range(t.src_len[i]):
                        range_buf[j] = <int32_t>(first + j)
                    host_buf = range_buf
                equal = True
                for j in range(1, t.src_len[i]):
                    if t.weights[host_buf[j]] != t.weights[host_buf[0]]:
                        equal = False
                        break
                if equal:  # equal weights: plain RR index or P2C, no EDF (Envoy 1.40.0)
                    continue
                t.src_edf[i] = _edf_create(host_buf, t.src_len[i], weight_buf, self._seed)
                if self._code == RR:
                    _edf_to_classes(t.src_edf[i], weight_buf)
        finally:
            PyMem_Free(weight_buf)
            PyMem_Free(range_buf)
        if cfg.locality_weighted:
            t.loc_edf = <Edf**>zalloc(sizeof(Edf*) * 2 * t.n_prio)
            t.loc_weights = <double**>zalloc(sizeof(double*) * 2 * t.n_prio)
            for p in range(t.n_prio):
                loc_seed = splitmix_next(&self._rng)
                healthy_w, degraded_w = groups.locality_effective_weights(p, cfg)
                if groups.healthy_count[p]:
                    self._locality_scheduler(t, 2 * p, healthy_w, loc_seed)
                if groups.degraded_count[p]:
                    self._locality_scheduler(t, 2 * p + 1, degraded_w, loc_seed)
        return t

    cdef _locality_scheduler(self, _Table t, Py_ssize_t slot, list weights, uint64_t seed):
        cdef Py_ssize_t n = len(weights), i, m = 0
        cdef double* all_w = <double*>zalloc(sizeof(double) * n)
        cdef int32_t* items = <int32_t*>zalloc(sizeof(int32_t) * n)
        try:
            for i in range(n):
                all_w[i] = weights[i]
                if all_w[i] > 0:
                    items[m] = i
                    m += 1
            if m == 0:
                PyMem_Free(all_w)
                return
            t.loc_edf[slot] = _edf_create(items, m, all_w, seed)
            t.loc_weights[slot] = all_w
        finally:
            PyMem_Free(items)

    cdef _build_hash_tables(self, _Table t, object layout, object groups, object cfg):
        cdef Py_ssize_t p, m
        cdef uint64_t total
        cdef list hosts
        cdef int32_t* hw_host
        cdef double* hw_w
        t.ring = <RingSlot**>zalloc(sizeof(RingSlot*) * t.n_prio)
        t.ring_len = <int64_t*>zalloc(sizeof(int64_t) * t.n_prio)
        t.ring_bucket = <RingBucket**>zalloc(sizeof(RingBucket*) * t.n_prio)
        t.ring_shift = <int32_t*>zalloc(sizeof(int32_t) * t.n_prio)
        t.ring_bytes = <size_t*>zalloc(sizeof(size_t) * t.n_prio)
        t.maglev = <int32_t**>zalloc(sizeof(int32_t*) * t.n_prio)
        t.maglev_size = cfg.table_size
        cdef list keys = [(<str>hk).encode() for hk in layout.hash_keys]
        hw_host = <int32_t*>zalloc(sizeof(int32_t) * (t.n_hosts + 1))
        hw_w = <double*>zalloc(sizeof(double) * (t.n_hosts + 1))
        try:
            for p in range(t.n_prio):
                # Normalised (host, weight) list, as ThreadAwareLoadBalancerBase builds it.
                m = 0
                if not cfg.locality_weighted or not groups.locality_weights[p]:
                    hosts = groups.all_hosts[p] if t.panic[p] else groups.healthy_hosts[p]
                    total = 0
                    for h in hosts:
                        total += <uint64_t>t.weights[<Py_ssize_t>h]
                    for h in hosts:
                        hw_host[m] = h
                        hw_w[m] = t.weights[<Py_ssize_t>h] * 1.0 / <double>total
                        m += 1
                else:
                    for h, w in _build.normalized_weights(groups, layout, p, cfg):
                        hw_host[m] = h
                        hw_w[m] = w
                        m += 1
                if m == 0:
                    continue
                if self._code == RING:
                    self._ring(t, p, keys, hw_host, hw_w, m, cfg.minimum_ring_size, cfg.maximum_ring_size)
                else:
                    self._maglev(t, p, keys, hw_host, hw_w, m, cfg.table_size)
        finally:
            PyMem_Free(hw_host)
            PyMem_Free(hw_w)

    cdef _ring(self, _Table t, Py_ssize_t p, list keys, int32_t* hw_host, double* hw_w, Py_ssize_t m,
               uint64_t min_ring, uint64_t max_ring):
        cdef double min_w = 1.0, scale, current = 0.0, target = 0.0
        cdef Py_ssize_t e
        for e in range(m):
            if hw_w[e] < min_w:
                min_w = hw_w[e]
        scale = ceil(min_w * min_ring) / min_w
        if scale > <double>max_ring:
            scale = <double>max_ring
        cdef Py_ssize_t cap = <Py_ssize_t>ceil(scale) + m + 1, count = 0, klen
        cdef RingEntry* ring = <RingEntry*>zalloc(sizeof(RingEntry) * cap)
        cdef RingEntry* grown
        cdef char* kb
        cdef bytes key
        cdef uint64_t i
        cdef int digits
        cdef char digit_buf[24]
        cdef int32_t host
        try:
            for e in range(m):
                host = hw_host[e]
                key = keys[host]
                klen = len(key)
                kb = <char*>PyMem_Malloc(klen + 24)
                if kb == NULL:
                    raise MemoryError()
                memcpy(kb, <char*>key, klen)
                kb[klen] = 95  # '_'
                target += scale * hw_w[e]
                i = 0
                while current < target:
                    digits = _format_u64(i, digit_buf)
                    memcpy(kb + klen + 1, digit_buf, digits)
                    if count == cap:
                        cap *= 2
                        grown = <RingEntry*>PyMem_Realloc(ring, sizeof(RingEntry) * cap)
                        if grown == NULL:
                            PyMem_Free(kb)
                            raise MemoryError()
                        ring = grown
                    ring[count].hash = c_xxh64(<unsigned char*>kb, klen + 1 + digits, 0)
                    ring[count].order = count
                    ring[count].host = host
                    count += 1
                    i += 1
                    current += 1
                PyMem_Free(kb)
            qsort(ring, count, sizeof(RingEntry), _ring_cmp)
            _ring_alloc(t, p, count)
            for i in range(<uint64_t>count):
                t.ring[p][i].hash = ring[i].hash
                t.ring[p][i].host = ring[i].host
            _ring_buckets(t, p)
        finally:
            PyMem_Free(ring)

    cdef _maglev(self, _Table t, Py_ssize_t p, list keys, int32_t* hw_host, double* hw_w, Py_ssize_t n,
                 uint64_t size):
        cdef double max_w = 0.0
        cdef Py_ssize_t e
        cdef bytes key
        for e in range(n):
            if hw_w[e] > max_w:
                max_w = hw_w[e]
        # Entries sorted by hash key bytes (maglev_lb.cc sorts before filling); equal keys keep
        # their input order. `keys` keeps every key's buffer alive while this runs.
        cdef MaglevEntry* entries = <MaglevEntry*>zalloc(sizeof(MaglevEntry) * n)
        cdef uint64_t* nxt = <uint64_t*>zalloc(sizeof(uint64_t) * n)
        cdef double* target = <double*>zalloc(sizeof(double) * n)
        cdef int32_t* table = <int32_t*>hot_alloc(sizeof(int32_t) * size)
        cdef uint64_t filled = 0, c, slot
        cdef uint32_t iteration = 1
        try:
            for e in range(n):
                key = keys[hw_host[e]]
                entries[e].key = <const char*>key
                entries[e].key_len = len(key)
                entries[e].pos = e
                entries[e].host = hw_host[e]
                entries[e].weight = hw_w[e]
            qsort(entries, n, sizeof(MaglevEntry), _maglev_cmp)
            for e in range(n):
                entries[e].offset = c_xxh64(<const unsigned char*>entries[e].key, entries[e].key_len, 0) % size
                entries[e].skip = c_xxh64(<const unsigned char*>entries[e].key, entries[e].key_len, 1) % (size - 1) + 1
            for slot in range(size):
                table[slot] = -1
            while filled < size:
                for e in range(n):
                    if filled >= size:
                        break
                    if iteration * entries[e].weight < target[e]:
                        continue
                    target[e] += max_w
                    c = (entries[e].offset + entries[e].skip * nxt[e]) % size
                    while table[c] != -1:
                        nxt[e] += 1
                        c = (entries[e].offset + entries[e].skip * nxt[e]) % size
                    table[c] = entries[e].host
                    nxt[e] += 1
                    filled += 1
                iteration += 1
            t.maglev[p] = table
            table = NULL
        finally:
            PyMem_Free(entries)
            PyMem_Free(nxt)
            PyMem_Free(target)
            meshcore_hot_free(table, sizeof(int32_t) * size)

    cdef _publish(self, _Table t):
        """Carry surviving hosts' in-flight counts over, then swap the table.

        Pure C between reading the old counters and the swap (no Python code, no
        allocation, GIL held): no pick or release can slip in between.
        """
        cdef _Table old = self._table
        cdef Py_ssize_t i
        if old is not None:
            for i in range(t.n_hosts):
                # carry[i] is an index into old's arrays (from old.index) or -1.
                t.slots[i].active = old.slots[t.carry[i]].active if t.carry[i] >= 0 else 0
        self._table = t
        self._gen += 1
        self._ahead_n = 0
        PyMem_Free(t.carry)
        t.carry = NULL
        if self._ejected:
            self._ejected &= t.index.keys()

    def update(self, endpoints):
        """Replace the endpoint set atomically; surviving hosts keep their state.

        Updates are serialised among themselves (picks never wait for them): the carry
        map built against the current table must still describe it at publish time.
        """
        endpoints = list(endpoints)
        with self._update_lock:
            self._publish(self._build(endpoints))

    # -- picking ------------------------------------------------------------------------

    @cython.boundscheck(False)
    @cython.wraparound(False)
    @cython.cdivision(True)
    def pick(self, hash=None):
        """Choose an endpoint (and count one active request on it), or ``None``."""
        return self._pick(hash)

    @cython.boundscheck(False)
    @cython.wraparound(False)
    @cython.cdivision(True)
    cdef object _pick(self, object hash):
        cdef _Table t = self._table
        cdef uint64_t h
        cdef int32_t p = 0
        cdef int64_t host
        cdef bint degraded = False
        cdef int64_t sid, n, first
        cdef int32_t* hosts
        cdef Edf* edf
        cdef Edf* loc
        cdef int32_t locality
        cdef HostSlot* slot
        cdef uint64_t idx
        cdef PyObject* ep = NULL    # set when the path knows the Endpoint before the slot
        if self._code >= RING:
            if hash is None:
                h = splitmix_next(&self._rng)
            else:
                h = PyLong_AsUnsignedLongLongMask(hash)
            p = _choose_priority(t, h, &degraded)
            if self._code == RING:
                if t.ring_len[p] == 0:
                    return None
                host = _ring_lookup(t, p, h, &ep)
            else:
                if t.maglev[p] == NULL:
                    return None
                # h % maglev_size < maglev_size == allocated length of every maglev table.
                host = t.maglev[p][h % t.maglev_size]
        else:
            h = splitmix_next(&self._rng)
            p = _choose_priority(t, h, &degraded)
            # source ids come from _build.partition: base + {0 all, 1 healthy, 2 degraded,
            # 3 + 2i locality-healthy i, 4 + 2i locality-degraded i}; all < n_sources.
            sid = t.source_base[p]
            if not t.panic[p]:
                loc = NULL
                if t.loc_edf != NULL:
                    loc = t.loc_edf[2 * p + degraded]
                if loc != NULL:
                    locality = loc.heap[0].item
                    _edf_replace_top(loc, t.loc_weights[2 * p + degraded][locality])
                    sid += 3 + 2 * locality + degraded
                else:
                    sid += 1 + degraded
            if MESHCORE_DEBUG:
                assert 0 <= sid < t.n_sources, (sid, t.n_sources)
            n = t.src_len[sid]
            first = t.src_first[sid]
            # Read only when first < 0; src_off[sid] is then the source's offset in src_hosts.
            hosts = t.src_hosts + t.src_off[sid]
            if self._code == RANDOM:
                if n == 0:
                    return None
                # A source of consecutive hosts skips its host list (one memory access less).
                host = first + <int64_t>(h % <uint64_t>n) if first >= 0 else hosts[h % <uint64_t>n]
                if t.lookahead:
                    self._look_ahead_random(t)
            else:
                edf = t.src_edf[sid]
                if edf != NULL:
                    if edf.classes != NULL:
                        host = _edf_class_pick(edf)
                    else:
                        host = edf.heap[0].item
                        _edf_replace_top(edf, self._host_weight(t, <int32_t>host))
                        if t.lookahead:  # the next pick's host is the new top (same table)
                            _prefetch_host(t, edf.heap[0].item)
                elif n == 0:
                    return None
                elif self._code == RR:
                    # src_rr[sid] is a slot < _rr_len for every RR source (set in _build).
                    idx = self._rr[t.src_rr[sid]] % <uint64_t>n
                    self._rr[t.src_rr[sid]] += 1
                    host = first + <int64_t>idx if first >= 0 else hosts[idx]
                else:
                    host = self._p2c(t, hosts, n, first)
                    if t.lookahead:
                        self._look_ahead(t)
        if MESHCORE_DEBUG:
            assert 0 <= host < t.n_hosts, (host, t.n_hosts)
        slot = &t.slots[host]
        if ep == NULL:
            ep = slot.ep
        if self._code >= RING:
            # Hashed picks land anywhere and nothing predicts the next hash: start the
            # release's by_ptr probe now, alongside the slot and the object.
            prefetch_r(&t.by_ptr[((<uint64_t><size_t>ep) * 0x9E3779B97F4A7C15ULL) >> t.by_ptr_shift])
        slot.active += 1
        # The one touch of the Endpoint object: the reference taken for the return value.
        return <object>ep

    @cython.boundscheck(False)
    @cython.wraparound(False)
    @cython.cdivision(True)
    cdef inline int64_t _p2c(self, _Table t, int32_t* hosts, int64_t n, int64_t first) noexcept:
        # n > 0 (checked by the caller); indices are `draw % n` < n; first >= 0 means hosts[i]
        # == first + i. All draws are made before the counters are compared, so the
        # candidates' host slots are loaded in parallel.
        cdef uint64_t d0 = splitmix_next(&self._rng) % <uint64_t>n, d1
        cdef int64_t candidate = first + <int64_t>d0 if first >= 0 else hosts[d0], sampled
        cdef uint32_t c
        for c in range(1, self._choice_count):
            d1 = splitmix_next(&self._rng) % <uint64_t>n
            sampled = first + <int64_t>d1 if first >= 0 else hosts[d1]
            if t.slots[sampled].active < t.slots[candidate].active:
                candidate = sampled
        return candidate

    @cython.boundscheck(False)
    @cython.wraparound(False)
    @cython.cdivision(True)
    cdef void _look_ahead(self, _Table t) noexcept:
        """Least request (P2C): start loading what the next picks will touch.

        A pick's draws are a pure function of the RNG state and the table, so the hosts of
        the picks ahead are known now: for the pick after next, prefetch its candidates'
        host slots (and remember the candidates); for the next pick (candidates remembered
        by the previous pick), choose the likely winner from those slots, now in cache,
        and prefetch its Endpoint object and its by_ptr entry (the release). By the time
        the caller picks again, the DRAM accesses of that pick are done or under way.
        Nothing here changes state a pick reads, so the picks are what they would be
        without it; a guess made stale by a release or an update only wastes a prefetch."""
        cdef uint64_t s = self._rng, base, h, d
        cdef int64_t w, c, n, first, sid
        cdef int32_t k, count, p
        cdef bint degraded = False
        cdef PyObject* ep
        cdef int32_t* hosts
        # The next pick. _ahead_host[k] < n_hosts of table _ahead_gen, which is t.
        if self._ahead_n > 0 and self._ahead_state == s and self._ahead_gen == self._gen:
            w = self._ahead_host[0]
            for k in range(1, self._ahead_n):
                c = self._ahead_host[k]
                if t.slots[c].active < t.slots[w].active:
                    w = c
            ep = t.slots[w].ep
            prefetch_w(ep)
            prefetch_r(&t.by_ptr[((<uint64_t><size_t>ep) * 0x9E3779B97F4A7C15ULL) >> t.by_ptr_shift])
        # The pick after next: it starts once the next pick has made its draws.
        self._ahead_n = 0
        count = <int32_t>self._choice_count
        if count > LOOKAHEAD_MAX_CHOICES:
            return
        base = s + GOLDEN * <uint64_t>(1 + count)
        h = splitmix_at(base + GOLDEN)
        p = _choose_priority(t, h, &degraded)
        sid = t.source_base[p]
        if not t.panic[p]:
            if t.loc_edf != NULL and t.loc_edf[2 * p + degraded] != NULL:
                return  # the locality scheduler's state decides: not predicted
            sid += 1 + degraded
        n = t.src_len[sid]
        if n == 0 or t.src_edf[sid] != NULL:
            return
        first = t.src_first[sid]
        hosts = t.src_hosts + t.src_off[sid]  # read only when first < 0 (then a valid offset)
        for k in range(count):
            d = splitmix_at(base + GOLDEN * <uint64_t>(2 + k)) % <uint64_t>n
            c = first + <int64_t>d if first >= 0 else hosts[d]
            self._ahead_host[k] = c
            prefetch_w(&t.slots[c])
        self._ahead_n = count
        self._ahead_state = base
        self._ahead_gen = self._gen

    @cython.boundscheck(False)
    cdef void _look_ahead_random(self, _Table t) noexcept:
        """Random picks over a large table: a pick's host is a pure function of the RNG state
        and the table, so the picks ahead are known. With s the state after this pick's draw
        (pick k + m draws splitmix_at(s + m * GOLDEN)): prefetch the host slot of pick k +
        RANDOM_SLOT_AHEAD (and remember its host), and the Endpoint object and by_ptr entry of
        pick k + RANDOM_EP_AHEAD, whose host was remembered when its slot was prefetched (so
        its slot is in cache by now). Nothing here changes what a pick reads; a table published
        in between invalidates what was remembered (_rnd_gen) and only wastes a prefetch."""
        cdef uint64_t target = self._rng + GOLDEN * <uint64_t>RANDOM_EP_AHEAD
        cdef int64_t host = -2
        cdef uint32_t k
        for k in range(RANDOM_PREDICTIONS):
            if self._rnd_state[k] == target and self._rnd_gen[k] == self._gen:
                host = self._rnd_host[k]  # a host index of t (same table generation)
                break
        if host == -2:
            host = _random_host_at(t, splitmix_at(target))
        if host >= 0:
            _prefetch_host(t, host)
        target = self._rng + GOLDEN * <uint64_t>RANDOM_SLOT_AHEAD
        host = _random_host_at(t, splitmix_at(target))
        k = self._rnd_next % RANDOM_PREDICTIONS
        self._rnd_next += 1
        self._rnd_state[k] = target
        self._rnd_gen[k] = self._gen
        self._rnd_host[k] = host
        if host >= 0:
            prefetch_w(&t.slots[host])  # host < n_hosts (a host index of t)

    def release(self, endpoint):
        """The request to ``endpoint`` finished (least-request accounting). An Endpoint this
        balancer does not have is ignored; anything but an Endpoint is a TypeError."""
        self._release(endpoint)

    cdef _release(self, object endpoint):
        if type(endpoint) is not Endpoint and not isinstance(endpoint, Endpoint):
            _not_endpoint("release", endpoint)
        cdef _Table t = self._table
        cdef Py_ssize_t k = _by_ptr(t, <PyObject*>endpoint)
        if k < 0:
            k = self._index_of(t, endpoint)
            if k < 0:
                return
        # k < n_hosts: from by_ptr or index, both built for t.
        if t.slots[k].active > 0:
            t.slots[k].active -= 1

    cdef Py_ssize_t _index_of(self, _Table t, object endpoint) except -2:
        """An equal Endpoint that is not the table's own object: by key (-1 if unknown)."""
        i = t.index.get(endpoint.key)
        return -1 if i is None else <Py_ssize_t>i

    # -- introspection and host state ----------------------------------------------------

    def active_requests(self, endpoint):
        """Requests picked for ``endpoint`` and not yet released (0 if unknown)."""
        if not isinstance(endpoint, Endpoint):
            _not_endpoint("active_requests", endpoint)
        cdef _Table t = self._table
        cdef Py_ssize_t k = _by_ptr(t, <PyObject*>endpoint)
        if k < 0:
            k = self._index_of(t, endpoint)
        return t.slots[k].active if k >= 0 else 0

    def set_ejected(self, endpoint, ejected=True):
        """Mark a host outlier-ejected (unhealthy) or restore it; rebuilds the table."""
        if not isinstance(endpoint, Endpoint):
            _not_endpoint("set_ejected", endpoint)
        key = endpoint.key
        with self._update_lock:
            if key not in self._table.index:
                raise KeyError(key)
            if (key in self._ejected) != bool(ejected):
                if ejected:
                    self._ejected.add(key)
                else:
                    self._ejected.discard(key)
                self._publish(self._build(list(self._table.eps)))

    def is_ejected(self, endpoint):
        if not isinstance(endpoint, Endpoint):
            _not_endpoint("is_ejected", endpoint)
        return endpoint.key in self._ejected

    @property
    def priority_loads(self):
        """(healthy, degraded) per-priority loads in percent, summing to 100."""
        cdef _Table t = self._table
        return ([t.healthy_load[p] for p in range(t.n_prio)],
                [t.degraded_load[p] for p in range(t.n_prio)])

    @property
    def panic(self):
        """Per-priority panic flags."""
        cdef _Table t = self._table
        return [bool(t.panic[p]) for p in range(t.n_prio)]

    def hash_table_stats(self):
        """Per priority, Envoy's ring_hash_lb / maglev_lb gauges: size and min/max entries
        per host (over hosts present in the table)."""
        cdef _Table t = self._table
        cdef Py_ssize_t p, k, size
        cdef int32_t* hosts
        if self._code != RING and self._code != MAGLEV:
            return []
        out = []
        for p in range(t.n_prio):
            counts = {}
            if self._code == RING:
                size = t.ring_len[p]
                for k in range(size):
                    counts[t.ring[p][k].host] = counts.get(t.ring[p][k].host, 0) + 1
            else:
                hosts = t.maglev[p]
                size = t.maglev_size if hosts != NULL else 0
                for k in range(size):
                    counts[hosts[k]] = counts.get(hosts[k], 0) + 1
            out.append({
                "size": size,
                "min_entries_per_host": min(counts.values()) if counts else 0,
                "max_entries_per_host": max(counts.values()) if counts else 0,
                "hosts": len(counts),
            })
        return out

    def __len__(self):
        return len(self._table.eps)

    def __repr__(self):
        return f"<LoadBalancer {self._config.policy} endpoints={len(self)} impl=c>"


cdef _not_endpoint(str method, object obj):
    raise TypeError(f"LoadBalancer.{method}() takes an Endpoint, got {type(obj).__name__}")


@cython.boundscheck(False)
cdef inline int32_t _choose_priority(_Table t, uint64_t h, bint* degraded) noexcept:
    # choosePriority(): x in 1..100 against healthy then degraded loads (sum is 100).
    # boundscheck(False): healthy_load/degraded_load hold n_prio >= 1 entries (_build.layout makes
    # at least priority 0), so index 0 and every p < n_prio are in range.
    cdef uint64_t x, acc = 0
    cdef int32_t p
    if t.healthy_load[0] >= 100:  # the usual case: P0 takes every x, no division needed
        degraded[0] = False
        return 0
    x = h % 100 + 1
    for p in range(t.n_prio):
        acc += t.healthy_load[p]
        if x <= acc:
            degraded[0] = False
            return p
    for p in range(t.n_prio):
        acc += t.degraded_load[p]
        if x <= acc:
            degraded[0] = True
            return p
    degraded[0] = False
    return 0


@cython.boundscheck(False)
@cython.cdivision(True)
cdef inline int64_t _random_host_at(_Table t, uint64_t h) noexcept:
    """The host a random pick drawing ``h`` returns from ``t``, or -1 where a scheduler's
    state decides (locality EDF) or nothing is picked. Mirrors ``_pick``'s RANDOM path."""
    cdef bint degraded = False
    cdef int32_t p = _choose_priority(t, h, &degraded)
    cdef int64_t sid = t.source_base[p], n, first
    if not t.panic[p]:
        if t.loc_edf != NULL and t.loc_edf[2 * p + degraded] != NULL:
            return -1
        sid += 1 + degraded
    n = t.src_len[sid]
    if n == 0:
        return -1
    first = t.src_first[sid]
    # sid < n_sources and h % n < n, as in _pick; src_off[sid] is a valid offset when first < 0.
    return first + <int64_t>(h % <uint64_t>n) if first >= 0 else t.src_hosts[t.src_off[sid] + h % <uint64_t>n]


@cython.boundscheck(False)
cdef inline void _prefetch_host(_Table t, int64_t host) noexcept:
    """Prefetch what picking and releasing ``host`` touches beyond its slot."""
    # host < n_hosts: the callers pass host indices of t (an EDF item of t).
    cdef PyObject* ep = t.slots[host].ep
    prefetch_w(ep)
    prefetch_r(&t.by_ptr[((<uint64_t><size_t>ep) * 0x9E3779B97F4A7C15ULL) >> t.by_ptr_shift])


cdef int _alloc_hosts(_Table t, Py_ssize_t n) except -1:
    """Allocate t.slots (n entries) and t.by_ptr (empty) as one hot block."""
    cdef int bits = 1
    cdef uint64_t cap
    while (<uint64_t>1 << bits) < <uint64_t>(2 * n):
        bits += 1
    cap = <uint64_t>1 << bits
    t.hot_bytes = sizeof(HostSlot) * n + sizeof(int32_t) * cap
    t.slots = <HostSlot*>hot_alloc(t.hot_bytes)
    t.by_ptr = <int32_t*>(t.slots + n)  # 16-byte slots: by_ptr is aligned
    t.by_ptr_mask = cap - 1
    t.by_ptr_shift = 64 - bits
    memset(t.by_ptr, 0xFF, sizeof(int32_t) * cap)  # -1 everywhere
    return 0


cdef int _fill_by_ptr(_Table t) except -1:
    """Index t.slots[0:n_hosts] (every slot's ep set) in t.by_ptr."""
    cdef Py_ssize_t i
    cdef uint64_t j
    for i in range(t.n_hosts):
        j = ((<uint64_t><size_t>t.slots[i].ep) * 0x9E3779B97F4A7C15ULL) >> t.by_ptr_shift
        while t.by_ptr[j] >= 0:
            j = (j + 1) & t.by_ptr_mask
        t.by_ptr[j] = <int32_t>i
    return 0


cdef int _ring_alloc(_Table t, Py_ssize_t p, int64_t n) except -1:
    """One hot block for ring ``p`` (n > 0 entries) and its bucket index (sized here).

    Large rings (n >= 32,768, past what stays in cache): at least 2n buckets, so most hold at
    most one ring entry (Poisson: 91%) and answer a lookup alone; at most 2^21 (64 MiB, the old
    int32 index's bound at 2^24). Smaller rings, whose index stays in cache: about n buckets
    (74% answer alone; n/4 measured ~8 ns slower per pick), 32 KiB for a 1,024-entry ring."""
    cdef int bits = 1
    cdef int64_t want = 2 * n if n >= 32768 else n
    while bits < 21 and (<int64_t>1 << bits) < want:
        bits += 1
    t.ring_len[p] = n
    t.ring_shift[p] = 64 - bits
    t.ring_bytes[p] = sizeof(RingBucket) * (<size_t>1 << bits) + sizeof(RingSlot) * n
    t.ring_bucket[p] = <RingBucket*>hot_alloc(t.ring_bytes[p])
    t.ring[p] = <RingSlot*>(t.ring_bucket[p] + (<size_t>1 << bits))  # 32-byte buckets: aligned
    return 0


cdef int _ring_buckets(_Table t, Py_ssize_t p) except -1:
    """Direct-mapped index over ring ``p`` by the top ``bits`` bits of the hash.

    Bucket b covers hashes [b << shift, (b + 1) << shift); ring[i] is the first entry with
    hash >= b << shift (wrapping to entry 0 past the end). No ring hash in the bucket: every
    hash of it maps to ring[i]'s host (split = UINT64_MAX, both sides that host). One: hashes
    up to it map to its host, the others to the next entry's (wrapping). Two or more:
    host_le = -1 - i, and the lookup scans the ring from i. Slots' ep are set before this runs."""
    cdef int64_t n = t.ring_len[p], i = 0, j, hi, hj
    cdef int shift = t.ring_shift[p]
    cdef uint64_t b, nb = <uint64_t>1 << (64 - shift)
    cdef RingSlot* ring = t.ring[p]
    cdef RingBucket* bucket = t.ring_bucket[p]
    for b in range(nb):
        while i < n and (ring[i].hash >> shift) < b:
            i += 1
        # ring[0:i] < b << shift <= ring[i].hash; j: the entry after i, wrapping.
        j = i + 1 if i + 1 < n else 0
        hi = ring[i if i < n else 0].host
        hj = ring[j].host
        if i >= n or (ring[i].hash >> shift) != b:
            bucket[b].split = 0xFFFFFFFFFFFFFFFFULL
            bucket[b].host_le = bucket[b].host_gt = <int32_t>hi
        elif j == 0 or (ring[j].hash >> shift) != b:
            bucket[b].split = ring[i].hash
            bucket[b].host_le = <int32_t>hi
            bucket[b].host_gt = <int32_t>hj
        else:
            bucket[b].split = 0
            bucket[b].host_le = <int32_t>(-1 - i)
            bucket[b].host_gt = 0
        # host indices < n_hosts: ring entries are hosts of t.
        bucket[b].ep_le = t.slots[bucket[b].host_le].ep if bucket[b].host_le >= 0 else NULL
        bucket[b].ep_gt = t.slots[bucket[b].host_gt].ep
    return 0


@cython.boundscheck(False)
@cython.cdivision(True)
cdef inline int64_t _ring_lookup(_Table t, int32_t p, uint64_t h, PyObject** ep) noexcept:
    """Envoy's ketama search (ring_hash_lb.cc): the first entry whose hash is >= h, or entry
    0 past the end (a lower bound with wrap-around, equal hashes and h == 0 included). Returns
    its host and sets ``ep`` to its Endpoint."""
    # ring_len[p] > 0 (checked by the caller). h >> shift < 2^bits, the bucket count; a
    # negative host_le is -1 - (an index < n at which the bucket's hashes start), and the scan
    # stops at n at the latest.
    cdef RingBucket* b = &t.ring_bucket[p][h >> t.ring_shift[p]]
    cdef RingSlot* ring
    cdef int64_t n, i, host
    if b.host_le >= 0:
        if h <= b.split:
            ep[0] = b.ep_le
            return b.host_le
        ep[0] = b.ep_gt
        return b.host_gt
    ring = t.ring[p]
    n = t.ring_len[p]
    i = -1 - <int64_t>b.host_le
    while i < n and ring[i].hash < h:
        i += 1
    host = ring[i if i < n else 0].host
    ep[0] = t.slots[host].ep
    return host


cdef int _format_u64(uint64_t v, char* out) noexcept nogil:
    """Decimal digits of v into out (no terminator); returns the count (absl::StrCat)."""
    cdef char tmp[24]
    cdef int n = 0, i
    if v == 0:
        out[0] = 48
        return 1
    while v > 0:
        tmp[n] = <char>(48 + v % 10)
        v //= 10
        n += 1
    for i in range(n):
        out[i] = tmp[n - 1 - i]
    return n


# -- entry points for the compiled request path (call_c cimports these through lb_c.pxd) -------


cdef object lb_pick(object lb, object hash):
    """``lb.pick(hash)`` without a Python call; ``lb`` must be exactly a LoadBalancer."""
    return (<LoadBalancer>lb)._pick(hash)


cdef object lb_release(object lb, object endpoint):
    """``lb.release(endpoint)`` without a Python call; ``lb`` must be exactly a LoadBalancer."""
    return (<LoadBalancer>lb)._release(endpoint)

