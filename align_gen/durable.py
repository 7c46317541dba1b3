"""Writes that survive a crash, a kill or a full disk: nothing is half-written under its final name.

Every file a run keeps is written to a temporary name beside its target, flushed and fsync'd,
then renamed over the target (a rename within one folder is atomic on POSIX file systems), and
the folder is fsync'd so the rename itself is on disk. A folder is removed by first renaming it
to a name no reader looks at, so a kill half-way through a deletion never leaves a folder that
looks complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

# A folder renamed with this suffix is on its way out; readers ignore it, the next start removes it.
DELETING_SUFFIX = ".deleting"


def fsync_file(path: Path) -> None:
    """Flushes ``path``'s contents to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_dir(path: Path) -> None:
    """Flushes ``path``'s directory entries (creations, renames) to disk."""
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # platforms that cannot open a folder (Windows) have nothing to flush
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replaces ``path`` with ``data`` in one step: readers see the old file or the new one."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_dir(path.parent)


def remove_tree(path: Path) -> None:
    """Deletes folder ``path``: renamed first (one atomic step), then removed. A kill during the
    removal leaves ``<name>.deleting``, which :func:`clear_deleting` finishes."""
    path = Path(path)
    doomed = path.with_name(path.name + DELETING_SUFFIX)
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed)


def clear_deleting(folder: Path) -> None:
    """Finishes the removals a kill interrupted in ``folder``."""
    for doomed in Path(folder).glob("*" + DELETING_SUFFIX):
        shutil.rmtree(doomed, ignore_errors=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
