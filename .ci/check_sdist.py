"""Check an sdist against the source tree it was built from: it carries every source and build
input (Python, Cython .pyx/.pxd, C headers, the Cython pin, LICENSE, README, the tests) and no
generated C or built extension.

Usage: python check_sdist.py SDIST.tar.gz [SOURCE_TREE]   (tree defaults to this repository)
"""

from __future__ import annotations

import os
import sys
import tarfile
from pathlib import Path

TOP_LEVEL = ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "requirements/cython.txt",
             ".ci/check_sdist.py", ".ci/check_wheel.py")  # the last two: tests/test_package.py loads them
SOURCE_SUFFIXES = (".py", ".pyi", ".pyx", ".pxd", ".h")
GENERATED = (".c", ".so", ".pyd", ".dll", ".dylib", ".o", ".obj", ".html", ".pyc")


def sdist_members(path: str) -> set:
    """Paths inside the sdist, relative to its top folder (``meshcore_xds-0.1.0/``)."""
    with tarfile.open(path) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    root = names[0].split("/")[0]
    return {n[len(root) + 1:] for n in names if n.startswith(root + "/")}


def tree_sources(tree: Path) -> set:
    """Package sources in the tree: every .py/.pyi/.pyx/.pxd/.h and py.typed under src/."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(tree / "src"):
        dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.endswith(".egg-info")]
        for f in filenames:
            if f.endswith(SOURCE_SUFFIXES) or f == "py.typed":
                out.add((Path(dirpath) / f).relative_to(tree).as_posix())
    return out


def problems(members: set, tree: Path) -> list:
    need = sorted(set(TOP_LEVEL) | tree_sources(tree) | {"tests/conftest.py"})
    out = [f"missing: {r}" for r in need if r not in members]
    out += [f"generated file: {r}" for r in sorted(members) if r.endswith(GENERATED)]
    if not any(r.endswith(".pyx") for r in members):
        out.append("no Cython sources at all")
    return out


def main(argv: list) -> int:
    sdist = argv[0]
    tree = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent
    members = sdist_members(sdist)
    found = problems(members, tree)
    for p in found:
        print(f"check_sdist: {p}", file=sys.stderr)
    cython = sorted(r.rsplit("/", 1)[1] for r in members if r.endswith((".pyx", ".pxd", ".h")))
    print(f"check_sdist: {os.path.basename(sdist)}: {len(members)} files, build inputs {' '.join(cython)}: "
          f"{'FAIL' if found else 'ok'}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
