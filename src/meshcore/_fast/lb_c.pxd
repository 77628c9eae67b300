# Entry points of the compiled LoadBalancer for the compiled request path (call_c): pick and
# release without a Python-level call. The caller checks ``type(lb) is LoadBalancer`` first.

cdef object lb_pick(object lb, object hash)
cdef object lb_release(object lb, object endpoint)
