"""``ring-attention pattern NAME --seq-len N [--out pattern.png]``: see what a layout attends to.

Prints the pattern's rule, its block density and a text picture of the block layout;
with ``--segment-lengths`` / ``--dilation-rates`` also the token-level combination with
the dilated branches (a key must be allowed by both). ``--out`` draws both as a PNG.
The plugin registers it (``register_commands``): ring-core's CLI knows no plugin.
"""

from __future__ import annotations

import argparse
import ast
from collections.abc import Sequence
from typing import Any

import torch

from ring_core.plugin import UsageError, check_dilated_config, check_output, positive_int

from .patterns import build_pattern, num_blocks, registered_patterns

MAX_TOKENS_FOR_COMBINATION = 8192


def _option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"pattern options are KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def add_pattern_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``pattern`` subcommand to an ``argparse`` subparsers object."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "pattern", help="draw a block-sparse pattern (and its combination with dilation)"
    )
    parser.add_argument("name", help="a registered pattern: " + ", ".join(sorted(registered_patterns())))
    parser.add_argument("--seq-len", type=positive_int, required=True)
    parser.add_argument("--block-size", type=positive_int, default=64)
    parser.add_argument("--heads", type=positive_int, default=1)
    parser.add_argument("--head", type=int, default=0, help="the head to draw")
    parser.add_argument("--segment-lengths", nargs="+", type=int, help="dilated branches to combine with")
    parser.add_argument("--dilation-rates", nargs="+", type=int)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument(
        "-o",
        "--option",
        action="append",
        type=_option,
        default=[],
        metavar="KEY=VALUE",
        help="a pattern option, e.g. -o window=512 (repeat for several)",
    )
    parser.add_argument("--out", help="write a PNG (needs matplotlib)")
    parser.set_defaults(func=pattern_command)
    return parser


def text_picture(grid: torch.Tensor, max_cells: int = 64) -> str:
    """A bool matrix as text (``#`` allowed, ``.`` not), pooled (any) to at most ``max_cells`` a side."""
    n = grid.shape[-1]
    step = -(-n // max_cells)
    if step > 1:
        pad = step * -(-n // step) - n
        grid = torch.nn.functional.pad(grid.float()[None, None], (0, pad, 0, pad))
        grid = torch.nn.functional.max_pool2d(grid, step)[0, 0].bool()
    return "\n".join("".join("#" if x else "." for x in row.tolist()) for row in grid)


def combined_mask(
    layout: torch.Tensor,
    seq_len: int,
    block_size: int,
    head: int,
    segment_lengths: Sequence[int] | None,
    dilation_rates: Sequence[int] | None,
    causal: bool,
) -> torch.Tensor:
    """Token-level ``(N, N)`` bool: key allowed by the dilated branches, the layout and causality."""
    from ring_core.plugin import branch_counts

    blocks = torch.arange(seq_len) // block_size
    layout_head = layout[head if layout.shape[0] > 1 else 0]
    allowed = layout_head[blocks][:, blocks]
    if segment_lengths:
        assert dilation_rates is not None  # (given together)
        allowed &= branch_counts(seq_len, head + 1, segment_lengths, dilation_rates)[head] > 0
    if causal:
        allowed &= torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    return allowed


def pattern_command(args: argparse.Namespace) -> int:
    """Print (and with ``--out`` draw) the layout of ``args.name``; returns an exit code.

    Bad arguments raise :class:`ring_core.cli.UsageError` before anything is drawn (one line, exit code 2).
    """
    if not 0 <= args.head < args.heads:
        raise UsageError(f"--head must be in [0, {args.heads}), got {args.head}")
    if bool(args.segment_lengths) != bool(args.dilation_rates):
        raise UsageError("give --segment-lengths and --dilation-rates together")
    check_output("--out", args.out, plot=True)
    try:
        if args.segment_lengths:
            check_dilated_config(args.segment_lengths, args.dilation_rates)
        pattern = build_pattern(args.name, **dict(args.option))
        layout = pattern.layout(args.seq_len, args.block_size, args.heads)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    nb = num_blocks(args.seq_len, args.block_size)
    head_layout = layout[args.head if layout.shape[0] > 1 else 0]
    print(f"{args.name}: {pattern.describe()}")
    print(
        f"N={args.seq_len}, block_size={args.block_size}: {nb}x{nb} blocks, "
        f"block density {head_layout.float().mean().item():.4f} (head {args.head})"
    )
    print(text_picture(head_layout))
    combined = None
    if args.segment_lengths or args.causal:
        if args.seq_len > MAX_TOKENS_FOR_COMBINATION:
            print(f"(token-level combination drawn only for N <= {MAX_TOKENS_FOR_COMBINATION})")
        else:
            combined = combined_mask(
                layout, args.seq_len, args.block_size, args.head, args.segment_lengths, args.dilation_rates, args.causal
            )
            print(f"combined with dilation/causality: token density {combined.float().mean().item():.4f}")
            print(text_picture(combined))
    if args.out:
        _draw(args, head_layout, combined)
        print(f"wrote {args.out}")
    return 0


def _draw(args: argparse.Namespace, head_layout: torch.Tensor, combined: torch.Tensor | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("block layout", head_layout)]
    if combined is not None:
        panels.append(("with dilated branches" if args.segment_lengths else "causal", combined))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), squeeze=False)
    for ax, (title, grid) in zip(axes[0], panels):
        ax.imshow(grid.numpy(), cmap="Greys", interpolation="nearest")
        ax.set_title(f"{title} (density {grid.float().mean().item():.3f})")
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.suptitle(f"{args.name} {dict(args.option)}, N={args.seq_len}, block {args.block_size}, head {args.head}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
