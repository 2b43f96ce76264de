"""Writing files that hold secrets (private keys)."""

from __future__ import annotations

import os
from pathlib import Path


def write_new_file(path: Path, data: bytes, mode: int, replace: bool = False) -> None:
    """Create the file with its mode from the start, so a key is never readable by others, not even briefly.

    Raises FileExistsError when the file is there, unless ``replace``.
    """
    if replace:
        path.unlink(missing_ok=True)  # O_EXCL below also refuses to write through a link planted there
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, mode)  # the umask may have taken bits away, or left more
        f.write(data)
