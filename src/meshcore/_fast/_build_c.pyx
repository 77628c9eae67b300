# cython: language_level=3
# The compiled twin of ``_build``: the very same source, compiled, so both twins partition
# host sets identically by construction. Edit ``_build.py``, never this file.
include "_build.py"
