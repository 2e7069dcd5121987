"""flash-attn 4's strip calls with the token rule as a ``mask_mod``, on the CPU: what the host computes.

flash-attn 4 never runs here. These check everything it would be given: the block lists (full tiles
unmasked, partial tiles under the ``mask_mod``) and the aux tensors, through the ``mask_mod``'s torch
twin (:func:`ring_blocksparse.fa4_rule.twin`, the same formula over the same tensors as the CuTe
code), against :class:`~ring_blocksparse.flex.StripRule` on every pair; and that a rejected call
falls back to FlexAttention, loudly and exactly (forward; the backward on the GPU,
tests/blocksparse/test_fa4_cuda.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch

from ring_blocksparse import build_pattern, fa4
from ring_blocksparse.batches import StripBatch, batch_groups
from ring_blocksparse.fa4 import Fa4Blocks, Fa4FallbackWarning, blocks_for, fa4_forward, rule_ready, tile_grids
from ring_blocksparse.fa4_rule import INDEX_LIMIT, Fa4Rule, rule_tensors, twin
from ring_blocksparse.flex import math_strip_attention
from ring_blocksparse.strided import strip_calls
from ring_core.dilated import branches

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

TILE = 128


@dataclass
class _Lists:
    """Stands for flash-attn 4's ``BlockSparseTensorsTorch`` (same positional fields)."""

    mask_block_cnt: torch.Tensor
    mask_block_idx: torch.Tensor
    full_block_cnt: torch.Tensor
    full_block_idx: torch.Tensor
    block_size: Any = None


@pytest.fixture
def fake_fa4(monkeypatch):
    """flash-attn 4's interface as far as the host needs it: the block-list type, and a kernel call that fails."""

    class Interface:
        calls: ClassVar[list[dict]] = []

        @classmethod
        def _flash_attn_fwd(cls, *args, **kwargs):
            cls.calls.append(kwargs)
            raise RuntimeError("mask_mod did not compile")

        _flash_attn_bwd = _flash_attn_fwd

    monkeypatch.setattr(fa4, "_interface", lambda: (Interface, _Lists))
    cute = SimpleNamespace(strip_rule="cute strip_rule", strip_rule_layout="cute strip_rule_layout")
    monkeypatch.setattr("ring_blocksparse.fa4_rule._cute_module", lambda: cute)
    monkeypatch.setattr(fa4, "_REJECTED", set())
    return Interface


# name -> (N, H, H_kv, segments, rates, pattern, pattern options, causal, window)
CASES = {
    "band-dilated": (1536, 4, 2, (384, 768, 1536), (1, 2, 4), "local_window", {"window": 300, "sliding": True}, False),
    "band-dilated-causal": (1536, 4, 2, (384, 768, 1536), (1, 2, 4), "local_window", {"window": 300, "sliding": True}, True),
    "random-per-head": (1536, 6, 3, (768, 1536), (1, 2), "random", {"density": 0.3, "seed": 3, "per_head": True}, False),
    "random-per-head-rate2": (1024, 4, 1, (1024,), (2,), "random", {"density": 0.4, "seed": 7, "per_head": True}, True),
    "segments-only-causal": (1536, 3, 3, (384, 1536), (2, 4), None, {}, True),
    "window-causal": (1536, 4, 2, (768, 1536), (1, 2), None, {}, True, (300, -1)),
    "window-two-sided-layout": (1536, 2, 2, (1536,), (4,), "random", {"density": 0.5, "seed": 1}, False, (200, 77)),
    "window-diagonal": (1024, 2, 2, (512,), (2,), None, {}, True, (0, -1)),
}  # fmt: skip


def _calls(name: str, masks: bool = False) -> tuple[list, torch.Tensor | None]:
    n, h, kv, segments, rates, pattern, options, causal, *window = CASES[name]
    layout = None if pattern is None else build_pattern(pattern, **options).layout(n, 128, h)
    calls = strip_calls(
        torch.arange(n), torch.arange(n), num_heads=h, num_kv_heads=kv, branch_list=branches(segments, rates, "lse", h),
        block_size=128, layout=layout, causal=causal, q=torch.zeros(1, n, h, 64), dense=False, masks=masks,
        tile=TILE, window=window[0] if window else (-1, -1),
    )  # fmt: skip
    return calls, layout


def _grid(counts: torch.Tensor, indices: torch.Tensor, cols: int) -> torch.Tensor:
    """Block lists back to a bool tile grid ``(h, rows, cols)``."""
    keep = torch.arange(cols) < counts[0, ..., None]
    return torch.zeros(keep.shape, dtype=torch.bool).scatter_(2, indices[0].long(), keep)


def _tiles_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    return grid.repeat_interleave(TILE, 1).repeat_interleave(TILE, 2)


def _kernel_mask(lists: _Lists, rule: Fa4Rule | None, n: int, m: int, batch: int = 0) -> torch.Tensor:
    """What flash-attn 4 computes from these lists and rule (at batch index ``batch``): full tiles whole, partial tiles
    where the rule allows."""
    full = _tiles_to_tokens(_grid(lists.full_block_cnt, lists.full_block_idx, m // TILE))
    partial = _tiles_to_tokens(_grid(lists.mask_block_cnt, lists.mask_block_idx, m // TILE))
    assert not (full & partial).any()
    if rule is None:  # (not asked here: calls without a rule are tile_grids' case)
        return full | partial
    h = torch.arange(full.shape[0])[:, None, None]
    return full | (partial & twin(rule)(batch, h, torch.arange(n)[:, None], torch.arange(m)))


def _exact(call: Any, heads: int) -> torch.Tensor:
    return call.rule.dense(heads, layout=True)[0].expand(heads, len(call.q), len(call.k))


@pytest.mark.parametrize("name", CASES)
def test_rule_calls_give_flash_attn4_exactly_the_strip_rule(name, fake_fa4):
    """Every call that needs the token rule gets block lists and aux tensors whose kernel mask is StripRule's."""
    calls, _ = _calls(name)
    ruled = 0
    for call in calls:
        blocks = blocks_for(call, torch.device("cpu"), rule=True)
        assert isinstance(blocks, Fa4Blocks)
        if tile_grids(call) is not None:
            assert blocks.rule is None and blocks_for(call, torch.device("cpu")) is not None
            continue
        ruled += 1
        assert blocks_for(call, torch.device("cpu"), rule=False) is None  # the mask_mod path off: FlexAttention
        assert blocks.rule is not None and not blocks.causal  # (the rule holds causality)
        assert blocks.rule.layout == call.tiles.needs_layout  # the layout is read only where it can matter
        assert all(x.dtype == (torch.uint8 if i == 7 else torch.int32) for i, x in enumerate(blocks.rule.aux))
        assert all(x.dim() == 1 and x.is_contiguous() for x in blocks.rule.aux)
        heads, n, m = call.tiles.full.shape[0], len(call.q), len(call.k)
        assert torch.equal(_kernel_mask(blocks.forward, blocks.rule, n, m), _exact(call, heads)), call
        # the backward's lists: the same tiles, per key tile
        back = blocks.backward
        for kind in ("full", "mask"):
            fwd = _grid(
                getattr(blocks.forward, f"{kind}_block_cnt"), getattr(blocks.forward, f"{kind}_block_idx"), m // TILE
            )
            bwd = _grid(getattr(back, f"{kind}_block_cnt"), getattr(back, f"{kind}_block_idx"), n // TILE)
            assert torch.equal(bwd, fwd.transpose(1, 2))
    assert ruled, "no call of this case needs the rule"


@pytest.mark.parametrize("name", ["random-per-head", "band-dilated-causal", "window-causal", "segments-only-causal"])
def test_a_batch_of_calls_gives_flash_attn4_each_calls_rule(name, fake_fa4):
    """A branch's calls batched (:mod:`ring_blocksparse.batches`): batch ``b`` of the block lists and of the rule (its
    aux tensors, read at the batch index) is exactly call ``b``'s rule."""
    calls, _ = _calls(name)
    groups = [g for g in batch_groups(calls) if len(g) > 1]
    assert groups
    for group in groups:
        batch = StripBatch([calls[i] for i in group])
        blocks = blocks_for(batch, torch.device("cpu"), rule=True)
        assert isinstance(blocks, Fa4Blocks)
        n, m = len(batch.q), len(batch.k)
        for b, call in enumerate(batch.calls):
            heads = call.tiles.full.shape[0]
            fields = ("mask_block_cnt", "mask_block_idx", "full_block_cnt", "full_block_idx")
            lists = _Lists(*(getattr(blocks.forward, f)[b : b + 1] for f in fields))
            kernel = _kernel_mask(lists, blocks.rule, n, m, batch=b)
            if blocks.rule is None:  # only causal diagonal tiles: flash-attn's causal mask decides there
                assert blocks.causal and batch.rule.same_strip
                kernel &= torch.ones(n, m, dtype=torch.bool).tril()
            assert torch.equal(kernel, _exact(call, heads)), (name, b)


def test_the_check_can_fail(fake_fa4):
    """A rule without its layout term, or with the causal bound off by one, is caught by the comparison above."""
    calls, _ = _calls("random-per-head")
    call = next(c for c in calls if c.tiles.needs_layout)
    blocks = blocks_for(call, torch.device("cpu"), rule=True)
    heads, n, m = call.tiles.full.shape[0], len(call.q), len(call.k)
    assert torch.equal(_kernel_mask(blocks.forward, blocks.rule, n, m), _exact(call, heads))
    without = rule_tensors(call.rule, layout=False)
    assert not torch.equal(_kernel_mask(blocks.forward, without, n, m), _exact(call, heads))
    calls, _ = _calls("window-causal")
    call = next(c for c in calls if tile_grids(c) is None)
    blocks = blocks_for(call, torch.device("cpu"), rule=True)
    heads, n, m = call.tiles.full.shape[0], len(call.q), len(call.k)
    aux = blocks.rule.aux
    assert aux[4][:2].tolist() == [-300, 0]
    strict = Fa4Rule(
        blocks.rule.layout, (*aux[:4], aux[4] - torch.tensor([0, 1, 0, 0, 0, 0, 0], dtype=torch.int32), *aux[5:])
    )
    assert not torch.equal(_kernel_mask(blocks.forward, strict, n, m), _exact(call, heads))


def test_window_bounds_and_strides_in_params():
    """``params``: the offsets' interval (window and causality), the layout's head / row strides and the batch strides
    (0 for one call)."""
    calls, layout = _calls("window-two-sided-layout")
    call = next(c for c in calls if c.tiles.needs_layout)
    rule = rule_tensors(call.rule, layout=True)
    nb = layout.shape[-1]
    assert rule.aux[4].tolist() == [-200, 77, 0, nb, 0, 0, 0]  # one layout for every head: head stride 0
    calls, layout = _calls("random-per-head")
    call = next(c for c in calls if c.tiles.needs_layout and c.rule.layout.shape[0] > 1)
    rule = rule_tensors(call.rule, layout=True)
    assert rule.aux[4].tolist()[2:4] == [nb * nb, nb] and rule.aux[4].tolist()[:2] == [-(1 << 30), 1 << 30]
    assert rule_tensors(call.rule, layout=False).aux[4].tolist()[2:] == [0] * 5 and len(rule.aux) == 8
    # a batch of calls: its rows and layouts flattened call after call
    batch = StripBatch([c for c in calls if c.q.rate == 2])
    heads, n, m = batch.rule.layout.shape[1], len(batch.q), len(batch.k)
    aux = rule_tensors(batch.rule, layout=True).aux
    assert aux[4].tolist()[2:] == [nb * nb, nb, n, m, heads * nb * nb]
    assert torch.equal(aux[0], torch.cat([c.rule.qpos for c in batch.calls]))


def test_a_layout_too_large_for_int32_stays_on_flex(monkeypatch, fake_fa4):
    calls, _ = _calls("random-per-head")
    call = next(c for c in calls if c.tiles.needs_layout)
    monkeypatch.setattr("ring_blocksparse.fa4_rule.INDEX_LIMIT", call.rule.layout.numel())
    assert rule_tensors(call.rule, layout=True) is None and blocks_for(call, torch.device("cpu"), rule=True) is None
    assert INDEX_LIMIT == 1 << 31


def test_padded_calls_and_other_tiles_stay_on_flex(fake_fa4):
    n = 1024
    for padded, tile in ((True, TILE), (False, 64)):
        calls = strip_calls(
            torch.arange(n), torch.arange(n), num_heads=2, num_kv_heads=2, branch_list=branches([512], [2], "lse", 2),
            block_size=128, layout=None, causal=True, q=torch.zeros(1, n, 2, 64), dense=False, masks=False, tile=tile,
            window=(100, -1), padded=padded,
        )  # fmt: skip
        assert calls and all(blocks_for(c, torch.device("cpu"), rule=True) is None for c in calls)


def test_rule_path_needs_cuda_and_can_be_turned_off(monkeypatch):
    assert not rule_ready(torch.zeros(1, 8, 1, 64))
    if torch.cuda.is_available():
        monkeypatch.setenv(fa4.MASK_ENV, "0")
        assert not rule_ready(torch.zeros(1, 8, 1, 64, device="cuda"))


def test_a_rejected_call_falls_back_to_flex_loudly_and_exactly(fake_fa4):
    """flash-attn 4 failing on a mask_mod call: the forward is FlexAttention's (the exact rule), one warning, the
    variant is not tried again; a call without a rule still raises."""
    calls, _ = _calls("band-dilated", masks=True)
    call = next(c for c in calls if tile_grids(c) is None)
    n, h = 1536, 4
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, h, 64, generator=generator) for _ in range(3))
    blocks = blocks_for(call, torch.device("cpu"), rule=True)
    with pytest.warns(Fa4FallbackWarning, match="rejected"):
        o, lse = fa4_forward(call, blocks, q, k, v, scale=0.125)
    assert call.fa4 is False and len(fake_fa4.calls) == 1
    asked = fake_fa4.calls[0]  # what flash-attn 4 was given: the variant, the aux tensors, no causal flag
    assert asked["mask_mod"] == f"cute {blocks.rule.variant}" and not asked["causal"]
    assert all(a is b for a, b in zip(asked["aux_tensors"], blocks.rule.aux, strict=True))
    assert asked["block_sparse_tensors"] is blocks.forward
    views = [
        x.transpose(1, 2) for x in (call.q_view(q), call.kv_input(call.kv_leaf(k)), call.kv_input(call.kv_leaf(v)))
    ]
    o_ref, lse_ref = math_strip_attention(*views, call.tiles, call.rule, scale=0.125, enable_gqa=call.gqa)
    torch.testing.assert_close(o, o_ref.transpose(1, 2), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, lse_ref, atol=2e-5, rtol=2e-5)
    # the next call of this variant goes to FlexAttention without trying flash-attn 4, and without a warning
    other = next(c for c in calls if c is not call and tile_grids(c) is None)
    assert other.tiles.needs_layout == call.tiles.needs_layout  # (the same variant)
    assert blocks_for(other, torch.device("cpu"), rule=True) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", Fa4FallbackWarning)
        fa4_forward(call, blocks, q, k, v, scale=0.125)
    assert len(fake_fa4.calls) == 1
    plain = next(c for c in calls if tile_grids(c) is not None)
    with pytest.raises(RuntimeError, match="did not compile"):
        fa4_forward(plain, blocks_for(plain, torch.device("cpu")), q, k, v, scale=0.125)


def test_a_rejected_call_backward_falls_back_to_flex_exactly(fake_fa4, backward_operator):
    """flash-attn 4 failing on a mask_mod call's backward: the gradients are FlexAttention's backward operator's
    under the final out/lse, without the call's forward again (on the GPU both paths,
    tests/blocksparse/test_fa4_cuda.py)."""
    calls, _ = _calls("random-per-head", masks=True)
    call = next(c for c in calls if tile_grids(c) is None)
    n, h = 1536, 6
    generator = torch.Generator().manual_seed(1)
    q, k, v, dout = (torch.randn(1, n, h, 64, generator=generator, dtype=torch.float64) for _ in range(4))
    k, v = k[:, :, :3], v[:, :, :3]
    blocks = blocks_for(call, torch.device("cpu"), rule=True)
    leaves = tuple(x.detach().requires_grad_() for x in (call.q_view(q), call.kv_leaf(k), call.kv_leaf(v)))
    views = [x.transpose(1, 2) for x in (leaves[0], call.kv_input(leaves[1]), call.kv_input(leaves[2]))]
    o_ref, lse_ref = math_strip_attention(*views, call.tiles, call.rule, scale=0.125, enable_gqa=call.gqa)
    # the call alone makes its rows' final out and lse (the other rows are never read)
    out, lse = torch.zeros_like(q), torch.zeros(q.shape[:3], dtype=q.dtype)
    call.q_view(out).copy_(o_ref.transpose(1, 2))
    call.q_view(lse).copy_(lse_ref.transpose(1, 2))
    expected = torch.autograd.grad(o_ref, leaves, call.q_view(dout).transpose(1, 2))
    with pytest.warns(Fa4FallbackWarning, match="rejected"):
        grads = fa4.fa4_backward(call, blocks, q, k, v, out, lse, dout, scale=0.125)
    assert call.fa4 is False and len(fake_fa4.calls) == 1
    for grad, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad, want, atol=1e-10, rtol=1e-10)


def test_the_backward_passes_strided_views_in_place_and_copies_broadcast_ones():
    """``out``/``dout`` go to flash-attn 4's backward as the call's strided views (no copy per call); a
    view the kernel cannot take (broadcast, or a last stride other than 1) is copied."""
    out = torch.randn(1, 96, 4, 8)
    view = out[:, 1::4, 2:4]  # a rate-4 offset-1 branch on heads 2..3
    assert fa4.kernel_view(view).data_ptr() == view.data_ptr()
    broadcast = torch.ones(1, 1, 1, 1).expand(1, 24, 2, 8)
    assert fa4.kernel_view(broadcast).stride() == (384, 16, 8, 1)
    transposed = out.transpose(-1, -2)
    copied = fa4.kernel_view(transposed)
    assert copied.is_contiguous() and torch.equal(copied, transposed)


def test_out_of_memory_is_raised_not_taken_for_a_rejection(fake_fa4, monkeypatch):
    """A mask_mod call that runs out of GPU memory raises (the variant stays usable): the fallback is for a
    mask_mod flash-attn 4 cannot take, not for a full device."""

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(fake_fa4, "_flash_attn_fwd", out_of_memory)
    monkeypatch.setattr(fake_fa4, "_flash_attn_bwd", out_of_memory)
    calls, _ = _calls("band-dilated", masks=True)
    call = next(c for c in calls if tile_grids(c) is None)
    q, k, v = (torch.randn(1, 1536, 4, 64) for _ in range(3))
    blocks = blocks_for(call, torch.device("cpu"), rule=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Fa4FallbackWarning)
        with pytest.raises(torch.OutOfMemoryError):
            fa4_forward(call, blocks, q, k, v, scale=0.125)
        lse = torch.zeros(1, 1536, 4)
        with pytest.raises(torch.OutOfMemoryError):
            fa4.fa4_backward(call, blocks, q, k, v, q, lse, q, scale=0.125)
    assert not fa4._REJECTED and call.fa4 is not False


def test_the_backward_writes_key_gradients_into_given_views(fake_fa4, monkeypatch):
    """With ``outputs``, flash-attn 4's backward is given them as ``dk``/``dv`` (it writes the send buffer's
    strided views itself) and they are what the call returns: nothing else of the buffer is touched."""

    def backward(q, k, v, out, dout, lse, **kwargs):
        fake_fa4.calls.append(kwargs)
        kwargs["dk"].fill_(1.0)
        kwargs["dv"].fill_(2.0)
        return torch.zeros_like(q), kwargs["dk"], kwargs["dv"]

    monkeypatch.setattr(fake_fa4, "_flash_attn_bwd", backward)
    calls, _ = _calls("band-dilated", masks=True)
    call = next(c for c in calls if c.k.rate > 1)  # a strided view of key/value rows and heads
    q = torch.randn(1, 1536, 4, 64)
    k, v = (torch.randn(1, 1536, 2, 64) for _ in range(2))
    dkv = torch.zeros(1, 1536, 2, 128)  # a K|V send buffer: the calls' gradients land in its halves' views
    outputs = call.kv_leaf(dkv[..., :64]), call.kv_leaf(dkv[..., 64:])
    blocks = blocks_for(call, torch.device("cpu"), rule=True)
    _, dk, dv = fa4.fa4_backward(call, blocks, q, k, v, q, torch.zeros(1, 1536, 4), q, scale=0.125, outputs=outputs)
    assert dk is outputs[0] and dv is outputs[1]
    asked = fake_fa4.calls[-1]
    assert asked["dk"] is outputs[0] and asked["dv"] is outputs[1]
    expected = torch.zeros_like(dkv)
    call.kv_leaf(expected[..., :64]).fill_(1.0)
    call.kv_leaf(expected[..., 64:]).fill_(2.0)
    assert torch.equal(dkv, expected) and 0 < int((dkv != 0).sum()) < dkv.numel()
