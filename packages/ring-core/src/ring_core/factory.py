"""``create_attention`` / ``create_multihead_attention``: names to modules.

A name may be canonical (``ring_dilated``), a class name (``RingDilatedAttention``)
or a deprecated alias (warns). ``"auto"`` picks the best available implementation
for the device and the current process group.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

import torch
from torch import nn

from .deprecation import warn_deprecated
from .registry import Implementation, get_registry, list_implementations

__all__ = [
    "KNOWN_PROVIDERS",
    "UnknownImplementationError",
    "create_attention",
    "create_multihead_attention",
    "explain_auto",
    "resolve_implementation",
]

# Names provided by sibling packages, so a missing one says what to install.
KNOWN_PROVIDERS: dict[str, tuple[str, str]] = {
    # name -> (distribution, extra of ring-core)
    "ring_dilated_flash": ("ring-flash", "flash"),
    "RingDilatedAttentionFlash": ("ring-flash", "flash"),
    "RingDilatedAttentionV2Flash": ("ring-flash", "flash"),
    "ring_distributed_dilated": ("ring-distributed", "distributed"),
    "RingDistributedDilatedAttention": ("ring-distributed", "distributed"),
    "ring_dilated_production": ("ring-distributed", "distributed"),
    "RingDilatedAttentionProduction": ("ring-distributed", "distributed"),
    "block_sparse_ring_dilated": ("ring-blocksparse", "blocksparse"),
    "BlockSparseRingDilatedAttention": ("ring-blocksparse", "blocksparse"),
    "multihead_dilated": ("ring-multihead", "multihead"),
    "MultiheadDilatedAttention": ("ring-multihead", "multihead"),
    "ring_multihead_dilated": ("ring-multihead", "multihead"),
    "RingMultiheadDilatedAttention": ("ring-multihead", "multihead"),
}


def install_hint(dist: str, extra: str) -> str:
    """How to install a sibling package, by each route of the installation guide that works today."""
    return (
        f"From a checkout: pip install ./packages/{dist}; from a wheelhouse built by `nox -s build`: "
        f'pip install --find-links wheelhouse "ring-core[{extra}]"; from an index, once published: '
        f'pip install "ring-core[{extra}]"'
    )


class UnknownImplementationError(KeyError):
    """A name that no installed plugin registers."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


def resolve_implementation(name: str, kind: str = "attention") -> Implementation:
    """Find an implementation by canonical name, class name or deprecated alias (which warns)."""
    if not isinstance(name, str):
        raise TypeError(f"the implementation name must be a str (a registered name, or 'auto'), got {name!r}")
    implementations = list_implementations(kind)
    for impl in implementations:
        if name in (impl.name, impl.cls.__name__):
            return impl
    for impl in implementations:
        if name in impl.aliases:
            warn_deprecated(name, impl.cls.__name__, impl.aliases[name], impl.package, stacklevel=4)
            return impl
    other_kind = [i for i in list_implementations() if name in (i.name, i.cls.__name__, *i.aliases)]
    if other_kind:
        factory = "create_multihead_attention" if other_kind[0].kind == "multihead" else "create_attention"
        raise UnknownImplementationError(f"{name!r} is a {other_kind[0].kind} implementation: use {factory}()")
    if name in KNOWN_PROVIDERS:
        dist, extra = KNOWN_PROVIDERS[name]
        for plugin in get_registry().disabled:
            if plugin.package == dist:
                raise UnknownImplementationError(
                    f"{name!r} is provided by {dist} (plugin {plugin.name!r}), which is installed but {plugin.error}"
                )
        raise UnknownImplementationError(
            f"{name!r} is provided by {dist}, which is not installed. {install_hint(dist, extra)}"
        )
    known = sorted({n for i in implementations for n in (i.name, i.cls.__name__)})
    close = difflib.get_close_matches(name, known + list(KNOWN_PROVIDERS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownImplementationError(f"unknown {kind} implementation {name!r}.{hint} Known: {', '.join(known)}")


def _current_world_size(process_group: Any = None) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def explain_auto(
    kind: str = "attention",
    device: str | torch.device | None = None,
    world_size: int | None = None,
    *,
    sequence_parallel: bool = False,
) -> tuple[Implementation, list[str]]:
    """The implementation ``"auto"`` picks, and one line per candidate saying why (not).

    ``"auto"`` shards the sequence only when asked (``sequence_parallel``: a ``process_group`` was
    given), over ``world_size`` ranks (default: the process group's). Otherwise it never picks
    a sequence-parallel implementation while a process group of several ranks exists: under
    plain data parallelism (DDP) each rank's samples are its own, and attending across ranks
    would mix them.
    """
    device_type = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    world_size = _current_world_size() if world_size is None else world_size
    lines, candidates = [], []
    for impl in list_implementations(kind):
        reasons = impl.reasons
        if device_type not in impl.devices:
            reasons.append(f"does not run on {device_type}")
        if sequence_parallel and world_size > 1 and not impl.distributed:
            reasons.append(f"not sequence-parallel (world size {world_size})")
        if not sequence_parallel and world_size > 1 and impl.distributed:
            reasons.append(
                f"would shard the sequence over the {world_size} ranks of the default process group: pass "
                f"process_group= (or its name) to ask for sequence parallelism"
            )
        lines.append(f"{impl.name}: " + ("; ".join(reasons) if reasons else f"candidate, priority {impl.priority}"))
        if not reasons:
            candidates.append(impl)
    if not candidates:
        raise UnknownImplementationError(f"no {kind} implementation is available here:\n" + "\n".join(lines))
    best = max(candidates, key=lambda i: (i.priority, i.distributed))
    lines.append(f"-> {best.name}")
    return best, lines


def _create(name: str, kind: str, config: dict[str, Any]) -> nn.Module:
    if name == "auto":
        process_group = config.get("process_group")
        impl, _ = explain_auto(
            kind, config.get("device"), _current_world_size(process_group), sequence_parallel=process_group is not None
        )
    else:
        impl = resolve_implementation(name, kind)
    reasons = impl.reasons
    if reasons:
        raise RuntimeError(f"implementation {impl.name!r} is not available here: " + "; ".join(reasons))
    if "device" in config and "device" not in inspect.signature(impl.cls).parameters:
        config = {key: value for key, value in config.items() if key != "device"}  # parameter-free: only a hint
    module: nn.Module = impl.cls(**config)
    return module


def create_attention(name: str = "auto", **config: Any) -> nn.Module:
    """Build an attention module ``attn(q, k, v, *, is_causal=False, key_padding_mask=None)`` by name.

    Args:
        name: a canonical name (``"dilated"``, ``"ring_dilated"``, ``"ring_dilated_flash"``, ...), a
            class name, a deprecated name (warns), or ``"auto"``: the best implementation available
            for ``device`` (a hint, default: CUDA when available); it shards the sequence only
            when ``process_group`` is given (:func:`explain_auto` says why).
        **config: the constructor arguments of the implementation's class. Every one takes
            ``segment_lengths`` and ``dilation_rates``; most take ``merge``, ``softmax_scale``,
            ``dropout`` and ``kernel``; the ring implementations add ``layout``, ``process_group``
            and ``transport``; each implementation has its own extras. The list per implementation,
            with types, defaults and meanings: ``ring-attention info --name NAME``,
            :func:`ring_core.describe_arguments`, or "Arguments per implementation" in the API
            reference (:mod:`ring_core.factory`).

    Returns:
        The module. It takes ``(B, N, H, D)`` tensors (this rank's shard for the ring
        implementations) and returns the same shape, dtype and device as ``q``.

    Raises:
        UnknownImplementationError: no installed plugin registers ``name`` (the message says which
            package provides it, or the closest known name).
        RuntimeError: the implementation cannot run here (the message lists why).
    """
    return _create(name, "attention", config)


def create_multihead_attention(name: str = "auto", *, embed_dim: int, num_heads: int, **config: Any) -> nn.Module:
    """Build an ``nn.MultiheadAttention`` drop-in by name (``"multihead_dilated"``, ``"ring_multihead_dilated"``).

    Args:
        name: a canonical name, a class name, a deprecated name (warns), or ``"auto"``.
        embed_dim: the model dimension, as for ``torch.nn.MultiheadAttention``.
        num_heads: the number of heads, as for ``torch.nn.MultiheadAttention``.
        **config: the other constructor arguments of the class: ``nn.MultiheadAttention``'s
            (``dropout``, ``bias``, ``batch_first``, ...) and keyword-only extras such as
            ``segment_lengths``, ``dilation_rates``, ``merge``, ``layer_norm`` (and
            ``process_group``, ``layout`` for the ring). The list per implementation:
            ``ring-attention info --name NAME`` or :func:`ring_core.describe_arguments`.

    Returns:
        The module; its ``forward`` has ``nn.MultiheadAttention.forward``'s signature and
        returns ``(attn_output, attn_weights)``.
    """
    return _create(name, "multihead", {"embed_dim": embed_dim, "num_heads": num_heads, **config})
