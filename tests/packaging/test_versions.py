"""One version for all six packages: the check, and tools.release.bump_version on a temporary copy."""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path

import pytest

from tools.release import bump_version

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (
    "ring-core",
    "ring-flash",
    "ring-distributed",
    "ring-multihead",
    "ring-blocksparse",
    "ring-transformers",
)


@pytest.fixture
def repo(tmp_path) -> Path:
    """A copy of the pyproject files and the CHANGELOG."""
    for name in PACKAGES:
        (tmp_path / "packages" / name).mkdir(parents=True)
        shutil.copy(ROOT / "packages" / name / "pyproject.toml", tmp_path / "packages" / name)
    shutil.copy(ROOT / "CHANGELOG.md", tmp_path)
    return tmp_path


def test_checkout_versions_agree():
    assert bump_version.check(ROOT) == []
    versions = {v for _, what, v in bump_version.collect(ROOT) if what.endswith(" version")}
    assert len(versions) == 1 and len(bump_version.collect(ROOT)) >= 6 + 5 + 5  # versions, pins, extra all


def test_check_fails_when_a_version_differs(repo):
    path = repo / "packages" / "ring-flash" / "pyproject.toml"
    path.write_text(path.read_text().replace('version = "', 'version = "9', 1))
    problems = bump_version.check(repo)
    assert len(problems) == 1 and "ring-flash version" in problems[0] and "packages/ring-flash" in problems[0]
    assert bump_version.main(["--check", "--root", str(repo)]) == 1


@pytest.mark.parametrize("package", ["ring-core", "ring-multihead"])
def test_check_fails_when_a_pin_differs(repo, package):
    path = repo / "packages" / package / "pyproject.toml"
    old = bump_version.current_version(repo)
    target = "ring-multihead==" if package == "ring-core" else "ring-core=="
    text = path.read_text()
    assert f"{target}{old}" in text
    path.write_text(text.replace(f"{target}{old}", f"{target}0.0.9", 1))
    problems = bump_version.check(repo)
    assert problems and all("0.0.9" in p for p in problems), problems


def test_check_fails_when_extra_all_misses_a_sibling(repo):
    path = repo / "packages" / "ring-core" / "pyproject.toml"
    old = bump_version.current_version(repo)
    text = path.read_text()
    all_line = next(line for line in text.splitlines() if line.startswith("all = "))
    path.write_text(text.replace(all_line, all_line.replace(f', "ring-blocksparse=={old}"', "")))
    assert any("ring-blocksparse" in p for p in bump_version.check(repo))


def test_bump_round_trip(repo):
    originals = {p: p.read_bytes() for p in repo.glob("packages/*/pyproject.toml")}
    old = bump_version.current_version(repo)
    assert bump_version.main(["7.8.9", "--root", str(repo)]) == 0
    assert bump_version.check(repo) == []
    assert {v for _, _, v in bump_version.collect(repo)} == {"7.8.9"}
    for path, before in originals.items():  # only version strings changed
        assert path.read_text().replace("7.8.9", old) == before.decode()
    changelog = (repo / "CHANGELOG.md").read_text()
    assert f"## [Unreleased]\n\n## [7.8.9] - {datetime.date.today().isoformat()}\n" in changelog
    bump_version.bump(old, repo, changelog=False)
    assert {p: p.read_bytes() for p in originals} == originals


def test_next_version():
    assert bump_version.next_version("0.1.2", "patch") == "0.1.3"
    assert bump_version.next_version("0.1.2", "minor") == "0.2.0"
    assert bump_version.next_version("0.1.2", "major") == "1.0.0"
    assert bump_version.next_version("0.1.2", "0.3.0rc1") == "0.3.0rc1"
    with pytest.raises(ValueError, match="version must look like 1.2.3"):
        bump_version.next_version("0.1.2", "v1")
