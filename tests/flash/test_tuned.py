"""The measured kernel table and the ``tuned`` backend, on the CPU (with the CPU kernels as candidates)."""

from __future__ import annotations

import json

import pytest
import torch

import ring_core
from ring_core import hookimpl
from ring_core.testing import CASES, check_attention
from ring_flash.kernel_table import KernelTable, Row, load_table, measure_rows, packaged_tables, table_for
from ring_flash.tuned import TunedKernel


def table(rows, card="Test Card", capability=(9, 0)) -> KernelTable:
    return KernelTable(card, capability, ("float64",), tuple(rows))


def test_row_lookup_is_nearest_on_a_log_scale():
    t = table([Row(8, False, length, {"a": 1.0}) for length in (256, 1024, 4096)] + [Row(8, True, 512, {"a": 1.0})])
    assert t.row(8, False, 256, 256).length == 256
    assert t.row(8, False, 600, 600).length == 1024  # log2 600 = 9.2: nearer 10 than 8
    assert t.row(8, False, 16, 65536).length == 1024  # geometric mean of 16 and 65536 is 1024
    assert t.row(8, False, 100000, 100000).length == 4096
    assert t.row(8, True, 9, 9).length == 512
    assert t.row(64, False, 256, 256) is None


def test_fastest_among_allowed():
    row = Row(8, False, 512, {"a": 2.0, "b": 1.0, "c": 3.0})
    assert row.fastest(["a", "b", "c"]) == "b"
    assert row.fastest(["a", "c"]) == "a"
    assert row.fastest(["d"]) is None


def test_load_table_round_trip_and_clear_errors(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"card": "X", "capability": [9, 0], "dtypes": ["bfloat16"],
                                "rows": [{"head_dim": 128, "causal": False, "length": 512, "ms": {"a": 1}}]}))  # fmt: skip
    loaded = load_table(path)
    assert loaded.card == "X" and loaded.capability == (9, 0) and loaded.rows[0].ms == {"a": 1.0}
    assert any("a" in line for line in loaded.lines())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"card": "X"}))
    with pytest.raises(ValueError, match="bad.json is not a kernel table"):
        load_table(bad)


def test_shipped_tables_load_and_env_overrides(tmp_path, monkeypatch):
    for shipped in packaged_tables():
        assert shipped.rows and shipped.dtypes and shipped.head_dims
        assert table_for(shipped.card, shipped.capability) is shipped
    assert table_for("No Such Card", (1, 0)) is None
    monkeypatch.setenv("RING_FLASH_KERNEL_TABLE", "none")
    assert all(table_for(t.card, t.capability) is None for t in packaged_tables())


def test_measure_rows_times_each_kernel_and_skips_failures():
    class Broken(ring_core.MathKernel):
        name = "broken"

        def forward(self, *args, **kwargs):
            raise RuntimeError("cannot")

    seen = []
    rows = measure_rows(
        [ring_core.MathKernel(), ring_core.CPUFlashKernel(), Broken()], lengths=[8, 16], head_dims=[8],
        causal_flags=[False, True], heads=2, tokens=32, dtype=torch.float32, device="cpu", repeats=2, warmup=1,
        progress=seen.append,
    )  # fmt: skip
    assert [(r["causal"], r["length"], r["blocks"]) for r in rows] == [(False, 8, 4), (False, 16, 2), (True, 8, 4),
                                                                         (True, 16, 2)]  # fmt: skip
    for r in rows:
        assert set(r["ms"]) == {"math", "cpu_flash"} and all(t > 0 for t in r["ms"].values())
    assert any("broken" in line and "cannot" in line for line in seen)


class CPUTuned(TunedKernel):
    """``tuned`` with a given table and the CPU kernels: the same choosing, testable here."""

    name = "tuned_cpu_test"
    devices = ("cpu",)
    dtypes = (torch.float64, torch.float32)
    head_dim_multiple = 1
    fixed_table: KernelTable | None = None

    def table(self):
        return self.fixed_table

    def availability_reasons(self):
        return [] if self.fixed_table is not None else ["no table"]


class Plugin:
    @hookimpl
    def register_kernels(self, register):
        register(CPUTuned())


@pytest.fixture
def cpu_tuned():
    registry = ring_core.get_registry()
    registry.register_plugin(Plugin(), "tuned-cpu-test")
    # short blocks: math measured faster; long ones: cpu_flash; causal: only math measured
    rows = [Row(8, False, 8, {"math": 1.0, "cpu_flash": 2.0}), Row(8, False, 64, {"math": 2.0, "cpu_flash": 1.0}),
            Row(8, True, 16, {"math": 1.0})]  # fmt: skip
    CPUTuned.fixed_table = table(rows)
    TunedKernel.forget_choices()
    yield registry.kernels["tuned_cpu_test"]
    CPUTuned.fixed_table = None
    TunedKernel.forget_choices()
    registry.unregister_plugin("tuned-cpu-test")


def test_tuned_follows_the_table_per_block_shape(cpu_tuned):
    short, long = torch.randn(2, 8, 2, 8, dtype=torch.float64), torch.randn(1, 64, 2, 8, dtype=torch.float64)
    assert cpu_tuned.choose(short, short, False, False).name == "math"
    assert cpu_tuned.choose(long, long, False, False).name == "cpu_flash"
    assert cpu_tuned.choose(long, long, True, False).name == "math"
    request = ring_core.KernelRequest.for_tensors(short, short)
    assert "head_dim 16 not measured" in "; ".join(cpu_tuned.not_supported_reasons(
        ring_core.KernelRequest("cpu", torch.float64, 16, 2, 2)))  # fmt: skip
    assert any("dtype float32 not measured" in r for r in cpu_tuned.not_supported_reasons(
        ring_core.KernelRequest("cpu", torch.float32, 8, 2, 2)))  # fmt: skip
    assert cpu_tuned.supports(request)


def test_tuned_declines_what_no_measured_kernel_serves(cpu_tuned):
    request = ring_core.KernelRequest("cpu", torch.float64, 8, 2, 2)
    CPUTuned.fixed_table = table([Row(8, False, 8, {"sdpa_cudnn": 1.0, "nope": 0.5})])  # no CUDA here
    assert any("none of the measured kernels" in r for r in cpu_tuned.not_supported_reasons(request))
    assert ring_core.select_kernel(request).name == "cpu_flash"  # dispatch falls back to the priority order


@pytest.mark.parametrize("case", [c for c in CASES if c.head_dim == 8], ids=str)
def test_tuned_is_exact_through_the_engine(cpu_tuned, case):
    """float64 against the reference, forward and backward, whichever kernel each block gets."""
    fast = {4, 16, 64}  # math measured faster at these lengths, cpu_flash at the others
    rows = [
        Row(8, c, n, {"math": 0.5 if n in fast else 2.0, "cpu_flash": 1.0}) for c in (0, 1) for n in (4, 8, 16, 32, 64)
    ]
    CPUTuned.fixed_table = table(rows)
    attn = ring_core.DilatedAttention(**case.config, kernel="tuned_cpu_test")
    result = check_attention(attn, case, torch.float64, seed=7)
    assert result.passed, result.errors
    assert {b.name for b in TunedKernel._choices.values()} <= {"math", "cpu_flash"}


def test_info_prints_the_table(cpu_tuned, capsys):
    from ring_core.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "Kernel 'tuned_cpu_test'" in out and "measured on Test Card" in out and "fastest" in out
