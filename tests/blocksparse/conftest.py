"""Fixtures of the block-sparse tests."""

from __future__ import annotations

import pytest
import torch


def _switch_backward_operator(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    """FlexAttention's backward operator (:mod:`ring_blocksparse.flex_backward`) switched on or off for the test; on,
    the test is skipped on a torch that predates it."""
    from ring_blocksparse import flex_backward

    monkeypatch.setenv(flex_backward.FLEX_BACKWARD_ENV, "1" if on else "0")
    if on and not flex_backward.available(torch.empty(0)):
        pytest.skip(f"torch {torch.__version__} predates the FlexAttention backward operator")


@pytest.fixture
def backward_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    """The strips' FlexAttention calls take the backward operator alone (whatever the environment says)."""
    _switch_backward_operator(monkeypatch, True)


@pytest.fixture(params=["autograd", "operator"])
def backward_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each backward path of the FlexAttention strips: autograd's (each call's forward kept, or run again) and
    FlexAttention's backward operator alone on the final out and lse (:mod:`ring_blocksparse.flex_backward`, the
    default)."""
    _switch_backward_operator(monkeypatch, request.param == "operator")
    return str(request.param)
