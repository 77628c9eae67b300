"""The demo's terminal report: headings, progress, share tables and checks (plain text).

Colour (ANSI) only when the stream is a terminal and ``NO_COLOR`` is unset. Progress counters
redraw in place on a terminal and are printed once when done otherwise. A :class:`Reporter`
created with ``quiet=True`` prints nothing (``meshcore demo --json``).
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any, Dict, Mapping, Optional, Sequence

__all__ = ["Reporter", "Progress"]

_CODES = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "blue": "34", "cyan": "36"}


def _use_colour(stream: IO[str]) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Progress:
    """A request counter for one step: ``update(n)`` while running, ``done(note)`` at the end."""

    def __init__(self, reporter: "Reporter", label: str, total: Optional[int]) -> None:
        self._r = reporter
        self.label = label
        self.total = total
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False

    def update(self, n: int) -> None:
        r = self._r
        if r.quiet or not r.tty:
            return
        now = time.monotonic()
        if now - self._last_draw < 0.05:
            return
        self._last_draw = now
        of = f"/{self.total}" if self.total else ""
        r.write(f"\r   {self.label} {r.paint(f'{n}{of}', 'cyan')} ", end="")
        self._drawn = True

    def done(self, note: str = "") -> float:
        """Finish the line; returns the elapsed seconds."""
        elapsed = time.monotonic() - self.started
        r = self._r
        if not r.quiet:
            prefix = "\r" if self._drawn else ""
            tail = f" {note}" if note else ""
            r.write(f"{prefix}   {self.label}{tail} {r.paint(f'({elapsed:.2f} s)', 'dim')}\x1b[K"
                    if r.tty else f"   {self.label}{tail} ({elapsed:.2f} s)")
        return elapsed


class Reporter:
    """Writes the human report to ``stream`` (default stdout)."""

    def __init__(self, stream: Optional[IO[str]] = None, quiet: bool = False, colour: Optional[bool] = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.quiet = quiet
        self.tty = _use_colour(self.stream) if colour is None else colour
        self.failed_checks = 0

    def paint(self, text: str, *styles: str) -> str:
        if not self.tty or not styles:
            return text
        codes = ";".join(_CODES[s] for s in styles)
        return f"\x1b[{codes}m{text}\x1b[0m"

    def write(self, text: str = "", end: str = "\n") -> None:
        if not self.quiet:
            self.stream.write(text + end)
            self.stream.flush()

    def title(self, text: str) -> None:
        self.write(self.paint(text, "bold"))
        self.write()

    def heading(self, number: int, text: str, detail: str = "") -> None:
        self.write()
        self.write(self.paint(f"{number}. {text}", "bold", "blue"))
        if detail:
            self.write(f"   {self.paint(detail, 'dim')}")

    def line(self, text: str) -> None:
        self.write(f"   {text}")

    def kv(self, rows: Sequence[Sequence[str]]) -> None:
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            self.write(f"  {self.paint(k.ljust(width), 'dim')}  {v}")

    def progress(self, label: str, total: Optional[int] = None) -> Progress:
        return Progress(self, label, total)

    def shares(self, counts: Mapping[str, int], notes: Optional[Mapping[str, str]] = None,
               total: Optional[int] = None) -> None:
        """One row per key: count, share and a bar (keys in the given order)."""
        if not counts:
            return
        total = total if total is not None else sum(counts.values())
        width = max(len(k) for k in counts)
        for key, n in counts.items():
            share = n / total if total else 0.0
            bar = "#" * round(30 * share)
            note = f"  {self.paint(notes[key], 'dim')}" if notes and key in notes else ""
            self.write(f"     {key.ljust(width)}  {n:5d}  {share:6.1%}  {self.paint(bar, 'cyan')}{note}")

    def check(self, ok: bool, text: str) -> bool:
        """A pass/fail line; failures are counted."""
        if not ok:
            self.failed_checks += 1
        mark = self.paint("ok  ", "green") if ok else self.paint("FAIL", "red", "bold")
        self.write(f"   [{mark}] {text}")
        return ok

    def stats(self, cluster: str, snapshot: Mapping[str, Any], names: Sequence[str]) -> None:
        """Selected counters of one cluster from ``mesh.stats()``."""
        shown: Dict[str, Any] = {n: snapshot.get(n, 0) for n in names}
        text = "  ".join(f"{n}={v}" for n, v in shown.items())
        self.write(f"   {self.paint('stats', 'dim')} {cluster}: {text}")
