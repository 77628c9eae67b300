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


# Hot arrays (the per-pick data of large tables): anonymous mappings starting on a 2 MiB
# boundary with transparent huge pages requested, so a random pick into them costs no TLB
# walk for every whole 2 MiB they span (the tail uses normal pages: no memory is added).
# Reported to tracemalloc (domain MESHCORE_HOT_DOMAIN) like any other allocation. Arrays
# under 2 MiB, and platforms without mmap, use PyMem_Malloc. Zero-filled either way.
cdef extern from *:
    """
    #include <string.h>
    #if defined(__linux__)
    #include <sys/mman.h>
    #include <unistd.h>
    #define MESHCORE_HOT_MMAP 1
    #else
    #define MESHCORE_HOT_MMAP 0
    #endif
    #define MESHCORE_HOT_DOMAIN 0x6d657368u
    #define MESHCORE_HOT_ALIGN ((size_t)2 << 20)

    static inline void* meshcore_hot_alloc(size_t size) {
    #if MESHCORE_HOT_MMAP
        if (size >= MESHCORE_HOT_ALIGN) {
            size_t page = (size_t)sysconf(_SC_PAGESIZE);
            size_t real = (size + page - 1) & ~(page - 1);
            size_t span = real + MESHCORE_HOT_ALIGN;
            char* raw = (char*)mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            char* p;
            if (raw == (char*)MAP_FAILED) return NULL;
            p = (char*)(((size_t)raw + MESHCORE_HOT_ALIGN - 1) & ~(MESHCORE_HOT_ALIGN - 1));
            if (p > raw) munmap(raw, (size_t)(p - raw));
            if (raw + span > p + real) munmap(p + real, (size_t)(raw + span - (p + real)));
    #ifdef MADV_HUGEPAGE
            madvise(p, real, MADV_HUGEPAGE);
    #endif
            PyTraceMalloc_Track(MESHCORE_HOT_DOMAIN, (uintptr_t)p, size);
            return p;
        }
    #endif
        {
            void* q = PyMem_Malloc(size ? size : 1);
            if (q) memset(q, 0, size ? size : 1);
            return q;
        }
    }

    static inline void meshcore_hot_free(void* p, size_t size) {
        if (p == NULL) return;
    #if MESHCORE_HOT_MMAP
        if (size >= MESHCORE_HOT_ALIGN) {
            size_t page = (size_t)sysconf(_SC_PAGESIZE);
            PyTraceMalloc_Untrack(MESHCORE_HOT_DOMAIN, (uintptr_t)p);
            munmap(p, (size + page - 1) & ~(page - 1));
            return;
        }
    #endif
        PyMem_Free(p);
    }
    """
    void* meshcore_hot_alloc(size_t size) noexcept nogil
    void meshcore_hot_free(void* p, size_t size) noexcept nogil


cdef inline void* hot_alloc(size_t size) except NULL:
    """meshcore_hot_alloc or MemoryError; free with meshcore_hot_free(p, the same size)."""
    cdef void* p = meshcore_hot_alloc(size)
    if p == NULL:
        raise MemoryError()
    return p


cdef inline uint64_t splitmix_at(uint64_t state) noexcept nogil:
    """The output splitmix_next gives when it advances the state to ``state`` (no state)."""
    cdef uint64_t z = state
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)


# Cache prefetch hints (no-ops where the compiler has none). A prefetch never faults, so
# any address may be given; a wrong guess costs a little bandwidth, never correctness.
# The empty volatile asm is what keeps them: GCC does not count __builtin_prefetch as a side
# effect, so a function that only prefetches (_look_ahead_random) was found pure and its
# calls deleted (-O3, GCC 12), prefetches and all.
cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define meshcore_prefetch_w(p) \\
        do { const void* meshcore_pf_ = (const void*)(p); __builtin_prefetch(meshcore_pf_, 1, 3); \\
             __asm__ __volatile__("" : : "r"(meshcore_pf_)); } while (0)
    #define meshcore_prefetch_r(p) \\
        do { const void* meshcore_pf_ = (const void*)(p); __builtin_prefetch(meshcore_pf_, 0, 3); \\
             __asm__ __volatile__("" : : "r"(meshcore_pf_)); } while (0)
    #else
    #define meshcore_prefetch_w(p) ((void)(p))
    #define meshcore_prefetch_r(p) ((void)(p))
    #endif
    """
    void prefetch_w "meshcore_prefetch_w"(const void* p) noexcept nogil
    void prefetch_r "meshcore_prefetch_r"(const void* p) noexcept nogil
