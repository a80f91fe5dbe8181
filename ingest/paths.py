"""Where circuitscope keeps its data on disk when the user does not say.

``CIRCUITSCOPE_HOME`` overrides the default ``~/.cache/circuitscope``.
"""

import os
from pathlib import Path


def home() -> Path:
    """The root directory for trained models, transcoders, artifacts and the embedded store."""
    root = os.environ.get("CIRCUITSCOPE_HOME")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "circuitscope"
