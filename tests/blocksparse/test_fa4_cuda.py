"""flash-attn 4's block-sparse kernels on the strips (``sparse_kernel="auto"``) vs the float64 reference, bf16.

Forward and backward: per-head layouts, GQA, causal (diagonal tiles decided by flash-attn's causal
mask), dilated branches (calls whose tiles need the token rule stay on FlexAttention, in the same
call). Skips where flash-attn 4 is not installed (``tools/gpu/fa4_wheels.sh`` brings it).
"""

from __future__ import annotations

import pytest
import torch

from ring_blocksparse import BlockSparseRingDilatedAttention
from ring_blocksparse.fa4 import Fa4Blocks, available
from ring_core.testing import Case, check_attention

pytestmark = pytest.mark.cuda

CASES = (
    Case("random-gqa", 2048, 4, (2048,), (1,), kv_heads=2, head_dim=128),
    Case("random-causal", 2048, 4, (2048,), (1,), head_dim=128, causal=True),
    Case("dilated-causal-gqa", 2048, 4, (512, 1024, 2048), (1, 2, 4), kv_heads=2, head_dim=128, causal=True),
    Case("d64-segments", 1536, 4, (768, 1536), (1, 2), head_dim=64),
)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("pattern", ["random", "local_window"])
def test_flash_attn4_strips_match_the_reference(case, pattern):
    if not available(torch.zeros(1, 1, 1, case.head_dim, device="cuda", dtype=torch.bfloat16)):
        pytest.skip("flash-attn 4 is not installed")
    options = {"density": 0.2, "seed": 5, "per_head": True} if pattern == "random" else {"window": 384, "sliding": True}
    attn = BlockSparseRingDilatedAttention(**case.config, block_size=128, pattern=pattern, method="flex", **options)
    layout = attn.layout_for(case.seq_len, case.heads)
    result = check_attention(
        attn, case, torch.bfloat16, device="cuda", reference_options={"block_layout": layout, "block_size": 128}
    )
    calls = attn.last_plan.calls[0]
    assert any(isinstance(c.fa4, Fa4Blocks) for c in calls), [(c.tiles.needs_layout, c.run) for c in calls]
    assert result.passed, f"{case}: {result.errors} > {result.tolerance}"
