"""Which way of calling ``aten._scaled_dot_product_cudnn_attention_backward`` works on this GPU/torch.

Each variant of :class:`ring_flash.kernels.SDPACuDNNKernel` (``RING_FLASH_CUDNN_BACKWARD``)
runs in its own subprocess (a crash there cannot stop this script), against the math
kernel, with the final ``out``/``lse`` of a merge as the engine passes them. Prints one
line per variant tried and, last, ``BEST=<variant>`` (the first that passes every shape).

    python -m tools.gpu.probe_cudnn
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

CHILD = r"""
import sys, torch, ring_core
from ring_flash.kernels import SDPACuDNNKernel
from ring_core.testing import relative_error
kernel, math = SDPACuDNNKernel(), ring_core.MathKernel()
for (b, n, h, d) in [(3, 80, 4, 64), (2, 256, 4, 128)]:
    for causal in (False, True):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, dout = (torch.randn(b, n, h, d, device="cuda", generator=g).bfloat16() for _ in range(4))
        qs = torch.randn(b, 2 * n, h, d, device="cuda", generator=g).bfloat16()[:, ::2]  # strided view
        out, lse = kernel.forward(qs, k, v, scale=0.1, causal=causal)
        ref_out, ref_lse = math.forward(qs.float(), k.float(), v.float(), scale=0.1, causal=causal)
        fwd = relative_error(out, ref_out)
        total = ref_lse + 0.2
        final = (ref_out * torch.exp(ref_lse - total).transpose(1, 2).unsqueeze(-1)).bfloat16()
        grads = kernel.backward(dout, qs, k, v, final, total, scale=0.1, causal=causal)
        want = math.backward(dout.float(), qs.float(), k.float(), v.float(), final.float(), total, scale=0.1, causal=causal)
        torch.cuda.synchronize()
        bwd = max(relative_error(a, w) for a, w in zip(grads, want))
        print(f"  shape={(b, n, h, d)} causal={causal} fwd_err={fwd:.2e} bwd_err={bwd:.2e} strided={SDPACuDNNKernel.strided_inputs}")
        if not (fwd < 1e-2 and bwd < 2e-2):
            sys.exit(3)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    from ring_flash.kernels import SDPACuDNNKernel

    if not torch.cuda.is_available():
        print("tools.gpu.probe_cudnn needs a CUDA GPU", file=sys.stderr)
        return 2

    best = None
    for variant in SDPACuDNNKernel.backward_variants:
        env = {**os.environ, "RING_FLASH_CUDNN_BACKWARD": variant}
        try:
            result = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)
            status = "ok" if result.returncode == 0 else f"FAILED rc={result.returncode}"
            detail = result.stdout + (result.stderr.strip().splitlines() or [""])[-1]
        except subprocess.TimeoutExpired:
            status, detail = "TIMEOUT", ""
        print(f"cuDNN backward variant {variant}: {status}\n{detail}", flush=True)
        if status == "ok":
            best = variant
            break
    print(f"BEST={best or 'flash'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
