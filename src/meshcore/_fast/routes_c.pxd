# The compiled RouteTable's layout, shared with the request path (call_c cimports it to call
# match_c without Python argument parsing).

cimport cython
from libc.stdint cimport uint64_t


@cython.final
cdef class RouteTable:
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
    # header-less requests' static matches, authority -> path -> (method, scheme, RouteMatch);
    # None when a route has a runtime_fraction (a match could then depend on the random draw)
    cdef dict _plain
    cdef Py_ssize_t _plain_n       # matches kept in _plain since it was last emptied
    cdef object __weakref__

    cdef Py_ssize_t _find_vhost(self, object authority, object headers, object path, object method,
                                object scheme) except -2
    cdef object match_c(self, object authority, object path, object headers, object method, object scheme,
                        object random_value, object source_ip)
