"""A 1B-parameter-shaped Llama block stack, forward+backward, with our attention vs transformers' SDPA.

transformers' ``LlamaModel`` from a ``LlamaConfig`` (hidden 2048, 16 heads, 8 key/value heads,
MLP 8192, ``--layers`` decoder layers, bf16, random weights: no download) on one sequence of
``--tokens`` tokens (32K), one step = forward, backward of a fixed random gradient of the last
hidden state. Rows, each on its own model built from the same seed:

- ``sdpa``: ``attn_implementation="sdpa"`` (the baseline);
- ``ours dense``: ``ring_transformers.enable(model, "ring_dilated_flash", segment_lengths=[N],
  dilation_rates=[1])``, exactly SDPA's attention;
- ``ours dilated``: the same with segments [2048, 4096, 8192] and rates [1, 2, 4] (LongNet);
- each again under ``torch.compile`` (``compiled`` rows).

Reports ms per step, tokens/s, ``vs_sdpa`` (the row's throughput over ``sdpa``'s: the target for
``ours dense`` is >= 0.97) and ``compiled_vs_eager`` (the compiled row's throughput over its eager
row's) and ``diff_vs_sdpa`` (the relative difference of the last hidden state from the eager
``sdpa`` row's: rounding for SDPA's attention, large for the dilated one). Writes the JSON to ``--out`` and a plot next to it (``.png``); prints a table last.

    python -m tools.bench.llama_block --out docs/benchmarks/llama-block-h200.json
    python -m tools.bench.llama_block --quick   # tiny sizes on the CPU (float32): checks the script
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tools import command_line
from tools.bench.timing import median_ms

ROWS = ("sdpa", "ours dense", "ours dilated")
SEGMENTS, RATES = [2048, 4096, 8192], [1, 2, 4]


@dataclass
class Setup:
    """Sizes of one run: the GPU's (default) or the CPU's ``--quick`` ones."""

    device: torch.device
    dtype: torch.dtype
    tokens: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    segments: list[int]
    iters: int
    repeats: int
    compile_backend: str

    @classmethod
    def make(cls, args: argparse.Namespace) -> Setup:
        device = torch.device(args.device or ("cpu" if args.quick else "cuda"))
        if args.quick:
            sizes = {"tokens": args.tokens or 256, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128}
            sizes.update(layers=args.layers or 2, segments=[32, 64, 128], iters=1, repeats=2)
        else:
            sizes = {"tokens": args.tokens or 32768, "hidden": 2048, "heads": 16, "kv_heads": 8, "intermediate": 8192}
            sizes.update(layers=args.layers or 4, segments=SEGMENTS, iters=3, repeats=5)
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        return cls(device=device, dtype=dtype, compile_backend=args.compile_backend, **sizes)

    def config(self) -> Any:
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=1024, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            max_position_embeddings=self.tokens, attn_implementation="sdpa", use_cache=False,
        )  # fmt: skip

    def options(self, row: str) -> dict[str, Any] | None:
        """``enable``'s options of a row (None: transformers' SDPA)."""
        if row == "ours dense":
            return {"segment_lengths": [self.tokens], "dilation_rates": [1]}
        if row == "ours dilated":
            return {"segment_lengths": [min(s, self.tokens) for s in self.segments], "dilation_rates": RATES}
        return None


def build(setup: Setup, row: str, compiled: bool) -> torch.nn.Module:
    """A ``LlamaModel`` of the row's attention, the same weights for every row (seed 0)."""
    from transformers import LlamaModel

    import ring_transformers

    torch.manual_seed(0)
    model = LlamaModel(setup.config()).to(setup.device, setup.dtype).train()
    options = setup.options(row)
    if options is not None:
        ring_transformers.enable(model, "ring_dilated_flash", **options)
    return torch.compile(model, backend=setup.compile_backend) if compiled else model


def inputs(setup: Setup) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1024, (1, setup.tokens), generator=generator).to(setup.device)
    grad = torch.randn(1, setup.tokens, setup.hidden, generator=generator).to(setup.device, setup.dtype)
    return ids, grad


def run_row(setup: Setup, row: str, compiled: bool, baseline: torch.Tensor | None) -> tuple[dict, torch.Tensor | None]:
    """One row: its output (checked against the baseline's) and its time; an error becomes the row."""
    result: dict[str, Any] = {"name": row + (" compiled" if compiled else ""), "attention": row, "compiled": compiled}
    output = None
    try:
        model = build(setup, row, compiled)
        ids, grad = inputs(setup)
        with torch.no_grad():
            output = model(input_ids=ids).last_hidden_state.float()
        if baseline is not None:  # ~0 (rounding) where the attention is SDPA's; dilated differs by design
            result["diff_vs_sdpa"] = ((output - baseline).norm() / baseline.norm()).item()

        def step() -> None:
            model.zero_grad(set_to_none=True)
            model(input_ids=ids).last_hidden_state.backward(grad)

        ms = median_ms(step, iters=setup.iters, warmup=2, repeats=setup.repeats, device=setup.device)
        result.update(ms=ms, tokens_per_s=setup.tokens / (ms * 1e-3))
    except Exception as exc:  # report and go on
        result["error"] = f"{type(exc).__name__}: {exc}"[:400]
        traceback.print_exc()
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
    return result, output


def ratios(rows: list[dict]) -> None:
    """``vs_sdpa``: throughput over the SDPA row of the same mode; ``compiled_vs_eager``: over the eager row."""
    by_name = {r["name"]: r for r in rows if "ms" in r}
    for r in rows:
        if "ms" not in r:
            continue
        sdpa = by_name.get("sdpa" + (" compiled" if r["compiled"] else ""))
        if sdpa is not None:
            r["vs_sdpa"] = sdpa["ms"] / r["ms"]
        eager = by_name.get(r["attention"])
        if r["compiled"] and eager is not None:
            r["compiled_vs_eager"] = eager["ms"] / r["ms"]


def table(report: dict) -> str:
    lines = [report["meta"]["title"]]
    for r in report["rows"]:
        cell = f"{r['ms']:10.2f} ms {r['tokens_per_s']:10.0f} tok/s" if "ms" in r else f"ERROR {r.get('error')}"
        extra = "".join(f"  {k}={r[k]:.3g}" for k in ("vs_sdpa", "compiled_vs_eager", "diff_vs_sdpa") if k in r)
        lines.append(f"{r['name']:24s} {cell}{extra}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if "ms" in r]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5), constrained_layout=True)
    ax.barh(range(len(rows)), [r["tokens_per_s"] for r in rows], color="tab:blue")
    ax.set_yticks(range(len(rows)), [r["name"] for r in rows])
    for index, r in enumerate(rows):
        label = f" {r['vs_sdpa']:.2f}x sdpa{' compiled' if r['compiled'] else ''}" if "vs_sdpa" in r else ""
        ax.annotate(label, (r["tokens_per_s"], index), va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s (forward+backward)")
    ax.set_title(report["meta"]["title"], fontsize=9)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="JSON path (the plot goes next to it, .png)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (float32): checks the script")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --quick")
    parser.add_argument("--tokens", type=int, default=None, help="sequence length (default 32768; quick 256)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 4; quick 2)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"attention rows, of {list(ROWS)}")
    parser.add_argument("--no-compile", action="store_true", help="eager rows only")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile's backend (default inductor)")
    args = parser.parse_args(argv)
    setup = Setup.make(args)
    card = torch.cuda.get_device_name(setup.device) if setup.device.type == "cuda" else "cpu"
    dtype = str(setup.dtype).replace("torch.", "")
    report: dict[str, Any] = {
        "meta": {
            "card": card, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "command": command_line(), "setup": {k: str(v) for k, v in vars(setup).items()},
            "title": f"{card}, {dtype}, Llama {setup.layers} layers, hidden {setup.hidden}, {setup.heads} heads "
            f"({setup.kv_heads} KV), N={setup.tokens}, fwd+bwd",
        },
        "rows": [],
    }  # fmt: skip
    names = [row.strip() for row in args.rows.split(",")]
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        parser.error(f"--rows: unknown {unknown}; known: {list(ROWS)}")
    baseline = None
    for compiled in (False,) if args.no_compile else (False, True):
        for row in names:
            print(f"[{row}{' compiled' if compiled else ''}]", file=sys.stderr, flush=True)
            result, output = run_row(setup, row, compiled, baseline)
            if row == "sdpa" and not compiled:
                baseline = output
            report["rows"].append(result)
    ratios(report["rows"])
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        plot(report, out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}")
    print(table(report))
    return 0 if all("ms" in r for r in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
