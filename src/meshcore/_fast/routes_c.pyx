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
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libc.string cimport memchr
cimport cython

import os

from .._route_model import RouteConfigSpec
from .._routing import RouteMatch, ascii_lower, normalise_headers, split_host_port
from . import routes_py as _py

__all__ = ["RouteTable"]

cdef enum:
    DEF_CANDIDATES = 64  # candidates kept on the stack; more spill to the heap


cdef inline uint64_t _splitmix_next(uint64_t* state) noexcept nogil:
    state[0] += 0x9E3779B97F4A7C15ULL
    cdef uint64_t z = state[0]
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)


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


cdef void* _alloc(size_t size) except NULL:
    cdef void* p = PyMem_Malloc(size if size > 0 else 1)
    if p == NULL:
        raise MemoryError()
    return p


cdef _Trie _build_trie(list prefixes, list exacts):
    """prefixes / exacts: (key bytes, route index) in route order."""
    cdef _Trie t = _Trie()
    # Python-side trie first: node = [children dict, prefix ids, exact ids]
    nodes = [[{}, [], []]]
    for slot, entries in ((1, prefixes), (2, exacts)):
        for key, ri in entries:
            node = 0
            for b in key:
                children = nodes[node][0]
                child = children.get(b)
                if child is None:
                    child = len(nodes)
                    children[b] = child
                    nodes.append([{}, [], []])
                node = child
            nodes[node][slot].append(ri)
    t.empty = not prefixes and not exacts
    cdef Py_ssize_t n = len(nodes), e = 0, k = 0, i
    n_edges = sum(len(nd[0]) for nd in nodes)
    n_ids = sum(len(nd[1]) + len(nd[2]) for nd in nodes)
    t.n_nodes = n
    t.edge_start = <int32_t*>_alloc(sizeof(int32_t) * n)
    t.edge_count = <int32_t*>_alloc(sizeof(int32_t) * n)
    t.edge_label = <uint8_t*>_alloc(sizeof(uint8_t) * n_edges)
    t.edge_child = <int32_t*>_alloc(sizeof(int32_t) * n_edges)
    t.prefix_off = <int32_t*>_alloc(sizeof(int32_t) * n)
    t.prefix_cnt = <int32_t*>_alloc(sizeof(int32_t) * n)
    t.exact_off = <int32_t*>_alloc(sizeof(int32_t) * n)
    t.exact_cnt = <int32_t*>_alloc(sizeof(int32_t) * n)
    t.ids = <int32_t*>_alloc(sizeof(int32_t) * n_ids)
    for i in range(n):
        children, pids, eids = nodes[i]
        t.edge_start[i] = e
        t.edge_count[i] = len(children)
        for b in sorted(children):
            t.edge_label[e] = b
            t.edge_child[e] = children[b]
            e += 1
        t.prefix_off[i] = k
        t.prefix_cnt[i] = len(pids)
        for ri in sorted(pids):
            t.ids[k] = ri
            k += 1
        t.exact_off[i] = k
        t.exact_cnt[i] = len(eids)
        for ri in sorted(eids):
            t.ids[k] = ri
            k += 1
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
        grown = <int32_t*>_alloc(sizeof(int32_t) * (c.cap + count) * 2)
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
    cdef _Trie cs                  # case-sensitive prefixes / exact paths
    cdef _Trie ci                  # ASCII-lower-cased (case_sensitive: false)
    cdef int32_t* always           # regex routes (every request is a candidate)
    cdef Py_ssize_t n_always
    cdef uint8_t* kind             # per route: 0 prefix/path, 1 separated, 2 regex
    cdef uint8_t* simple           # per route: decided by the path alone
    cdef int64_t* plen             # per route: UTF-8 byte length of the prefix (separated check)
    cdef list static               # per route: shared RouteMatch, or None if request-dependent
    cdef tuple routes

    def __dealloc__(self):
        PyMem_Free(self.always)
        PyMem_Free(self.kind)
        PyMem_Free(self.simple)
        PyMem_Free(self.plen)


cdef bint _is_static(object r):
    return (r.action in ("cluster", "direct") and not r.hash_policies and r.prefix_rewrite is None
            and r.regex_rewrite is None)


cdef _Vhost _build_vhost(object vh):
    cdef _Vhost v = _Vhost()
    cdef Py_ssize_t n = len(vh.routes), i
    v.spec = vh
    v.name = vh.name
    v.routes = tuple(vh.routes)
    v.kind = <uint8_t*>_alloc(n)
    v.simple = <uint8_t*>_alloc(n)
    v.plen = <int64_t*>_alloc(sizeof(int64_t) * n)
    cs_prefix, cs_exact, ci_prefix, ci_exact, always = [], [], [], [], []
    v.static = []
    for r in vh.routes:
        i = r.index
        key = (<str>r.path_value).encode()
        v.plen[i] = len(key)
        v.simple[i] = not (r.headers or r.query or r.runtime_fraction is not None or r.grpc)
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
        if _is_static(r):
            v.static.append(RouteMatch(
                vh.name, r.name, r.cluster if r.action == "cluster" else None,
                (r.direct_response.status, r.direct_response.body) if r.direct_response else None,
                None, r.timeout, r.retry_policy, None, None, r.host_rewrite_literal or None,
                r.cluster_not_found_response_code, None, r))
        else:
            v.static.append(None)
    v.cs = _build_trie(cs_prefix, cs_exact)
    v.ci = _build_trie(ci_prefix, ci_exact)
    v.n_always = len(always)
    v.always = <int32_t*>_alloc(sizeof(int32_t) * (v.n_always or 1))
    for i in range(v.n_always):
        v.always[i] = always[i]
    return v


@cython.final
cdef class RouteTable:
    """Envoy-exact route matching for one RouteConfiguration (compiled twin)."""

    cdef readonly object spec
    cdef dict _exact
    cdef list _suffix
    cdef list _prefix
    cdef Py_ssize_t _default
    cdef bint _only_default
    cdef list _vhosts
    cdef str _vhost_header
    cdef bint _ignore_port
    cdef bint _ignore_params
    cdef uint64_t _rng
    cdef object __weakref__

    def __init__(self, spec):
        if not isinstance(spec, RouteConfigSpec):
            raise TypeError("RouteTable(spec): use RouteTable.from_xds(route_configuration)")
        self.spec = spec
        self._vhosts = [_build_vhost(vh) for vh in spec.virtual_hosts]
        self._exact = {}
        suffix = {}
        prefix = {}
        self._default = -1
        for i, vh in enumerate(spec.virtual_hosts):
            for d in vh.domains:
                if d == "*":
                    self._default = i
                elif d.startswith("*"):
                    suffix.setdefault(len(d) - 1, {})[d[1:]] = i
                elif d.endswith("*"):
                    prefix.setdefault(len(d) - 1, {})[d[:-1]] = i
                else:
                    self._exact[d] = i
        self._suffix = sorted(suffix.items(), reverse=True)
        self._prefix = sorted(prefix.items(), reverse=True)
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
        cdef Py_ssize_t size, match_len, vi, k, j
        cdef const char* buf = PyUnicode_AsUTF8AndSize(path, &size)
        cdef const char* hit
        cdef Candidates cand
        cdef _Vhost v
        cdef int32_t ri, tmp
        cdef uint64_t rv
        full_path = path
        hit = <const char*>memchr(buf, 35, size)  # '#': Envoy strips the fragment
        if hit != NULL:
            size = hit - buf
            full_path = path.split("#", 1)[0]
        vi = self._find_vhost(authority, headers, full_path, method, scheme)
        if vi < 0:
            return None
        v = <_Vhost>self._vhosts[vi]
        hit = <const char*>memchr(buf, 63, size)  # '?'
        match_len = (hit - buf) if hit != NULL else size
        if self._ignore_params:
            hit = <const char*>memchr(buf, 59, match_len)  # ';'
            if hit != NULL:
                match_len = hit - buf
        cand.ids = cand.stack
        cand.n = 0
        cand.cap = DEF_CANDIDATES
        cand.heap = False
        try:
            _walk(v.cs, <const unsigned char*>buf, match_len, False, &cand)
            _walk(v.ci, <const unsigned char*>buf, match_len, True, &cand)
            if v.n_always:
                _push(&cand, v.always, v.n_always)
            # Route order: insertion sort (a handful of candidates).
            for k in range(1, cand.n):
                tmp = cand.ids[k]
                j = k - 1
                while j >= 0 and cand.ids[j] > tmp:
                    cand.ids[j + 1] = cand.ids[j]
                    j -= 1
                cand.ids[j + 1] = tmp
            match_path = None
            hdrs = None
            query_cache = []
            if random_value is None:
                rv = _splitmix_next(&self._rng)
            else:
                rv = random_value & 0xFFFFFFFFFFFFFFFF
            for k in range(cand.n):
                ri = cand.ids[k]
                if k and ri == cand.ids[k - 1]:
                    continue
                if v.kind[ri] == 1:
                    # path_separated_prefix: the prefix must end the path or precede '/'.
                    if not (v.plen[ri] == match_len or (v.plen[ri] < match_len and buf[v.plen[ri]] == 47)):
                        continue
                if v.kind[ri] == 2 or not v.simple[ri]:
                    if match_path is None:
                        match_path = _py_match_path(full_path, self._ignore_params)
                    if hdrs is None:
                        hdrs = normalise_headers(headers, authority, full_path, method, scheme)
                    if not _py._route_matches(v.routes[ri], match_path, full_path, hdrs, rv, query_cache):
                        continue
                result = v.static[ri]
                if result is not None:
                    return result
                if match_path is None:
                    match_path = _py_match_path(full_path, self._ignore_params)
                if hdrs is None:
                    hdrs = normalise_headers(headers, authority, full_path, method, scheme)
                return _py._result(self.spec, v.spec, v.routes[ri], full_path, hdrs, authority, scheme, rv,
                                   source_ip, match_path)
            return None
        finally:
            if cand.heap:
                PyMem_Free(cand.ids)


cdef object _py_match_path(str full_path, bint ignore_params):
    q = full_path.find("?")
    p = full_path if q < 0 else full_path[:q]
    if ignore_params:
        semi = p.find(";")
        if semi >= 0:
            p = p[:semi]
    return p


cdef bint _has_upper(str s):
    cdef Py_UCS4 ch
    for ch in s:
        if 65 <= ch <= 90:
            return True
    return False
