"""Run by ``torchrun`` in tests/distributed/test_torchrun.py: one rank of a simulated multi-node job.

Reads LOCAL_WORLD_SIZE like a real job, runs RingDistributedDilatedAttention (strategy
``"hybrid"``, degree from the node size) on its shard, compares with the float64 reference
rows and writes a JSON line with the errors and the groups it used to ``$RESULT_DIR/<rank>.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from ring_core.testing import Case, sharded_case_errors
from ring_distributed import RingDistributedDilatedAttention
from ring_distributed.mesh import mesh_groups


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    case = Case("dilated-causal-gqa", 48, 8, (4, 8, 48), (1, 2, 4), kv_heads=4, causal=True)
    module = RingDistributedDilatedAttention(**case.config, layout="zigzag", strategy="hybrid")
    errors = sharded_case_errors(module, case, rank, world_size, "zigzag")
    groups = mesh_groups(None, module.last_strategy[1], int(os.environ["LOCAL_WORLD_SIZE"]))
    ulysses = dist.get_process_group_ranks(groups.ulysses_group)
    ring = dist.get_process_group_ranks(groups.ring_group) if groups.ring_group is not None else [rank]
    result = {"rank": rank, "errors": errors, "strategy": module.last_strategy, "ulysses": ulysses, "ring": ring}
    Path(os.environ["RESULT_DIR"], f"{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
