"""A wheelhouse of the packages (and the sample and misbehaving test plugins) and a fresh venv that installs from it.

The venv is created without system site-packages and without pip; the host's pip
installs into it (``pip --python``) from the wheelhouse only (``--no-index``).
The third-party dependencies of the packages (torch, pluggy, tqdm, transformers and what
they need) are borrowed from this interpreter through a ``.pth`` file that points
at a folder of symlinks, so no multi-GB torch is copied and nothing is downloaded;
the editable ``ring-*`` installs of this machine stay invisible there.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import venv
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (
    "ring-core",
    "ring-flash",
    "ring-distributed",
    "ring-multihead",
    "ring-blocksparse",
    "ring-transformers",
)
SAMPLE_PLUGIN = ROOT / "tests" / "sample_plugin"
MISBEHAVING_PLUGIN = ROOT / "tests" / "misbehaving_plugin"


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run ``cmd``; on failure, fail the test with its output."""
    env = {**os.environ, "PYTHONNOUSERSITE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, **kwargs)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def build_wheels(sources: list[Path], outdir: Path, scratch: Path) -> list[Path]:
    """Wheels of ``sources`` into ``outdir``, built from copies in ``scratch`` (the checkout stays clean).

    No build isolation (and no index) when this interpreter's setuptools is new enough.
    """
    copies = []
    for source in sources:
        copies.append(scratch / source.name)
        shutil.copytree(source, copies[-1], ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(outdir)]
    try:
        recent = int(metadata.version("setuptools").split(".")[0]) >= 77  # PEP 639 `license = "MIT"`
    except metadata.PackageNotFoundError:
        recent = False
    if recent:
        cmd += ["--no-build-isolation", "--no-index"]
    run([*cmd, *map(str, copies)])
    return sorted(outdir.glob("*.whl"))


def dependency_closure(names: list[str]) -> list[metadata.Distribution]:
    """The installed distributions that ``names`` need (not ``ring-*``), transitively."""
    seen: dict[str, metadata.Distribution] = {}
    stack = list(names)
    while stack:
        name = canonicalize_name(stack.pop())
        if name in seen or name.startswith("ring-"):
            continue
        seen[name] = dist = metadata.distribution(name)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(req.name)
    return list(seen.values())


def borrow(dists: list[metadata.Distribution], folder: Path) -> None:
    """Symlink each distribution's top-level files (packages, modules, .dist-info) into ``folder``."""
    folder.mkdir()
    for dist in dists:
        base = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            target = folder / top
            if (base / top).exists() and not target.exists():
                target.symlink_to(base / top)


@dataclass
class WheelVenv:
    root: Path
    wheelhouse: Path
    python: Path
    bin: Path

    def pip(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """This interpreter's pip acting on the venv (``pip --python``), in ``cwd`` (default: the venv's root)."""
        return run([sys.executable, "-m", "pip", "--python", str(self.python), *args], cwd=cwd or self.root)

    def pip_install(self, *requirements: str) -> subprocess.CompletedProcess:
        return self.pip("install", "--no-index", "--find-links", str(self.wheelhouse), *requirements)

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return run([*args], cwd=self.root)  # not the repository: nothing importable from the checkout


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheelhouse")
    sources = [*(ROOT / "packages" / p for p in PACKAGES), SAMPLE_PLUGIN, MISBEHAVING_PLUGIN]
    build_wheels(sources, out, tmp_path_factory.mktemp("sources"))
    return out


def fresh_venv(root: Path, wheelhouse: Path, *also: str) -> WheelVenv:
    """A venv in ``root`` that sees no ``ring-*`` package, only the borrowed third-party dependencies.

    ``also``: more distributions to borrow (``setuptools`` to build from source without build isolation).
    """
    env_dir = root / "env"
    venv.EnvBuilder(with_pip=False, system_site_packages=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    needed = {Requirement(r).name for p in PACKAGES for r in metadata.requires(p) or [] if "extra" not in r}
    if importlib.util.find_spec("numpy") is not None:  # torch warns at import without it
        needed.add("numpy")
    borrow(dependency_closure(sorted(needed | set(also))), root / "borrowed")
    (site / "_borrowed_dependencies.pth").write_text(str(root / "borrowed") + "\n")
    return WheelVenv(root, wheelhouse, python, env_dir / "bin")


@pytest.fixture
def make_venv(tmp_path_factory, wheelhouse):
    """``make_venv(*also)``: a new :func:`fresh_venv` for one test."""
    return lambda *also: fresh_venv(tmp_path_factory.mktemp("venv"), wheelhouse, *also)


@pytest.fixture(scope="session")
def wheel_venv(tmp_path_factory, wheelhouse) -> WheelVenv:
    """A fresh venv with ``ring-core[all]`` installed from the wheelhouse only."""
    env = fresh_venv(tmp_path_factory.mktemp("venv"), wheelhouse)
    env.pip_install("ring-core[all]")
    return env
