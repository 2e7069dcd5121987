"""examples/transformers_sp.py: its command-line checks, and a few steps on one process that learn."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example():
    sys.path.insert(0, str(EXAMPLES))  # the script imports the text helpers of longnet_lm.py beside it
    try:
        spec = importlib.util.spec_from_file_location("transformers_sp", EXAMPLES / "transformers_sp.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    return module


def test_command_line_checks():
    example = load_example()
    with pytest.raises(SystemExit):
        example.parse_args(["--world-size", "2", "--seq-len", "30"])
    args = example.parse_args(["--seq-len", "64"])
    assert args.world_size == 2 and args.segment_lengths == [64] and args.dilation_rates == [1]
    args = example.parse_args(["--segment-lengths", "16", "32"])
    assert args.dilation_rates == [1, 1]


def test_a_few_steps_on_one_process(tmp_path):
    example = load_example()
    argv = ["--world-size", "1", "--steps", "12", "--seq-len", "64", "--batch-size", "4", "--eval-batches", "1"]
    example.main([*argv, "--lr", "1e-2", "--sample-chars", "8", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "transformers-sp-summary.json").read_text())
    assert summary["world_size"] == 1 and len(summary["losses"]) == 12
    assert summary["loss_last_10_steps"] < summary["loss_first_step"]
    assert summary["sample"].startswith("The ") and len(summary["sample"]) == 12
