"""Kernel backends: how one block of attention is computed.

A kernel takes one block ``(q, k, v)`` in the ``(B, N, H, D)`` layout (``k`` and
``v`` may have fewer heads: grouped-query attention) and returns ``(out, lse)``
where ``lse`` is the natural-log log-sum-exp of the scores, shape ``(B, H, N)``,
float32 (float64 for float64 inputs). A query row that sees no key gets
``out = 0`` and ``lse = -inf``.

``mask`` is a bool tensor broadcastable to ``(B, H, N, M)``, ``True`` where a
key is allowed. ``causal`` is only used on square blocks (``N == M``): query
``i`` sees key ``j`` iff ``j <= i``. A backend that declares ``supports_window``
also takes ``window=(left, right)``: query ``i`` sees key ``j`` iff
``i + M - N - left <= j <= i + M - N + right`` (flash-attn's bottom-right
convention, ``-1`` unbounded); other backends get windows as part of ``mask``
(see :mod:`ring_core.windows`).

The backward takes the **final** merged ``out`` and ``lse`` of the query rows
(not the block's own), which makes its ``dq, dk, dv`` exact contributions; an
``lse`` of ``-inf`` (a row that sees nothing anywhere) must give zero gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

__all__ = [
    "FLOAT_DTYPES",
    "CPUFlashKernel",
    "KernelBackend",
    "KernelRequest",
    "MathKernel",
    "accumulation_dtype",
    "causal_mask",
    "combined_mask",
    "default_scale",
    "merge_into",
    "unit_last_stride",
]

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class KernelRequest:
    """What a block computation needs; backends answer whether they can serve it."""

    device_type: str
    dtype: torch.dtype
    head_dim: int
    num_heads: int
    num_kv_heads: int
    causal: bool = False
    has_mask: bool = False
    dropout_p: float = 0.0
    compute_capability: tuple[int, int] | None = None
    window: bool = False
    varlen: bool = False

    @classmethod
    def for_tensors(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        causal: bool = False,
        has_mask: bool = False,
        dropout_p: float = 0.0,
        window: bool = False,
        varlen: bool = False,
    ) -> KernelRequest:
        """The request of blocks of ``q`` and ``k``; ``window``: some blocks carry a sliding window;
        ``varlen``: the calls are packed segments (``forward_varlen``)."""
        capability = None
        if q.device.type == "cuda":
            capability = torch.cuda.get_device_capability(q.device)
        return cls(
            device_type=q.device.type,
            dtype=q.dtype,
            head_dim=q.shape[-1],
            num_heads=q.shape[-2],
            num_kv_heads=k.shape[-2],
            causal=causal,
            has_mask=has_mask,
            dropout_p=dropout_p,
            compute_capability=capability,
            window=window,
            varlen=varlen,
        )

    def describe(self) -> str:
        return (
            f"device={self.device_type}, dtype={str(self.dtype).replace('torch.', '')}, "
            f"head_dim={self.head_dim}, heads={self.num_heads}/{self.num_kv_heads} (q/kv), "
            f"causal={self.causal}, mask={self.has_mask}, dropout={self.dropout_p}"
            + (", window" if self.window else "")
            + (", varlen" if self.varlen else "")
        )


class KernelBackend:
    """Base class of kernel backends; subclasses declare their support as data.

    Higher ``priority`` is tried first. ``not_supported_reasons`` returns an empty
    list when the backend can serve the request.
    """

    name: ClassVar[str] = "base"
    priority: ClassVar[int] = 0
    description: ClassVar[str] = ""
    devices: ClassVar[tuple[str, ...]] = ()
    dtypes: ClassVar[tuple[torch.dtype, ...]] = FLOAT_DTYPES
    max_head_dim: ClassVar[int | None] = None
    supports_mask: ClassVar[bool] = True
    supports_dropout: ClassVar[bool] = False
    # takes ``window=(left, right)`` itself (else windows come as a mask, which needs ``supports_mask``)
    supports_window: ClassVar[bool] = False
    # has ``forward_varlen`` / ``backward_varlen``: many segments of different lengths in one call, rows packed
    # as ``(total, H, D)`` with int32 cumulative lengths (flash-attn's varlen layout); lse ``(H, total)``
    supports_varlen: ClassVar[bool] = False
    min_compute_capability: ClassVar[tuple[int, int] | None] = None

    def availability_reasons(self) -> list[str]:
        """Reasons independent of the request (missing library, no device)."""
        return []

    def not_supported_reasons(self, request: KernelRequest) -> list[str]:
        reasons = list(self.availability_reasons())
        if self.devices and request.device_type not in self.devices:
            reasons.append(f"device {request.device_type} not in {list(self.devices)}")
        if request.dtype not in self.dtypes:
            names = [str(d).replace("torch.", "") for d in self.dtypes]
            reasons.append(f"dtype {str(request.dtype).replace('torch.', '')} not in {names}")
        if self.max_head_dim is not None and request.head_dim > self.max_head_dim:
            reasons.append(f"head_dim {request.head_dim} > {self.max_head_dim}")
        if request.has_mask and not self.supports_mask:
            reasons.append("masks are not supported")
        if request.window and not (self.supports_window or self.supports_mask):
            reasons.append("sliding windows are not supported (neither natively nor as a mask)")
        if request.varlen and not self.supports_varlen:
            reasons.append("packed segments in one call (varlen) are not supported")
        if request.dropout_p > 0 and not self.supports_dropout:
            reasons.append("dropout is not supported")
        if (
            self.min_compute_capability is not None
            and request.compute_capability is not None
            and request.compute_capability < self.min_compute_capability
        ):
            reasons.append(f"compute capability {request.compute_capability} < {self.min_compute_capability}")
        return reasons

    def supports(self, request: KernelRequest) -> bool:
        return not self.not_supported_reasons(request)

    def details(self) -> list[str]:
        """More lines about this backend for ``ring-attention info`` (a measured table, say); none by default."""
        return []

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        causal: bool = False,
        mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        seed: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One block of attention: ``(out, lse)`` of ``q`` over ``k``, ``v``.

        Args:
            q: ``(B, N, H, D)``, the block's query rows.
            k: ``(B, M, H_kv, D)``, its key rows, ``H % H_kv == 0``; same dtype and device as ``q``
                (the backend's declared ``dtypes`` and ``devices``).
            v: ``(B, M, H_kv, D_v)``.
            scale: multiplies ``q . k`` before the softmax.
            causal: on a square block (``N == M``) query ``i`` sees key ``j`` iff ``j <= i``.
            mask: bool, broadcastable to ``(B, H, N, M)``, ``True`` where a key is allowed.
            dropout_p: dropout on the attention weights (backends with ``supports_dropout``).
            seed: the dropout's seed; the backward is called with the same one.

        Returns:
            ``out``, ``(B, N, H, D_v)`` in the dtype of ``q``, and ``lse``, ``(B, H, N)``, the
            natural-log log-sum-exp of each row's scores (float32; float64 for float64 inputs).
            A row that sees no key gets ``out = 0`` and ``lse = -inf``.
        """
        raise NotImplementedError

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        *,
        scale: float,
        causal: bool = False,
        mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        seed: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def merge(
        self, out_acc: torch.Tensor, lse_acc: torch.Tensor, out_block: torch.Tensor, lse_block: torch.Tensor
    ) -> None:
        """Merge a block's output into accumulator views, in place (:func:`merge_into`; GPU backends fuse it)."""
        merge_into(out_acc, lse_acc, out_block, lse_block)

    def accumulate(self, grad: torch.Tensor, block_grad: torch.Tensor) -> None:
        """``grad += block_grad`` on views of the same shape (``block_grad`` may be of lower precision)."""
        grad.add_(block_grad)


def merge_into(out_acc: torch.Tensor, lse_acc: torch.Tensor, out_block: torch.Tensor, lse_block: torch.Tensor) -> None:
    """Merge a block's ``(out, lse)`` into accumulator views, in place, exactly.

    ``lse = logaddexp(lse_a, lse_b)``; ``out = e^(lse_a-lse) out_a + e^(lse_b-lse) out_b``.
    Rows where both are ``-inf`` stay ``out = 0, lse = -inf``.
    """
    lse_block = lse_block.to(lse_acc.dtype)
    lse_new = torch.logaddexp(lse_acc, lse_block)
    safe = lse_new.masked_fill(torch.isinf(lse_new), 0.0)
    weight_acc = torch.exp(lse_acc - safe).unsqueeze(-1)
    weight_block = torch.exp(lse_block - safe).unsqueeze(-1)
    out_acc.mul_(weight_acc).add_(out_block.to(out_acc.dtype) * weight_block)
    lse_acc.copy_(lse_new)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def causal_mask(n: int, m: int, device: torch.device) -> torch.Tensor:
    """Bool ``(n, m)``: query ``i`` sees key ``j`` iff ``j <= i``."""
    return torch.ones(n, m, dtype=torch.bool, device=device).tril()


def combined_mask(n: int, m: int, device: torch.device, causal: bool, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The causal and explicit masks as one bool mask (``None`` when neither)."""
    if not causal:
        return mask
    tri = causal_mask(n, m, device)
    return tri if mask is None else mask & tri


class MathKernel(KernelBackend):
    """Plain PyTorch matrix products, chunked over query rows; any device and dtype.

    Scores are computed in float32 (float64 for float64 inputs), so memory per
    chunk is ``chunk * M`` scores, never ``N * M`` at once.
    """

    name = "math"
    priority = 0
    description = "plain PyTorch matmuls, query-chunked (any device, dropout)"
    devices = ()
    supports_dropout = True
    max_scores_per_chunk = 1 << 24

    def _chunk(self, b: int, h: int, n: int, m: int, device: torch.device) -> int:
        budget = self.max_scores_per_chunk * (4 if device.type == "cuda" else 1)
        return max(1, min(n, budget // max(1, b * h * m)))

    @staticmethod
    def _dropout_keep(
        shape: tuple[int, ...], p: float, seed: int, chunk_index: int, device: torch.device
    ) -> torch.Tensor:
        generator = torch.Generator(device=device)
        generator.manual_seed((seed * 1_000_003 + chunk_index) % (2**63))
        # float32 whatever the default dtype: the backward draws the forward's mask again
        return torch.rand(shape, generator=generator, device=device, dtype=torch.float32) >= p

    def _scores(
        self, qc: torch.Tensor, k: torch.Tensor, scale: float, row0: int, causal: bool, mask: torch.Tensor | None
    ) -> torch.Tensor:
        s = torch.einsum("bnhd,bmhd->bhnm", qc, k) * scale
        n, m = s.shape[-2], s.shape[-1]
        allowed = None
        if mask is not None:
            allowed = mask if mask.shape[-2] == 1 else mask[..., row0 : row0 + n, :]
        if causal:
            rows = torch.arange(row0, row0 + n, device=s.device)[:, None]
            tri = torch.arange(m, device=s.device)[None, :] <= rows
            allowed = tri if allowed is None else allowed & tri
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        return s

    def _expand_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        groups = q.shape[2] // k.shape[2]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=2)
            v = v.repeat_interleave(groups, dim=2)
        return k, v, groups

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        causal: bool = False,
        mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        seed: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`KernelBackend.forward` by matrix products in the accumulation dtype, in row chunks."""
        acc = accumulation_dtype(q.dtype)
        b, n, h, _ = q.shape
        k, v, _ = self._expand_kv(q, k, v)
        kf, vf = k.to(acc), v.to(acc)
        out = torch.empty(b, n, h, v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(b, h, n, dtype=acc, device=q.device)
        step = self._chunk(b, h, n, k.shape[1], q.device)
        for index, row0 in enumerate(range(0, n, step)):
            qc = q[:, row0 : row0 + step].to(acc)
            s = self._scores(qc, kf, scale, row0, causal, mask)
            lse_c = torch.logsumexp(s, dim=-1)
            p = torch.exp(s - lse_c.masked_fill(torch.isinf(lse_c), 0.0).unsqueeze(-1))
            if dropout_p > 0:
                keep = self._dropout_keep(p.shape, dropout_p, seed, index, q.device)
                p = p * keep / (1.0 - dropout_p)
            out[:, row0 : row0 + step] = torch.einsum("bhnm,bmhd->bnhd", p, vf).to(q.dtype)
            lse[:, :, row0 : row0 + step] = lse_c
        return out, lse

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        *,
        scale: float,
        causal: bool = False,
        mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        seed: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        acc = accumulation_dtype(q.dtype)
        b, n, h, _ = q.shape
        kv_heads = k.shape[2]
        k, v, groups = self._expand_kv(q, k, v)
        kf, vf = k.to(acc), v.to(acc)
        dq = torch.empty(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)
        lse = lse.to(acc).masked_fill(torch.isinf(lse), 0.0)
        step = self._chunk(b, h, n, k.shape[1], q.device)
        for index, row0 in enumerate(range(0, n, step)):
            rows = slice(row0, row0 + step)
            qc, doc = q[:, rows].to(acc), dout[:, rows].to(acc)
            s = self._scores(qc, kf, scale, row0, causal, mask)
            p = torch.exp(s - lse[:, :, rows].unsqueeze(-1))
            dp = torch.einsum("bnhd,bmhd->bhnm", doc, vf)
            if dropout_p > 0:
                keep = self._dropout_keep(p.shape, dropout_p, seed, index, q.device)
                dv += torch.einsum("bhnm,bnhd->bmhd", p * keep / (1.0 - dropout_p), doc)
                dp = dp * keep / (1.0 - dropout_p)
            else:
                dv += torch.einsum("bhnm,bnhd->bmhd", p, doc)
            delta = (doc * out[:, rows].to(acc)).sum(-1).transpose(1, 2).unsqueeze(-1)
            ds = p * (dp - delta) * scale
            dq[:, rows] = torch.einsum("bhnm,bmhd->bnhd", ds, kf)
            dk += torch.einsum("bhnm,bnhd->bmhd", ds, qc)
        if groups > 1:
            dk = dk.unflatten(2, (kv_heads, groups)).sum(3)
            dv = dv.unflatten(2, (kv_heads, groups)).sum(3)
        return dq, dk, dv


class CPUFlashKernel(KernelBackend):
    """PyTorch's fused CPU flash attention (``aten._scaled_dot_product_flash_attention_for_cpu``)."""

    name = "cpu_flash"
    priority = 10
    description = "aten flash attention for CPU, with LSE and a backward taking any out/lse"
    devices = ("cpu",)

    def availability_reasons(self) -> list[str]:
        if not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
            return ["this torch has no aten._scaled_dot_product_flash_attention_for_cpu"]
        return []

    @staticmethod
    def _additive(
        q: torch.Tensor, causal: bool, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        n, m = q.shape[1], mask.shape[-1] if mask is not None else q.shape[1]
        allowed = combined_mask(n, m, q.device, causal, mask)
        if allowed is None:
            return None, None
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
        bias.masked_fill_(~allowed, float("-inf"))
        return bias, allowed

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        causal: bool = False,
        mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        seed: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`KernelBackend.forward` through ``aten._scaled_dot_product_flash_attention_for_cpu``."""
        if _has_nan(q) or _has_nan(k) or _empty(q, k):
            # the fused op drops a NaN score on short key blocks (out = 0, lse = 0 where SDPA gives NaN); NaN in must
            # be NaN out, so such blocks take the plain matmuls (which propagate it exactly); and it stops the
            # process (SIGFPE) on no queries or no keys
            return _MATH.forward(q, k, v, scale=scale, causal=causal, mask=mask)
        q, k, v = unit_last_stride(q, k, v)
        bias, allowed = self._additive(q, causal, mask)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            0.0,
            causal and bias is None,
            attn_mask=bias,
            scale=scale,
        )
        lse = lse.to(accumulation_dtype(q.dtype))
        if allowed is not None:  # the op reports lse = 0 for rows that see no key
            empty = ~allowed.any(-1).expand(lse.shape)
            lse = lse.masked_fill(empty, float("-inf"))
        return out.transpose(1, 2), lse

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        *,
        scale: float,
        causal: bool = False,
        mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        seed: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if _empty(q, k):
            return _MATH.backward(dout, q, k, v, out, lse, scale=scale, causal=causal, mask=mask)
        q, k, v = unit_last_stride(q, k, v)
        bias, _ = self._additive(q, causal, mask)
        lse = lse.masked_fill(torch.isinf(lse), 0.0)
        if q.dtype in (torch.float32, torch.float64):
            lse = lse.to(q.dtype)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.transpose(1, 2).contiguous(),
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            out.transpose(1, 2).contiguous(),
            lse.contiguous(),
            0.0,
            causal and bias is None,
            attn_mask=bias,
            scale=scale,
        )
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


_MATH = MathKernel()


def unit_last_stride(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor with a unit stride in its last dim (a copy only where it has another, e.g. a head dim
    viewed out of a fused projection): for kernels that read the head dim as packed (the fused CPU op gave
    silently wrong results) or refuse it (aten's flash and memory-efficient ops)."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def _has_nan(x: torch.Tensor) -> bool:
    """Whether ``x`` holds a NaN: one reduction (a sum that is NaN; also when it holds both +inf and -inf)."""
    return bool(torch.isnan(x.sum(dtype=accumulation_dtype(x.dtype))))


def _empty(q: torch.Tensor, k: torch.Tensor) -> bool:
    """No query or no key (``(B, N, H, D)``): the fused CPU op raises SIGFPE on such shapes."""
    return q.shape[1] == 0 or k.shape[1] == 0


def default_scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
