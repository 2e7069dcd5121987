"""RingDilatedAttention on several GPUs (NCCL): bf16 error vs P, and throughput vs PyTorch's context parallel.

For each world size P (default 1, 2, 4) one group of P processes (torch.multiprocessing, NCCL):

- ``accuracy``: global N=4096, B=1, H=8, D=64; bf16 ring vs the float64 reference (computed on
  the GPU) for dense causal zigzag, dense contiguous, dilated [256, 1024, 4096] / [1, 2, 4]
  causal contiguous and zigzag. Errors are global (all ranks' rows): ``||out - ref|| / ||ref||``
  and the worst gradient. Next to them, plain SDPA bf16 on the same inputs (one GPU).
- ``timing``: bf16, B=1, H=16, D=128, 32K tokens per GPU, forward+backward, median of a few
  steps (slowest rank): our ring (dense causal zigzag, dense non-causal, dilated [2048, 8192,
  32768] / [1, 2, 4]) vs PyTorch's context parallel (``context_parallel``, allgather rotation;
  plain SDPA at P=1) on the dense cases. Per-GPU useful TFLOP/s, weak-scaling efficiency against
  P=1 measured in the same run, and the ratio ours / context parallel. Ours uses the default
  transport (NCCL); at P > 1 the same ring with ``transport="copy_engine"`` too.
- ``profile``: where one step of our ring goes on rank 0 (GPU time of attention kernels, NCCL
  kernels and copy-engine copies, which run beside them on their own streams, and everything
  else: merges, gathers), with each transport at P > 1; the host's lead before the first GPU work; and the
  stream that runs the attention kernels: its window over the step, how long it idles, how much of that waits
  for the host to launch the next kernel, and the largest gaps (in the JSON).
- ``contention``: at P > 1, plain SDPA on each GPU alone, then on all P at once (no communication): what the
  GPUs' sharing of the host (power, clocks) costs, apart from the ring.

Writes ``ring.json``, ``ring.md`` and ``ring.png`` into ``--out``;
prints the tables last.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        python -m tools.bench.ring --out DIR [--world-sizes 1 2 4] [--sections accuracy,timing]

``--device cpu`` runs a tiny smoke version with gloo (no context parallel).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tools import multigpu
from tools.multigpu import flops_per_gpu, global_error, log, median_ms

ACCURACY_CASES = [  # name, segments, rates, layout, causal (segments relative to N)
    ("dense causal zigzag", None, [1], "zigzag", True),
    ("dense contiguous", None, [1], "contiguous", False),
    ("dilated causal contiguous", [256, 1024, 4096], [1, 2, 4], "contiguous", True),
    ("dilated causal zigzag", [256, 1024, 4096], [1, 2, 4], "zigzag", True),
]
TIMING_CASES = [  # name, segments (None: dense), rates, layout, causal, compare with context parallel
    ("dense causal zigzag", None, [1], "zigzag", True, True),
    ("dense non-causal", None, [1], "contiguous", False, True),
    ("dilated [2048,8192,32768] r[1,2,4]", [2048, 8192, 32768], [1, 2, 4], "contiguous", False, False),
]


def accuracy(rank: int, world_size: int, device: torch.device, quick: bool) -> list[dict]:
    import ring_core
    from ring_core import RingDilatedAttention, reference_attention, shard_sequence

    b, n, h, d = (1, 256, 4, 16) if quick else (1, 4096, 8, 64)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for name, segments, rates, layout, causal in ACCURACY_CASES:
        log(rank, f"P={world_size} accuracy: {name}")
        segments = [n] if segments is None else [s * n // 4096 for s in segments]
        generator = torch.Generator().manual_seed(0)
        q, k, v, dout = (torch.randn(b, n, h, d, generator=generator, dtype=torch.float64) for _ in range(4))
        q, k, v, dout = (x.to(device) for x in (q, k, v, dout))
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        config = {"segment_lengths": segments, "dilation_rates": rates}
        ref = reference_attention(*leaves, **config, is_causal=causal)
        ref_grads = torch.autograd.grad(ref, leaves, dout)
        ref = ref.detach()
        del leaves

        def shard(x, layout=layout):
            return shard_sequence(x, layout)

        local = [shard(x).to(dtype).requires_grad_() for x in (q, k, v)]
        module = RingDilatedAttention(**config, layout=layout)
        out = module(*local, is_causal=causal)
        out.backward(shard(dout).to(dtype))
        err_out = global_error([(out.detach(), shard(ref))], device)
        err_grad = max(global_error([(leaf.grad, shard(g))], device) for leaf, g in zip(local, ref_grads, strict=True))
        row = {
            "section": "accuracy", "case": name, "P": world_size, "dtype": str(dtype).replace("torch.", ""),
            "N": n, "err_out": err_out, "err_grad": err_grad,
            "kernel": ring_core.select_kernel(ring_core.KernelRequest.for_tensors(local[0], local[1])).name,
        }  # fmt: skip
        if segments == [n] and rank == 0:  # plain SDPA on one GPU, same inputs and dtype
            qs, ks, vs = (x.to(dtype).transpose(1, 2).requires_grad_() for x in (q, k, v))
            sdpa = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
            sdpa.backward(dout.to(dtype).transpose(1, 2))
            row["sdpa_err_out"] = (sdpa.transpose(1, 2).double() - ref).norm().item() / ref.norm().item()
            row["sdpa_err_grad"] = max(
                (x.grad.transpose(1, 2).double() - g).norm().item() / g.norm().item()
                for x, g in zip((qs, ks, vs), ref_grads, strict=True)
            )
        rows.append(row)
        del ref, ref_grads, out, local
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _context_parallel_step(world_size, b, n_local, h, d, causal, dtype, device, backend):
    """PyTorch's context parallel (P > 1) or plain SDPA (P = 1) on (B, H, N, D) tensors."""
    from torch.nn.attention import sdpa_kernel

    n = n_local * world_size
    q, k, v = (torch.randn(b, h, n, d, dtype=dtype, device=device) for _ in range(3))
    context = None
    if world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
        from torch.distributed.tensor.experimental._attention import _cp_options

        # Its head-tail load balancing is only valid for causal attention.
        _cp_options.enable_load_balance = causal
        mesh = init_device_mesh(device.type, (world_size,))
        context = context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2])
        context.__enter__()

    def step():
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        with sdpa_kernel([backend]):
            F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal).sum().backward()

    return step, context


def _time_context_parallel(world_size, b, n_local, h, d, causal, dtype, device, iters, warmup) -> dict:
    """The fastest of cuDNN and flash SDPA under context parallel (each as PyTorch dispatches it)."""
    from torch.nn.attention import SDPBackend

    found, errors = {}, []
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        context = None
        try:
            step, context = _context_parallel_step(world_size, b, n_local, h, d, causal, dtype, device, backend)
            ms = median_ms(step, iters, warmup, device)
            if not found or ms < found["cp_ms"]:
                found = {"cp_ms": ms, "cp_backend": backend.name}
        except Exception as exc:  # report, try the next backend
            errors.append(f"{backend.name}: {type(exc).__name__}: {exc}"[:200])
        finally:
            if context is not None:
                context.__exit__(None, None, None)
    if errors:
        found["cp_error"] = " | ".join(errors)
    return found


def _ring_case(case, world_size: int, shape, dtype: torch.dtype, device: torch.device):
    """Our ring for one of :data:`TIMING_CASES` on random shards of ``shape`` (B, N/P, H, D): the module, one
    forward+backward step, its segment lengths and ``(q, k)``."""
    from ring_core import RingDilatedAttention

    _, segments, rates, layout, causal, _ = case
    n_local = shape[1]
    config_segments = [n_local * world_size] if segments is None else [s * n_local // 32768 for s in segments]
    module = RingDilatedAttention(config_segments, rates, layout=layout)
    q, k, v = (torch.randn(*shape, dtype=dtype, device=device) for _ in range(3))

    def step() -> None:
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        module(qq, kk, vv, is_causal=causal).sum().backward()

    return module, step, config_segments, (q, k)


def timing(rank: int, world_size: int, device: torch.device, quick: bool) -> list[dict]:
    import ring_core

    b, n_local, h, d = (1, 256, 4, 16) if quick else (1, 32768, 16, 128)
    iters, warmup = (2, 1) if quick else (5, 2)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n_local * world_size
    rows = []
    for case in TIMING_CASES:
        name, segments, rates, _, causal, compare = case
        log(rank, f"P={world_size} timing: {name}")
        module, ours, config_segments, (q, k) = _ring_case(case, world_size, (b, n_local, h, d), dtype, device)
        flops = flops_per_gpu(b, n, h, d, None if segments is None else config_segments, rates, causal, world_size)
        ms = median_ms(ours, iters, warmup, device)
        row = {
            "section": "timing", "case": name, "P": world_size, "N_per_gpu": n_local, "ms": ms,
            "tflops_per_gpu": flops / ms / 1e9, "bytes_fwd": module.comm_stats.forward_bytes,
            "bytes_bwd": module.comm_stats.backward_bytes,
            "kernel": ring_core.select_kernel(ring_core.KernelRequest.for_tensors(q, k, causal=causal)).name,
        }  # fmt: skip
        if world_size > 1 and device.type == "cuda":  # the same ring with the copy engines instead of NCCL
            module.transport = "copy_engine"
            row["copy_engine_ms"] = median_ms(ours, iters, warmup, device)
            module.transport = "nccl"
        if compare and device.type == "cuda":
            row.update(_time_context_parallel(world_size, b, n_local, h, d, causal, dtype, device, iters, warmup))
            if "cp_ms" in row:
                row["cp_tflops_per_gpu"] = flops / row["cp_ms"] / 1e9
                row["ours_over_cp"] = row["cp_ms"] / ms
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


KINDS = ("attention", "nccl", "copy", "other")


def _kind(kernel: str) -> str:
    name = kernel.lower()
    if "nccl" in name:
        return "nccl"
    if any(key in name for key in ("cudnn", "fmha", "flash", "attention", "sdpa")):
        return "attention"
    if "memcpy" in name:  # the copy engines (the copy-engine transport's pulls, among others)
        return "copy"
    return "other"


LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaMemcpyAsync")


STREAM_KEYS = ("host_lead_ms", "stream_window_ms", "stream_idle_ms", "stream_idle_host_ms")


def _gpu_streams(prof) -> dict[int, list]:
    """The profiled GPU activities (kernels, copies) per stream."""
    from torch.autograd import DeviceType

    streams: dict[int, list] = {}
    for e in prof.profiler.kineto_results.events():
        if e.device_type() == DeviceType.CUDA and e.duration_ns() > 0:
            streams.setdefault(e.device_resource_id(), []).append(e)
    return streams


def _compute_stream(prof, streams: dict[int, list]) -> dict:
    """Idle time of the stream that runs the attention kernels, over the step: how much of it is waiting for the
    host to launch the next kernel (``host``) and the largest gaps with the kernels around them."""
    from torch.autograd import DeviceType

    events = prof.profiler.kineto_results.events()
    launched = {e.correlation_id(): e.start_ns() for e in events if e.name() in LAUNCHES}
    if not streams:
        return {}
    first_gpu = min(e.start_ns() for es in streams.values() for e in es)
    first_host = min((e.start_ns() for e in events if e.device_type() != DeviceType.CUDA), default=first_gpu)
    stream = max(streams.values(), key=lambda es: sum(e.duration_ns() for e in es if _kind(e.name()) == "attention"))
    stream.sort(key=lambda e: e.start_ns())
    gaps = []
    for before, after in itertools.pairwise(stream):
        gap = after.start_ns() - before.end_ns()
        if gap > 0:
            host = max(0, min(after.start_ns(), launched.get(after.correlation_id(), 0)) - before.end_ns())
            gaps.append((gap / 1e6, host / 1e6, before.name()[:60], after.name()[:60]))
    gaps.sort(key=lambda g: -g[0])
    return {
        "host_lead_ms": (first_gpu - first_host) / 1e6,  # from the step's first host op to the first GPU work
        "stream_window_ms": (stream[-1].end_ns() - stream[0].start_ns()) / 1e6,
        "stream_idle_ms": sum(g[0] for g in gaps),
        "stream_idle_host_ms": sum(g[1] for g in gaps),
        "signal_wait_ms": sum(e.duration_ns() for e in stream if "signal" in e.name()) / 1e6,
        "largest_gaps": [{"ms": g[0], "host_ms": g[1], "before": g[2], "after": g[3]} for g in gaps[:6]],
    }


def profile(rank: int, world_size: int, device: torch.device, quick: bool) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        return []
    shape = (1, 256, 4, 16) if quick else (1, 32768, 16, 128)
    rows = []
    transports = ("nccl", "copy_engine") if world_size > 1 else ("nccl",)
    for case, transport in itertools.product(TIMING_CASES, transports):
        name = case[0]
        log(rank, f"P={world_size} profile: {name}, {transport}")
        module, step, _, _ = _ring_case(case, world_size, shape, torch.bfloat16, device)
        module.transport = transport
        step()
        torch.cuda.synchronize()
        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        streams = _gpu_streams(prof)
        totals: dict[str, list] = {}
        for e in itertools.chain.from_iterable(streams.values()):
            total = totals.setdefault(e.name()[:90], [0.0, 0])
            total[0] += e.duration_ns() / 1e6
            total[1] += 1
        kernels = sorted(({"kernel": k, "ms": ms, "calls": calls} for k, (ms, calls) in totals.items()),
                         key=lambda r: -r["ms"])  # fmt: skip
        row = {"section": "profile", "case": name, "P": world_size, "transport": transport, "top": kernels[:8]}
        for kind in KINDS:
            row[f"{kind}_ms"] = sum(r["ms"] for r in kernels if _kind(r["kernel"]) == kind)
        row.update(_compute_stream(prof, streams))
        mine = (row["attention_ms"], row.get("stream_window_ms", 0.0), row.get("stream_idle_ms", 0.0))
        every = [None] * world_size
        dist.all_gather_object(every, mine)
        for index, key in enumerate(("attention_ms", "stream_window_ms", "stream_idle_ms")):
            row[f"{key}_per_rank"] = [ranks[index] for ranks in every]
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def _markdown(rows: list[dict], card: str) -> str:
    lines = [f"Card: {card}", ""]
    acc = [r for r in rows if r["section"] == "accuracy" and "error" not in r]
    if acc:
        lines += ["| case | P | dtype | err out | err grad | SDPA err out | SDPA err grad | kernel |", "|---" * 8 + "|"]
        for r in acc:
            sdpa = (f"{r['sdpa_err_out']:.2e}", f"{r['sdpa_err_grad']:.2e}") if "sdpa_err_out" in r else ("", "")
            lines.append(
                f"| {r['case']} | {r['P']} | {r['dtype']} | {r['err_out']:.2e} | {r['err_grad']:.2e} | "
                f"{sdpa[0]} | {sdpa[1]} | {r['kernel']} |"
            )
        lines.append("")
    timed = [r for r in rows if r["section"] == "timing" and "error" not in r]
    if timed:
        base = {r["case"]: r["tflops_per_gpu"] for r in timed if r["P"] == 1}
        lines += [
            "| case | P | ms | TFLOP/s per GPU | weak-scaling eff. | ms (copy engines) | CP ms | CP TFLOP/s per GPU "
            "| ours / CP |",
            "|---" * 9 + "|",
        ]
        for r in timed:
            eff = r["tflops_per_gpu"] / base[r["case"]] if r["case"] in base else float("nan")
            cp = (f"{r['cp_ms']:.1f} ({r['cp_backend']})", f"{r['cp_tflops_per_gpu']:.0f}", f"{r['ours_over_cp']:.2f}x") if "cp_ms" in r else (
                r.get("cp_error", "")[:60], "", "")  # fmt: skip
            copies = f"{r['copy_engine_ms']:.1f}" if "copy_engine_ms" in r else ""
            lines.append(
                f"| {r['case']} | {r['P']} | {r['ms']:.1f} | {r['tflops_per_gpu']:.0f} | {eff:.2f} | {copies} | "
                f"{cp[0]} | {cp[1]} | {cp[2]} |"
            )
    profiled = [r for r in rows if r["section"] == "profile" and "error" not in r]
    if profiled:
        lines += ["", "GPU time of one step on rank 0 (NCCL runs beside the kernels, on its own stream):", ""]
        lines += [
            "| case | P | transport | attention ms | NCCL ms | copy ms | other ms | host lead ms | stream window ms "
            "| idle ms | idle, host late ms |",
            "|---" * 11 + "|",
        ]
        for r in profiled:
            idle = [f"{r[key]:.1f}" if key in r else "" for key in STREAM_KEYS]
            lines.append(
                f"| {r['case']} | {r['P']} | {r.get('transport', 'nccl')} | {r['attention_ms']:.1f} | "
                f"{r['nccl_ms']:.1f} | {r.get('copy_ms', 0.0):.1f} | {r['other_ms']:.1f} | {' | '.join(idle)} |"
            )
    busy = [r for r in rows if r["section"] == "contention" and "error" not in r]
    if busy:
        lines += ["", "One GPU alone vs all P GPUs busy at once (plain SDPA, no communication):", ""]
        lines += ["| case | P | alone ms | together ms | slowdown |", "|---" * 5 + "|"]
        for r in busy:
            lines.append(
                f"| {r['case']} | {r['P']} | {r['alone_ms']:.2f} | {r['together_ms']:.2f} | {r['slowdown']:.3f}x |"
            )
    errors = [r for r in rows if "error" in r]
    for r in errors:
        lines += ["", f"ERROR in {r['section']} P={r['P']}:", "```", r["error"], "```"]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, card: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for case in dict.fromkeys(r["case"] for r in rows if r["section"] == "accuracy" and "error" not in r):
        points = [(r["P"], r["err_out"]) for r in rows if r["section"] == "accuracy" and r.get("case") == case]
        left.plot(*zip(*points), marker="o", label=case)
    left.set(xlabel="P (GPUs)", ylabel="relative error of out (bf16 vs float64)", title="error vs P")
    left.legend(fontsize=7)
    for case in dict.fromkeys(r["case"] for r in rows if r["section"] == "timing" and "error" not in r):
        points = [(r["P"], r["tflops_per_gpu"]) for r in rows if r["section"] == "timing" and r.get("case") == case]
        right.plot(*zip(*points), marker="o", label=f"ours: {case}")
        cp = [(r["P"], r["cp_tflops_per_gpu"]) for r in rows if r.get("case") == case and "cp_tflops_per_gpu" in r]
        if cp:
            right.plot(*zip(*cp), marker="x", linestyle="--", label=f"context parallel: {case}")
    right.set(xlabel="P (GPUs)", ylabel="useful TFLOP/s per GPU", title="32K tokens per GPU, fwd+bwd, bf16")
    right.legend(fontsize=7)
    fig.suptitle(card)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def contention(rank: int, world_size: int, device: torch.device, quick: bool) -> list[dict]:
    """Plain cuDNN SDPA forward+backward (32K tokens, no communication) on each GPU alone while the others idle,
    then on all P at once: how much busy neighbours slow a GPU down, apart from the ring."""
    from torch.nn.attention import SDPBackend

    if device.type != "cuda" or world_size == 1:
        return []
    b, n, h, d = (1, 256, 4, 16) if quick else (1, 32768, 16, 128)
    iters, warmup = (2, 1) if quick else (10, 3)
    rows = []
    for causal in (True, False):
        log(rank, f"P={world_size} contention: causal={causal}")
        step, _ = _context_parallel_step(1, b, n, h, d, causal, torch.bfloat16, device, SDPBackend.CUDNN_ATTENTION)
        alone = 0.0
        for turn in range(world_size):
            dist.barrier()
            if rank == turn:
                alone = median_ms(step, iters, warmup, device, together=False)
            dist.barrier()
        alone = multigpu.max_over_ranks(alone, device)
        together = median_ms(step, iters, warmup, device)
        rows.append({
            "section": "contention", "case": f"SDPA {'causal' if causal else 'non-causal'}", "P": world_size,
            "alone_ms": alone, "together_ms": together, "slowdown": together / alone,
        })  # fmt: skip
    return rows


SECTIONS = {"accuracy": accuracy, "timing": timing, "profile": profile, "contention": contention}


def main(argv=None) -> int:
    return multigpu.main(
        argv, name="ring", description=__doc__.splitlines()[0], sections=SECTIONS, world_sizes=[1, 2, 4],
        markdown=_markdown, plot=plot,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
