"""convert_state_dict: fkodom's and the original package's multihead weights in MultiheadDilatedAttention.

The two classes below re-create the peers' parameter layouts and forward passes (written from
their public code: fkodom/dilated-attention-pytorch ``MultiheadDilatedAttention``; the original
package's ``MultiheadDilatedAttention`` on ``BaseMultiheadDilatedAttention``) around an attention
core passed in, so the conversion is checked on outputs wherever the attention coincides.
"""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ring_multihead import MultiheadDilatedAttention, convert_state_dict

ROOT = Path(__file__).resolve().parents[2]
peer_dilated = runpy.run_path(str(ROOT / "docs" / "examples" / "migration_differences.py"))["peer_dilated"]
F64 = torch.float64


def dense(q, k, v, is_causal):
    """Plain attention on ``(B, N, H, D)``: where every formula coincides."""
    return F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=is_causal).transpose(1, 2)


class FkodomLayout(nn.Module):
    """fkodom's layout: ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (``nn.Linear(E, E, bias)``) and ``norm``
    (a LayerNorm after attention, on by default); batch-first ``(B, N, E)``; returns ``(out, None)``."""

    def __init__(self, embed_dim, num_heads, core, bias=True, layer_norm=True):
        super().__init__()
        self.num_heads, self.core = num_heads, core
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(embed_dim, embed_dim, bias=bias) for _ in range(3))
        self.norm = nn.LayerNorm(embed_dim) if layer_norm else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def forward(self, query, key, value, is_causal=False):
        q, k, v = (p(x).unflatten(-1, (self.num_heads, -1)) for p, x in zip((self.q_proj, self.k_proj, self.v_proj), (query, key, value)))  # fmt: skip
        x = self.core(q, k, v, is_causal).flatten(2)
        if self.norm is not None:
            x = self.norm(x)
        return self.out_proj(x), None


class OriginalLayout(FkodomLayout):
    """The original package's layout: the same projections; ``layer_norm=True`` adds ``q_ln`` and ``k_ln``, applied to
    the projected queries and keys, and ``q_ln`` again after attention; returns the output alone."""

    def __init__(self, embed_dim, num_heads, core, bias=True, layer_norm=False):
        super().__init__(embed_dim, num_heads, core, bias=bias, layer_norm=False)
        self.q_ln = nn.LayerNorm(embed_dim) if layer_norm else None
        self.k_ln = nn.LayerNorm(embed_dim) if layer_norm else None

    def forward(self, query, key, value, is_causal=False):
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if self.q_ln is not None:
            q, k = self.q_ln(q), self.k_ln(k)
        x = self.core(*(t.unflatten(-1, (self.num_heads, -1)) for t in (q, k, v)), is_causal).flatten(2)
        if self.q_ln is not None:
            x = self.q_ln(x)
        return self.out_proj(x)


def randomise(module: nn.Module) -> nn.Module:
    """Non-trivial values everywhere (LayerNorms included), float64."""
    module.double()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn_like(parameter) / parameter.shape[-1] ** 0.5)
    return module


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("is_causal", [False, True])
def test_fkodom_weights_give_the_same_outputs_around_the_same_attention(bias, is_causal):
    torch.manual_seed(0)
    theirs = randomise(FkodomLayout(48, 6, dense, bias=bias))
    ours = MultiheadDilatedAttention(48, 6, bias=bias, batch_first=True, layer_norm=True, dtype=F64)
    ours.load_state_dict(convert_state_dict(theirs.state_dict()))
    x = torch.randn(2, 37, 48, dtype=F64)
    expected, _ = theirs(x, x, x, is_causal=is_causal)
    actual, _ = ours(x, x, x, need_weights=False, is_causal=is_causal)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("is_causal", [False, True])
def test_original_weights_give_the_same_outputs_where_the_formulas_coincide(is_causal):
    """One branch of rate 1 (segments of 16): the original's formula is then segment-local attention, like ours."""
    torch.manual_seed(1)
    theirs = randomise(OriginalLayout(32, 4, lambda q, k, v, c: peer_dilated(q, k, v, [16], [1], is_causal=c)))
    ours = MultiheadDilatedAttention(32, 4, batch_first=True, segment_lengths=[16], dilation_rates=[1], dtype=F64)
    ours.load_state_dict(convert_state_dict(theirs.state_dict()))
    x = torch.randn(3, 64, 32, dtype=F64)
    actual, _ = ours(x, x, x, need_weights=False, is_causal=is_causal)
    torch.testing.assert_close(actual, theirs(x, x, x, is_causal=is_causal), rtol=1e-12, atol=1e-12)


def test_several_branches_do_not_coincide_and_the_guide_says_so():
    """Converted weights, two branches: the original's offsets (i mod r) and 1/m give other numbers than ours."""
    torch.manual_seed(2)
    theirs = randomise(OriginalLayout(32, 4, lambda q, k, v, c: peer_dilated(q, k, v, [16, 32], [1, 2], is_causal=c)))
    x = torch.randn(1, 64, 32, dtype=F64)
    for merge in ("lse", "head_groups"):
        ours = MultiheadDilatedAttention(
            32, 4, batch_first=True, segment_lengths=[16, 32], dilation_rates=[1, 2], merge=merge, dtype=F64
        )
        ours.load_state_dict(convert_state_dict(theirs.state_dict()))
        difference = (ours(x, x, x, need_weights=False)[0] - theirs(x, x, x)).abs().max()
        assert difference > 1e-2, merge
    guide = (ROOT / "docs" / "migration.md").read_text().replace("**", "")
    assert "i mod r" in guide and "does not reproduce their numbers" in guide


def test_prefix_converts_one_module_of_a_model_and_keeps_the_rest():
    model = nn.ModuleDict({"attn": FkodomLayout(16, 2, dense, layer_norm=False), "head": nn.Linear(16, 3)})
    converted = convert_state_dict(model.state_dict(), prefix="attn.")
    assert set(converted) == {"attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
                              "head.weight", "head.bias"}  # fmt: skip
    torch.testing.assert_close(converted["attn.in_proj_weight"][16:32], model["attn"].k_proj.weight)
    assert converted["head.weight"] is model.state_dict()["head.weight"] or torch.equal(
        converted["head.weight"], model["head"].weight
    )


def test_refuses_what_has_no_equivalent():
    with pytest.raises(ValueError, match=r"q_ln / k_ln: the original package's layer_norm=True normalises"):
        convert_state_dict(OriginalLayout(16, 2, dense, layer_norm=True).state_dict())
    state = FkodomLayout(16, 2, dense).state_dict()
    with pytest.raises(ValueError, match=r"no equivalent in MultiheadDilatedAttention: \['extra.weight'\]"):
        convert_state_dict({**state, "extra.weight": torch.ones(1)})
    with pytest.raises(ValueError, match=r"lacks \['k_proj.weight'\]"):
        convert_state_dict({k: v for k, v in state.items() if k != "k_proj.weight"})
    with pytest.raises(ValueError, match=r"biases for some"):
        convert_state_dict({k: v for k, v in state.items() if k != "v_proj.bias"})
