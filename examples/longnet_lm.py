"""A small decoder-only LongNet language model, trained on ``examples/data/fables.txt``.

    python examples/longnet_lm.py                  # one process
    python examples/longnet_lm.py --world-size 2   # each sequence sharded over 2 gloo processes

The model is ``ring_multihead.LongNetLM`` (LongNet, Ding et al. 2023, with MAGNETO's
sub-LayerNorm and init, Wang et al. 2022): character embedding plus learned
positions, pre-LN blocks of causal dilated attention and a feed-forward network,
a final LayerNorm and an output head tied to the embedding.

With ``--world-size P`` every sequence is cut into ``P`` shards (zigzag layout, for
causal load balance) and each process runs the model on its shard with the ring
(``process_group=``): the ring passes keys and values between the processes. The
model is wrapped in FSDP2 (``fully_shard``: parameters sharded over the same
processes) with its gradient reduction set to a sum, since each process's loss is
its share of the batch loss: every process takes the same optimiser step as a single
process would on the whole sequence. Rank 0 shows a progress bar, saves the loss
curve (PNG) and a JSON summary, and samples some text from a single-process copy of
the trained model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ring_core import shard_sequence
from ring_core.testing import spawn_group
from ring_multihead import LongNetLM

DATA = Path(__file__).parent / "data" / "fables.txt"


@dataclass(frozen=True)
class Config:
    """Model shape and LongNet configuration."""

    vocab_size: int
    seq_len: int = 256
    d_model: int = 64
    num_heads: int = 4
    num_layers: int = 2
    segment_lengths: tuple[int, ...] = (32, 64, 128, 256)
    dilation_rates: tuple[int, ...] = (1, 2, 4, 8)


def build_model(
    config: Config, world_size: int = 1, layout: str = "zigzag", dtype: torch.dtype | None = None
) -> LongNetLM:
    """The LongNet LM; over several processes the ring shards sequences and FSDP2 shards parameters."""
    ring = {"process_group": dist.group.WORLD, "layout": layout} if world_size > 1 else {}
    model = LongNetLM(
        config.vocab_size, config.seq_len, config.d_model, config.num_heads, config.num_layers,
        segment_lengths=config.segment_lengths, dilation_rates=config.dilation_rates, dtype=dtype, **ring,
    )  # fmt: skip
    if world_size > 1:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        for module in model.modules():  # each process's loss is a share of the batch loss: sum, not average
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)  # gloo has no AVG / PREMUL_SUM reductions
    return model


class Text:
    """A character vocabulary and the text as token ids, split 90/10 into train and validation."""

    def __init__(self, path: Path = DATA) -> None:
        text = path.read_text(encoding="utf-8")
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}
        ids = torch.tensor([self.index[c] for c in text], dtype=torch.long)
        cut = int(0.9 * len(ids))
        self.train, self.val = ids[:cut], ids[cut:]

    def encode(self, text: str) -> list[int]:
        return [self.index[c] for c in text if c in self.index]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def batch(self, split: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
        """Random windows: inputs and next-character targets, ``(B, seq_len)`` each."""
        starts = torch.randint(0, len(split) - seq_len - 1, (batch_size,), generator=generator)
        windows = torch.stack([split[s : s + seq_len + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]


def sharded_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, rank: int, world_size: int, layout: str
) -> torch.Tensor:
    """This rank's share of the mean cross-entropy over the whole batch (the shares sum to it)."""
    local_x = shard_sequence(x, layout, dim=1, rank=rank, world_size=world_size)
    local_y = shard_sequence(y, layout, dim=1, rank=rank, world_size=world_size)
    logits = model(local_x)  # each rank's global positions come from the model's layout
    return F.cross_entropy(logits.flatten(0, 1), local_y.flatten(), reduction="sum") / y.numel()


def train_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, rank: int = 0, world_size: int = 1, layout: str = "zigzag"
) -> float:
    """Forward and backward on this rank's shard; FSDP2 sums the gradients; returns the batch loss."""
    loss = sharded_loss(model, x, y, rank, world_size, layout)
    loss.backward()
    loss = loss.detach()
    if world_size > 1:
        dist.all_reduce(loss)
    return loss.item()


@torch.no_grad()
def evaluate(model: nn.Module, text: Text, args: argparse.Namespace, rank: int, world_size: int) -> float:
    generator = torch.Generator().manual_seed(1234)
    total = torch.zeros(())
    for _ in range(args.eval_batches):
        x, y = text.batch(text.val, args.batch_size, args.seq_len, generator)
        total += sharded_loss(model, x, y, rank, world_size, args.layout)
    if world_size > 1:
        dist.all_reduce(total)
    return total.item() / args.eval_batches


@torch.no_grad()
def sample(model: LongNetLM, text: Text, prompt: str, length: int, temperature: float = 0.8) -> str:
    """Characters sampled from a single-process model (no cache: the whole window each step)."""
    generator = torch.Generator().manual_seed(0)
    ids = text.encode(prompt)
    for _ in range(length):
        window = torch.tensor(ids[-model.max_seq_len :])[None]
        logits = model(window)[0, -1] / temperature
        ids.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)))
    return text.decode(ids)


def save_curve(losses: list[float], val_loss: float, path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=1, label="train (per step)")
    ax.axhline(val_loss, color="C1", ls="--", lw=1, label=f"validation, end: {val_loss:.3f}")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/char)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def progress(steps: int, enabled: bool):
    """A tqdm bar when tqdm is installed (rank 0), else a plain line every 10% of the steps."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=steps, desc="training", unit="step", dynamic_ncols=True)


def run(rank: int, world_size: int, args: argparse.Namespace) -> dict[str, Any] | None:
    """Train on this rank (all ranks run it); rank 0 reports. Returns the summary on rank 0."""
    torch.manual_seed(args.seed)
    text = Text(args.data)
    config = Config(vocab_size=len(text.chars), seq_len=args.seq_len)
    model = build_model(config, world_size, args.layout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / args.steps))
    )
    generator = torch.Generator().manual_seed(args.seed)  # the same batches on every rank
    losses: list[float] = []
    bar = progress(args.steps, rank == 0)
    start = time.perf_counter()
    for step in range(args.steps):
        x, y = text.batch(text.train, args.batch_size, config.seq_len, generator)
        optimizer.zero_grad(set_to_none=True)
        losses.append(train_step(model, x, y, rank, world_size, args.layout))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
        elif rank == 0 and (step + 1) % max(1, args.steps // 10) == 0:
            print(f"step {step + 1:4d}/{args.steps}  loss {losses[-1]:.3f}", flush=True)
    elapsed = time.perf_counter() - start
    if bar is not None:
        bar.close()
    model.eval()
    val_loss = evaluate(model, text, args, rank, world_size)
    state = {  # every rank takes part in gathering the FSDP2 shards
        key: value.full_tensor() if hasattr(value, "full_tensor") else value
        for key, value in model.state_dict().items()
    }
    if rank != 0:
        return None
    single = build_model(config)  # a single-process copy: same parameter names, ring or not
    single.load_state_dict(state)
    single.eval()
    tail = sum(losses[-10:]) / len(losses[-10:])
    summary = {
        "world_size": world_size,
        "layout": args.layout if world_size > 1 else None,
        "steps": args.steps,
        "tokens_per_step": args.batch_size * config.seq_len,
        "seconds": round(elapsed, 1),
        "tokens_per_second": round(args.steps * args.batch_size * config.seq_len / elapsed),
        "loss_first_step": round(losses[0], 4),
        "loss_last_10_steps": round(tail, 4),
        "val_loss": round(val_loss, 4),
        "uniform_loss": round(math.log(config.vocab_size), 4),
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": asdict(config),
        "sample": sample(single, text, "The ", args.sample_chars),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "longnet-summary.json").write_text(json.dumps({**summary, "losses": losses}, indent=2))
    title = f"LongNet LM, {world_size} rank{'s' if world_size > 1 else ''}, {args.steps} steps"
    plotted = save_curve(losses, val_loss, out / "longnet-loss.png", title)
    print(
        f"\nLongNet LM on {args.data.name}: {summary['parameters']:,} parameters, {world_size} process(es), "
        f"{args.steps} steps of {summary['tokens_per_step']} tokens in {summary['seconds']} s "
        f"({summary['tokens_per_second']:,} tokens/s)\n"
        f"loss: first step {summary['loss_first_step']:.3f} (uniform {summary['uniform_loss']:.3f}), "
        f"last 10 steps {tail:.3f}, validation {val_loss:.3f}\n"
        f"sample: {summary['sample']!r}\n"
        f"wrote {out / 'longnet-summary.json'}" + (f" and {out / 'longnet-loss.png'}" if plotted else "")
    )
    return summary


def _worker(rank: int, world_size: int, args: argparse.Namespace) -> None:
    run(rank, world_size, args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=1, help="processes sharing each sequence (gloo, CPU)")
    parser.add_argument("--layout", choices=("zigzag", "contiguous"), default="zigzag")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--sample-chars", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", default="bench-results", help="directory for the loss curve and summary")
    args = parser.parse_args(argv)
    if args.world_size < 1:
        parser.error(f"--world-size must be >= 1, got {args.world_size}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    step = 2 * args.world_size if args.layout == "zigzag" and args.world_size > 1 else args.world_size
    if args.seq_len % step != 0:
        parser.error(
            f"--seq-len {args.seq_len} must be a multiple of {step} (--world-size {args.world_size}, {args.layout})"
        )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.world_size == 1:
        run(0, 1, args)
    else:
        threads = max(1, (os.cpu_count() or 1) // args.world_size)
        spawn_group(_worker, args.world_size, args, timeout=None, threads=threads)


if __name__ == "__main__":
    main()
