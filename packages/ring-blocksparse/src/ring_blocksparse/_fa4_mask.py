"""The strip rule as CuTe DSL ``mask_mod``s for flash-attn 4 (:mod:`ring_blocksparse.fa4_rule` says what they read).

Imported only where flash-attn 4 and the CuTe DSL are installed. flash-attn 4 (4.0.0b36) calls a
``mask_mod`` inside its kernels as ``mask_mod(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors)``,
the indices as one-element Int32 ``TensorSSA``s, and keeps a score where the one-element Boolean
``TensorSSA`` it returns is true. Its compile cache keys a ``mask_mod`` by ``__cute_hash__`` when
one is set: here a hash of this file and the variant, so that an edit of the helpers can never reuse
a kernel compiled from older code (its persistent cache, ``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1``,
hashes only flash-attn's own sources). No annotations on the traced functions: the DSL reads them.
"""

import hashlib
from pathlib import Path

import cutlass
import cutlass.cute as cute
from flash_attn.cute.utils import scalar_to_ssa


@cute.jit
def _segment_and_window(batch, q_idx, kv_idx, aux_tensors):
    # aux: qpos, kpos, qseg, kseg, params (lo, hi, layout head and row strides, query/key/layout batch strides)
    qpos, kpos, qseg, kseg, params = aux_tensors[0], aux_tensors[1], aux_tensors[2], aux_tensors[3], aux_tensors[4]
    i = q_idx[0] + batch[0] * params[4]
    j = kv_idx[0] + batch[0] * params[5]
    offset = scalar_to_ssa(kpos[j] - qpos[i], cutlass.Int32)
    lo = scalar_to_ssa(params[0], cutlass.Int32)
    hi = scalar_to_ssa(params[1], cutlass.Int32)
    same = scalar_to_ssa(qseg[i], cutlass.Int32) == scalar_to_ssa(kseg[j], cutlass.Int32)
    return same & (offset >= lo) & (offset <= hi)


@cute.jit
def _layout_allows(batch, head, q_idx, kv_idx, aux_tensors):
    # aux[5:]: qblk, kblk, the layout (uint8, flattened)
    params, qblk, kblk, layout = aux_tensors[4], aux_tensors[5], aux_tensors[6], aux_tensors[7]
    i = q_idx[0] + batch[0] * params[4]
    j = kv_idx[0] + batch[0] * params[5]
    index = batch[0] * params[6] + head[0] * params[2] + qblk[i] * params[3] + kblk[j]
    allowed = scalar_to_ssa(cutlass.Int32(layout[index]), cutlass.Int32)
    return allowed > scalar_to_ssa(0, cutlass.Int32)


@cute.jit
def strip_rule(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
    """Segment, window and causality (partial tiles whose layout blocks all allow)."""
    return _segment_and_window(batch, q_idx, kv_idx, aux_tensors)


@cute.jit
def strip_rule_layout(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
    """The whole rule: the layout too."""
    allowed = _segment_and_window(batch, q_idx, kv_idx, aux_tensors)
    return allowed & _layout_allows(batch, head, q_idx, kv_idx, aux_tensors)


_SOURCE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
for _variant in (strip_rule, strip_rule_layout):
    _variant.__cute_hash__ = hashlib.sha256(f"{_SOURCE}:{_variant.__name__}".encode()).hexdigest()
