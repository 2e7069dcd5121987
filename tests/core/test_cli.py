"""The ring-attention command: info, verify (exit codes) and bench (JSON, plot)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from ring_core import DilatedAttention, Implementation, hookimpl
from ring_core.cli import main


class WrongAttention(DilatedAttention):
    """Silently wrong: forgets the softmax scale."""

    def forward(self, q, k, v, **kwargs):
        return super().forward(q * 1.5, k, v, **kwargs)


class WrongPlugin:
    @hookimpl
    def register_implementations(self, register):
        register(Implementation(name="wrong", cls=WrongAttention, package="test", description="bad"))


def test_info_lists_plugins_implementations_kernels(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for needle in (
        "Plugins",
        "core",
        "ring-core",
        "Implementations",
        "dilated",
        "DilatedAttention",
        "Kernel backends",
        "cpu_flash",
        "math",
        "'auto'",
    ):
        assert needle in out


def test_verify_passes_for_correct_implementations(capsys):
    assert main(["verify", "--impl", "dilated"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" not in out


def test_verify_fails_on_a_wrong_implementation(capsys, fresh_registry):
    fresh_registry().register_plugin(WrongPlugin(), name="wrong")
    assert main(["verify", "--impl", "wrong", "--dtype", "float64"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_bench_writes_json_and_plot(tmp_path, capsys):
    json_path, png_path = tmp_path / "b.json", tmp_path / "b.png"
    code = main(
        [
            "bench",
            "--seq-lens",
            "128",
            "256",
            "--segments",
            "32",
            "64",
            "--rates",
            "1",
            "2",
            "--heads",
            "2",
            "--head-dim",
            "8",
            "--repeats",
            "1",
            "--impl",
            "dilated",
            "--json",
            str(json_path),
            "--plot",
            str(png_path),
        ]
    )
    assert code == 0
    data = json.loads(json_path.read_text())
    names = {(r["name"], r["seq_len"]) for r in data["results"]}
    assert names == {("sdpa", 128), ("sdpa", 256), ("dilated", 128), ("dilated", 256)}
    assert all(r["time_ms"] > 0 and r["ratio_to_sdpa"] > 0 for r in data["results"])
    assert png_path.read_bytes()[:4] == b"\x89PNG"
    assert "vs sdpa" in capsys.readouterr().out


def test_useful_pairs_counts_allowed_pairs():
    from ring_core.bench import useful_pairs
    from ring_core.reference import branch_counts

    for causal in (False, True):
        counts = branch_counts(50, 4, [8, 16], [1, 2])
        if causal:
            counts = counts * torch.ones(50, 50, dtype=torch.float64).tril()
        assert useful_pairs(50, 4, [8, 16], [1, 2], causal=causal) == int(counts.sum())


def test_console_script_runs():
    result = subprocess.run(
        [sys.executable, "-m", "ring_core.cli", "info"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "Kernel backends" in result.stdout


def test_version_names_core_and_plugin_packages(capsys):
    import ring_core

    try:
        main(["--version"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ring-attention (ring-core {ring_core.__version__}") and f"torch {torch.__version__}" in out


def test_python_dash_m_ring_core_is_the_command():
    result = subprocess.run(
        [sys.executable, "-m", "ring_core", "--version"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0 and result.stdout.startswith("ring-attention (ring-core "), result
