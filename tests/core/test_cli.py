"""The ring-attention command: info, verify (exit codes) and bench (JSON, plot)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
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
    for r in data["results"]:
        sdpa = next(s for s in data["results"] if s["name"] == "sdpa" and s["seq_len"] == r["seq_len"])
        assert r["speedup_vs_sdpa"] == pytest.approx(sdpa["time_ms"] / r["time_ms"])  # > 1: faster than SDPA
        # the kernel that ran; a peak that counts at least the output and its gradient of ones (float32)
        assert r["kernel"] == ("sdpa flash" if r["name"] == "sdpa" else "cpu_flash"), r
        assert r["peak_mem_mib"] * 2**20 >= 2 * r["seq_len"] * 2 * 8 * 4, r
    assert png_path.read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "speed-up vs SDPA" in out and "kernel" in out
    assert max(len(line) for line in out.splitlines()) <= 100, out


def test_bench_table_fits_100_columns_with_every_name():
    from ring_core.bench import BenchResult, format_results

    rows = [
        BenchResult("block_sparse_ring_dilated", "sdpa_cudnn+flash_attn3+flash_attn4", 1048576, 123456.78, 12.3, None)
    ]
    rows.append(BenchResult("sdpa", "sdpa cudnn", 1048576, 1.5, 600.0, 12345.0, 1.0))
    text = format_results(
        rows, "NVIDIA H200, bfloat16, B=1 H=16 D=128, segments [2048, 4096, 8192] rates [1, 2, 4]" * 2
    )
    assert max(len(line) for line in text.splitlines()) <= 100, text
    assert "n/a" in text and "1.00x" in text


def test_cpu_peak_counts_memory_freed_and_reused_within_the_step():
    from ring_core.bench import cpu_peak_bytes

    def step():
        first = torch.empty(2**22, dtype=torch.uint8)
        del first
        second = torch.empty(2**21, dtype=torch.uint8)  # may reuse the first's pages: RSS does not grow
        return second

    assert cpu_peak_bytes(step) == 2**22


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
