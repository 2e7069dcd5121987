"""Block-sparse dilated attention on a CUDA GPU (bf16 through the GPU kernels) vs the float64 reference."""

from __future__ import annotations

import pytest
import torch

from ring_blocksparse import BlockSparseRingDilatedAttention
from ring_blocksparse.fa4 import Fa4Blocks
from ring_core.testing import Case, check_attention

pytestmark = pytest.mark.cuda


def _on_gpu(case: Case, *, block_size: int = 128, compiled: bool = False, **options):
    """``case`` through ``BlockSparseRingDilatedAttention(**case.config, block_size=..., **options)`` (compiled whole
    with ``compiled``) in bf16 on the GPU, against the float64 reference of the module's own layout: the module (its
    last plan) and the :class:`~ring_core.testing.CaseResult`."""
    attn = BlockSparseRingDilatedAttention(**case.config, block_size=block_size, **options)
    reference = {"block_layout": attn.layout_for(case.seq_len, case.heads), "block_size": block_size}
    module = torch.compile(attn, fullgraph=True) if compiled else attn
    return attn, check_attention(module, case, torch.bfloat16, device="cuda", reference_options=reference)


@pytest.mark.parametrize("transposed", [True, False], ids=["bwd-by-key-tile", "bwd-by-query-tile"])
@pytest.mark.parametrize(
    "case",
    [
        Case("dense-random", 512, 4, (512,), (1,), head_dim=64),
        Case("dilated-causal-gqa", 512, 4, (128, 512), (1, 2), kv_heads=2, head_dim=64, causal=True),
    ],
    ids=str,
)
def test_bf16_on_gpu(case, transposed):
    """Full tiles go to the fast kernel, masked tiles to a masking one; SPEC.md's bf16 bounds."""
    _, result = _on_gpu(
        case, block_size=64, pattern="random", density=0.3, seed=1, per_head=True, transposed_backward=transposed,
        method="gather",
    )  # fmt: skip
    assert result.passed, f"{case}: {result.errors} > {result.tolerance}"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flex_bf16_on_gpu(causal):
    """The fused FlexAttention path, forward and backward, per-head layout and GQA (causal or not: one kernel)."""
    case = Case("flex", 1024, 4, (1024,), (1,), kv_heads=2, head_dim=64, causal=causal)
    attn, result = _on_gpu(case, pattern="random", density=0.3, seed=2, per_head=True, method="flex")
    assert attn.last_method == "flex"
    assert result.passed, f"{case}: {result.errors} > {result.tolerance}"


def test_flex_band_with_kernel_options_on_gpu():
    """A band layout turns on BLOCKS_ARE_CONTIGUOUS and ROWS_GUARANTEED_SAFE by itself; user options go on top."""
    case = Case("flex-band", 1024, 4, (1024,), (1,), head_dim=64, causal=True)
    attn, result = _on_gpu(
        case, pattern="local_window", window=257, sliding=True, method="flex", flex_kernel_options={"fwd_num_stages": 2}
    )
    assert attn.last_method == "flex"
    options = attn.last_plan.calls[0][0].kernel_options
    assert options["BLOCKS_ARE_CONTIGUOUS"] and options["ROWS_GUARANTEED_SAFE"] and options["fwd_num_stages"] == 2
    assert result.passed, f"{case}: {result.errors} > {result.tolerance}"


@pytest.mark.parametrize("options", [None, {"bwd_BLOCK_M1": 64}], ids=["block-tiles", "128-row-tiles"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_strips_with_dilation_on_gpu(compiled, options, backward_path):
    """Dilated branches (rates 1, 2, 4) on strips: FlexAttention per branch offset, GQA, causal; SPEC.md's bf16
    bounds. Calls of rates 2 and 4 whose 128-row tiles (several layout blocks of the strip a side, partial where
    the rule reads the layout) would visit at least twice the pairs take tiles of one layout block (64 and 32 rows);
    with the caller's kernel tiles every call keeps 128 rows. Compiled (``fullgraph``) the strips are one op whose
    backward runs each FlexAttention call's backward (recomputing its forward on the autograd path)."""
    case = Case("strips", 1024, 4, (256, 512, 1024), (1, 2, 4), kv_heads=2, head_dim=64, causal=True)
    attn, result = _on_gpu(
        case, compiled=compiled, pattern="random", density=0.3, seed=3, per_head=True, method="flex",
        flex_kernel_options=options,
    )  # fmt: skip
    calls = attn.last_plan.calls[0]
    assert attn.last_method == "flex" and any(c.tiles.partial.any() and c.tiles.needs_layout for c in calls)
    assert {c.tiles.tile for c in calls} == ({128} if options else {32, 64, 128})
    assert result.passed, f"{case}: {result.errors} > {result.tolerance}"


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_any_length_on_the_strips_on_gpu(packed, backward_path):
    """N = 1000 (no multiple of 512, what rate 4's 128-row tiles need): the strips run at 1024 rows, the rows after
    N padded keys (or one more packed document); the caller's layout of 8 blocks applies; bf16 vs float64."""
    documents = (0, 300, 301, 777, 1000) if packed else None
    case = Case("odd-length", 1000, 4, (256, 512, 1024), (1, 2, 4), kv_heads=2, head_dim=64, causal=True,
                padding=not packed, batch=1 if packed else 2, documents=documents)  # fmt: skip
    attn, result = _on_gpu(case, pattern="random", density=0.4, seed=5, method="flex")
    assert attn.last_method == "flex"
    assert result.passed, f"{case}: {result.errors} > {result.tolerance}"


def test_dense_strips_on_gpu():
    """Windows that are whole runs of every strip go to the registry's dense kernel (no FlexAttention)."""
    case = Case("dense-strips", 1024, 4, (256, 1024), (1, 2), kv_heads=2, head_dim=64, causal=True)
    attn, result = _on_gpu(case, pattern="local_window", window=256)
    assert attn.last_method == "flex" and all(c.run is not None for c in attn.last_plan.calls[0])
    assert result.passed, f"{case}: {result.errors} > {result.tolerance}"


@pytest.mark.parametrize(
    ("window", "padding", "batch"),
    [((300, 0), False, 2), ((200, 77), True, 2), ((-1, -1), True, 2), ((150, 0), True, 2), ((150, 0), True, 1)],
    ids=["causal-window", "two-sided-window-pad", "pad", "causal-window-pad", "causal-window-pad-batched"],
)
def test_flex_windows_and_padding_on_gpu(window, padding, batch):
    """Sliding windows and key padding on the fused strips (dilated branches, per-head layout, GQA), forward and
    backward, SPEC.md's bf16 bounds; no padded call runs on flash-attn 4 (windowed ones may, with the rule as a
    mask_mod: tests/blocksparse/test_fa4_cuda.py). At batch 1 a branch's offsets run as one batched call."""
    case = Case(
        "strips-window-pad", 1024, 4, (256, 1024), (1, 2), kv_heads=2, head_dim=64, causal=window[1] == 0,
        padding=padding, window_size=window, batch=batch,
    )  # fmt: skip
    attn, result = _on_gpu(case, pattern="random", density=0.5, seed=4, per_head=True, method="flex")
    calls = attn.last_plan.calls[0]
    assert attn.last_method == "flex" and all(c.tiles.padded == padding for c in calls)
    assert window == (-1, -1) or any(c.tiles.needs_window for c in calls)
    assert not any(isinstance(c.fa4, Fa4Blocks) for c in calls if c.tiles.padded)
    assert result.passed, f"{case}: {result.errors} > {result.tolerance}"


def test_flex_window_without_layout_on_gpu():
    """A causal sliding window alone over dilated branches (no layout: the window is the only sparsity), GQA."""
    case = Case("strips-window", 2048, 4, (512, 2048), (1, 2), kv_heads=1, head_dim=64, causal=True,
                window_size=(257, 0))  # fmt: skip
    attn = BlockSparseRingDilatedAttention(**case.config, block_size=128, method="flex")
    result = check_attention(attn, case, torch.bfloat16, device="cuda")
    calls = attn.last_plan.calls[0]
    assert attn.last_method == "flex" and all(c.run is None for c in calls)
    # the band: each query tile reaches itself and at most 3 earlier tiles
    assert all(int((c.tiles.full | c.tiles.partial).sum(-1).max()) <= 4 for c in calls)
    assert result.passed, f"{case}: {result.errors} > {result.tolerance}"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_return_lse_on_the_strips_on_gpu(causal, backward_path):
    """``return_lse=True`` takes the strips (flash-attn 4 where installed, else FlexAttention; dense calls for
    rate-1 runs), the lse's gradient included: bf16 vs float64 within SPEC's bounds."""
    from ring_core import reference_attention
    from ring_core.testing import TOLERANCES, relative_error

    n, h, d, segments, rates = 2048, 4, 64, (512, 1024, 2048), (1, 2, 4)
    attn = BlockSparseRingDilatedAttention(
        segments, rates, block_size=128, pattern="local_window", window=384, sliding=True, method="flex"
    )
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v, d_out = (torch.randn(1, n, h, d, device="cuda", generator=gen) for _ in range(4))
    d_lse = torch.randn(1, h, n, device="cuda", generator=gen)
    results = []
    for dtype, run in ((torch.bfloat16, attn), (torch.float64, None)):
        inputs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        if run is None:
            out, lse = reference_attention(
                *inputs, segment_lengths=segments, dilation_rates=rates, is_causal=causal, return_lse=True,
                block_layout=attn.layout_for(n, h), block_size=128,
            )  # fmt: skip
        else:
            out, lse = run(*inputs, is_causal=causal, return_lse=True)
            assert run.last_method == "flex"
        loss = (out.double() * d_out.double()).sum() + (lse.double() * d_lse.double()).sum()
        results.append([out, lse, *torch.autograd.grad(loss, inputs)])
    out_bound, grad_bound = TOLERANCES[torch.bfloat16]
    errors = [relative_error(got, want) for got, want in zip(*results)]
    assert max(errors[:2]) <= out_bound and max(errors[2:]) <= grad_bound, errors


@pytest.mark.parametrize(
    "case",
    [
        Case("packed-causal-gqa", 4096, 4, (4096,), (1,), kv_heads=2, batch=1, head_dim=64, causal=True,
             documents=(0, 1000, 1000, 2571, 4096)),
        Case("packed-dilated-window", 4096, 4, (1024, 4096), (1, 2), batch=1, head_dim=64, window_size=(700, 0),
             causal=True, documents=(0, 1536, 2046, 4096)),
        Case("packed-anywhere-gqa", 4096, 4, (1024, 2048, 4096), (1, 2, 4), kv_heads=2, batch=1, head_dim=64,
             causal=True, documents=(0, 999, 1001, 2570, 4096)),
    ],
    ids=str,
)  # fmt: skip
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_packed_documents_on_the_strips_on_gpu(case, compiled, backward_path):
    """Packed documents on the fused FlexAttention strips (per-call segment ids and tiles), bf16 vs float64 within
    SPEC's bounds, forward and backward; documents cross layout blocks and kernel tiles; eager and compiled."""
    attn, result = _on_gpu(case, compiled=compiled, pattern="local_window", window=512, sliding=True, method="flex")
    assert attn.last_method == "flex"
    assert result.passed, f"{case}: {result.errors} > {result.tolerance}"


def test_past_dynamos_recompile_limit_on_gpu():
    """More strip shapes than dynamo's recompile limit allows (one, here): each compiles, and stays exact (past the
    limit dynamo ran the forward unfused, which on CUDA ignored the layout: errors of 0.7-0.8)."""
    cases = [
        Case("limit-causal", 1024, 4, (1024,), (1,), head_dim=64, causal=True),
        Case("limit-full", 2048, 4, (2048,), (1,), head_dim=64),
        Case("limit-gqa", 3072, 4, (3072,), (1,), kv_heads=2, head_dim=64, causal=True),
    ]
    with torch._dynamo.config.patch(recompile_limit=1, accumulated_recompile_limit=1):
        for case in cases:
            attn, result = _on_gpu(case, pattern="random", density=0.4, seed=1, method="flex")
            assert any(call.run is None for call in attn.last_plan.calls[0])  # (FlexAttention calls)
            assert result.passed, f"{case}: {result.errors} > {result.tolerance}"
