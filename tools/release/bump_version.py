"""One version for all six packages: check it, or bump it everywhere in one command.

    python -m tools.release.bump_version --check  # exit 1, listing every mismatch
    python -m tools.release.bump_version 0.2.0    # set an explicit version
    python -m tools.release.bump_version minor    # or bump major / minor / patch

The version lives in each ``packages/*/pyproject.toml`` (``[project] version``),
in the siblings' ``ring-core==X`` dependency and in ring-core's extras
(``ring-flash==X``, ...). A bump rewrites all of them (text edits, formatting
kept), then adds a ``## [X] - date`` heading under ``## [Unreleased]`` in
CHANGELOG.md.
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_NAMES = (
    "ring-core",
    "ring-flash",
    "ring-distributed",
    "ring-multihead",
    "ring-blocksparse",
    "ring-transformers",
)
VERSION = re.compile(r"^\d+\.\d+\.\d+([.-]?(a|b|rc|dev|post)\d+)?$")
PIN = re.compile(
    r"\b(?P<name>ring-(?:core|flash|distributed|multihead|blocksparse|transformers))(?P<extras>\[[^\]]*\])?==(?P<version>[^\s\"',;]+)"
)
PROJECT_VERSION = re.compile(r'(?m)^(version\s*=\s*")([^"]+)(")')


def pyprojects(root: Path = ROOT) -> list[Path]:
    """The packages' pyproject files (error if one is missing)."""
    paths = [root / "packages" / name / "pyproject.toml" for name in PACKAGE_NAMES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing pyproject files: {missing}")
    return paths


def collect(root: Path = ROOT) -> list[tuple[str, str, str]]:
    """Every place a project version is written: ``(file, what, version)``."""
    found = []
    for path in pyprojects(root):
        rel = str(path.relative_to(root))
        project = tomllib.loads(path.read_text())["project"]
        found.append((rel, f"{project['name']} version", project["version"]))
        requirements = list(project.get("dependencies", []))
        for extra, reqs in project.get("optional-dependencies", {}).items():
            requirements += [f"{req} (extra {extra})" for req in reqs]
        for req in requirements:
            for match in PIN.finditer(req):
                found.append((rel, f"pin {req}", match["version"]))
    return found


def check(root: Path = ROOT) -> list[str]:
    """Problems (empty when every version and pin agrees with ring-core's version)."""
    found = collect(root)
    expected = found[0][2]  # ring-core's own version
    problems = [
        f"{file}: {what} is {version}, expected {expected} (ring-core's version)"
        for file, what, version in found
        if version != expected
    ]
    for name in PACKAGE_NAMES[1:]:
        if not any(what == f"pin {name}=={expected} (extra all)" for _, what, _ in found):
            problems.append(f"packages/ring-core/pyproject.toml: extra 'all' does not pin {name}=={expected}")
    return problems


def current_version(root: Path = ROOT) -> str:
    return collect(root)[0][2]


def next_version(current: str, part: str) -> str:
    """``part`` is an explicit version or one of major / minor / patch."""
    if part not in ("major", "minor", "patch"):
        if not VERSION.match(part):
            raise ValueError(f"version must look like 1.2.3 (or major/minor/patch), got {part!r}")
        return part
    major, minor, patch = (int(x) for x in re.match(r"(\d+)\.(\d+)\.(\d+)", current).groups())
    if part == "major":
        return f"{major + 1}.0.0"
    if part == "minor":
        return f"{major}.{minor + 1}.0"
    return f"{major}.{minor}.{patch + 1}"


def bump(new: str, root: Path = ROOT, changelog: bool = True, today: datetime.date | None = None) -> list[Path]:
    """Write version ``new`` into every pyproject (and CHANGELOG.md); returns the files changed."""
    if not VERSION.match(new):
        raise ValueError(f"version must look like 1.2.3, got {new!r}")
    changed = []
    for path in pyprojects(root):
        text = path.read_text()
        updated, count = PROJECT_VERSION.subn(lambda m: m[1] + new + m[3], text, count=1)
        if count != 1:
            raise ValueError(f'{path}: no `version = "..."` line')
        updated = PIN.sub(lambda m: f"{m['name']}{m['extras'] or ''}=={new}", updated)
        if updated != text:
            path.write_text(updated)
            changed.append(path)
    log = root / "CHANGELOG.md"
    if changelog and log.is_file():
        text = log.read_text()
        if f"## [{new}]" not in text:
            date = (today or datetime.date.today()).isoformat()
            updated = text.replace("## [Unreleased]\n", f"## [Unreleased]\n\n## [{new}] - {date}\n", 1)
            if updated != text:
                log.write_text(updated)
                changed.append(log)
    problems = check(root)
    if problems:
        raise RuntimeError("versions still differ after the bump:\n" + "\n".join(problems))
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("version", nargs="?", help="new version (1.2.3) or major / minor / patch")
    parser.add_argument("--check", action="store_true", help="only check that all versions agree")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    parser.add_argument("--no-changelog", action="store_true", help="leave CHANGELOG.md alone")
    args = parser.parse_args(argv)
    if args.check or args.version is None:
        problems = check(args.root)
        for problem in problems:
            print(problem, file=sys.stderr)
        if not problems:
            print(f"all {len(PACKAGE_NAMES)} packages at {current_version(args.root)}, pins agree")
        return 1 if problems else 0
    old = current_version(args.root)
    new = next_version(old, args.version)
    for path in bump(new, args.root, changelog=not args.no_changelog):
        print(f"updated {path.relative_to(args.root)}")
    print(f"{old} -> {new}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
