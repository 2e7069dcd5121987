"""Fixtures of the block-sparse tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(params=["autograd", "operator"])
def backward_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each backward path of the FlexAttention strips: autograd's (each call's forward kept, or run again) and
    FlexAttention's backward operator alone on the final out and lse (:mod:`ring_blocksparse.flex_backward`; on CUDA
    opt-in until these tests have passed there)."""
    from ring_blocksparse import flex_backward

    monkeypatch.setenv(flex_backward.FLEX_BACKWARD_ENV, "1" if request.param == "operator" else "0")
    if request.param == "operator" and not flex_backward.available(torch.empty(0)):
        pytest.skip(f"torch {torch.__version__} predates the FlexAttention backward operator")
    return str(request.param)
