"""The flash-attn libraries as kernel backends, each call checked against the installed signature.

- ``flash_attn2``: ``flash_attn.flash_attn_interface`` (FlashAttention-2, ``pip install flash-attn``);
- ``flash_attn3``: ``flash_attn_interface`` (FlashAttention-3, Hopper; built from flash-attention's
  ``hopper/`` folder);
- ``flash_attn4``: ``flash_attn.cute.interface`` (FlashAttention-4 on the CuTe DSL, ``flash-attn-4``;
  pure Python, so its wheels install anywhere).

These are private functions of their libraries whose parameters changed between releases.
Each wrapper declares, as data (:class:`LibraryCall`), the keywords it passes and the ones
that change the result if dropped (``causal``, ``softmax_scale``, ...). A library whose
function lacks one of those, or needs one we do not pass, is reported unavailable with the
mismatch (``ring-attention info``) instead of being called: a silently ignored ``causal``
would be silently wrong. Keywords the installed version does not know (another version's
spelling of the same unbounded window, say) are left out; a window or packed segments
(varlen, ``flash_attn4``) that the installed function cannot take make the request
unsupported (dispatch picks another kernel) and a direct call raise.

flash-attn 2 and 3 are source builds for a given torch and CUDA; they have not run on this
project's GPU machines, so ``info`` marks them "untested here".
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar

import torch

from ring_core.plugin import KernelRequest, lse_for_backward

from .gpu_kernel import GPUKernel

__all__ = ["FlashAttn2Kernel", "FlashAttn3Kernel", "FlashAttn4Kernel", "LibraryCall", "signature_reasons"]

UNTESTED = "untested here: a source build, never run on this project's GPU machines"


@dataclass(frozen=True)
class LibraryCall:
    """One function of a library as a wrapper calls it: every keyword it may pass, and the essential ones."""

    module: str
    function: str
    passes: frozenset[str]
    essential: frozenset[str]

    def resolve(self) -> Callable[..., Any]:
        fn: Callable[..., Any] = getattr(importlib.import_module(self.module), self.function)
        return fn


def signature_reasons(fn: Callable[..., Any], call: LibraryCall) -> list[str]:
    """Why ``fn``'s signature does not fit ``call`` (empty when it does)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError) as exc:
        return [f"{call.module}.{call.function}: no signature to check ({exc})"]
    name = f"{call.module}.{call.function}"
    reasons = []
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        missing = sorted(call.essential - set(params))
        if missing:
            reasons.append(f"{name} has no parameter {', '.join(missing)} (another version of the library?)")
    required = sorted(
        p.name
        for p in params.values()
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and p.name not in call.passes
    )
    if required:
        reasons.append(f"{name} needs {', '.join(required)}, which this wrapper does not pass")
    return reasons


@cache
def _accepted(fn: Callable[..., Any]) -> frozenset[str] | None:
    """The keyword names ``fn`` takes (``None``: any, it has ``**kwargs``)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return frozenset(params)


def _call(fn: Callable[..., Any], /, **kwargs: Any) -> Any:
    """``fn`` with the keywords its signature knows (checked beforehand by :func:`signature_reasons`)."""
    accepted = _accepted(fn)
    if accepted is None:
        return fn(**kwargs)
    return fn(**{key: value for key, value in kwargs.items() if key in accepted})


def _check_lse(lse: torch.Tensor, q: torch.Tensor, library: str, *, varlen: bool = False) -> torch.Tensor:
    """The forward's log-sum-exp must be ``(B, H, N)`` (``(H, total)`` for packed segments): another layout
    means another library version."""
    expected: tuple[int, ...]
    if varlen:
        total, h = q.shape[:2]
        expected, names = (h, total), "(H, total)"
    else:
        b, n, h, _ = q.shape
        expected, names = (b, h, n), "(B, H, N)"
    if tuple(lse.shape) != expected:
        raise RuntimeError(
            f"{library} returned a log-sum-exp of shape {tuple(lse.shape)}, expected {expected} {names}: "
            "this version of the library is not supported"
        )
    return lse


class FlashAttnKernel(GPUKernel):
    """A flash-attn library: its module, the calls it makes (checked once), how to install it."""

    supports_gqa = True
    forward_call: ClassVar[LibraryCall]
    backward_call: ClassVar[LibraryCall]

    def availability_reasons(self) -> list[str]:
        reasons = super().availability_reasons()
        return reasons or _library_reasons(self.forward_call, self.backward_call)

    def not_supported_reasons(self, request: KernelRequest) -> list[str]:
        """Also what the installed version's signatures lack for this request (windows, packed segments), so
        dispatch picks another kernel rather than one that would raise."""
        reasons = super().not_supported_reasons(request)
        if reasons:
            return reasons
        for fn in (self._forward_fn(), self._backward_fn()):
            gaps = (_window_gap(fn) if request.window else None, _segments_gap(fn) if request.varlen else None)
            reasons += [gap for gap in gaps if gap]
        return reasons

    def _forward_fn(self) -> Callable[..., Any]:
        return _resolved(self.forward_call)

    def _backward_fn(self) -> Callable[..., Any]:
        return _resolved(self.backward_call)


@cache
def _resolved(call: LibraryCall) -> Callable[..., Any]:
    return call.resolve()


@cache
def _library_reasons(*calls: LibraryCall) -> list[str]:
    """Import the library's functions and check their signatures, once per backend class (its calls)."""
    reasons = []
    for call in calls:
        try:
            fn = _resolved(call)
        except Exception as exc:  # present but broken (missing CUDA libraries, another layout)
            reasons.append(f"{call.module}.{call.function} cannot be imported: {type(exc).__name__}: {exc}")
            continue
        reasons += signature_reasons(fn, call)
    return reasons


_WINDOW = ("window_size", "window_size_left", "window_size_right")
_SEGMENTS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")


def _name(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__name__}"


def _window_gap(fn: Callable[..., Any]) -> str | None:
    """Why the installed ``fn`` cannot take a window (None: it can)."""
    accepted = _accepted(fn)
    if accepted is not None and not accepted & set(_WINDOW):
        return f"{_name(fn)} takes no window_size: this version cannot run windows"
    return None


def _segments_gap(fn: Callable[..., Any]) -> str | None:
    """Why the installed ``fn`` cannot take packed segments (None: it can)."""
    accepted = _accepted(fn)
    missing = [] if accepted is None else [name for name in _SEGMENTS if name not in accepted]
    if missing:
        return f"{_name(fn)} takes no {', '.join(missing)}: this version cannot run packed segments (varlen)"
    return None


def _window_keywords(
    fn: Callable[..., Any], window: tuple[int, int] | None, unbounded: int | None = -1
) -> dict[str, Any]:
    """The window in every spelling, an unbounded side as ``unbounded``; a window that the installed function
    cannot take is an error (dropping it would silently compute the whole block)."""
    gap = None if window is None else _window_gap(fn)
    if gap:
        raise RuntimeError(gap)
    left, right = (unbounded if side < 0 else side for side in (window or (-1, -1)))
    return {"window_size": (left, right), "window_size_left": left, "window_size_right": right}


def _segment_keywords(
    fn: Callable[..., Any], cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int
) -> dict[str, Any]:
    """flash-attn's packed segments (int32 cumulative lengths, host ints); a function without them is an error
    (dropping them would treat the packed rows as one sequence)."""
    gap = _segments_gap(fn)
    if gap:
        raise RuntimeError(gap)
    return {
        "cu_seqlens_q": cu_q.to(torch.int32).contiguous(),
        "cu_seqlens_k": cu_k.to(torch.int32).contiguous(),
        "max_seqlen_q": int(max_q),
        "max_seqlen_k": int(max_k),
    }


class FlashAttn2Kernel(FlashAttnKernel):
    """The ``flash_attn`` package (FlashAttention-2), when installed (``ring-flash[fa2]``)."""

    name = "flash_attn2"
    description = f"flash-attn 2 (flash_attn package), when installed; {UNTESTED}"
    module = "flash_attn"
    install_hint = 'pip install "flash-attn>=2.6"'
    priorities = (((9, 0), 65), ((8, 0), 70))
    # ``softcap`` marks the releases (2.6 on) whose forward returns ``(out, lse, ...)``.
    forward_call = LibraryCall(
        "flash_attn.flash_attn_interface", "_flash_attn_forward",
        passes=frozenset({"q", "k", "v", "dropout_p", "softmax_scale", "causal", *_WINDOW, "softcap",
                          "alibi_slopes", "return_softmax"}),
        essential=frozenset({"q", "k", "v", "dropout_p", "softmax_scale", "causal", "softcap"}),
    )  # fmt: skip
    backward_call = LibraryCall(
        "flash_attn.flash_attn_interface", "_flash_attn_backward",
        passes=frozenset({"dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "dropout_p",
                          "softmax_scale", "causal", *_WINDOW, "softcap", "alibi_slopes", "deterministic",
                          "rng_state"}),
        essential=frozenset({"dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "softmax_scale",
                             "causal"}),
    )  # fmt: skip

    supports_window = True

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
        window: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`~ring_core.kernels.KernelBackend.forward` through FlashAttention-2's ``_flash_attn_forward``."""
        fn = self._forward_fn()
        result = _call(
            fn, q=q, k=k, v=v, dropout_p=0.0, softmax_scale=scale, causal=causal, **_window_keywords(fn, window),
            softcap=0.0, alibi_slopes=None, return_softmax=False,
        )  # fmt: skip
        return result[0], _check_lse(result[1], q, "flash_attn")

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
        window: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fn = self._backward_fn()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _call(
            fn, dout=dout.contiguous(), q=q, k=k, v=v, out=out.contiguous(),
            softmax_lse=lse_for_backward(lse), dq=dq, dk=dk, dv=dv, dropout_p=0.0, softmax_scale=scale,
            causal=causal, **_window_keywords(fn, window), softcap=0.0, alibi_slopes=None, deterministic=False,
            rng_state=None,
        )  # fmt: skip
        return dq, dk, dv


class FlashAttn3Kernel(FlashAttnKernel):
    """FlashAttention-3 (``flash_attn_interface``, Hopper only), when installed (``ring-flash[fa3]``)."""

    name = "flash_attn3"
    description = f"flash-attn 3 (flash_attn_interface, Hopper), when installed; {UNTESTED}"
    module = "flash_attn_interface"
    install_hint = "build flash-attention's hopper/ package"
    min_compute_capability = (9, 0)
    max_compute_capability = (9, 0)
    priorities = (((9, 0), 90),)
    _FORWARD_NONE = (
        "k_new", "v_new", "qv", "out", "cu_seqlens_q", "cu_seqlens_k", "cu_seqlens_k_new", "seqused_q",
        "seqused_k", "max_seqlen_q", "max_seqlen_k", "page_table", "kv_batch_idx", "leftpad_k", "rotary_cos",
        "rotary_sin", "seqlens_rotary", "q_descale", "k_descale", "v_descale",
    )  # fmt: skip
    _BACKWARD_NONE = (
        "cu_seqlens_q", "cu_seqlens_k", "sequed_q", "sequed_k", "seqused_q", "seqused_k", "max_seqlen_q",
        "max_seqlen_k",
    )  # fmt: skip
    forward_call = LibraryCall(
        "flash_attn_interface", "_flash_attn_forward",
        passes=frozenset({"q", "k", "v", *_FORWARD_NONE, "softmax_scale", "causal", *_WINDOW, "attention_chunk",
                          "softcap"}),
        essential=frozenset({"q", "k", "v", "softmax_scale", "causal"}),
    )  # fmt: skip
    backward_call = LibraryCall(
        "flash_attn_interface", "_flash_attn_backward",
        passes=frozenset({"dout", "q", "k", "v", "out", "softmax_lse", *_BACKWARD_NONE, "dq", "dk", "dv",
                          "softmax_scale", "causal", *_WINDOW, "softcap", "deterministic"}),
        essential=frozenset({"dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "softmax_scale",
                             "causal"}),
    )  # fmt: skip

    supports_window = True

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
        window: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`~ring_core.kernels.KernelBackend.forward` through FlashAttention-3's ``_flash_attn_forward``."""
        fn = self._forward_fn()
        result = _call(
            fn, q=q, k=k, v=v, **dict.fromkeys(self._FORWARD_NONE), softmax_scale=scale, causal=causal,
            **_window_keywords(fn, window), attention_chunk=0, softcap=0.0,
        )  # fmt: skip
        return result[0], _check_lse(result[1], q, "flash_attn_interface")

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
        window: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fn = self._backward_fn()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _call(
            fn, dout=dout.contiguous(), q=q, k=k, v=v, out=out.contiguous(),
            softmax_lse=lse_for_backward(lse), **dict.fromkeys(self._BACKWARD_NONE), dq=dq, dk=dk, dv=dv,
            softmax_scale=scale, causal=causal, **_window_keywords(fn, window), softcap=0.0, deterministic=False,
        )  # fmt: skip
        return dq, dk, dv


class FlashAttn4Kernel(FlashAttnKernel):
    """FlashAttention-4 (``flash_attn.cute``, CuTe DSL), when installed (``ring-flash[fa4]``).

    Takes sliding windows (``window_size_left/right``) and packed segments (``cu_seqlens_q/k``,
    :meth:`forward_varlen`). Its local mask is bottom-right aligned like ours, per segment:
    ``flash_attn/cute/mask.py`` and ``block_info.py`` shift the key limits of query row ``i`` by
    ``seqlen_k - seqlen_q``, so our windows go as they are. An unbounded side is ``None`` there,
    never ``-1``: ``_resolve_causal_local_window`` only drops ``-1`` when both sides are negative,
    and a left of ``-1`` is then a bound (with a right of 0 it masks every key).
    """

    name = "flash_attn4"
    description = (
        "flash-attn 4 (flash_attn.cute; CuTe DSL, compiles each shape's kernel on first use; windows, varlen), "
        "when installed"
    )
    module = "flash_attn.cute"
    install_hint = 'pip install "flash-attn-4>=4.0.0b1"'
    min_compute_capability = (9, 0)
    priorities = (((10, 0), 110), ((9, 0), 85))
    forward_call = LibraryCall(
        "flash_attn.cute.interface", "_flash_attn_fwd",
        passes=frozenset({"q", "k", "v", *_SEGMENTS, "softmax_scale", "causal", *_WINDOW[1:], "return_lse"}),
        essential=frozenset({"q", "k", "v", "softmax_scale", "causal", "return_lse"}),
    )  # fmt: skip
    backward_call = LibraryCall(
        "flash_attn.cute.interface", "_flash_attn_bwd",
        passes=frozenset({"q", "k", "v", "out", "dout", "lse", "softmax_scale", "causal", *_WINDOW[1:],
                          *_SEGMENTS}),
        essential=frozenset({"q", "k", "v", "out", "dout", "lse", "softmax_scale", "causal"}),
    )  # fmt: skip

    supports_window = True
    supports_varlen = True

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
        window: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`~ring_core.kernels.KernelBackend.forward` through FlashAttention-4 (``flash_attn.cute``)."""
        return self._forward(q, k, v, {}, scale=scale, causal=causal, window=window)

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
        window: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._backward(dout, q, k, v, out, lse, {}, scale=scale, causal=causal, window=window)

    def forward_varlen(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_q: torch.Tensor,
        cu_k: torch.Tensor,
        max_q: int,
        max_k: int,
        *,
        scale: float,
        causal: bool = False,
        window: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(total, H, D)`` rows in segments ``cu_q`` / ``cu_k`` (int32); returns ``out`` and lse ``(H, total)``."""
        segments = _segment_keywords(self._forward_fn(), cu_q, cu_k, max_q, max_k)
        return self._forward(q, k, v, segments, scale=scale, causal=causal, window=window)

    def backward_varlen(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        cu_q: torch.Tensor,
        cu_k: torch.Tensor,
        max_q: int,
        max_k: int,
        *,
        scale: float,
        causal: bool = False,
        window: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``dq, dk, dv`` of :meth:`forward_varlen`'s call from the final ``out`` and lse ``(H, total)``."""
        segments = _segment_keywords(self._backward_fn(), cu_q, cu_k, max_q, max_k)
        return self._backward(dout, q, k, v, out, lse, segments, scale=scale, causal=causal, window=window)

    def _forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        segments: dict[str, Any],
        *,
        scale: float,
        causal: bool,
        window: tuple[int, int] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fn = self._forward_fn()
        out, lse = _call(
            fn, q=q, k=k, v=v, **segments, softmax_scale=scale, causal=causal,
            **_window_keywords(fn, window, unbounded=None), return_lse=True,
        )[:2]  # fmt: skip
        return out, _check_lse(lse, q, "flash_attn.cute", varlen=bool(segments))

    def _backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        segments: dict[str, Any],
        *,
        scale: float,
        causal: bool,
        window: tuple[int, int] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fn = self._backward_fn()
        dq, dk, dv = _call(
            fn, q=q, k=k, v=v, out=out.contiguous(), dout=dout.contiguous(), lse=lse_for_backward(lse),
            softmax_scale=scale, causal=causal, **_window_keywords(fn, window, unbounded=None), **segments,
        )[:3]  # fmt: skip
        return dq, dk, dv
