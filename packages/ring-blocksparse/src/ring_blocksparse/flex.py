"""The FlexAttention path: one fused block-sparse kernel on one GPU.

When the dilated configuration is expressible at block level (one branch of rate 1
whose segments are whole blocks, ``merge="lse"``), the allowed keys are exactly a block
layout (plus the causal triangle on diagonal blocks), so PyTorch's FlexAttention runs it
from a ``BlockMask`` built directly from the layout (no ``mask_mod`` evaluated over
``N^2`` points): fully allowed blocks are "full" blocks, causal diagonal blocks are
partial with a causal ``mask_mod``. Measured on an H200 (tools/bench/blocksparse.py)
this is several times faster than gathering tiles into dense blocks, so ``method="auto"``
picks it on CUDA with one process. Everything else (dilation, padding, dropout, the
ring) takes the gather path.

Kernel options (``flex_attention(kernel_options=...)``): the block mask says which flags
are safe (:func:`safe_flags`: ``ROWS_GUARANTEED_SAFE`` when every query row has an allowed
key, ``BLOCKS_ARE_CONTIGUOUS`` when every row's and column's blocks are one run, e.g. a
band), :data:`TUNED_OPTIONS` holds tile shapes measured on Hopper, and the caller's
``kernel_options`` override both.
"""

from __future__ import annotations

from typing import Any

import torch

FLEX_BLOCK = 128  # the BlockMask granularity used on CUDA
_COMPILED: dict[str, Any] = {}

# Tile shapes and pipelining for the fused kernels, by (compute capability major, dtype, head dim);
# missing entries keep FlexAttention's own defaults. Hopper, bf16, D=128 (H200, torch 2.11, N=64K,
# H=16, density 0.1; tools/bench/blocksparse.py --sweep, docs/benchmarks/blocksparse-sweep-h200.json):
# forward tiles of 128x128 (8 warps, 3 stages) beat the default 128x64 (8.0 vs 8.1 ms local band,
# 8.4 vs 8.9 ms random); every backward tiling tried was slower than the default (64/128/128/64).
# USE_TMA gained about 1% more and is experimental: pass it through flex_kernel_options.
TUNED_OPTIONS: dict[tuple[int, torch.dtype, int], dict[str, Any]] = {
    (9, torch.bfloat16, 128): {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 3},
}
# Options whose value is a bool / a positive int (anything else is passed through unchecked).
_BOOL_OPTIONS = ("PRESCALE_QK", "ROWS_GUARANTEED_SAFE", "BLOCKS_ARE_CONTIGUOUS", "WRITE_DQ", "USE_TMA")


def _flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def flex_reasons(
    q: torch.Tensor,
    *,
    world_size: int,
    segment_lengths,
    dilation_rates,
    merge: str,
    block_size: int,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
    needs_grad: bool = False,
) -> list[str]:
    """Why the FlexAttention path cannot run this call (empty: it can)."""
    reasons = []
    try:
        _flex_attention()
    except ImportError:
        reasons.append(f"this torch ({torch.__version__}) has no FlexAttention")
    seq_len = q.shape[1]
    if world_size > 1:
        reasons.append(f"sequence parallel over {world_size} ranks (the ring gathers tiles)")
    if dropout_p > 0:
        reasons.append("dropout")
    if key_padding_mask is not None:
        reasons.append("key_padding_mask")
    if len(segment_lengths) != 1 or dilation_rates[0] != 1:
        reasons.append(
            f"dilated branches {list(segment_lengths)} / {list(dilation_rates)} (needs one branch of rate 1)"
        )
    elif segment_lengths[0] < seq_len and segment_lengths[0] % block_size != 0:
        reasons.append(f"segment length {segment_lengths[0]} is not a multiple of block_size {block_size}")
    granularity = flex_granularity(q.device, block_size)
    if granularity is None:
        reasons.append(f"block_size {block_size} is not a multiple of {FLEX_BLOCK} on {q.device.type}")
    elif seq_len % granularity != 0:
        reasons.append(f"N={seq_len} is not a multiple of {granularity}")
    if q.device.type == "cuda" and q.dtype == torch.float64:
        reasons.append("float64 on CUDA")
    if q.device.type != "cuda" and needs_grad:
        reasons.append(f"FlexAttention has no backward on {q.device.type}")
    return reasons


def flex_granularity(device: torch.device, block_size: int) -> int | None:
    """The BlockMask block size: 128 on CUDA (the fused kernel's tile), the layout's own elsewhere."""
    if device.type != "cuda":
        return block_size
    return FLEX_BLOCK if block_size % FLEX_BLOCK == 0 else None


def build_block_mask(
    layout: torch.Tensor | None,
    *,
    seq_len: int,
    num_heads: int,
    block_size: int,
    segment: int,
    causal: bool,
    device: torch.device,
):
    """A ``BlockMask`` allowing exactly ``layout`` (and same-segment, and causal) blocks."""
    from torch.nn.attention.flex_attention import BlockMask

    granularity = flex_granularity(device, block_size)
    nb = seq_len // granularity
    if layout is None:
        allowed = torch.ones(1, nb, nb, dtype=torch.bool)
    else:
        repeat = block_size // granularity
        allowed = layout.cpu().repeat_interleave(repeat, 1).repeat_interleave(repeat, 2)[:, :nb, :nb]
    if segment < seq_len:
        seg = torch.arange(nb) * granularity // segment
        allowed = allowed & (seg[:, None] == seg[None, :])
    index = torch.arange(nb)
    full, partial = allowed, torch.zeros_like(allowed)
    if causal:
        full = allowed & (index[None, :] < index[:, None])
        partial = allowed & (index[None, :] == index[:, None])

    def blocks(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = mask.sum(-1, dtype=torch.int32)
        indices = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts[None].to(device), indices[None].to(device)

    kv_num, kv_index = blocks(partial)
    full_num, full_index = blocks(full)
    flags = safe_flags(full, partial)
    if device.type == "cuda":
        # the fused kernel visits only the listed blocks and skips mask_mod on full ones: the
        # partial blocks are whole allowed diagonal blocks, so causality is all that is left.
        # Module-level functions keep one compiled kernel for every layout (no recompiles).
        mask_mod = _causal if causal else None
    else:
        mask_mod = _token_mask(allowed, granularity, causal)
    block_mask = BlockMask.from_kv_blocks(
        kv_num,
        kv_index,
        full_num,
        full_index,
        BLOCK_SIZE=granularity,
        mask_mod=mask_mod,
        seq_lengths=(seq_len, seq_len),
    )
    return block_mask, flags


def _one_run(mask: torch.Tensor) -> bool:
    """Whether the True entries of every row of ``mask`` (..., n, m) form at most one run."""
    starts = mask.clone()
    starts[..., 1:] &= ~mask[..., :-1]
    return bool((starts.sum(-1) <= 1).all())


def safe_flags(full: torch.Tensor, partial: torch.Tensor) -> dict[str, bool]:
    """The FlexAttention flags this block mask makes safe (``full``/``partial``: bool (H, nq, nk)).

    ``ROWS_GUARANTEED_SAFE``: every query row has a key (a partial block here is a causal
    diagonal block, which always holds the query itself). ``BLOCKS_ARE_CONTIGUOUS``: the
    kernels step to the next block without reading the index list, so every row's full
    and partial blocks, and every column's (the backward walks columns), must be one run each.
    """
    rows_safe = bool((full | partial).any(-1).all())
    contiguous = all(_one_run(m) and _one_run(m.transpose(-1, -2)) for m in (full, partial))
    return {"ROWS_GUARANTEED_SAFE": rows_safe, "BLOCKS_ARE_CONTIGUOUS": contiguous}


def check_kernel_options(options: Any) -> dict[str, Any]:
    """Validate user ``kernel_options`` (a dict of FlexAttention options; ``fwd_``/``bwd_`` prefixes allowed)."""
    if options is None:
        return {}
    if not isinstance(options, dict) or not all(isinstance(key, str) for key in options):
        raise TypeError(f"kernel_options must be a dict of FlexAttention option names to values, got {options!r}")
    for key, value in options.items():
        base = key.removeprefix("fwd_").removeprefix("bwd_")
        if base in _BOOL_OPTIONS and not isinstance(value, bool):
            raise ValueError(f"kernel_options[{key!r}] must be a bool, got {value!r}")
        if (base.startswith("BLOCK_") or base in ("num_warps", "num_stages")) and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"kernel_options[{key!r}] must be a positive int, got {value!r}")
        if base.startswith("BLOCK_") and (value & (value - 1) or FLEX_BLOCK % value):
            raise ValueError(f"kernel_options[{key!r}] must be a power of two dividing {FLEX_BLOCK}, got {value}")
    return dict(options)


def kernel_options_for(q: torch.Tensor, flags: dict[str, bool], user: dict[str, Any] | None) -> dict[str, Any] | None:
    """What to pass as ``kernel_options``: safe flags, then tuned tiles for this GPU, then ``user``."""
    if q.device.type != "cuda":
        return None  # the eager (CPU) path takes none
    major = torch.cuda.get_device_capability(q.device)[0]
    options = {key: True for key, on in flags.items() if on}
    options.update(TUNED_OPTIONS.get((major, q.dtype, q.shape[-1]), {}))
    options.update(user or {})
    return options or None


def _causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def _token_mask(allowed: torch.Tensor, granularity: int, causal: bool):
    """The layout as a token-level ``mask_mod`` (the eager path evaluates it on every score)."""
    per_head = allowed.shape[0] > 1

    def mask_mod(b, h, q_idx, kv_idx):
        ok = allowed[h if per_head else 0, q_idx // granularity, kv_idx // granularity]
        return ok & (kv_idx <= q_idx) if causal else ok

    return mask_mod


def flex_block_sparse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask,
    *,
    scale: float,
    kernel_options: dict[str, Any] | None = None,
) -> torch.Tensor:
    """``(B, N, H, D)`` block-sparse attention through FlexAttention (compiled once on CUDA)."""
    flex = _flex_attention()
    if q.device.type == "cuda":
        if "cuda" not in _COMPILED:
            _COMPILED["cuda"] = torch.compile(flex, dynamic=False)
        flex = _COMPILED["cuda"]
    out = flex(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, scale=scale,
        enable_gqa=k.shape[2] != q.shape[2], kernel_options=kernel_options,
    )  # fmt: skip
    return out.transpose(1, 2)
