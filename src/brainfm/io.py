"""Atomic writes: a file (or directory) appears complete at its final name or not at all.

DESIGN.md: "nothing half-written is left behind (write to a temporary name, then rename)". This
is that rule's one implementation. The temporary is a hidden sibling of the target,
``.<name>.tmp-<host>-<pid>-<random>`` (same folder, so ``os.replace`` is one rename(2) on one file
system; host and a random part beside the pid because workers on several nodes write into one
shared folder, and two nodes can run the same pid). It does not end in the target's suffix, so a
reader globbing ``*.json`` never sees a half-written file; ``keep_suffix=True`` repeats the suffix
at the end for writers that pick a format from the extension (matplotlib's ``savefig``). On an
error the temporary is deleted and the error propagates; the target keeps its old content.

The standard library has no atomic write (``tempfile`` makes temporaries, not the rename), and
the small packages that do (``atomicwrites``, archived) do not cover directories; so it is here.

Checkpoints written by several ranks (``brainfm.training.callbacks``) keep their own ``.<name>.tmp-<step>``
names: every rank must agree on the temporary without exchanging a pid.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_path(path: str | os.PathLike, *, keep_suffix: bool = False) -> Path:
    """A new temporary sibling of ``path``: ``.<name>.tmp-<host>-<pid>-<random>`` (``keep_suffix``:
    followed by ``path``'s suffix)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{_stamp()}{path.suffix if keep_suffix else ''}")


def _stamp() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_path(path: str | os.PathLike) -> None:
    """Delete a file, link or directory tree; nothing if it does not exist."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_path(path: str | os.PathLike, *, mkdir: bool = True, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; write the file there; on leaving the block it is
    renamed to ``path`` (``os.replace``, one atomic step over an existing file).

    Args:
        path: the final file.
        mkdir: create the parent folder first.
        keep_suffix: the temporary ends in ``path``'s suffix (for writers that choose the format by
            it, e.g. ``fig.savefig``); not where a reader globs the folder for that suffix.

    Raises:
        whatever the block raises, after deleting the temporary; ``IsADirectoryError`` /
        ``OSError`` where ``path`` is an existing directory (use :func:`atomic_dir`).
    """
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, keep_suffix=keep_suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mkdir: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`). Returns ``path``."""
    with atomic_path(path, mkdir=mkdir) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8", newline: str | None = None,
                      mkdir: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_path`); ``newline`` as :func:`open`'s
    (``""`` for CSV written by the :mod:`csv` module). Returns ``path``."""
    with atomic_path(path, mkdir=mkdir) as tmp:
        with open(tmp, "w", encoding=encoding, newline=newline) as f:
            f.write(text)
    return Path(path)


@contextmanager
def atomic_dir(path: str | os.PathLike, *, mkdir: bool = True) -> Iterator[Path]:
    """Yield a new, empty temporary directory beside ``path``; fill it; on leaving the block it
    takes ``path``'s place. rename(2) cannot replace a non-empty directory, so an existing
    ``path`` is first renamed aside (``.<name>.old-<host>-<pid>-<random>``), the new one renamed in, and the old one
    deleted: at every moment ``path`` is either the complete old or the complete new directory,
    except for the instant between the two renames.

    Raises:
        whatever the block raises, after deleting the temporary directory (``path`` unchanged).
    """
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    stamp = _stamp()
    tmp = path.with_name(f".{path.name}.tmp-{stamp}")
    tmp.mkdir()
    try:
        yield tmp
        if path.exists() or path.is_symlink():
            old = path.with_name(f".{path.name}.old-{stamp}")
            os.replace(path, old)
            os.replace(tmp, path)
            remove_path(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


__all__ = ["atomic_dir", "atomic_path", "atomic_write_bytes", "atomic_write_text", "remove_path", "temp_path"]
