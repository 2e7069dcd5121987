"""Entry point of ring-transformers in the ``ring_attention`` group.

ring-transformers adds no kernel or implementation of its own: it runs the
registered ones inside transformers models. Its entry point makes it visible
to ``ring-attention info`` (plugin, package and version) without importing
transformers, so loading the registry stays fast.
"""

from __future__ import annotations
