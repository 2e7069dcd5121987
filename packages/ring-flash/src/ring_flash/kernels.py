"""GPU kernel backends that return the log-sum-exp and take any ``out``/``lse`` in backward.

- ``sdpa_cudnn``, ``sdpa_flash``, ``sdpa_efficient``: PyTorch's fused attention
  through its aten ops (``_scaled_dot_product_cudnn_attention``,
  ``_flash_attention_forward``, ``_efficient_attention_forward`` and their
  backward ops), so no extra library is needed.
- ``flash_attn2`` (``flash_attn``), ``flash_attn3`` (``flash_attn_interface``) and
  ``flash_attn4`` (``flash_attn.cute``) when installed; otherwise listed with the
  reason.

Each backend declares what it supports as data (device, dtypes, head dims,
compute capability, masks, GQA, dropout) and ``not_supported_reasons`` rejects
anything else, so dispatch falls back to the next backend. Priorities follow the
speed measured by ``tools/bench/flash_dilated.py`` (bf16, D=128): on Hopper cuDNN
is fastest, then the flash kernels, then memory-efficient.
"""

from __future__ import annotations

import importlib
import inspect
import os
from functools import cache
from typing import ClassVar

import torch

from ring_core.kernels import KernelBackend, KernelRequest, MathKernel, combined_mask

from .merge import installed, merge_block, online_merge

HALF_DTYPES = (torch.float16, torch.bfloat16)


@cache
def _capability() -> tuple[int, int] | None:
    """Compute capability of the current CUDA device (``None`` without CUDA)."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability()


class GPUKernel(KernelBackend):
    """Common capability data of the CUDA backends."""

    devices = ("cuda",)
    dtypes = HALF_DTYPES
    supports_mask = False
    supports_dropout = False
    supports_gqa: ClassVar[bool] = False
    head_dim_multiple: ClassVar[int] = 8
    max_head_dim: ClassVar[int | None] = 256
    min_compute_capability = (8, 0)
    max_compute_capability: ClassVar[tuple[int, int] | None] = None
    aten_ops: ClassVar[tuple[str, ...]] = ()
    module: ClassVar[str | None] = None  # optional library to import
    # priority by compute capability: the first entry whose capability <= the device's wins
    priorities: ClassVar[tuple[tuple[tuple[int, int], int], ...]] = ()
    default_priority: ClassVar[int] = 20

    @property
    def priority(self) -> int:  # type: ignore[override]
        capability = _capability()
        if capability is not None:
            for minimum, value in self.priorities:
                if capability >= minimum:
                    return value
        return self.default_priority

    def availability_reasons(self) -> list[str]:
        reasons = []
        if not torch.cuda.is_available():
            reasons.append("no CUDA device" if torch.version.cuda else "torch built without CUDA")
        for op in self.aten_ops:
            if not hasattr(torch.ops.aten, op):
                reasons.append(f"this torch ({torch.__version__}) has no aten.{op}")
        if self.module is not None and not installed(self.module.split(".")[0]):
            reasons.append(f"{self.module} is not installed ({self.install_hint})")
        return reasons

    install_hint: ClassVar[str] = ""

    def merge(self, out_acc, lse_acc, out_block, lse_block) -> None:
        """One Triton pass where it applies (:func:`ring_flash.merge.online_merge`), else torch ops."""
        if not online_merge(out_acc, lse_acc, out_block, lse_block):
            super().merge(out_acc, lse_acc, out_block, lse_block)

    def accumulate(self, grad, block_grad) -> None:
        merge_block(grad, block_grad, accumulate=True)

    def not_supported_reasons(self, request: KernelRequest) -> list[str]:
        reasons = super().not_supported_reasons(request)
        if request.head_dim % self.head_dim_multiple:
            reasons.append(f"head_dim {request.head_dim} is not a multiple of {self.head_dim_multiple}")
        if request.num_kv_heads != request.num_heads and not self.supports_gqa:
            reasons.append(
                f"grouped-query attention ({request.num_heads} query / {request.num_kv_heads} kv heads) "
                "is not supported"
            )
        cc = request.compute_capability
        if cc is not None and self.max_compute_capability is not None and cc > self.max_compute_capability:
            reasons.append(f"compute capability {cc} > {self.max_compute_capability}")
        return reasons


class SDPACuDNNKernel(GPUKernel):
    """cuDNN fused attention through ``aten._scaled_dot_product_cudnn_attention``."""

    name = "sdpa_cudnn"
    description = "PyTorch SDPA cuDNN (aten op with LSE); fastest on Hopper"
    aten_ops = ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward")
    max_head_dim = 128
    priorities = (((9, 0), 100), ((8, 0), 40))

    strided_inputs = True  # cleared if this cuDNN rejects strided views (then inputs are made contiguous)

    def _retry_contiguous(self, fn, *tensors):
        """Call ``fn`` on strided views; if cuDNN rejects them, once more on contiguous copies."""
        if self.strided_inputs:
            try:
                return fn(*tensors)
            except RuntimeError:
                if all(t.is_contiguous() for t in tensors):
                    raise
                result = fn(*(t.contiguous() for t in tensors))
                type(self).strided_inputs = False
                return result
        return fn(*(t.contiguous() for t in tensors))

    @staticmethod
    def _tiny(q: torch.Tensor, k: torch.Tensor) -> bool:
        """cuDNN rejects single-row blocks (``s_q = s_kv = 1``): those go to the math kernel."""
        return q.shape[1] == 1 or k.shape[1] == 1

    def forward(self, q, k, v, *, scale, causal=False, mask=None, dropout_p=0.0, seed=0):
        b, n, h, _ = q.shape
        if self._tiny(q, k):
            return MathKernel().forward(q, k, v, scale=scale, causal=causal)

        def run(q, k, v):
            return torch.ops.aten._scaled_dot_product_cudnn_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, causal, False, scale=scale
            )

        out, lse, *_ = self._retry_contiguous(run, q, k, v)
        return out.transpose(1, 2), lse.reshape(b, h, n)

    # How the backward op is called; tools/gpu/probe_cudnn.py tries each in a subprocess on a GPU.
    backward_variants = ("lse4", "lse4-long1", "contiguous", "flash", "lse3")
    backward_variant = os.environ.get("RING_FLASH_CUDNN_BACKWARD", "lse4")  # lse3 fails: "dim for Stats is invalid"

    def backward(self, dout, q, k, v, out, lse, *, scale, causal=False, mask=None, dropout_p=0.0, seed=0):
        variant = self.backward_variant
        if self._tiny(q, k):
            grads = MathKernel().backward(dout, q, k, v, out, lse, scale=scale, causal=causal)
            return tuple(g.to(x.dtype) for g, x in zip(grads, (q, k, v)))
        if variant == "flash":  # FlashAttention-2's backward: the same gradients from any out/lse
            return SDPAFlashKernel().backward(dout, q, k, v, out, lse, scale=scale, causal=causal)
        n, m = q.shape[1], k.shape[1]
        seed_t = torch.zeros(1 if variant == "lse4-long1" else (), dtype=torch.int64, device=q.device)
        lse = lse.float().contiguous()
        if variant != "lse3":
            lse = lse.unsqueeze(-1)

        def run(dout, q, k, v, out):
            bhsd = [x.transpose(1, 2) for x in (dout, q, k, v, out)]
            if variant == "contiguous":
                bhsd = [x.contiguous() for x in bhsd]
            return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                *bhsd[:5], lse, seed_t, seed_t, None, None, None, n, m, 0.0, causal, scale=scale
            )

        dq, dk, dv = self._retry_contiguous(run, dout, q, k, v, out)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


class SDPAFlashKernel(GPUKernel):
    """FlashAttention-2 inside PyTorch through ``aten._flash_attention_forward`` ((B, N, H, D) natively)."""

    name = "sdpa_flash"
    description = "PyTorch SDPA flash (FlashAttention-2 in torch; aten op with LSE; GQA)"
    aten_ops = ("_flash_attention_forward", "_flash_attention_backward")
    supports_gqa = True
    priorities = (((9, 0), 60), ((8, 0), 60))

    def forward(self, q, k, v, *, scale, causal=False, mask=None, dropout_p=0.0, seed=0):
        out, lse, *_ = torch.ops.aten._flash_attention_forward(
            q, k, v, None, None, q.shape[1], k.shape[1], 0.0, causal, False, scale=scale
        )
        return out, lse

    def backward(self, dout, q, k, v, out, lse, *, scale, causal=False, mask=None, dropout_p=0.0, seed=0):
        empty = torch.empty(0, dtype=torch.int64, device=q.device)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, lse.float().contiguous(), None, None, q.shape[1], k.shape[1],
            0.0, causal, empty, empty, scale=scale,
        )  # fmt: skip
        return dq, dk, dv


class SDPAEfficientKernel(GPUKernel):
    """Memory-efficient attention (xformers' CUTLASS kernel in torch) through ``aten._efficient_attention_forward``.

    The only GPU backend here that takes masks (as an additive bias) and float32.
    """

    name = "sdpa_efficient"
    description = "PyTorch SDPA memory-efficient (aten op with LSE; masks, float32)"
    aten_ops = ("_efficient_attention_forward", "_efficient_attention_backward")
    dtypes = (torch.float32, *HALF_DTYPES)
    supports_mask = True
    head_dim_multiple = 4
    min_compute_capability = (5, 0)
    priorities = (((8, 0), 30),)
    lse_align = 32  # the op pads the lse's last dim to a multiple of 32

    @staticmethod
    def _bias(q, k, causal, mask):
        """Additive bias broadcast to ``(b, h, n, m)`` (or ``None``), rows that see no key, mask type."""
        mask_type = 1 if causal else 0  # 1: causal from the top left
        if mask is None:
            return None, None, mask_type
        b, n, h, _ = q.shape
        m = k.shape[1]
        allowed = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        pad = -m % 16  # rows of the bias must be 16-element aligned
        bias = torch.zeros(*allowed.shape[:-1], m + pad, dtype=q.dtype, device=q.device)[..., :m]
        bias.masked_fill_(~allowed, float("-inf"))
        if causal and allowed.shape[-2] == 1:  # row i sees key j <= i: any allowed key up to i
            seen = allowed.to(torch.uint8).cummax(-1).values.bool().transpose(-1, -2)[..., :n, 0]
        else:
            seen = (combined_mask(n, m, q.device, causal, allowed) if causal else allowed).any(-1)
        return bias.expand(b, h, n, m), ~seen.expand(b, h, n), mask_type

    def forward(self, q, k, v, *, scale, causal=False, mask=None, dropout_p=0.0, seed=0):
        bias, empty, mask_type = self._bias(q, k, causal, mask)
        out, lse, *_ = torch.ops.aten._efficient_attention_forward(
            q, k, v, bias, None, None, None, None, 0.0, mask_type, True, scale=scale
        )
        lse = lse[:, :, : q.shape[1]]
        if empty is not None:  # rows that see no key: out 0, lse -inf
            lse = lse.masked_fill(empty, float("-inf"))
            out = out.masked_fill(empty.transpose(1, 2).unsqueeze(-1), 0.0)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, *, scale, causal=False, mask=None, dropout_p=0.0, seed=0):
        bias, _, mask_type = self._bias(q, k, causal, mask)
        b, n, h, _ = q.shape
        padded = torch.zeros(b, h, n + (-n % self.lse_align), dtype=torch.float32, device=q.device)
        padded[:, :, :n] = lse.masked_fill(torch.isinf(lse), 0.0)
        seed_t = torch.zeros((), dtype=torch.int64)
        # the CUTLASS backward assumes packed (B, M, H, K) out/grad_out (strided views give wrong dq, dk)
        dout, q, k, v, out = (x.contiguous() for x in (dout, q, k, v, out))
        dq, dk, dv, _ = torch.ops.aten._efficient_attention_backward(
            dout, q, k, v, bias, out, None, None, n, k.shape[1], padded, 0.0, seed_t, seed_t,
            mask_type, False, scale=scale,
        )  # fmt: skip
        return dq, dk, dv


def _call(fn, /, **kwargs):
    """Call ``fn`` with the keyword arguments its signature knows (library versions differ)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{key: value for key, value in kwargs.items() if key in params})


class FlashAttn2Kernel(GPUKernel):
    """The ``flash_attn`` package (FlashAttention-2), when installed (``ring-flash[fa2]``)."""

    name = "flash_attn2"
    description = "flash-attn 2 (flash_attn package), when installed"
    module = "flash_attn"
    install_hint = 'pip install "ring-flash[fa2]"'
    supports_gqa = True
    priorities = (((9, 0), 65), ((8, 0), 70))

    @staticmethod
    @cache
    def _api():
        return importlib.import_module("flash_attn.flash_attn_interface")

    def forward(self, q, k, v, *, scale, causal=False, mask=None, dropout_p=0.0, seed=0):
        result = _call(
            self._api()._flash_attn_forward, q=q, k=k, v=v, dropout_p=0.0, softmax_scale=scale, causal=causal,
            window_size=(-1, -1), window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
            return_softmax=False,
        )  # fmt: skip
        return result[0], result[1]

    def backward(self, dout, q, k, v, out, lse, *, scale, causal=False, mask=None, dropout_p=0.0, seed=0):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _call(
            self._api()._flash_attn_backward, dout=dout.contiguous(), q=q, k=k, v=v, out=out.contiguous(),
            softmax_lse=lse.float().contiguous(), dq=dq, dk=dk, dv=dv, dropout_p=0.0, softmax_scale=scale,
            causal=causal, window_size=(-1, -1), window_size_left=-1, window_size_right=-1, softcap=0.0,
            alibi_slopes=None, deterministic=False, rng_state=None,
        )  # fmt: skip
        return dq, dk, dv


class FlashAttn3Kernel(GPUKernel):
    """FlashAttention-3 (``flash_attn_interface``, Hopper only), when installed (``ring-flash[fa3]``)."""

    name = "flash_attn3"
    description = "flash-attn 3 (flash_attn_interface, Hopper), when installed"
    module = "flash_attn_interface"
    install_hint = "build flash-attention's hopper/ package"
    supports_gqa = True
    min_compute_capability = (9, 0)
    max_compute_capability = (9, 0)
    priorities = (((9, 0), 90),)

    @staticmethod
    @cache
    def _api():
        return importlib.import_module("flash_attn_interface")

    def forward(self, q, k, v, *, scale, causal=False, mask=None, dropout_p=0.0, seed=0):
        result = _call(
            self._api()._flash_attn_forward, q=q, k=k, v=v, k_new=None, v_new=None, qv=None, out=None,
            cu_seqlens_q=None, cu_seqlens_k=None, cu_seqlens_k_new=None, seqused_q=None, seqused_k=None,
            max_seqlen_q=None, max_seqlen_k=None, page_table=None, kv_batch_idx=None, leftpad_k=None,
            rotary_cos=None, rotary_sin=None, seqlens_rotary=None, q_descale=None, k_descale=None,
            v_descale=None, softmax_scale=scale, causal=causal, window_size=(-1, -1), window_size_left=-1,
            window_size_right=-1, attention_chunk=0, softcap=0.0,
        )  # fmt: skip
        return result[0], result[1]

    def backward(self, dout, q, k, v, out, lse, *, scale, causal=False, mask=None, dropout_p=0.0, seed=0):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _call(
            self._api()._flash_attn_backward, dout=dout.contiguous(), q=q, k=k, v=v, out=out.contiguous(),
            softmax_lse=lse.float().contiguous(), cu_seqlens_q=None, cu_seqlens_k=None, sequed_q=None,
            sequed_k=None, seqused_q=None, seqused_k=None, max_seqlen_q=None, max_seqlen_k=None, dq=dq, dk=dk,
            dv=dv, softmax_scale=scale, causal=causal, window_size=(-1, -1), window_size_left=-1,
            window_size_right=-1, softcap=0.0, deterministic=False,
        )  # fmt: skip
        return dq, dk, dv


class FlashAttn4Kernel(GPUKernel):
    """FlashAttention-4 (``flash_attn.cute``, CuTe DSL), when installed (``ring-flash[fa4]``)."""

    name = "flash_attn4"
    description = "flash-attn 4 (flash_attn.cute), when installed"
    module = "flash_attn.cute"
    install_hint = 'pip install "ring-flash[fa4]"'
    supports_gqa = True
    min_compute_capability = (9, 0)
    priorities = (((10, 0), 110), ((9, 0), 85))

    def availability_reasons(self) -> list[str]:
        reasons = super().availability_reasons()
        if not reasons:
            try:
                self._api()
            except Exception as exc:  # flash_attn present without the cute interface
                reasons.append(f"flash_attn.cute.interface cannot be imported: {exc}")
        return reasons

    @staticmethod
    @cache
    def _api():
        return importlib.import_module("flash_attn.cute.interface")

    def forward(self, q, k, v, *, scale, causal=False, mask=None, dropout_p=0.0, seed=0):
        out, lse = _call(self._api()._flash_attn_fwd, q=q, k=k, v=v, softmax_scale=scale, causal=causal,
                         return_lse=True)[:2]  # fmt: skip
        return out, lse

    def backward(self, dout, q, k, v, out, lse, *, scale, causal=False, mask=None, dropout_p=0.0, seed=0):
        dq, dk, dv = _call(
            self._api()._flash_attn_bwd, q=q, k=k, v=v, out=out.contiguous(), dout=dout.contiguous(),
            lse=lse.float().contiguous(), softmax_scale=scale, causal=causal,
        )[:3]  # fmt: skip
        return dq, dk, dv


def all_kernels() -> list[KernelBackend]:
    """One instance of every backend of this package (available or not)."""
    return [
        SDPACuDNNKernel(),
        SDPAFlashKernel(),
        SDPAEfficientKernel(),
        FlashAttn2Kernel(),
        FlashAttn3Kernel(),
        FlashAttn4Kernel(),
    ]
