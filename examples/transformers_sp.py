"""A small Hugging Face Llama trained with its sequences sharded over gloo processes by our ring.

    python examples/transformers_sp.py                  # 2 processes (default)
    python examples/transformers_sp.py --world-size 1   # one process, same numbers up to rounding

The model is ``transformers.LlamaForCausalLM`` built from a config (characters of
``examples/data/fables.txt`` as the vocabulary, no download). ``ring_transformers.enable``
switches its attention to ``ring_dilated`` over the process group (zigzag layout;
dense by default, a LongNet configuration with ``--segment-lengths`` /
``--dilation-rates``); the model's code is untouched. FSDP2 (``fully_shard``) shards
the parameters over the same processes. Every step, each process takes its shard of
the batch with ``ring_transformers.shard_batch`` (its tokens, their global
``position_ids``, labels shifted over the whole sequence and the batch's target
count), so ``model(**shard).loss`` is its share of the batch loss: FSDP2 sums the
gradients (divide factor 1) and every process takes the step one process would take
on the whole sequence. Rank 0 saves the loss curve and a JSON summary and samples
text from a single-process copy running transformers' own ``sdpa`` attention.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

import ring_transformers
from longnet_lm import DATA, Text, progress, save_curve
from ring_core.testing import spawn_group


def llama_config(vocab_size: int, seq_len: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=seq_len, tie_word_embeddings=True, attn_implementation="sdpa",
    )  # fmt: skip


def build_model(config: LlamaConfig, args: argparse.Namespace, world_size: int) -> LlamaForCausalLM:
    """The Llama on our attention; over several processes the ring shards sequences and FSDP2 parameters."""
    model = LlamaForCausalLM(config)
    attention = {"segment_lengths": args.segment_lengths, "dilation_rates": args.dilation_rates}
    if world_size == 1:
        return ring_transformers.enable(model, "dilated", **attention)
    ring_transformers.enable(model, "ring_dilated", process_group=dist.group.WORLD, layout=args.layout, **attention)
    from torch.distributed.fsdp import FSDPModule, fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    for module in model.modules():  # each process's loss is a share of the batch loss: sum, not average
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no AVG / PREMUL_SUM reductions
    return model


def shard(tokens: torch.Tensor, args: argparse.Namespace, world_size: int) -> dict[str, Any]:
    """This process's part of a batch: ``model(**shard).loss`` is its share of the batch loss."""
    batch = {"input_ids": tokens, "labels": tokens}
    if world_size == 1:
        return ring_transformers.shard_batch(batch, layout=args.layout, rank=0, world_size=1)
    return ring_transformers.shard_batch(batch, dist.group.WORLD, args.layout)


def windows(text: Text, split: torch.Tensor, args: argparse.Namespace, generator: torch.Generator) -> torch.Tensor:
    """``(batch, seq_len)`` random windows of the text (the same on every process: one generator seed)."""
    tokens, _ = text.batch(split, args.batch_size, args.seq_len, generator)
    return tokens


def total(loss: torch.Tensor, world_size: int) -> float:
    return (ring_transformers.sum_over_ranks(loss) if world_size > 1 else loss.detach()).item()


def run(rank: int, world_size: int, args: argparse.Namespace) -> dict[str, Any] | None:
    """Train on this process (all run it); rank 0 reports and returns the summary."""
    torch.manual_seed(args.seed)
    text = Text(args.data)
    config = llama_config(len(text.chars), args.seq_len)
    model = build_model(config, args, world_size)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / args.steps))
    )
    generator = torch.Generator().manual_seed(args.seed)
    losses: list[float] = []
    bar = progress(args.steps, rank == 0)
    start = time.perf_counter()
    for step in range(args.steps):
        optimizer.zero_grad(set_to_none=True)
        loss = model(**shard(windows(text, text.train, args, generator), args, world_size), use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(total(loss, world_size))
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
        elif rank == 0 and (step + 1) % max(1, args.steps // 10) == 0:
            print(f"step {step + 1:4d}/{args.steps}  loss {losses[-1]:.3f}", flush=True)
    elapsed = time.perf_counter() - start
    if bar is not None:
        bar.close()
    model.eval()
    val_generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        val_loss = (
            sum(
                total(model(**shard(windows(text, text.val, args, val_generator), args, world_size)).loss, world_size)
                for _ in range(args.eval_batches)
            )
            / args.eval_batches
        )
    state = {  # every process takes part in gathering the FSDP2 shards
        key: value.full_tensor() if hasattr(value, "full_tensor") else value
        for key, value in model.state_dict().items()
    }
    if rank != 0:
        return None
    single = LlamaForCausalLM(llama_config(config.vocab_size, args.seq_len)).eval()  # plain transformers (sdpa)
    single.load_state_dict(state)
    sampled = sample(single, torch.tensor([text.encode("The ")]), args.sample_chars)
    summary = {
        "world_size": world_size,
        "layout": args.layout if world_size > 1 else None,
        "attention": {"segment_lengths": args.segment_lengths, "dilation_rates": args.dilation_rates},
        "steps": args.steps,
        "tokens_per_step": args.batch_size * args.seq_len,
        "seconds": round(elapsed, 1),
        "tokens_per_second": round(args.steps * args.batch_size * args.seq_len / elapsed),
        "loss_first_step": round(losses[0], 4),
        "loss_last_10_steps": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "val_loss": round(val_loss, 4),
        "uniform_loss": round(math.log(config.vocab_size), 4),
        "parameters": sum(p.numel() for p in single.parameters()),
        "sample": text.decode(sampled[0].tolist()),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transformers-sp-summary.json").write_text(json.dumps({**summary, "losses": losses}, indent=2))
    title = f"Llama (transformers) on our ring, {world_size} process{'es' if world_size > 1 else ''}"
    plotted = save_curve(losses, val_loss, out / "transformers-sp-loss.png", title)
    print(
        f"\nLlama on {args.data.name}: {summary['parameters']:,} parameters, {world_size} process(es), "
        f"{args.steps} steps of {summary['tokens_per_step']} tokens in {summary['seconds']} s "
        f"({summary['tokens_per_second']:,} tokens/s)\n"
        f"loss: first step {summary['loss_first_step']:.3f} (uniform {summary['uniform_loss']:.3f}), "
        f"last 10 steps {summary['loss_last_10_steps']:.3f}, validation {val_loss:.3f}\n"
        f"sample (transformers' sdpa, the trained weights): {summary['sample']!r}\n"
        f"wrote {out / 'transformers-sp-summary.json'}"
        + (f" and {out / 'transformers-sp-loss.png'}" if plotted else "")
    )
    return summary


@torch.no_grad()
def sample(model: LlamaForCausalLM, prompt: torch.Tensor, length: int, temperature: float = 0.8) -> torch.Tensor:
    """Characters sampled one at a time (the whole window each step, within the model's positions)."""
    generator = torch.Generator().manual_seed(0)
    ids = prompt
    for _ in range(length):
        window = ids[:, -model.config.max_position_embeddings :]
        logits = model(window, use_cache=False).logits[0, -1] / temperature
        ids = torch.cat([ids, torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[None]], dim=1)
    return ids


def _worker(rank: int, world_size: int, args: argparse.Namespace) -> None:
    run(rank, world_size, args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2, help="processes sharing each sequence (gloo, CPU)")
    parser.add_argument("--layout", choices=("zigzag", "contiguous"), default="zigzag")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--segment-lengths", type=int, nargs="+", default=None, help="default: dense (one segment)")
    parser.add_argument("--dilation-rates", type=int, nargs="+", default=None, help="default: all 1")
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
    args.segment_lengths = args.segment_lengths or [args.seq_len]
    args.dilation_rates = args.dilation_rates or [1] * len(args.segment_lengths)
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
