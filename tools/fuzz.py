"""Random configurations against the float64 reference of SPEC.md, forward and backward, until a time is up.

    python -m tools.fuzz --minutes 5                     every registered attention implementation, one process
    python -m tools.fuzz --minutes 5 --ranks 2           the distributed ones on a real gloo group (2-4 ranks)
    python -m tools.fuzz --minutes 5 --lse               return_lse=True, a loss on the lse too
    python -m tools.fuzz --device cuda --dtype bfloat16  on a GPU, within SPEC's bf16 bounds (below)

Each draw is one seed: a :class:`~ring_core.testing.Case` (odd ``N``, one to three dilated branches, GQA, batch,
causality, key padding, a sliding window, packed documents, both merges) and an implementation, the block-sparse
module with its own draw (block size, strips or gather path, pattern, density). A draw the configuration does not
allow raises ``ValueError`` (counted as ``refused``, every rank alike); anything else that raises, and every result
outside the bounds, is printed with its seed: ``--replay SEED`` runs that draw again. ``tests/conformance/
test_random_cases.py`` and ``tests/blocksparse/test_random_configs.py`` run fixed seeds of the same draws.

In float16 / bfloat16 the head dims are 16x the drawn ones (SPEC's bounds are for real head dims), and a result
passes within SPEC's bound or 2x the error of dense SDPA on the same inputs, whichever is larger (SPEC.md's
"no worse than 2x SDPA"; at a few keys per query SDPA's own bf16 ``dq`` errs by up to 4%). Where dilation leaves
a query one or two keys, the gradients can still exceed that floor by rounding alone: read such a draw's numbers
(its ``sdpa_*`` errors are printed too) before calling it a bug.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import random
import sys
import time
import traceback
import warnings
from typing import Any

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)
BLOCK_SPARSE = "block_sparse"  # the block-sparse module with draw_block_sparse's options


def _segments(bases: list[int], rates: list[int]) -> list[int]:
    """``base * rate`` per branch; strictly increasing, as the contract asks, else multiples of the largest."""
    segments = [base * rate for base, rate in zip(bases, rates, strict=True)]
    if any(a >= b for a, b in itertools.pairwise(segments)):
        segments = [max(segments) * (i + 1) for i in range(len(rates))]
    return segments


def _window(r: random.Random, causal: bool) -> tuple[int, int]:
    """No window (most draws), left-only, ``(w, 0)`` or two-sided; a causal call's right side clipped to 0."""
    left, right = r.choice(
        [(-1, -1)] * 3 + [(r.randint(0, 20), -1), (r.randint(0, 20), 0), (r.randint(0, 9), r.randint(0, 9))]
    )
    return (left, 0) if causal and right > 0 else (left, right)


def _kv_heads(r: random.Random, heads: int) -> int:
    return r.choice([h for h in (1, 2, 3, heads) if heads % h == 0])


def draw_case(seed: int, *, max_len: int = 96) -> Any:
    """A random case any implementation of the contract must take (``N`` up to ``max_len``)."""
    from ring_core.testing import Case, packed_documents

    r = random.Random(seed)
    count = r.randint(1, 3)
    rates = sorted(r.sample([1, 2, 3, 4], count))
    segments = _segments(sorted(r.sample(range(2, 48), count)), rates)
    n = r.randint(1, max_len)
    heads = r.choice([1, 2, 3, 4, 6])
    batch = r.choice([1, 1, 2])
    causal = r.random() < 0.5
    window = _window(r, causal)
    return Case(
        f"seed{seed}", n, heads, tuple(segments), tuple(rates), kv_heads=_kv_heads(r, heads), batch=batch,
        head_dim=r.choice([1, 3, 4, 8]), merge=r.choice(["lse", "lse", "head_groups"]) if heads >= count else "lse",
        causal=causal, padding=r.random() < 0.3, window_size=window,
        documents=packed_documents(n, r.randint(3, 6), seed) if batch == 1 and n >= 3 and r.random() < 0.4 else None,
    )  # fmt: skip


def draw_block_sparse(seed: int) -> tuple[Any, dict[str, Any]]:
    """A case and the block-sparse module's options: the strips (``method="flex"``, ``N`` a multiple of the block)
    or the gather path, a pattern (random, local window, none) and its density."""
    from ring_core.testing import Case, packed_documents

    r = random.Random(seed)
    block = r.choice([4, 8, 16])
    method = r.choice(["flex", "flex", "gather"])
    rates = sorted(r.sample([rate for rate in (1, 2, 4) if block % rate == 0], r.randint(1, 3)))
    segments = _segments(sorted(r.sample([block * m for m in (1, 2, 4, 8, 16)], len(rates))), rates)
    n = r.randint(2, 12) * block if method == "flex" else r.randint(3, 100)
    heads = r.choice([2, 3, 4, 6])
    causal = r.random() < 0.5
    window = _window(r, causal)
    batch = r.choice([1, 1, 2])
    merge = r.choice(["lse", "lse", "head_groups"]) if heads >= len(rates) else "lse"
    case = Case(
        f"seed{seed}-{method}", n, heads, tuple(segments), tuple(rates), kv_heads=_kv_heads(r, heads), batch=batch,
        head_dim=r.choice([3, 4, 5]), merge=merge, causal=causal, padding=r.random() < 0.3, window_size=window,
        documents=packed_documents(n, r.randint(3, 6), seed) if batch == 1 and r.random() < 0.4 else None,
    )  # fmt: skip
    pattern = r.choice(
        [
            ("random", {"density": r.choice([0.2, 0.5, 0.8]), "seed": seed % 97, "per_head": r.random() < 0.5}),
            ("local_window", {"window": block * r.randint(1, 3), "sliding": r.random() < 0.5}),
            (None, {}),
        ]
    )
    return case, {"block_size": block, "method": method, "pattern": pattern[0], **pattern[1]}


def draw(seed: int, names: list[str], world_size: int = 1, max_len: int = 96) -> tuple[str, Any, dict[str, Any]]:
    """One draw: an implementation of ``names`` (or :data:`BLOCK_SPARSE`), its case fitted to ``world_size`` ranks
    (``N`` a multiple of the shards; of the block too on the strips), and its constructor options."""
    from ring_core.testing import packed_documents

    name = random.Random(seed).choice(names)
    if name == BLOCK_SPARSE:
        case, options = draw_block_sparse(seed)
    else:
        case, options = draw_case(seed, max_len=max_len), {}
    r = random.Random(seed + 1)
    if world_size > 1:
        options["layout"] = r.choice(["contiguous", "zigzag"])
        unit = world_size * (2 if options["layout"] == "zigzag" else 1)
        unit *= options.get("block_size", 1) if options.get("method") == "flex" else 1
        n = max(unit, case.seq_len // unit * unit)
        documents = None if case.documents is None else packed_documents(n, len(case.documents) - 1, seed)
        case = dataclasses.replace(case, seq_len=n, documents=documents)
        if name in ("ring_distributed_dilated", "ring_dilated_production"):
            options["strategy"] = r.choice(["auto", "ring", "ulysses", "hybrid", "allgather"])
            if options["strategy"] in ("auto", "hybrid"):  # Ulysses groups of some ranks, nodes of some ranks
                options["ulysses_degree"] = r.choice(
                    [None, *(d for d in range(1, world_size + 1) if world_size % d == 0)]
                )
                options["node_size"] = r.choice([None, world_size, max(1, world_size // 2)])
            if options["strategy"] != "ring" and r.random() < 0.7:  # heads that every Ulysses degree can split
                kv_heads = r.choice([world_size, 2 * world_size])
                case = dataclasses.replace(case, heads=2 * world_size, kv_heads=kv_heads)
    if name == "ring_dilated_production":
        options.update(checkpoint=r.random() < 0.5, deterministic=r.random() < 0.3, reuse_buffers=r.random() < 0.7)
    return name, case, options


def run_draw(seed: int, names: list[str], *, rank: int = 0, world_size: int = 1, device: str = "cpu",
             dtype: torch.dtype = torch.float64, lse: bool = False, max_len: int = 96) -> tuple[str, str, dict[str, float] | str]:  # fmt: skip
    """``(outcome, description, errors or the error)``: outcome ``ok``, ``wrong``, ``refused`` (a ValueError) or
    ``raised`` (anything else)."""
    import ring_core
    from ring_core import reference_attention
    from ring_core.sharding import shard_sequence
    from ring_core.testing import TOLERANCES, make_inputs, relative_error, within_tolerance

    name, case, options = draw(seed, names, world_size, max_len)
    if dtype in LOW_PRECISION:  # SPEC's bounds are for real head dims: at D <= 8 rounding alone can exceed them
        case = dataclasses.replace(case, head_dim=case.head_dim * 16)
    where = f"seed {seed}: {name} {options} {case.__dict__}"
    try:
        if name == BLOCK_SPARSE:
            from ring_blocksparse import BlockSparseRingDilatedAttention

            attn: Any = BlockSparseRingDilatedAttention(**case.config, **options)
            if device == "cpu":
                attn.sparse_kernel = "math"  # (FlexAttention has no CPU backward: its dense twin)
            layout = attn.layout_for(case.seq_len, case.heads)
            extra = {} if layout is None else {"block_layout": layout, "block_size": options["block_size"]}
        else:
            impl = next(i for i in ring_core.list_implementations("attention") if i.name == name)
            attn, extra = ring_core.create_attention(name, **case.config, **impl.options, **options), {}
        q, k, v, mask = make_inputs(case, torch.float64, seed=seed % 1000)
        generator = torch.Generator().manual_seed(seed % 1000 + 1)
        dout = torch.randn(q.shape[:3] + v.shape[3:], generator=generator, dtype=torch.float64)
        dlse = torch.randn(q.shape[0], q.shape[2], q.shape[1], generator=generator, dtype=torch.float64)

        def shard(x: torch.Tensor) -> torch.Tensor:
            if world_size == 1:
                return x
            return shard_sequence(x, options["layout"], rank=rank, world_size=world_size)

        def shard_lse(x: torch.Tensor) -> torch.Tensor:  # (B, H, N): the shard along N
            return shard(x.transpose(1, 2)).transpose(1, 2)

        def loss(out: Any, sharded: bool) -> torch.Tensor:
            """A linear loss of the output (and the lse); on ranks, each its shard's share (the backward sums them)."""
            o, l_ = out if lse else (out, None)
            total = (o * (shard(dout) if sharded else dout).to(o)).sum()
            if l_ is not None:
                total = (
                    total + (l_.masked_fill(torch.isinf(l_), 0) * (shard_lse(dlse) if sharded else dlse).to(l_)).sum()
                )
            return total

        config = {key: value for key, value in case.config.items() if key != "window_size"}
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        expected = reference_attention(
            *leaves, **config, is_causal=case.causal, key_padding_mask=mask, return_lse=lse,
            **case.reference_options, **extra,
        )  # fmt: skip
        expected_grads = torch.autograd.grad(loss(expected, False), leaves)
        mine = [shard(x).to(device=device, dtype=dtype).requires_grad_() for x in (q, k, v)]
        out = attn(
            *mine, is_causal=case.causal, key_padding_mask=None if mask is None else shard(mask).to(device),
            return_lse=lse, **case.forward_options(device),
        )  # fmt: skip
        grads = torch.autograd.grad(loss(out, True), mine)
    except ValueError as exc:  # the configuration is refused (ring_core.RingConfigError is one), on every rank
        return "refused", where, f"{type(exc).__name__}: {exc}"
    except Exception:
        return "raised", where, traceback.format_exc(limit=-6)
    got = {"out": out[0] if lse else out, **dict(zip(("dq", "dk", "dv"), grads, strict=True))}
    want = {"out": expected[0] if lse else expected, **dict(zip(("dq", "dk", "dv"), expected_grads, strict=True))}
    errors = {key: relative_error(got[key], shard(want[key].detach())) for key in got}
    if lse:
        finite = torch.isfinite(shard_lse(expected[1].detach()))
        mine_lse = out[1].detach().double().cpu()
        errors["lse"] = (
            relative_error(mine_lse[finite], shard_lse(expected[1].detach())[finite]) if finite.any() else 0.0
        )
        errors["lse_inf"] = float(not torch.equal(torch.isinf(mine_lse), ~finite))
    bounds = TOLERANCES[dtype]
    if dtype in LOW_PRECISION:  # SPEC.md: no worse than 2x SDPA's error on the same inputs (tiny N: dq of 4% in bf16)
        floor = sdpa_errors(q, k, v, dout, case.causal, dtype, device)
        bounds = {key: max(bounds[key != "out"], 2 * floor.get(key, 0.0)) for key in errors}
        outcome = "ok" if all(errors[key] <= bounds[key] for key in errors) else "wrong"
        return outcome, where, {**errors, **{f"sdpa_{key}": value for key, value in floor.items()}}
    return ("ok" if within_tolerance(errors, bounds) else "wrong"), where, errors


def sdpa_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, causal: bool,
                dtype: torch.dtype, device: str) -> dict[str, float]:  # fmt: skip
    """Dense SDPA's errors in ``dtype`` against SDPA in float64, on the same ``(B, N, H, D)`` inputs: out, dq, dk, dv."""
    from ring_core.testing import relative_error

    def run(dt: torch.dtype) -> list[torch.Tensor]:
        x = [t.transpose(1, 2).to(device=device, dtype=dt).requires_grad_() for t in (q, k, v)]
        out = torch.nn.functional.scaled_dot_product_attention(*x, is_causal=causal, enable_gqa=True)
        return [out, *torch.autograd.grad((out * dout.transpose(1, 2).to(out)).sum(), x)]

    return dict(zip(("out", "dq", "dk", "dv"), map(relative_error, run(dtype), run(torch.float64)), strict=True))


def _rank_loop(rank: int, world_size: int, seeds: list[int], names: list[str], options: dict[str, Any]) -> list[Any]:
    """On a gloo rank: every seed (the same list on every rank, so they stay in step); the results not ``ok``."""
    warnings.filterwarnings("ignore")
    return [row for seed in seeds if (row := run_draw(seed, names, rank=rank, world_size=world_size, **options))[0]
            not in ("ok", "refused")]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=2.0, help="one process: stop drawing after this")
    parser.add_argument("--draws", type=int, default=2000, help="with --ranks > 1: draws per group (all in step)")
    parser.add_argument("--ranks", type=int, default=1, help="gloo ranks (1: one process, every implementation)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the seeds")
    parser.add_argument("--replay", type=int, help="run this draw's seed once and print its result")
    parser.add_argument("--lse", action="store_true", help="return_lse=True, the loss on the lse too")
    parser.add_argument("--max-len", type=int, default=96, help="longest N of the contract's draws")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32", "float16", "bfloat16"))
    parser.add_argument("--only", nargs="*", help="implementation names to draw from (block_sparse: the module's draw)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import ring_core
    from ring_core.testing import run_gloo

    available = [i for i in ring_core.list_implementations("attention") if i.available]
    names = [i.name for i in available if args.ranks == 1 or i.distributed] + [BLOCK_SPARSE]
    names = [n for n in names if not args.only or n in args.only]
    options = {"device": args.device, "dtype": getattr(torch, args.dtype), "lse": args.lse, "max_len": args.max_len}
    if args.replay is not None:
        print(run_draw(args.replay, names, **options) if args.ranks == 1 else
              run_gloo(_rank_loop, args.ranks, [args.replay], names, options))  # fmt: skip
        return 0
    seeds = random.Random(args.seed)
    counts: dict[str, int] = {}
    if args.ranks > 1:
        drawn = [seeds.randrange(10**9) for _ in range(args.draws)]
        for rank, rows in enumerate(run_gloo(_rank_loop, args.ranks, drawn, names, options, timeout=3600)):
            for outcome, where, detail in rows:
                print(f"rank {rank} {outcome.upper()} {where}\n  {detail}", flush=True)
                counts[outcome] = counts.get(outcome, 0) + 1
        print(f"{args.draws} draws on {args.ranks} ranks; not ok: {counts or 'none'}")
        return 1 if counts else 0
    stop = time.monotonic() + 60 * args.minutes
    while time.monotonic() < stop:
        outcome, where, detail = run_draw(seeds.randrange(10**9), names, **options)
        counts[outcome] = counts.get(outcome, 0) + 1
        if outcome in ("wrong", "raised"):
            print(f"{outcome.upper()} {where}\n  {detail}", flush=True)
    print(f"draws: {counts}")
    return 1 if counts.get("wrong") or counts.get("raised") else 0


if __name__ == "__main__":
    sys.exit(main())
