"""Conformance checks against SPEC.md, shared by ``tests/conformance`` and ``ring-attention verify``.

A :class:`Case` is a shape and a configuration; :func:`check_attention` runs an
attention module forward and backward on fresh random inputs and compares
output and gradients with the float64 reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from .reference import reference_attention

__all__ = [
    "CASES",
    "QUICK_CASES",
    "TOLERANCES",
    "Case",
    "CaseResult",
    "DistributedCaseResult",
    "DistributedRunError",
    "check_attention",
    "check_distributed",
    "fit_case",
    "format_table",
    "free_port",
    "make_inputs",
    "reference_outputs",
    "relative_error",
    "report_progress",
    "run_gloo",
    "sharded_case_errors",
    "spawn_group",
    "within_tolerance",
]

# dtype -> (max relative error of the output, of each gradient); SPEC.md "Tolerances".
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-2, 2e-2),
    torch.bfloat16: (1e-2, 2e-2),
}


@dataclass(frozen=True)
class Case:
    """One conformance shape and configuration."""

    name: str
    seq_len: int
    heads: int
    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    kv_heads: int | None = None
    batch: int = 2
    head_dim: int = 8
    merge: str = "lse"
    causal: bool = False
    padding: bool = False
    window_size: tuple[int, int] = (-1, -1)
    documents: tuple[int, ...] | None = None  # cu_seqlens values (packed, batch of one)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments (``window_size`` only when there is a window)."""
        config: dict[str, Any] = {
            "segment_lengths": list(self.segment_lengths),
            "dilation_rates": list(self.dilation_rates),
            "merge": self.merge,
        }
        if self.window_size != (-1, -1):
            config["window_size"] = self.window_size
        return config

    def forward_options(self, device: str | torch.device = "cpu") -> dict[str, Any]:
        """Extra keywords of the forward call: ``cu_seqlens`` for packed cases."""
        if self.documents is None:
            return {}
        return {"cu_seqlens": torch.tensor(self.documents, dtype=torch.int32, device=device)}

    @property
    def reference_options(self) -> dict[str, Any]:
        """Keywords of :func:`~ring_core.reference_attention` beyond the config."""
        options: dict[str, Any] = {"window_size": self.window_size}
        if self.documents is not None:
            options["cu_seqlens"] = torch.tensor(self.documents)
        return options

    def __str__(self) -> str:
        return self.name


CASES: tuple[Case, ...] = (
    Case("dense", 37, 4, (64,), (1,)),
    Case("dense-causal-pad", 29, 3, (29,), (1,), causal=True, padding=True),
    Case("dilated-odd-n", 45, 4, (8, 16), (1, 2)),
    Case("dilated-causal-gqa", 50, 6, (6, 12, 48), (1, 2, 3), kv_heads=2, causal=True),
    Case("dilated-pad-segment>n", 23, 4, (4, 32), (1, 4), padding=True),
    Case("no-rate-1-branch", 40, 4, (6, 20), (2, 4), causal=True, padding=True),
    Case("head-groups", 33, 5, (4, 8, 64), (1, 2, 4), merge="head_groups", causal=True),
    Case("head-groups-gqa-pad", 31, 6, (8, 16), (2, 4), kv_heads=3, merge="head_groups", padding=True),
)

# A few cases for quick checks (the CLI's verify).
QUICK_CASES: tuple[Case, ...] = (CASES[1], CASES[3], CASES[5], CASES[6])


def packed_documents(seq_len: int, count: int, seed: int) -> tuple[int, ...]:
    """Random ``cu_seqlens`` values of ``count`` documents over ``seq_len`` positions, one of them empty."""
    generator = torch.Generator().manual_seed(seed)
    cuts = torch.randint(1, seq_len, (count - 2,), generator=generator).tolist()
    cuts.append(cuts[0])  # the same boundary twice: an empty document
    return (0, *sorted(cuts), seq_len)


# Packed documents (SPEC.md "Packed sequences") and sliding windows ("Sliding windows"): documents shorter
# than a segment and crossing segment boundaries, an empty one, windows (w, -1), (w, 0) causal, two-sided.
PACKED_CASES: tuple[Case, ...] = (
    Case("packed-dense-causal", 50, 4, (64,), (1,), batch=1, causal=True, documents=packed_documents(50, 6, 1)),
    Case(
        "packed-dilated-gqa-pad", 53, 6, (4, 8, 16), (1, 2, 4), kv_heads=2, batch=1, padding=True,
        documents=packed_documents(53, 6, 2),
    ),
    Case(
        "packed-head-groups-causal", 47, 5, (6, 12), (2, 3), merge="head_groups", causal=True, batch=1,
        documents=packed_documents(47, 5, 3),
    ),
    Case("window-left", 45, 4, (8, 16), (1, 2), window_size=(5, -1)),
    # a causal window inside segments of odd length: window tiles whose keys are their rows, and others
    Case("window-causal-odd-segments", 59, 2, (33,), (1,), causal=True, window_size=(2, 0)),
    Case("window-causal-gqa-pad", 41, 6, (64,), (1,), kv_heads=3, causal=True, padding=True, window_size=(6, 0)),
    Case("window-two-sided-head-groups-pad", 39, 4, (6, 12), (1, 3), merge="head_groups", window_size=(4, 3),
         padding=True),
    Case(
        "packed-window-dilated-causal-gqa", 56, 4, (8, 16, 32), (1, 2, 4), kv_heads=2, causal=True, batch=1,
        window_size=(9, -1), documents=packed_documents(56, 5, 4),
    ),
    Case(
        "packed-window-two-sided-pad", 44, 4, (64,), (1,), padding=True, batch=1, window_size=(3, 5),
        documents=packed_documents(44, 6, 5),
    ),
)  # fmt: skip


def make_inputs(
    case: Case, dtype: torch.dtype, device: str | torch.device = "cpu", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fresh random normal ``q, k, v`` (and a padding mask that never hides every key)."""
    generator = torch.Generator().manual_seed(seed)
    kv_heads = case.kv_heads or case.heads

    def randn(heads: int) -> torch.Tensor:
        x = torch.randn(case.batch, case.seq_len, heads, case.head_dim, generator=generator, dtype=torch.float64)
        return x.to(dtype=dtype, device=device)

    q, k, v = randn(case.heads), randn(kv_heads), randn(kv_heads)
    mask = None
    if case.padding:
        mask = torch.rand(case.batch, case.seq_len, generator=generator) < 0.25
        mask[:, 0] = False
        mask = mask.to(device)
    return q, k, v, mask


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``||value - ref|| / ||ref||`` in float64; ``inf`` for any NaN/Inf in ``value``."""
    value, reference = value.detach().double().cpu(), reference.detach().double().cpu()
    if not torch.isfinite(value).all():
        return float("inf")
    denominator = float(reference.norm().item())
    difference = float((value - reference).norm().item())
    return difference / denominator if denominator > 0 else difference


def within_tolerance(errors: dict[str, float], tolerance: tuple[float, float]) -> bool:
    """Every error within its bound: the output's for ``"out"``, the gradients' for the rest."""
    limit_out, limit_grad = tolerance
    return all(err <= (limit_out if name == "out" else limit_grad) for name, err in errors.items())


@dataclass
class CaseResult:
    """Errors of one case: ``out``, ``dq``, ``dk``, ``dv`` against the reference."""

    case: Case
    dtype: torch.dtype
    errors: dict[str, float] = field(default_factory=dict)
    tolerance: tuple[float, float] = (0.0, 0.0)

    @property
    def passed(self) -> bool:
        return within_tolerance(self.errors, self.tolerance)


def reference_outputs(
    case: Case,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    dout: torch.Tensor,
    **reference_options: Any,
) -> dict[str, torch.Tensor]:
    """The float64 reference output and gradients for ``dout``."""
    leaves = [x.detach().double().cpu().requires_grad_() for x in (q, k, v)]
    config = {key: value for key, value in case.config.items() if key != "window_size"}
    ref = reference_attention(
        leaves[0],
        leaves[1],
        leaves[2],
        **config,
        is_causal=case.causal,
        key_padding_mask=None if mask is None else mask.cpu(),
        **{**case.reference_options, **reference_options},
    )
    assert isinstance(ref, torch.Tensor)  # (no return_lse)
    grads = torch.autograd.grad(ref, leaves, dout.double().cpu())
    return {"out": ref.detach(), "dq": grads[0], "dk": grads[1], "dv": grads[2]}


def check_attention(
    module: nn.Module | Callable[..., torch.Tensor],
    case: Case,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    seed: int = 0,
    reference_options: dict[str, Any] | None = None,
) -> CaseResult:
    """Run ``module(q, k, v, is_causal=..., key_padding_mask=...)`` forward and backward vs the reference.

    Packed cases also pass ``cu_seqlens=``; windowed ones carry ``window_size`` in ``case.config``.
    """
    q, k, v, mask = make_inputs(case, dtype, device, seed)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = module(*leaves, is_causal=case.causal, key_padding_mask=mask, **case.forward_options(device))
    generator = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    out.backward(dout.to(dtype=out.dtype, device=out.device))
    expected = reference_outputs(case, q, k, v, mask, dout, **(reference_options or {}))
    actual = {"out": out, "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
    errors = {
        name: float("inf") if (value := actual[name]) is None else relative_error(value, expected[name])
        for name in expected
    }
    return CaseResult(case, dtype, errors, TOLERANCES[dtype])


def format_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A plain aligned text table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- distributed checks: real gloo processes (torch.multiprocessing) ---------------------------


class DistributedRunError(RuntimeError):
    """A spawned rank raised, died, or did not finish within the timeout."""


def free_port() -> int:
    """A TCP port that was free a moment ago (for ``init_method``)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


_progress: tuple[int, Any] | None = None  # in a spawn_group child: (rank, the results queue)


def report_progress(value: object) -> None:
    """From a function that :func:`spawn_group` runs: hand ``value`` to the parent's ``on_progress`` now."""
    if _progress is not None:
        rank, results = _progress
        results.put((rank, None, value))


def _worker(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout: float | None,
    threads: int | None,
    fn: Callable[..., object],
    args: tuple[object, ...],
    results: Any,
) -> None:  # in a child process
    import datetime
    import traceback

    import torch.distributed as dist

    global _progress
    _progress = (rank, results)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        options: dict[str, Any] = {}
        if backend == "nccl":
            torch.cuda.set_device(rank)
            options["device_id"] = torch.device("cuda", rank)
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout or 1800), **options,
        )  # fmt: skip
        value = fn(rank, world_size, *args)
        results.put((rank, True, value))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_group(
    fn: Callable[..., object],
    world_size: int,
    *args: object,
    backend: str = "gloo",
    timeout: float | None = 120.0,
    threads: int | None = 1,
    on_progress: Callable[[int, object], None] | None = None,
) -> list[object]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes of one process group.

    ``backend``: ``"gloo"`` (CPU) or ``"nccl"`` (rank ``r`` on GPU ``r``). ``fn`` must be
    importable (a module-level function, also of a script) and its result picklable; each
    process uses ``threads`` CPU threads (None: torch's default). Returns the results in rank
    order; raises :class:`DistributedRunError` with every failing rank's traceback, or when
    ranks are still running after ``timeout`` seconds (they are killed: a failing check never
    hangs; ``None``: no limit). What ``fn`` passes to :func:`report_progress` reaches
    ``on_progress(rank, value)`` while it runs.
    """
    import queue as queue_module
    import time

    import torch.multiprocessing as mp

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(
            target=_worker, args=(rank, world_size, port, backend, timeout, threads, fn, args, results), daemon=True
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    collected: dict[int, tuple[bool, object]] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while len(collected) < world_size:
            remaining = 1.0 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(collected))
                raise DistributedRunError(f"ranks {missing} of {world_size} did not finish within {timeout:.0f} s")
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
                if ok is None:  # report_progress
                    if on_progress is not None:
                        on_progress(rank, value)
                    continue
                collected[rank] = (ok, value)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(processes) if r not in collected and p.exitcode is not None]
                if dead:
                    time.sleep(0.5)  # a result may still be in flight
                    while not results.empty():
                        rank, ok, value = results.get()
                        if ok is not None:
                            collected[rank] = (ok, value)
                    dead = [r for r in dead if r not in collected]
                    if dead:
                        codes = {r: processes[r].exitcode for r in dead}
                        raise DistributedRunError(f"ranks {dead} died without a result (exit codes {codes})") from None
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
    failures = [f"rank {r}:\n{value}" for r, (ok, value) in sorted(collected.items()) if not ok]
    if failures:
        raise DistributedRunError("\n".join(failures))
    return [collected[r][1] for r in range(world_size)]


def run_gloo(
    fn: Callable[..., object],
    world_size: int,
    *args: object,
    timeout: float = 120.0,
    on_progress: Callable[[int, object], None] | None = None,
) -> list[object]:
    """:func:`spawn_group` on the CPU (gloo, one thread per process): what the tests and ``verify`` use."""
    return spawn_group(fn, world_size, *args, timeout=timeout, on_progress=on_progress)


def fit_case(case: Case, world_size: int, layout: str = "contiguous") -> Case:
    """``case`` with its sequence length rounded up to a multiple of ``P`` (``2P`` for zigzag)."""
    import dataclasses

    multiple = world_size * (2 if layout == "zigzag" and world_size > 1 else 1)
    seq_len = -(-case.seq_len // multiple) * multiple
    if seq_len == case.seq_len:
        return case
    documents = None if case.documents is None else (*case.documents[:-1], seq_len)  # the last one grows
    return dataclasses.replace(case, seq_len=seq_len, documents=documents)


@dataclass
class DistributedCaseResult:
    """Per-rank errors (``out``, ``dq``, ``dk``, ``dv`` vs the reference rows) of one case and layout."""

    case: Case
    layout: str
    world_size: int
    dtype: torch.dtype
    rank_errors: list[dict[str, float]]
    tolerance: tuple[float, float]

    @property
    def passed(self) -> bool:
        return all(within_tolerance(errors, self.tolerance) for errors in self.rank_errors)


def sharded_case_errors(
    module: nn.Module | Callable[..., torch.Tensor],
    case: Case,
    rank: int,
    world_size: int,
    layout: str = "contiguous",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> dict[str, float]:
    """On rank ``rank`` of a running group: ``module`` on this rank's shards vs the reference rows.

    Every rank builds the same full inputs (``case.seq_len`` must fit the layout), runs
    forward and backward on its shard and returns the relative errors of its ``out``,
    ``dq``, ``dk``, ``dv`` shards.
    """
    from .sharding import shard_sequence

    q, k, v, mask = make_inputs(case, dtype, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(q.shape[:3] + v.shape[3:], generator=generator, dtype=torch.float64)
    expected = reference_outputs(case, q, k, v, mask, dout)

    def shard(x: torch.Tensor) -> torch.Tensor:
        return shard_sequence(x, layout, rank=rank, world_size=world_size)

    leaves = [shard(x).clone().requires_grad_() for x in (q, k, v)]
    out = module(
        *leaves, is_causal=case.causal, key_padding_mask=None if mask is None else shard(mask), **case.forward_options()
    )
    out.backward(shard(dout).to(out.dtype))
    actual = {"out": out, "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
    return {
        key: float("inf") if (value := actual[key]) is None else relative_error(value, shard(expected[key]))
        for key in expected
    }


# One checked case on one rank: the case (fitted to the group), its layout and the errors.
_Row = tuple[Case, str, dict[str, float]]


def _distributed_check_worker(
    rank: int,
    world_size: int,
    name: str,
    cases: Sequence[Case],
    layouts: Sequence[str | None],
    dtype: torch.dtype,
    options: dict[str, Any] | None,
    seed: int,
) -> list[_Row]:
    from .factory import create_attention

    rows: list[_Row] = []
    for case in cases:
        for layout in layouts:
            fitted = fit_case(case, world_size, layout or "contiguous")
            config = {**fitted.config, **(options or {})}
            if layout is not None:
                config["layout"] = layout
            module = create_attention(name, **config)
            errors = sharded_case_errors(module, fitted, rank, world_size, layout or "contiguous", dtype, seed)
            report_progress((len(rows), fitted, layout or "contiguous", errors))
            rows.append((fitted, layout or "contiguous", errors))
    return rows


def check_distributed(
    name: str,
    cases: Sequence[Case] = QUICK_CASES,
    world_size: int = 2,
    dtype: torch.dtype = torch.float64,
    layouts: Sequence[str | None] = (None,),
    options: dict[str, Any] | None = None,
    seed: int = 0,
    timeout: float = 300.0,
    on_result: Callable[[DistributedCaseResult], None] | None = None,
) -> list[DistributedCaseResult]:
    """Run implementation ``name`` on ``world_size`` gloo ranks with sharded inputs, forward and backward.

    Every rank builds the same full inputs, takes its shard (``layouts``: ``None``
    passes no ``layout`` argument, i.e. the implementation's default, contiguous), and
    compares its output and ``dq, dk, dv`` shards with the matching rows of the float64
    reference. Each case's ``N`` is rounded up to fit ``P`` (:func:`fit_case`). All
    cases run in one process group (spawning costs seconds); ``on_result`` gets each
    case's result as soon as every rank has finished it.
    """
    reported: dict[int, dict[int, dict[str, float]]] = {}

    def on_progress(rank: int, row: object) -> None:
        index, case, layout, errors = cast(tuple[int, Case, str, dict[str, float]], row)  # the worker's report
        reported.setdefault(index, {})[rank] = errors
        if len(reported[index]) == world_size and on_result is not None:
            rank_errors = [reported[index][r] for r in range(world_size)]
            on_result(DistributedCaseResult(case, layout, world_size, dtype, rank_errors, TOLERANCES[dtype]))

    per_rank = cast(list[list[_Row]], run_gloo(
        _distributed_check_worker, world_size, name, tuple(cases), tuple(layouts), dtype, options, seed,
        timeout=timeout, on_progress=on_progress,
    ))  # fmt: skip
    results = []
    for index, (case, layout, _) in enumerate(per_rank[0]):
        rank_errors = [rows[index][2] for rows in per_rank]
        results.append(DistributedCaseResult(case, layout, world_size, dtype, rank_errors, TOLERANCES[dtype]))
    return results
