"""Publishing a directory written under a temporary name, safely against concurrent writers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def publish_dir(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target`` in one step. When another process (e.g. another rank building
    the same cache) published ``target`` first, keep theirs and drop ``tmp``; the contents are
    the same by construction (the name is a hash of everything they depend on)."""
    try:
        os.rename(tmp, target)
    except OSError:
        if not target.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
