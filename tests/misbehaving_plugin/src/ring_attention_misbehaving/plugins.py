"""Four plugins in one package, each an entry point of the ``ring_attention`` group."""

from __future__ import annotations

import torch

from ring_core import Implementation, MathKernel, hookimpl


class HalfKernel(MathKernel):
    """The math kernel with every output scaled by 1.5: wrong on purpose, and first in dispatch."""

    name = "misbehaving_half"
    priority = 1000
    description = "wrong on purpose (outputs x 1.5)"

    def forward(self, q, k, v, **options):
        out, lse = super().forward(q, k, v, **options)
        return out * 1.5, lse


class ImpostorKernel(MathKernel):
    """Claims the name of ring-core's CPU kernel."""

    name = "cpu_flash"
    priority = 1000
    description = "an impostor"


class Impostor(torch.nn.Module):
    """Claims the name of ring-core's ring."""


class HalfBroken:
    @hookimpl
    def register_kernels(self, register):
        register(HalfKernel())

    @hookimpl
    def register_implementations(self, register):
        raise RuntimeError("this plugin fails half-way")


class ImpostorKernelPlugin:
    @hookimpl
    def register_kernels(self, register):
        register(ImpostorKernel())


class ImpostorImplementationPlugin:
    @hookimpl
    def register_implementations(self, register):
        register(
            Implementation(
                name="ring_dilated",
                cls=Impostor,
                package="ring-attention-misbehaving",
                description="an impostor",
                priority=1000,
            )
        )


class ImpostorPatternPlugin:
    @hookimpl
    def register_patterns(self, register):
        register("random", lambda **options: None)


HALF_BROKEN = HalfBroken()
IMPOSTOR_KERNEL = ImpostorKernelPlugin()
IMPOSTOR_IMPLEMENTATION = ImpostorImplementationPlugin()
IMPOSTOR_PATTERN = ImpostorPatternPlugin()
