"""Conformance checks against SPEC.md, shared by ``tests/conformance`` and ``ring-attention verify``.

A :class:`Case` is a shape and a configuration; :func:`check_attention` runs an
attention module forward and backward on fresh random inputs and compares
output and gradients with the float64 reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .reference import reference_attention

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

    @property
    def config(self) -> dict:
        return {
            "segment_lengths": list(self.segment_lengths),
            "dilation_rates": list(self.dilation_rates),
            "merge": self.merge,
        }

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
    denominator = reference.norm().item()
    difference = (value - reference).norm().item()
    return difference / denominator if denominator > 0 else difference


@dataclass
class CaseResult:
    """Errors of one case: ``out``, ``dq``, ``dk``, ``dv`` against the reference."""

    case: Case
    dtype: torch.dtype
    errors: dict[str, float] = field(default_factory=dict)
    tolerance: tuple[float, float] = (0.0, 0.0)

    @property
    def passed(self) -> bool:
        limit_out, limit_grad = self.tolerance
        return all(err <= (limit_out if name == "out" else limit_grad) for name, err in self.errors.items())

    @property
    def worst(self) -> float:
        return max(self.errors.values())


def reference_outputs(
    case: Case,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    dout: torch.Tensor,
    **reference_options,
) -> dict[str, torch.Tensor]:
    """The float64 reference output and gradients for ``dout``."""
    leaves = [x.detach().double().cpu().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(
        *leaves,
        **case.config,
        is_causal=case.causal,
        key_padding_mask=None if mask is None else mask.cpu(),
        **reference_options,
    )
    grads = torch.autograd.grad(ref, leaves, dout.double().cpu())
    return {"out": ref.detach(), "dq": grads[0], "dk": grads[1], "dv": grads[2]}


def check_attention(
    module: nn.Module | Callable[..., torch.Tensor],
    case: Case,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    seed: int = 0,
    reference_options: dict | None = None,
) -> CaseResult:
    """Run ``module(q, k, v, is_causal=..., key_padding_mask=...)`` forward and backward vs the reference."""
    q, k, v, mask = make_inputs(case, dtype, device, seed)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = module(*leaves, is_causal=case.causal, key_padding_mask=mask)
    generator = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    out.backward(dout.to(dtype=out.dtype, device=out.device))
    expected = reference_outputs(case, q, k, v, mask, dout, **(reference_options or {}))
    actual = {"out": out, "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
    errors = {
        name: float("inf") if actual[name] is None else relative_error(actual[name], expected[name])
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
