"""examples/longnet_lm.py: one training step on 2 gloo ranks (ring + FSDP2) equals the step on 1 rank (loss, gradients)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from mh_helpers import assert_close

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "longnet_lm.py"


def load_example():
    if "longnet_lm" in sys.modules:
        return sys.modules["longnet_lm"]
    spec = importlib.util.spec_from_file_location("longnet_lm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["longnet_lm"] = module
    spec.loader.exec_module(module)
    return module


def one_step(rank: int, world_size: int, layout: str = "zigzag") -> tuple[float, dict[str, object]]:
    """A tiny float64 LongNet LM, one forward/backward on this rank's shard; the loss and the full (summed) grads."""
    example = load_example()
    text = example.Text()
    config = example.Config(
        vocab_size=len(text.chars), seq_len=32, d_model=16, num_heads=4, num_layers=2,
        segment_lengths=(4, 8, 32), dilation_rates=(1, 2, 4),
    )  # fmt: skip
    torch.manual_seed(0)
    model = example.build_model(config, world_size, layout, dtype=torch.float64)
    x, y = text.batch(text.train, 3, config.seq_len, torch.Generator().manual_seed(1))
    loss = example.train_step(model, x, y, rank, world_size, layout)
    grads = {name: p.grad for name, p in model.named_parameters()}
    grads = {name: g.full_tensor() if hasattr(g, "full_tensor") else g for name, g in grads.items()}  # FSDP2 shards
    # numpy arrays: tensors would travel back from the worker through shared memory that dies with it
    return loss, {name: g.numpy() for name, g in grads.items()}


@pytest.mark.distributed
def test_two_ranks_take_the_same_step_as_one():
    distributed_helpers = pytest.importorskip("distributed_helpers")
    expected_loss, expected_grads = one_step(0, 1)
    expected_grads = {name: torch.from_numpy(g) for name, g in expected_grads.items()}
    assert expected_loss > 0 and len(expected_grads) == 36
    for rank, (loss, grads) in enumerate(distributed_helpers.run_distributed(one_step, 2)):
        assert abs(loss - expected_loss) <= 1e-10 * expected_loss, (rank, loss, expected_loss)
        assert_close({name: torch.from_numpy(g) for name, g in grads.items()}, expected_grads)


def test_command_line_checks():
    example = load_example()
    with pytest.raises(SystemExit):
        example.parse_args(["--world-size", "2", "--seq-len", "30"])
    args = example.parse_args(["--world-size", "2", "--steps", "5"])
    assert args.layout == "zigzag" and args.seq_len == 256
