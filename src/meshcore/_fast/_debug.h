/* MESHCORE_DEBUG is 1 in debug builds (MESHCORE_DEBUG_BUILD=1): invariants that
   boundscheck(False) relies on are then asserted. */
#ifndef MESHCORE_DEBUG
#define MESHCORE_DEBUG 0
#endif
