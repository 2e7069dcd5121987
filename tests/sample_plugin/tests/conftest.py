"""Make the sample plugin importable without installing it (a real plugin's tests run with it installed)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
