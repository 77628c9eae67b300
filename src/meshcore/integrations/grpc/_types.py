"""Type aliases shared by the gRPC integration modules."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

Metadata = Optional[Sequence[Tuple[str, Any]]]
Options = Sequence[Tuple[str, Any]]
