"""Writes that happen whole or not at all (stdlib only, so the graph and plot code stay torch-free).

Every file the toolkit writes goes through here: a temp file in the destination's own folder (so the
final rename never crosses a file system), flushed to disk, then renamed over the destination. A
crash or a full disk leaves the old file (or none), never half of a new one, and no temp file behind.
Folders are swapped in with ``swap_dir``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_text", "swap_dir"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside ``path``; when the block ends without an error, rename it onto ``path``.

    The writer creates the temp file itself (``open``, ``savefig``...), so it gets the usual mode
    (0666 less the umask). On any error the temp file is removed and the error goes on.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file whole or not at all (temp file, fsync, rename)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def swap_dir(tmp: Path, final: Path) -> None:
    """Put a finished temp folder in place of ``final``: the old one is renamed aside, then dropped.

    A crash between the two renames leaves the old folder as ``.FINAL.*.old`` (runstate.recover_dir puts it back).
    """
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.old")
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
