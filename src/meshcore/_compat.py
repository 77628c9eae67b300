"""The one place the ``MESHCORE_NO_EXTENSIONS`` switch is read."""

from __future__ import annotations

import os
import sys

#: Any non-empty value of ``MESHCORE_NO_EXTENSIONS`` selects the pure-Python twins.
NO_EXTENSIONS: bool = bool(os.environ.get("MESHCORE_NO_EXTENSIONS"))
#: The compiled core is used only on CPython and only when not switched off.
USE_EXTENSIONS: bool = not NO_EXTENSIONS and sys.implementation.name == "cpython"
