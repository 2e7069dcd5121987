"""flash-attn 4's block-sparse kernels on the strips (``sparse_kernel="auto"``) vs the float64 reference, bf16.

Forward and backward: per-head layouts, GQA, causal (diagonal tiles decided by flash-attn's causal
mask), dilated branches, sliding windows. Calls whose partial tiles need the token rule run on
flash-attn 4 too, the rule as a CuTe ``mask_mod`` (:mod:`ring_blocksparse.fa4_rule`); a flash-attn 4
failure there would fall back to FlexAttention with a :class:`~ring_blocksparse.fa4.Fa4FallbackWarning`,
which these tests turn into an error (the fallback itself is forced in its own test). Skips where
flash-attn 4 is not installed (``tools/gpu/fa4_wheels.sh`` brings it).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ring_blocksparse import BlockSparseRingDilatedAttention, fa4
from ring_blocksparse.fa4 import Fa4Blocks, Fa4FallbackWarning, available, rule_ready
from ring_core.testing import Case, check_attention

pytestmark = [pytest.mark.cuda, pytest.mark.filterwarnings("error::ring_blocksparse.fa4.Fa4FallbackWarning")]

CASES = (
    Case("random-gqa", 2048, 4, (2048,), (1,), kv_heads=2, head_dim=128),
    Case("random-causal", 2048, 4, (2048,), (1,), head_dim=128, causal=True),
    Case("dilated-causal-gqa", 2048, 4, (512, 1024, 2048), (1, 2, 4), kv_heads=2, head_dim=128, causal=True),
    Case("d64-segments", 1536, 4, (768, 1536), (1, 2), head_dim=64),
)

PATTERNS = {
    "band": ("local_window", {"window": 384, "sliding": True}),
    "random": ("random", {"density": 0.2, "seed": 5, "per_head": True}),
    "none": (None, {}),
}

# calls whose partial tiles need the rule: (case, pattern, the mask_mod variants expected: layout read or not)
RULE_CASES = (
    (Case("band-dilated", 2048, 4, (512, 1024, 2048), (1, 2, 4), head_dim=128), "band", {True}),
    (Case("band-dilated-causal", 2048, 4, (512, 1024, 2048), (1, 2, 4), head_dim=128, causal=True), "band", {True}),
    (Case("random-dilated-gqa", 2048, 6, (1024, 2048), (1, 2), kv_heads=2, head_dim=128), "random", {True}),
    (Case("segments-causal-gqa", 2048, 4, (320, 2048), (2, 4), kv_heads=1, head_dim=128, causal=True), "none", {False}),
    (Case("window-causal", 2048, 4, (1024, 2048), (1, 2), kv_heads=2, head_dim=128, causal=True, window_size=(300, 0)),
     "none", {False}),
    (Case("window-layout-d64", 1536, 4, (768, 1536), (1, 2), head_dim=64, window_size=(200, 77)), "random", None),
)  # fmt: skip


def _needs_fa4(head_dim: int) -> None:
    if not torch.cuda.is_available() or not available(
        torch.zeros(1, 1, 1, head_dim, device="cuda", dtype=torch.bfloat16)
    ):
        pytest.skip("flash-attn 4 is not installed")


def _run(case: Case, pattern: str) -> tuple[BlockSparseRingDilatedAttention, list]:
    name, options = PATTERNS[pattern]
    attn = BlockSparseRingDilatedAttention(**case.config, block_size=128, pattern=name, method="flex", **options)
    reference = {} if name is None else {"block_layout": attn.layout_for(case.seq_len, case.heads), "block_size": 128}
    result = check_attention(attn, case, torch.bfloat16, device="cuda", reference_options=reference)
    assert attn.last_method == "flex"
    assert result.passed, f"{case}: {result.errors} > {result.tolerance}"
    return attn, attn.last_plan.calls[0]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("pattern", ["random", "band"])
def test_flash_attn4_strips_match_the_reference(case, pattern):
    _needs_fa4(case.head_dim)
    _, calls = _run(case, pattern)
    assert any(isinstance(c.fa4, Fa4Blocks) for c in calls), [(c.tiles.needs_layout, c.run) for c in calls]


@pytest.mark.parametrize(("case", "pattern", "variants"), RULE_CASES, ids=[c.name for c, *_ in RULE_CASES])
def test_rule_calls_run_on_flash_attn4(case, pattern, variants):
    """Calls whose partial tiles need the token rule (layout blocks cut by 128-row strip tiles at rates 2 and 4,
    segments, windows) run on flash-attn 4 with the rule as a mask_mod, exactly: every sparse call is there."""
    _needs_fa4(case.head_dim)
    if not rule_ready(torch.zeros(1, 1, 1, case.head_dim, device="cuda")):
        pytest.skip("flash-attn 4 takes no mask_mod calls on this GPU (fa4.MASK_MAJORS) or RING_BLOCKSPARSE_FA4_MASK=0")
    _, calls = _run(case, pattern)
    sparse = [c for c in calls if c.run is None]
    assert sparse and all(isinstance(c.fa4, Fa4Blocks) for c in sparse), [c.fa4 for c in sparse]
    ruled = {c.fa4.rule.layout for c in sparse if c.fa4.rule is not None}
    assert ruled and (variants is None or ruled == variants), ruled
    assert not fa4._REJECTED


@pytest.mark.parametrize(
    ("case", "pattern", "variants"), RULE_CASES[:2] + RULE_CASES[4:5], ids=["band", "band-causal", "window-causal"]
)
def test_batched_calls_run_on_flash_attn4(case, pattern, variants):
    """At batch 1 a branch's calls run as one flash-attn 4 call (:mod:`ring_blocksparse.batches`: stacked strided views,
    block lists per batch, the mask_mod reading the batch index), exactly."""
    _needs_fa4(case.head_dim)
    if not rule_ready(torch.zeros(1, 1, 1, case.head_dim, device="cuda")):
        pytest.skip("flash-attn 4 takes no mask_mod calls on this GPU (fa4.MASK_MAJORS) or RING_BLOCKSPARSE_FA4_MASK=0")
    case = dataclasses.replace(case, batch=1)
    _, calls = _run(case, pattern)
    batches = [u for c in calls for u in c.batches.values()]
    assert batches and all(isinstance(u.fa4, Fa4Blocks) for u in batches), [u.fa4 for u in batches]
    assert {u.fa4.rule.layout for u in batches if u.fa4.rule is not None} <= variants
    assert not fa4._REJECTED


def test_rule_calls_stay_on_flex_when_the_mask_path_is_off(monkeypatch):
    """``RING_BLOCKSPARSE_FA4_MASK=0`` (A/B timing): the calls that need the rule are FlexAttention's, exactly."""
    case, pattern, _ = RULE_CASES[0]
    _needs_fa4(case.head_dim)
    monkeypatch.setenv(fa4.MASK_ENV, "0")
    _, calls = _run(case, pattern)
    assert all(c.fa4 is False for c in calls if c.run is None and fa4.tile_grids(c) is None)
    assert any(isinstance(c.fa4, Fa4Blocks) for c in calls)  # the calls that need no rule stay on flash-attn 4


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.filterwarnings("default::ring_blocksparse.fa4.Fa4FallbackWarning")
def test_a_rejected_mask_mod_falls_back_to_flex_exactly(monkeypatch, direction):
    """flash-attn 4 raising on a mask_mod call (forced): a warning, and the call computed on FlexAttention (the
    backward recomputes its forward there), still within SPEC's bf16 bounds."""
    case, pattern, _ = RULE_CASES[2]
    _needs_fa4(case.head_dim)
    if not rule_ready(torch.zeros(1, 1, 1, case.head_dim, device="cuda")):
        pytest.skip("flash-attn 4 takes no mask_mod calls here")
    interface, types = fa4._interface()
    name = "_flash_attn_fwd" if direction == "forward" else "_flash_attn_bwd"

    class Rejecting:
        def __getattr__(self, attr):
            kernel = getattr(interface, attr)
            if attr != name:
                return kernel

            def call(*args, **kwargs):
                if kwargs.get("mask_mod") is not None:
                    raise RuntimeError("forced rejection")
                return kernel(*args, **kwargs)

            return call

    monkeypatch.setattr(fa4, "_interface", lambda: (Rejecting(), types))
    monkeypatch.setattr(fa4, "_REJECTED", set())
    with pytest.warns(Fa4FallbackWarning, match="forced rejection"):
        _, calls = _run(case, pattern)
    assert fa4._REJECTED == {"strip_rule_layout"}
    assert any(c.fa4 is False for c in calls if c.run is None)
