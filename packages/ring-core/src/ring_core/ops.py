"""Attention calls as ``torch.library`` custom ops: all that ``torch.compile`` sees of them.

Note: attention under ``torch.compile``
    ``torch.compile(fullgraph=True)`` must see each attention call as one op. The engine's
    Python is no graph: kernel dispatch takes the registry's lock and reads the
    environment, plans are Python objects, the ring communicates, and tracing the block
    loops would unroll every block into the graph. So every implementation computes its
    blocks inside two custom ops,

    - ``ring_attention::attention(q, k, v, key_padding_mask, cu_seqlens, seed, op, causal,
      dropout_p, lse_grad) -> (out, lse)`` and
    - ``ring_attention::attention_backward(dout, dlse, q, k, v, out, lse, key_padding_mask,
      cu_seqlens, seed, op, causal, dropout_p) -> (dq, dk, dv)``,

    with fake implementations (output shapes and dtypes, for tracing) and the second
    registered as the first one's autograd. A custom op takes tensors and plain values;
    everything else a call needs (the configuration, a process group, cached plans) is an
    :class:`AttentionOp` registered under a unique name, the ``op`` argument. It builds the
    call's :class:`~ring_core.engine.BlockSchedule` when the op runs, so kernel dispatch and
    plans happen outside the traced region, or it overrides :meth:`AttentionOp.forward` and
    :meth:`AttentionOp.backward`. The dropout seed is drawn in the graph, as a tensor, so
    forward and backward see the same one.

    ``lse`` is differentiable when the caller returns it (``lse_grad``), and needs nothing of
    the kernels: ``d lse_t / d s_ts`` is the final probability ``P_ts``, and a block's
    backward computes ``dS = P * (dout . v - rowsum(dout * out))``, which is ``P * dlse`` for
    ``v = 0`` and an ``out`` whose row product with ``dout`` is ``-dlse``. So the lse's
    gradient is one more backward pass over the same blocks, run when that gradient arrives
    (under ``torch.compile`` one always does: it passes zeros for an unused output).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .engine import BlockSchedule, schedule_backward, schedule_forward
from .kernels import accumulation_dtype
from .lse import lse_probe
from .validation import check_documents, read_cu_seqlens, tensor_version

__all__ = ["AttentionOp", "CallOp", "OpCall", "eager_dispatch", "run_attention"]


@dataclass(frozen=True)
class OpCall:
    """What one call gives besides ``q, k, v``: key padding (bool ``(B, N)``, True = padding),
    causality, dropout with its seed (the same in forward and backward) and the packed
    documents (the checked ``cu_seqlens`` values, global positions; None: one sequence)."""

    key_padding_mask: torch.Tensor | None = None
    causal: bool = False
    dropout_p: float = 0.0
    seed: int = 0
    documents: tuple[int, ...] | None = None


_registered: weakref.WeakValueDictionary[str, AttentionOp] = weakref.WeakValueDictionary()
_count = itertools.count()


class AttentionOp:
    """How the custom ops compute the calls of one attention configuration.

    Subclasses give :meth:`schedule` (the blockwise engine runs it forward and backward)
    or override :meth:`forward` and :meth:`backward`. Each instance is registered under a
    unique :attr:`name`, weakly: whoever calls :func:`run_attention` with it keeps it alive
    (a module attribute). Copies and unpickled instances register under names of their own.
    ``owner`` (e.g. the module the op computes for) is held weakly too: :attr:`owner`.
    """

    def __init__(self, owner: Any = None) -> None:
        self._owner = None if owner is None else weakref.ref(owner)
        self.name = _register(self)

    @property
    def owner(self) -> Any:
        """The object given as ``owner`` (None when none was)."""
        if self._owner is None:
            return None
        owner = self._owner()
        if owner is None:
            raise RuntimeError(f"attention op {self.name!r}: its owner was freed")
        return owner

    def schedule(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: OpCall) -> BlockSchedule:
        """The blocks of one call (kernel dispatch and plans happen here, when the op runs)."""
        raise NotImplementedError(f"{type(self).__name__} defines neither schedule() nor forward() and backward()")

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: OpCall
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``out`` ``(B, N, H, D_v)`` (dtype of ``q``) and ``lse`` ``(B, N, H)`` (accumulation dtype)."""
        return schedule_forward(self.schedule(q, k, v, call), q, k, v)

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        call: OpCall,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``dq, dk, dv`` for the gradient ``dout`` of :meth:`forward`'s ``out`` (``lse`` treated as constant)."""
        return schedule_backward(self.schedule(q, k, v, call), q, k, v, out, lse, dout)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["name"]
        state["_owner"] = None if self._owner is None else self.owner
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        owner = state.pop("_owner")
        self.__dict__.update(state)
        self._owner = None if owner is None else weakref.ref(owner)
        self.name = _register(self)


class CallOp(AttentionOp):
    """The op of one eager call whose schedule ``make(q, k, v, call)`` builds (a function API, no module).

    The autograd graph keeps it alive until backward; ``torch.compile`` needs an op made
    outside the traced code instead (a module attribute, or a cached one per configuration).
    """

    def __init__(self, make: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, OpCall], BlockSchedule]) -> None:
        super().__init__()
        self.make = make

    def schedule(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: OpCall) -> BlockSchedule:
        return self.make(q, k, v, call)


@contextlib.contextmanager
def eager_dispatch() -> Iterator[None]:
    """Inside an :class:`AttentionOp`'s ``forward`` or ``backward``: dispatch as eager code outside any op does.

    ``torch.library`` runs an op's body below autograd, and a compiled graph's runtime below
    ADInplaceOrView and functorch too; code that differentiates something of its own there
    (``torch.autograd.grad`` on a block it recomputes) or uses ``vmap`` (FlexAttention builds block masks
    with it) needs them back. Autocast stays as it was. Elsewhere it changes nothing.
    """
    exclude = torch._C._dispatch_tls_local_exclude_set()
    autocast = torch._C.DispatchKeySet(torch._C.DispatchKey.Undefined)
    for name, key in torch._C.DispatchKey.__members__.items():
        if name.startswith("Autocast") and exclude.has(key):
            autocast = autocast.add(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), autocast):
        yield


def _register(op: AttentionOp) -> str:
    name = f"{type(op).__qualname__}#{next(_count)}"
    _registered[name] = op
    return name


def _lookup(name: str) -> AttentionOp:
    op = _registered.get(name)
    if op is None:
        raise RuntimeError(
            f"attention op {name!r} does not exist (any more): keep the module or AttentionOp that "
            "made the call alive while graphs that call it run"
        )
    return op


def run_attention(
    op: AttentionOp | str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    lse_grad: bool = False,
    seed: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    documents: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One attention call through the custom ops: ``out`` and ``lse`` ``(B, N, H)``.

    ``op`` is an :class:`AttentionOp` or its name. ``key_padding_mask`` is bool ``(B, N)``
    (True = padding) or float holding only ``0`` and ``-inf`` (checked when the op runs).
    ``cu_seqlens`` (checked) reaches the op as :attr:`OpCall.documents`; ``documents``, its
    checked values when the caller has read them already, spare the ops reading them again
    (each read of a CUDA tensor waits for the GPU; backward reuses them too; ignored under
    ``torch.compile``). ``lse`` is differentiable with
    ``lse_grad`` (pass it when the caller hands ``lse`` to its user), else its gradient is
    ignored. Inputs are assumed validated. Dropout's seed is ``seed`` when given (repeatable
    runs), else drawn from torch's generator in the graph.
    """
    seed_tensor = None
    if dropout_p > 0:
        seed_tensor = torch.randint(0, 2**62, (1,)) if seed is None else torch.tensor([seed], dtype=torch.int64)
    name = op if isinstance(op, str) else op.name
    args = (q, k, v, key_padding_mask, cu_seqlens, seed_tensor, name, bool(causal), float(dropout_p), bool(lse_grad))
    if documents is None or cu_seqlens is None or torch.compiler.is_compiling():
        out, lse = torch.ops.ring_attention.attention(*args)
        return out, lse
    with _known_documents(cu_seqlens, tuple(documents)):
        out, lse = torch.ops.ring_attention.attention(*args)
    return out, lse


# The values of the ``cu_seqlens`` tensor being passed to an op on this thread, when known: the tensor itself (the
# same object, not modified since: its version), and its values.
_known = threading.local()


@contextlib.contextmanager
def _known_documents(cu_seqlens: torch.Tensor, documents: tuple[int, ...] | None) -> Iterator[None]:
    outer = getattr(_known, "value", None)
    _known.value = None if documents is None else (cu_seqlens, tensor_version(cu_seqlens), documents)
    try:
        yield
    finally:
        _known.value = outer


def _read_documents(cu_seqlens: torch.Tensor) -> tuple[int, ...]:
    """``cu_seqlens``' checked values: those its caller gave for this very tensor, else read (a host-device sync)."""
    known = getattr(_known, "value", None)
    # (an inference tensor has no version: within one call, from the caller to its op, nothing can edit it)
    if known is not None and known[0] is cu_seqlens and known[1] == tensor_version(cu_seqlens):
        return known[2]  # type: ignore[no-any-return]
    return check_documents(read_cu_seqlens(cu_seqlens), None)


def _call(
    key_padding_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    seed: torch.Tensor | None,
    causal: bool,
    dropout_p: float,
    seq_len: int,
) -> OpCall:
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        key_padding_mask = _padding_from_float(key_padding_mask)
    return OpCall(
        key_padding_mask, causal, dropout_p, 0 if seed is None else int(seed.item()), _documents(cu_seqlens, seq_len)
    )


def _documents(cu_seqlens: torch.Tensor | None, seq_len: int) -> tuple[int, ...] | None:
    """The checked boundaries without empty documents (they attend nothing), None for one document of the
    whole (local) sequence: the same results. A caller that traces a fixed-length ``cu_seqlens``
    (``torch.compile``: no value read on the host) pads it with repeated boundaries."""
    if cu_seqlens is None:
        return None
    documents = tuple(dict.fromkeys(_read_documents(cu_seqlens)))
    return None if documents == (0, seq_len) else documents


def _padding_from_float(mask: torch.Tensor) -> torch.Tensor:
    """A float padding mask (``-inf`` = padding, ``0`` = key) as bool; any other value is an error."""
    if not bool(((mask == 0) | (mask == float("-inf"))).all()):
        raise ValueError(
            "a float key_padding_mask must hold only 0 (key) and -inf (padding) here (a compiled call cannot "
            "choose another path by its values); pass a bool mask, or run the call uncompiled"
        )
    return mask == float("-inf")


@torch.library.custom_op(
    "ring_attention::attention",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? cu_seqlens, Tensor? seed, str op, "
    "bool causal, float dropout_p, bool lse_grad) -> (Tensor, Tensor)",
)
def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    seed: torch.Tensor | None,
    op: str,
    causal: bool,
    dropout_p: float,
    lse_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    call = _call(key_padding_mask, cu_seqlens, seed, causal, dropout_p, q.shape[1])
    out, lse = _lookup(op).forward(q, k, v, call)
    return out.contiguous(), lse.contiguous()


@_attention.register_fake
def _attention_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    seed: torch.Tensor | None,
    op: str,
    causal: bool,
    dropout_p: float,
    lse_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, n, h, _ = q.shape
    return q.new_empty(b, n, h, v.shape[-1]), q.new_empty(b, n, h, dtype=accumulation_dtype(q.dtype))


@torch.library.custom_op(
    "ring_attention::attention_backward",
    mutates_args=(),
    schema="(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "Tensor? key_padding_mask, Tensor? cu_seqlens, Tensor? seed, str op, bool causal, float dropout_p) "
    "-> (Tensor, Tensor, Tensor)",
)
def _attention_backward(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    seed: torch.Tensor | None,
    op: str,
    causal: bool,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    runner, call = _lookup(op), _call(key_padding_mask, cu_seqlens, seed, causal, dropout_p, q.shape[1])
    dq, dk, dv = runner.backward(dout, q, k, v, out, lse, call)
    if dlse is not None:  # one more pass: dS = P * dlse (see the module's note)
        probe, zeros, shifted = lse_probe(v, out, dlse)
        lse_dq, lse_dk, _ = runner.backward(probe, q, k, zeros, shifted, lse, call)
        dq, dk = dq + lse_dq, dk + lse_dk
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_attention_backward.register_fake
def _attention_backward_fake(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    seed: torch.Tensor | None,
    op: str,
    causal: bool,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v, key_padding_mask, cu_seqlens, seed, op, causal, dropout_p, lse_grad = inputs
    ctx.save_for_backward(q, k, v, *output, key_padding_mask, cu_seqlens, seed)
    ctx.call = (op, causal, dropout_p, lse_grad)
    runner = _lookup(op)
    ctx.alive = (runner, runner.owner)  # the graph keeps what its backward runs (a per-call op, its module)
    known = getattr(_known, "value", None)  # this call's documents, when its caller gave them: backward needs them too
    ctx.documents = known[2] if known is not None and known[0] is cu_seqlens else None
    ctx.set_materialize_grads(False)


def _gradient(ctx: Any, dout: torch.Tensor | None, dlse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    q, k, v, out, lse, key_padding_mask, cu_seqlens, seed = ctx.saved_tensors
    op, causal, dropout_p, lse_grad = ctx.call
    if not lse_grad:
        dlse = None
    if dout is None and dlse is None:
        return (None,) * 10
    if dout is None:
        dout = torch.zeros_like(out)
    with _known_documents(cu_seqlens, ctx.documents) if ctx.documents is not None else contextlib.nullcontext():
        grads = torch.ops.ring_attention.attention_backward(
            dout, dlse, q, k, v, out, lse, key_padding_mask, cu_seqlens, seed, op, causal, dropout_p
        )
    return (*grads, *(None,) * 7)


def _no_double_backward(ctx: Any, *grads: Any) -> tuple[None, ...]:
    raise RuntimeError(
        "ring attention has no double backward: its backward (ring_attention::attention_backward) is not "
        "differentiable; take gradients of gradients of another attention"
    )


_attention.register_autograd(_gradient, setup_context=_setup_context)
_attention_backward.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)
