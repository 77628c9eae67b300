# cython: language_level=3, embedsignature=True
"""RouteTable, compiled twin of ``routes_py`` (same decisions, same results).

Per virtual host, routes live in byte tries (one case-sensitive, one over ASCII-lower-cased
bytes for ``case_sensitive: false``), keyed by the slots of ``routes_py.slots``: exact paths,
prefixes, regexes by their RE2-proven literal prefix, and in each slot a header index (exact
value of an ordinary header -> routes). A request walks the path once, collecting candidate
route indices (header indexes looked up with the request's values, regex routes only counted);
the candidates are evaluated in route order up to the first match, and the regex routes before
it, if any, are decided by one pass of the virtual host's RE2 set. So first-match-wins is
exactly Envoy's linear scan, and no index drops a route it has not proven cannot match.

Routes decided by the path alone (or by the path and their indexed header), whose result does
not depend on the request, are answered from C with a shared, pre-built result: no allocation.
Everything else (other header, query, runtime and gRPC matchers, weighted clusters, hashes,
rewrites) uses the shared helpers of ``routes_py``.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from cpython.exc cimport PyErr_Clear
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libc.string cimport memchr, memcmp
cimport cython

from ._common cimport bytes_cmp, qsort, splitmix_next, zalloc

import os
from collections.abc import Mapping as _AbcMapping

from .._route_model import RouteConfigSpec
from .._routing import (INLINE_HEADERS, RouteMatch, ascii_lower, check_request_args, empty_forwarded_proto, is_grpc,
                        match_bytes, regex_fullmatch, request_headers, split_host_port, strip_path_params,
                        tls_redirect)
from . import _xds_hook
from . import routes_py as _py
from .lb_c import xxh64 as _xxh64  # request hashes with the compiled XXH64

__all__ = ["RouteTable"]

try:  # google-re2's binding-level anchor (its Match skips the wrapper's Python frames)
    import re2 as _re2_mod
    _ANCHOR_BOTH = _re2_mod._Anchor.ANCHOR_BOTH
except AttributeError:  # another google-re2 layout: regexes run through their public fullmatch
    _ANCHOR_BOTH = None

cdef extern from "Python.h":
    # Declared without an exception value: NULL (lone surrogates, or not a str) is handled by
    # _utf8 below, which clears the error and falls back, so the common path has no try block.
    const char* _as_utf8 "PyUnicode_AsUTF8AndSize"(object s, Py_ssize_t* size)

cdef enum:
    DEF_CANDIDATES = 64  # candidates kept on the stack; more spill to the heap




cdef enum:
    # The route lists of a trie node, in this order (prefix-like lists first: a walk visits
    # L_PREFIX .. L_REGEX of every node it passes, L_EXACT .. L_EGROUP of the node it ends at).
    L_PREFIX = 0    # prefix / path_separated_prefix routes whose key ends here
    L_PGROUP = 1    # header indexes (index in _Vhost.hidx) of those slots
    L_REGEX = 2     # regex routes whose literal prefix ends here
    L_EXACT = 3     # exact-path routes
    L_EGROUP = 4    # header indexes of exact-path slots
    N_LISTS = 5


@cython.final
cdef class _Trie:
    """Byte trie flattened into arrays. Node 0 is the root. Edges of a node are contiguous
    and sorted by label; each node has N_LISTS lists of route (or header index) numbers:
    list j of node x is ids[off[x * N_LISTS + j] : off[x * N_LISTS + j + 1]], ascending."""
    cdef Py_ssize_t n_nodes
    cdef int32_t* edge_start       # per node: first edge
    cdef int32_t* edge_count       # per node: number of edges
    cdef uint8_t* edge_label       # per edge
    cdef int32_t* edge_child       # per edge: child node
    cdef int32_t* off              # n_nodes * N_LISTS + 1 list offsets into ids
    cdef int32_t* ids
    cdef bint empty

    def __dealloc__(self):
        PyMem_Free(self.edge_start)
        PyMem_Free(self.edge_count)
        PyMem_Free(self.edge_label)
        PyMem_Free(self.edge_child)
        PyMem_Free(self.off)
        PyMem_Free(self.ids)




cdef int _int32_cmp(const void* a, const void* b) noexcept nogil:
    cdef int32_t x = (<int32_t*>a)[0], y = (<int32_t*>b)[0]
    return -1 if x < y else (1 if x > y else 0)




ctypedef struct TrieKey:
    const unsigned char* key
    Py_ssize_t length
    int32_t route                  # route index, or header index number (L_PGROUP / L_EGROUP)
    int32_t lst                    # L_*


cdef int _key_cmp(const void* a, const void* b) noexcept nogil:
    cdef TrieKey* x = <TrieKey*>a
    cdef TrieKey* y = <TrieKey*>b
    cdef int r = bytes_cmp(<const char*>x.key, x.length, <const char*>y.key, y.length)
    if r != 0:
        return r
    if x.lst != y.lst:
        return x.lst - y.lst
    return x.route - y.route


@cython.boundscheck(False)
@cython.wraparound(False)
cdef _Trie _build_trie(list entries):
    """entries: (key bytes, route or header index number, L_* list). Built from the sorted keys
    in one pass: each key shares its longest common prefix with the previous one, so new nodes
    are always the last child of their parent and children come out in label order."""
    cdef _Trie t = _Trie()
    cdef Py_ssize_t n_keys = len(entries), total = 0, i, d, lcp, n_nodes = 1
    cdef Py_ssize_t e, k, node, child, q_head, q_tail, slot
    t.empty = n_keys == 0
    cdef TrieKey* keys = <TrieKey*>zalloc(sizeof(TrieKey) * (n_keys or 1))
    for i in range(n_keys):
        key, ri, lst = entries[i]
        keys[i].key = <const unsigned char*><const char*>key  # entries (and so key) outlive the build
        keys[i].length = len(key)
        keys[i].route = ri
        keys[i].lst = lst
        total += len(key)
    qsort(keys, n_keys, sizeof(TrieKey), _key_cmp)
    # Linked form: first/last child and next sibling per node.
    cdef Py_ssize_t cap = total + 1
    cdef int32_t* first_child = <int32_t*>zalloc(sizeof(int32_t) * cap)
    cdef int32_t* last_child = <int32_t*>zalloc(sizeof(int32_t) * cap)
    cdef int32_t* next_sibling = <int32_t*>zalloc(sizeof(int32_t) * cap)
    cdef uint8_t* label = <uint8_t*>zalloc(cap)
    cdef int32_t* stack = <int32_t*>zalloc(sizeof(int32_t) * cap)
    cdef int32_t* order = <int32_t*>zalloc(sizeof(int32_t) * cap)
    cdef int32_t* key_node = <int32_t*>zalloc(sizeof(int32_t) * (n_keys or 1))
    cdef int32_t* new_id = <int32_t*>zalloc(sizeof(int32_t) * cap)
    cdef int32_t* fill = NULL
    try:
        first_child[0] = -1
        last_child[0] = -1
        next_sibling[0] = -1
        stack[0] = 0
        # Nodes created: at most one per key byte, so n_nodes <= total + 1 = cap; stack depth
        # is a key length (<= total).
        for i in range(n_keys):
            lcp = 0
            if i:
                d = keys[i - 1].length if keys[i - 1].length < keys[i].length else keys[i].length
                while lcp < d and keys[i - 1].key[lcp] == keys[i].key[lcp]:
                    lcp += 1
            node = stack[lcp]
            for d in range(lcp, keys[i].length):
                child = n_nodes
                n_nodes += 1
                label[child] = keys[i].key[d]
                first_child[child] = -1
                last_child[child] = -1
                next_sibling[child] = -1
                if last_child[node] < 0:
                    first_child[node] = <int32_t>child
                else:
                    next_sibling[last_child[node]] = <int32_t>child
                last_child[node] = <int32_t>child
                stack[d + 1] = <int32_t>child
                node = child
            key_node[i] = <int32_t>node
        # Breadth-first renumbering makes every node's edges contiguous and label-sorted.
        t.n_nodes = n_nodes
        t.edge_start = <int32_t*>zalloc(sizeof(int32_t) * n_nodes)
        t.edge_count = <int32_t*>zalloc(sizeof(int32_t) * n_nodes)
        t.edge_label = <uint8_t*>zalloc(n_nodes)
        t.edge_child = <int32_t*>zalloc(sizeof(int32_t) * n_nodes)
        t.off = <int32_t*>zalloc(sizeof(int32_t) * (n_nodes * N_LISTS + 1))
        t.ids = <int32_t*>zalloc(sizeof(int32_t) * (n_keys or 1))
        fill = <int32_t*>zalloc(sizeof(int32_t) * (n_nodes * N_LISTS + 1))
        order[0] = 0
        new_id[0] = 0
        q_head = 0
        q_tail = 1
        e = 0
        while q_head < q_tail:
            node = order[q_head]
            t.edge_start[q_head] = <int32_t>e
            child = first_child[node]
            k = 0
            while child >= 0:
                new_id[child] = <int32_t>q_tail
                order[q_tail] = <int32_t>child
                t.edge_label[e] = label[child]
                t.edge_child[e] = <int32_t>q_tail
                q_tail += 1
                e += 1
                k += 1
                child = next_sibling[child]
            t.edge_count[q_head] = <int32_t>k
            q_head += 1
        # Lists: count per (node, list), prefix sums, then place. Keys are sorted by (bytes,
        # list, number), so every list comes out ascending.
        for i in range(n_keys):
            fill[new_id[key_node[i]] * N_LISTS + keys[i].lst] += 1
        k = 0
        for slot in range(n_nodes * N_LISTS):
            t.off[slot] = <int32_t>k
            k += fill[slot]
            fill[slot] = t.off[slot]
        t.off[n_nodes * N_LISTS] = <int32_t>k
        for i in range(n_keys):
            slot = new_id[key_node[i]] * N_LISTS + keys[i].lst
            t.ids[fill[slot]] = keys[i].route
            fill[slot] += 1
    finally:
        PyMem_Free(keys)
        PyMem_Free(first_child)
        PyMem_Free(last_child)
        PyMem_Free(next_sibling)
        PyMem_Free(label)
        PyMem_Free(stack)
        PyMem_Free(order)
        PyMem_Free(key_node)
        PyMem_Free(new_id)
        PyMem_Free(fill)
    return t


@cython.boundscheck(False)
@cython.wraparound(False)
cdef inline int32_t _child(_Trie t, int32_t node, uint8_t b) noexcept nogil:
    # Edges of `node` are edge_start[node] .. + edge_count[node] (set in _build_trie).
    # Labels are sorted: narrow [lo, end) by bisection (every label before lo is < b),
    # then scan while labels are <= b.
    cdef int32_t lo = t.edge_start[node], end = lo + t.edge_count[node], hi = end, mid
    while hi - lo > 4:
        mid = (lo + hi) >> 1
        if t.edge_label[mid] < b:
            lo = mid + 1
        else:
            hi = mid
    while lo < end and t.edge_label[lo] <= b:
        if t.edge_label[lo] == b:
            return t.edge_child[lo]
        lo += 1
    return -1


ctypedef struct Candidates:
    int32_t* ids
    Py_ssize_t n
    Py_ssize_t cap
    int32_t stack[DEF_CANDIDATES]
    bint heap


ctypedef struct RegexSeen:
    # Regex routes a walk made candidates: how many, and the first (every list ascends).
    Py_ssize_t count
    int32_t first


cdef inline void _init(Candidates* c) noexcept nogil:
    c.ids = c.stack
    c.n = 0
    c.cap = DEF_CANDIDATES
    c.heap = False


@cython.boundscheck(False)
@cython.wraparound(False)
cdef int _push(Candidates* c, const int32_t* src, Py_ssize_t count) except -1:
    cdef Py_ssize_t i
    cdef int32_t* grown
    if c.n + count > c.cap:
        grown = <int32_t*>zalloc(sizeof(int32_t) * (c.cap + count) * 2)
        for i in range(c.n):
            grown[i] = c.ids[i]
        if c.heap:
            PyMem_Free(c.ids)
        c.ids = grown
        c.cap = (c.cap + count) * 2
        c.heap = True
    # c.ids has room for c.n + count (grown above); src has count entries (the caller's list).
    for i in range(count):
        c.ids[c.n + i] = src[i]
    c.n += count
    return 0


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void _sort(Candidates* c) noexcept:
    """Route order: insertion sort for a handful of candidates, qsort beyond."""
    cdef Py_ssize_t k, j
    cdef int32_t tmp
    if c.n > 32:
        qsort(c.ids, c.n, sizeof(int32_t), _int32_cmp)
        return
    # 0 <= j < k < c.n throughout.
    for k in range(1, c.n):
        tmp = c.ids[k]
        j = k - 1
        while j >= 0 and c.ids[j] > tmp:
            c.ids[j + 1] = c.ids[j]
            j -= 1
        c.ids[j + 1] = tmp


@cython.final
@cython.no_gc  # holds a str and a dict of str -> int: no reference cycle through it
cdef class _HeaderIndex:
    """The header-indexed routes of one slot and header (routes_py.slots: by_header[name]):
    request value -> its routes, ascending."""
    cdef str name                  # lower-cased, ASCII (header names are validated tokens)
    cdef dict number               # header value -> k
    cdef int32_t* off              # k -> first route in ids; off[k + 1]: one past its last
    cdef int32_t* ids

    def __dealloc__(self):
        PyMem_Free(self.off)
        PyMem_Free(self.ids)


cdef _HeaderIndex _header_index(str name, dict by_value):
    cdef _HeaderIndex h = _HeaderIndex()
    cdef Py_ssize_t k = 0, n = 0
    h.name = name
    h.number = {}
    h.off = <int32_t*>zalloc(sizeof(int32_t) * (len(by_value) + 1))
    h.ids = <int32_t*>zalloc(sizeof(int32_t) * (sum(len(v) for v in by_value.values()) or 1))
    for value, routes in by_value.items():
        h.number[value] = k
        h.off[k] = <int32_t>n
        for ri in routes:
            h.ids[n] = ri
            n += 1
        k += 1
    h.off[k] = <int32_t>n
    return h


cdef extern from "Python.h":
    int PyDict_Next(object d, Py_ssize_t* pos, PyObject** key, PyObject** value)
    bint PyUnicode_IS_COMPACT_ASCII(object s)
    const char* PyUnicode_DATA(object s)
    Py_ssize_t PyUnicode_GET_LENGTH(object s)


cdef inline bint _same_name(object name, str lowered):
    """ascii_lower(name) == lowered (a request header name against an indexed one), without
    making the lower-cased string."""
    cdef Py_ssize_t n, i
    cdef const char* a
    cdef const char* b
    cdef char ch
    if name is lowered:
        return True
    if type(name) is not str:
        return ascii_lower(name) == lowered  # a str subclass (checked by empty_forwarded_proto)
    n = PyUnicode_GET_LENGTH(name)
    if n != PyUnicode_GET_LENGTH(lowered):
        return False
    if not (PyUnicode_IS_COMPACT_ASCII(name) and PyUnicode_IS_COMPACT_ASCII(lowered)):
        return ascii_lower(name) == lowered
    # Both compact ASCII strings of length n: n bytes each.
    a = PyUnicode_DATA(name)
    b = PyUnicode_DATA(lowered)
    for i in range(n):
        ch = a[i]
        if 65 <= ch <= 90:
            ch += 32
        if ch != b[i]:
            return False
    return True


@cython.boundscheck(False)
@cython.wraparound(False)
cdef int _push_value(Candidates* c, _HeaderIndex h, object value) except -1:
    cdef object k = h.number.get(value)
    cdef Py_ssize_t i
    if k is not None:
        i = <Py_ssize_t>k  # 0 <= i < len(number): off has len(number) + 1 entries
        _push(c, h.ids + h.off[i], h.off[i + 1] - h.off[i])
    return 0


cdef int _push_header_hits(Candidates* c, _HeaderIndex h, object headers) except -1:
    """The routes of ``h`` whose value the request carries in header ``h.name``: every value of
    it, as normalise_headers would collect them (``h.name`` is not coalesced, pseudo or host)."""
    cdef Py_ssize_t pos = 0
    cdef PyObject* key
    cdef PyObject* value
    if headers is None:
        return 0
    if type(headers) is dict:
        while PyDict_Next(headers, &pos, &key, &value):
            if _same_name(<object>key, h.name):
                _push_value(c, h, <object>value)
        return 0
    if type(headers) is list:
        for item in <list>headers:
            if type(item) is tuple and len(<tuple>item) == 2:
                if _same_name((<tuple>item)[0], h.name):
                    _push_value(c, h, (<tuple>item)[1])
            else:
                name, val = item
                if _same_name(name, h.name):
                    _push_value(c, h, val)
        return 0
    items = headers.items() if isinstance(headers, _AbcMapping) else headers
    for name, val in items:
        if _same_name(name, h.name):
            _push_value(c, h, val)
    return 0


@cython.boundscheck(False)
@cython.wraparound(False)
cdef int _visit(_Trie t, Py_ssize_t node, Py_ssize_t first, Py_ssize_t last, Candidates* c, RegexSeen* rx,
                tuple hidx, object headers) except -1:
    """Lists first .. last of ``node``: plain routes to the candidates, header indexes looked up,
    regex routes counted."""
    cdef const int32_t* off = t.off + node * N_LISTS  # node < n_nodes: off has n_nodes * N_LISTS + 1
    cdef Py_ssize_t j, g, a, b
    for j in range(first, last + 1):
        a = off[j]
        b = off[j + 1]
        if a == b:
            continue
        if j == L_PREFIX or j == L_EXACT:
            _push(c, t.ids + a, b - a)
        elif j == L_REGEX:
            if rx.count == 0 or t.ids[a] < rx.first:
                rx.first = t.ids[a]
            rx.count += b - a
        else:  # L_PGROUP / L_EGROUP: numbers of header indexes (< len(hidx), set in _build_vhost)
            for g in range(a, b):
                _push_header_hits(c, <_HeaderIndex>hidx[t.ids[g]], headers)
    return 0


@cython.boundscheck(False)
@cython.wraparound(False)
cdef int _walk(_Trie t, const unsigned char* p, Py_ssize_t n, bint lower, Candidates* c, RegexSeen* rx,
               tuple hidx, object headers) except -1:
    if t.empty:
        return 0
    cdef int32_t node = 0, child
    cdef Py_ssize_t i
    cdef uint8_t b
    # Nodes are < n_nodes (edge_child entries are node numbers).
    if t.off[0] != t.off[L_EXACT]:
        _visit(t, 0, L_PREFIX, L_REGEX, c, rx, hidx, headers)
    for i in range(n):  # p has n bytes
        b = p[i]
        if lower and 65 <= b <= 90:
            b += 32
        child = _child(t, node, b)
        if child < 0:
            return 0
        node = child
        if t.off[node * N_LISTS] != t.off[node * N_LISTS + L_EXACT]:
            _visit(t, node, L_PREFIX, L_REGEX, c, rx, hidx, headers)
    if t.off[node * N_LISTS + L_EXACT] != t.off[node * N_LISTS + N_LISTS]:
        _visit(t, node, L_EXACT, L_EGROUP, c, rx, hidx, headers)
    return 0


@cython.final
@cython.no_gc  # references specs, tables and cached RouteMatch objects, none of which refer back
cdef class _Vhost:
    cdef object spec
    cdef str name
    cdef bint require_tls          # spec.require_tls is not "NONE"
    cdef _Trie cs                  # case-sensitive prefixes / exact paths / regex literal prefixes
    cdef _Trie ci                  # ASCII-lower-cased (case_sensitive: false)
    cdef tuple hidx                # _HeaderIndex per header-indexed slot (numbers in the tries)
    cdef int32_t* regex_route      # per pattern of regex_set: its route (ascending)
    cdef Py_ssize_t n_regex
    cdef uint8_t* kind             # per route: 0 prefix/path, 1 separated, 2 regex
    cdef uint8_t* simple           # per route: decided by the path alone
    cdef uint8_t* by_index         # per route: decided by the path and its indexed header
    cdef int64_t* plen             # per route: UTF-8 byte length of the prefix (separated check)
    cdef uint8_t* is_static        # per route: the result does not depend on the request
    cdef list static               # per route: the shared RouteMatch, made on first use (list: on first use)
    cdef tuple no_header           # per route: _NoHeaderPlan (None for routes decided by the path)
    cdef tuple rx_match            # per route: its regex's binding-level Match (None: use fullmatch)
    cdef tuple routes
    cdef object regex_set          # routes_py.RegexSet of the regex routes (None: fewer than two)
    cdef tuple raw_set             # per chunk of regex_set.raw: (its binding-level Match, base), or None

    def __dealloc__(self):
        PyMem_Free(self.regex_route)
        PyMem_Free(self.kind)
        PyMem_Free(self.simple)
        PyMem_Free(self.by_index)
        PyMem_Free(self.plen)
        PyMem_Free(self.is_static)


#: header-less static matches a table keeps (RouteTable._plain; emptied when this many were
#: kept), and the longest path or authority kept (characters; longer ones are walked each time)
cdef Py_ssize_t _PLAIN_MEMO = 1024
cdef Py_ssize_t _PLAIN_PATH_MAX = 512


cdef inline bint _same_str(object a, object b):
    """``a == b`` for None or exact strs (the memo's keys and a request's fields)."""
    if a is b:
        return True
    if a is None or b is None:
        return False
    return (<str>a) == (<str>b)


cdef bint _is_static(object r):
    return (r.action in ("cluster", "direct") and not r.hash_policies and r.prefix_rewrite is None
            and r.regex_rewrite is None)


cdef _Vhost _build_vhost(object vh):
    cdef _Vhost v = _Vhost()
    cdef Py_ssize_t n = len(vh.routes), i
    v.spec = vh
    v.require_tls = vh.require_tls != "NONE"
    v.name = vh.name
    v.routes = tuple(vh.routes)
    v.kind = <uint8_t*>zalloc(n)
    v.simple = <uint8_t*>zalloc(n)
    v.by_index = <uint8_t*>zalloc(n)
    v.plen = <int64_t*>zalloc(sizeof(int64_t) * n)
    v.is_static = <uint8_t*>zalloc(n)
    rx_match = [None] * n
    entries = {"cs": [], "ci": []}
    groups = {}                    # (table, kind, key, header) -> value -> routes (routes_py.slots: by_header)
    for r in vh.routes:
        i = r.index
        v.plen[i] = len((<str>r.path_value).encode())
        v.simple[i] = not (r.headers or r.query or r.runtime_fraction is not None or r.grpc)  # decided_by_path
        v.by_index[i] = bool(r.headers) and _py.decided_by_index(r)
        v.is_static[i] = _is_static(r)
        table, kind, key = _py.slot_of(r)
        if r.path_kind == "regex":
            v.kind[i] = 2
            if _ANCHOR_BOTH is not None:
                rx_match[i] = getattr(getattr(r.regex, "_regexp", None), "Match", None)
            (<list>entries[table]).append(((<str>key).encode(), i, L_REGEX))
            continue
        v.kind[i] = 1 if r.path_kind == "separated" else 0
        h = _py.indexed_header(r) if r.headers else None
        if h is None:
            (<list>entries[table]).append(((<str>key).encode(), i, L_PREFIX if kind == "prefix" else L_EXACT))
        else:
            by_value = groups.get((table, kind, key, h.name))
            if by_value is None:
                by_value = groups[table, kind, key, h.name] = {}
            by_value.setdefault(h.string.value, []).append(i)
    # Containers kept by the table are tuples (untracked by the garbage collector once it has
    # seen them) and the cdef classes are no_gc: a 10k-route table then adds few objects for
    # every later full collection to walk, and triggers fewer of them (issue: build time).
    hidx = []
    for (table, kind, key, name), by_value in groups.items():
        (<list>entries[table]).append(((<str>key).encode(), len(hidx), L_PGROUP if kind == "prefix" else L_EGROUP))
        hidx.append(_header_index(name, by_value))
    v.hidx = tuple(hidx)
    v.rx_match = tuple(rx_match)
    v.no_header = tuple([None if v.simple[i] else _no_header_plan(vh.routes[i]) for i in range(n)])
    v.cs = _build_trie(entries["cs"])
    v.ci = _build_trie(entries["ci"])
    regexes = [r.index for r in vh.routes if r.path_kind == "regex"]
    v.regex_set = _py.regex_set([vh.routes[i].path_value for i in regexes])
    # The bound Match methods, made once: looking one up costs a pybind11 attribute lookup and
    # a new method object per request.
    raw = v.regex_set.raw if v.regex_set is not None else None
    v.raw_set = None if raw is None else tuple([(chunk.Match, base) for chunk, base in raw])
    v.n_regex = len(regexes)
    v.regex_route = <int32_t*>zalloc(sizeof(int32_t) * (v.n_regex or 1))
    for i in range(v.n_regex):
        v.regex_route[i] = regexes[i]
    return v


@cython.final
cdef class RouteTable:
    """Envoy-exact route matching for one RouteConfiguration (compiled twin).

    Its fields are declared in ``routes_c.pxd`` (the request path calls ``match_c`` directly).
    """

    def __init__(self, spec):
        if not isinstance(spec, RouteConfigSpec):
            raise TypeError("RouteTable(spec): use RouteTable.from_xds(route_configuration)")
        self.spec = spec
        self._vhosts = [_build_vhost(vh) for vh in spec.virtual_hosts]
        self._exact, self._suffix, self._prefix, default = _py.domain_maps(spec)
        self._default = -1 if default is None else default
        self._only_default = not self._exact and not self._suffix and not self._prefix
        self._vhost_header = spec.vhost_header
        self._ignore_port = spec.ignore_port_in_host_matching
        self._ignore_params = spec.ignore_path_parameters_in_path_matching
        self._rng = int.from_bytes(os.urandom(8), "little")
        draws = any(r.runtime_fraction is not None for vh in spec.virtual_hosts for r in vh.routes)
        self._plain = None if draws else {}

    @classmethod
    def from_xds(cls, route_configuration):
        """Build from an ``envoy.config.route.v3.RouteConfiguration`` (message or dict)."""
        return cls(_xds_hook.decoder("route_config")(route_configuration))

    @property
    def name(self):
        return self.spec.name

    def _kept_matches(self):
        """(Tests.) How many header-less static matches the table kept since its memo was last
        emptied; None: it keeps none (a route has a runtime fraction)."""
        return None if self._plain is None else self._plain_n

    cdef Py_ssize_t _find_vhost(self, object authority, object headers, object path, object method,
                                object scheme) except -2:
        cdef str host
        cdef Py_ssize_t n, length
        if self._only_default:
            return self._default
        if self._vhost_header:
            hdrs = normalise_headers(headers, authority, path, method, scheme)
            values = hdrs.get(self._vhost_header)
            if not values:
                return -1
            host = values[0]
        else:
            if authority is None:
                return -1
            host = authority
        if self._ignore_port:
            host = split_host_port(host)[0]
        if _has_upper(host):
            host = ascii_lower(host)
        hit = self._exact.get(host)
        if hit is not None:
            return hit
        n = len(host)
        for length, table in self._suffix:
            if length >= n:
                continue
            hit = (<dict>table).get(host[n - length:])
            if hit is not None:
                return hit
        for length, table in self._prefix:
            if length >= n:
                continue
            hit = (<dict>table).get(host[:length])
            if hit is not None:
                return hit
        return self._default

    def match(self, authority, path, headers=None, method="GET", scheme="http", random_value=None,
              source_ip=None):
        """The route Envoy would pick for this request, or ``None`` (Envoy: 404 NR)."""
        return self.match_c(authority, path, headers, method, scheme, random_value, source_ip)

    cdef object match_c(self, object authority, object path, object headers, object method, object scheme,
                        object random_value, object source_ip):
        """:meth:`match` for compiled callers (no argument parsing)."""
        cdef Py_ssize_t size, match_len, vi, k, j
        cdef const char* buf
        cdef const char* hit
        cdef Candidates cand
        cdef Candidates rx_hits
        cdef RegexSeen rx
        cdef _Vhost v
        cdef int32_t ri, best
        cdef int decided
        cdef bint regex_phase
        cdef uint64_t rv
        cdef list keep = None          # bytes standing for a path with lone surrogates
        cdef bint memo = False         # a static match found here is kept in _plain
        if (type(path) is not str or type(method) is not str or type(scheme) is not str
                or (authority is not None and type(authority) is not str)
                or (source_ip is not None and type(source_ip) is not str)):
            check_request_args(authority, path, method, scheme, source_ip)  # TypeError unless str subclasses
        elif (headers is None and source_ip is None and random_value is None and self._plain is not None
                and len(<str>path) <= _PLAIN_PATH_MAX and (authority is None or len(<str>authority) <= _PLAIN_PATH_MAX)):
            # A request without headers is matched on (authority, path, method, scheme) alone, and
            # without runtime fractions only weighted clusters read the random draw, which are
            # never static (so never kept); skipping a draw shifts the table's own stream, seeded
            # from urandom and never shown. Exact strs only: their hash and compare run no code
            # of the caller's. Kept by authority, then path: one table serves many authorities
            # (a sidecar's per-port route configuration), often on the same paths.
            memo = True
            paths = (<dict>self._plain).get(authority)
            if paths is not None:
                kept = (<dict>paths).get(path)
                if kept is not None:
                    seen = <tuple>kept
                    if _same_str(seen[0], method) and _same_str(seen[1], scheme):
                        return seen[2]
        buf = _as_utf8(path, &size)
        if buf == NULL:
            keep = []
            buf = _utf8_fallback(path, &size, keep)
        if headers is not None and type(headers) is not dict and type(headers) is not list:
            if type(headers) is tuple:
                headers = list(<tuple>headers)  # the same pairs, walked in C as lists are (~0.7 us less)
            else:
                headers = request_headers(headers)  # iterators become lists (read more than once)
        full_path = path
        hit = <const char*>memchr(buf, 35, size)  # '#': Envoy strips the fragment
        if hit != NULL:
            size = hit - buf
            full_path = path.split("#", 1)[0]
        if headers and _empty_forwarded_proto(headers):
            return None
        vi = self._find_vhost(authority, headers, full_path, method, scheme)
        if vi < 0:
            return None
        v = <_Vhost>self._vhosts[vi]
        if v.require_tls:
            forced = tls_redirect(v.spec, normalise_headers(headers, authority, full_path, method, scheme),
                                  authority or "", full_path)
            if forced is not None:
                return forced
        hit = <const char*>memchr(buf, 63, size)  # '?'
        match_len = (hit - buf) if hit != NULL else size
        if self._ignore_params and memchr(buf, 59, match_len) != NULL:  # ';' in the path
            # Walk the path with every segment's ;params removed (a new string, only here).
            stripped = _py_match_path(full_path, True)
            buf = _as_utf8(stripped, &match_len)
            if buf == NULL:
                if keep is None:
                    keep = []
                buf = _utf8_fallback(stripped, &match_len, keep)
        _init(&cand)
        _init(&rx_hits)
        rx.count = 0
        rx.first = -1
        try:
            _walk(v.cs, <const unsigned char*>buf, match_len, False, &cand, &rx, v.hidx, headers)
            _walk(v.ci, <const unsigned char*>buf, match_len, True, &cand, &rx, v.hidx, headers)
            _sort(&cand)
            match_path = None
            hdrs = None
            query_cache = None  # made on first use: parse_query(path), once per request
            if random_value is None:
                rv = splitmix_next(&self._rng)
            else:
                rv = random_value & 0xFFFFFFFFFFFFFFFF
            # Two passes, first match wins. 1: the non-regex candidates in route order, up to
            # the first that matches (best). 2: only if a regex route comes before best, the
            # regex routes before it that match (one RE2 set pass over the path), in order.
            best = -1
            regex_phase = False
            k = 0
            while True:
                if not regex_phase:
                    if k == cand.n:
                        regex_phase = True
                        if not _regexes_before(v, -1, &rx, &rx_hits, buf, match_len):
                            break
                        k = 0
                        continue
                    ri = cand.ids[k]  # k < cand.n
                    k += 1
                    if k > 1 and ri == cand.ids[k - 2]:
                        continue
                    if v.kind[ri] == 1:
                        # path_separated_prefix: the prefix must end the path or precede '/'.
                        if not (v.plen[ri] == match_len or (v.plen[ri] < match_len and buf[v.plen[ri]] == 47)):
                            continue
                else:
                    if k == rx_hits.n:
                        break
                    ri = rx_hits.ids[k]  # k < rx_hits.n; ascending
                    k += 1
                    if best >= 0 and ri >= best:
                        break
                if not (v.simple[ri] or v.by_index[ri]):
                    if not headers:  # no request headers: decide from the pseudo-headers alone
                        decided = _conditions_without_headers(<_NoHeaderPlan>v.no_header[ri], authority,
                                                              full_path, method, scheme, rv)
                    else:
                        if hdrs is None:
                            hdrs = normalise_headers(headers, authority, full_path, method, scheme)
                        decided = _conditions_with_headers(<_NoHeaderPlan>v.no_header[ri], hdrs, rv)
                    if decided == 0:
                        continue
                    if decided == 2:
                        if hdrs is None:
                            hdrs = normalise_headers(headers, authority, full_path, method, scheme)
                        if query_cache is None:
                            query_cache = []
                        if not _py._conditions_match(v.routes[ri], full_path, hdrs, rv, query_cache):
                            continue
                if regex_phase:
                    best = ri
                    break
                best = ri
                regex_phase = True
                if not _regexes_before(v, best, &rx, &rx_hits, buf, match_len):
                    break
                k = 0
            if best < 0:
                return None
            ri = best
            if v.is_static[ri]:
                if v.static is None:
                    v.static = [None] * len(v.routes)
                result = v.static[ri]
                if result is None:
                    r = v.routes[ri]
                    result = RouteMatch(
                        v.name, r.name, r.cluster if r.action == "cluster" else None,
                        (r.direct_response.status, r.direct_response.body) if r.direct_response else None,
                        None, r.timeout, r.retry_policy, None, None, r.host_rewrite_literal or None,
                        r.cluster_not_found_response_code, None, r)
                    v.static[ri] = result
                if memo:
                    if self._plain_n >= _PLAIN_MEMO:  # (any number of distinct requests: kept bounded)
                        self._plain = {}
                        self._plain_n = 0
                    paths = (<dict>self._plain).get(authority)
                    if paths is None:
                        paths = self._plain[authority] = {}
                    (<dict>paths)[path] = (method, scheme, result)
                    self._plain_n += 1
                return result
            if match_path is None:
                match_path = _py_match_path(full_path, self._ignore_params)
            if hdrs is None:
                hdrs = normalise_headers(headers, authority, full_path, method, scheme)
            return _py._result(self.spec, v.spec, v.routes[ri], full_path, hdrs, authority, scheme, rv,
                               source_ip, match_path, _xxh64)
        finally:
            if cand.heap:
                PyMem_Free(cand.ids)
            if rx_hits.heap:
                PyMem_Free(rx_hits.ids)

@cython.boundscheck(False)
@cython.wraparound(False)
cdef bint _regexes_before(_Vhost v, int32_t best, RegexSeen* rx, Candidates* out, const char* buf,
                          Py_ssize_t match_len) except -1:
    """The regex candidates before route ``best`` (-1: all) whose regex fully matches the path
    (``buf``: its match_len bytes, as matched), into ``out`` in route order. False when no
    regex candidate comes before ``best`` (nothing to do). Several: one pass of the virtual
    host's RE2 set (a regex matches only paths with its literal prefix, so every route it
    reports is a candidate); one: that regex alone."""
    cdef Py_ssize_t i, base
    cdef int32_t ri
    if rx.count == 0 or (best >= 0 and rx.first >= best):
        return False
    text = PyBytes_FromStringAndSize(buf, match_len)
    if rx.count == 1:
        ri = rx.first  # the only regex candidate
        if _regex_matches(v, ri, text):
            _push(out, &ri, 1)
        return True
    if v.regex_set is None:
        # No RE2 set (a pattern RE2 could not put in one): each regex route before best.
        for i in range(v.n_regex):
            ri = v.regex_route[i]  # i < n_regex
            if best >= 0 and ri >= best:
                break
            if _regex_matches(v, ri, text):
                _push(out, &ri, 1)
        return True
    if v.raw_set is not None:
        for set_match, base in v.raw_set:
            for i in set_match(text) or ():
                # base + i < n_regex (a pattern of this chunk)
                _push(out, v.regex_route + base + <Py_ssize_t>i, 1)
    else:
        for i in v.regex_set.Match(text.decode("utf-8", "surrogatepass")):
            _push(out, v.regex_route + i, 1)
    _sort(out)
    return True


cdef bint _regex_matches(_Vhost v, int32_t ri, bytes text) except -1:
    """Route ``ri``'s regex fully matches ``text`` (the match path's bytes)."""
    fullmatch = v.rx_match[ri]
    if fullmatch is not None:
        return (<tuple>(<list>fullmatch(_ANCHOR_BOTH, text, 0, len(text)))[0])[0] >= 0
    return (<object>v.routes[ri]).regex.fullmatch(text) is not None



@cython.final
@cython.no_gc  # a str and a StringMatchSpec: no reference cycle through it
cdef class _HeaderTest:
    """A header matcher prepared for requests without headers (only pseudo-headers)."""
    cdef int source          # 0 absent, 1 :authority/host, 2 :path, 3 :method, 4 :scheme/x-forwarded-proto
    cdef int kind            # 0 present, 1 exact_any (legacy exact ""), 2 string matcher
    cdef bint present
    cdef bint invert
    cdef bint missing_as_empty
    cdef object string       # StringMatchSpec (kind 2)
    cdef str name            # the header name (lower-cased; pseudo-headers with ':')


_SOURCES = {":authority": 1, "host": 1, ":path": 2, ":method": 3, ":scheme": 4, "x-forwarded-proto": 4}


@cython.final
@cython.no_gc  # a tuple of _HeaderTest: no reference cycle through it
cdef class _NoHeaderPlan:
    """Per route, built once: how to decide its runtime, gRPC and header conditions when the
    request carries no headers. ``undecided``: query or range matchers (shared helpers)."""
    cdef bint undecided
    cdef uint64_t rt_num
    cdef uint64_t rt_den     # 0: no runtime_fraction
    cdef bint grpc
    cdef tuple tests         # _HeaderTest per header matcher, in order


cdef _NoHeaderPlan _no_header_plan(object r):
    cdef _NoHeaderPlan plan = _NoHeaderPlan()
    cdef _HeaderTest t
    plan.undecided = bool(r.query) or any(h.kind == "range" for h in r.headers)
    if r.runtime_fraction is not None:
        plan.rt_num, plan.rt_den = r.runtime_fraction
    plan.grpc = r.grpc
    tests = []
    for h in r.headers:
        t = _HeaderTest()
        t.source = _SOURCES.get(h.name, 0)
        t.kind = {"present": 0, "exact_any": 1}.get(h.kind, 2)
        t.present = h.present
        t.invert = h.invert
        t.missing_as_empty = h.treat_missing_as_empty
        t.string = h.string
        t.name = h.name
        tests.append(t)
    plan.tests = tuple(tests)
    return plan


cdef int _test_passes(_HeaderTest t, object values) except -1:
    """One header matcher (``routes_py._header_matches``) against a header's values: a list, or
    one str; ``None`` or an empty list: the header is missing."""
    cdef bint matched
    if values is None or (type(values) is list and not values):
        if not t.missing_as_empty:
            if t.kind == 0:
                return t.present if t.invert else not t.present
            return 0
        values = ""
    if t.kind == 0:
        matched = t.present
    elif t.kind == 1:
        matched = True
    elif type(values) is str:
        matched = t.string.matches(values)
    else:
        matched = False
        for value in values:
            if t.string.matches(value):
                matched = True
                break
    return matched != t.invert


cdef int _conditions_without_headers(_NoHeaderPlan plan, object authority, object full_path, object method,
                                     object scheme, uint64_t rv) except -1:
    """Runtime fraction, gRPC and header matchers of a request that carries no headers beyond
    the pseudo-headers: 1 matches, 0 does not, 2 undecided here (use the shared helpers)."""
    cdef _HeaderTest t
    if plan.undecided:
        return 2
    if plan.rt_den and not (rv % plan.rt_den) < plan.rt_num:
        return 0
    if plan.grpc:
        return 0  # no content-type header: not a gRPC request
    for t in plan.tests:
        if t.source == 1:
            value = authority
        elif t.source == 2:
            value = full_path
        elif t.source == 3:
            value = method
        elif t.source == 4:
            value = scheme
        else:
            value = None
        if not _test_passes(t, value):
            return 0
    return 1


cdef frozenset _INLINE_HEADERS = INLINE_HEADERS


cdef inline str _lower(object name):
    if type(name) is str and (<str>name).isascii():
        return (<str>name).lower()
    return ascii_lower(name)


cpdef dict normalise_headers(object headers, object authority, object path, object method, object scheme):
    """``_routing.normalise_headers`` (same result), with dicts and lists of pairs walked in C."""
    cdef dict out = {}
    cdef str key
    cdef list values
    if headers is not None:
        if type(headers) is dict:
            items = (<dict>headers).items()
        elif isinstance(headers, _AbcMapping):
            items = headers.items()
        else:
            items = headers
        for name, value in items:
            key = _lower(name)
            if key == "host" or key[:1] == ":":
                continue  # HTTP/1 Host is :authority; pseudo-headers come from the arguments
            values = out.get(key)
            if values is None:
                out[key] = [value]
            elif key in _INLINE_HEADERS:
                values[0] = values[0] + "," + value
            else:
                values.append(value)
    if authority is not None:
        out[":authority"] = [authority]
        out["host"] = out[":authority"]  # Envoy: a "host" matcher reads :authority as sent
    out[":path"] = [path]
    out[":method"] = [method]
    xfp = out.get("x-forwarded-proto")
    effective = scheme
    if xfp:
        lowered = ascii_lower((<list>xfp)[0])
        if lowered == "http" or lowered == "https":
            effective = lowered
    out[":scheme"] = [effective]
    if xfp is None:
        out["x-forwarded-proto"] = [scheme]
    return out


cdef int _conditions_with_headers(_NoHeaderPlan plan, dict hdrs, uint64_t rv) except -1:
    """``routes_py._route_matches`` without the path (the caller's trie walk matched it) for a
    request with headers (``hdrs``: normalise_headers): 1 matches, 0 does not, 2 undecided here
    (query or range matchers: use the shared helpers)."""
    cdef _HeaderTest t
    if plan.undecided:
        return 2
    if plan.rt_den and not (rv % plan.rt_den) < plan.rt_num:
        return 0
    if plan.grpc and not is_grpc(hdrs):
        return 0
    for t in plan.tests:
        if not _test_passes(t, hdrs.get(t.name)):
            return 0
    return 1


cdef bint _empty_forwarded_proto(object headers) except -1:
    """``_routing.empty_forwarded_proto`` (same result, same TypeErrors) with dicts and lists of
    str pairs walked in C; anything else goes to it."""
    cdef Py_ssize_t pos = 0
    cdef PyObject* key
    cdef PyObject* value
    cdef bint found = False, empty = False
    if type(headers) is dict:
        while PyDict_Next(headers, &pos, &key, &value):
            if type(<object>key) is not str or type(<object>value) is not str:
                return empty_forwarded_proto(headers)  # checks (TypeError) or str subclasses
            if not found and PyUnicode_GET_LENGTH(<object>key) == 17 and _same_name(<object>key, "x-forwarded-proto"):
                found = True
                empty = PyUnicode_GET_LENGTH(<object>value) == 0
        return empty
    if type(headers) is not list:
        return empty_forwarded_proto(headers)
    for item in <list>headers:
        if type(item) is not tuple or len(<tuple>item) != 2:
            return empty_forwarded_proto(headers)
        name = (<tuple>item)[0]
        val = (<tuple>item)[1]
        if type(name) is not str or type(val) is not str:
            return empty_forwarded_proto(headers)
        if not found and PyUnicode_GET_LENGTH(name) == 17 and _same_name(name, "x-forwarded-proto"):
            found = True
            empty = PyUnicode_GET_LENGTH(val) == 0  # the first one decides
    return empty


cdef object _py_match_path(str full_path, bint ignore_params):
    q = full_path.find("?")
    p = full_path if q < 0 else full_path[:q]
    if ignore_params:
        p = strip_path_params(p)
    return p


cdef const char* _utf8_fallback(object s, Py_ssize_t* size, list keep) except NULL:
    """Called with the error of ``_as_utf8(s)`` pending, ``s`` a str: it has lone surrogates, so
    its ``_routing.match_bytes`` stand for it (kept alive in ``keep``) and the tries compare
    code points exactly as the pure twin does."""
    PyErr_Clear()
    cdef bytes b = match_bytes(s)
    keep.append(b)
    size[0] = len(b)
    return <const char*>b


cdef bint _has_upper(str s):
    cdef Py_UCS4 ch
    for ch in s:
        if 65 <= ch <= 90:
            return True
    return False
