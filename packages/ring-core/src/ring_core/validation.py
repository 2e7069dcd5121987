"""Input checks shared by every implementation: clear errors before any work starts."""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "MERGES",
    "check_dilated_config",
    "check_dropout",
    "check_qkv",
]

MERGES = ("lse", "head_groups")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_dilated_config(
    segment_lengths: Sequence[int], dilation_rates: Sequence[int], merge: str = "lse"
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validate a LongNet configuration; returns it as tuples of ints."""
    for param, values in (("segment_lengths", segment_lengths), ("dilation_rates", dilation_rates)):
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise TypeError(f"{param} must be a sequence of ints, got {values!r}")
        if len(values) == 0:
            raise ValueError(f"{param} must not be empty, got {list(values)!r}")
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{param} must hold ints, got {value!r} in {list(values)!r}")
    if len(segment_lengths) != len(dilation_rates):
        raise ValueError(
            f"segment_lengths and dilation_rates must have the same length, got "
            f"{len(segment_lengths)} ({list(segment_lengths)}) and {len(dilation_rates)} ({list(dilation_rates)})"
        )
    if any(w < 1 for w in segment_lengths):
        raise ValueError(f"segment_lengths must be positive, got {list(segment_lengths)}")
    if any(b <= a for a, b in itertools.pairwise(segment_lengths)):
        raise ValueError(f"segment_lengths must be strictly increasing, got {list(segment_lengths)}")
    if any(r < 1 for r in dilation_rates):
        raise ValueError(f"dilation_rates must be >= 1, got {list(dilation_rates)}")
    for w, r in zip(segment_lengths, dilation_rates):
        if w % r != 0:
            raise ValueError(
                f"each segment length must be a multiple of its dilation rate, got segment_lengths "
                f"{list(segment_lengths)} and dilation_rates {list(dilation_rates)} ({w} % {r} != 0)"
            )
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {list(MERGES)}, got {merge!r}")
    return tuple(segment_lengths), tuple(dilation_rates)


def check_dropout(dropout: float) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    return float(dropout)


def check_flag(name: str, value: object) -> bool:
    """A switch option as given, ``True`` or ``False``; anything else (``"false"`` is truthy) a ``TypeError`` naming it."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_window(window_size: object) -> tuple[int, int]:
    """``window_size = (left, right)`` as a tuple of two ints, each ``>= -1`` (``-1``: unbounded)."""
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or any(isinstance(x, bool) or not isinstance(x, int) for x in window_size)
    ):
        raise TypeError(f"window_size must be a pair of ints (left, right), -1 meaning unbounded, got {window_size!r}")
    if any(x < -1 for x in window_size):
        raise ValueError(f"window_size must be (left, right) with each >= -1 (-1: unbounded), got {window_size!r}")
    return int(window_size[0]), int(window_size[1])


def check_cu_seqlens(cu_seqlens: object, seq_len: int | None, batch: int) -> tuple[int, ...] | None:
    """The document boundaries ``[0 = c_0 <= c_1 <= ... <= c_D = N]`` of a packed batch of one, as ints.

    ``cu_seqlens`` is a 1-D integer tensor on any device (flash-attn's convention);
    ``seq_len`` is the packed (global) ``N`` (None: not known here) and ``batch`` must be 1.
    Under ``torch.compile`` the values are not read here (that would break the graph): the
    custom op checks them when it runs (:func:`check_documents`) and returns None.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a 1-D integer torch.Tensor, got {type(cu_seqlens).__name__}")
    if (
        cu_seqlens.dim() != 1
        or cu_seqlens.is_floating_point()
        or cu_seqlens.is_complex()
        or cu_seqlens.dtype == torch.bool
    ):
        raise TypeError(
            f"cu_seqlens must be a 1-D integer tensor, got {_dtype_name(cu_seqlens.dtype)} of shape "
            f"{tuple(cu_seqlens.shape)}"
        )
    if batch != 1:
        raise ValueError(f"cu_seqlens needs a batch of one (documents packed along N, B=1), got B={batch}")
    if torch.compiler.is_compiling():
        return None
    return check_documents(read_cu_seqlens(cu_seqlens), seq_len)


# The last cu_seqlens tensor read to the host, and its values, while that tensor lives unchanged: a model hands one
# tensor to every layer's attention, which then reads it once (each read of a CUDA tensor waits for the GPU).
_LAST_READ: tuple[weakref.ref[torch.Tensor], int, int, tuple[int, ...]] | None = None


def read_cu_seqlens(cu_seqlens: torch.Tensor) -> tuple[int, ...]:
    """``cu_seqlens``' values on the host, unchecked: read (a host-device sync for a CUDA tensor), or the values read
    last time for this very tensor when it has not changed since (its version and storage). An inference tensor
    (made under ``torch.inference_mode``) counts no versions: it is read every time."""
    global _LAST_READ
    version, last = tensor_version(cu_seqlens), _LAST_READ
    if (
        last is not None
        and version is not None
        and last[0]() is cu_seqlens
        and last[1:3] == (version, cu_seqlens.data_ptr())
    ):
        return last[3]
    values = tuple(int(x) for x in cu_seqlens.tolist())
    if version is not None:
        _LAST_READ = (weakref.ref(cu_seqlens), version, cu_seqlens.data_ptr(), values)
    return values


def check_documents(values: Sequence[int], seq_len: int | None) -> tuple[int, ...]:
    """``cu_seqlens`` values: they start at 0, never decrease and end at ``seq_len`` (when given)."""
    values = list(values)
    if not values or values[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {values[:4]}{'...' if len(values) > 4 else ''}")
    if seq_len is not None and values[-1] != seq_len:
        raise ValueError(f"cu_seqlens must end at N={seq_len} (the packed length), got {values[-1]}")
    for index, (a, b) in enumerate(itertools.pairwise(values)):
        if b < a:
            raise ValueError(
                f"cu_seqlens must be non-decreasing, got {values[index]} then {values[index + 1]} at index {index + 1}"
            )
    return tuple(values)


def varlen_layout(cu_seqlens: object, *tensors: Any) -> tuple[tuple[Any, ...], bool]:
    """flash-attn's varlen layout: with ``cu_seqlens``, 3-dim ``(total, H, D)`` tensors (and a 1-dim
    ``(total,)`` padding mask) become a batch of one; returns the tensors and whether they were unbatched."""
    if cu_seqlens is None or not isinstance(tensors[0], torch.Tensor) or tensors[0].dim() != 3:
        return tensors, False
    return tuple(t.unsqueeze(0) if isinstance(t, torch.Tensor) else t for t in tensors), True


def tensor_version(tensor: torch.Tensor) -> int | None:
    """``tensor``'s version (torch counts its in-place changes there), or None for an inference tensor (made under
    ``torch.inference_mode``), which counts none: whatever is cached by a tensor's identity and version must
    not trust an unchanged None (the tensor may have changed unseen)."""
    return None if tensor.is_inference() else tensor._version


def check_scale(softmax_scale: float | None) -> float | None:
    """``None`` (``1/sqrt(D)``) or a finite real number; returned as a float."""
    if softmax_scale is None:
        return None
    if (
        isinstance(softmax_scale, bool)
        or not isinstance(softmax_scale, (int, float))
        or not math.isfinite(softmax_scale)
    ):
        raise ValueError(f"softmax_scale must be a finite number or None (1/sqrt(head dim)), got {softmax_scale!r}")
    return float(softmax_scale)


def check_timeout(timeout: float | None) -> float | None:
    """``None`` (wait forever) or a positive number of seconds; returned as a float."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    return float(timeout)


def check_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    *,
    same_length: bool = True,
) -> None:
    """Check shapes, dtypes and devices of ``(B, N, H, D)`` inputs and the padding mask."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims (B, N, H, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(
                f"{name} must be a floating-point tensor (float64, float32, float16, bfloat16), "
                f"got {_dtype_name(t.dtype)}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"q, k, v must share one dtype, got {_dtype_name(q.dtype)}, {_dtype_name(k.dtype)}, {_dtype_name(v.dtype)}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    (b, n, h, d), (bk, nk, hk, dk), (bv, nv, hv, dv) = q.shape, k.shape, v.shape
    if not b == bk == bv:
        raise ValueError(f"q, k, v must share the batch size, got {b}, {bk}, {bv}")
    if nk != nv:
        raise ValueError(f"k and v must share the sequence length, got {nk} and {nv}")
    if same_length and n != nk:
        raise ValueError(f"q and k must have the same sequence length here, got {n} and {nk}")
    if d != dk:
        raise ValueError(f"q and k must share the head dim, got {d} and {dk}")
    if d < 1:
        raise ValueError(f"the head dim D of q, k, v must be at least 1, got shape {tuple(q.shape)}")
    if dv != d:
        raise ValueError(f"v must have the head dim D of q and k (shapes (B, N, H, D)), got {dv} and {d}")
    if hk != hv:
        raise ValueError(f"k and v must have the same number of heads, got {hk} and {hv}")
    if hk == 0 or h % hk != 0:
        raise ValueError(f"the number of query heads must be a multiple of the key/value heads (GQA), got {h} and {hk}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            got = (
                _dtype_name(key_padding_mask.dtype)
                if isinstance(key_padding_mask, torch.Tensor)
                else type(key_padding_mask).__name__
            )
            raise TypeError(f"key_padding_mask must be a bool tensor (True = masked), got {got}")
        if tuple(key_padding_mask.shape) != (b, nk):
            raise ValueError(
                f"key_padding_mask must have shape (B, N) = {(b, nk)}, got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != k.device:
            raise ValueError(f"key_padding_mask must be on {k.device}, got {key_padding_mask.device}")
