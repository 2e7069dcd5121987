"""RingDilatedAttentionProduction: the ring hardened for long training runs.

On top of :class:`~ring_distributed.RingDistributedDilatedAttention` (default strategy
``"ring"``):

- ``checkpoint=True``: the attention block (communication included) is recomputed in
  backward instead of keeping its output, log-sum-exp and (Ulysses) head-sharded copies;
- ring communication buffers come from a :class:`~ring_distributed.comm.BufferPool`:
  allocated on the first call of a shape, reused on every later call (``reuse_buffers``);
- ``timeout=`` seconds on every collective and P2P wait: a stalled or dead peer raises
  :class:`~ring_distributed.comm.CollectiveError` on every other rank instead of a hang;
- ``on_nonfinite="raise" | "skip"``: inputs, output and gradients are checked on every
  rank, and every rank learns which rank, step and tensor had NaN/Inf (one tiny
  all-reduce each); ``"raise"`` raises :class:`NonFiniteError` everywhere, ``"skip"``
  warns, records the event and makes this step's attention output (or gradients) zero;
- ``deterministic=True``: dropout seeds derive from ``seed`` and the step, and the call
  (forward and backward) runs under ``torch.use_deterministic_algorithms``; repeated runs
  on the same inputs are bitwise identical.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from ring_core.plugin import check_flag

from .attention import RingDistributedDilatedAttention, _Result
from .comm import BufferPool, ManagedComm, timed_wait
from .mesh import MeshGroups

NONFINITE_MODES = (None, "raise", "skip")

_Grads = tuple[torch.Tensor | None, ...]


class NonFiniteError(FloatingPointError):
    """NaN or Inf in an input, the output or a gradient of an attention call (on some rank)."""


class _ZeroAttention(torch.autograd.Function):
    """A skipped step: output zeros, gradients zeros (never NaN times zero)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx.metas = [(t.shape, t.dtype, t.device) for t in (q, k, v)]
        return torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.metas)


def _zero_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_lse: bool) -> _Result:
    """A skipped step's result: zeros (and an lse of -inf, a row that saw nothing)."""
    out: torch.Tensor = _ZeroAttention.apply(q, k, v)  # type: ignore[no-untyped-call]
    if not return_lse:
        return out
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out, torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=lse_dtype, device=q.device)


class _GradientGuard(torch.autograd.Function):
    """Identity on ``q, k, v``; its backward checks ``dq, dk, dv`` on every rank."""

    @staticmethod
    def forward(
        ctx: Any, check: Callable[..., _Grads], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx.check = check
        return q.view_as(q), k.view_as(k), v.view_as(v)

    @staticmethod
    def backward(ctx: Any, dq: torch.Tensor | None, dk: torch.Tensor | None, dv: torch.Tensor | None) -> _Grads:
        return (None, *ctx.check(dq, dk, dv))


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True, warn_only=True)`` inside, the previous setting restored on any exit."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


class _DeterministicScope(torch.autograd.Function):
    """``attend(q, k, v)`` (a tensor, or a tuple of them) with its forward and its backward under deterministic
    algorithms.

    The forward keeps the attention's own graph and the backward runs it with
    ``torch.autograd.grad`` inside one ``with`` block, so the setting is restored whatever
    happens in between (a :class:`~ring_core.comm.CollectiveError` in backward included).
    Returns a tuple.
    """

    @staticmethod
    def forward(
        ctx: Any, attend: Callable[..., _Result], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        inputs = [x.detach().requires_grad_(x.requires_grad) for x in (q, k, v)]
        with torch.enable_grad(), _deterministic():
            result = attend(*inputs)
        outputs = result if isinstance(result, tuple) else (result,)
        ctx.graph = inputs, outputs
        ctx.set_materialize_grads(False)
        return tuple(o.detach() for o in outputs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> _Grads:
        inputs, outputs = ctx.graph
        ctx.graph = None
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        wanted = [x for x in inputs if x.requires_grad]
        if not pairs or not wanted:
            return (None, None, None, None)
        with _deterministic():
            found = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
        return (None, *(next(found) if x.requires_grad else None for x in inputs))


class RingDilatedAttentionProduction(RingDistributedDilatedAttention):
    """:class:`RingDistributedDilatedAttention` (default ``strategy="ring"``) hardened for training.

    Extra arguments:

    - ``checkpoint``: recompute the attention in the backward instead of keeping its activations.
    - ``timeout``: seconds a ring exchange may take before every rank raises (``None``: no limit).
    - ``on_nonfinite``: ``None`` (no check), ``"raise"`` or ``"skip"`` (zero that step's output
      and gradients) when a NaN or Inf appears.
    - ``deterministic``: bitwise-reproducible results, dropout included.
    - ``seed``: base of the dropout seed in deterministic mode.
    - ``reuse_buffers``: keep the communication buffers between calls.

    :attr:`step` counts calls; :attr:`buffer_pool` is the pool of communication buffers;
    :attr:`nonfinite_events` lists what ``"skip"`` skipped.
    """

    default_strategy = "ring"

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        merge: str = "lse",
        layout: str = "contiguous",
        process_group: Any = None,
        softmax_scale: float | None = None,
        dropout: float = 0.0,
        kernel: str | None = None,
        *,
        checkpoint: bool = False,
        timeout: float | None = None,
        on_nonfinite: str | None = None,
        deterministic: bool = False,
        seed: int = 0,
        reuse_buffers: bool = True,
        strategy: str | None = None,
        ulysses_degree: int | None = None,
        device_mesh: Any = None,
        node_size: int | None = None,
        window_size: tuple[int, int] = (-1, -1),
    ) -> None:
        super().__init__(
            segment_lengths, dilation_rates, merge, layout, process_group, softmax_scale, dropout, kernel,
            strategy=strategy, ulysses_degree=ulysses_degree, device_mesh=device_mesh, node_size=node_size,
            window_size=window_size, timeout=timeout,
        )  # fmt: skip
        if on_nonfinite not in NONFINITE_MODES:
            raise ValueError(f"on_nonfinite must be one of {list(NONFINITE_MODES)}, got {on_nonfinite!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.checkpoint = check_flag("checkpoint", checkpoint)
        self.on_nonfinite = on_nonfinite
        self.deterministic = check_flag("deterministic", deterministic)
        self.seed = seed
        self.reuse_buffers = check_flag("reuse_buffers", reuse_buffers)
        self.buffer_pool = BufferPool()
        self.nonfinite_events: list[dict[str, Any]] = []
        self._call_step: int | None = None  # the step being processed when it is not the latest

    def _current_step(self) -> int:
        return self.step if self._call_step is None else self._call_step

    # -- hooks of the base class ---------------------------------------------------------------------
    def _make_comm(self, group: Any, rank: int, size: int, device: torch.device) -> ManagedComm:
        return ManagedComm(
            group, rank, size, self.comm_stats, timeout=self.timeout,
            pool=self.buffer_pool if self.reuse_buffers else None, context=f"{self._where()}: ",
        )  # fmt: skip

    def _dropout_seed(self) -> int | None:
        if self.deterministic:
            return self.seed + self._current_step() * 1_000_003_000
        return super()._dropout_seed()

    def _where(self) -> str:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return f"RingDilatedAttentionProduction rank {rank}, step {self._current_step()}"

    def context(self) -> str:
        return f"{self._where()}: "  # the step of the call (also when its backward recomputes it)

    # -- non-finite guard ----------------------------------------------------------------------------
    def _nonfinite_report(
        self, tensors: dict[str, torch.Tensor | None], groups: MeshGroups, stage: str
    ) -> list[tuple[int, str, int]]:
        """``(global rank, tensor, count)`` for every non-finite tensor on any rank (a collective)."""
        names = list(tensors)
        present = [t for t in tensors.values() if t is not None]
        device = present[0].device if present and present[0].device.type == "cuda" else torch.device("cpu")
        table = torch.zeros(groups.world_size, len(names), dtype=torch.int64, device=device)
        for index, tensor in enumerate(tensors.values()):
            if tensor is not None:  # counted on the device: one host sync per check, after the all-reduce
                table[groups.shard_index, index] = (~torch.isfinite(tensor)).sum().to(device)
        for group, size in ((groups.ulysses_group, groups.ulysses_size), (groups.ring_group, groups.ring_size)):
            if size > 1:
                work = dist.all_reduce(table, group=group, async_op=True)
                timed_wait(work, self.timeout, f"{self._where()}: non-finite check of the {stage}")
        table = table.cpu()
        return [(groups.global_ranks[p], names[i], int(table[p, i])) for p, i in torch.nonzero(table).tolist()]

    def _handle_nonfinite(self, found: list[tuple[int, str, int]], stage: str) -> bool:
        """Raise, or record and warn; ``True`` when the step's values must be replaced by zeros."""
        if not found:
            return False
        what = ", ".join(f"{name} on rank {rank} ({count} non-finite elements)" for rank, name, count in found)
        message = f"RingDilatedAttentionProduction step {self._current_step()}: NaN/Inf in the {stage}: {what}"
        if self.on_nonfinite == "raise":
            raise NonFiniteError(message)
        self.nonfinite_events.append({"step": self._current_step(), "stage": stage, "found": found})
        warnings.warn(message + "; skipped (zeros)", RuntimeWarning, stacklevel=3)
        return True

    def _check_gradients(
        self,
        step: int,
        groups: MeshGroups,
        dq: torch.Tensor | None,
        dk: torch.Tensor | None,
        dv: torch.Tensor | None,
    ) -> _Grads:
        previous, self._call_step = self._call_step, step
        try:
            found = self._nonfinite_report({"dq": dq, "dk": dk, "dv": dv}, groups, "gradients")
            if self._handle_nonfinite(found, "gradients"):
                return tuple(None if g is None else torch.zeros_like(g) for g in (dq, dk, dv))
            return dq, dk, dv
        finally:
            self._call_step = previous

    # -- forward -------------------------------------------------------------------------------------
    def _attend_at(
        self,
        step: int,
        return_lse: bool,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        key_padding_mask: torch.Tensor | None,
        dropout_p: float,
        cu_seqlens: torch.Tensor | None = None,
        documents: tuple[int, ...] | None = None,
    ) -> _Result:
        previous, self._call_step = self._call_step, step
        try:
            return self._attend(q, k, v, causal, key_padding_mask, dropout_p, return_lse, cu_seqlens, documents)
        finally:
            self._call_step = previous

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        return_lse: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> _Result:
        """As :meth:`RingDistributedDilatedAttention.forward`, hardened for training.

        Args:
            q: ``(B, N/P, H, D)``, this rank's queries; float64, float32, float16 or bfloat16.
            k: ``(B, N/P, H_kv, D)``, ``H % H_kv == 0``; same dtype and device as ``q``.
            v: ``(B, N/P, H_kv, D_v)``.
            is_causal: query ``t`` sees only keys ``s <= t`` (global positions).
            key_padding_mask: bool ``(B, N/P)``, this rank's shard, ``True`` where a key is padding.
            return_lse: also return the log-sum-exp of each query row's scores, ``(B, H, N/P)``,
                float32 (float64 for float64 inputs).
            cu_seqlens: 1-D integer tensor ``[0, ..., N]``: the global document boundaries of a packed
                batch of one, the same tensor on every rank (documents may cross shards).

        Returns:
            ``(B, N/P, H, D_v)``: this rank's rows of the output. With ``on_nonfinite="skip"`` a
            step with a NaN or Inf in its inputs, its output or (later) a gradient gives zeros
            instead and is recorded in :attr:`nonfinite_events`; ``"raise"`` raises
            :class:`NonFiniteError` on every rank.
            With ``return_lse``, the pair ``(out, lse)``.
        """
        self.count_step()  # in a tensor (see RingAttentionBase.step)
        causal = bool(is_causal)
        dropout_p = self.dropout if self.training else 0.0
        if torch.compiler.is_compiling():
            return self._traced_forward(q, k, v, causal, key_padding_mask, dropout_p, return_lse, cu_seqlens)
        step = self.step
        documents = self._validate(q, k, v, key_padding_mask, causal, dropout_p, cu_seqlens, return_lse)
        if self.on_nonfinite is not None:
            _, groups = self._resolve(q, k)
            found = self._nonfinite_report({"q": q, "k": k, "v": v}, groups, "inputs")
            if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
                check = functools.partial(self._check_gradients, step, groups)
                q, k, v = _GradientGuard.apply(check, q, k, v)  # type: ignore[no-untyped-call]
            if self._handle_nonfinite(found, "inputs"):
                return _zero_attention(q, k, v, return_lse)
        # a recomputation (checkpoint) reuses the checked documents too
        attend = functools.partial(self._attend_at, step, return_lse, cu_seqlens=cu_seqlens, documents=documents)

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> _Result:
            if self.checkpoint and torch.is_grad_enabled():
                checkpointed: _Result = activation_checkpoint(
                    attend, q, k, v, causal, key_padding_mask, dropout_p, use_reentrant=False, preserve_rng_state=True
                )
                return checkpointed
            return attend(q, k, v, causal, key_padding_mask, dropout_p)

        result: _Result
        if not self.deterministic:
            result = run(q, k, v)
        elif torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            scoped = _DeterministicScope.apply(run, q, k, v)  # type: ignore[no-untyped-call]
            result = scoped if return_lse else scoped[0]
        else:
            with _deterministic():
                result = run(q, k, v)
        if self.on_nonfinite is not None:
            out = result[0] if isinstance(result, tuple) else result  # a tuple with return_lse
            found = self._nonfinite_report({"output": out.detach()}, groups, "output")
            if self._handle_nonfinite(found, "output"):
                return _zero_attention(q, k, v, return_lse)
        return result

    def _traced_forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        key_padding_mask: torch.Tensor | None,
        dropout_p: float,
        return_lse: bool,
        cu_seqlens: torch.Tensor | None,
    ) -> _Result:
        """Under ``torch.compile``: the checks and the module's op (what reads values on the host stays out)."""
        if self.on_nonfinite is not None or self.deterministic:
            raise RuntimeError(
                f"RingDilatedAttentionProduction(on_nonfinite={self.on_nonfinite!r}, deterministic="
                f"{self.deterministic}) reads values on the host in every call and runs eager only; compile it "
                "with on_nonfinite=None and deterministic=False"
            )
        documents = self._validate(q, k, v, key_padding_mask, causal, dropout_p, cu_seqlens, return_lse)
        attend = functools.partial(self._attend, return_lse=return_lse, cu_seqlens=cu_seqlens, documents=documents)
        if self.checkpoint and torch.is_grad_enabled():
            checkpointed: _Result = activation_checkpoint(
                attend, q, k, v, causal, key_padding_mask, dropout_p, use_reentrant=False, preserve_rng_state=True
            )
            return checkpointed
        return attend(q, k, v, causal, key_padding_mask, dropout_p)

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", checkpoint={self.checkpoint}, timeout={self.timeout}, on_nonfinite={self.on_nonfinite!r}, "
            f"deterministic={self.deterministic}, reuse_buffers={self.reuse_buffers}"
        )
