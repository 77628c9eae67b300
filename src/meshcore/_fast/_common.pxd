# Small C helpers shared by the compiled twins (inline, so each module gets its own copy).

from cpython.mem cimport PyMem_Malloc
from libc.stdint cimport uint64_t
from libc.string cimport memcmp, memset

cdef extern from "stdlib.h":
    void qsort(void* base, size_t nmemb, size_t size,
               int (*compar)(const void*, const void*) noexcept nogil) nogil


cdef inline uint64_t splitmix_next(uint64_t* state) noexcept nogil:
    """SplitMix64 (Steele, Lea, Flood 2014): one step of the generator in *state."""
    state[0] += 0x9E3779B97F4A7C15ULL
    cdef uint64_t z = state[0]
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef inline void* zalloc(size_t size) except NULL:
    """PyMem_Malloc of at least one byte, zero-filled; MemoryError on failure."""
    cdef void* p = PyMem_Malloc(size if size > 0 else 1)
    if p == NULL:
        raise MemoryError()
    memset(p, 0, size if size > 0 else 1)
    return p


cdef inline int bytes_cmp(const char* a, Py_ssize_t a_len, const char* b, Py_ssize_t b_len) noexcept nogil:
    """Python's bytes ordering: memcmp over the common length, then the shorter first."""
    cdef Py_ssize_t n = a_len if a_len < b_len else b_len
    cdef int r = memcmp(a, b, n)
    if r != 0:
        return r
    if a_len != b_len:
        return -1 if a_len < b_len else 1
    return 0
