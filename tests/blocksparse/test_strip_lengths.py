"""The strips at any sequence length on one process: a call whose ``N`` does not split into whole kernel tiles runs
at the next length that does (zeros after ``N``: one more packed document, or padded keys), its extra rows dropped.

Checked on the CPU (``method="flex"``: FlexAttention's eager forward, its backward operator's dense form) in float64
against the reference: every conformance case of ring_core.testing the strips can take (odd ``N``, GQA, padding,
causal, packed documents, windows, head groups; rates that divide the block size), and odd lengths under each
block-sparse pattern.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import ring_core
from ring_blocksparse import BlockSparseRingDilatedAttention
from ring_blocksparse.flex import strip_length
from ring_core.testing import CASES, PACKED_CASES, Case, check_attention

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

BLOCK = 4
STRIP_CASES = [case for case in (*CASES, *PACKED_CASES) if all(BLOCK % rate == 0 for rate in case.dilation_rates)]


def test_strip_length_is_the_next_length_of_whole_tiles():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert strip_length(45, cpu, 4, (1, 2)) == 48  # (tiles of block / rate rows: rate x tile = 4)
    assert strip_length(48, cpu, 4, (1, 2, 4)) == 48
    assert strip_length(1, cpu, 8, (2,)) == 8
    assert strip_length(1000, cuda, 128, (1, 2, 4)) == 1024  # (128-row tiles: lcm(128, 256, 512))
    assert strip_length(1000, cpu, 4, (3,)) == 1000  # (a rate the strips cannot take: no padding for it)


@pytest.mark.parametrize("case", STRIP_CASES, ids=str)
def test_any_length_on_the_strips_matches_reference(case, backward_operator):
    attn = ring_core.create_attention("block_sparse_ring_dilated", **case.config, block_size=BLOCK, method="flex")
    result = check_attention(attn, case, torch.float64, seed=zlib.crc32(case.name.encode()) % 1000)
    assert attn.last_method == "flex"
    assert result.passed, f"{case}: {result.errors} > {result.tolerance}"


def test_the_conformance_cases_include_lengths_of_partial_tiles():
    """(What the test above is for: most conformance lengths are not multiples of the block.)"""
    assert sum(case.seq_len % BLOCK != 0 for case in STRIP_CASES) >= 8


PATTERNS = {
    "random": {"density": 0.4, "seed": 5},
    "local_window": {"window": 12, "sliding": True},
    "dilated_sparse": {"dilation": 2},
    "global_local": {"global_tokens": 4, "window": 8},
    "strided": {"stride": 12},
}
PATTERN_CASES = [
    Case("odd", 45, 4, (16, 32), (1, 2), kv_heads=2, causal=True, padding=True),
    Case("odd-packed", 51, 4, (8, 64), (1, 4), documents=(0, 7, 7, 30, 51), batch=1),
    Case("odd-window", 37, 2, (37,), (1,), window_size=(9, 3)),
    Case("whole-blocks", 44, 4, (16, 32), (1, 2), kv_heads=2),  # (padded by whole blocks: the layout's, no mask)
]  # fmt: skip


@pytest.mark.parametrize("extra", [0, 2], ids=["tile", "blocks"])
@pytest.mark.parametrize("case", PATTERN_CASES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_any_length_under_a_pattern_matches_reference(pattern, case, extra, backward_operator, monkeypatch):
    """The caller's layout (of ``ceil(N / b)`` blocks) is the one applied, also where the strips' length adds whole
    blocks (``extra``: as CUDA's 128-row tiles do for small blocks): the added rows' blocks allow nothing."""
    monkeypatch.setattr("ring_blocksparse.attention.strip_length", lambda n, *_: (-(-n // BLOCK) + extra) * BLOCK)
    attn = BlockSparseRingDilatedAttention(
        **case.config, block_size=BLOCK, pattern=pattern, method="flex", **PATTERNS[pattern]
    )
    layout = attn.layout_for(case.seq_len, case.heads)
    result = check_attention(attn, case, torch.float64, reference_options={"block_layout": layout, "block_size": BLOCK})
    assert attn.last_method == "flex"
    if case.seq_len % BLOCK == 0:  # (no rows masked: the plan's block masks serve, no per-call cuts)
        assert all(c.block_mask is not None for c in attn.last_plan.calls[0] if c.run is None)
    assert result.passed, f"{pattern} {case}: {result.errors} > {result.tolerance}"


def test_padded_rows_leave_the_return_lse_and_the_cache_alone(backward_operator):
    """``return_lse`` is the caller's rows; the plan is built once for the shape and reused."""
    attn = BlockSparseRingDilatedAttention([8, 16], [1, 2], block_size=BLOCK, pattern="random", density=0.5, seed=2,
                                           method="flex")  # fmt: skip
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 21, 2, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    out, lse = attn(q, k, v, return_lse=True)
    assert out.shape == (2, 21, 2, 8) and lse.shape == (2, 2, 21)
    expected = ring_core.reference_attention(
        q, k, v, segment_lengths=[8, 16], dilation_rates=[1, 2], block_layout=attn.layout_for(21, 2), block_size=BLOCK
    )
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    plan = attn.last_plan
    attn(q, k, v)
    assert attn.last_plan is plan and len(attn._strip_plans) == 1
