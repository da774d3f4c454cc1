"""The demo ERNIE for server tests: built once per module with the real CLI.

``paddle-meter models make-demo-ernie`` exports a small ERNIE with the real architecture
and random, UNTRAINED weights (no weights are reachable here): tests that use it assert
token counts and metering only, never labels.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["ernie_model", "make_demo_ernie"]


def make_demo_ernie(directory: Path) -> Path:
    """Export the demo ERNIE into ``directory`` (created); returns it."""
    exe = str(Path(sys.executable).with_name("paddle-meter"))
    subprocess.run([exe, "models", "make-demo-ernie", str(directory)], check=True,
                   capture_output=True, timeout=600)
    return directory


def ernie_model(directory: Path, *, max_seq_len: int = 64) -> dict[str, Any]:
    """The ``models`` entry serving the demo ERNIE from ``directory`` as text classifier."""
    return {"kind": "ernie", "options": {"model_dir": str(directory),
                                         "task": "text_classification",
                                         "max_seq_len": max_seq_len}}
