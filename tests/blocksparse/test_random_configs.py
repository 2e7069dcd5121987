"""Random configurations of the block-sparse module against the float64 reference, forward and backward.

Each seed draws a configuration (sequence length, block size, dilated branches, heads and key/value heads, batch,
causality, key padding, a sliding window, packed documents, merge, pattern and density) and runs it on the strips
(their dense twin, as on the CPU) or on the gather path. The seeds are fixed, so a run is repeatable; the
configurations are what a user may pass, in shapes no hand-written case picked. Fuzzing like this found three
bugs of the strips (a lower-triangular layout run dense without causality, a GQA fold in ``head_groups``, a
negative batch stride with packed documents).
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from ring_blocksparse import BlockSparseRingDilatedAttention
from ring_core.testing import Case, check_attention, packed_documents

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def draw(seed: int) -> tuple[Case, dict]:
    """A configuration the strips (``method="flex"``: ``N`` a multiple of the block) or the gather path can run."""
    r = random.Random(seed)
    block = r.choice([4, 8, 16])
    method = r.choice(["flex", "flex", "gather"])
    rates = sorted(r.sample([rate for rate in (1, 2, 4) if block % rate == 0], r.randint(1, 3)))
    bases = sorted(r.sample([block * m for m in (1, 2, 4, 8, 16)], len(rates)))
    segments = [base * rate for base, rate in zip(bases, rates)]
    if any(a >= b for a, b in itertools.pairwise(segments)):  # strictly increasing: else one branch per rate
        segments = [max(segments) * (i + 1) for i in range(len(rates))]
    n = r.randint(2, 12) * block if method == "flex" else r.randint(3, 100)
    heads = r.choice([2, 3, 4, 6])
    causal = r.random() < 0.5
    window = r.choice(
        [(-1, -1)] * 3 + [(r.randint(0, 20), -1), (r.randint(0, 20), 0), (r.randint(0, 9), r.randint(0, 9))]
    )
    batch = r.choice([1, 1, 2])
    merge = r.choice(["lse", "lse", "head_groups"]) if heads >= len(rates) else "lse"
    case = Case(
        f"seed{seed}-{method}", n, heads, tuple(segments), tuple(rates),
        kv_heads=r.choice([h for h in (1, 2, 3, heads) if heads % h == 0]), batch=batch, head_dim=r.choice([3, 4, 5]),
        merge=merge, causal=causal, padding=r.random() < 0.3,
        window_size=(window[0], 0) if causal and window[1] > 0 else window,
        documents=packed_documents(n, r.randint(3, 6), seed) if batch == 1 and r.random() < 0.4 else None,
    )  # fmt: skip
    pattern = r.choice(
        [
            ("random", {"density": r.choice([0.2, 0.5, 0.8]), "seed": seed % 97, "per_head": r.random() < 0.5}),
            ("local_window", {"window": block * r.randint(1, 3), "sliding": r.random() < 0.5}),
            (None, {}),
        ]
    )
    return case, {"block_size": block, "method": method, "pattern": pattern[0], **pattern[1]}


@pytest.mark.parametrize("seed", range(96))
def test_random_configuration_matches_reference(seed):
    case, options = draw(seed)
    attn = BlockSparseRingDilatedAttention(**case.config, **options)
    attn.sparse_kernel = "math"
    layout = attn.layout_for(case.seq_len, case.heads)
    reference = {} if layout is None else {"block_layout": layout, "block_size": options["block_size"]}
    result = check_attention(attn, case, torch.float64, reference_options=reference, seed=seed)
    assert attn.last_method == options["method"]
    assert result.passed, f"{case} {options}: {result.errors} > {result.tolerance}"
