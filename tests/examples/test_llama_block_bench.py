"""``python -m tools.bench.llama_block --quick``: the benchmark's rows, ratios and files, on tiny CPU sizes."""

from __future__ import annotations

import json

from tools.bench import llama_block


def test_quick_run_writes_every_row(tmp_path, capsys):
    out = tmp_path / "llama.json"
    assert llama_block.main(["--quick", "--compile-backend", "aot_eager", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {row["name"]: row for row in report["rows"]}
    names = [*llama_block.ROWS, *(f"{name} compiled" for name in llama_block.ROWS)]
    assert list(rows) == names
    assert all(row["ms"] > 0 and row["vs_sdpa"] > 0 for row in rows.values())
    assert rows["sdpa"]["vs_sdpa"] == 1.0 and all(
        rows[f"{n} compiled"]["compiled_vs_eager"] > 0 for n in llama_block.ROWS
    )
    # our dense configuration is SDPA's attention; the dilated one is not (so enable took effect)
    assert rows["ours dense"]["diff_vs_sdpa"] < 1e-5 and rows["ours dense compiled"]["diff_vs_sdpa"] < 1e-5
    assert rows["ours dilated"]["diff_vs_sdpa"] > 1e-3
    assert out.with_suffix(".png").stat().st_size > 0
    assert "ours dense compiled" in capsys.readouterr().out
