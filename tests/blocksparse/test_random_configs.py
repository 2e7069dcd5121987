"""Random configurations of the block-sparse module against the float64 reference, forward and backward.

Each seed draws a configuration (:func:`tools.fuzz.draw_block_sparse`: sequence length, block size, dilated
branches, heads and key/value heads, batch, causality, key padding, a sliding window, packed documents, merge,
pattern and density) and runs it on the strips (their dense twin, as on the CPU) or on the gather path. The seeds
are fixed, so a run is repeatable; the configurations are what a user may pass, in shapes no hand-written case
picked; ``python -m tools.fuzz --only block_sparse`` draws thousands more. Fuzzing like this found three
bugs of the strips (a lower-triangular layout run dense without causality, a GQA fold in ``head_groups``, a
negative batch stride with packed documents).
"""

from __future__ import annotations

import pytest
import torch

from ring_blocksparse import BlockSparseRingDilatedAttention
from ring_core.testing import check_attention
from tools.fuzz import draw_block_sparse

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.mark.parametrize("seed", range(96))
def test_random_configuration_matches_reference(seed):
    case, options = draw_block_sparse(seed)
    attn = BlockSparseRingDilatedAttention(**case.config, **options)
    attn.sparse_kernel = "math"
    layout = attn.layout_for(case.seq_len, case.heads)
    reference = {} if layout is None else {"block_layout": layout, "block_size": options["block_size"]}
    result = check_attention(attn, case, torch.float64, reference_options=reference, seed=seed)
    assert attn.last_method == options["method"]
    assert result.passed, f"{case} {options}: {result.errors} > {result.tolerance}"
