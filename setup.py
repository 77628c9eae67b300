"""Build the compiled core. Everything else lives in pyproject.toml.

MESHCORE_NO_EXTENSIONS=1: pure-Python install (also forced off CPython).
MESHCORE_DEBUG_BUILD=1: -O0 -g3, bounds checks asserted via MESHCORE_DEBUG.
MESHCORE_CYTHON_TRACE=1: line tracing for coverage. MESHCORE_CYTHON_ANNOTATE=1: HTML.
"""

import os
import sys

from setuptools import Extension, setup

NO_EXTENSIONS = bool(os.environ.get("MESHCORE_NO_EXTENSIONS")) or sys.implementation.name != "cpython"
DEBUG = bool(os.environ.get("MESHCORE_DEBUG_BUILD"))
TRACE = bool(os.environ.get("MESHCORE_CYTHON_TRACE"))
MODULES = ("lb_c", "_build_c", "routes_c", "call_c")


def extensions():
    from Cython.Build import cythonize

    macros = [("MESHCORE_DEBUG", "1")] if DEBUG else []
    if TRACE:  # the directive and the macros together, or linetrace does nothing
        macros += [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")]
    if os.name == "nt":
        cflags = []
    elif DEBUG:
        cflags = ["-O0", "-g3", "-UNDEBUG"]
    else:
        cflags = ["-O3", "-DNDEBUG"]
    exts = [
        Extension(
            f"meshcore._fast.{name}",
            [f"src/meshcore/_fast/{name}.pyx"],
            include_dirs=["src/meshcore/_fast"],
            define_macros=macros,
            extra_compile_args=cflags,
        )
        for name in MODULES
    ]
    return cythonize(
        exts,
        annotate=bool(os.environ.get("MESHCORE_CYTHON_ANNOTATE")),
        compiler_directives={"language_level": 3, "embedsignature": True, "linetrace": TRACE},
    )


print("* Pure-Python build *" if NO_EXTENSIONS else "* Accelerated build *", file=sys.stderr)
setup(ext_modules=[] if NO_EXTENSIONS else extensions())
