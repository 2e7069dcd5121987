"""FlexAttention's backward kernel alone, on the final output and log-sum-exp that a call is a part of.

A strip call (or a ring step's) attends each query row to a part of its keys; the row's attention is the merge of
such parts. The part's gradients under the final softmax need only the final ``out`` and ``lse``: with
``P = exp(s - lse)``, ``dV = P^T dout``, ``dS = P * (dout V^T - rowsum(dout * out))``, ``dQ = dS K``,
``dK = dS^T Q``, which is what a flash backward kernel computes from ``(q, k, v, out, lse, dout)``. FlexAttention's
public API reaches its backward only through autograd, whose graph starts at the call's own forward: a ring step,
which cannot keep that graph (it would hold every received shard until the backward), recomputed its forward.

:func:`call_backward` calls FlexAttention's backward operator (``torch.ops.higher_order.flex_attention_backward``,
what FlexAttention's autograd function and compiled autograd call) directly, compiled on CUDA, with the final
``out`` and ``lse``. The operator, the score and joint graphs it takes and its compiled form are torch internals:
:func:`available` admits the torch versions it was read against; elsewhere, or with
``RING_BLOCKSPARSE_FLEX_BACKWARD=0``, the forward keeps each call's graph and ring steps recompute their forward
as before. On CUDA a call of block tiles (64 or 32 rows, :func:`~ring_blocksparse.flex.block_tile`) keeps autograd's
path (:func:`takes`).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from .flex import Cut, call_mask_parts, compiled_flex, strip_block_mask
from .strips import FLEX_TILE

# The first torch whose operator, graphs and dynamo path this module was read against (2.11, the GPU machines', where
# tests/blocksparse/test_cuda.py ran it; it runs traced by dynamo on the CPU's 2.13).
_FIRST_CHECKED = (2, 11)
_TORCH = tuple(int(x) for x in torch.__version__.split(".")[:2])
FLEX_BACKWARD_ENV = "RING_BLOCKSPARSE_FLEX_BACKWARD"
_GRAPHS: dict[Any, dict[str, dict[str, Any]]] = {}


def available(q: torch.Tensor) -> bool:
    """Whether :func:`call_backward` can run for ``q``: this torch has what it calls, and
    ``RING_BLOCKSPARSE_FLEX_BACKWARD`` is not ``0``."""
    return os.environ.get(FLEX_BACKWARD_ENV) != "0" and _TORCH >= _FIRST_CHECKED


def takes(call: Any, q: torch.Tensor) -> bool:
    """Whether the FlexAttention ``call``'s backward is :func:`call_backward` (else autograd's, on the call's own
    graph): where :func:`available`, except on CUDA for block tiles (rows < 128), which compile only under
    max_autotune (:func:`~ring_blocksparse.flex.compiled_flex`), whose benchmarking of this operator fails in torch
    2.11 (``TypeError: launcher() got multiple values for argument 'stream'``)."""
    return available(q) and not (q.is_cuda and call.tiles.tile < FLEX_TILE)


def call_backward(
    call: Any,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    *,
    scale: float,
    cut: Cut | None = None,
    dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``(dq, dk, dv)`` of one FlexAttention strip call (or batch of calls) under the final ``out``, ``lse``
    (``(B, N, H, D)``, ``(B, N, H)`` natural log) and ``dout``, shaped as the call's views ``call.q_view(q)``,
    ``call.kv_leaf(k)``, ``call.kv_leaf(v)``; ``cut``: the call's :class:`~ring_blocksparse.flex.Cut` when it was
    built padded or for packed documents; ``dlse``: the final lse's gradient ``(B, N, H)``, or None."""
    from torch.nn.attention.flex_attention import _apply_kernel_options

    k_leaf, v_leaf = call.kv_leaf(k), call.kv_leaf(v)
    qt, kt, vt = (x.transpose(1, 2) for x in (call.q_view(q), call.kv_input(k_leaf), call.kv_input(v_leaf)))
    block_mask = call.block_mask
    if cut is not None:
        block_mask, _ = strip_block_mask(call.tiles, call.rule, len(call.q), len(call.k), q.device, cut)
    options = _apply_kernel_options(qt, kt, vt, True, call.kernel_options)
    final_lse = call.q_view(lse).transpose(1, 2)
    grad_lse = None if dlse is None else call.q_view(dlse).transpose(1, 2)
    if q.is_cuda:  # (the kernels' lse is float32; the CPU's dense form keeps a float64 call's)
        final_lse = final_lse.float()
        grad_lse = None if grad_lse is None else grad_lse.float()
    if options.get("BACKEND") != "FLASH":  # the Triton kernels keep lse in base 2
        final_lse = final_lse / math.log(2)
        grad_lse = None if grad_lse is None else grad_lse * math.log(2)
    # (the backward kernel reads lse as a contiguous (B, h, n): a call's view of the final lse is strided)
    final_lse = final_lse.contiguous()
    rule, parts = call_mask_parts(call.tiles, call.rule, q.device, cut)
    buffers = tuple(x for x in parts if x is not None)
    graphs = _graphs(rule, parts, qt)
    for entry in graphs.values():
        # dynamo marks a graph it installs as static (torchdynamo_force_dynamic = False), and a static module is
        # no operator argument: these graphs are passed again by every later compile (other shapes)
        entry["graph"].torchdynamo_force_dynamic = True
    dq, dk, dv = _backward(q.device, block_mask.BLOCK_SIZE[0])(
        qt, kt, vt, call.q_view(out).transpose(1, 2), final_lse, call.q_view(dout).transpose(1, 2), grad_lse,
        block_mask.as_tuple()[:-1], scale, options, buffers, graphs,
    )  # fmt: skip
    return dq.transpose(1, 2), _to_leaf(call, k_leaf, dk.transpose(1, 2)), _to_leaf(call, v_leaf, dv.transpose(1, 2))


def _to_leaf(call: Any, leaf: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of ``call.kv_input(leaf)`` carried back to ``leaf`` (a head selection sums over repeats)."""
    leaf = leaf.detach().requires_grad_(True)
    with torch.enable_grad():
        used = call.kv_input(leaf)
    if used is leaf:
        return grad
    (result,) = torch.autograd.grad(used, leaf, grad)
    return result


def _operator_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    lists: tuple[Any, ...],
    scale: float,
    options: dict[str, Any],
    buffers: tuple[torch.Tensor, ...],
    graphs: dict[str, dict[str, Any]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from torch._higher_order_ops.flex_attention import flex_attention_backward

    # the graphs come from a dict of dicts: dynamo installs a graph module passed to the operator under the name
    # of the dict item holding it (the source it checks is such an item of such an item)
    dq, dk, dv, _ = flex_attention_backward(
        q, k, v, out, lse, dout, dlse, graphs["score"]["graph"], graphs["joint"]["graph"],
        (*lists, graphs["mask"]["graph"]), scale, options, (), buffers,
    )  # fmt: skip
    return dq, dk, dv


def _backward(device: torch.device, tile: int) -> Any:
    """:func:`_operator_call` compiled on CUDA (as :func:`~ring_blocksparse.flex.compiled_flex` compiles the
    forward); elsewhere eager (the operator's dense form, exact, for the CPU tests)."""
    if device.type != "cuda":
        return _operator_call
    return compiled_flex("backward", _operator_call, tile)


def _graphs(rule: Any, parts: tuple[torch.Tensor | None, ...], q: torch.Tensor) -> dict[str, Any]:
    """The operator's score graph (the identity), its joint graph and the rule's mask graph (its tensors as
    arguments), made once per rule variant and kept: dynamo guards on the graph objects."""
    present = tuple(x is not None for x in parts)
    layout = parts[-2]
    key = (rule, present, None if layout is None else tuple(layout.shape[:-2]), q.device.type, q.dtype)
    if key not in _GRAPHS:
        from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex
        from torch._higher_order_ops.flex_attention import create_fw_bw_graph
        from torch.fx.experimental.proxy_tensor import make_fx

        def index() -> torch.Tensor:
            return torch.zeros((), dtype=torch.int32, device=q.device)

        def identity(score: torch.Tensor, b: Any, h: Any, m: Any, n: Any) -> torch.Tensor:
            return score

        def mask(b: Any, h: Any, m: Any, n: Any, *buffers: torch.Tensor) -> torch.Tensor:
            given = iter(buffers)
            allowed: torch.Tensor = rule(b, h, m, n, *(next(given) if there else None for there in present))
            return allowed

        score = make_fx(identity)(q.new_zeros(()), index(), index(), index(), index())
        example = (q.new_zeros((), requires_grad=True), index(), index(), index(), index())
        _, joint = create_fw_bw_graph(score, example, ())
        with TransformGetItemToIndex():  # (indexing by 0-d tensors, as FlexAttention traces a mask_mod)
            mask_graph = make_fx(mask)(*(index() for _ in range(4)), *(x for x in parts if x is not None))
        _GRAPHS[key] = {"score": {"graph": score}, "joint": {"graph": joint}, "mask": {"graph": mask_graph}}
    return _GRAPHS[key]
