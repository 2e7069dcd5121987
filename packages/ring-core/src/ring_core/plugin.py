"""The plugin API: every name a package that plugs into ring-core may use.

A kernel, a pattern or a strategy is written against the names in ``__all__`` below and
nothing else (``from ring_core.plugin import ...``; the names users import from
``ring_core`` are allowed too). Everything else in ring-core is private, even where
Python cannot hide it: no underscore member of ring-core's classes is called,
overridden or assigned. ``nox -s lint`` checks both rules for the packages of this
repository, and ``docs/plugins.md`` documents the names by purpose:

- registration: the hook marker and the records a plugin registers;
- kernels: the backend base class, the request it answers, dispatch and the block helpers;
- the engine: schedules, the accumulator, the one autograd function and the schedule's
  forward and backward as functions;
- the custom ops (what ``torch.compile`` sees of a call): ``AttentionOp``, ``run_attention``, and
  ``eager_dispatch`` for an op's body that needs autograd or ``vmap``;
- the dilated pattern: branches, parts (strided views of selected positions), blocks;
- packed documents and sliding windows: their checks, the window geometry of a block
  (:mod:`ring_core.windows`) and how a kernel takes it (``window_kwargs``);
- the ring strategy: the plan, its schedule, the module base classes and their extension
  points (:meth:`RingAttentionBase.attention_schedule`, ``attention_forward``,
  ``attention_backward``, :meth:`RingAttentionBase.context`);
- communication and agreement: the ring's communicator, timed waits and the same error on
  every rank;
- sharding and validation helpers;
- command-line subcommands (``register_commands``): argument checks that end in one line and
  exit code 2 (``UsageError``, ``positive_int``, ``check_output``).

A capability a plugin needs is added here, documented, in the same change; it is never
reached for privately.
"""

from __future__ import annotations

from .agreement import RingConfigError, agree_across_ranks, differing_fields, validate_inputs, validate_ring_inputs
from .cli import UsageError, check_output, positive_int
from .comm import (
    CHANNELS,
    TRANSPORTS,
    CollectiveError,
    Exchange,
    RingComm,
    RingCommStats,
    check_transport,
    ring_comm,
    timed_wait,
)
from .deprecation import aliases_for, deprecated_getattr, warn_deprecated
from .dilated import (
    Block,
    Branch,
    DilatedAttention,
    DilatedSchedule,
    Part,
    backward_block,
    branch_offsets,
    branches,
    dilated_attention,
    dilated_parts,
    forward_block,
    offset_heads,
    part_blocks,
)
from .dispatch import KernelNotAvailableError, block_kernel, dropout_seed, select_kernel
from .engine import (
    Accumulator,
    BlockKernel,
    BlockSchedule,
    blockwise_attention,
    no_double_backward,
    schedule_backward,
    schedule_forward,
)
from .hookspecs import hookimpl
from .kernels import (
    FLOAT_DTYPES,
    CPUFlashKernel,
    KernelBackend,
    KernelRequest,
    MathKernel,
    accumulation_dtype,
    causal_mask,
    combined_mask,
    default_scale,
    merge_into,
    unit_last_stride,
)
from .lse import lse_for_backward, lse_probe, merge_attention
from .ops import AttentionOp, CallOp, OpCall, eager_dispatch, run_attention
from .reference import branch_counts, document_mask, reference_attention, window_allowed
from .registry import Implementation, get_registry
from .ring import RingAttentionBase, RingDilatedAttention
from .ring_plan import Item, RingPlan, Step, Transfer, build_ring_plan, item_kv_part, segments_within_shards
from .ring_schedule import RingDilatedSchedule, send_bounds
from .sharding import (
    LAYOUTS,
    check_divisible,
    check_layout,
    group_rank_and_size,
    shard_positions,
    shard_ranges,
    shard_sequence,
)
from .unshard import unshard_sequence
from .validation import (
    MERGES,
    check_cu_seqlens,
    check_dilated_config,
    check_dropout,
    check_flag,
    check_qkv,
    check_scale,
    check_timeout,
    check_window,
    read_cu_seqlens,
    tensor_version,
)
from .windows import NO_WINDOW, document_spans, index_window, kernel_window, window_kwargs, window_mask

__all__ = [
    "CHANNELS",
    "FLOAT_DTYPES",
    "LAYOUTS",
    "MERGES",
    "NO_WINDOW",
    "TRANSPORTS",
    "Accumulator",
    "AttentionOp",
    "Block",
    "BlockKernel",
    "BlockSchedule",
    "Branch",
    "CPUFlashKernel",
    "CallOp",
    "CollectiveError",
    "DilatedAttention",
    "DilatedSchedule",
    "Exchange",
    "Implementation",
    "Item",
    "KernelBackend",
    "KernelNotAvailableError",
    "KernelRequest",
    "MathKernel",
    "OpCall",
    "Part",
    "RingAttentionBase",
    "RingComm",
    "RingCommStats",
    "RingConfigError",
    "RingDilatedAttention",
    "RingDilatedSchedule",
    "RingPlan",
    "Step",
    "Transfer",
    "UsageError",
    "accumulation_dtype",
    "agree_across_ranks",
    "aliases_for",
    "backward_block",
    "block_kernel",
    "blockwise_attention",
    "branch_counts",
    "branch_offsets",
    "branches",
    "build_ring_plan",
    "causal_mask",
    "check_cu_seqlens",
    "check_dilated_config",
    "check_divisible",
    "check_dropout",
    "check_flag",
    "check_layout",
    "check_output",
    "check_qkv",
    "check_scale",
    "check_timeout",
    "check_transport",
    "check_window",
    "combined_mask",
    "default_scale",
    "deprecated_getattr",
    "differing_fields",
    "dilated_attention",
    "dilated_parts",
    "document_mask",
    "document_spans",
    "dropout_seed",
    "eager_dispatch",
    "forward_block",
    "get_registry",
    "group_rank_and_size",
    "hookimpl",
    "index_window",
    "item_kv_part",
    "kernel_window",
    "lse_for_backward",
    "lse_probe",
    "merge_attention",
    "merge_into",
    "no_double_backward",
    "offset_heads",
    "part_blocks",
    "positive_int",
    "read_cu_seqlens",
    "reference_attention",
    "ring_comm",
    "run_attention",
    "schedule_backward",
    "schedule_forward",
    "segments_within_shards",
    "select_kernel",
    "send_bounds",
    "shard_positions",
    "shard_ranges",
    "shard_sequence",
    "tensor_version",
    "timed_wait",
    "unit_last_stride",
    "unshard_sequence",
    "validate_inputs",
    "validate_ring_inputs",
    "warn_deprecated",
    "window_allowed",
    "window_kwargs",
    "window_mask",
]
