"""Which versions of merv_fast's dependencies are installed, and what changed since a known-good set.

CI installs the newest release of every dependency on every run, so the project can break with no commit of ours
(transformers 5.25 began importing a package named `kernels`). This module names such a cause at once:

    python -m merv_fast.dependencies                        # merv-fast's requirements and their installed versions
    python -m merv_fast.dependencies --diff .ci/known-good.txt   # every installed distribution that differs

`.ci/run` prints the difference against `.ci/known-good.txt` (the `pip freeze` of the last green run) before the
tests and again when any step fails; `merv-fast env` and the test session's header start with the versions.
Standard library only, and nothing of merv_fast beyond its package's `__init__`: it works when torch itself does not
import.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import sys
from pathlib import Path

DISTRIBUTION = "merv-fast"
PACKAGING_TOOLS = {"pip", "setuptools", "wheel"}  # `pip freeze` leaves them out


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """Every installed distribution -> version (canonical names), like `pip freeze`."""
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(_canonical(name), dist.version)
    return found


def _declared() -> list[tuple[str, str | None]]:
    """(canonical name, the extra that asks for it or None) for each declared requirement, in declaration order;
    what the package itself names when it is not installed (a source tree on sys.path): torch and transformers."""
    try:
        requires = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return [("torch", None), ("transformers", None)]
    declared = []
    for line in requires:
        name = _canonical(re.split(r"[\s;<>=!~\[(]", line.strip(), maxsplit=1)[0])
        extra = re.search(r"extra\s*==\s*[\"']([^\"']+)[\"']", line)
        if name:
            declared.append((name, extra.group(1) if extra else None))
    return declared


def requirement_names(extras: tuple[str, ...] | None = None) -> list[str]:
    """merv-fast's declared requirements (canonical names, each once): every extra's, or with `extras` the core ones
    and those extras' only."""
    names = []
    for name, extra in _declared():
        if (extras is None or extra is None or extra in extras) and name not in names:
            names.append(name)
    return names


def requirement_versions() -> dict[str, str | None]:
    """Each requirement -> its installed version (None: not installed, e.g. an extra that was not asked for)."""
    have = installed()
    return {name: have.get(name) for name in requirement_names()}


def test_setup_problem(have: dict[str, str] | None = None) -> str | None:
    """Why this Python cannot run the tests (merv-fast or one of its core requirements not installed in it), in one
    message that says what to do; None when it can. `have`: the installed distributions (default: this Python's).
    The extras' packages are not required: the tests that need one skip without it (a GPU machine's image may lack
    decord or kernels and still runs the GPU tests)."""
    have = installed() if have is None else have
    missing = [n for n in [_canonical(DISTRIBUTION), *requirement_names(extras=())] if n not in have]
    if not missing:
        return None
    return (f"the tests need merv-fast and its requirements installed in the Python that runs them "
            f"({sys.executable}), which lacks: {', '.join(missing)}. Install them from the checkout's root with "
            f"README.md's quick start, `pip install torch==2.13.0 && pip install --no-build-isolation -e "
            f"\".[test,video]\"` (skip the torch install where torch is there), in a virtual environment, and run "
            f"`python -m pytest -q -x tests bench` with that environment's Python")


def format_versions(versions: dict[str, str | None]) -> str:
    return ", ".join(f"{name} {version or '(not installed)'}" for name, version in versions.items())


def read_freeze(path: str | Path) -> dict[str, str]:
    """A `pip freeze` file -> {canonical name: version}; lines that are not `name==version` are skipped."""
    pinned = {}
    for line in Path(path).read_text().splitlines():
        match = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)", line)
        if match:
            pinned[_canonical(match.group(1))] = match.group(2)
    return pinned


def diff(known: dict[str, str], now: dict[str, str]) -> list[str]:
    """One line per distribution that is new, gone or at another version, sorted by name."""
    lines = []
    for name in sorted(set(known) | set(now)):
        before, after = known.get(name), now.get(name)
        if before == after or name == _canonical(DISTRIBUTION) or name in PACKAGING_TOOLS:
            continue
        if before is None:
            lines.append(f"+ {name} {after} (new since the known-good set)")
        elif after is None:
            lines.append(f"- {name} {before} (no longer installed)")
        else:
            lines.append(f"~ {name} {before} -> {after}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m merv_fast.dependencies", description=__doc__.splitlines()[0])
    parser.add_argument("--diff", metavar="FREEZE.txt", help="list what differs from this `pip freeze` file")
    args = parser.parse_args(argv)
    print(f"merv-fast requirements: {format_versions(requirement_versions())}")
    if args.diff and not Path(args.diff).is_file():
        print(f"no known-good set at {args.diff}: nothing to compare with")
    elif args.diff:
        changes = diff(read_freeze(args.diff), installed())
        print(f"installed distributions that differ from {args.diff}: "
              + (f"{len(changes)}" if changes else "none"))
        for line in changes:
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
