"""Check a built wheel: named meshcore-xds, one compiled module per extension setup.py builds, no
generated C, and (Linux) manylinux-repairable: ``auditwheel show --json`` must find no external
shared library beyond the system ones a manylinux/musllinux policy allows.

Usage: python check_wheel.py WHEEL [SOURCE_TREE]   (needs auditwheel on PATH on Linux)
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import zipfile
from email.parser import HeaderParser
from pathlib import Path

DIST_NAME = "meshcore-xds"
EXT_SUFFIXES = (".so", ".pyd")


def extension_modules(tree: Path) -> tuple:
    """The MODULES tuple of setup.py (a literal), without running setup.py."""
    for node in ast.parse((tree / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MODULES" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise SystemExit("check_wheel: no MODULES in setup.py")


def wheel_problems(names: list, metadata: str, modules: tuple) -> list:
    out = []
    meta = HeaderParser().parsestr(metadata)
    if meta["Name"] != DIST_NAME:
        out.append(f"distribution name {meta['Name']!r}, expected {DIST_NAME!r}")
    for m in modules:
        prefix = f"meshcore/_fast/{m}."
        if not any(n.startswith(prefix) and n.endswith(EXT_SUFFIXES) for n in names):
            out.append(f"no compiled module for {m}")
    out += [f"generated C in the wheel: {n}" for n in names if n.endswith(".c")]
    return out


def auditwheel_problems(report: dict) -> list:
    """What keeps the wheel from being repaired to a manylinux/musllinux tag."""
    out = []
    if report.get("pure"):
        out.append("auditwheel sees a pure-Python wheel: the compiled core is missing")
    tag = report.get("overall_tag", "")
    if not tag.startswith(("manylinux", "musllinux")):
        out.append(f"no manylinux/musllinux policy fits (overall tag {tag!r})")
    if report.get("external_libs"):
        out.append(f"links shared libraries outside the policy: {sorted(report['external_libs'])}")
    return out


def main(argv: list) -> int:
    wheel = argv[0]
    tree = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    found = wheel_problems(names, metadata, extension_modules(tree))
    tag = "-"
    if sys.platform.startswith("linux"):
        proc = subprocess.run(["auditwheel", "show", "--json", wheel], capture_output=True, text=True)
        if proc.returncode != 0:
            found.append(f"auditwheel show failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        else:
            report = json.loads(proc.stdout)
            found += auditwheel_problems(report)
            tag = report.get("overall_tag", "?")
    for p in found:
        print(f"check_wheel: {p}", file=sys.stderr)
    print(f"check_wheel: {os.path.basename(wheel)}: {len(names)} files, repairable to {tag}: "
          f"{'FAIL' if found else 'ok'}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
