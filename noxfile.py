"""Sessions: tests (cpu default, cuda), lint, demo, typecheck. Run `nox -l` to list them.

The CPU torch on this kind of machine is `torch==2.13.0` (installed from local
disk, no multi-GB CUDA download); set RING_ATTENTION_TORCH to another requirement
(e.g. "torch" or "torch==2.11.0") elsewhere, or to "" to keep the torch already
visible to the session's interpreter.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

nox.needs_version = ">=2024.3.2"
nox.options.sessions = ["tests", "lint"]
nox.options.reuse_venv = "yes"
nox.options.default_venv_backend = "venv"

ROOT = Path(__file__).parent
PACKAGES = [
    "ring-core",
    "ring-flash",
    "ring-distributed",
    "ring-multihead",
    "ring-blocksparse",
    "ring-transformers",
]
TORCH = os.environ.get("RING_ATTENTION_TORCH", "torch==2.13.0")


def install_project(session: nox.Session, *extra: str) -> None:
    if TORCH:
        session.install(TORCH)
    session.install(*(arg for pkg in PACKAGES for arg in ("-e", f"packages/{pkg}")), "tqdm", *extra)


@nox.session
@nox.parametrize("backend", [nox.param("cpu", id="cpu"), nox.param("cuda", id="cuda")])
def tests(session: nox.Session, backend: str) -> None:
    """Run pytest: the CPU suite, or only the CUDA-marked tests on a GPU machine."""
    if backend == "cuda" and shutil.which("nvidia-smi") is None:
        session.skip("no NVIDIA GPU on this machine")
    # on the CPU, Triton (the GPU machines' version) lets its interpreter test ring-flash's kernels
    extra = ["triton==3.6.0"] if backend == "cpu" else []
    install_project(session, "pytest", "pytest-timeout", "matplotlib", "import-linter==2.16", *extra)
    marker = "not cuda" if backend == "cpu" else "cuda"
    session.run("pytest", "-m", marker, "--timeout=900", *session.posargs)


LINT_REQUIREMENTS = ["ruff==0.17.6", "import-linter==2.16"]


@nox.session
def lint(session: nox.Session) -> None:
    """ruff; the package boundaries (import-linter contracts in pyproject.toml); siblings use only the plugin API."""
    session.install(*LINT_REQUIREMENTS)
    # import-linter reads the source of installed packages: no torch needed, so no dependencies
    session.install("--no-deps", *(arg for pkg in PACKAGES for arg in ("-e", f"packages/{pkg}")))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("lint-imports", "--no-cache")
    session.run("python", "tests/packaging/check_plugin_api.py")


MYPY_REQUIREMENT = "mypy==2.4.1"
# `mypy --strict` checks all six packages clean (settings in pyproject.toml: only Triton's kernels keep
# unannotated parameters).
TYPED_PACKAGES = [
    "ring_core",
    "ring_flash",
    "ring_distributed",
    "ring_multihead",
    "ring_blocksparse",
    "ring_transformers",
]


@nox.session(default=False)
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the typed packages (each ships py.typed). About 2 minutes cold on 2 cores, not in CI."""
    install_project(session, MYPY_REQUIREMENT)
    session.run("mypy", *(arg for package in TYPED_PACKAGES for arg in ("-p", package)), *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """info, verify, a short CPU bench, then a LongNet LM and a transformers Llama trained with sequences sharded
    over 2 gloo processes.

    A few minutes on 2 cores; results (bench JSON/PNG, loss curves PNG and summaries) in bench-results/.
    """
    install_project(session, "matplotlib")
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    session.run("ring-attention", "info")
    session.run("ring-attention", "verify")
    session.run("ring-attention", "verify", "--world-size", "2")
    session.run(
        "ring-attention",
        "bench",
        "--device",
        "cpu",
        "--seq-lens",
        "1024",
        "4096",
        "--json",
        str(out / "demo-bench.json"),
        "--plot",
        str(out / "demo-bench.png"),
    )
    # LongNet LM (examples/longnet_lm.py): ~1 minute, the loss falls from ~4.6 to ~2.0 nats/char.
    session.run("python", "examples/longnet_lm.py", "--world-size", "2", "--steps", "300", "--out", str(out))
    # A transformers Llama on our ring and FSDP2 (examples/transformers_sp.py): ~2 minutes.
    session.run("python", "examples/transformers_sp.py", "--world-size", "2", "--steps", "200", "--out", str(out))


# Pinned so that `mkdocs build --strict` gives the same result everywhere.
DOCS_REQUIREMENTS = [
    "mkdocs==1.6.1",
    "mkdocs-material==9.8.2",
    "mkdocstrings==1.0.8",
    "mkdocstrings-python==2.0.11",
    "griffelib==2.4.1",
    "mkdocs-autorefs==1.4.5",
    "pymdown-extensions==13.1.2",
    "ruff==0.17.6",  # mkdocstrings formats signatures with it
]


@nox.session(default=False)
def docs(session: nox.Session) -> None:
    """Build the documentation site into site/ with `mkdocs build --strict` (figures generated from the code)."""
    install_project(session, "matplotlib", *DOCS_REQUIREMENTS)
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session(default=False)
def screenshots(session: nox.Session) -> None:
    """Build the docs, serve them and shoot home, quickstart and benchmarks in headless Chromium (docs-screenshots/).

    Needs Chromium on the machine (Debian: apt-get install chromium; or set CHROMIUM). Look at the PNGs.
    """
    install_project(session, "matplotlib", *DOCS_REQUIREMENTS)
    session.run("mkdocs", "build", "--strict", env={"NO_MKDOCS_2_WARNING": "1"})
    session.run(
        "python", "-m", "tools.docs.screenshots", "--site", "site", "--out", "docs-screenshots", *session.posargs
    )


@nox.session(default=False)
def build(session: nox.Session) -> None:
    """sdist + wheel of every package into one wheelhouse (./wheelhouse, or the first posarg)."""
    session.install("build==1.6.1")
    wheelhouse = Path(session.posargs[0]) if session.posargs else ROOT / "wheelhouse"
    for pkg in PACKAGES:
        session.run("python", "-m", "build", "--outdir", str(wheelhouse), str(ROOT / "packages" / pkg))
    session.run("python", "-m", "tools.release.bump_version", "--check")
    session.log(f"wheelhouse: {wheelhouse}")
