"""The sparse ring of ring-blocksparse on several GPUs (NCCL): exact results, bytes sent, time vs one GPU.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc-per-node 2 -m tools.bench.blocksparse_ring --out DIR

One process per GPU, one NCCL group of all of them (``P`` ranks):

- ``accuracy``: global N=4096, B=1, H=8, H_kv=4 (GQA), D=128, block 128, bf16. Each case
  (patterns, dilated branches, causal or not, contiguous and zigzag) runs as a ring of P
  ranks and, on each rank alone (a process group of one), as one GPU; outputs and
  gradients are compared with the float64 reference computed on the GPU. Errors are global
  (``||out - ref|| / ||ref||`` over every rank's rows); SPEC.md's bf16 bounds are out <= 1e-2
  and each gradient <= 2e-2.
- ``bytes``: what each rank sent and received (``comm_stats``, forward and backward) next
  to two expectations: the plan's (every rank knows which of its rows each other rank's
  query tiles need: K|V rows in bf16 forward; the same rows again plus the float32 dK|dV of
  the rows it received, backward) and a hand formula for the cases that have one (a window
  inside each shard sends nothing; a band of one block either side sends one block each way;
  no pattern sends the whole shard to every other rank).
- ``timing``: global N=65536, B=1, H=16, D=128, bf16, block 128, the benchmark's patterns at
  density 0.10 (``tools.bench.blocksparse``: exact-count ``random`` and the nearest-blocks
  ``local`` band), non-causal and causal: forward+backward (``autograd.grad``), median of
  ``--repeats`` after one warm-up, slowest rank, for the ring on P GPUs (gather path, the
  only one that runs sequence parallel) vs one GPU on the whole N (gather, and flex for
  reference); causal runs use the zigzag layout (balanced causal work), non-causal contiguous.

Writes ``blocksparse-ring.json`` into ``--out`` (flat tables: ``results`` for timing,
``accuracy.rows``; per-rank detail under ``*_detail``); prints a table last. ``--device cpu`` runs a
tiny version on gloo (``torchrun --nproc-per-node 2 ... --device cpu``).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ring_blocksparse import BlockSparseRingDilatedAttention
from ring_core import reference_attention
from ring_core.sharding import shard_positions, shard_sequence
from tools.bench.blocksparse import layout_for
from tools.multigpu import global_error

# name -> (segments, rates, pattern, options, causal, layout, expected forward rows sent per rank: None = no formula)
CASES = {
    "local_window 512, causal, contiguous": ([None], [1], "local_window", {"window": 512}, True, "contiguous", "zero"),
    "band of 1 block either side, contiguous": (
        [None],
        [1],
        "local_window",
        {"window": 129, "sliding": True},
        False,
        "contiguous",
        "one-block",
    ),
    "no pattern (dense), contiguous": ([None], [1], None, {}, False, "contiguous", "shard"),
    "random 0.3 per head + dilated [1024, N] r[1, 2], causal, zigzag": (
        [1024, None],
        [1, 2],
        "random",
        {"density": 0.3, "seed": 1, "per_head": True},
        True,
        "zigzag",
        None,
    ),
    "global_local 128 + window 512, contiguous": (
        [None],
        [1],
        "global_local",
        {"global_tokens": 128, "window": 512},
        False,
        "contiguous",
        None,
    ),
    "random 0.1 exact, causal, contiguous": ([None], [1], "random", {"density": 0.1}, True, "contiguous", None),
}


def log(rank: int, text: str) -> None:
    print(f"[rank {rank}] {text}", flush=True)


def _errors(rank, world, device, layout, out, grads, ref, ref_grads, ring: bool) -> dict:
    """Global errors of (out, dq, dk, dv): ring pieces are this rank's rows; single-GPU runs compare all rows
    (every rank ran the same thing: the sums are averaged by the all-reduce's ratio)."""
    n = ref.shape[1]
    rows = torch.as_tensor(shard_positions(n, rank, world, layout), device=device) if ring else None
    pick = (lambda x: x.index_select(1, rows)) if ring else (lambda x: x)
    errors = {"out": global_error([(out, pick(ref))], device)}
    for name, grad, expected in zip(("dq", "dk", "dv"), grads, ref_grads):
        errors[name] = global_error([(grad, pick(expected))], device)
    return errors


def _row_bytes(b: int, h_kv: int, d: int, element: int) -> int:
    return b * h_kv * 2 * d * element  # K|V (or dK|dV) of one position


def accuracy_and_bytes(rank, world, device, single_group, quick: bool) -> list[dict]:
    b, n, h, hkv, d, block = (1, 256, 4, 2, 16, 16) if quick else (1, 4096, 8, 4, 128, 128)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kv_element = torch.tensor([], dtype=dtype).element_size()
    grad_element = 4  # dK|dV go back in the float32 accumulators
    rows = []
    for name, (segments, rates, pattern, options, causal, layout, formula) in CASES.items():
        log(rank, f"accuracy: {name}")
        segments = [n if s is None else s * n // 4096 for s in segments]
        options = {
            key: value * n // 4096 if key in ("window", "global_tokens") else value for key, value in options.items()
        }
        if options.get("sliding"):
            options["window"] = block + 1  # |i - j| <= 1 block
        generator = torch.Generator().manual_seed(len(name))
        q = torch.randn(b, n, h, d, generator=generator, dtype=torch.float64).to(device)
        k, v = (torch.randn(b, n, hkv, d, generator=generator, dtype=torch.float64).to(device) for _ in range(2))
        dout = torch.randn(b, n, h, d, generator=generator, dtype=torch.float64).to(device)
        config = {"segment_lengths": segments, "dilation_rates": rates}

        module = functools.partial(
            BlockSparseRingDilatedAttention, **config, block_size=block, pattern=pattern, layout=layout,
            method="gather", **options,
        )  # fmt: skip

        probe = module(process_group=single_group)
        block_layout = probe.layout_for(n, h)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        ref = reference_attention(
            *leaves,
            **config,
            is_causal=causal,
            block_layout=block_layout,
            block_size=None if pattern is None else block,
        )
        ref_grads = torch.autograd.grad(ref, leaves, dout)
        ref = ref.detach()
        del leaves
        row = {"case": name, "layout": layout, "causal": causal, "N": n, "H": h, "H_kv": hkv, "D": d, "block": block}
        # the ring of all ranks
        local = [shard_sequence(x, layout, rank=rank, world_size=world).to(dtype).requires_grad_() for x in (q, k, v)]
        attn = module(process_group=None)
        out = attn(*local, is_causal=causal)
        grads = torch.autograd.grad(out, local, shard_sequence(dout, layout, rank=rank, world_size=world).to(dtype))
        row["ring"] = _errors(rank, world, device, layout, out, grads, ref, ref_grads, ring=True)
        stats, plan = attn.comm_stats, attn.last_plan
        sent_rows = sum(r.numel() for dest, r in plan.send_rows.items() if dest != rank)
        recv_rows = sum(p.numel() for src, p in plan.recv_positions.items() if src != rank)
        kv_row, grad_row = _row_bytes(b, hkv, d, kv_element), _row_bytes(b, hkv, d, grad_element)
        expected = {
            "sent": {"forward": sent_rows * kv_row, "backward": sent_rows * kv_row + recv_rows * grad_row},
            "received": {"forward": recv_rows * kv_row, "backward": recv_rows * kv_row + sent_rows * grad_row},
        }
        measured = {"sent": dict(stats.sent), "received": dict(stats.received)}
        neighbours = (rank > 0) + (rank < world - 1)
        hand = {"zero": 0, "one-block": block * neighbours, "shard": n // world * (world - 1)}.get(formula)
        per_rank = {
            "measured": measured,
            "plan": expected,
            "matches_plan": measured == expected,
            "hand_formula_rows": hand,
            "matches_hand_formula": None if hand is None else measured["sent"]["forward"] == hand * kv_row,
        }
        gathered = [None] * world
        dist.all_gather_object(gathered, per_rank)
        row["bytes_per_rank"] = gathered
        # one GPU alone on the whole sequence (a process group of one: plain single-device attention)
        full = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        out1 = module(process_group=single_group)(*full, is_causal=causal)
        grads1 = torch.autograd.grad(out1, full, dout.to(dtype))
        row["one_gpu"] = _errors(rank, world, device, layout, out1, grads1, ref, ref_grads, ring=False)
        row["passed"] = all(
            row[key]["out"] <= 1e-2 and all(row[key][g] <= 2e-2 for g in ("dq", "dk", "dv"))
            for key in ("ring", "one_gpu")
        ) and all(r["matches_plan"] and r["matches_hand_formula"] is not False for r in gathered)
        rows.append(row)
        if rank == 0:
            log(rank, f"  ring {row['ring']}  one GPU {row['one_gpu']}  bytes rank0 {measured}")
        del ref, ref_grads, out, grads, out1, grads1
    return rows


def _median_ms(fn, repeats: int, device) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1000)
    slowest = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.item()


def _step(attn, causal: bool, q, k, v, dout) -> None:
    torch.autograd.grad(attn(q, k, v, is_causal=causal), (q, k, v), dout)


def timing(rank, world, device, single_group, args) -> list[dict]:
    b, n, h, d, block = (1, 1024, 2, 16, 64) if args.quick else (1, args.seq_len, 16, 128, 128)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(rank + 1)
    rows = []
    for kind in ("local", "random"):
        for causal in (False, True):
            layout = layout_for(kind, args.density, n, block)
            row = {"pattern": kind, "causal": causal, "density": layout.float().mean().item(), "N": n, "H": h, "D": d}
            x = [torch.randn(b, n, h, d, device=device, dtype=dtype, generator=generator) for _ in range(4)]
            for t in x[:3]:
                t.requires_grad_()

            for label, group, method in (
                ("one_gpu_gather", single_group, "gather"),
                ("one_gpu_flex", single_group, "flex"),
            ):
                if device.type != "cuda" and method == "flex":
                    continue
                log(rank, f"timing {kind} causal={causal}: {label}")
                attn = BlockSparseRingDilatedAttention(
                    [n], [1], block_size=block, block_layout=layout, process_group=group, method=method
                )
                row[label + "_ms"] = _median_ms(functools.partial(_step, attn, causal, *x), args.repeats, device)
                del attn
            layout_name = "zigzag" if causal else "contiguous"  # zigzag balances the causal work
            row["ring_layout"] = layout_name
            shards = [shard_sequence(t.detach(), layout_name, rank=rank, world_size=world).contiguous() for t in x]
            for t in shards[:3]:
                t.requires_grad_()
            log(rank, f"timing {kind} causal={causal}: ring of {world}")
            attn = BlockSparseRingDilatedAttention(
                [n], [1], block_size=block, block_layout=layout, layout=layout_name, method="gather"
            )
            row[f"ring_{world}_gpus_ms"] = _median_ms(
                functools.partial(_step, attn, causal, *shards), args.repeats, device
            )
            stats = [None] * world
            dist.all_gather_object(
                stats, {"sent": dict(attn.comm_stats.sent), "received": dict(attn.comm_stats.received)}
            )
            row["ring_bytes_per_rank_one_call"] = stats  # comm_stats is reset every call: the last call's bytes
            row["speedup_vs_one_gpu_gather"] = row["one_gpu_gather_ms"] / row[f"ring_{world}_gpus_ms"]
            rows.append(row)
            if rank == 0:
                log(rank, f"  {row}")
            del attn, x, shards
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def summarise(record: dict) -> dict:
    """The record as the docs' benchmark tables read it: flat ``results`` (timing) and ``accuracy.rows``;
    the full per-rank detail stays under ``accuracy_detail`` / ``timing_detail``."""
    out = {k: v for k, v in record.items() if k not in ("accuracy", "timing")}
    world = record["world_size"]
    if "accuracy" in record:
        rows = []
        for row in record["accuracy"]:
            ranks = row["bytes_per_rank"]
            flat = {"case": row["case"], "passed": row["passed"]}
            for key in ("ring", "one_gpu"):
                flat.update({f"{key}_{name}": value for name, value in row[key].items()})
            for phase in ("forward", "backward"):
                flat[f"sent_{phase}_bytes_per_rank"] = [r["measured"]["sent"][phase] for r in ranks]
            flat["bytes_equal_plan"] = all(r["matches_plan"] for r in ranks)
            flat["hand_formula_fwd_rows_per_rank"] = [r["hand_formula_rows"] for r in ranks]
            flat["bytes_equal_hand_formula"] = (
                None if ranks[0]["matches_hand_formula"] is None else all(r["matches_hand_formula"] for r in ranks)
            )
            rows.append(flat)
        out["accuracy"] = {
            "what": "bf16 errors vs the float64 reference (global over ranks); bytes sent per rank vs the plan",
            "rows": rows,
        }
        out["accuracy_detail"] = record["accuracy"]
    if "timing" in record:
        out["results"] = [
            {
                **{k: v for k, v in row.items() if k != "ring_bytes_per_rank_one_call"},
                "sent_forward_bytes_per_rank": [r["sent"]["forward"] for r in row["ring_bytes_per_rank_one_call"]],
                "sent_backward_bytes_per_rank": [r["sent"]["backward"] for r in row["ring_bytes_per_rank_one_call"]],
            }
            for row in record["timing"]
        ]
        out["timing_detail"] = record["timing"]
    out["world_size"] = world
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--sections", default="accuracy,timing")
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    args.quick = args.device == "cpu"
    for var in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        if args.device == "cuda" and os.environ.get(var) != ("0" if var == "NCCL_NVLS_ENABLE" else "1"):
            print(f"refusing to run without NVLink multicast disabled: set {var}", file=sys.stderr)
            return 2
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        device = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    single_group = singles[rank]
    record = {
        "title": f"ring-blocksparse sparse ring on {world} x {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}",
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": world,
        "backend": dist.get_backend(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": "torchrun --nproc-per-node {} -m tools.bench.blocksparse_ring {}".format(
            world, " ".join(sys.argv[1:])
        ),
    }
    started = time.perf_counter()
    out = Path(args.out)

    def save() -> None:
        record["seconds"] = time.perf_counter() - started
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "blocksparse-ring.json").write_text(json.dumps(summarise(record), indent=2))

    sections = args.sections.split(",")
    if "accuracy" in sections:
        record["accuracy"] = accuracy_and_bytes(rank, world, device, single_group, args.quick)
        save()
    if "timing" in sections:
        record["timing"] = timing(rank, world, device, single_group, args)
        save()
    if rank == 0:
        print(f"\n{record['title']}")
        for row in record.get("accuracy", []):
            ring, one = row["ring"], row["one_gpu"]
            b0 = row["bytes_per_rank"]
            sent = [r["measured"]["sent"]["forward"] for r in b0]
            print(
                f"{'PASS' if row['passed'] else 'FAIL'} {row['case'][:58]:58s} ring out {ring['out']:.2e} "
                f"grads {max(ring['dq'], ring['dk'], ring['dv']):.2e} | 1 GPU out {one['out']:.2e} "
                f"grads {max(one['dq'], one['dk'], one['dv']):.2e} | fwd bytes sent/rank {sent} "
                f"plan {'=' if all(r['matches_plan'] for r in b0) else '!='}"
            )
        for row in record.get("timing", []):
            print(
                f"{row['pattern']:6s} causal={row['causal']!s:5s} {row['ring_layout']:10s} density {row['density']:.4f}: 1 GPU gather "
                f"{row['one_gpu_gather_ms']:8.1f} ms, flex {row.get('one_gpu_flex_ms', float('nan')):7.1f} ms | "
                f"ring {world} GPUs {row[f'ring_{world}_gpus_ms']:8.1f} ms ({row['speedup_vs_one_gpu_gather']:.2f}x "
                f"vs 1 GPU gather) | fwd bytes sent/rank {[s['sent']['forward'] for s in row['ring_bytes_per_rank_one_call']]}"
            )
        print(f"wrote {out / 'blocksparse-ring.json'}")
    failed = any(not row["passed"] for row in record.get("accuracy", []))
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
