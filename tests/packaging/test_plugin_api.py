"""The package boundaries that `nox -s lint` enforces hold, and each check fails on a deliberate violation.

- tests/packaging/check_plugin_api.py: siblings import only names in the ``__all__`` of
  ``ring_core``, ``ring_core.plugin`` or ``ring_core.testing``, and use no underscore member of
  ring-core's classes;
- import-linter (``[tool.importlinter]`` in pyproject.toml): core imports no sibling, siblings
  import no sibling, no package has an import cycle between its modules.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
import check_plugin_api  # noqa: E402

VIOLATIONS = """
import ring_core
from ring_core.plugin import RingDilatedAttention, RingDilatedSchedule, _signature
from ring_core.ring_schedule import send_bounds
from ring_core.plugin import Part as _Part


class Mine(RingDilatedAttention):
    def _check(self, *args):
        return self._op


class MySchedule(RingDilatedSchedule):
    def forward(self, q, k, v, acc):
        return self.plan


def peek(schedule):
    return schedule._shapes(), ring_core.registry
"""


def test_siblings_use_only_the_declared_plugin_api():
    assert check_plugin_api.check(ROOT) == []


def test_the_api_check_fails_on_violations(tmp_path, capsys):
    shutil.copytree(ROOT / "packages" / "ring-core" / "src", tmp_path / "packages" / "ring-core" / "src")
    bad = tmp_path / "packages" / "ring-bad" / "src" / "ring_bad"
    bad.mkdir(parents=True)
    (bad / "__init__.py").write_text(VIOLATIONS)
    problems = "\n".join(check_plugin_api.check(tmp_path))
    for expected in (
        ":3: _signature is not in ring_core.plugin.__all__",
        ":4: imports from ring_core.ring_schedule, not one of",
        ":9: Mine overrides ring-core's private _check",
        ":10: Mine uses ring-core's private _op",
        ":19: uses _shapes, a private member of a ring-core class",
        ":19: ring_core.registry is not in ring_core.__all__",
    ):
        assert expected in problems, f"{expected!r} not in:\n{problems}"
    assert "MySchedule" not in problems and "Part" not in problems  # public members and names are fine
    assert check_plugin_api.main([str(tmp_path)]) == 1
    assert "violation(s)" in capsys.readouterr().out


def _lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    executable = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(pythonpath)} if pythonpath else dict(os.environ)
    return subprocess.run(
        [str(executable), "--config", "pyproject.toml", "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_import_contracts_hold():
    pytest.importorskip("importlinter")
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_import_contracts_break_on_violations(tmp_path):
    """Fake packages of the same names: core imports a sibling, two siblings import each other, a cycle in core."""
    pytest.importorskip("importlinter")
    sources = {
        "ring_core/__init__.py": "",
        "ring_core/registry.py": "from ring_core import builtins\n",
        "ring_core/builtins.py": "from ring_core import registry\n",
        "ring_core/cli.py": "import ring_blocksparse.cli\n",
        "ring_flash/__init__.py": "import ring_distributed\n",
        "ring_distributed/__init__.py": "import ring_flash\n",
        "ring_multihead/__init__.py": "",
        "ring_blocksparse/__init__.py": "",
        "ring_blocksparse/cli.py": "",
        "ring_transformers/__init__.py": "",
    }
    for name, text in sources.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    result = _lint_imports(tmp_path, pythonpath=tmp_path)
    assert result.returncode != 0
    assert "0 kept, 3 broken" in result.stdout, result.stdout + result.stderr
