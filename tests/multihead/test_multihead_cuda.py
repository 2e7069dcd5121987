"""The multihead drop-in on a GPU in bf16 (one kernel call each way for dense self-attention) vs float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ring_core.testing import relative_error
from ring_multihead import MultiheadDilatedAttention

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("form", ["none", "hint", "is_causal", "mask"])
def test_bf16_matches_float64_nn(form):
    e, h, n = 256, 4, 333
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(e, h, batch_first=True, dtype=torch.float64)
    ours = MultiheadDilatedAttention(e, h, batch_first=True, device="cuda", dtype=torch.bfloat16)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, n, e, dtype=torch.float64)
    grad = torch.randn(2, n, e, dtype=torch.float64)
    mask = torch.ones(n, n, dtype=torch.bool).triu(1)
    kwargs = {"none": {}, "hint": {"attn_mask": mask, "is_causal": True}, "is_causal": {"is_causal": True},
              "mask": {"attn_mask": mask}}[form]  # fmt: skip
    ref_kwargs = {"attn_mask": mask, "is_causal": True} if form == "is_causal" else kwargs
    leaf = x.clone().requires_grad_()
    expected = reference(leaf, leaf, leaf, need_weights=False, **ref_kwargs)[0]
    expected.backward(grad)
    ours_leaf = x.to("cuda", torch.bfloat16).requires_grad_()
    cuda_kwargs = {key: value.cuda() if torch.is_tensor(value) else value for key, value in kwargs.items()}
    out = ours(ours_leaf, ours_leaf, ours_leaf, need_weights=False, **cuda_kwargs)[0]
    out.backward(grad.to("cuda", torch.bfloat16))
    assert relative_error(out.double().cpu(), expected.detach()) < 1e-2
    assert relative_error(ours_leaf.grad.double().cpu(), leaf.grad) < 2e-2
    weight_grad = ours.in_proj_weight.grad.double().cpu()
    assert relative_error(weight_grad, reference.in_proj_weight.grad) < 2e-2
