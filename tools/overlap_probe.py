"""How much a transfer running beside attention slows the attention kernels, by transport.

Two GPUs (one process each, NCCL group). Rank 0 and rank 1 each time a few cuDNN attention
steps (forward + backward, bf16, B=1, H=16, D=128, 16K x 16K, the size of one ring block at
32K tokens per GPU):

- ``alone``: nothing else on the GPU;
- ``nccl``: NCCL ``batch_isend_irecv`` exchanges (what the ring uses) of ``--mbytes`` each
  way run on NCCL's stream meanwhile; NCCL moves data with thread blocks on the SMs;
- ``copy engine``: each rank copies its peer's buffer (PyTorch symmetric memory, the peer's
  memory mapped into this process) with ``copy_`` on a side stream, after a signal handshake
  (``put_signal`` / ``wait_signal``): a DMA copy, no SMs but the handshake's.

The transfers (``--copies`` of ``--mbytes``) are meant to outlast the timed steps, so the
slowdown is the one under continuous traffic; a ring step has traffic for part of its time.
Prints and writes ``overlap_probe.json``: attention ms per step and the transfer's GB/s,
per mode, the slowest rank's.

    python tools/overlap_probe.py --out DIR [--mbytes 256] [--copies 150] [--steps 8]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import multigpu
from multigpu import max_over_ranks

DEFAULTS = {"mbytes": 256, "copies": 150, "steps": 8}  # passed to the ranks as OVERLAP_<NAME>


def _arg(name: str) -> int:
    return int(os.environ.get(f"OVERLAP_{name.upper()}", DEFAULTS[name]))


def _attention_step(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        F.scaled_dot_product_attention(qq, kk, vv).sum().backward()


def _timed(q, k, v, start_transfer) -> tuple[float, float]:
    """(attention ms per step, transfer ms) with ``start_transfer`` posted just before the steps."""
    steps = _arg("steps")
    torch.cuda.synchronize()
    dist.barrier()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    transfer_done = start_transfer()
    begin.record()
    for _ in range(steps):
        _attention_step(q, k, v)
    end.record()
    transfer_ms = transfer_done() if transfer_done is not None else 0.0
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / steps, transfer_ms


def overlap(rank: int, world_size: int, device: torch.device, quick: bool) -> list[dict]:
    import torch.distributed._symmetric_memory as symm_mem

    if world_size != 2 or device.type != "cuda":
        return []
    n = 2048 if quick else 16384
    q, k, v = (torch.randn(1, 16, n, 128, dtype=torch.bfloat16, device=device) for _ in range(3))
    numel = _arg("mbytes") * 2**20 // 2
    peer = 1 - rank
    for _ in range(2):
        _attention_step(q, k, v)
    copies = _arg("copies")

    def none():
        return None

    def nccl():
        send = torch.ones(numel, dtype=torch.bfloat16, device=device)
        recv = torch.empty_like(send)
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        works = []
        for _ in range(copies):
            ops = [dist.P2POp(dist.isend, send, peer), dist.P2POp(dist.irecv, recv, peer)]
            works += dist.batch_isend_irecv(ops)

        def done():
            for work in works:
                work.wait()
            stop.record()
            torch.cuda.synchronize()
            return start.elapsed_time(stop)

        return done

    buffer = symm_mem.empty(numel, dtype=torch.bfloat16, device=device).fill_(rank + 1)
    handle = symm_mem.rendezvous(buffer, dist.group.WORLD)
    remote = handle.get_buffer(peer, (numel,), torch.bfloat16)
    local = torch.empty(numel, dtype=torch.bfloat16, device=device)
    side = torch.cuda.Stream(device)

    def copy_engine():
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            start.record()
            for _ in range(copies):  # each copy after a handshake, as a ring step would do it
                handle.put_signal(peer, 0, 10_000)
                handle.wait_signal(peer, 0, 10_000)
                local.copy_(remote)
            stop.record()

        def done():
            stop.synchronize()
            return start.elapsed_time(stop)

        return done

    rows = []
    for mode, start_transfer in (("alone", none), ("nccl", nccl), ("copy engine", copy_engine)):
        multigpu.log(rank, f"overlap: {mode}")
        ms, transfer_ms = _timed(q, k, v, start_transfer)
        gbytes = copies * numel * 2 / 1e9
        row = {
            "section": "overlap", "mode": mode, "P": world_size, "mbytes": _arg("mbytes"),
            "attention_ms": max_over_ranks(ms, device),
            "transfer_ms": max_over_ranks(transfer_ms, device),
        }  # fmt: skip
        row["transfer_GBps"] = gbytes / row["transfer_ms"] * 1e3 if row["transfer_ms"] else None
        rows.append(row)
    ok = bool((local == peer + 1).all())  # the copy engine moved the peer's bytes
    for row in rows:
        row["copy_checked"] = ok
    base = rows[0]["attention_ms"]
    for row in rows:
        row["slowdown"] = row["attention_ms"] / base
    return rows


def _markdown(rows: list[dict], card: str) -> str:
    lines = [f"Card: {card}", "", "| mode | attention ms/step | slowdown | transfer ms | GB/s |", "|---" * 5 + "|"]
    for r in rows:
        if "error" in r:
            lines += ["", "```", r["error"], "```"]
            continue
        gbps = f"{r['transfer_GBps']:.0f}" if r.get("transfer_GBps") else ""
        lines.append(
            f"| {r['mode']} | {r['attention_ms']:.2f} | {r['slowdown']:.3f} | {r['transfer_ms']:.1f} | {gbps} |"
        )
    return "\n".join(lines)


def _plot(rows, path, card) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in rows if "error" not in r]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([r["mode"] for r in good], [r["slowdown"] for r in good])
    ax.set(ylabel="attention time / alone", title=f"transfer beside attention, {card}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    for name, default in DEFAULTS.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    known, rest = parser.parse_known_args(argv)
    os.environ.update({f"OVERLAP_{name.upper()}": str(getattr(known, name)) for name in DEFAULTS})
    return multigpu.main(
        rest, name="overlap_probe", description=__doc__.splitlines()[0], sections={"overlap": overlap},
        world_sizes=[2], markdown=_markdown, plot=_plot,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
