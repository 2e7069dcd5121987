"""Entry point of ring-multihead in the ``ring_attention`` group."""

from __future__ import annotations

from ring_core import hookimpl


@hookimpl
def register_implementations(register):
    """Nothing registered yet: the implementations land with this package's issue."""
