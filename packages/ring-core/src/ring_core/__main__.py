"""``python -m ring_core``: the ``ring-attention`` command."""

import sys

from .cli import main

sys.exit(main())
