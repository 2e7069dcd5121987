"""ring-flash's varlen path (packed documents in one kernel call per branch offset), exact on the CPU.

The GPU kernels that take cumulative lengths (``sdpa_flash``) need CUDA; here a CPU
kernel with the same varlen interface (the math kernel on each packed segment) drives
:mod:`ring_flash.varlen` through ``RingDilatedAttentionFlash``, against the reference.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

import ring_core
import ring_flash.varlen
from ring_core import hookimpl
from ring_core.plugin import MathKernel, branches, dilated_parts, window_kwargs
from ring_core.testing import PACKED_CASES, check_attention, make_inputs
from ring_core.validation import check_documents


class LoopVarlenKernel(MathKernel):
    """The math kernel with windows and flash-attn's varlen interface, one segment at a time."""

    name = "loop_varlen"
    priority = -100
    supports_window = True
    supports_varlen = True

    def __init__(self) -> None:
        self.varlen_calls = 0
        self.seen: dict[str, tuple] = {}  # the last varlen call's (inputs, results), by direction

    def forward(self, q, k, v, *, window=None, mask=None, **kwargs):
        as_mask = window_kwargs(MathKernel(), q, k, mask, window)
        return super().forward(q, k, v, **kwargs, **as_mask)

    def backward(self, dout, q, k, v, out, lse, *, window=None, mask=None, **kwargs):
        as_mask = window_kwargs(MathKernel(), q, k, mask, window)
        return super().backward(dout, q, k, v, out, lse, **kwargs, **as_mask)

    @staticmethod
    def _segments(cu):
        bounds = cu.tolist()
        return [slice(a, b) for a, b in itertools.pairwise(bounds)]

    def forward_varlen(self, q, k, v, cu_q, cu_k, max_q, max_k, *, scale, causal=False, window=None):
        self.varlen_calls += 1
        outs, lses = [], []
        for rows, keys in zip(self._segments(cu_q), self._segments(cu_k)):
            o, lse = self.forward(
                q[None, rows], k[None, keys], v[None, keys], scale=scale, causal=causal, window=window
            )
            outs.append(o[0])
            lses.append(lse[0])
        self.seen["forward"] = ((q, k, v), (result := (torch.cat(outs), torch.cat(lses, -1))))
        return result

    def backward_varlen(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, *, scale, causal=False, window=None):
        grads = [[], [], []]
        for rows, keys in zip(self._segments(cu_q), self._segments(cu_k)):
            block = self.backward(
                dout[None, rows], q[None, rows], k[None, keys], v[None, keys], out[None, rows], lse[None, :, rows],
                scale=scale, causal=causal, window=window,
            )  # fmt: skip
            for grad, value in zip(grads, block):
                grad.append(value[0])
        self.seen["backward"] = ((dout, q, k, v, out), (result := tuple(torch.cat(grad) for grad in grads)))
        return result


@pytest.fixture
def varlen_kernel(fresh_registry):
    kernel = LoopVarlenKernel()

    class Plugin:
        @hookimpl
        def register_kernels(self, register):
            register(kernel)

    fresh_registry().register_plugin(Plugin(), "loop-varlen-kernel")
    return kernel


CASES = [dataclasses.replace(case, padding=False) for case in PACKED_CASES if case.documents is not None]
CASES.append(dataclasses.replace(CASES[0], name="packed-dense-gqa", heads=6, kv_heads=2))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_varlen_path_matches_reference(varlen_kernel, case, dtype):
    attn = ring_core.create_attention("ring_dilated_flash", **case.config, kernel="loop_varlen")
    result = check_attention(attn, case, dtype, seed=5)
    assert attn.last_path == "varlen loop_varlen"
    assert result.passed, f"{case} {dtype}: {result.errors} > {result.tolerance}"
    branch_list = branches(case.segment_lengths, case.dilation_rates, case.merge, case.heads)
    offsets = sum(len({h % b.rate for h in range(b.head_start, b.head_stop)}) for b in branch_list)
    assert varlen_kernel.varlen_calls == offsets  # one call per branch offset, every document in it


def _same(tensors, others) -> bool:
    """Whether each tensor is the other's memory itself (no copy between them)."""
    return all(a.data_ptr() == b.data_ptr() and a.shape == b.shape for a, b in zip(tensors, others, strict=True))


@pytest.mark.parametrize("kv_heads", [None, 2], ids=["mha", "gqa"])
def test_dense_packed_attention_is_the_bare_call(varlen_kernel, kv_heads):
    """One rate-1 branch over every head: the kernel gets the inputs themselves, and its output and gradients
    are the results (nothing copied, gathered, merged or converted around the call)."""
    case = dataclasses.replace(CASES[0], heads=4, kv_heads=kv_heads)
    attn = ring_core.create_attention("ring_dilated_flash", **case.config, kernel="loop_varlen")
    q, k, v, _ = (x.requires_grad_() if x is not None else x for x in make_inputs(case, torch.float32))
    out = attn(q, k, v, is_causal=case.causal, **case.forward_options())
    inputs, results = varlen_kernel.seen["forward"]
    assert _same(inputs, (q[0], k[0], v[0])) and _same([out[0]], results[:1])
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    inputs, results = varlen_kernel.seen["backward"]
    assert _same(inputs, (dout[0], q[0], k[0], v[0], out[0])) and _same([g[0] for g in grads], results)
    assert varlen_kernel.varlen_calls == 1


def test_calls_are_made_once(varlen_kernel, monkeypatch):
    """The calls (rows, cumulative lengths: host work and a copy to the device) are made by the first call of a
    geometry only, not again in backward or in later calls."""
    made = []
    monkeypatch.setattr(ring_flash.varlen, "dilated_parts", lambda *a: made.append(a) or dilated_parts(*a))
    ring_flash.varlen._calls.cache_clear()
    case = CASES[1]
    attn = ring_core.create_attention("ring_dilated_flash", **case.config, kernel="loop_varlen")
    for seed in (1, 2):
        assert check_attention(attn, case, torch.float64, seed=seed).passed
    assert len(made) == len(case.segment_lengths)  # once per branch, by the first forward


@pytest.mark.parametrize("case", [c for c in PACKED_CASES if c.padding], ids=str)
def test_padding_takes_the_segment_path(varlen_kernel, case):
    attn = ring_core.create_attention("ring_dilated_flash", **case.config, kernel="loop_varlen")
    assert check_attention(attn, case, torch.float64).passed
    assert attn.last_path.startswith("segments loop_varlen") and varlen_kernel.varlen_calls == 0


@pytest.mark.parametrize("case", PACKED_CASES, ids=str)
@pytest.mark.parametrize("name", ["dilated", "ring_dilated", "block_sparse_ring_dilated"])
def test_native_windows_through_the_engine(varlen_kernel, name, case):
    """A kernel that takes windows itself gets whole segments with the window, not tiles: still exact."""
    options = {"block_size": 4} if name == "block_sparse_ring_dilated" else {}
    attn = ring_core.create_attention(name, **case.config, **options, kernel="loop_varlen")
    result = check_attention(attn, case, torch.float64, seed=7)
    assert result.passed, f"{name} {case}: {result.errors}"


def test_documents_are_read_once_per_step(varlen_kernel, monkeypatch):
    """The module reads ``cu_seqlens`` (on a GPU, a wait for the GPU) once when it checks it; the ops, forward and
    backward, reuse those values instead of reading the tensor again, and read it again when the tensor changed."""
    reads = []
    monkeypatch.setattr(ring_core.ops, "check_documents", lambda *a: reads.append(a) or check_documents(*a))
    case = CASES[1]
    attn = ring_core.create_attention("ring_dilated_flash", **case.config, kernel="loop_varlen")
    assert check_attention(attn, case, torch.float64).passed
    assert reads == []
    q, k, v, _ = make_inputs(case, torch.float64)
    cu_seqlens = case.forward_options()["cu_seqlens"]
    ring_core.ops.run_attention(attn._op, q, k, v, cu_seqlens=cu_seqlens, documents=case.documents)
    assert reads == []
    with ring_core.ops._known_documents(cu_seqlens, (0, 5, case.seq_len)):
        cu_seqlens.add_(0)  # a new version: the values given before are not trusted
        torch.ops.ring_attention.attention(q, k, v, None, cu_seqlens, None, attn._op.name, False, 0.0, False)
    assert len(reads) == 1


def test_other_offsets_gather_only_their_rows_and_heads(varlen_kernel, monkeypatch):
    """A call that does not take every row gathers its rows once per tensor, only of its heads: ``q, k, v`` in
    one pass in forward, ``dout, q, out`` and ``k, v`` in two in backward; the covering call gathers nothing."""
    gathers = []

    def gather_rows(views, index):
        gathers.append([(tuple(x.shape), x.stride()) for x in views])
        return [x.index_select(0, index) for x in views]

    monkeypatch.setattr(ring_flash.varlen, "gather_rows", gather_rows)
    case = dataclasses.replace(CASES[1], kv_heads=None)  # rates 1, 2, 4 over every head: 1 + 2 + 4 calls
    assert check_attention(
        ring_core.create_attention("ring_dilated_flash", **case.config, kernel="loop_varlen"), case, torch.float64
    ).passed
    heads = [len(range(case.heads)[o::r]) for r in case.dilation_rates[1:] for o in range(r)]
    assert [len(g) for g in gathers] == [3] * len(heads) + [3, 2] * len(heads)
    assert [g[0][0] for g in gathers[: len(heads)]] == [(case.seq_len, h, case.head_dim) for h in heads]
