"""The ring attention examples run, report errors within float64 tolerance, and fail when a merge is broken.

Each test starts the script as a subprocess (the way a user runs it) with small sizes.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "ring_attention"
TOLERANCE = 1e-10
REFERENCE_LINE = re.compile(
    r"is_causal=(True|False)\s+error vs reference_attention: (\S+)\s+vs RingDilatedAttention: (\S+)"
)


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=EXAMPLES.parents[1]
    )


def reference_errors(stdout: str) -> dict[bool, tuple[float, float]]:
    """``{is_causal: (error vs reference_attention, error vs RingDilatedAttention)}`` from the script's output."""
    return {m[0] == "True": (float(m[1]), float(m[2])) for m in REFERENCE_LINE.findall(stdout)}


def simulation_rows(stdout: str) -> list[dict[str, float]]:
    """The table rows: N, full peak, ring peak per rank, ratio, full scores, block scores (MiB), error."""
    keys = ("n", "full_peak", "ring_peak", "ratio", "full_scores", "block_scores", "error")
    rows = []
    for line in stdout.splitlines():
        fields = line.split()
        if len(fields) == len(keys) and fields[0].isdigit():
            rows.append({key: float(value.rstrip("x")) for key, value in zip(keys, fields)})
    return rows


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["spawn", "torchrun"])
def test_reference_implementation_matches_reference_and_library(launcher):
    script = str(EXAMPLES / "reference_implementation.py")
    if launcher == "spawn":
        result = run_script(script, "--world-size", "2", "--seq-len", "32")
    else:
        result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, "--seq-len", "32")  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "over 2 ranks" in result.stdout
    errors = reference_errors(result.stdout)
    assert set(errors) == {False, True}, result.stdout
    for is_causal, (vs_reference, vs_library) in errors.items():
        assert vs_reference <= TOLERANCE, (is_causal, vs_reference)
        assert vs_library <= TOLERANCE, (is_causal, vs_library)
    assert "PASS" in result.stdout


@pytest.mark.distributed
def test_reference_implementation_fails_on_a_corrupt_merge():
    result = run_script(str(EXAMPLES / "reference_implementation.py"), "--world-size", "2", "--seq-len", "32", "--corrupt-merge")  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    errors = reference_errors(result.stdout)
    assert set(errors) == {False, True}, result.stdout
    assert all(vs_reference > 1e-3 and vs_library > 1e-3 for vs_reference, vs_library in errors.values()), errors
    assert "FAIL" in result.stdout


def test_reference_implementation_rejects_a_bad_length():
    result = run_script(str(EXAMPLES / "reference_implementation.py"), "--world-size", "3", "--seq-len", "32")
    assert result.returncode == 2
    assert "--seq-len must be a positive multiple of the world size 3, got 32" in result.stderr


def test_single_gpu_simulation_is_exact_and_saves_memory():
    result = run_script(str(EXAMPLES / "single_gpu_simulation.py"), "--world-size", "2", "--seq-lens", "64", "256")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = simulation_rows(result.stdout)
    assert [row["n"] for row in rows] == [64, 256], result.stdout
    for row in rows:
        assert row["error"] <= TOLERANCE, row
        assert row["full_peak"] >= row["full_scores"], row  # the naive path really holds the N x N scores
        assert row["ring_peak"] < row["full_peak"], row
    big = rows[-1]
    assert big["ring_peak"] < big["full_peak"] / 2, big  # P=2: a quarter of the scores per rank
    assert "PASS" in result.stdout


def test_single_gpu_simulation_fails_on_a_corrupt_merge():
    result = run_script(str(EXAMPLES / "single_gpu_simulation.py"), "--world-size", "2", "--seq-lens", "64", "--corrupt-merge")  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    (row,) = simulation_rows(result.stdout)
    assert row["error"] > 1e-3, row
    assert "FAIL" in result.stdout


def test_readme_says_what_each_example_shows_and_how_to_run_it():
    readme = (EXAMPLES / "README.md").read_text()
    for script in sorted(EXAMPLES.glob("*.py")):
        assert f"[`{script.name}`]({script.name})" in readme, script.name
        assert f"python examples/ring_attention/{script.name}" in readme, script.name
