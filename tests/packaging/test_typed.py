"""Every package is typed (PEP 561): a py.typed marker in its source and in its wheel."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = sorted((ROOT / "packages").iterdir())


def import_name(package: Path) -> str:
    return package.name.replace("-", "_")


@pytest.mark.parametrize("package", PACKAGE_DIRS, ids=lambda p: p.name)
def test_each_package_has_a_py_typed_marker_in_its_package_data(package):
    assert (package / "src" / import_name(package) / "py.typed").is_file()
    data = tomllib.loads((package / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in data[import_name(package)]


@pytest.mark.slow
def test_every_wheel_carries_py_typed(wheelhouse):
    for package in PACKAGE_DIRS:
        (wheel,) = wheelhouse.glob(f"{import_name(package)}-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            assert f"{import_name(package)}/py.typed" in archive.namelist(), wheel.name
