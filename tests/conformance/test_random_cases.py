"""Every registered, available attention implementation on seeded random cases vs the float64 reference of SPEC.md.

The hand-written cases of ``ring_core.testing`` pick shapes; these draw them (odd ``N``, one to three branches of
rates 1-4, GQA, batch, causality, key padding, sliding windows, packed documents, both merges), so a new
implementation meets shapes nobody chose. Seeds are fixed: a run is repeatable. Fuzzing like this (thousands of
draws) found a wrong key/value gradient of ring-flash's windows and three bugs of the block-sparse strips.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

import ring_core
from ring_core.testing import Case, check_attention, packed_documents

IMPLEMENTATIONS = [impl for impl in ring_core.list_implementations("attention") if impl.available]


def draw(seed: int) -> Case:
    r = random.Random(seed)
    count = r.randint(1, 3)
    rates = sorted(r.sample([1, 2, 3, 4], count))
    segments = [base * rate for base, rate in zip(sorted(r.sample(range(2, 24), count)), rates, strict=True)]
    if any(a >= b for a, b in itertools.pairwise(segments)):
        segments = [max(segments) * (i + 1) for i in range(count)]
    n = r.randint(1, 60)
    heads = r.choice([1, 2, 3, 4, 6])
    batch = r.choice([1, 1, 2])
    causal = r.random() < 0.5
    window = r.choice(
        [(-1, -1)] * 3 + [(r.randint(0, 20), -1), (r.randint(0, 20), 0), (r.randint(0, 9), r.randint(0, 9))]
    )
    return Case(
        f"seed{seed}", n, heads, tuple(segments), tuple(rates),
        kv_heads=r.choice([h for h in (1, 2, 3, heads) if heads % h == 0]), batch=batch,
        head_dim=r.choice([1, 3, 4, 8]), merge=r.choice(["lse", "lse", "head_groups"]) if heads >= count else "lse",
        causal=causal, padding=r.random() < 0.3, window_size=(window[0], 0) if causal and window[1] > 0 else window,
        documents=packed_documents(n, r.randint(3, 6), seed) if batch == 1 and n >= 3 and r.random() < 0.4 else None,
    )  # fmt: skip


@pytest.mark.parametrize("seed", range(24))
@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
def test_random_case_matches_reference(impl, seed):
    case = draw(seed)
    attn = ring_core.create_attention(impl.name, **case.config, **impl.options)
    result = check_attention(attn, case, torch.float64, seed=seed)
    assert result.passed, f"{impl.name} {case.__dict__}: errors {result.errors} > {result.tolerance}"
