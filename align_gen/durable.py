"""Writes that survive a crash, a kill or a full disk: nothing is half-written under its final name.

Every file a run keeps is written to a temporary name beside its target, flushed and fsync'd,
then renamed over the target (a rename within one folder is atomic on POSIX file systems), and
the folder is fsync'd so the rename itself is on disk. A folder is removed by first renaming it
to a name no reader looks at, so a kill half-way through a deletion never leaves a folder that
looks complete.

Reading goes the other way: a user's text file that is not UTF-8 is one clear error
(:func:`read_user_text`), not a decoding traceback.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

# A folder renamed with this suffix is on its way out; readers ignore it, the next start removes it.
DELETING_SUFFIX = ".deleting"
# A folder being written; it gets its final name only once complete.
PARTIAL_SUFFIX = ".partial"


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


def read_user_text(path: Path) -> str:
    """The contents of a user's text file (prompts, captions, metadata), which must be UTF-8.

    Raises:
        ConfigError: the file is not UTF-8; the message gives the first bad byte's offset.
    """
    from align_gen.errors import ConfigError

    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); save it as UTF-8."
        ) from None


def file_in_the_way(path: Path, *, is_folder: bool) -> Path | None:
    """The existing file that stops ``path`` from being written: a parent folder that is a file,
    or ``path`` itself when it should be a folder (``is_folder``) but is a file, or should be a
    file but is a folder. None when nothing is in the way."""
    path = Path(path)
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            return parent
    if path.exists() and path.is_dir() != is_folder:
        return path
    return None


def write_folder_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Replaces folder ``path`` with what ``write(folder)`` puts in a fresh folder: written under
    ``<name>.partial``, every file fsync'd, then renamed into place (an old copy is renamed away
    and removed), so ``path`` is never a half-written folder."""
    path = Path(path)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write(partial)
    for file in sorted(p for p in partial.rglob("*") if p.is_file()):
        fsync_file(file)
    if path.exists():
        doomed = path.with_name(path.name + DELETING_SUFFIX)
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        os.replace(partial, path)
        fsync_dir(path.parent)
        shutil.rmtree(doomed)
    else:
        os.replace(partial, path)
        fsync_dir(path.parent)
