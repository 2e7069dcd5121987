"""Reading the published benchmark JSON (docs/benchmarks/) and writing it as markdown a reader can take in.

Shared by the benchmarks page (``benchpage.py``), its figures (``benchfigures.py``) and the
README's headline (``headline.py``): which published run each answer reads, file loading,
number formats, tables with human column names, the line that says where a number comes
from, and the folded view of a whole file (older runs, variants).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = ROOT / "docs" / "benchmarks"

# JSON keys -> column names with units, for the folded views of whole files
COLUMNS = {
    "name": "implementation",
    "method": "method",
    "kernel": "kernel",
    "case": "case",
    "causal": "causal",
    "P": "GPUs",
    "N": "N (tokens)",
    "seq_len": "N (tokens)",
    "N_per_gpu": "tokens per GPU",
    "ms": "time (ms)",
    "time_ms": "time (ms)",
    "fwd_ms": "forward (ms)",
    "fwd_bwd_ms": "forward+backward (ms)",
    "cp_ms": "context parallel (ms)",
    "copy_engine_ms": "copy engines (ms)",
    "tflops": "useful TFLOP/s",
    "tflops_per_gpu": "TFLOP/s per GPU",
    "cp_tflops_per_gpu": "context parallel TFLOP/s per GPU",
    "useful_tflops_fwd_bwd": "useful TFLOP/s",
    "peak_mem_mib": "peak (MiB)",
    "peak_mib": "peak (MiB)",
    "peak_gib": "peak (GiB)",
    "extra_peak_gib": "peak above inputs (GiB)",
    "ratio_to_sdpa": "time / SDPA's time (< 1: faster)",
    "speedup_vs_sdpa": "speed-up vs SDPA",
    "ours_over_cp": "speed-up vs context parallel",
    "bare_over_ours": "speed vs bare cuDNN",
    "bare_over_this": "speed vs bare cuDNN",
    "ratio_fwd_bwd": "time / dense cuDNN's",
    "density": "density",
    "pattern": "pattern",
    "variant": "variant",
    "strategy": "strategy",
    "err_out": "error, output",
    "err_grad": "error, gradients (max)",
    "host_ms": "host time per step (ms)",
    "bytes_fwd": "sent forward (bytes)",
    "bytes_bwd": "sent backward (bytes)",
}
SKIP = {"runs_ms", "kernel_options", "section", "target_density", "first_call_s", "cp_backend", "candidate"}


@cache
def load(name: str) -> dict[str, Any]:
    """A published benchmark file by name (``flex-dilated-h200.json``)."""
    return json.loads((BENCH_DIR / name).read_text())


def meta(data: dict[str, Any]) -> dict[str, Any]:
    """``card``, ``date``, ``command`` (and the rest) whether a file keeps them under ``meta`` or at the top."""
    found = {k: v for k, v in data.items() if not isinstance(v, (dict, list))}
    return {**found, **data.get("meta", {})}


def day(value: str) -> str:
    return str(value)[:10]


def number(value: float, digits: int = 3) -> str:
    """A number to ``digits`` significant digits, thousands separated, no exponent for everyday sizes."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or (float(value).is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    text = f"{value:.{digits}g}"
    if "e" in text:
        return f"{value:,.0f}" if abs(value) >= 1 else text
    return f"{float(text):,}" if abs(value) >= 1000 else text


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines)


def source(name: str, link_prefix: str = "benchmarks/") -> str:
    """Where a table's numbers come from: card, date, command and the JSON file (linked)."""
    info = meta(load(name))
    parts = [f"**{info.get('card', 'card not recorded')}**", day(info.get("date", "date not recorded"))]
    command = str(info.get("command", "")).split(" (")[0]
    if command:
        parts.append(f"`{command}`")
    return "Measured on " + ", ".join(parts) + f" ([{name}]({link_prefix}{name}))."


def png(figure: Any) -> bytes:
    """A matplotlib figure as PNG bytes without a timestamp, so an unchanged figure gives unchanged bytes."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()


# -- folded views of whole files --------------------------------------------------------------
def _rows_of(data: dict[str, Any]) -> list[tuple[str, list[dict]]]:
    """Every list of result rows in a file, with a caption: top-level ``results``/``rows`` and sections."""
    found = []
    for key in ("results", "rows"):
        rows = [r for r in data.get(key) or [] if isinstance(r, dict)]
        for section in dict.fromkeys(r.get("section") for r in rows):
            found.append((section or "", [r for r in rows if r.get("section") == section]))
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(value.get("rows"), list):
            found.append((key, [r for r in value["rows"] if isinstance(r, dict)]))
    return [(caption, rows) for caption, rows in found if rows]


def folded(name: str, title: str, note: str = "") -> str:
    """A whole file as a collapsed block: its source line and each of its row lists as a table."""
    data = load(name)
    body = [source(name), note] if note else [source(name)]
    for caption, rows in _rows_of(data):
        keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in SKIP]
        keys = [k for k in keys if not any(isinstance(r.get(k), (list, dict)) for r in rows)]
        if caption:
            body.append(f"**{caption}**")
        header = [COLUMNS.get(k, k.replace("_", " ")) for k in keys]
        body.append(table(header, [[number(r[k]) if k in r else "" for k in keys] for r in rows]))
    inner = "\n\n".join(body).replace("\n", "\n    ")
    return f'??? note "{title}"\n    {inner}\n'


# -- the published runs the pages and the headline read -------------------------------------
FLEX = "flex-dilated-h200.json"


DISPATCH = "flash-dispatch-h200.json"
MULTIHEAD = "multihead-causal-h200.json"
MEMORY = {"flash-memory-h200.json": ("memory",), "flash-dilated-h100.json": ("memory",)}


RING = "ring-4xh200.json"


SPARSE = "blocksparse-h200.json"
STRIPS = "blocksparse-strips-fa4-h200.json"
# a later run of the dilated + layout rows and the simulated ring (after the ring-step and backward changes)
STRIPS_RING = "blocksparse-strips-ring-h200.json"
# a later run of the gather path against the strips (after its rows moved to one Triton pass per row)
STRIPS_GATHER = "blocksparse-strips-gather-h200.json"
# the strips compiled against eager, and packed documents starting anywhere on the strips against the gather path
STRIPS_COMPILED = "blocksparse-strips-compiled-h200.json"
# the dilated + layout, compiled and packed rows after a branch's FlexAttention calls were batched into one
STRIPS_BATCHED = "blocksparse-strips-batched-h200.json"
# the simulated ring again, with the same steps' kernels alone beside it (saved under its own name)
STRIPS_RING_KERNELS = "blocksparse-strips-ring-kernels-h200.json"
# random + dilated with block tiles (strips of rates 2 and 4 at one layout block) against 128-row tiles (one H100)
STRIPS_BLOCK_TILES = "blocksparse-strips-block-tiles-h100.json"
WINDOWS = "packed-windows-h200.json"
SPARSE_RING = "blocksparse-ring-2xh200.json"
CPU = "cli-bench-cpu.json"
CPU_LONG = "core-cpu.json"


def strip_patterns() -> list[dict]:
    """The strips run's registered patterns at density 0.10 (one rate-1 branch), vs dense SDPA cuDNN."""
    return [r for r in load(STRIPS)["results"] if r["section"] == "pattern" and abs(r["density"] - 0.1) < 0.005]


def mask(causal: bool) -> str:
    return "causal" if causal else "non-causal"


def one_gpu_numbers() -> dict[str, dict[bool, dict]]:
    """``{name: {causal: row}}`` of the three-way run (ours, FlexAttention, bare cuDNN calls)."""
    found: dict[str, dict[bool, dict]] = {}
    for row in load(FLEX)["results"]:
        found.setdefault(row["name"], {})[row["causal"]] = row
    return found


def memory_runs() -> list[tuple[str, str, dict]]:
    """``(file, card, memory section)`` of each card, largest card first."""
    runs = [(name, meta(load(name))["card"], load(name)["memory"]) for name in MEMORY]
    return sorted(runs, key=lambda run: -run[2]["card_gib"])


def ring_rows() -> list[dict]:
    return [r for r in load(RING)["rows"] if r["section"] == "timing"]
