"""Wheels of every package install from a wheelhouse alone and work: entry points, extras, versions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (
    "ring-core",
    "ring-flash",
    "ring-distributed",
    "ring-multihead",
    "ring-blocksparse",
    "ring-transformers",
)

pytestmark = pytest.mark.slow


def test_wheelhouse_has_one_wheel_per_package(wheelhouse):
    version = tomllib.loads((ROOT / "packages" / "ring-core" / "pyproject.toml").read_text())["project"]["version"]
    names = {w.name for w in wheelhouse.glob("*.whl")}
    for package in PACKAGES:
        assert f"{package.replace('-', '_')}-{version}-py3-none-any.whl" in names, names


def test_extra_all_installs_every_package_from_wheels(wheel_venv):
    script = (
        "import json, importlib.metadata as m\n"
        "out = {}\n"
        f"for name in {list(PACKAGES)!r}:\n"
        "    d = m.distribution(name)\n"
        "    direct = d.read_text('direct_url.json')\n"
        "    out[name] = {'version': d.version, 'path': str(d.locate_file('')), 'direct_url': direct}\n"
        "print(json.dumps(out))\n"
    )
    found = json.loads(wheel_venv.run(str(wheel_venv.python), "-c", script).stdout)
    versions = {info["version"] for info in found.values()}
    assert len(versions) == 1, found
    for name, info in found.items():
        assert str(wheel_venv.root) in info["path"], f"{name} not installed in the venv: {info}"
        assert info["direct_url"] is None or "editable" not in info["direct_url"], f"{name} is editable: {info}"


def test_info_lists_every_plugin(wheel_venv):
    out = wheel_venv.run(str(wheel_venv.bin / "ring-attention"), "info").stdout
    for plugin in ("core", "flash", "distributed", "multihead", "blocksparse", "transformers"):
        assert plugin in out, out
    for package in PACKAGES:
        assert package in out, out


def test_verify_passes(wheel_venv):
    result = wheel_venv.run(str(wheel_venv.bin / "ring-attention"), "verify")
    assert "0 failed" in result.stdout, result.stdout
