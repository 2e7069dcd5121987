"""The project's own scripts (not shipped): ``bench/``, ``gpu/``, ``release/``; see ``tools/README.md``.

Run them from the repository root as modules (``python -m tools.bench.core``), so that they
import shared code such as :mod:`tools.multigpu` as part of this package.
"""

from __future__ import annotations

import sys


def command_line() -> str:
    """How this process was started, as one would type it again (the ``command`` of a benchmark JSON)."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    head = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0]}"
    return " ".join([head, *sys.argv[1:]])
