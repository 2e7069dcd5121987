"""Named patterns: registration through the hook, validation, stated density, reproducibility, the CLI."""

from __future__ import annotations

import argparse

import pytest
import torch

from ring_blocksparse import BlockSparseRingDilatedAttention, Pattern, build_pattern, registered_patterns
from ring_blocksparse.cli import add_pattern_parser
from ring_core import hookimpl, reference_attention

BUILTINS = ["dilated_sparse", "global_local", "local_window", "random", "strided"]


def test_builtins_are_registered_through_the_hook():
    assert set(BUILTINS) <= set(registered_patterns())


@pytest.mark.parametrize(
    ("name", "options", "density"),
    [
        ("local_window", {"window": 16}, 4 * 4 / 64),  # 4 windows of 2x2 blocks out of 8x8
        ("local_window", {"window": 9, "sliding": True}, (8 + 2 * 7) / 64),  # |i - j| <= 1
        ("dilated_sparse", {"dilation": 4}, (8 + 2 * (4)) / 64),  # distances 0, +-4
        ("global_local", {"global_tokens": 1, "window": 1}, (8 + 7 + 7) / 64),  # 1 global block + diagonal
        ("strided", {"stride": 24}, (8 + 2 * 7 + 2 * 6 + 2 * 5 + 2 * 2) / 64),  # |i - j| < 3, or 3 or 6 apart
    ],
)
def test_density(name, options, density):
    pattern = build_pattern(name, **options)
    assert isinstance(pattern, Pattern)
    assert pattern.density(64, 8) == pytest.approx(density)
    assert "density" in pattern.describe()


def test_global_blocks_never_round_down_to_zero():
    layout = build_pattern("global_local", global_tokens=3, window=1).layout(64, 16)
    assert layout[0, 0].all() and layout[0, :, 0].all()  # 3 tokens -> one whole global block
    assert not layout[0, 1, 2:].any()


def test_random_is_reproducible_and_seeded():
    a = build_pattern("random", density=0.25, seed=5).layout(1000, 10)
    b = build_pattern("random", density=0.25, seed=5).layout(1000, 10)
    c = build_pattern("random", density=0.25, seed=6).layout(1000, 10)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.diagonal(dim1=1, dim2=2).all()
    assert abs(a.float().mean().item() - 0.25) < 0.03
    per_head = build_pattern("random", density=0.5, per_head=True).layout(64, 8, num_heads=3)
    assert per_head.shape == (3, 8, 8) and not torch.equal(per_head[0], per_head[1])


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("local_window", {"window": -1}, "window must be a positive int, got -1"),
        ("local_window", {"window": 8, "sliding": "yes"}, "sliding must be a bool"),
        ("dilated_sparse", {"dilation": 0}, "dilation must be a positive int, got 0"),
        ("random", {"density": 0.0}, r"density must be a float in \(0, 1\]"),
        ("random", {"density": 0.5, "seed": -2}, "seed must be a non-negative int"),
        ("strided", {"stride": 2.5}, "stride must be a positive int, got 2.5"),
        ("global_local", {"global_tokens": 2}, r"needs option\(s\) \['window'\]"),
    ],
)
def test_options_are_validated(name, options, match):
    with pytest.raises(ValueError, match=match):
        build_pattern(name, **options)


class Diagonal(Pattern):
    name = "diagonal_only"

    def layout(self, seq_len, block_size, num_heads=1):
        nb = -(-seq_len // block_size)
        return torch.eye(nb, dtype=torch.bool)[None]

    def describe(self):
        return "the diagonal blocks; density 1/nb"


def test_other_packages_register_patterns(fresh_registry):
    class Plugin:
        @hookimpl
        def register_patterns(self, register):
            register("diagonal_only", Diagonal)

    fresh_registry().register_plugin(Plugin(), "diagonal-plugin")
    attn = BlockSparseRingDilatedAttention([16], [1], block_size=4, pattern="diagonal_only")
    q, k, v = (torch.randn(1, 16, 2, 4, dtype=torch.float64) for _ in range(3))
    expected = reference_attention(
        q,
        k,
        v,
        segment_lengths=[16],
        dilation_rates=[1],
        block_layout=torch.eye(4, dtype=torch.bool)[None],
        block_size=4,
    )
    torch.testing.assert_close(attn(q, k, v), expected, rtol=1e-12, atol=1e-12)


def _run_cli(argv):
    parser = argparse.ArgumentParser()
    add_pattern_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_prints_and_draws(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "pattern.png"
    argv = ["pattern", "local_window", "--seq-len", "64", "--block-size", "8", "-o", "window=16"]
    argv += ["--segment-lengths", "8", "32", "--dilation-rates", "1", "2", "--causal", "--out", str(out)]
    assert _run_cli(argv) == 0
    text = capsys.readouterr().out
    assert "block density 0.2500" in text and "combined with dilation/causality" in text
    assert "##......" in text  # first row of the 8x8 block picture
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_unknown_options():
    with pytest.raises(ValueError, match=r"got unknown option\(s\) \['width'\]"):
        _run_cli(["pattern", "local_window", "--seq-len", "64", "-o", "width=3"])
