"""The blockwise attention engine: one autograd function for every implementation.

An implementation is a :class:`BlockSchedule`: it says which blocks
``(query rows, key rows, mask)`` exist and where their keys come from. The
engine owns the float32 (float64 for float64 inputs) accumulators and the LSE
merge. Backward needs no per-block state: each block's kernel backward is called
with the block's ``q, k, v`` and the *final* ``out`` and ``lse`` of its rows.

Accumulators use the ``(B, N, H, D)`` layout for ``out`` and ``(B, N, H)`` for
``lse`` so a schedule can address both with the same (strided) views.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .kernels import KernelBackend, accumulation_dtype
from .lse import lse_probe
from .windows import window_kwargs

__all__ = [
    "DOUBLE_BACKWARD_MESSAGE",
    "Accumulator",
    "BlockKernel",
    "BlockSchedule",
    "blockwise_attention",
    "no_double_backward",
]


@dataclass
class BlockKernel:
    """A kernel bound to the call's constants (scale, dropout)."""

    backend: KernelBackend
    scale: float
    dropout_p: float = 0.0
    seed: int = 0

    def forward_into(
        self,
        out_view: torch.Tensor,
        lse_view: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool = False,
        mask: torch.Tensor | None = None,
        window: tuple[int, int] | None = None,
        block_id: int = 0,
    ) -> None:
        """Compute one block and merge it into ``out_view`` / ``lse_view``.

        ``q, k, v`` are ``(b, n, h, d)``; the views may have more leading dims
        (e.g. segments unfolded), as long as they hold the same elements.
        ``window``: the block's kernel window (:mod:`ring_core.windows`), or None.
        """
        out, lse = self.backend.forward(
            q,
            k,
            v,
            scale=self.scale,
            causal=causal,
            dropout_p=self.dropout_p,
            seed=self.seed + block_id,
            **window_kwargs(self.backend, q, k, mask, window),
        )
        self.backend.merge(
            out_view,
            lse_view,
            out.reshape(out_view.shape),
            lse.transpose(1, 2).reshape(lse_view.shape),
        )

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        *,
        causal: bool = False,
        mask: torch.Tensor | None = None,
        window: tuple[int, int] | None = None,
        block_id: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exact ``dq, dk, dv`` contributions of one block; ``lse`` is ``(b, n, h)``."""
        return self.backend.backward(
            dout,
            q,
            k,
            v,
            out,
            lse.transpose(1, 2),
            scale=self.scale,
            causal=causal,
            dropout_p=self.dropout_p,
            seed=self.seed + block_id,
            **window_kwargs(self.backend, q, k, mask, window),
        )

    def accumulate(self, grad: torch.Tensor, block_grad: torch.Tensor) -> None:
        """``grad += block_grad`` (views of the same shape), through the backend."""
        self.backend.accumulate(grad, block_grad)


class Accumulator:
    """Running ``out`` (``(B, N, H, D)``) and ``lse`` (``(B, N, H)``) of a forward pass."""

    def __init__(self, q: torch.Tensor, value_dim: int | None = None) -> None:
        dtype = accumulation_dtype(q.dtype)
        b, n, h, d = q.shape
        self.out = torch.zeros(b, n, h, value_dim or d, dtype=dtype, device=q.device)
        self.lse = torch.full((b, n, h), float("-inf"), dtype=dtype, device=q.device)


class BlockSchedule(ABC):
    """Which blocks exist and how they are fed to a kernel, forward and backward."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, acc: Accumulator) -> None:
        """Merge every block into ``acc``."""

    @abstractmethod
    def backward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        dout: torch.Tensor,
        grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> None:
        """Add every block's exact contribution to ``grads = (dq, dk, dv)`` (accumulation dtype)."""


def schedule_forward(
    schedule: BlockSchedule, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every block of ``schedule`` merged: ``out`` (dtype of ``q``) and ``lse`` ``(B, N, H)`` (accumulation dtype)."""
    acc = Accumulator(q, v.shape[-1])
    schedule.forward(q, k, v, acc)
    return acc.out.to(q.dtype), acc.lse


def schedule_backward(
    schedule: BlockSchedule,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dq, dk, dv`` (dtypes of ``q, k, v``) of :func:`schedule_forward`'s ``out``, from the final ``out`` and ``lse``."""
    dtype = accumulation_dtype(q.dtype)
    dq, dk, dv = (torch.zeros(t.shape, dtype=dtype, device=t.device) for t in (q, k, v))
    grads = (dq, dk, dv)
    schedule.backward(q, k, v, out, lse, dout.contiguous(), grads)
    return grads[0].to(q.dtype), grads[1].to(k.dtype), grads[2].to(v.dtype)


DOUBLE_BACKWARD_MESSAGE = (
    "ring attention has no double backward: its backward is computed blockwise outside autograd, so gradients "
    "of its gradients (backward of a torch.autograd.grad(..., create_graph=True) result: gradient penalties, "
    "Hessian-vector products) would be wrong; take gradients of gradients of another attention"
)


class _RefuseDoubleBackward(torch.autograd.Function):
    """Identity on the gradients of a backward run with ``create_graph=True``; differentiating them raises."""

    @staticmethod
    def forward(ctx: Any, count: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.view_as(t) for t in tensors[len(tensors) - count :])

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[None, ...]:
        raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)


def no_double_backward(
    backward: Callable[..., tuple[torch.Tensor | None, ...]],
) -> Callable[..., tuple[torch.Tensor | None, ...]]:
    """Decorator of an attention autograd Function's ``backward`` (the custom ops of :mod:`ring_core.ops` need
    none): it runs without building a graph, and under ``create_graph=True`` its gradients become outputs of a
    node whose own backward raises :data:`DOUBLE_BACKWARD_MESSAGE`, so gradients of gradients fail clearly
    instead of coming out wrong."""

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grad_outputs: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        if not torch.is_grad_enabled():
            return grads
        inputs = [t for t in (*ctx.saved_tensors, *grad_outputs) if isinstance(t, torch.Tensor)]
        present = [g for g in grads if g is not None]
        wrapped = iter(_RefuseDoubleBackward.apply(len(present), *inputs, *present))  # type: ignore[no-untyped-call]
        return tuple(None if g is None else next(wrapped) for g in grads)

    return wrapper


class _BlockwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, schedule: BlockSchedule, lse_grad: bool, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = schedule_forward(schedule, q, k, v)
        ctx.schedule, ctx.lse_grad = schedule, lse_grad
        ctx.save_for_backward(q, k, v, out, lse)
        if not lse_grad:
            ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @no_double_backward
    def backward(ctx: Any, dout: torch.Tensor, dlse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = schedule_backward(ctx.schedule, q, k, v, out, lse, dout)
        if ctx.lse_grad and dlse is not None:  # one more pass over the blocks (lse_probe)
            probe, zeros, shifted = lse_probe(v, out, dlse)
            lse_dq, lse_dk, _ = schedule_backward(ctx.schedule, q, k, zeros, shifted, lse, probe)
            dq, dk = dq + lse_dq, dk + lse_dk
        return None, None, dq, dk, dv


def blockwise_attention(
    schedule: BlockSchedule, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, lse_grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``schedule`` forward (and, through autograd, backward).

    Returns ``out`` (``(B, N, H, D)``, dtype of ``q``) and ``lse`` (``(B, N, H)``,
    accumulation dtype), differentiable with ``lse_grad`` (its gradient costs one more
    backward pass over the schedule's blocks, communication included, and only when it
    arrives), else not.
    """
    out, lse = _BlockwiseAttention.apply(schedule, lse_grad, q, k, v)  # type: ignore[no-untyped-call]
    return out, lse
