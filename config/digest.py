"""File digests shared by every package of the node (storage, the worker, model packages)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file.

    Parameters
    ----------
    path
        The file to read.

    Returns
    -------
    str
        64 lower-case hex digits.
    """
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
