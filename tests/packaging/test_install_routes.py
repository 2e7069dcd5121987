"""Each install command of docs/installation.md, run as written in a fresh venv; the factory's hint says the same.

The commands are read from the page, so the page cannot drift from what works. Each runs with
``--no-index`` (nothing downloaded: the third-party dependencies are borrowed from this
interpreter, see conftest.py) and, from source, ``--no-build-isolation`` (setuptools borrowed too).
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from ring_core.factory import install_hint

ROOT = Path(__file__).resolve().parents[2]
INSTALLATION = ROOT / "docs" / "installation.md"

pytestmark = pytest.mark.slow


def documented_commands(section: str) -> list[list[str]]:
    """The ``pip install`` commands of the code blocks under the ``## `` heading that starts with ``section``."""
    text = INSTALLATION.read_text()
    match = re.search(rf"^## {re.escape(section)}.*?$(?P<body>.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"no section {section!r} in {INSTALLATION}"
    code = "\n".join(line[4:] for line in match["body"].splitlines() if line.startswith("    "))
    lines = [line.split("#")[0].strip() for line in code.replace("\\\n", " ").splitlines()]
    commands = [shlex.split(line) for line in lines if line.startswith("pip install")]
    assert commands, f"no pip install command under {section!r}"
    return commands


def check_installed(env, packages: list[str], location: Path) -> None:
    """The console script and ``python -m ring_core`` run and report the installed packages, found in ``location``."""
    version = env.run(str(env.bin / "ring-attention"), "--version").stdout
    for package in packages:
        assert f"{package} 0.1.0" in version, version
    for package in {"ring-flash", "ring-distributed", "ring-multihead", "ring-blocksparse"} - set(packages):
        assert package not in version, version
    info = env.run(str(env.python), "-m", "ring_core", "info").stdout
    assert all(package in info for package in packages), info
    modules = [package.replace("-", "_") for package in packages]
    script = f"import {', '.join(modules)}; print({', '.join(m + '.__file__' for m in modules)})"
    where = env.run(str(env.python), "-c", script).stdout
    assert where.count(str(location)) == len(packages), where


@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_from_a_checkout(make_venv, tmp_path, editable):
    """``pip install ./packages/ring-core ./packages/ring-flash`` (and the editable line) in a copy of the checkout."""
    (command,) = [c for c in documented_commands("From a checkout") if ("-e" in c) == editable]
    sources = [arg for arg in command[2:] if arg != "-e"]
    assert command[:2] == ["pip", "install"] and all(Path(arg).parts[-2] == "packages" for arg in sources), command
    checkout = tmp_path / "checkout"
    for arg in sources:
        shutil.copytree(ROOT / arg, checkout / arg, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    env = make_venv("setuptools")
    env.pip("install", "--no-index", "--no-build-isolation", *command[2:], cwd=checkout)
    check_installed(env, [Path(arg).name for arg in sources], checkout if editable else env.root)


def test_from_a_wheelhouse(make_venv, wheelhouse, tmp_path):
    """``pip install --find-links wheelhouse "ring-core[flash]"`` next to the wheelhouse ``nox -s build`` writes."""
    (command,) = documented_commands("From a wheelhouse")
    assert command[command.index("--find-links") + 1] == "wheelhouse", command
    (tmp_path / "wheelhouse").symlink_to(wheelhouse)
    env = make_venv()
    env.pip("install", "--no-index", *command[2:], cwd=tmp_path)
    check_installed(env, ["ring-core", "ring-flash"], env.root)


def test_factory_hint_gives_the_documented_commands():
    """The hint for a missing package: the page's commands, for that package alone."""
    hint = install_hint("ring-flash", "flash")
    checkout = documented_commands("From a checkout")[0]
    assert "./packages/ring-flash" in checkout and "pip install ./packages/ring-flash;" in hint, hint
    for section in ("From a wheelhouse", "From an index"):
        (command,) = documented_commands(section)
        assert shlex.join(command).replace("'", '"') in hint, (section, hint)
