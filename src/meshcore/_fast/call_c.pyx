# cython: language_level=3
"""The request path, compiled twin of ``call_py`` (read that module's docstring: the
behaviour, names and results are identical).

Implementation notes: every method runs with the GIL held and never releases it, so the
counters of :class:`ClusterCounters` are updated atomically without a lock (the pure twin
takes one). The module is not declared free-threading compatible (as ``lb_c``). The route
table and the balancer are called through their C entry points (``routes_c.pxd``,
``lb_c.pxd``). Calls into Python code happen only for what is configured or sent to need it:
a fault filter, outlier detection, an aggregate cluster, retries (their state and back-off),
and a request carrying the router's ``x-envoy-*`` headers.
"""

cimport cython
from cpython.long cimport PyLong_Check, PyLong_AsLongLongAndOverflow
from cpython.time cimport monotonic
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from cpython.dict cimport PyDict_Next
from cpython.object cimport PyObject, PyTypeObject, Py_TYPE
from cpython.unicode cimport PyUnicode_READ_CHAR, PyUnicode_KIND, PyUnicode_1BYTE_KIND, PyUnicode_DATA
from libc.string cimport memcmp

from .lb_c cimport lb_pick, lb_release
from .routes_c cimport RouteTable as CRouteTable

from . import _hooks
from .._route_model import RetryPolicy
from .._url import URL_CACHE, parse_url
from ..errors import CircuitBreakerOpen, FaultAbort, MeshError, NoRoute, Unavailable, UpstreamTimeout
from .lb_c import LoadBalancer as CLoadBalancer
from ._consts import ACTIVE as _TELEMETRY_LIST, BUCKETS_MS, CONNECT_FAILURE, COUNTER_NAMES, RESET, ROUTER_HEADERS
from ._consts import TIMEOUT
from ._outcome import _length, _scan_request, _scan_response, default_classify, default_status_of
from .call_py import ADMITTED, GRPC_TO_HTTP, OVER_REQUESTS, OVER_RETRIES

__all__ = ["Attempt", "Call", "ClusterCounters", "MeshCore", "BUCKETS_MS", "COUNTER_NAMES", "GRPC_TO_HTTP",
           "ADMITTED", "OVER_REQUESTS", "OVER_RETRIES", "IstioObserver", "IstioSeries",
           "note_response", "strip_peer_pairs", "PEER_HEADER", "PEER_HEADER_ID"]

cdef enum:
    N_BUCKETS = 19       # len(BUCKETS_MS); checked at import below
    N_COUNTERS = 8       # len(COUNTER_NAMES); checked at import below
    N_STATUS = 600       # statuses 0..599 are counted in an array, others in a dict
    C_TOTAL = 0
    C_RETRY = 1
    C_RETRY_OVERFLOW = 2
    C_PENDING_OVERFLOW = 3
    C_CONNECT_FAIL = 4
    C_PER_TRY_TIMEOUT = 5
    C_RX_RESET = 6
    C_5XX_LOCAL = 7

cdef double _BUCKETS[N_BUCKETS]
if len(BUCKETS_MS) != N_BUCKETS or len(COUNTER_NAMES) != N_COUNTERS:  # pragma: no cover
    raise ImportError("call_c is out of step with call_py (BUCKETS_MS / COUNTER_NAMES)")
for _i, _b in enumerate(BUCKETS_MS):
    _BUCKETS[_i] = _b

# -- __slots__ fields read in C ------------------------------------------------------------------
# The request path reads fields of Python classes with __slots__ (``_routing.RouteMatch``, the
# ``RetryPolicy`` dataclass and its compiled form): through getattr, each costs a type lookup and a
# descriptor call (~140 instructions), ten or so per request. A ``SlotRef`` remembers, for one
# field name, the last type it was read from and the offset of the slot in that type's instances
# (from the member descriptor that attribute lookup itself finds on the type), and reads the field
# at that offset while an object of exactly that type comes, the type unchanged since (its version
# tag) and attribute lookup its generic one. An unset slot (NULL), any other type or a changed type
# goes through getattr (which raises as Python would) and learns the new type.

cdef extern from "Python.h":
    ctypedef struct PyMemberDef:
        const char *name
        int type
        Py_ssize_t offset
        int flags
    ctypedef struct PyDescrObject:
        PyTypeObject *d_type
    ctypedef struct PyMemberDescrObject:
        PyDescrObject d_common
        PyMemberDef *d_member
    PyTypeObject PyMemberDescr_Type
    int _PyType_IsSubtype "PyType_IsSubtype" (PyTypeObject *a, PyTypeObject *b)
    PyObject *_PyType_Lookup(PyTypeObject *tp, object name)
    object PyObject_GenericGetAttr(object o, object name)
    unsigned int Py_TPFLAGS_VALID_VERSION_TAG
    ctypedef struct _TypeVersion "PyTypeObject":
        unsigned int tp_version_tag
        unsigned long tp_flags
        void *tp_getattro

cdef enum:
    _READONLY_FLAG = 1  # structmember.h READONLY (Py_READONLY)
    _T_OBJECT_EX = 16  # structmember.h: a slot holding an object, AttributeError when unset


cdef struct SlotRef:
    PyTypeObject *tp        # the type learned (NULL: none yet); borrowed, see the version check
    unsigned int version    # its tp_version_tag when learned (a valid one: never 0)
    Py_ssize_t offset       # where the field's slot is in that type's instances


cdef void _slot_learn(SlotRef *ref, object obj, str name) noexcept:
    """Remember ``type(obj)``'s slot for ``name`` when attribute lookup on it is the generic one
    and finds a member descriptor of an object slot; else forget (getattr from then on)."""
    cdef PyTypeObject *tp = Py_TYPE(obj)
    cdef _TypeVersion *tv = <_TypeVersion *>tp
    cdef PyObject *descr
    ref.tp = NULL
    if tv.tp_getattro != <void *>PyObject_GenericGetAttr:
        return
    descr = _PyType_Lookup(tp, name)  # (borrowed; sets the type's version tag if it can)
    if descr is NULL or Py_TYPE(<object>descr) is not &PyMemberDescr_Type:
        return
    # (flags: READONLY at most -- audit-on-read members, and 3.12's Py_RELATIVE_OFFSET whose
    # offset is not from the object's start, are read through getattr)
    if (<PyMemberDescrObject *>descr).d_member.type != _T_OBJECT_EX \
            or (<PyMemberDescrObject *>descr).d_member.flags & ~_READONLY_FLAG:
        return
    # the descriptor may be another class's, put on this one (``value = Other.value``): its offset
    # is in ``tp``'s instances only when ``tp`` is a subtype of the descriptor's own class (the
    # check the descriptor's __get__ makes, TypeError otherwise; a subtype's layout extends it)
    if not _PyType_IsSubtype(tp, (<PyMemberDescrObject *>descr).d_common.d_type):
        return
    if not (tv.tp_flags & Py_TPFLAGS_VALID_VERSION_TAG) or tv.tp_version_tag == 0:
        return
    ref.offset = (<PyMemberDescrObject *>descr).d_member.offset
    ref.version = tv.tp_version_tag
    ref.tp = tp


cdef inline object _slot_get(SlotRef *ref, object obj, str name):
    """``getattr(obj, name)``, read at the learned slot's offset when ``ref`` knows ``type(obj)``."""
    cdef PyObject *v
    cdef PyTypeObject *tp = Py_TYPE(obj)
    if tp is ref.tp and (<_TypeVersion *>tp).tp_version_tag == ref.version:
        # (offset: the slot of this exact type, unchanged since learned (a modified type gets a
        # new version tag); obj is an instance of it, so the slot is inside obj)
        v = (<PyObject **>((<char *><PyObject *>obj) + ref.offset))[0]
        if v is not NULL:
            return <object>v
        return getattr(obj, name)
    _slot_learn(ref, obj, name)
    return getattr(obj, name)


cdef SlotRef _RM_CLUSTER, _RM_RETRY_POLICY, _RM_TIMEOUT, _RM_HASH, _RM_PATH_REWRITE, _RM_HOST_REWRITE
cdef SlotRef _RM_ROUTE_NAME, _RP_COMPILED, _RP_PER_TRY_TIMEOUT, _RC_STATUS_CODES, _EP_KEY


cdef SlotRef _PROBE_VALUE


def _probe_slot(obj):
    """(Tests.) ``obj.value`` read through one ``SlotRef``, as the request path reads its fields."""
    return _slot_get(&_PROBE_VALUE, obj, "value")


cdef dict _url_cache = URL_CACHE
cdef dict _grpc_to_http = GRPC_TO_HTTP
cdef object _CLoadBalancer = CLoadBalancer
cdef object _default_classify = default_classify
cdef list _TELEMETRY = _TELEMETRY_LIST  # [how many meshes have telemetry sinks]
cdef object _default_status_of = default_status_of
cdef object _RetryPolicy = RetryPolicy
cdef object _CONNECT_FAILURE = CONNECT_FAILURE
cdef object _TIMEOUT = TIMEOUT
cdef object _RESET = RESET

# What the layers above plug in (``_hooks``: the router loop of meshcore.lifecycle, retry state,
# fault decisions, router headers, refusal telemetry, the aggregate balancer type): C globals
# (NO_FAULT and RetryState: module globals), read per request as when they were imported;
# placeholders that raise until registered.
cdef object _AggregateBalancer
cdef object _fault_filter_for
cdef object _fault_decision
cdef object _fault_step
cdef object _run
cdef object _run_async
cdef object _run_reported
cdef object _run_async_reported
cdef object _report_single
cdef object _begin_single
cdef object _report_refusal
cdef object _final_answer
cdef object _router_headers_of
cdef object _apply_router_headers
cdef object _is_internal_request
cdef object _FaultDecision


def _install(dict entries):
    """Store entries registered in ``_hooks`` in this module's globals (off the request path)."""
    global _AggregateBalancer, _fault_filter_for, _fault_decision, _fault_step, _run, _run_async, _run_reported
    global _run_async_reported, _report_single, _begin_single, _report_refusal, _final_answer
    global _router_headers_of, _apply_router_headers, _is_internal_request, _FaultDecision, NO_FAULT, RetryState
    for name, value in entries.items():
        if name == "run":
            _run = value
        elif name == "run_async":
            _run_async = value
        elif name == "run_reported":
            _run_reported = value
        elif name == "run_async_reported":
            _run_async_reported = value
        elif name == "report_single":
            _report_single = value
        elif name == "begin_single":
            _begin_single = value
        elif name == "fault_filter_for":
            _fault_filter_for = value
        elif name == "fault_decision":
            _fault_decision = value
        elif name == "fault_step":
            _fault_step = value
        elif name == "final_answer":
            _final_answer = value
        elif name == "NO_FAULT":
            NO_FAULT = value
        elif name == "FaultDecision":
            _FaultDecision = value
        elif name == "RetryState":
            RetryState = value
        elif name == "router_headers_of":
            _router_headers_of = value
        elif name == "is_internal_request":
            _is_internal_request = value
        elif name == "apply_router_headers":
            _apply_router_headers = value
        elif name == "report_refusal":
            _report_refusal = value
        elif name == "AggregateBalancer":
            _AggregateBalancer = value
        else:  # pragma: no cover  (_hooks rejects unknown names)
            raise ValueError(f"call_c: unknown request-path entry {name!r}")


def _installed():
    """The entries as this twin holds them now (for tests)."""
    return {"run": _run, "run_async": _run_async, "run_reported": _run_reported,
            "run_async_reported": _run_async_reported, "report_single": _report_single,
            "begin_single": _begin_single, "fault_filter_for": _fault_filter_for,
            "fault_decision": _fault_decision, "fault_step": _fault_step, "final_answer": _final_answer,
            "NO_FAULT": NO_FAULT, "FaultDecision": _FaultDecision, "RetryState": RetryState,
            "router_headers_of": _router_headers_of, "is_internal_request": _is_internal_request,
            "apply_router_headers": _apply_router_headers, "report_refusal": _report_refusal,
            "AggregateBalancer": _AggregateBalancer}


_install(_hooks.placeholders())
_hooks.subscribe(_install)


cdef Py_ssize_t _SHORTEST_ROUTER_HEADER = min(len(h) for h in ROUTER_HEADERS)  # 16: x-envoy-retry-on


cdef inline bint _maybe_router_header(object name):
    # the router headers' names start with x- and are at least _SHORTEST_ROUTER_HEADER long
    return type(name) is not str or (len(<str>name) >= _SHORTEST_ROUTER_HEADER
                                     and ((<str>name)[0] == "x" or (<str>name)[0] == "X"))


cdef object _router_headers(object headers):
    """``router_headers_of(headers)`` after a scan in C of the usual shapes (a dict, a list or
    tuple of pairs) that rules out most requests without a Python-level call."""
    if type(headers) is dict:
        for name in <dict>headers:
            if _maybe_router_header(name):
                return _router_headers_of(headers)
        return None
    if type(headers) is list or type(headers) is tuple:
        for pair in headers:
            if type(pair) is not tuple or len(<tuple>pair) != 2 or _maybe_router_header((<tuple>pair)[0]):
                return _router_headers_of(headers)
        return None
    return _router_headers_of(headers)


cdef bint _final_first(object policy, object status, object grpc_status) except -1:
    """``lifecycle._final_answer``: decided in C for the usual answer (no policy; or no
    grpc-status, or grpc-status OK, which no retry condition names, and a status below 409 under
    a compiled RetryPolicy, which only its ``retriable_status_codes`` can retry)."""
    cdef long long s
    if policy is None:
        return True
    if (grpc_status is None or (PyLong_Check(grpc_status) and grpc_status == 0)) and status is not None \
            and type(policy) is _RetryPolicy:
        s = _status_index(status)
        if 0 <= s < 409:
            compiled = _slot_get(&_RP_COMPILED, policy, "compiled")
            if compiled is not None:
                return status not in _slot_get(&_RC_STATUS_CODES, compiled, "status_codes")
    return bool(_final_answer(policy, status, grpc_status))


cdef inline long long _status_index(object status) except -2:
    """0..599 for an int status in range (0 for None), -1 for anything else."""
    cdef int overflow = 0
    cdef long long s
    if status is None:
        return 0
    if not PyLong_Check(status):
        return -1
    s = PyLong_AsLongLongAndOverflow(status, &overflow)
    if overflow or s < 0 or s >= N_STATUS:
        return -1
    return s


@cython.final
cdef class ClusterCounters:
    """Circuit-breaker state and hot stats of one cluster (see ``call_py``)."""

    cdef readonly long long active_requests, active_retries
    cdef readonly long long max_connections, max_pending_requests, max_requests, max_retries
    cdef readonly double budget_percent
    cdef readonly long long min_retry_concurrency
    cdef long long _counters[N_COUNTERS]
    cdef long long _statuses[N_STATUS]
    cdef dict _other_statuses
    cdef long long _buckets[N_BUCKETS + 1]
    cdef double _time_sum
    cdef long long _time_count

    def __cinit__(self):
        cdef Py_ssize_t i
        self.max_connections = self.max_pending_requests = self.max_requests = 1024
        self.max_retries = 3
        self.budget_percent = -1.0
        self.min_retry_concurrency = 3
        for i in range(N_COUNTERS):
            self._counters[i] = 0
        for i in range(N_STATUS):
            self._statuses[i] = 0
        for i in range(N_BUCKETS + 1):
            self._buckets[i] = 0
        self._other_statuses = {}

    def set_thresholds(self, max_connections, max_pending_requests, max_requests, max_retries,
                       retry_budget=None):
        """The cluster's ``circuit_breakers`` (priority DEFAULT); ``retry_budget``:
        ``(budget_percent, min_retry_concurrency)`` or ``None``."""
        for name, v in (("max_connections", max_connections), ("max_pending_requests", max_pending_requests),
                        ("max_requests", max_requests), ("max_retries", max_retries)):
            if not 0 <= v < 1 << 62:
                raise ValueError(f"{name} out of range: {v!r}")
        self.max_connections, self.max_pending_requests = int(max_connections), int(max_pending_requests)
        self.max_requests, self.max_retries = int(max_requests), int(max_retries)
        if retry_budget is None:
            self.budget_percent, self.min_retry_concurrency = -1.0, 3
        else:
            self.budget_percent = float(retry_budget[0])
            self.min_retry_concurrency = int(retry_budget[1])

    @property
    def pending(self):
        """Attempts counted as pending (beyond ``max_connections``)."""
        return max(0, self.active_requests - self.max_connections)

    cpdef long long retry_limit(self):
        """Retries allowed in flight now (``max_retries``, or the retry budget's limit)."""
        cdef long long by_budget
        if self.budget_percent < 0:
            return self.max_retries
        by_budget = <long long>(self.budget_percent / 100.0 * self.active_requests)
        return by_budget if by_budget > self.min_retry_concurrency else self.min_retry_concurrency

    # -- the request path -------------------------------------------------------------------------

    cpdef int admit(self, bint retry):
        """Pass the breakers and count the attempt: ``ADMITTED``, ``OVER_REQUESTS`` or ``OVER_RETRIES``."""
        cdef long long limit
        if retry and self.active_retries >= self.retry_limit():
            self._counters[C_RETRY_OVERFLOW] += 1
            return 2
        # Envoy's HTTP/1.1 pool: max_requests bounds the requests ON connections (at most
        # max_connections of them); beyond the connections a request waits as pending, bounded
        # by max_pending_requests, and attaches to a connection when one frees up.
        if self.max_requests < self.max_connections:
            limit = self.max_requests
        else:
            limit = self.max_connections + self.max_pending_requests
        if self.active_requests >= limit:
            self._counters[C_PENDING_OVERFLOW] += 1
            return 1
        self.active_requests += 1
        self._counters[C_TOTAL] += 1
        if retry:
            self.active_retries += 1
            self._counters[C_RETRY] += 1
        return 0

    cpdef abandon(self, bint retry):
        """An admitted attempt that found no endpoint: its slot back, its counts undone."""
        self.active_requests -= 1
        self._counters[C_TOTAL] -= 1
        if retry:
            self.active_retries -= 1
            self._counters[C_RETRY] -= 1

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cpdef complete(self, bint retry, object status, object error, double elapsed_ms):
        """An admitted attempt ended: its slot back; its status (or error) and time counted."""
        cdef long long s
        cdef Py_ssize_t i = 0
        self.active_requests -= 1
        if retry:
            self.active_retries -= 1
        if error is not None:
            if error == _CONNECT_FAILURE:
                self._counters[C_CONNECT_FAIL] += 1
            elif error == _TIMEOUT:
                self._counters[C_PER_TRY_TIMEOUT] += 1
            else:
                self._counters[C_RX_RESET] += 1
            self._counters[C_5XX_LOCAL] += 1
        else:
            s = _status_index(status)
            if s >= 0:  # invariant: 0 <= s < N_STATUS (_status_index)
                self._statuses[s] += 1
            else:
                key = int(status) if PyLong_Check(status) else 0
                self._other_statuses[key] = self._other_statuses.get(key, 0) + 1
        # bisect_left: the first bound >= elapsed_ms; i stays <= N_BUCKETS, the array's last index
        while i < N_BUCKETS and _BUCKETS[i] < elapsed_ms:
            i += 1
        self._buckets[i] += 1
        self._time_sum += elapsed_ms
        self._time_count += 1

    # -- readers ----------------------------------------------------------------------------------

    def counter_values(self):
        """The counters, in ``COUNTER_NAMES`` order."""
        return [self._counters[i] for i in range(N_COUNTERS)]

    def statuses(self):
        """Completed attempts by HTTP status (0: finished without a status)."""
        out = {}
        cdef Py_ssize_t i
        for i in range(N_STATUS):
            if self._statuses[i]:
                out[i] = self._statuses[i]
        for k, v in self._other_statuses.items():
            out[k] = out.get(k, 0) + v
        return out

    def histogram(self):
        """Attempt times: (bucket counts over ``BUCKETS_MS`` plus one above, sum ms, count)."""
        return [self._buckets[i] for i in range(N_BUCKETS + 1)], self._time_sum, self._time_count


@cython.final
@cython.freelist(16)
cdef class Attempt:
    """One try of a call: the endpoint, where to send, and how long it may take."""

    cdef readonly int number
    cdef public object endpoint, timeout, status, grpc_status, error, authority, path, scheme, method
    cdef public object headers, cluster
    #: what the integration that sent the attempt tells telemetry (None, or a dict; see call_py)
    cdef public object telemetry
    cdef object _lb, _outlier, _policy  # _policy: the call's retry policy (finish_final)
    cdef ClusterCounters _counters
    cdef bint _retry, _finished, _fast_lb  # _fast_lb: _lb is exactly the compiled LoadBalancer
    cdef double _started

    @property
    def address(self):
        """``ip:port`` (``[v6]:port``) to connect to."""
        return self.endpoint.key

    @property
    def url(self):
        return f"{self.scheme}://{self.endpoint.key}{self.path}"

    def finish(self, status=None, grpc_status=None, error=None):
        """Record the outcome (once): releases the endpoint, feeds stats and outlier detection."""
        self._finish(status, grpc_status, error)

    def finish_final(self, status, grpc_status=None):
        """``finish(status, grpc_status)`` for an answer (no upstream error), then whether it ends
        the request at once: the first attempt's answer that the call's retry policy does not
        retry (a later attempt's outcome is left to the retry decision: ``False``)."""
        self._finish(status, grpc_status, None)
        if self.number != 1:
            return False
        return _final_first(self._policy, status, grpc_status)

    cdef int _finish(self, object status, object grpc_status, object error) except -1:
        if self._finished:
            return 0
        self._finished = True
        self.status = status
        self.grpc_status = grpc_status
        self.error = error
        if self._fast_lb:
            lb_release(self._lb, self.endpoint)
        else:
            self._lb.release(self.endpoint)
        self._counters.complete(self._retry, status, error, (monotonic() - self._started) * 1000.0)
        outlier = self._outlier
        if outlier is not None:
            if error is not None:
                outlier.record(self.endpoint.key, None, True)
            else:
                if grpc_status:  # Envoy feeds outlier detection grpcToHttpStatus(grpc-status)
                    status = _grpc_to_http.get(grpc_status, 500)
                outlier.record(self.endpoint.key, status)
        return 0

    cdef int _exit(self, object exc) except -1:
        if exc is not None and self.status is None:
            self._finish(None, None, _default_classify(exc) or _RESET)
        else:
            self._finish(self.status, self.grpc_status, None)
        return 0

    # the single-attempt form: ``with mesh.request(...) as attempt``
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self._exit(exc)

    def __repr__(self):
        return f"Attempt({self.cluster!r} #{self.number} {self.endpoint.key} status={self.status})"


@cython.final
@cython.freelist(16)
cdef class Call:
    """One request routed by the mesh (made by ``Mesh.request``; see ``meshcore.call``)."""

    cdef readonly object mesh, target, authority, scheme, path, method, headers, route, cluster
    #: the route's retry policy, as the request's x-envoy-* router headers change it (None: none)
    cdef readonly object retry_policy
    cdef readonly double started
    #: monotonic time by which the whole request must end (None: no limit)
    cdef public object deadline
    #: the fault filter's decision, once it delayed or aborted the request (None before)
    cdef readonly object fault_decision
    cdef Attempt _first     # the first attempt; the list is made only when asked for or on a retry
    cdef list _attempts
    cdef object _lb, _state, _outlier, _fault_spec, _faults, _rng, _limit, _retry, _single
    cdef bint _fault_active  # a fault counted against max_active_faults, not yet ended
    cdef dict _child_outliers  # aggregate cluster: id(child balancer) -> the child's detector (or None)
    cdef bint _aggregate, _fast_lb
    cdef ClusterCounters _counters

    @property
    def attempts(self):
        """The attempts made so far, in order."""
        if self._attempts is None:
            self._attempts = [] if self._first is None else [self._first]
        return self._attempts

    cdef inline Py_ssize_t _n_attempts(self):
        if self._attempts is not None:
            return len(self._attempts)
        return 0 if self._first is None else 1

    @property
    def retry(self):
        """The request's retry state under the route's policy (made on first use)."""
        if self._retry is None:
            self._retry = RetryState(self.retry_policy, self._rng)
        return self._retry

    def _count(self, name):
        """Count a rare per-cluster event (timeouts, successful retries) in the cluster's stats."""
        self._state.stats.inc(name)

    # -- steps ------------------------------------------------------------------------------------

    def fault(self):
        """The fault filter's decision for this request (no fault filter: no fault). A fault
        counted against ``max_active_faults`` stays active until :meth:`_after_fault`."""
        if self._fault_spec is None:
            return NO_FAULT
        d, counted = _fault_decision(self._fault_spec, self.headers, self._rng, self.cluster, self._faults)
        if counted:
            self._fault_active = True
        return d

    def _release_fault(self):
        """The fault's delay elapsed or its abort answered: it no longer counts as active."""
        if self._fault_active:
            self._fault_active = False
            self._faults.finish()

    def _after_fault(self, d):
        """After the fault filter's delay (slept by the caller): the route timeout starts now;
        an abort answers the request without an upstream."""
        self.fault_decision = d
        self._release_fault()
        if d.delay and self._limit:
            self.deadline = monotonic() + self._limit
        if d.abort_http_status is not None or d.abort_grpc_status is not None:
            raise FaultAbort(d.abort_http_status, d.abort_grpc_status)

    def _remaining(self):
        return None if self.deadline is None else self.deadline - monotonic()

    cdef object _try_timeout(self, double now):
        policy = self.retry_policy
        per_try = _slot_get(&_RP_PER_TRY_TIMEOUT, policy, "per_try_timeout") if policy is not None else None
        if self.deadline is None:
            return per_try
        remaining = self.deadline - now
        if per_try and per_try < remaining:
            return per_try
        return remaining

    def first_attempt(self):
        """``start_attempt()`` when no fault filter applies to the request; ``None`` when one
        does (the router then runs the fault step first, and ``start_attempt``)."""
        if self._fault_spec is not None:
            return None
        return self._start_attempt()

    def start_attempt(self):
        """Pick an endpoint and pass the circuit breakers; ``None`` when a retry may not be made
        (retry overflow). Raises ``Unavailable`` / ``CircuitBreakerOpen`` for the first attempt."""
        return self._start_attempt()

    cdef Attempt _start_attempt(self):
        cdef bint retry
        cdef int over
        cdef double now
        cdef Attempt a
        cdef ClusterCounters counters = self._counters
        if counters is None:
            raise MeshError(f"route {self.route.route_name!r} answers directly; there is no upstream")
        cdef Py_ssize_t made = self._n_attempts()
        retry = made > 0
        if retry and self.deadline is not None and monotonic() >= self.deadline:
            self._count("upstream_rq_timeout")
            raise UpstreamTimeout(f"{self.target}{self.path}: request timeout elapsed before attempt "
                                  f"{made + 1}")
        over = counters.admit(retry)
        if over:
            if over == 2:  # OVER_RETRIES
                return None
            raise CircuitBreakerOpen(f"{self.target}{self.path}: cluster {self.cluster!r} circuit breaker open "
                                     f"(max_requests/pending reached)")
        try:
            endpoint, lb = self._pick(retry)
        except BaseException:
            counters.abandon(retry)
            raise
        a = Attempt.__new__(Attempt)
        a.number = made + 1
        a.endpoint = endpoint
        route = self.route
        a.authority = _slot_get(&_RM_HOST_REWRITE, route, "host_rewrite") or self.authority
        a.path = _slot_get(&_RM_PATH_REWRITE, route, "path_rewrite") or self.path
        a.scheme = self.scheme
        a.method = self.method
        a.headers = self.headers
        a.cluster = self.cluster
        a._lb = lb
        a._fast_lb = type(lb) is _CLoadBalancer
        a._counters = counters
        if self._child_outliers is None:
            a._outlier = self._outlier
        else:  # an aggregate cluster: the host's own (child) cluster detects outliers (Envoy)
            a._outlier = self._child_outliers.get(id(lb))
        a._retry = retry
        a._policy = self.retry_policy
        now = monotonic()
        a._started = now
        a.timeout = self._try_timeout(now)
        if made == 0 and self._attempts is None:
            self._first = a
        else:
            self.attempts.append(a)
        return a

    cdef tuple _choose(self, object hash):
        if self._fast_lb:
            return lb_pick(self._lb, hash), self._lb
        if self._aggregate:
            return self._lb.choose(hash)
        return self._lb.pick(hash), self._lb

    cdef tuple _pick(self, bint retry):
        cdef set avoid
        cdef tuple chosen = None
        cdef Attempt prev
        if self._outlier is not None:
            self._outlier.tick()
        if self._child_outliers is not None:
            for detector in self._child_outliers.values():
                if detector is not None:
                    detector.tick()
        if not retry:
            ep, lb = self._choose(_slot_get(&_RM_HASH, self.route, "hash"))
            if ep is not None:
                return ep, lb
            raise self.mesh._no_upstream(self.target, self.path, self.cluster)
        # a retry avoids the hosts already tried, re-picking up to host_selection_retry_max_attempts
        avoid = set()
        for prev in self.attempts:
            avoid.add(prev.endpoint.key)
        for _ in range(self.retry.host_selection_attempts + 1):
            ep, lb = self._choose(None)
            if ep is None:
                break
            if ep.key not in avoid:
                if chosen is not None:
                    chosen[1].release(chosen[0])
                return ep, lb
            if chosen is None:
                chosen = (ep, lb)
            else:
                lb.release(ep)
        if chosen is not None:
            return chosen  # every re-pick hit a tried host: Envoy then keeps the last pick
        raise self.mesh._no_upstream(self.target, self.path, self.cluster)

    # -- the single-attempt form ------------------------------------------------------------------

    def __enter__(self):
        if _TELEMETRY[0]:
            return self._enter_reported()
        if self._fault_spec is not None:
            _fault_step(self)
        attempt = self._start_attempt()
        assert attempt is not None
        self._single = attempt
        return attempt

    def _enter_reported(self):
        try:
            if self._fault_spec is not None:
                _fault_step(self)
            attempt = self._start_attempt()
        except BaseException as e:
            _report_single(self, e)
            raise
        assert attempt is not None
        self._single = attempt
        _begin_single(self, attempt)  # (tracing: the span starts with the attempt, which carries its headers)
        return attempt

    def __exit__(self, exc_type, exc, tb):
        if self._single is not None:
            (<Attempt>self._single)._exit(exc)
            if _TELEMETRY[0]:
                _report_single(self, exc)

    # -- the full lifecycle (meshcore.lifecycle) --------------------------------------------------

    def run(self, send, *, status_of=_default_status_of, grpc_status_of=None, classify=_default_classify):
        """Send with Envoy's router behaviour (fault, retries, breakers, timeouts): ``send(attempt)``
        per attempt; the last outcome is returned (or raised). See ``meshcore.call``."""
        if _TELEMETRY[0]:
            return _run_reported(self, send, status_of, grpc_status_of, classify)
        return _run(self, send, status_of, grpc_status_of, classify)

    def run_async(self, send, *, status_of=_default_status_of, grpc_status_of=None, classify=_default_classify):
        """:meth:`run` for coroutines: ``await call.run_async(send)`` (``await send(attempt)``)."""
        if _TELEMETRY[0]:
            return _run_async_reported(self, send, status_of, grpc_status_of, classify)
        return _run_async(self, send, status_of, grpc_status_of, classify)

    def __repr__(self):
        return f"Call({self.target}{self.path} route={self.route.route_name!r} cluster={self.cluster!r})"


@cython.final
cdef class _TargetEntry:
    """What ``request`` reads of one published TargetConfig, resolved once per configuration."""
    cdef object cfg, route_table, clusters
    cdef CRouteTable fast_table  # route_table when it is the compiled RouteTable, else None
    cdef bint has_faults
    cdef dict faults    # id(route spec) -> (fault config or None, its filter's ActiveFaults)
    cdef dict resolved  # cluster name -> _ClusterEntry


@cython.final
cdef class _ClusterEntry:
    """A cluster of that configuration: its runtime, balancer and request state."""
    cdef object rt, lb, state, outlier
    cdef bint aggregate, fast_lb
    cdef dict child_outliers   # aggregate: id(child balancer) -> child detector; None: no child has one
    cdef list child_states     # aggregate: (child runtime, child state) of children with a detector
    cdef ClusterCounters counters


cdef class MeshCore:
    """The request path of ``meshcore.Mesh`` (its base class): ``request`` and the state it reads.

    Per target it keeps what it resolved from the published configuration (route table,
    clusters, their balancers and request state), checked by identity against the published
    ``TargetConfig`` on every request: a new configuration is resolved again on its first
    request. An EDS update changes no configuration (the balancer is updated in place); the
    outlier detector then learns the new host list on the next request.
    """

    cdef public object _publisher, _states, _rng
    cdef dict _targets

    def __cinit__(self, *args, **kwargs):
        self._targets = {}

    cdef _TargetEntry _entry(self, object target, object cfg):
        cdef _TargetEntry entry
        if cfg is None or cfg.error is not None:
            cfg = self._config_for(target, cfg)  # the first use of a target (raises if unusable)
        entry = _TargetEntry.__new__(_TargetEntry)
        entry.cfg = cfg
        entry.route_table = cfg.route_table
        if type(entry.route_table) is CRouteTable:
            entry.fast_table = <CRouteTable>entry.route_table
        entry.clusters = cfg.clusters
        entry.has_faults = bool(cfg.fault_filters)
        entry.faults = {}
        entry.resolved = {}
        if len(self._targets) >= 4096:
            self._targets.clear()
        self._targets[target] = entry
        return entry

    cdef _ClusterEntry _resolve(self, _TargetEntry entry, object cluster, object m, object target, object path):
        cdef _ClusterEntry ce
        rt = entry.clusters.get(cluster)
        if rt is None or rt.lb is None:
            raise self._no_cluster(target, path, m, rt)
        lb = rt.lb
        state = self._cluster_state(rt)
        ce = _ClusterEntry.__new__(_ClusterEntry)
        ce.rt = rt
        ce.lb = lb
        ce.aggregate = type(lb) is _AggregateBalancer
        ce.fast_lb = type(lb) is _CLoadBalancer
        ce.state = state
        ce.counters = state.counters
        ce.outlier = state.outlier
        if ce.aggregate:
            self._resolve_children(ce, rt)
        entry.resolved[cluster] = ce
        return ce

    cdef tuple _route_fault(self, _TargetEntry entry, object route):
        """(fault config, its filter's ActiveFaults) for a route of this configuration, or
        (None, None): decided once per route (the configuration, and so the route, are fixed)."""
        key = id(route)  # the route specs live as long as entry.cfg, which the entry holds
        found = entry.faults.get(key)
        if found is None:
            name, spec = _fault_filter_for(entry.cfg, route)
            if spec is not None and not (spec.delay_per_million or spec.abort_per_million):
                spec = None  # a filter that can inject nothing (Istio's empty one): no fault step
            found = (spec, self._fault_counter(entry.cfg, name)) if spec is not None else (None, None)
            entry.faults[key] = found
        return <tuple>found

    cdef _resolve_children(self, _ClusterEntry ce, object rt):
        """An aggregate cluster's children: their request state, for outlier detection."""
        detectors = {}
        ce.child_states = []
        for child in rt.children:
            if child.lb is None:
                continue
            child_state = self._cluster_state(child)
            detectors[id(child.lb)] = child_state.outlier
            if child_state.outlier is not None:
                ce.child_states.append((child, child_state))
        ce.child_outliers = detectors if ce.child_states else None

    def request(self, url, method="GET", headers=None, *, target=None, source_ip=None, timeout=None):
        """Route one request (``http(s)://host[:port]/path?query``) and return its :class:`Call`:
        ``call.run(send)`` for retries, timeouts, breakers and faults, or ``with call as attempt``
        for a single attempt you send yourself. ``target`` overrides the ``host:port`` derived
        from the URL (default ports 80/443); ``timeout`` (seconds) caps the request below the
        route timeout (a caller's deadline)."""
        return self._route(url, method, headers, target, source_ip, timeout, None, False, False)

    def _request_first(self, url, method, headers, target, timeout, expected, bint plain=False):
        """See ``call_py.MeshCore._request_first`` (the attempt's fields read here in C, where
        they cost a few instructions each)."""
        cdef Call call = self._route(url, method, headers, target, None, timeout, expected, True, plain)
        cdef Attempt first
        if call is None:
            return None
        if call._fault_spec is not None:
            return call, None, None, None, None, None, None, None
        try:
            first = call._start_attempt()
        except MeshError as e:
            return call, None, e, None, None, None, None, None
        if first is None:  # (a first attempt is never over the retry budget: kept as start_attempt says)
            return call, None, None, None, None, None, None, None
        endpoint = first.endpoint
        return (call, first, None, _slot_get(&_EP_KEY, endpoint, "key"), endpoint, call.route, call.started,
                first.timeout)

    cdef Call _route(self, object url, object method, object headers, object target, object source_ip,
                     object timeout, object expected, bint check, bint plain):
        """See ``call_py.MeshCore._route``."""
        cdef Call call
        cdef _TargetEntry entry
        cdef _ClusterEntry ce
        cdef double started
        parsed = _url_cache.get(url)
        if parsed is None:
            parsed = parse_url(url)
        scheme, netloc, path, default_target = <tuple>parsed
        if target is None:
            target = default_target
        cdef dict published = self._publisher.published
        cfg = published.get(target)
        if check and (cfg is not expected or expected is None):  # (nothing published: nothing expected)
            return None
        entry = <_TargetEntry>self._targets.get(target)
        if entry is None or entry.cfg is not cfg:
            entry = self._entry(target, cfg)
        # virtual hosts see the Host header the request carries (the URL's authority as written)
        routing = None if plain else headers
        if entry.fast_table is not None:
            m = entry.fast_table.match_c(netloc, path, routing, method, scheme, None, source_ip)
        else:
            m = entry.route_table.match(netloc, path, routing, method, scheme, None, source_ip)
        if m is None:
            e = NoRoute(target, path)
            if _TELEMETRY[0]:
                _report_refusal(self, target, netloc, method, path, headers, e, scheme=scheme)
            raise e
        call = Call.__new__(Call)
        cluster = _slot_get(&_RM_CLUSTER, m, "cluster")
        if cluster is not None:
            ce = <_ClusterEntry>entry.resolved.get(cluster)
            if ce is None:
                try:
                    ce = self._resolve(entry, cluster, m, target, path)
                except Unavailable as e:
                    if _TELEMETRY[0]:
                        _report_refusal(self, target, netloc, method, path, headers, e, cluster, m.route_name,
                                        route=m, scheme=scheme)
                    raise
            elif ce.outlier is not None and ce.state.synced is not ce.rt.eds_spec:
                self._cluster_state(ce.rt)  # an EDS update: the detector learns the host list
            if ce.child_outliers is not None:
                for child, child_state in ce.child_states:
                    if child_state.synced is not child.eds_spec:
                        self._cluster_state(child)
                call._child_outliers = ce.child_outliers
            call._lb = ce.lb
            call._aggregate = ce.aggregate
            call._fast_lb = ce.fast_lb
            call._state = ce.state
            call._counters = ce.counters
            call._outlier = ce.outlier
        if entry.has_faults:
            call._fault_spec, call._faults = self._route_fault(entry, m.route)
        call.mesh = self
        call.target = target
        call.authority = netloc
        call.scheme = scheme
        call.path = path
        call.method = method
        call.headers = headers
        call.route = m
        call.cluster = cluster
        call._rng = self._rng
        policy = _slot_get(&_RM_RETRY_POLICY, m, "retry_policy")
        limit = _slot_get(&_RM_TIMEOUT, m, "timeout")
        if routing:
            found = _router_headers(routing)
            if found is not None and _is_internal_request(entry.cfg.listener, routing, source_ip):
                policy, limit = _apply_router_headers(policy, limit, found)
        call.retry_policy = policy
        started = monotonic()
        call.started = started
        if timeout and (not limit or timeout < limit):
            limit = timeout
        call._limit = limit or None
        call.deadline = started + limit if limit else None
        return call


# -- Istio's standard metrics: the counters and the usual request counted without a record --------


@cython.final
cdef class IstioSeries:
    """The values of one Istio label tuple (see ``call_py.IstioSeries``). Updated with the GIL
    held and never released, so without a lock (the pure twin takes one)."""

    cdef readonly tuple labels
    cdef readonly bint grpc
    cdef Py_ssize_t _n                  # len(bounds); every histogram has _n + 1 counts
    cdef double *_bounds                # sorted ascending, set in __cinit__, read-only afterwards
    cdef long long *_counts             # 3 * (_n + 1): duration, request bytes, response bytes
    cdef double _sums[3]
    cdef long long _requests, _req_messages, _resp_messages

    def __cinit__(self, labels, bounds, grpc):
        cdef Py_ssize_t i
        values = [float(b) for b in bounds]
        self.labels = tuple(labels)
        self.grpc = bool(grpc)
        self._n = len(values)
        self._bounds = <double *>PyMem_Malloc((self._n + 1) * sizeof(double))
        self._counts = <long long *>PyMem_Malloc(3 * (self._n + 1) * sizeof(long long))
        if self._bounds == NULL or self._counts == NULL:
            raise MemoryError()
        for i in range(self._n):
            self._bounds[i] = values[i]
        for i in range(3 * (self._n + 1)):
            self._counts[i] = 0
        self._sums[0] = self._sums[1] = self._sums[2] = 0.0
        self._requests = self._req_messages = self._resp_messages = 0

    def __dealloc__(self):
        PyMem_Free(self._bounds)
        PyMem_Free(self._counts)

    cdef inline Py_ssize_t _index(self, double v) noexcept:
        # bisect_left: the first bound >= v (a NaN: 0, as bisect_left)
        cdef Py_ssize_t lo = 0, hi = self._n, mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if self._bounds[mid] < v:
                lo = mid + 1
            else:
                hi = mid
        return lo

    cdef void _add(self, double d, double q, double s, long long qm, long long sm) noexcept:
        cdef Py_ssize_t width = self._n + 1
        self._requests += 1
        self._counts[self._index(d)] += 1
        self._counts[width + (self._index(q) if q else 0)] += 1
        self._counts[2 * width + (self._index(s) if s else 0)] += 1
        self._sums[0] += d
        self._sums[1] += q
        self._sums[2] += s
        if self.grpc:
            self._req_messages += qm
            self._resp_messages += sm

    def add(self, double duration_ms, double request_bytes, double response_bytes, long long request_messages=0,
            long long response_messages=0):
        """Count one request (bytes 0: the first bucket, as Istio's histogram of 0)."""
        self._add(duration_ms, request_bytes, response_bytes, request_messages, response_messages)

    def values(self):
        """See ``call_py.IstioSeries.values``."""
        cdef Py_ssize_t width = self._n + 1
        return (self._requests, [self._counts[i] for i in range(width)], self._sums[0],
                [self._counts[width + i] for i in range(width)], self._sums[1],
                [self._counts[2 * width + i] for i in range(width)], self._sums[2],
                self._req_messages, self._resp_messages)


cdef object _scan_request_py = _scan_request
cdef object _scan_response_py = _scan_response


cdef bint _bytes_lower_prefix(const unsigned char *data, const char *name, Py_ssize_t n) noexcept:
    """Whether the ``n`` bytes at ``data``, ASCII-lower-cased, are the lower-case ASCII ``name``
    (the caller owns ``n`` bytes at ``data``)."""
    cdef Py_ssize_t i
    cdef unsigned char c
    if memcmp(data, name, n) == 0:  # (the usual name: written lower-case)
        return True
    for i in range(n):
        c = data[i]
        if 65 <= c <= 90:
            c += 32
        if c != <unsigned char>name[i]:
            return False
    return True


cdef bint _ascii_lower_prefix(str k, const char *name, Py_ssize_t n) noexcept:
    """Whether ``k.lower()`` starts with the lower-case ASCII ``name`` of ``n`` characters
    (``len(k) >= n``), without the lowered copy: a non-ASCII character never lowers to one of
    ``name``'s characters except the Kelvin sign (to ``k``); one that lowers to several characters
    adds a combining mark no ASCII name has (no match)."""
    cdef Py_ssize_t i
    cdef unsigned int c  # (a code point as a number: Cython's Py_UCS4 arithmetic is a str's)
    if PyUnicode_KIND(k) == PyUnicode_1BYTE_KIND:  # ASCII or latin-1: bytes (>= 128: never a match)
        # (n <= len(k) bytes: in bounds)
        return _bytes_lower_prefix(<const unsigned char *>PyUnicode_DATA(k), name, n)
    for i in range(n):  # (i < n <= len(k), the caller's invariant: in bounds)
        c = <unsigned int>PyUnicode_READ_CHAR(k, i)
        if c >= 128:
            if c != 0x212A:
                return False
            c = 107  # KELVIN SIGN lowers to 'k'
        elif 65 <= c <= 90:
            c += 32
        if c != <unsigned int><unsigned char>name[i]:
            return False
    return True


cdef inline bint _ascii_lower_eq(str k, const char *name, Py_ssize_t n) noexcept:
    """``k.lower() == name`` for a lower-case ASCII ``name`` of ``n`` characters (no copy)."""
    return len(k) == n and _ascii_lower_prefix(k, name, n)


cdef bint _grpc_content_type(str v) noexcept:
    """``_outcome._is_grpc(v)`` without the lowered copy: ``application/grpc`` alone or followed by
    ``+`` or ``;``, in any ASCII case (see :func:`_ascii_lower_eq` for the non-ASCII rule)."""
    cdef Py_ssize_t n = len(v)
    cdef unsigned int c
    if n < 16:
        return False
    if n > 16:
        c = <unsigned int>PyUnicode_READ_CHAR(v, 16)  # (n > 16: in bounds)
        if c != 43 and c != 59:  # '+', ';'
            return False
    return _ascii_lower_prefix(v, b"application/grpc", 16)


cdef object _SCAN_IN_PYTHON = object()  # _request_pair: this pair needs the Python scan


cdef inline object _request_pair(object k, object v, bint *grpc):
    """One (name, value) of :func:`_request_length`: a content-length's value (counted),
    ``_SCAN_IN_PYTHON`` (a name that is not a str, a content-length whose ``int()`` may run the
    value's own code, a content-type or x-request-id that is not a str), else None. Runs no
    code of the headers' objects, so a fall back to the Python scan starts it afresh (and a dict
    changed during the scan raises there, as the pure twin's)."""
    if type(k) is not str:
        return _SCAN_IN_PYTHON
    cdef Py_ssize_t n = len(<str>k)
    if n == 14:
        if _ascii_lower_eq(<str>k, b"content-length", 14):
            if type(v) is not str and type(v) is not int and type(v) is not bytes and type(v) is not float:
                return _SCAN_IN_PYTHON  # (an __int__ / __index__ / __trunc__ of the value's: Python's walk)
            try:
                return _length(v)  # (outcome's rule: negative or >= 2**53 counts 0, as the pure twin)
            except (TypeError, ValueError, OverflowError):
                pass
    elif n == 12:
        if _ascii_lower_eq(<str>k, b"content-type", 12):
            if type(v) is not str:
                return _SCAN_IN_PYTHON
            grpc[0] = _grpc_content_type(<str>v)
        elif type(v) is not str and _ascii_lower_eq(<str>k, b"x-request-id", 12):
            return _SCAN_IN_PYTHON  # (the pure scan reads it as text: one it cannot ends the scan there)
    return None


cdef object _scan_in_python(object headers, bint *grpc):
    length, _, grpc[0] = _scan_request_py(headers)
    return length


cdef object _request_length(object headers, bint *grpc):
    """``outcome._scan_request``'s content-length (returned; 0 when absent) and gRPC content-type
    (``grpc``), in C for a list or tuple of str pairs or a dict of str keys; any other shape
    through the Python function. (A dict is walked with PyDict_Next: no item tuples.)"""
    cdef Py_ssize_t pos = 0
    cdef PyObject *pk
    cdef PyObject *pv
    cdef object length = 0, k, v
    grpc[0] = False
    if type(headers) is dict:
        while PyDict_Next(headers, &pos, &pk, &pv):
            k = <object>pk  # (owned references, though _request_pair runs no code of the dict's objects)
            v = <object>pv
            found = _request_pair(k, v, grpc)
            if found is _SCAN_IN_PYTHON:
                return _scan_in_python(headers, grpc)
            if found is not None:
                length = found
        return length
    if type(headers) is not list and type(headers) is not tuple:
        return _scan_in_python(headers, grpc)
    for pair in headers:
        if type(pair) is not tuple or len(<tuple>pair) != 2:
            return _scan_in_python(headers, grpc)
        found = _request_pair((<tuple>pair)[0], (<tuple>pair)[1], grpc)
        if found is _SCAN_IN_PYTHON:
            return _scan_in_python(headers, grpc)
        if found is not None:
            length = found
    return length


def request_facts(headers):
    """``(content-length or 0, whether the content-type is gRPC's)`` of a request's headers, as
    the Istio observer reads them (the pure twin: ``_outcome._scan_request``'s)."""
    cdef bint grpc = False
    length = _request_length(headers, &grpc)
    return length, grpc


# Istio's metadata exchange headers, lower-case (the pure twin's are ``exchange_py``'s;
# a test checks they are the same)
PEER_HEADER = "x-envoy-peer-metadata"
PEER_HEADER_ID = "x-envoy-peer-metadata-id"
cdef bytes _PEER_B = b"x-envoy-peer-metadata-id"  # the first 21 bytes are PEER_HEADER


cdef inline int _peer_name(object k) except -1:
    """1 for x-envoy-peer-metadata, 2 for x-envoy-peer-metadata-id (str or bytes-like, any case),
    0 for any other name."""
    cdef Py_ssize_t n
    cdef const unsigned char *want = <const unsigned char *><char *>_PEER_B
    if type(k) is bytes:
        n = len(<bytes>k)
        if n != 21 and n != 24:
            return 0
        if not _bytes_lower_prefix(<const unsigned char *><char *>(<bytes>k), <const char *>want, n):
            return 0
        return 1 if n == 21 else 2
    if type(k) is str:
        n = len(<str>k)
        if n != 21 and n != 24:
            return 0
        if not _ascii_lower_prefix(<str>k, <const char *>want, n):  # (n == len(k): in bounds)
            return 0
        return 1 if n == 21 else 2
    n = len(k)
    if n != 21 and n != 24:
        return 0
    if isinstance(k, str):
        lk = k.lower()  # (a str subclass: its own lower(), as the pure twin)
        return 1 if lk == PEER_HEADER else 2 if lk == PEER_HEADER_ID else 0
    lk = bytes(k).lower()
    if lk == _PEER_B[:21]:
        return 1
    return 2 if lk == _PEER_B else 0


def strip_peer_pairs(pairs):
    """``(pairs without the exchange headers, the x-envoy-peer-metadata value or None)`` of a
    response's header pairs (str or bytes names, any case; the value as str); the same object
    when it has neither."""
    cdef int which
    found = False
    for k, v in pairs:
        if _peer_name(k):
            found = True
            break
    if not found:
        return pairs, None
    kept = []
    value = None
    for k, v in pairs:
        which = _peer_name(k)
        if which == 1:
            if value is None:
                value = v if type(v) is str else _latin1(v)
        elif which == 0:
            kept.append((k, v))
    return kept, value


cdef inline str _latin1(object v):
    """A header value that is not a str: its bytes (bytes-like only; TypeError for anything else,
    an int included, which ``bytes()`` would take as a size) as latin-1."""
    if type(v) is bytes:
        return (<bytes>v).decode("latin-1")
    return memoryview(v).tobytes().decode("latin-1")


def note_response(attempt, response, nbytes, strip):
    """What an integration tells telemetry of an attempt's answer: ``attempt.telemetry`` (see
    ``RequestRecord``) with the body size ``nbytes``; with ``strip`` (Istio's metadata exchange on)
    the peer's x-envoy-peer-metadata(-id) pairs leave ``response.headers`` (a list of pairs, see
    :func:`strip_peer_pairs`) and the metadata value is told."""
    peer = None
    if strip:
        headers = response.headers
        kept, peer = strip_peer_pairs(headers)
        if kept is not headers:
            response.headers = kept
    info = {"peer_metadata": peer, "request_bytes": None, "response_bytes": nbytes}
    if type(attempt) is Attempt:
        (<Attempt>attempt).telemetry = info
    else:
        attempt.telemetry = info


cdef object _response_facts(object result, bint peers, double *length_out):
    """``outcome._scan_response`` in C: the body length (``length_out``) and, when ``peers``, the
    raw x-envoy-peer-metadata (returned; None without)."""
    d = getattr(result, "__dict__", None)
    if type(d) is dict:
        body = (<dict>d).get("_content")
        headers = (<dict>d).get("headers")
        if headers is None:
            headers = (<dict>d).get("_headers")  # httpx.Response
    elif d is not None:
        length, peer = _scan_response_py(result, peers)
        length_out[0] = length
        return peer
    else:
        body = getattr(result, "_content", None)
        headers = getattr(result, "headers", None)
    length = len(body) if isinstance(body, (bytes, bytearray)) else 0
    length_out[0] = length
    if headers is None or not (peers or not length):
        return None
    peer = None
    if type(headers) is dict:
        if not length:
            cl = (<dict>headers).get("content-length")
            if cl is not None:
                try:
                    length_out[0] = _length(cl)
                except (TypeError, ValueError, OverflowError):
                    return None
        if peers:
            peer = (<dict>headers).get("x-envoy-peer-metadata")
    else:
        get = getattr(headers, "get", None)
        if get is None:
            return None
        try:
            if not length:
                cl = get("content-length")
                if cl is not None:
                    length_out[0] = _length(cl)
            if peers:
                peer = get("x-envoy-peer-metadata")
        except (TypeError, ValueError, OverflowError):
            pass
    if isinstance(peer, bytes):
        peer = (<bytes>peer).decode("latin-1")
    return peer


cdef inline bint _only_attempt(Call call, Attempt attempt):
    """Whether ``call.attempts == [attempt]`` (the pure twin's test), without making the list:
    the first attempt kept aside, or the list made (``call.attempts`` read) holding it alone."""
    if call._attempts is None:
        return call._first is attempt
    return len(call._attempts) == 1 and call._attempts[0] is attempt


cdef inline dict _facts(object peer, long long messages):
    """An attempt's telemetry facts as the record path reads them (:meth:`IstioObserver.answered`)."""
    return {"peer_metadata": peer, "request_messages": messages, "response_messages": messages}


cdef enum:
    N_OBSERVER_SLOTS = 16  # power of two: a slot's index is masked with N_OBSERVER_SLOTS - 1


@cython.final
cdef class _ObserverSlot:
    """One remembered series of the observer: the identities it was found for. A hit needs the
    same route, cluster, endpoint, authority and retry policy objects (shared, immutable objects
    of one published configuration: the same identities give the same key) and an equal status
    and peer metadata value."""

    cdef object route, cluster, endpoint, authority, policy, peer, series
    cdef long long status
    cdef int grpc  # bit 0: a gRPC request (content-type); bit 1: grpc-status 0 (else none)


cdef inline bint _same_peer(object kept, object peer):
    """Whether two raw peer-metadata values make the same key (``peer or None``: empty is none)."""
    if kept is None:
        return peer is None or (type(peer) is str and not peer)
    if kept is peer:
        return True
    return type(peer) is str and type(kept) is str and <str>kept == <str>peer


@cython.final
cdef class IstioObserver:
    """The Istio sink's fast path (see ``call_py.IstioObserver``), reading the compiled Call and
    Attempt's fields directly. On top of the twin's ``keys`` dict it remembers the last series of
    each of ``N_OBSERVER_SLOTS`` (endpoint, status) slots by identity (``_ObserverSlot``), which
    spares the usual request the key tuple, its hash and its comparison; :meth:`clear` forgets
    both (the slots never outlive the keys they were filled from)."""

    cdef public dict keys
    cdef public bint peers
    cdef public double until
    cdef public object miss
    cdef list _slots  # N_OBSERVER_SLOTS _ObserverSlot objects, made once, filled in place

    def __init__(self, miss):
        self.keys = {}
        self.peers = False
        self.until = 0.0
        self.miss = miss
        self._slots = [_ObserverSlot() for _ in range(N_OBSERVER_SLOTS)]

    def clear(self):
        """Forget every key (and remembered slot): labels are computed again from the next call."""
        cdef _ObserverSlot slot
        self.keys.clear()
        for slot in self._slots:
            slot.endpoint = slot.route = slot.cluster = slot.authority = slot.policy = slot.peer = None
            slot.series = None

    def __call__(self, call, result):
        return self.observe(call, result)

    cpdef bint observe(self, object call, object result) except -1:
        """``observer(call, result)``: counted (True) or not the usual answer (False)."""
        cdef Call c
        cdef Attempt a
        cdef object peer = None
        cdef double resp_len = 0.0
        cdef long long req_messages = 0, resp_messages = 0
        if type(call) is not Call:
            return False
        c = <Call>call
        if c.fault_decision is not None:
            return False
        if c._attempts is not None:
            if not c._attempts:
                return False
            a = <Attempt>(c._attempts[-1])
        elif c._first is not None:
            a = c._first
        else:
            return False
        status = a.status
        grpc_status = a.grpc_status  # (an OK gRPC answer, grpc-status 0, is a usual answer too)
        if a.error is not None or not PyLong_Check(status) or (grpc_status is not None and (
                type(grpc_status) is not int or grpc_status != 0)):
            return False
        req_bytes = None
        info = a.telemetry
        if info is not None:
            if type(info) is not dict:
                return False
            peer = (<dict>info).get("peer_metadata")
            req_bytes = (<dict>info).get("request_bytes")
            resp_bytes = (<dict>info).get("response_bytes") or 0
            messages = (<dict>info).get("request_messages", 0)
            if messages is not None and messages != 0:
                if type(messages) is not int or messages != 1:
                    return False  # (a stream's counts: the record path)
                req_messages = 1
            messages = (<dict>info).get("response_messages", 0)
            if messages is not None and messages != 0:
                if type(messages) is not int or messages != 1:
                    return False
                resp_messages = 1
        elif result is not None:
            peer = _response_facts(result, self.peers, &resp_len)
            resp_bytes = resp_len
        else:
            resp_bytes = 0
        return self._count(c, a, status, grpc_status, result, peer, req_bytes, resp_bytes, req_messages,
                           resp_messages, False)

    def answered(self, Call call not None, Attempt attempt not None, status, grpc_status, result, peer,
                 long long messages):
        """A first attempt's answer, for an integration's own router path: ``attempt.finish_final
        (status, grpc_status)``, and the call counted if that ends it, with the attempt's facts
        given here (``peer``: the peer's raw metadata; ``messages``: request and response
        messages, 1 for a unary gRPC call (whose request headers are then taken to be gRPC's, with
        no content-length: not scanned), 0 for HTTP) instead of in ``attempt.telemetry``. 0: not
        final (the retry decision is the caller's); 1: final and counted; 2: final, not counted
        (the caller reports it through the record, ``report(..., observed=True)``); 3: as 2, the
        observer raised. Whenever the call is not counted here (0, 2, 3, and a key not known
        yet, counted through the record), the facts are on ``attempt.telemetry``, as the record
        path reads them."""
        cdef bint final = attempt.finish_final(status, grpc_status)
        if final and attempt._policy is call.retry_policy and _only_attempt(call, attempt) \
                and call.fault_decision is None and attempt.error is None and PyLong_Check(status) and (
                    grpc_status is None or (type(grpc_status) is int and grpc_status == 0)) and (
                    messages == 0 or messages == 1):
            try:
                if self._count(call, attempt, status, grpc_status, result, peer, None, 0, messages, messages, True):
                    return 1
            except Exception:  # (telemetry never fails a request: the record path, with the facts)
                if attempt.telemetry is None:
                    attempt.telemetry = _facts(peer, messages)
                return 3
        if attempt.telemetry is None:
            attempt.telemetry = _facts(peer, messages)
        return 2 if final else 0

    cdef bint _count(self, Call c, Attempt a, object status, object grpc_status, object result, object peer,
                     object req_bytes, object resp_bytes, long long req_messages, long long resp_messages,
                     bint facts) except -1:
        """:meth:`observe` once the attempt's facts are known (``facts``: given by :meth:`answered`,
        not on the attempt yet: put there before a miss, which reads them as the record does)."""
        cdef _ObserverSlot slot
        cdef long long s
        cdef bint grpc = False
        cdef int grpc_code
        if facts and req_messages:  # a gRPC call's facts (answered): its headers are gRPC's, no content-length
            grpc = True
        else:
            headers = c.headers
            if headers:
                length = _request_length(headers, &grpc)
                if req_bytes is None:
                    req_bytes = length
        grpc_code = (0 if grpc_status is None else 2) | (1 if grpc else 0)  # (both make the key: see the slot)
        s = _status_index(status)
        endpoint = a.endpoint
        policy = c.retry_policy
        slot = None
        if s >= 0 and not c.started > self.until:
            # (the slot index mixes the endpoint's address with the status; any collision only
            # costs the key lookup below)
            slot = <_ObserverSlot>self._slots[((<Py_ssize_t><void *>endpoint >> 4) ^ s) & (N_OBSERVER_SLOTS - 1)]
            if slot.endpoint is endpoint and slot.status == s and slot.route is c.route and \
                    slot.cluster is c.cluster and slot.authority is c.authority and slot.policy is policy and \
                    slot.grpc == grpc_code and _same_peer(slot.peer, peer) and slot.series is not None:
                (<IstioSeries>slot.series)._add((monotonic() - c.started) * 1000.0, req_bytes or 0, resp_bytes,
                                                req_messages, resp_messages)
                return True
        if policy is not None:  # (a slot is filled only for a status its policy did not retry)
            if type(policy) is not _RetryPolicy:
                return False
            compiled = _slot_get(&_RP_COMPILED, policy, "compiled")
            if compiled is None or s < 0 or s >= 409 or status in _slot_get(&_RC_STATUS_CODES, compiled,
                                                                               "status_codes"):
                return False
        key = (_slot_get(&_RM_ROUTE_NAME, c.route, "route_name"), c.cluster, _slot_get(&_EP_KEY, endpoint, "key"),
               c.authority, status, peer or None, grpc_status, grpc)
        series = self.keys.get(key)
        if series is None or c.started > self.until:
            if facts:
                a.telemetry = _facts(peer, req_messages)
            self.miss(c, result, key)
            return True
        (<IstioSeries?>series)._add((monotonic() - c.started) * 1000.0, req_bytes or 0, resp_bytes, req_messages,
                                    resp_messages)
        if slot is not None and (peer is None or type(peer) is str):
            # (the series last: dropping an old field's value may run Python code, and another
            # thread must never find a half-filled slot with a series)
            slot.series = None
            slot.endpoint, slot.status, slot.route, slot.cluster = endpoint, s, c.route, c.cluster
            slot.authority, slot.policy, slot.peer = c.authority, policy, peer or None
            slot.grpc = grpc_code
            slot.series = series
        return True
