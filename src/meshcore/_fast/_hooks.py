"""Where the layers above plug in what the request path calls of theirs.

``_fast`` imports nothing from the layers above it, but the request path (``call_c`` /
``call_py``) calls into them: the router loop of ``meshcore.lifecycle``, the retry state and
fault decisions of ``meshcore.resilience``, the router headers, the telemetry of a refused
request, and the aggregate balancer type of ``meshcore.xds.snapshot``. Each of those modules
calls :func:`register` for its entries when it is imported; each twin calls :func:`subscribe`
when it is imported, and gets every entry registered before or after, stored in its module
globals (a request reads a global, as when the twins imported them). ``meshcore.mesh`` imports
every registering module and checks with :func:`require` that nothing is missing, so every
entry is in place before a ``Mesh`` can be built. Until its registration, an entry is an
:class:`Unregistered` placeholder that raises a ``RuntimeError`` naming what to import.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

__all__ = ["NAMES", "Unregistered", "missing", "placeholders", "register", "require", "subscribe"]

#: entry name -> the module that registers it
NAMES: Dict[str, str] = {
    "run": "meshcore.lifecycle",
    "run_async": "meshcore.lifecycle",
    "run_reported": "meshcore.lifecycle",
    "run_async_reported": "meshcore.lifecycle",
    "report_single": "meshcore.lifecycle",
    "begin_single": "meshcore.lifecycle",
    "fault_filter_for": "meshcore.lifecycle",
    "fault_decision": "meshcore.lifecycle",
    "fault_step": "meshcore.lifecycle",
    "final_answer": "meshcore.lifecycle",
    "NO_FAULT": "meshcore.resilience.fault",
    "FaultDecision": "meshcore.resilience.fault",
    "RetryState": "meshcore.resilience.retry",
    "router_headers_of": "meshcore.resilience.router_headers",
    "is_internal_request": "meshcore.resilience.router_headers",
    "apply_router_headers": "meshcore.resilience.router_headers",
    "report_refusal": "meshcore.telemetry.outcome",
    "AggregateBalancer": "meshcore.xds.snapshot",
}

_ENTRIES: Dict[str, Any] = {}
_SUBSCRIBERS: List[Callable[[Dict[str, Any]], None]] = []


class Unregistered:
    """What an entry is until its module registers it: calling it (or reading an attribute)
    raises a ``RuntimeError``; it is the type of nothing (``type(x) is entry`` is false)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def _error(self) -> RuntimeError:
        owner = NAMES.get(self.name, "the layer above")
        return RuntimeError(f"meshcore._fast: {self.name} is not registered yet: import {owner} "
                            "(importing meshcore.mesh registers every entry) before using the request path")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise self._error()

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise self._error()

    def __repr__(self) -> str:
        return f"<unregistered {self.name}>"


def placeholders() -> Dict[str, Any]:
    """An :class:`Unregistered` placeholder for every entry (a twin's globals before registration)."""
    return {name: Unregistered(name) for name in NAMES}


def register(**entries: Any) -> None:
    """Make each keyword the entry of its name, in every twin imported now or later (the last
    registration wins). Unknown names raise ``ValueError``."""
    unknown = sorted(set(entries) - set(NAMES))
    if unknown:
        raise ValueError(f"unknown request-path entries {unknown}; expected some of {sorted(NAMES)}")
    _ENTRIES.update(entries)
    for install in _SUBSCRIBERS:
        install(dict(entries))


def subscribe(install: Callable[[Dict[str, Any]], None]) -> None:
    """Call ``install`` with every entry registered so far, and again with each later registration."""
    _SUBSCRIBERS.append(install)
    install(dict(_ENTRIES))


def missing() -> List[str]:
    """The entries nothing has registered yet."""
    return [name for name in NAMES if name not in _ENTRIES]


def require(who: str) -> None:
    """Raise ``ImportError`` if an entry is missing (``who`` needs them all)."""
    gone = missing()
    if gone:
        owners = sorted({NAMES[n] for n in gone})
        raise ImportError(f"{who}: request-path entries {gone} are not registered (import {', '.join(owners)})")
