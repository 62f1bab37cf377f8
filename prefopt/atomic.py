"""Publishing a directory written under a temporary name, safely against concurrent writers, and
the file checksums that tell a complete copy from a damaged one."""

from __future__ import annotations

import hashlib
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


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
