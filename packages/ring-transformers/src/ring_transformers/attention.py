"""``enable(model, name, **options)``: a transformers model's attention layers on a ring-attention implementation.

transformers looks each attention layer's function up by name in its
``AttentionInterface`` registry (``config._attn_implementation``). We register
one function there, :data:`ATTENTION_NAME`, and ``enable`` points the model at
it, so the model's code is untouched. The implementation name and the
``create_attention`` options are kept on every submodule of the model (an attribute,
:data:`CHOICE_ATTRIBUTE`: ``torch.compile`` guards it like any attribute), never in
the config or the state dict: ``save_pretrained`` writes both as before.

For every call, the function receives the layer's ``(B, H, N, D)`` query, key
and value, the mask the model passes and keyword arguments (``scaling``,
``dropout``, ``sliding_window``, ``position_ids``, ...). It builds (once per
``scaling`` / ``dropout`` / window) the module ``create_attention(name,
softmax_scale=scaling, dropout=dropout, **options)`` and calls it on ``(B, N, H, D)``
views: GQA goes through unchanged (every implementation takes ``H_kv`` heads),
a 2-D padding mask becomes ``key_padding_mask``, and flash-attn's ``cu_seq_lens_q`` /
``cu_seq_lens_k``, else ``position_ids`` that restart at 0, become ``cu_seqlens`` (packed
batches, :mod:`ring_transformers.packing`; in one process, several packed rows are laid
end to end into one).

Our mask function in transformers' ``AttentionMaskInterface`` (:func:`ring_attention_mask`)
builds no 4-D mask: it hands the attention the 2-D padding mask, and refuses a
model whose mask adds its own pattern (image tokens seeing each other, ...), which
an implementation's ``(is_causal, key_padding_mask, cu_seqlens, window_size)``
cannot express. Causality comes from the layer's ``is_causal``.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from ring_core import Implementation, create_attention, resolve_implementation, shard_sequence, unshard_sequence
from ring_core.plugin import tensor_version

from .packing import cu_seqlens_from_position_ids, cu_seqlens_of_starts, traced_cu_seqlens

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ATTENTION_NAME = "ring_attention"

# Set by the model from its own configuration, so not accepted as options.
MODEL_OPTIONS = {
    "softmax_scale": "the layer's scaling",
    "dropout": "config.attention_dropout (applied while the model is training)",
}


# attention layers that build their own mask from the hidden states, by the method that builds it
OWN_MASKS = {"prepare_dynamic_mask": "a dynamic mask computed from the hidden states (Doge's)"}


class RingTransformersError(ValueError):
    """A model, option or input that ring-transformers cannot run exactly."""


@dataclass(frozen=True)
class PackedMask:
    """What :func:`ring_attention_mask` hands the layers for an encoder's packed documents (transformers' bidirectional
    mask cut where ``position_ids`` do not step by 1): the documents as ``cu_seqlens`` of the rows laid end to end, built
    once per forward, and the 2-D padding mask, if any."""

    cu_seqlens: torch.Tensor
    padding: torch.Tensor | None = None


@dataclass
class Enabled:
    """What ``enable`` chose for one model: the implementation, its options, the modules built from them."""

    name: str
    options: dict[str, Any]
    previous: str | None
    distributed: bool
    modules: dict[tuple[float | None, float, tuple[int, int] | None], nn.Module] = field(default_factory=dict)
    # the documents last read on the host (:meth:`on_host`): key, (source, version) pairs, cu_seqlens
    _host: tuple[Any, tuple[tuple[Any, int | None], ...], torch.Tensor | None] | None = field(default=None, repr=False)

    def attention(self, scaling: float | None, dropout: float, window: tuple[int, int] | None) -> nn.Module:
        key = (scaling, dropout, window)
        module = self.modules.get(key)
        if module is None:
            extra = {} if window is None else {"window_size": window}
            try:
                module = create_attention(self.name, softmax_scale=scaling, dropout=dropout, **extra, **self.options)
            except TypeError as exc:
                if window is not None and "window_size" in str(exc):
                    raise RingTransformersError(
                        f"the model's layer uses sliding_window={window[0] + 1}, shorter than the sequence, and "
                        f"implementation {self.name!r} does not take window_size here ({exc}); use a model "
                        "config without a sliding window shorter than the sequence, or an implementation that takes it"
                    ) from exc
                raise
            self.modules[key] = module
        return module

    def on_host(
        self, sources: tuple[torch.Tensor, ...], key: Any, read: Callable[[], torch.Tensor | None]
    ) -> torch.Tensor | None:
        """``read()`` (documents as ``cu_seqlens``, or None) as a host tensor, read once for these very ``sources``
        (the same tensor objects, unmodified: their versions) and ``key``. Every layer of a forward is given the
        same tensors, and reading a device tensor's values waits for the device: the layers after the first then
        neither wait nor read (an implementation reads a host ``cu_seqlens`` without a sync). Without sources (none
        given, or read through a collective) or compiled (nothing is read on the host), ``read()`` as it is."""
        if not sources or torch.compiler.is_compiling():
            return read()
        versions = [tensor_version(x) for x in sources]
        last = self._host
        if (
            last is not None
            and last[0] == key
            and len(last[1]) == len(sources)
            and all(ref() is x and old == new for (ref, old), x, new in zip(last[1], sources, versions))
        ):
            return last[2]
        value = read()
        value = None if value is None else value.cpu()
        if None not in versions:  # (an inference tensor counts no versions: read every time)
            self._host = (key, tuple((weakref.ref(x), v) for x, v in zip(sources, versions)), value)
        return value

    def group_size(self) -> int:
        """Ranks sharing the sequence: the process group's size for a distributed implementation, else 1."""
        if not self.distributed or not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.options.get("process_group"))

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (``torch.save`` of the model) without the documents last read (weak references)."""
        return {**self.__dict__, "_host": None}

    def __deepcopy__(self, memo: dict[int, Any]) -> Enabled:
        """A copied model keeps the choice (the options as they are: a process group is not copied)."""
        return Enabled(self.name, copy.copy(self.options), self.previous, self.distributed)


# the attribute of every submodule of an enabled model that holds its model's choice
CHOICE_ATTRIBUTE = "_ring_transformers_choice"


def _choice(module: nn.Module) -> Enabled | None:
    choice = module.__dict__.get(CHOICE_ATTRIBUTE)
    return choice if isinstance(choice, Enabled) else None


def enable(model: nn.Module, name: str, **options: Any) -> nn.Module:
    """Run every attention layer of ``model`` with ``create_attention(name, **options)``; returns ``model``.

    ``model`` is a transformers ``PreTrainedModel`` whose attention goes through
    transformers' ``AttentionInterface`` (Llama, Mistral, Qwen2 and most decoder
    models: ``type(model)._supports_attention_backend``), or a wrapper of one with
    ``get_base_model()`` (a PEFT model: LoRA and the like). ``options`` are
    ``create_attention``'s (``segment_lengths``, ``dilation_rates``, ``process_group``,
    ``layout``, ...); the softmax scale and the attention dropout come from the
    model. Options are checked here, by building the module once: a rejected one
    raises :class:`RingTransformersError` naming it.

    With ``process_group`` (a sequence-parallel implementation), each rank feeds its
    shard of the sequence with the **global** ``position_ids`` of its tokens (see
    :func:`ring_transformers.shard_batch`).
    """
    pretrained = _check_model(model)
    implementation = _resolve(name)
    for option, source in MODEL_OPTIONS.items():
        if option in options:
            raise RingTransformersError(
                f"option {option}={options[option]!r} is set by the model ({source}); leave it out of enable()"
            )
    try:
        create_attention(implementation.name, **options)
    except (TypeError, ValueError) as exc:
        raise RingTransformersError(
            f"implementation {implementation.name!r} rejects the options {sorted(options)}: {exc}"
        ) from exc
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, ring_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, ring_attention_mask)
    enabled = _choice(model)
    previous = enabled.previous if enabled is not None else pretrained.config._attn_implementation
    choice = Enabled(implementation.name, dict(options), previous, implementation.distributed)
    for module in model.modules():
        module.__dict__[CHOICE_ATTRIBUTE] = choice
    _build_ahead(pretrained, choice)
    pretrained.set_attn_implementation(ATTENTION_NAME)
    return model


def disable(model: nn.Module) -> nn.Module:
    """Undo :func:`enable`: the model's previous attention implementation again; returns ``model``."""
    choice = _choice(model)
    if choice is None:
        raise RingTransformersError(f"{type(model).__name__} was not enabled with ring_transformers.enable")
    for module in model.modules():
        module.__dict__.pop(CHOICE_ATTRIBUTE, None)
    _check_model(model).set_attn_implementation(choice.previous or "sdpa")
    return model


def _check_model(model: nn.Module) -> PreTrainedModel:
    """``model`` (or the model a wrapper's ``get_base_model()`` returns: PEFT's) as a transformers model whose attention
    can be switched, else a clear error."""
    from transformers import PreTrainedModel

    base = getattr(model, "get_base_model", None)
    inner = base() if not isinstance(model, PreTrainedModel) and callable(base) else None
    if isinstance(inner, PreTrainedModel):
        model = inner  # (the wrapper's modules hold the base model's: enable marks them all)
    if not isinstance(model, PreTrainedModel):
        raise RingTransformersError(
            f"model must be a transformers PreTrainedModel, got {type(model).__name__}; for plain PyTorch "
            "modules use ring_core.create_attention (or ring_multihead's layers) directly"
        )
    if not getattr(type(model), "_supports_attention_backend", False):
        raise RingTransformersError(
            f"{type(model).__name__} does not compute attention through transformers' AttentionInterface "
            "(its _supports_attention_backend is False), so its attention cannot be switched; supported are "
            "models that do, e.g. Llama, Mistral, Qwen2"
        )
    for module in model.modules():
        for method, what in OWN_MASKS.items():
            if callable(getattr(module, method, None)):
                raise RingTransformersError(
                    f"{type(model).__name__}'s attention uses {what}, which ring attention cannot express"
                )
    chunk = getattr(model.config, "attention_chunk_size", None)
    if chunk is not None:
        raise RingTransformersError(
            f"{type(model).__name__} uses chunked attention (config.attention_chunk_size={chunk}), which ring "
            "attention does not compute"
        )
    return model


def _build_ahead(model: PreTrainedModel, choice: Enabled) -> None:
    """Build the modules the attention layers will ask for, so that a compiled forward only looks them up
    (building one takes the registry's lock, a graph break). A combination missed here is built on its
    first call; one that fails here fails again there, with its error."""
    config_window = getattr(model.config, "sliding_window", None)
    for layer in model.modules():
        scaling, head_dim = getattr(layer, "scaling", None), getattr(layer, "head_dim", None)
        if scaling is None and isinstance(head_dim, int):  # (ModernBERT passes its scaling without keeping it)
            scaling = head_dim**-0.5
        if not isinstance(scaling, float) or not hasattr(layer, "is_causal"):
            continue
        dropout = getattr(layer, "attention_dropout", 0.0) or 0.0
        dropout = dropout.p if isinstance(dropout, nn.Dropout) else dropout  # (ALBERT keeps the module)
        dropouts = {0.0, *([float(dropout)] if isinstance(dropout, (int, float)) else [])}
        sliding = getattr(layer, "sliding_window", None) or config_window
        windows = {None, *([(sliding - 1, sliding - 1)] if isinstance(sliding, int) and sliding > 0 else [])}
        for dropout in dropouts:
            for window in windows:
                try:
                    choice.attention(scaling, dropout, window)
                except (TypeError, ValueError):
                    pass


def _resolve(name: str) -> Implementation:
    if not isinstance(name, str) or name == "auto":
        raise RingTransformersError(f"name must be a registered attention implementation, got {name!r}")
    try:
        return resolve_implementation(name)
    except KeyError as exc:
        raise RingTransformersError(str(exc)) from exc


def ring_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``(B, H, N, D)`` in, ``((B, N, H, D), None)`` out."""
    choice = _choice(module)
    if choice is None:
        raise RingTransformersError(
            f"{type(module).__name__} runs with attn_implementation={ATTENTION_NAME!r} but its model was not "
            "enabled in this process: call ring_transformers.enable(model, name, **options)"
        )
    unsupported = {"softcap": softcap, "s_aux": kwargs.get("s_aux"), "position_bias": kwargs.get("position_bias")}
    for option, given in unsupported.items():
        if given is not None:
            raise RingTransformersError(
                f"{type(module).__name__} passes {option}, which ring attention does not compute"
            )
    if query.shape[2] != key.shape[2]:
        raise RingTransformersError(
            f"queries ({query.shape[2]}) and keys ({key.shape[2]}) differ in length: a key/value cache or "
            "cross-attention; ring attention runs whole sequences (pass use_cache=False, and generate with "
            "another attn_implementation)"
        )
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True) and getattr(getattr(module, "config", None), "is_causal", True)
    world_size = choice.group_size()
    if world_size > 1 and not is_causal:
        raise RingTransformersError(
            f"{type(module).__name__} attends both ways (an encoder): sequence parallelism runs causal language "
            "models, whose positions are checked across the ranks; an encoder's are not (RoBERTa's count from its "
            "padding index, for one), so run it on one process"
        )
    window = _window(sliding_window, query.shape[2] * world_size)
    attn = choice.attention(scaling, float(dropout), window)
    q, k, v = (x.transpose(1, 2) for x in _autocast(query, key, value))
    packed = attention_mask if isinstance(attention_mask, PackedMask) else None
    padding = _key_padding_mask(attention_mask if packed is None else packed.padding)
    given = tuple(x for x in (kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")) if isinstance(x, torch.Tensor))
    cu_seqlens = choice.on_host(
        given, ("given", world_size, q.shape[0]), lambda: _given_cu_seqlens(kwargs, world_size, q.shape[0])
    )
    if cu_seqlens is None and packed is not None:
        cu_seqlens = packed.cu_seqlens
    elif cu_seqlens is None and is_causal:  # (an encoder's documents are its mask's, as in its sdpa)
        position_ids = kwargs.get("position_ids")
        sources = (position_ids,) if isinstance(position_ids, torch.Tensor) and world_size == 1 else ()
        cu_seqlens = choice.on_host(
            sources, ("positions", q.shape[0]), lambda: _cu_seqlens(position_ids, choice, world_size, q.shape[0])
        )
    if cu_seqlens is None:
        return attn(q, k, v, is_causal=bool(is_causal), key_padding_mask=padding), None
    # packed rows (one process): the rows end to end in one, each row starting a document, which
    # is exactly attention per row (cu_seqlens takes a batch of one)
    rows, n = q.shape[:2]
    q, k, v = (x.reshape(1, rows * n, *x.shape[2:]) for x in (q, k, v))
    padding = None if padding is None else padding.reshape(1, rows * n)
    out = attn(q, k, v, is_causal=bool(is_causal), key_padding_mask=padding, cu_seqlens=cu_seqlens)
    return out.reshape(rows, n, *out.shape[2:]), None


def ring_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    use_vmap: bool = False,
    **kwargs: Any,
) -> torch.Tensor | PackedMask | None:
    """transformers' mask-interface signature: the 2-D padding mask as it is (or None); no 4-D mask is built.

    Refuses masks that the attention's arguments cannot express: extra mask functions
    (``use_vmap``: transformers' sign of an ``or``/``and`` overlay) and causal masks that
    let a query see the next key (bidirectional blocks of image tokens and the like). An encoder's
    bidirectional mask, with or without its sliding window (ModernBERT's local layers), is every key
    but padding: the window comes with the layer's ``sliding_window``, as transformers' flash-attn path takes it.
    An encoder's bidirectional mask cut into packed documents (BERT's, given ``position_ids`` and no
    ``attention_mask``) becomes a :class:`PackedMask`, its documents checked to be that mask's.
    """
    if use_vmap:
        raise RingTransformersError(
            "the model combines its causal mask with its own mask function (e.g. image tokens attending to each "
            "other), which ring attention cannot express"
        )
    from transformers.masking_utils import bidirectional_mask_function

    padding = None if attention_mask is None else attention_mask[:, -kv_length:]
    # an encoder's local layers (transformers' bidirectional masks pass allow_is_bidirectional_skip, sliding ones
    # local_size): every key of the band, padding aside
    encoder = "allow_is_bidirectional_skip" in kwargs
    band = kwargs.get("local_size") if encoder else None
    if isinstance(band, int) and mask_function is not None and kv_length == q_length:
        _check_band(mask_function, band, batch_size, q_length, q_offset, kwargs.get("device"))
    elif (
        encoder and band is None and mask_function not in (None, bidirectional_mask_function) and q_length == kv_length
    ):
        # the one composition transformers makes without use_vmap: packed documents
        starts = _documents(mask_function, batch_size, q_length, q_offset, kwargs.get("device"))
        if torch.compiler.is_compiling():
            return PackedMask(cu_seqlens_of_starts(starts, traced=True), padding)
        # on the host: the layers read the documents without waiting for the device (once here)
        return PackedMask(cu_seqlens_of_starts(starts, traced=False).cpu(), padding)
    elif (
        mask_function is not None
        and mask_function is not bidirectional_mask_function  # (an encoder's, BERT's, ...: every key, padding aside)
        and q_length > 1
        and kv_length == q_length
        and getattr(kwargs.get("config"), "is_causal", True)
    ):
        q_idx = torch.arange(q_offset, q_offset + q_length - 1, device=kwargs.get("device"))
        batch_idx = torch.arange(batch_size, device=q_idx.device)[:, None]
        _refuse(
            mask_function(batch_idx, 0, q_idx[None], q_idx[None] + 1),
            "the model's mask lets some queries see later keys in a pattern of its own (a bidirectional block of "
            "image tokens, for one), which ring attention cannot express",
        )
    return padding


def _refuse(bad: torch.Tensor, message: str) -> None:
    """Raise ``message`` if any of the bool tensor ``bad`` holds; compiled, the check runs inside the graph (a
    RuntimeError), not on the host."""
    if torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), message)
    elif bool(bad.any()):
        raise RingTransformersError(message)


def _check_band(mask_function: Any, width: int, batch_size: int, length: int, offset: int, device: Any) -> None:
    """That a bidirectional mask function is the band ``|q - kv| <= width``, for every row of the batch, on the
    diagonals that tell it from what transformers composes (``or`` overlays are refused before): 0 and +-1 (packed
    documents cut the band between neighbours), +-width and +-(width + 1) (its edges). O(N), not O(N * width).
    Compiled, checked in the graph."""
    # built on the host and copied without waiting for the stream (torch.tensor(..., device=) would synchronize it)
    diagonals = sorted({d * sign for d in (0, 1, width, width + 1) for sign in (1, -1)})
    distance = torch.tensor(diagonals).to(device, non_blocking=True)
    kv = torch.arange(length, device=device)[None, :, None] + distance
    _refuse(
        (_mask_at(mask_function, batch_size, offset, kv) != (distance.abs() <= width)) & (kv >= 0) & (kv < length),
        f"the model's bidirectional sliding-window mask is not the band of {width} keys either side that its layers' "
        "sliding_window brings (packed documents, or a pattern of its own), which ring attention cannot express",
    )


def _mask_at(mask_function: Any, batch_size: int, offset: int, kv: torch.Tensor) -> torch.Tensor:
    """A mask function at the keys ``kv`` of every query row (``(1 or B, N, K)``, positions from 0, clamped into the
    sequence): bool ``(B, N, K)``."""
    length = kv.shape[1]
    q = torch.arange(length, device=kv.device)[None, :, None]
    batch = torch.arange(batch_size, device=kv.device)[:, None, None]
    seen: torch.Tensor = mask_function(batch, 0, q + offset, kv.clamp(0, length - 1) + offset)
    return seen.expand(batch_size, length, kv.shape[-1])


def _documents(mask_function: Any, batch_size: int, length: int, offset: int, device: Any) -> torch.Tensor:
    """Where the documents of a bidirectional mask function start (``(B, N)`` bool), checked to be whole documents:
    a query sees its neighbours in its document, its document's first and last key, and not the keys just outside
    it. O(N); compiled, checked in the graph."""
    q = torch.arange(length, device=device)[None, :, None].expand(batch_size, -1, -1)
    cut = ~_mask_at(mask_function, batch_size, offset, q - 1)[..., 0]  # a token not seeing the one before it starts one
    starts = torch.cat([torch.ones_like(cut[:, :1]), cut[:, 1:]], dim=1)
    ends = torch.cat([starts[:, 1:], torch.ones_like(starts[:, :1])], dim=1)
    index = q[..., 0]
    first = torch.cummax(torch.where(starts, index, 0), dim=1).values[..., None]
    last = torch.cummin(torch.where(ends, index, length - 1).flip(1), dim=1).values.flip(1)[..., None]
    kv = torch.cat([q - 1, q, q + 1, first - 1, first, last, last + 1], dim=2)
    _refuse(
        (_mask_at(mask_function, batch_size, offset, kv) != ((kv >= first) & (kv <= last))) & (kv >= 0) & (kv < length),
        "the model's bidirectional mask is not whole documents each seeing itself (packed documents), nor every key: "
        "a pattern of its own, which ring attention cannot express",
    )
    return starts


def _autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under ``torch.autocast``, the tensors in its dtype, as transformers' sdpa takes them there (autocast casts
    ``scaled_dot_product_attention``'s inputs): a float32 model's rotary embedding leaves the query and key in float32
    and the value in the autocast dtype. float64 stays, as autocast leaves it."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(x.to(dtype) if x.is_floating_point() and x.dtype != torch.float64 else x for x in tensors)


def _window(sliding_window: int | None, seq_len: int) -> tuple[int, int] | None:
    """flash-attn's ``window_size`` of transformers' ``sliding_window`` (keys ``|t - s| < w``), None when it spans the sequence."""
    if sliding_window is None or sliding_window >= seq_len:
        return None
    return (sliding_window - 1, sliding_window - 1)


def _key_padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """transformers' 2-D mask (1 or True = token, 0 or False = padding) as a key padding mask (True = padding)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise RingTransformersError(
            f"got a {attention_mask.dim()}-D attention_mask of shape {tuple(attention_mask.shape)}: ring attention "
            "takes a 2-D padding mask (B, N), causality from the model; a custom 4-D mask cannot be expressed"
        )
    return attention_mask == 0 if attention_mask.dtype != torch.bool else ~attention_mask


def _given_cu_seqlens(kwargs: dict[str, Any], world_size: int, batch: int) -> torch.Tensor | None:
    """flash-attn's varlen keywords ``cu_seq_lens_q`` / ``cu_seq_lens_k`` as ``cu_seqlens``, or None.

    transformers passes them through to attention when the batch has them (``DataCollatorWithFlattening(
    return_flash_attn_kwargs=True)``, :func:`~ring_transformers.shard_batch` of a packed batch); they index the
    rows laid end to end, as in flash-attn's varlen path. They win over ``position_ids``, as there. Sharded over
    ranks, they need one row (as :func:`_cu_seqlens`'s positions do): rows end to end are not the shards' order.
    """
    cu_q: torch.Tensor | None = kwargs.get("cu_seq_lens_q")
    cu_k: torch.Tensor | None = kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        return None
    if cu_q is None or cu_k is None or cu_q.shape != cu_k.shape:
        shapes = [None if x is None else tuple(x.shape) for x in (cu_q, cu_k)]
        raise RingTransformersError(
            f"got cu_seq_lens_q and cu_seq_lens_k of shapes {shapes[0]} and {shapes[1]}: ring attention runs each "
            "document's queries on the same document's keys, so pass both, equal"
        )
    if cu_q is not cu_k:
        _refuse(
            cu_q != cu_k, "cu_seq_lens_q and cu_seq_lens_k differ: ring attention runs self-attention, pass equal ones"
        )
    if world_size > 1 and batch != 1:
        raise RingTransformersError(
            f"a packed batch sharded over {world_size} ranks must have batch size 1 (flash-attn's convention), got "
            f"{batch} rows with cu_seq_lens_q: pack all documents into one row"
        )
    return cu_q


def _cu_seqlens(position_ids: torch.Tensor | None, choice: Enabled, world_size: int, batch: int) -> torch.Tensor | None:
    """Global ``cu_seqlens`` of a packed batch (gathered over the ranks when the sequence is sharded), or None."""
    if position_ids is None:
        return None
    if world_size == 1 and torch.compiler.is_compiling():  # no value read on the host: no graph break
        return traced_cu_seqlens(position_ids.expand(batch, -1))
    if world_size > 1:
        layout = choice.options.get("layout", "contiguous")
        local = position_ids.expand(batch, -1).contiguous()
        gathered = unshard_sequence(local, layout, choice.options.get("process_group"), dim=1)
        n, default = local.shape[1], torch.arange(local.shape[1], device=local.device)
        shards = (shard_sequence(gathered, layout, dim=1, rank=r, world_size=world_size) for r in range(world_size))
        if all(bool((shard == default).all()) for shard in shards):
            raise RingTransformersError(
                f"every rank's position_ids are 0..{n - 1}: with the sequence sharded over {world_size} ranks, pass "
                "the global positions of each rank's tokens (ring_transformers.shard_batch does); packed "
                "documents that line up with the shards need cu_seq_lens_q/cu_seq_lens_k (shard_batch adds them)"
            )
        return cu_seqlens_from_position_ids(gathered)  # a sharded packed batch must be one row
    return cu_seqlens_from_position_ids(position_ids.expand(batch, -1), flatten_rows=True)
