"""Named patterns: registration through the hook, validation, stated density, reproducibility, the CLI."""

from __future__ import annotations

import argparse
import math

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


def test_random_does_not_depend_on_the_default_dtype():
    """The same seed gives the same layout in a program that sets ``torch.set_default_dtype(torch.float64)`` (a model
    evaluated in such a program keeps the sparsity it was trained with)."""
    layouts = []
    for dtype in (torch.float32, torch.float64):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            layouts.append(build_pattern("random", density=0.3, seed=1, per_head=True).layout(256, 8, 2))
        finally:
            torch.set_default_dtype(previous)
    assert torch.equal(*layouts)


@pytest.mark.parametrize(("n", "block", "density"), [(65536, 128, 0.1), (1000, 10, 0.25), (64, 8, 0.3), (40, 3, 0.2)])
@pytest.mark.parametrize("per_head", [False, True])
def test_random_exact_density(n, block, density, per_head):
    """Exactly round(density * nb^2) blocks, rows balanced (floor or ceil of density * nb), diagonal included."""
    nb = -(-n // block)
    pattern = build_pattern("random", density=density, seed=3, per_head=per_head)
    layout = pattern.layout(n, block, num_heads=2)
    assert layout.shape == (2 if per_head else 1, nb, nb)
    rows = layout.sum(-1)
    assert (rows.sum(-1) == round(density * nb * nb)).all()
    assert rows.min() >= math.floor(density * nb) and rows.max() <= math.ceil(density * nb)
    assert layout.diagonal(dim1=1, dim2=2).all()
    assert abs(pattern.density(n, block) - density) <= 0.5 / nb**2
    if per_head:
        assert not torch.equal(layout[0], layout[1])


def test_random_exact_tiny_density_keeps_the_diagonal():
    """density * nb < 1: each row still has its diagonal block (density rises to 1/nb); without it, the total is exact."""
    layout = build_pattern("random", density=0.05, seed=1).layout(40, 3)  # nb = 14
    assert torch.equal(layout[0], torch.eye(14, dtype=torch.bool))
    sparse = build_pattern("random", density=0.01, include_diagonal=False).layout(640, 10)
    assert sparse.sum() == round(0.01 * 64 * 64) and (sparse.sum(-1) == 0).any()


def test_random_exact_is_reproducible_on_every_rank():
    """The layout depends on the seed only: not on the global RNG, not on earlier calls."""
    pattern = build_pattern("random", density=0.1, seed=11)
    torch.manual_seed(0)
    a = pattern.layout(4096, 64)
    torch.manual_seed(1)
    torch.rand(100)
    b = build_pattern("random", density=0.1, seed=11).layout(4096, 64)
    c = build_pattern("random", density=0.1, seed=12).layout(4096, 64)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # exact=False: independent draws, approximate density (the old behaviour)
    loose = build_pattern("random", density=0.25, seed=5, exact=False).layout(1000, 10)
    assert loose.sum(-1).unique().numel() > 2 and abs(loose.float().mean().item() - 0.25) < 0.03


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("random", {"density": 1.2}, r"density must be a float in \(0, 1\], got 1.2"),
        ("random", {"density": 0.5, "exact": 1}, "exact must be a bool, got 1"),
        ("random", {"density": 0.5, "include_diagonal": "no"}, "include_diagonal must be a bool"),
        ("random", {"density": 0.5, "per_head": None}, "per_head must be a bool, got None"),
        ("random", {"density": 0.5, "seed": 1.5}, "seed must be a non-negative int, got 1.5"),
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
