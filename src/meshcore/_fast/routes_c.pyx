# cython: language_level=3, embedsignature=True
"""RouteTable, compiled twin of ``routes_py`` (same decisions, same results).

Per virtual host, exact-path and prefix routes live in byte tries (one case-sensitive, one
over ASCII-lower-cased bytes for ``case_sensitive: false``); a request walks the path once,
collecting candidate route indices, and only candidates are evaluated, in route order, so
first-match-wins is exactly Envoy's linear scan. Routes whose match is decided by the path
alone, and whose result does not depend on the request, are answered from C with a shared,
pre-built result: no allocation. Everything else (header, query, runtime and gRPC matchers,
regexes, weighted clusters, hashes, rewrites) uses the shared helpers of ``routes_py``.
"""

from cpython.mem cimport PyMem_Free, PyMem_Malloc
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
from . import routes_py as _py
from .lb_c import xxh64 as _xxh64  # request hashes with the compiled XXH64

__all__ = ["RouteTable"]

cdef extern from "Python.h":
    # Declared without an exception value: NULL (lone surrogates, or not a str) is handled by
    # _utf8 below, which clears the error and falls back, so the common path has no try block.
    const char* _as_utf8 "PyUnicode_AsUTF8AndSize"(object s, Py_ssize_t* size)

cdef enum:
    DEF_CANDIDATES = 64  # candidates kept on the stack; more spill to the heap




@cython.final
cdef class _Trie:
    """Byte trie flattened into arrays. Node 0 is the root. Edges of a node are contiguous
    and sorted by label; each node lists the routes whose prefix / exact path ends there."""
    cdef Py_ssize_t n_nodes
    cdef int32_t* edge_start       # per node: first edge
    cdef int32_t* edge_count       # per node: number of edges
    cdef uint8_t* edge_label       # per edge
    cdef int32_t* edge_child       # per edge: child node
    cdef int32_t* prefix_off       # per node: offset in ids of routes with this prefix
    cdef int32_t* prefix_cnt
    cdef int32_t* exact_off        # per node: routes with this exact path
    cdef int32_t* exact_cnt
    cdef int32_t* ids              # route indices, ascending within each list
    cdef bint empty

    def __dealloc__(self):
        PyMem_Free(self.edge_start)
        PyMem_Free(self.edge_count)
        PyMem_Free(self.edge_label)
        PyMem_Free(self.edge_child)
        PyMem_Free(self.prefix_off)
        PyMem_Free(self.prefix_cnt)
        PyMem_Free(self.exact_off)
        PyMem_Free(self.exact_cnt)
        PyMem_Free(self.ids)




cdef int _int32_cmp(const void* a, const void* b) noexcept nogil:
    cdef int32_t x = (<int32_t*>a)[0], y = (<int32_t*>b)[0]
    return -1 if x < y else (1 if x > y else 0)




ctypedef struct TrieKey:
    const unsigned char* key
    Py_ssize_t length
    int32_t route
    int32_t exact


cdef int _key_cmp(const void* a, const void* b) noexcept nogil:
    cdef TrieKey* x = <TrieKey*>a
    cdef TrieKey* y = <TrieKey*>b
    cdef int r = bytes_cmp(<const char*>x.key, x.length, <const char*>y.key, y.length)
    return r if r != 0 else x.route - y.route


@cython.boundscheck(False)
@cython.wraparound(False)
cdef _Trie _build_trie(list prefixes, list exacts):
    """prefixes / exacts: (key bytes, route index). Built from the sorted keys in one pass:
    each key shares its longest common prefix with the previous one, so new nodes are always
    the last child of their parent and children come out in label order."""
    cdef _Trie t = _Trie()
    cdef Py_ssize_t n_keys = len(prefixes) + len(exacts), total = 0, i, d, lcp, n_nodes = 1
    cdef Py_ssize_t e, k, node, child, q_head, q_tail
    t.empty = n_keys == 0
    entries = prefixes + exacts
    cdef TrieKey* keys = <TrieKey*>zalloc(sizeof(TrieKey) * (n_keys or 1))
    for i in range(n_keys):
        key, ri = entries[i]
        keys[i].key = <const unsigned char*><const char*>key
        keys[i].length = len(key)
        keys[i].route = ri
        keys[i].exact = i >= len(prefixes)
        total += len(key)
    qsort(keys, n_keys, sizeof(TrieKey), _key_cmp)
    # Linked form: first/last child and next sibling per node; routes as per-node lists.
    cdef Py_ssize_t cap = total + 1
    cdef int32_t* first_child = <int32_t*>zalloc(sizeof(int32_t) * cap)
    cdef int32_t* last_child = <int32_t*>zalloc(sizeof(int32_t) * cap)
    cdef int32_t* next_sibling = <int32_t*>zalloc(sizeof(int32_t) * cap)
    cdef uint8_t* label = <uint8_t*>zalloc(cap)
    cdef int32_t* stack = <int32_t*>zalloc(sizeof(int32_t) * cap)
    cdef int32_t* order = <int32_t*>zalloc(sizeof(int32_t) * cap)
    cdef int32_t* key_node = <int32_t*>zalloc(sizeof(int32_t) * (n_keys or 1))
    cdef int32_t* new_id = <int32_t*>zalloc(sizeof(int32_t) * cap)
    try:
        first_child[0] = -1
        last_child[0] = -1
        next_sibling[0] = -1
        stack[0] = 0
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
        t.prefix_off = <int32_t*>zalloc(sizeof(int32_t) * n_nodes)
        t.prefix_cnt = <int32_t*>zalloc(sizeof(int32_t) * n_nodes)
        t.exact_off = <int32_t*>zalloc(sizeof(int32_t) * n_nodes)
        t.exact_cnt = <int32_t*>zalloc(sizeof(int32_t) * n_nodes)
        t.ids = <int32_t*>zalloc(sizeof(int32_t) * (n_keys or 1))
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
            t.prefix_cnt[q_head] = 0
            t.exact_cnt[q_head] = 0
            q_head += 1
        # Route lists: keys are sorted by (bytes, route), so per node and kind they come out
        # ascending. Count, then place.
        for i in range(n_keys):
            node = new_id[key_node[i]]
            if keys[i].exact:
                t.exact_cnt[node] += 1
            else:
                t.prefix_cnt[node] += 1
        k = 0
        for node in range(n_nodes):
            t.prefix_off[node] = <int32_t>k
            k += t.prefix_cnt[node]
            t.exact_off[node] = <int32_t>k
            k += t.exact_cnt[node]
            t.prefix_cnt[node] = 0
            t.exact_cnt[node] = 0
        for i in range(n_keys):
            node = new_id[key_node[i]]
            if keys[i].exact:
                t.ids[t.exact_off[node] + t.exact_cnt[node]] = keys[i].route
                t.exact_cnt[node] += 1
            else:
                t.ids[t.prefix_off[node] + t.prefix_cnt[node]] = keys[i].route
                t.prefix_cnt[node] += 1
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


cdef int _push(Candidates* c, int32_t* src, Py_ssize_t count) except -1:
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
    for i in range(count):
        c.ids[c.n + i] = src[i]
    c.n += count
    return 0


@cython.boundscheck(False)
@cython.wraparound(False)
cdef int _walk(_Trie t, const unsigned char* p, Py_ssize_t n, bint lower, Candidates* c) except -1:
    if t.empty:
        return 0
    cdef int32_t node = 0, child
    cdef Py_ssize_t i
    cdef uint8_t b
    if t.prefix_cnt[0]:
        _push(c, t.ids + t.prefix_off[0], t.prefix_cnt[0])
    for i in range(n):
        b = p[i]
        if lower and 65 <= b <= 90:
            b += 32
        child = _child(t, node, b)
        if child < 0:
            return 0
        node = child
        if t.prefix_cnt[node]:
            _push(c, t.ids + t.prefix_off[node], t.prefix_cnt[node])
    if t.exact_cnt[node]:
        _push(c, t.ids + t.exact_off[node], t.exact_cnt[node])
    return 0


@cython.final
cdef class _Vhost:
    cdef object spec
    cdef str name
    cdef bint require_tls          # spec.require_tls is not "NONE"
    cdef _Trie cs                  # case-sensitive prefixes / exact paths
    cdef _Trie ci                  # ASCII-lower-cased (case_sensitive: false)
    cdef int32_t* always           # regex routes (every request is a candidate)
    cdef Py_ssize_t n_always
    cdef uint8_t* kind             # per route: 0 prefix/path, 1 separated, 2 regex
    cdef uint8_t* simple           # per route: decided by the path alone
    cdef int64_t* plen             # per route: UTF-8 byte length of the prefix (separated check)
    cdef uint8_t* is_static        # per route: the result does not depend on the request
    cdef list static               # per route: the shared RouteMatch, made on first use
    cdef list no_header            # per route: _NoHeaderPlan (None for routes decided by the path)
    cdef tuple routes
    cdef object regex_set          # RE2 set of the regex routes (None: check them one by one)
    cdef int32_t* group_of         # per route: index in `groups` (a header dispatch run) or -1
    cdef list groups               # routes_py.HeaderGroup per run

    def __dealloc__(self):
        PyMem_Free(self.always)
        PyMem_Free(self.kind)
        PyMem_Free(self.simple)
        PyMem_Free(self.plen)
        PyMem_Free(self.is_static)
        PyMem_Free(self.group_of)


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
    v.plen = <int64_t*>zalloc(sizeof(int64_t) * n)
    v.is_static = <uint8_t*>zalloc(n)
    cs_prefix, cs_exact, ci_prefix, ci_exact, always = [], [], [], [], []
    group_of, v.groups = _py.header_groups(vh.routes)
    v.group_of = <int32_t*>zalloc(sizeof(int32_t) * (n or 1))
    for i in range(n):
        v.group_of[i] = group_of[i]
    for r in vh.routes:
        i = r.index
        key = (<str>r.path_value).encode()
        v.plen[i] = len(key)
        v.simple[i] = not (r.headers or r.query or r.runtime_fraction is not None or r.grpc)
        v.is_static[i] = _is_static(r)
        if group_of[i] >= 0 and (<object>v.groups[group_of[i]]).start != i:
            v.kind[i] = 0  # a header dispatch run is entered through its first route only
            continue
        if r.path_kind == "regex":
            v.kind[i] = 2
            always.append(i)
        else:
            v.kind[i] = 1 if r.path_kind == "separated" else 0
            exact = r.path_kind == "path"
            if r.case_sensitive or (r.path_kind == "prefix" and r.path_value in ("", "/")):
                (cs_exact if exact else cs_prefix).append((key, i))
            else:
                lowered = ascii_lower(r.path_value).encode()
                (ci_exact if exact else ci_prefix).append((lowered, i))
    v.static = [None] * n
    v.no_header = [None if v.simple[i] else _no_header_plan(vh.routes[i]) for i in range(n)]
    v.cs = _build_trie(cs_prefix, cs_exact)
    v.ci = _build_trie(ci_prefix, ci_exact)
    v.regex_set = _py.regex_set([vh.routes[i].path_value for i in always])
    v.n_always = len(always)
    v.always = <int32_t*>zalloc(sizeof(int32_t) * (v.n_always or 1))
    for i in range(v.n_always):
        v.always[i] = always[i]
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

    @classmethod
    def from_xds(cls, route_configuration):
        """Build from an ``envoy.config.route.v3.RouteConfiguration`` (message or dict)."""
        from ..xds.route_config import route_config_spec

        return cls(route_config_spec(route_configuration))

    @property
    def name(self):
        return self.spec.name

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
        cdef _Vhost v
        cdef int32_t ri, tmp
        cdef int decided
        cdef Py_ssize_t skip_below
        cdef uint64_t rv
        cdef list keep = None          # bytes standing for a path with lone surrogates
        if (type(path) is not str or type(method) is not str or type(scheme) is not str
                or (authority is not None and type(authority) is not str)
                or (source_ip is not None and type(source_ip) is not str)):
            check_request_args(authority, path, method, scheme, source_ip)  # TypeError unless str subclasses
        buf = _as_utf8(path, &size)
        if buf == NULL:
            keep = []
            buf = _utf8_fallback(path, &size, keep)
        if headers is not None and type(headers) is not dict:
            headers = request_headers(headers)  # iterators become lists (read more than once)
        full_path = path
        hit = <const char*>memchr(buf, 35, size)  # '#': Envoy strips the fragment
        if hit != NULL:
            size = hit - buf
            full_path = path.split("#", 1)[0]
        if headers and empty_forwarded_proto(headers):
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
        cand.ids = cand.stack
        cand.n = 0
        cand.cap = DEF_CANDIDATES
        cand.heap = False
        try:
            _walk(v.cs, <const unsigned char*>buf, match_len, False, &cand)
            _walk(v.ci, <const unsigned char*>buf, match_len, True, &cand)
            match_path = None
            if v.regex_set is not None:
                match_path = _py_match_path(full_path, self._ignore_params)
                matched = v.regex_set.Match(match_path)
                if matched:
                    for k in matched:
                        _push(&cand, v.always + <Py_ssize_t>k, 1)
            elif v.n_always:
                _push(&cand, v.always, v.n_always)
            # Route order: insertion sort for a handful of candidates, qsort beyond.
            if cand.n > 32:
                qsort(cand.ids, cand.n, sizeof(int32_t), _int32_cmp)
            else:
                for k in range(1, cand.n):
                    tmp = cand.ids[k]
                    j = k - 1
                    while j >= 0 and cand.ids[j] > tmp:
                        cand.ids[j + 1] = cand.ids[j]
                        j -= 1
                    cand.ids[j + 1] = tmp
            hdrs = None
            query_cache = None  # made on first use: parse_query(path), once per request
            if random_value is None:
                rv = splitmix_next(&self._rng)
            else:
                rv = random_value & 0xFFFFFFFFFFFFFFFF
            skip_below = -1
            for k in range(cand.n):
                ri = cand.ids[k]
                if (k and ri == cand.ids[k - 1]) or ri < skip_below:
                    continue
                if v.kind[ri] == 1:
                    # path_separated_prefix: the prefix must end the path or precede '/'.
                    if not (v.plen[ri] == match_len or (v.plen[ri] < match_len and buf[v.plen[ri]] == 47)):
                        continue
                if v.group_of[ri] >= 0:
                    # A header dispatch run: all its routes share this path matcher, so ri is
                    # the run's first route and the run decides at once.
                    group = v.groups[v.group_of[ri]]
                    if hdrs is None:
                        hdrs = normalise_headers(headers, authority, full_path, method, scheme)
                    winner = group.decide(hdrs)
                    if winner is None:
                        skip_below = group.end
                        continue
                    ri = winner
                    if match_path is None:
                        match_path = _py_match_path(full_path, self._ignore_params)
                    return _py._result(self.spec, v.spec, v.routes[ri], full_path, hdrs, authority, scheme, rv,
                                       source_ip, match_path, _xxh64)
                if v.kind[ri] == 2 and v.regex_set is None:
                    if match_path is None:
                        match_path = _py_match_path(full_path, self._ignore_params)
                    if keep is None:
                        if v.routes[ri].regex.fullmatch(match_path) is None:
                            continue
                    elif not regex_fullmatch(v.routes[ri].regex, match_path):  # lone surrogates
                        continue
                if not v.simple[ri]:
                    if not headers:  # no request headers: decide from the pseudo-headers alone
                        decided = _conditions_without_headers(<_NoHeaderPlan>v.no_header[ri], authority,
                                                              full_path, method,
                                                              scheme, rv)
                    else:
                        if hdrs is None:
                            hdrs = normalise_headers(headers, authority, full_path, method, scheme)
                        decided = _conditions_with_headers(<_NoHeaderPlan>v.no_header[ri], hdrs, rv)
                    if decided == 0:
                        continue
                    if decided == 2:
                        if match_path is None:
                            match_path = _py_match_path(full_path, self._ignore_params)
                        if hdrs is None:
                            hdrs = normalise_headers(headers, authority, full_path, method, scheme)
                        if query_cache is None:
                            query_cache = []
                        if not _py._route_matches(v.routes[ri], match_path, full_path, hdrs, rv, query_cache):
                            continue
                if v.is_static[ri]:
                    result = v.static[ri]
                    if result is None:
                        r = v.routes[ri]
                        result = RouteMatch(
                            v.name, r.name, r.cluster if r.action == "cluster" else None,
                            (r.direct_response.status, r.direct_response.body) if r.direct_response else None,
                            None, r.timeout, r.retry_policy, None, None, r.host_rewrite_literal or None,
                            r.cluster_not_found_response_code, None, r)
                        v.static[ri] = result
                    return result
                if match_path is None:
                    match_path = _py_match_path(full_path, self._ignore_params)
                if hdrs is None:
                    hdrs = normalise_headers(headers, authority, full_path, method, scheme)
                return _py._result(self.spec, v.spec, v.routes[ri], full_path, hdrs, authority, scheme, rv,
                                   source_ip, match_path, _xxh64)
            return None
        finally:
            if cand.heap:
                PyMem_Free(cand.ids)


@cython.final
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
cdef class _NoHeaderPlan:
    """Per route, built once: how to decide its runtime, gRPC and header conditions when the
    request carries no headers. ``undecided``: query or range matchers (shared helpers)."""
    cdef bint undecided
    cdef uint64_t rt_num
    cdef uint64_t rt_den     # 0: no runtime_fraction
    cdef bint grpc
    cdef list tests          # _HeaderTest per header matcher, in order


cdef _NoHeaderPlan _no_header_plan(object r):
    cdef _NoHeaderPlan plan = _NoHeaderPlan()
    cdef _HeaderTest t
    plan.undecided = bool(r.query) or any(h.kind == "range" for h in r.headers)
    if r.runtime_fraction is not None:
        plan.rt_num, plan.rt_den = r.runtime_fraction
    plan.grpc = r.grpc
    plan.tests = []
    for h in r.headers:
        t = _HeaderTest()
        t.source = _SOURCES.get(h.name, 0)
        t.kind = {"present": 0, "exact_any": 1}.get(h.kind, 2)
        t.present = h.present
        t.invert = h.invert
        t.missing_as_empty = h.treat_missing_as_empty
        t.string = h.string
        t.name = h.name
        plan.tests.append(t)
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
