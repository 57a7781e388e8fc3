"""The one atomic writer: every file and directory autoperm writes appears whole or not at all.

A file is written to a temporary name in its target folder, flushed to disk (``fsync``), given
the mode a plain ``open()`` would have given it (``0o666 & ~umask``; ``mkstemp`` creates
``0o600``), and renamed onto the target. A directory is built the same way under a temporary
name and renamed once complete; its folders get ``0o777 & ~umask``. On any error the temporary
file or directory is removed and the error propagates unchanged (``OSError`` stays
``OSError``; callers that know what the file is turn it into their own error).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_directory", "atomic_file", "current_umask", "follow_umask", "write_text_atomic"]


def current_umask() -> int:
    """The process's file mode creation mask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give ``path`` the mode a plain ``open()`` or ``mkdir()`` would: ``0o666`` or ``0o777`` less the umask."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~current_umask())


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Give a temporary path to write; once the block ends without error it replaces ``path``.

    Args:
        path: the file to create or replace; its folder is created if needed.

    Yields:
        A temporary file (already created, empty) in ``path``'s folder, to be written by name.

    Raises:
        OSError: the folder or the temporary file cannot be created, or the data cannot be
            flushed or renamed; nothing is left behind.

    Example:
        >>> with atomic_file("model.pt") as temporary:
        ...     torch.save(state_dict, temporary)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        _flush(temporary)
        follow_umask(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Give a temporary directory to fill; once the block ends without error it is renamed to ``path``.

    Every file in it is flushed to disk and every entry gets the mode the umask gives new files
    and folders (files copied in from elsewhere too, whatever their source's mode).

    Args:
        path: the directory to create; it must not exist when the block ends.

    Yields:
        An empty temporary directory in ``path``'s folder.

    Raises:
        OSError: the folder cannot be created, or a flush or the rename fails (also when
            ``path`` exists by then); nothing is left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield temporary
        follow_umask(temporary)
        for child in temporary.rglob("*"):
            if child.is_file():
                _flush(child)
            follow_umask(child)
        os.rename(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_file`).

    Raises:
        OSError: the file cannot be written; nothing is left behind.
    """
    with atomic_file(path) as temporary, open(temporary, "w") as stream:
        stream.write(text)


def _flush(path: Path) -> None:
    """Make the data of ``path`` durable before it is renamed into place."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
