"""Which kernel is fastest for a block shape on a card: measured tables, and the measuring.

A table is JSON written by ``python -m tools.bench.kernel_table`` on one card: for each head
dim, causal flag and block length ``L``, the forward+backward time of each candidate
kernel on a batch of blocks (``tokens / L`` blocks of ``L`` query and key rows, ``heads``
heads). The ``tuned`` backend (:mod:`ring_flash.tuned`) looks a block up by its length
(the geometric mean of its query and key lengths, nearest measured length on a log
scale) and calls the fastest kernel of that row that can serve the request.

Tables shipped with the package live in ``ring_flash/tables/*.json`` and are matched by
the card's name and compute capability; ``RING_FLASH_KERNEL_TABLE=path`` uses another
file (``none``: no table, dispatch by priority).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ring_core.plugin import KernelBackend

__all__ = ["KernelTable", "Row", "load_table", "measure_rows", "table_for"]

TABLE_ENV = "RING_FLASH_KERNEL_TABLE"
FWD_BWD = 3.5  # forward+backward FLOPs over forward FLOPs


@dataclass(frozen=True)
class Row:
    """One measured block shape: milliseconds per kernel (forward+backward)."""

    head_dim: int
    causal: bool
    length: int
    ms: dict[str, float] = field(hash=False)

    def fastest(self, allowed: Iterable[str]) -> str | None:
        """The fastest measured kernel among ``allowed`` (``None`` if none was measured)."""
        times = [(self.ms[name], name) for name in allowed if name in self.ms]
        return min(times)[1] if times else None


@dataclass(frozen=True)
class KernelTable:
    """A card's measured rows and how they were measured."""

    card: str
    capability: tuple[int, int]
    dtypes: tuple[str, ...]
    rows: tuple[Row, ...]
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    source: str = ""

    @property
    def kernels(self) -> tuple[str, ...]:
        """Every kernel measured in some row, in first-seen order."""
        return tuple(dict.fromkeys(name for row in self.rows for name in row.ms))

    @property
    def head_dims(self) -> tuple[int, ...]:
        return tuple(sorted({row.head_dim for row in self.rows}))

    def row(self, head_dim: int, causal: bool, n: int, m: int) -> Row | None:
        """The measured row nearest to a block of ``n`` query and ``m`` key rows (log scale)."""
        rows = [r for r in self.rows if r.head_dim == head_dim and r.causal == causal]
        if not rows:
            return None
        target = 0.5 * (math.log2(max(n, 1)) + math.log2(max(m, 1)))
        return min(rows, key=lambda r: (abs(math.log2(r.length) - target), r.length))

    def lines(self) -> list[str]:
        """The table as text (``ring-attention info``): ms per kernel, fastest marked."""
        head = f"measured on {self.card} (capability {self.capability[0]}.{self.capability[1]})"
        when = ", ".join(f"{k} {self.meta[k]}" for k in ("dtype", "heads", "tokens", "torch", "date") if k in self.meta)
        lines = [head + (f"; {when}" if when else ""), f"source: {self.source}"]
        names = self.kernels
        header = ["head_dim", "causal", "length", *names, "fastest"]
        body = []
        for r in sorted(self.rows, key=lambda r: (r.head_dim, r.causal, r.length)):
            cells = [f"{r.ms[n]:.3f}" if n in r.ms else "-" for n in names]
            body.append([str(r.head_dim), "yes" if r.causal else "no", str(r.length), *cells, r.fastest(names) or "-"])
        widths = [max(len(c) for c in column) for column in zip(header, *body)]
        for cells in [header, *body]:
            lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
        lines.append("(milliseconds, forward+backward of one batch of blocks)")
        return lines


def load_table(path: str | Path) -> KernelTable:
    """A table from its JSON file; a file that is not one raises ``ValueError`` naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        rows = tuple(
            Row(int(r["head_dim"]), bool(r["causal"]), int(r["length"]), {k: float(v) for k, v in r["ms"].items()})
            for r in data["rows"]
        )
        capability = tuple(int(x) for x in data["capability"])
        table = KernelTable(str(data["card"]), (capability[0], capability[1]), tuple(data["dtypes"]), rows,
                            data.get("meta", {}), str(path))  # fmt: skip
    except (OSError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"{path} is not a kernel table ({type(exc).__name__}: {exc})") from exc
    if not rows:
        raise ValueError(f"{path} is not a kernel table: it has no rows")
    return table


@cache
def packaged_tables() -> tuple[KernelTable, ...]:
    """The tables shipped in ``ring_flash/tables``."""
    folder = resources.files("ring_flash") / "tables"
    if not folder.is_dir():
        return ()
    return tuple(
        load_table(Path(str(entry))) for entry in sorted(folder.iterdir(), key=str) if entry.name.endswith(".json")
    )


def table_for(card: str, capability: tuple[int, int]) -> KernelTable | None:
    """The table for this card: ``RING_FLASH_KERNEL_TABLE`` if set, else a shipped one of the same card."""
    chosen = os.environ.get(TABLE_ENV)
    if chosen:
        return None if chosen.lower() == "none" else _load_cached(chosen)
    for table in packaged_tables():
        if table.card == card and table.capability == capability:
            return table
    return None


@cache
def _load_cached(path: str) -> KernelTable:
    return load_table(path)


# -- measuring -----------------------------------------------------------------------------------


def measure_rows(
    kernels: Sequence[KernelBackend],
    *,
    lengths: Sequence[int],
    head_dims: Sequence[int],
    causal_flags: Sequence[bool] = (False, True),
    heads: int = 16,
    tokens: int = 32768,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    repeats: int = 7,
    warmup: int = 2,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Time each kernel's forward+backward on ``tokens // L`` blocks of length ``L``, for every shape.

    Kernels alternate within each repeat (so drift hits them alike); the median is kept. A
    kernel that fails on a shape is left out of that row (its error goes to ``progress``).
    """
    device = torch.device(device)
    rows = []
    for head_dim in head_dims:
        for causal in causal_flags:
            for length in lengths:
                blocks = max(1, tokens // length)
                q, k, v, dout = (
                    torch.randn(blocks, length, heads, head_dim, device=device, dtype=dtype) for _ in range(4)
                )
                steps = {}
                for kernel in kernels:
                    step = _step(kernel, q, k, v, dout, causal)
                    try:
                        for _ in range(warmup):
                            step()
                    except Exception as exc:  # a kernel that cannot run this shape has no entry
                        if progress:
                            progress(f"{kernel.name} D={head_dim} causal={causal} L={length}: {exc!r}"[:300])
                        continue
                    steps[kernel.name] = step
                times: dict[str, list[float]] = {name: [] for name in steps}
                for _ in range(repeats):
                    for name, step in steps.items():
                        times[name].append(_elapsed_ms(step, device))
                ms = {name: statistics.median(t) for name, t in times.items()}
                pairs = blocks * heads * (length * (length + 1) // 2 if causal else length * length)
                row = {"head_dim": head_dim, "causal": causal, "length": length, "blocks": blocks, "ms": ms,
                       "tflops": {n: FWD_BWD * 4 * pairs * head_dim / (t * 1e9) for n, t in ms.items()}}  # fmt: skip
                rows.append(row)
                if progress:
                    progress(
                        f"D={head_dim} causal={causal} L={length}: " + ", ".join(f"{n} {t:.3f}" for n, t in ms.items())
                    )
                del q, k, v, dout, steps
    return rows


def _step(
    kernel: KernelBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, causal: bool
) -> Callable[[], object]:
    scale = q.shape[-1] ** -0.5

    def step() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, lse = kernel.forward(q, k, v, scale=scale, causal=causal)
        return kernel.backward(dout, q, k, v, out, lse, scale=scale, causal=causal)

    return step


def _elapsed_ms(step: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        elapsed: float = start.elapsed_time(end)
        return elapsed
    begin = time.perf_counter()
    step()
    return (time.perf_counter() - begin) * 1e3
