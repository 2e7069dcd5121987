"""ring-flash's Triton merge kernels on the CPU, through Triton's interpreter (skipped without Triton).

The kernels run on CUDA in production (tests/flash/test_flash_cuda.py); here the same
kernels run under ``TRITON_INTERPRET=1`` (set before Triton is imported, hence a
subprocess) against the torch ops they replace, on strided views with empty rows.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

SCRIPT = textwrap.dedent(
    """
    import torch
    import ring_flash.merge as merge
    from ring_core.kernels import merge_into

    torch.manual_seed(0)

    def view(x):
        return x[:, 1::3, 1::2].unflatten(1, (2, 2))  # (2, 2, 2, 3, ...) out of (2, 12, 6, ...)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    lse = torch.randn(2, 12, 6)
    lse[0, 1, 1] = float("-inf")
    block_lse = torch.randn(4, 3, 2).transpose(1, 2).reshape(2, 2, 2, 3)  # strided, as kernels give it
    block_lse[0, 0, 0, 0] = float("-inf")  # the same row: nothing seen
    for dtype in (torch.float32, torch.bfloat16):
        block = torch.randn(2, 2, 2, 3, 8).to(dtype)
        for accumulate in (False, True):
            full = torch.randn(2, 12, 6, 8)
            expected, got = full.clone(), full.clone()
            view(expected).add_(block.float()) if accumulate else view(expected).copy_(block.float())
            merge._merge_triton([view(got)], [block], accumulate)
            assert rel(got, expected) < 1e-6, (dtype, accumulate)
        grads = [torch.randn(2, 12, 6, 8) for _ in range(3)]
        expected = [g.clone() for g in grads]
        for g in expected:
            view(g).add_(block.float())
        merge._merge_triton([view(g) for g in grads], [block] * 3, True)  # three pairs, one launch
        assert all(rel(a, b) < 1e-6 for a, b in zip(grads, expected))
        out, acc_lse = torch.randn(2, 12, 6, 8), lse.clone()
        expected, expected_lse = out.clone(), acc_lse.clone()
        merge_into(view(expected), view(expected_lse), block, block_lse)
        merge._use_triton = lambda dsts, srcs, index=None: True  # online_merge, gather_rows check for CUDA tensors
        assert merge.online_merge(view(out), view(acc_lse), block, block_lse)
        assert rel(out, expected) < 1e-6
        assert torch.equal(torch.isinf(acc_lse), torch.isinf(expected_lse))
        low = out.to(torch.bfloat16)  # an output-dtype accumulator: float32 math, rounded once on the store
        expected = low.float()
        merge_into(view(expected), view(lse.clone()), block, block_lse)
        assert merge.online_merge(view(low), view(lse.clone()), block, block_lse)
        assert rel(low, expected) < 4e-3  # one bfloat16 rounding
        # indexed: packed rows (total, h, D) merged into rows `index` of a head view of (N, H, D)
        index = torch.tensor([7, 0, 3, 10, 4], dtype=torch.int64)
        packed = torch.randn(5, 3, 8).to(dtype)
        for accumulate in (False, True):
            grads = [torch.randn(12, 6, 8) for _ in range(3)]
            expected = [g.clone() for g in grads]
            for g in expected:
                rows = g[:, 1::2]
                rows.index_add_(0, index, packed.float()) if accumulate else rows.index_copy_(0, index, packed.float())
            merge._merge_triton([g[:, 1::2] for g in grads], [packed] * 3, accumulate, index)
            assert all(rel(a, b) < 1e-6 for a, b in zip(grads, expected)), (dtype, accumulate)
        fulls = [torch.randn(12, 6, 8).to(dtype) for _ in range(3)]
        gathered = merge.gather_rows([x[:, 1::2] for x in fulls], index)  # one launch, three views
        assert all(torch.equal(g, x[:, 1::2][index]) for g, x in zip(gathered, fulls))
        packed_lse = torch.randn(3, 5).transpose(0, 1)  # (total, h), strided as the varlen kernels give it
        packed_lse[1, 2] = float("-inf")
        out, acc_lse = torch.randn(12, 6, 8), lse[0].clone()
        acc_lse[0, 5] = float("-inf")  # row 0 (packed row 1), head 5 (view head 2): nothing seen at all
        expected, expected_lse = out.clone(), acc_lse.clone()
        rows_out, rows_lse = expected[:, 1::2][index], expected_lse[:, 1::2][index]
        merge_into(rows_out, rows_lse, packed, packed_lse)
        expected[:, 1::2][index], expected_lse[:, 1::2][index] = rows_out, rows_lse
        assert merge._indexable(out[:, 1::2], packed, index) and not merge._indexable(out[:, 1::2], packed, index[:4])
        assert merge.online_merge(out[:, 1::2], acc_lse[:, 1::2], packed, packed_lse, index=index)
        assert rel(out, expected) < 1e-6 and out[0, 5].abs().sum() == 0
        finite = torch.isfinite(expected_lse)
        assert torch.equal(torch.isfinite(acc_lse), finite) and rel(acc_lse[finite], expected_lse[finite]) < 1e-6
    print("ok")
    """
)


def test_triton_kernels_match_torch_ops_in_the_interpreter():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
