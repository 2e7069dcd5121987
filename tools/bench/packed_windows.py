"""Packed sequences and sliding windows on one GPU: ours next to the bare kernel calls, same run.

Sections (bf16, B=1, H=16, D=128, forward+backward, CUDA events):

- ``packed``: 64 documents of lengths drawn from 512..4096 (seed 0) in one causal sequence:
  ``ring_dilated_flash`` with ``cu_seqlens`` against the bare aten flash varlen call
  (``_flash_attention_forward/backward`` with cumulative lengths; target ratio >= 0.95)
  and FlexAttention with a document mask (a user's alternative). aten's cuDNN call with
  cumulative lengths is left out: its backward (torch 2.11, H200) ends in a CUDA error
  that poisons the process.
- ``window``: a causal sliding window of 4096 at N = 32K, 64K, 128K against the bare
  windowed flash call (target >= 0.95); the time must grow with N, not N^2.
- ``dilated``: segments [2048, 4096, 8192], rates [1, 2, 4] on the packed documents against
  the same dilated attention unpacked, same number of tokens (target: within 10%).

Every row says which path ours ran (``last_path``: varlen, segments, ...), and ours is
checked against the bare call's output before it is timed. Writes the JSON to ``--out``
and a plot next to it (``.png``); prints a table last.

    python -m tools.bench.packed_windows --out docs/benchmarks/packed-windows-h200.json
    python -m tools.bench.packed_windows --quick   # a tiny version on the CPU, float32
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

import ring_core
from ring_core.bench import useful_pairs
from ring_core.testing import relative_error
from tools.bench.timing import median_ms

FWD_BWD = 3.5
SEGMENTS, RATES = [2048, 4096, 8192], [1, 2, 4]
SECTIONS = ("packed", "window", "dilated")


class Setup:
    """Sizes of one run: the GPU's (default) or the CPU's ``--quick`` ones."""

    def __init__(self, quick: bool, device: str) -> None:
        self.device = torch.device(device)
        self.quick = quick
        self.dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        self.heads, self.head_dim = (2, 16) if quick else (16, 128)
        self.documents, self.doc_range = (8, (16, 64)) if quick else (64, (512, 4096))
        self.window = 16 if quick else 4096
        self.window_lengths = (128, 256, 512) if quick else (32768, 65536, 131072)
        self.segments = [16, 32, 64] if quick else SEGMENTS
        self.iters, self.repeats = (1, 2) if quick else (5, 5)

    def randn(self, *shape, seed: int, grad: bool = True) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(*shape, generator=generator, dtype=torch.float32).to(self.device, self.dtype)
        return x.requires_grad_(grad)

    def cu_seqlens(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        low, high = self.doc_range
        lengths = torch.randint(low, high + 1, (self.documents,), generator=generator)
        return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)


def fwd_bwd(fn: Callable[..., torch.Tensor], q, k, v, dout) -> Callable[[], tuple]:
    def step():
        out = fn(q, k, v)
        return torch.autograd.grad(out, (q, k, v), dout)

    return step


def tflops(pairs: int, head_dim: int, ms: float) -> float:
    return FWD_BWD * 4 * head_dim * pairs / (ms * 1e-3) / 1e12


# -- the bare calls --------------------------------------------------------------------------------


class _BareFlash(torch.autograd.Function):
    """aten's flash call on ``(B, N, H, D)`` or, with ``cu``, packed ``(total, H, D)`` rows; nothing else."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len, causal, window):  # type: ignore[override]
        options = {} if window is None else {"window_size_left": window[0], "window_size_right": window[1]}
        n = q.shape[-3]
        out, lse, *_ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len or n, max_len or n, 0.0, causal, False, scale=q.shape[-1] ** -0.5, **options
        )
        ctx.save_for_backward(q, k, v, out, lse, cu if cu is not None else torch.empty(0))
        ctx.args = (max_len or n, causal, options, cu is not None)
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse, cu = ctx.saved_tensors
        max_len, causal, options, varlen = ctx.args
        empty = torch.empty(0, dtype=torch.int64, device=q.device)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout.contiguous(), q, k, v, out, lse, cu if varlen else None, cu if varlen else None, max_len, max_len,
            0.0, causal, empty, empty, scale=q.shape[-1] ** -0.5, **options,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None


def bare_flash(cu=None, max_len=None, causal=True, window=None):
    return lambda q, k, v: _BareFlash.apply(q, k, v, cu, max_len, causal, window)


def flex_documents(document: torch.Tensor, n: int, device):
    """FlexAttention with a causal document mask (compiled once); the block mask is built (compiled,
    never as a dense N x N mask) on the first call, which is not timed."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        return (document[q_idx] == document[kv_idx]) & (q_idx >= kv_idx)

    compiled = torch.compile(flex_attention)
    block_mask = []

    def fn(q, k, v):
        if not block_mask:
            block_mask.append(create_block_mask(mask_mod, None, None, n, n, device=device, _compile=True))
        out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask[0])
        return out.transpose(1, 2)

    return fn


# -- sections -----------------------------------------------------------------------------------------


def _row(name: str, fn, inputs, setup: Setup, pairs: int, reference=None, module=None) -> dict:
    """Check ``fn`` against ``reference`` (an output) if given, then time it; errors become the row."""
    row = {"name": name}
    try:
        q, k, v, dout = inputs
        if reference is not None:
            with torch.no_grad():
                row["error_vs_bare"] = relative_error(fn(q, k, v), reference)
        ms = median_ms(fwd_bwd(fn, q, k, v, dout), iters=setup.iters, repeats=setup.repeats, device=setup.device)
        row.update(ms=ms, tflops=tflops(pairs, setup.head_dim, ms))
        if module is not None:
            row["path"] = getattr(module, "last_path", None)
    except Exception as exc:  # report and go on
        row["error"] = f"{type(exc).__name__}: {exc}"[:400]
        traceback.print_exc()
    return row


def _ratios(rows: list[dict], ours: str) -> None:
    base = next((r for r in rows if r["name"] == ours and "ms" in r), None)
    for r in rows:
        if base is not None and "ms" in r and r is not base:
            r["ours_speed_ratio"] = r["ms"] / base["ms"]  # > 1: ours is faster


def bench_packed(setup: Setup) -> dict:
    cu = setup.cu_seqlens().to(setup.device)
    n, h, d = int(cu[-1]), setup.heads, setup.head_dim
    lengths = (cu[1:] - cu[:-1]).tolist()
    max_len = max(lengths)
    pairs = h * sum(x * (x + 1) // 2 for x in lengths)
    q, k, v, dout = (setup.randn(1, n, h, d, seed=i, grad=i < 3) for i in range(4))
    ours = ring_core.create_attention("ring_dilated_flash", segment_lengths=[n], dilation_rates=[1])

    def ours_fn(q, k, v):
        return ours(q, k, v, is_causal=True, cu_seqlens=cu)

    rows = []
    packed = [x[0] for x in (q, k, v, dout)]
    if setup.device.type == "cuda":
        bare = bare_flash(cu, max_len)
        with torch.no_grad():
            reference = bare(*packed[:3]).unsqueeze(0)
        rows.append(_row("bare aten flash varlen", bare, packed, setup, pairs))
        document = torch.repeat_interleave(torch.arange(len(lengths), device=setup.device), cu[1:] - cu[:-1])
        rows.append(
            _row("flex document mask", flex_documents(document, n, setup.device), (q, k, v, dout), setup, pairs)
        )
    else:  # no varlen kernel on the CPU: SDPA one document at a time
        bounds = cu.tolist()

        def per_document(q, k, v):
            outs = [
                torch.nn.functional.scaled_dot_product_attention(
                    *(x[:, a:b].transpose(1, 2) for x in (q, k, v)), is_causal=True
                ).transpose(1, 2)
                for a, b in itertools.pairwise(bounds)
            ]
            return torch.cat(outs, 1)

        with torch.no_grad():
            reference = per_document(q, k, v)
        rows.append(_row("sdpa per document (cpu)", per_document, (q, k, v, dout), setup, pairs))
    rows.insert(0, _row("ours", ours_fn, (q, k, v, dout), setup, pairs, reference, ours))
    _ratios(rows, "ours")
    return {"tokens": n, "documents": len(lengths), "lengths": lengths, "rows": rows}


def bench_window(setup: Setup) -> dict:
    h, d, w = setup.heads, setup.head_dim, setup.window
    results = []
    for n in setup.window_lengths:
        pairs = h * sum(min(t, w) + 1 for t in range(n))
        q, k, v, dout = (setup.randn(1, n, h, d, seed=i, grad=i < 3) for i in range(4))
        ours = ring_core.create_attention(
            "ring_dilated_flash", segment_lengths=[n], dilation_rates=[1], window_size=(w, 0)
        )
        rows = []
        if setup.device.type == "cuda":
            bare = bare_flash(causal=False, window=(w, 0))
        else:  # the CPU's SDPA with the band as a mask
            t = torch.arange(n)
            band = (t[None, :] <= t[:, None]) & (t[None, :] >= t[:, None] - w)

            def bare(q, k, v, band=band):
                return torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=band
                ).transpose(1, 2)

        with torch.no_grad():
            reference = bare(q, k, v)
        rows.append(_row("bare windowed kernel", bare, (q, k, v, dout), setup, pairs))
        rows.insert(0, _row("ours", lambda q, k, v, m=ours: m(q, k, v, is_causal=True), (q, k, v, dout), setup,
                            pairs, reference, ours))  # fmt: skip
        _ratios(rows, "ours")
        results.append({"tokens": n, "window": w, "rows": rows})
        del q, k, v, dout
    times = [r["rows"][0].get("ms") for r in results]
    growth = times[-1] / times[0] if None not in times else None
    return {"lengths": list(setup.window_lengths), "results": results, "time_growth_first_to_last": growth}


def bench_dilated(setup: Setup) -> dict:
    cu = setup.cu_seqlens().to(setup.device)
    n, h, d = int(cu[-1]), setup.heads, setup.head_dim
    lengths = (cu[1:] - cu[:-1]).tolist()
    packed_pairs = sum(useful_pairs(x, h, setup.segments, RATES, causal=True) for x in lengths)
    pairs = useful_pairs(n, h, setup.segments, RATES, causal=True)
    q, k, v, dout = (setup.randn(1, n, h, d, seed=i, grad=i < 3) for i in range(4))
    attn = ring_core.create_attention("ring_dilated_flash", segment_lengths=setup.segments, dilation_rates=RATES)
    rows = [
        _row("ours packed", lambda q, k, v: attn(q, k, v, is_causal=True, cu_seqlens=cu), (q, k, v, dout), setup,
             packed_pairs, module=attn),
        _row("ours unpacked", lambda q, k, v: attn(q, k, v, is_causal=True), (q, k, v, dout), setup, pairs,
             module=attn),
    ]  # fmt: skip
    _ratios(rows, "ours packed")
    return {"tokens": n, "segments": setup.segments, "rates": RATES, "rows": rows}


# -- output -------------------------------------------------------------------------------------------


def table(report: dict) -> str:
    lines = []
    for section in SECTIONS:
        data = report.get(section)
        if not data:
            continue
        groups = data.get("results", [data])
        for group in groups:
            head = f"{section} N={group.get('tokens')}"
            for r in group.get("rows", []):
                cell = f"{r['ms']:9.2f} ms {r['tflops']:7.1f} TFLOP/s" if "ms" in r else f"ERROR {r.get('error')}"
                extra = "".join(
                    f"  {key}={r[key]:.3g}" for key in ("ours_speed_ratio", "error_vs_bare") if key in r
                ) + (f"  path={r['path']}" if r.get("path") else "")
                lines.append(f"{head:24s} {r['name']:28s} {cell}{extra}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    for ax, section in zip(axes, SECTIONS):
        data = report.get(section) or {}
        labels, values = [], []
        for group in data.get("results", [data]):
            for r in group.get("rows", []):
                if "ms" in r:
                    labels.append(f"{r['name']}\nN={group.get('tokens')}")
                    values.append(r["ms"])
        ax.barh(range(len(values)), values, color="tab:blue")
        ax.set_yticks(range(len(values)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("fwd+bwd ms")
        ax.set_title(section)
    fig.suptitle(report["meta"]["title"], fontsize=9)
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="JSON path (the plot goes next to it, .png)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (float32): checks the script")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --quick")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.quick else "cuda")
    setup = Setup(args.quick, device)
    card = torch.cuda.get_device_name(setup.device) if setup.device.type == "cuda" else "cpu"
    report = {
        "meta": {
            "card": card,
            "torch": torch.__version__,
            "date": datetime.date.today().isoformat(),
            "command": " ".join(["python", *sys.argv]),
            "title": f"{card}, {str(setup.dtype).replace('torch.', '')}, B=1 H={setup.heads} D={setup.head_dim}, "
            "causal, fwd+bwd",
            "kernels": [(k.name, k.supports_window, k.supports_varlen) for k in ring_core.list_kernels()],
        }
    }
    sections = {"packed": bench_packed, "window": bench_window, "dilated": bench_dilated}
    for name in args.sections.split(","):
        print(f"[{name}]", file=sys.stderr, flush=True)
        report[name] = sections[name](setup)
        if setup.device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        plot(report, out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}")
    print(report["meta"]["title"])
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
