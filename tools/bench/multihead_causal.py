"""``MultiheadDilatedAttention`` (dense configuration) against ``nn.MultiheadAttention`` in every causal form.

One GPU, bf16, self-attention ``x`` of ``(1, N, E)`` (batch_first), forward+backward of the
output and every parameter, both modules with the same weights, measured in the same run
(mirrored order, two rounds). Forms (``attn_mask`` is the boolean causal mask):

- ``none``: no mask;
- ``hint``: ``attn_mask`` and ``is_causal=True`` (as ``nn.MultiheadAttention``'s docs ask);
- ``is_causal``: ours with ``is_causal=True`` alone, nn with the hint (it needs the mask);
- ``mask``: ``attn_mask`` without the hint.

Target: ours at least 0.98 of nn's speed in every form (ratio = nn ms / ours ms).

    python -m tools.bench.multihead_causal --out multihead.json --plot multihead.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys

import torch
from torch import nn

from ring_core.testing import relative_error
from ring_multihead import MultiheadDilatedAttention
from tools import command_line
from tools.bench.timing import median_ms

FORMS = ("none", "hint", "is_causal", "mask")


def kwargs_for(form: str, module: str, mask: torch.Tensor) -> dict:
    if form == "none":
        return {}
    if form == "mask":
        return {"attn_mask": mask}
    if form == "is_causal" and module == "ours":
        return {"is_causal": True}
    return {"attn_mask": mask, "is_causal": True}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--plot")
    parser.add_argument("--embed-dim", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=16384)
    args = parser.parse_args(argv)
    e, h, n = args.embed_dim, args.heads, args.seq_len
    factory = {"device": "cuda", "dtype": torch.bfloat16}
    torch.manual_seed(0)
    modules = {"nn": nn.MultiheadAttention(e, h, batch_first=True, **factory)}
    modules["ours"] = MultiheadDilatedAttention(e, h, batch_first=True, **factory)
    modules["ours"].load_state_dict(modules["nn"].state_dict())
    x = torch.randn(1, n, e, **factory, requires_grad=True)
    grad = torch.randn(1, n, e, **factory)
    mask = torch.ones(n, n, dtype=torch.bool, device="cuda").triu(1)
    rows = []
    for form in FORMS:
        outs = {}
        for name, module in modules.items():
            outs[name] = module(x, x, x, need_weights=False, **kwargs_for(form, name, mask))[0].detach().float()
        agreement = relative_error(outs["ours"], outs["nn"])
        times: dict[str, list[float]] = {name: [] for name in modules}
        for order in (list(modules), list(modules)[::-1]):
            for name in order:
                module, kwargs = modules[name], kwargs_for(form, name, mask)

                def step(module=module, kwargs=kwargs):
                    module(x, x, x, need_weights=False, **kwargs)[0].backward(grad)

                times[name].append(median_ms(step, iters=5, warmup=2, repeats=5))
                x.grad = None
                module.zero_grad(set_to_none=True)
        ms = {name: statistics.mean(t) for name, t in times.items()}
        row = {"form": form, "nn ms": ms["nn"], "ours ms": ms["ours"], "speed_vs_nn": ms["nn"] / ms["ours"],
               "output_difference_bf16": agreement, "ms": ms, "rounds": times}  # fmt: skip
        rows.append(row)
        print(f"{form}: nn {ms['nn']:.2f} ms, ours {ms['ours']:.2f} ms, speed {row['speed_vs_nn']:.3f}, "
              f"outputs differ by {agreement:.1e}", file=sys.stderr, flush=True)  # fmt: skip
    data = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": command_line(),
        "what": f"ms per forward+backward, bf16, E={e}, {h} heads, N={n}, B=1, self-attention, need_weights=False",
        "target": "speed_vs_nn (nn ms / ours ms) >= 0.98 in every form",
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1)
    print(f"\n{data['card']}: {data['what']}")
    for r in rows:
        print(f"{r['form']:10s} nn {r['ms']['nn']:7.2f}  ours {r['ms']['ours']:7.2f}  speed {r['speed_vs_nn']:.3f}")
    if args.plot:
        plot(args.plot, data)
    return 0


def plot(path: str, data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, name in enumerate(("nn", "ours")):
        label = "nn.MultiheadAttention" if name == "nn" else "MultiheadDilatedAttention"
        ax.bar([j + 0.4 * i for j in range(len(rows))], [r["ms"][name] for r in rows], 0.4, label=label)
    ax.set_xticks([j + 0.2 for j in range(len(rows))])
    ax.set_xticklabels([r["form"] for r in rows])
    ax.set_ylabel("ms, forward+backward")
    ax.set_title(f"{data['card']}: {data['what']}", fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
