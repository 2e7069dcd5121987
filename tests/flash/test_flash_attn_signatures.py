"""The flash-attn wrappers against the signatures they call: fakes here, the real libraries where installed."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect

import pytest
import torch

import ring_core
from ring_flash.flash_attn import FlashAttn2Kernel, FlashAttn3Kernel, FlashAttn4Kernel, LibraryCall, signature_reasons

CALL = LibraryCall("lib", "attend", passes=frozenset({"q", "k", "causal", "scale", "extra"}),
                   essential=frozenset({"q", "k", "causal", "scale"}))  # fmt: skip


def test_a_matching_signature_has_no_reasons():
    def attend(q, k, causal=False, scale=None, unrelated=0):
        pass

    assert signature_reasons(attend, CALL) == []


def test_a_missing_essential_parameter_is_named():
    def attend(q, k, is_causal=False, scale=None):  # renamed: our causal would be dropped silently
        pass

    reasons = signature_reasons(attend, CALL)
    assert len(reasons) == 1 and "has no parameter causal" in reasons[0] and "lib.attend" in reasons[0]


def test_a_required_parameter_we_do_not_pass_is_named():
    def attend(q, k, causal, scale, window):
        pass

    assert any("needs window" in r for r in signature_reasons(attend, CALL))


def test_var_keyword_functions_only_need_their_required_parameters():
    def attend(q, k, **kwargs):
        pass

    assert signature_reasons(attend, CALL) == []


def test_the_wrapper_passes_only_known_keywords_and_checks_the_lse(monkeypatch):
    seen = {}

    def forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
                alibi_slopes, return_softmax):  # fmt: skip
        seen.update(softmax_scale=softmax_scale, causal=causal, window=(window_size_left, window_size_right))
        b, n, h, _ = q.shape
        return torch.zeros_like(q), torch.zeros(b, h, n), None, None

    monkeypatch.setattr(FlashAttn2Kernel, "_forward_fn", lambda self: forward)
    q = torch.randn(2, 5, 3, 8)
    _, lse = FlashAttn2Kernel().forward(q, q, q, scale=0.3, causal=True)
    assert seen == {"softmax_scale": 0.3, "causal": True, "window": (-1, -1)} and lse.shape == (2, 3, 5)

    def old_layout(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_softmax):
        return torch.zeros_like(q), q  # (out, q, ...): flash-attn < 2.6 returned q second

    monkeypatch.setattr(FlashAttn2Kernel, "_forward_fn", lambda self: old_layout)
    with pytest.raises(RuntimeError, match=r"flash_attn returned a log-sum-exp of shape \(2, 5, 3, 8\)"):
        FlashAttn2Kernel().forward(q, q, q, scale=0.3, causal=True)


KERNELS = [FlashAttn2Kernel, FlashAttn3Kernel, FlashAttn4Kernel]


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


@pytest.mark.parametrize("cls", KERNELS, ids=lambda c: c.name)
def test_installed_library_matches_the_wrapper(cls):
    """Where the library is installed, every call the wrapper makes fits its real signature."""
    for call in (cls.forward_call, cls.backward_call):
        if not importable(call.module):
            pytest.skip(f"{call.module} is not installed")
        assert signature_reasons(call.resolve(), call) == [], call


# flash-attn 4's functions as documented (flash_attn/cute/interface.py of 4.0.0b36), the parameters this
# wrapper may pass and a few of the others; the installed ones are checked the same way where they import.
def documented_fa4_fwd(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
                       max_seqlen_q=None, max_seqlen_k=None, min_seqlen_k=None, page_table=None, softmax_scale=None,
                       causal=False, softcap=None, window_size_left=None, window_size_right=None,
                       learnable_sink=None, num_splits=1, pack_gqa=None, return_lse=False, out=None, lse=None):  # fmt: skip
    FA4_CALLS.append(("forward", locals()))
    b, n, h = (1, *q.shape[:2]) if cu_seqlens_q is not None else q.shape[:3]
    lse_shape = (h, n) if cu_seqlens_q is not None else (b, h, n)
    return torch.zeros_like(q), torch.zeros(lse_shape), None, None, None


def documented_fa4_bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False, softcap=0.0, window_size_left=None,
                       window_size_right=None, m_block_size=64, n_block_size=128, num_threads=256, pack_gqa=False,
                       cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None, max_seqlen_q=None,
                       max_seqlen_k=None, deterministic=False, dq=None, dk=None, dv=None):  # fmt: skip
    FA4_CALLS.append(("backward", locals()))
    return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def early_fa4_fwd(q, k, v, softmax_scale=None, causal=False, return_lse=False):  # no windows, no segments
    return torch.zeros_like(q), torch.zeros(q.shape[0], q.shape[2], q.shape[1]), None, None, None


def early_fa4_bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False):
    return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


FA4_CALLS: list[tuple[str, dict]] = []
FA4_WINDOW = ("window_size_left", "window_size_right")
FA4_SEGMENTS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")


def fa4_functions(source: str):
    """flash-attn 4's forward and backward: the installed ones, or fakes with the documented signature."""
    calls = (FlashAttn4Kernel.forward_call, FlashAttn4Kernel.backward_call)
    if source == "documented":
        return documented_fa4_fwd, documented_fa4_bwd
    try:
        return tuple(call.resolve() for call in calls)
    except Exception as exc:  # not installed, or present but broken here (no CUDA libraries): skip
        pytest.skip(f"flash_attn.cute does not import here: {type(exc).__name__}: {exc}")


@pytest.fixture
def fa4(monkeypatch):
    """The flash-attn 4 backend on the documented fakes, as if available, its calls recorded."""
    FA4_CALLS.clear()
    monkeypatch.setattr(FlashAttn4Kernel, "_forward_fn", lambda self: documented_fa4_fwd)
    monkeypatch.setattr(FlashAttn4Kernel, "_backward_fn", lambda self: documented_fa4_bwd)
    monkeypatch.setattr(FlashAttn4Kernel, "availability_reasons", lambda self: [])
    return FlashAttn4Kernel()


@pytest.mark.parametrize("source", ["installed", "documented"])
def test_fa4_takes_windows_and_segments_by_the_names_we_pass(source):
    """Every window and varlen keyword the wrapper passes is a parameter of flash-attn 4's functions."""
    for fn, call in zip(fa4_functions(source), (FlashAttn4Kernel.forward_call, FlashAttn4Kernel.backward_call)):
        params = set(inspect.signature(fn).parameters)
        assert signature_reasons(fn, call) == [], call
        assert {*FA4_WINDOW, *FA4_SEGMENTS} <= params & call.passes, (call.function, sorted(params))
        assert not call.essential & {*FA4_WINDOW, *FA4_SEGMENTS}  # an early version without them stays usable


@pytest.mark.parametrize(
    ("window", "expected"),
    [(None, (None, None)), ((-1, -1), (None, None)), ((17, 0), (17, 0)), ((-1, 0), (None, 0)), ((5, -1), (5, None)),
     ((0, 3), (0, 3))],
    ids=str,
)  # fmt: skip
def test_fa4_gets_an_unbounded_side_as_none(fa4, window, expected):
    """Its ``-1`` would be a bound (a left of -1 with a right of 0 masks every key): unbounded is ``None``."""
    q = torch.randn(2, 5, 4, 8)
    k = torch.randn(2, 7, 2, 8)
    out, lse = fa4.forward(q, k, k, scale=0.3, causal=False, window=window)
    assert lse.shape == (2, 4, 5)
    fa4.backward(out, q, k, k, out, lse, scale=0.3, window=window)
    for direction, seen in FA4_CALLS:
        assert (seen["window_size_left"], seen["window_size_right"]) == expected, direction
        assert seen["cu_seqlens_q"] is None and seen["softmax_scale"] == 0.3, direction


def test_fa4_varlen_passes_the_segments_and_checks_the_lse(fa4, monkeypatch):
    lengths = [3, 0, 5, 1]
    total = sum(lengths)
    cu = torch.tensor([0, 3, 3, 8, 9], dtype=torch.int64)  # int32 is what the kernel takes
    q, k = torch.randn(total, 4, 8), torch.randn(total, 2, 8)
    out, lse = fa4.forward_varlen(q, k, k, cu, cu, 5, 5, scale=0.5, causal=True, window=(2, -1))
    assert out.shape == q.shape and lse.shape == (4, total)
    lse = lse.clone()
    lse[:, 0] = float("-inf")  # a row that sees nothing anywhere
    grads = fa4.backward_varlen(out, q, k, k, out, lse, cu, cu, 5, 5, scale=0.5, causal=True, window=(2, -1))
    assert [g.shape for g in grads] == [q.shape, k.shape, k.shape]
    for direction, seen in FA4_CALLS:
        assert seen["cu_seqlens_q"].dtype == seen["cu_seqlens_k"].dtype == torch.int32, direction
        assert torch.equal(seen["cu_seqlens_q"].long(), cu) and torch.equal(seen["cu_seqlens_k"].long(), cu)
        assert (seen["max_seqlen_q"], seen["max_seqlen_k"]) == (5, 5) and type(seen["max_seqlen_q"]) is int
        assert (seen["causal"], seen["window_size_left"], seen["window_size_right"]) == (True, 2, None), direction
    backward = FA4_CALLS[-1][1]
    assert backward["lse"].shape == (4, total) and backward["lse"][:, 0].tolist() == [float("inf")] * 4

    def batch_layout(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                     softmax_scale=None, causal=False, window_size_left=None, window_size_right=None,
                     return_lse=False):  # fmt: skip
        return torch.zeros_like(q), torch.zeros(1, q.shape[1], q.shape[0])  # (B, H, N) for packed rows

    monkeypatch.setattr(FlashAttn4Kernel, "_forward_fn", lambda self: batch_layout)
    with pytest.raises(RuntimeError, match=r"expected \(4, 9\) \(H, total\)"):
        fa4.forward_varlen(q, k, k, cu, cu, 5, 5, scale=0.5)


def test_fa4_without_window_or_segment_parameters_refuses_them(fa4, monkeypatch):
    """A version that cannot take a window or packed segments raises rather than drop them (which would compute
    the whole block, or attend across documents), and dispatch does not pick it for such requests."""
    monkeypatch.setattr(FlashAttn4Kernel, "_forward_fn", lambda self: early_fa4_fwd)
    monkeypatch.setattr(FlashAttn4Kernel, "_backward_fn", lambda self: early_fa4_bwd)
    q = torch.randn(1, 6, 2, 8)
    out, lse = fa4.forward(q, q, q, scale=0.3, causal=True)  # no window: runs
    fa4.backward(out, q, q, q, out, lse, scale=0.3, causal=True)
    with pytest.raises(RuntimeError, match="early_fa4_fwd takes no window_size: this version cannot run windows"):
        fa4.forward(q, q, q, scale=0.3, window=(3, 0))
    with pytest.raises(RuntimeError, match="early_fa4_bwd takes no window_size"):
        fa4.backward(out, q, q, q, out, lse, scale=0.3, window=(3, 0))
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="takes no cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k"):
        fa4.forward_varlen(q[0], q[0], q[0], cu, cu, 4, 4, scale=0.3)
    with pytest.raises(RuntimeError, match="early_fa4_bwd takes no cu_seqlens_q"):
        fa4.backward_varlen(out[0], q[0], q[0], q[0], out[0], lse[0], cu, cu, 4, 4, scale=0.3)
    request = ring_core.KernelRequest("cuda", torch.bfloat16, 64, 4, 4, compute_capability=(9, 0))
    assert fa4.not_supported_reasons(request) == []
    window_reasons = fa4.not_supported_reasons(dataclasses.replace(request, window=True))
    assert any("early_fa4_fwd takes no window_size" in r for r in window_reasons), window_reasons
    varlen_reasons = fa4.not_supported_reasons(dataclasses.replace(request, varlen=True))
    assert any("cannot run packed segments (varlen)" in r for r in varlen_reasons), varlen_reasons


def test_fa4_with_the_documented_signature_takes_windows_and_segments(fa4):
    request = ring_core.KernelRequest("cuda", torch.bfloat16, 64, 4, 2, compute_capability=(9, 0), window=True,
                                      varlen=True)  # fmt: skip
    assert fa4.not_supported_reasons(request) == []
