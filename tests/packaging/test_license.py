"""The MIT license the pyproject files declare: one LICENSE, copied into every package and carried by every wheel."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = [
    *sorted((ROOT / "packages").iterdir()),
    ROOT / "tests" / "sample_plugin",
    ROOT / "tests" / "misbehaving_plugin",
]


@pytest.mark.parametrize("package", PACKAGE_DIRS, ids=lambda p: p.name)
def test_each_package_declares_and_ships_the_root_license(package):
    project = tomllib.loads((package / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert (package / "LICENSE").read_text() == (ROOT / "LICENSE").read_text()
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


@pytest.mark.slow
def test_every_wheel_carries_the_license(wheelhouse):
    wheels = sorted(wheelhouse.glob("*.whl"))
    assert len(wheels) == len(PACKAGE_DIRS)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            names = [n for n in archive.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
            assert len(names) == 1, (wheel.name, archive.namelist())
            assert archive.read(names[0]).decode() == (ROOT / "LICENSE").read_text()
            metadata = archive.read(names[0].replace("licenses/LICENSE", "METADATA")).decode()
            assert "License-Expression: MIT" in metadata and "License-File: LICENSE" in metadata, metadata
