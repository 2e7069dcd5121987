"""Two simulated nodes of 2 ranks on this machine, launched by ``torchrun --nnodes 2`` like a real job.

Each node's torchrun sets LOCAL_WORLD_SIZE=2, so the Ulysses groups must be the ranks of one
node ({0, 1}, {2, 3}) and the rings cross nodes ({0, 2}, {1, 3}); every rank's output and
gradients equal the float64 reference rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ring_core.testing import free_port

WORKER = Path(__file__).with_name("torchrun_worker.py")


@pytest.mark.distributed
def test_two_nodes_under_torchrun(tmp_path):
    port = free_port()
    env = {**os.environ, "RESULT_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(port),
    ]  # fmt: skip
    nodes = [
        subprocess.Popen(
            [*command, "--node_rank", str(node), str(WORKER)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for node in (0, 1)
    ]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=180)[0].decode(errors="replace"))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[-3000:] for o in outputs)
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(4)]
    for result in results:
        rank = result["rank"]
        assert result["strategy"] == ["hybrid", 2]
        assert result["ulysses"] == [rank // 2 * 2, rank // 2 * 2 + 1]  # inside the node
        assert result["ring"] == [rank % 2, rank % 2 + 2]  # across the nodes
        assert result["errors"]["out"] <= 1e-10 and max(result["errors"].values()) <= 1e-9, result
