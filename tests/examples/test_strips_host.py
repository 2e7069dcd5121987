"""``python -m tools.bench.strips_host --quick``: every row's host time, ops and the functions behind them, on tiny CPU
sizes (the strips' math twin; the GPU's kernel times, launches and syncs are measured only on a GPU)."""

from __future__ import annotations

import json

from tools.bench import strips_host


def test_quick_run_profiles_every_row(tmp_path, capsys):
    out = tmp_path / "host.json"
    assert strips_host.main(["--quick", "--ring", "4", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    rows = {row["name"]: row for row in record["rows"]}
    assert list(rows) == ["unpacked", "packed", "ring steps", "ring kernels"]
    assert record["documents"] > 1 and record["card"] == "cpu"
    for row in rows.values():
        assert row["wall_ms"] > 0 and row["aten_ops"] > 0 and row["kernel_ms"] == 0 and row["syncs"] == []
        functions = [entry["function"] for entry in row["host_functions"]]
        assert any("strip_call_forward" in name for name in functions), functions
    # the steps do what the kernels alone do and more (placing, merging, accumulating)
    assert rows["ring steps"]["aten_ops"] > rows["ring kernels"]["aten_ops"]
    assert "ring kernels" in capsys.readouterr().out
