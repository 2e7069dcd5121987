"""Block layouts and the named patterns that build them (SPEC.md, "Block-sparse attention").

A block layout of block size ``b`` is a bool tensor ``(H or 1, ceil(N/b), ceil(N/b))``:
query ``t`` of head ``h`` may see key ``s`` iff ``layout[h, t // b, s // b]``. A
pattern only builds the layout; what the attention computes is fixed by SPEC.md.

Patterns are registered through the ``register_patterns(register)`` hook as
``register(name, builder)``, where ``builder(**options)`` validates its options and
returns a :class:`Pattern`. Other packages add their own the same way.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch


def num_blocks(seq_len: int, block_size: int) -> int:
    """``ceil(seq_len / block_size)``."""
    return -(-seq_len // block_size)


def _positive_int(pattern: str, option: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"pattern {pattern!r}: {option} must be a positive int, got {value!r}")
    return value


class Pattern(ABC):
    """A named rule that builds a block layout for a sequence length, block size and head count."""

    name: ClassVar[str] = "pattern"

    @abstractmethod
    def layout(self, seq_len: int, block_size: int, num_heads: int = 1) -> torch.Tensor:
        """Bool ``(1 or num_heads, nb, nb)`` with ``nb = ceil(seq_len / block_size)``."""

    @abstractmethod
    def describe(self) -> str:
        """One line: the rule and its approximate density."""

    def density(self, seq_len: int, block_size: int, num_heads: int = 1) -> float:
        """The exact fraction of allowed (query block, key block) pairs."""
        return self.layout(seq_len, block_size, num_heads).float().mean().item()

    def __repr__(self) -> str:
        return f"<{self.name}: {self.describe()}>"


def _block_distance(nb: int) -> torch.Tensor:
    i = torch.arange(nb)
    return i[:, None] - i[None, :]


class LocalWindow(Pattern):
    """Attention inside windows of ``window`` tokens.

    Default: non-overlapping windows (block-diagonal; ``window`` a multiple of the block
    size), density ``~ window / N``. With ``sliding=True``: a band, key block ``j`` is
    allowed for query block ``i`` iff ``|i - j| * block_size < window``, density
    ``~ (2 * window / block_size - 1) * block_size / N``.
    """

    name = "local_window"

    def __init__(self, window: int, sliding: bool = False) -> None:
        self.window = _positive_int(self.name, "window", window)
        if not isinstance(sliding, bool):
            raise ValueError(f"pattern {self.name!r}: sliding must be a bool, got {sliding!r}")
        self.sliding = sliding

    def layout(self, seq_len: int, block_size: int, num_heads: int = 1) -> torch.Tensor:
        nb = num_blocks(seq_len, block_size)
        if self.sliding:
            return (_block_distance(nb).abs() * block_size < self.window)[None]
        if self.window % block_size != 0:
            raise ValueError(
                f"pattern {self.name!r}: window must be a multiple of block_size for non-sliding windows, "
                f"got window={self.window}, block_size={block_size}"
            )
        window_of = torch.arange(nb) // (self.window // block_size)
        return (window_of[:, None] == window_of[None, :])[None]

    def describe(self) -> str:
        kind = "sliding band" if self.sliding else "non-overlapping windows"
        return f"{kind} of {self.window} tokens; density ~ {'2*' if self.sliding else ''}{self.window}/N"


class DilatedSparse(Pattern):
    """Every ``dilation``-th key block: ``(i - j) % dilation == 0`` (and ``|i - j| * b < window`` if given).

    Density ``~ 1 / dilation`` (less with a window).
    """

    name = "dilated_sparse"

    def __init__(self, dilation: int, window: int | None = None) -> None:
        self.dilation = _positive_int(self.name, "dilation", dilation)
        self.window = None if window is None else _positive_int(self.name, "window", window)

    def layout(self, seq_len: int, block_size: int, num_heads: int = 1) -> torch.Tensor:
        distance = _block_distance(num_blocks(seq_len, block_size))
        allowed = distance % self.dilation == 0
        if self.window is not None:
            allowed &= distance.abs() * block_size < self.window
        return allowed[None]

    def describe(self) -> str:
        window = f" within {self.window} tokens" if self.window else ""
        return f"every {self.dilation}-th key block{window}; density ~ 1/{self.dilation}"


class GlobalLocal(Pattern):
    """Global tokens see and are seen by everything, plus a sliding local band.

    The first ``ceil(global_tokens / block_size)`` blocks are global (never rounded down
    to zero); key block ``j`` is local to ``i`` iff ``|i - j| * block_size < window``.
    Density ``~ 2 * g / nb + 2 * window / N``.
    """

    name = "global_local"

    def __init__(self, global_tokens: int, window: int) -> None:
        self.global_tokens = _positive_int(self.name, "global_tokens", global_tokens)
        self.window = _positive_int(self.name, "window", window)

    def global_blocks(self, block_size: int) -> int:
        return math.ceil(self.global_tokens / block_size)

    def layout(self, seq_len: int, block_size: int, num_heads: int = 1) -> torch.Tensor:
        nb = num_blocks(seq_len, block_size)
        g = self.global_blocks(block_size)
        allowed = _block_distance(nb).abs() * block_size < self.window
        allowed[:g, :] = True
        allowed[:, :g] = True
        return allowed[None]

    def describe(self) -> str:
        return (
            f"{self.global_tokens} global tokens (rounded up to whole blocks) + sliding band of "
            f"{self.window} tokens; density ~ 2*g/nb + 2*{self.window}/N"
        )


class Random(Pattern):
    """Random key blocks at a given density, the same layout on every rank and every run.

    Drawn from a CPU generator seeded with ``seed`` (never the global RNG), so every rank
    builds the same layout without talking. With ``exact=True`` (the default) the layout
    holds exactly ``T = round(density * nb * nb)`` allowed blocks (``nb = ceil(N / b)``),
    spread over the query-block rows as evenly as possible (row ``i`` gets
    ``(i + 1) * T // nb - i * T // nb`` blocks: ``floor`` or ``ceil`` of ``density * nb``),
    so :meth:`density` is ``T / nb**2``, within ``0.5 / nb**2`` of ``density``. With
    ``include_diagonal`` (default) each row's diagonal block is one of its blocks (at
    least one per row, so no row is empty; this raises the density only when
    ``density * nb < 1``). With ``exact=False`` each pair is allowed independently with
    probability ``density`` (plus the diagonal): the density is only approximate.
    ``per_head`` draws one layout per head.
    """

    name = "random"

    def __init__(
        self,
        density: float,
        seed: int = 0,
        include_diagonal: bool = True,
        per_head: bool = False,
        exact: bool = True,
    ) -> None:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
            raise ValueError(f"pattern {self.name!r}: density must be a float in (0, 1], got {density!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"pattern {self.name!r}: seed must be a non-negative int, got {seed!r}")
        for option, value in (("include_diagonal", include_diagonal), ("per_head", per_head), ("exact", exact)):
            if not isinstance(value, bool):
                raise ValueError(f"pattern {self.name!r}: {option} must be a bool, got {value!r}")
        self.target = float(density)
        self.seed = seed
        self.include_diagonal = include_diagonal
        self.per_head = per_head
        self.exact = exact

    def row_counts(self, nb: int) -> torch.Tensor:
        """Allowed key blocks per query-block row (``exact=True``): ``(nb,)`` int64, summing to
        ``round(density * nb**2)`` (or more where the diagonal lifts an empty row to one)."""
        total = math.floor(self.target * nb * nb + 0.5)
        i = torch.arange(nb + 1, dtype=torch.int64)
        counts = torch.diff(i * total // nb)
        return counts.clamp(min=1) if self.include_diagonal else counts

    def layout(self, seq_len: int, block_size: int, num_heads: int = 1) -> torch.Tensor:
        nb = num_blocks(seq_len, block_size)
        generator = torch.Generator().manual_seed(self.seed)
        heads = num_heads if self.per_head else 1
        scores = torch.rand(heads, nb, nb, generator=generator, dtype=torch.float32)  # (not the default dtype's draw)
        eye = torch.eye(nb, dtype=torch.bool)
        if not self.exact:
            allowed = scores < self.target
            return allowed | eye if self.include_diagonal else allowed
        if self.include_diagonal:
            scores = scores.masked_fill(eye, -1.0)  # ranked first in its row
        # rank of each key block in its row (stable: ties broken by index, so exactly k per row)
        order = torch.argsort(scores, dim=-1, stable=True)
        keep = (torch.arange(nb)[None, :] < self.row_counts(nb)[:, None]).expand(heads, nb, nb)
        return torch.zeros(heads, nb, nb, dtype=torch.bool).scatter_(-1, order, keep)

    def describe(self) -> str:
        if self.exact:
            return (
                f"random blocks, exactly round({self.target} * nb^2) of them, rows balanced (seed {self.seed}); "
                f"density = {self.target} to within 0.5/nb^2"
            )
        return f"random blocks with probability {self.target} (seed {self.seed}); density ~ {self.target}"


class Strided(Pattern):
    """Sparse Transformer's strided pattern in blocks: a local band plus every ``stride``-th block back.

    With ``s = stride / block_size`` blocks: ``|i - j| < s`` or ``(i - j) % s == 0``.
    ``stride`` must be a multiple of the block size. Density ``~ (2 * s - 1) / nb + 1 / s``.
    """

    name = "strided"

    def __init__(self, stride: int) -> None:
        self.stride = _positive_int(self.name, "stride", stride)

    def layout(self, seq_len: int, block_size: int, num_heads: int = 1) -> torch.Tensor:
        if self.stride % block_size != 0:
            raise ValueError(
                f"pattern {self.name!r}: stride must be a multiple of block_size, "
                f"got stride={self.stride}, block_size={block_size}"
            )
        s = self.stride // block_size
        distance = _block_distance(num_blocks(seq_len, block_size))
        return ((distance.abs() < s) | (distance % s == 0))[None]

    def describe(self) -> str:
        return f"local band of {self.stride} tokens + every {self.stride}-th token block; density ~ 1/stride_blocks"


BUILTIN_PATTERNS: dict[str, type[Pattern]] = {
    cls.name: cls for cls in (LocalWindow, DilatedSparse, GlobalLocal, Random, Strided)
}


def registered_patterns() -> dict[str, Any]:
    """Every pattern builder registered through ``register_patterns``, by name."""
    from ring_core.plugin import get_registry

    return dict(get_registry().patterns)


def build_pattern(name: str, **options: Any) -> Pattern:
    """The registered pattern ``name`` built with ``options`` (validated; clear errors)."""
    builders = registered_patterns()
    if name not in builders:
        raise ValueError(f"unknown block-sparse pattern {name!r}; registered patterns: {sorted(builders)}")
    builder = builders[name]
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):  # a builtin or C callable: let it validate
        signature = None
    if signature is not None and not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        valid = [p for p in signature.parameters if p != "self"]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"pattern {name!r} got unknown option(s) {unknown}; valid options: {valid}")
        missing = [
            p.name
            for p in signature.parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in options
        ]
        if missing:
            raise ValueError(f"pattern {name!r} needs option(s) {missing}; valid options: {valid}")
    pattern = builder(**options)
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern builder {name!r} must return a ring_blocksparse.Pattern, got {pattern!r}")
    return pattern


def check_block_layout(layout: Any, seq_len: int, block_size: int, num_heads: int) -> torch.Tensor:
    """Validate a block layout against the sequence; returns it (bool, 3-D)."""
    nb = num_blocks(seq_len, block_size)
    if not isinstance(layout, torch.Tensor) or layout.dtype != torch.bool:
        got = str(layout.dtype) if isinstance(layout, torch.Tensor) else type(layout).__name__
        raise TypeError(f"block_layout must be a bool tensor (H or 1, {nb}, {nb}), got {got}")
    if layout.dim() != 3 or layout.shape[0] not in (1, num_heads) or tuple(layout.shape[1:]) != (nb, nb):
        raise ValueError(
            f"block_layout must have shape (1 or H={num_heads}, ceil(N/block_size), ceil(N/block_size)) = "
            f"(1 or {num_heads}, {nb}, {nb}) for N={seq_len}, block_size={block_size}; got {tuple(layout.shape)}"
        )
    return layout


def check_block_size(block_size: Any) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return block_size
