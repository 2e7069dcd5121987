"""The flash-attn wrappers against the signatures they call: fakes here, the real libraries where installed."""

from __future__ import annotations

import importlib.util

import pytest
import torch

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
