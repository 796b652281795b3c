"""Atomic writes: a file (or directory) appears complete at its final name or not at all.

DESIGN.md: "nothing half-written is left behind (write to a temporary name, then rename)". This
is that rule's one implementation. The temporary is a hidden sibling of the target,
``.<name>.tmp-<host>-<pid>-<random>`` (same folder, so ``os.replace`` is one rename(2) on one file
system; host and a random part beside the pid because workers on several nodes write into one
shared folder, and two nodes can run the same pid). It does not end in the target's suffix, so a
reader globbing ``*.json`` never sees a half-written file; ``keep_suffix=True`` repeats the suffixes
at the end for writers that pick a format from the extension (matplotlib's ``savefig``, nibabel's
``.nii.gz``). On an error the temporary is deleted and the error propagates; the target keeps its old
content. A writer killed outright (SIGKILL, a node lost) leaves its temporary behind: host and pid in
the name let the next writer on that host delete it (:func:`remove_stale_temps`).

- :func:`atomic_path` / :func:`atomic_dir`: a ``with`` block writes the temporary, leaving it renames.
- :class:`PendingFile` / :class:`PendingDir`: the same for a writer that lives longer than one block (a
  streaming HDF5 or Parquet writer): ``.tmp`` now, :meth:`~PendingFile.commit` or
  :meth:`~PendingFile.discard` later.
- :func:`atomic_write_text` / :func:`atomic_write_bytes`: one call.

The standard library has no atomic write (``tempfile`` makes temporaries, not the rename), and
the small packages that do (``atomicwrites``, archived) do not cover directories; so it is here.

Checkpoints written by several ranks (``brainfm.training.callbacks``) keep their own ``.<name>.tmp-<step>``
names: every rank must agree on the temporary without exchanging a pid.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_path(path: str | os.PathLike, *, keep_suffix: bool = False) -> Path:
    """A new temporary sibling of ``path``: ``.<name>.tmp-<host>-<pid>-<random>`` (``keep_suffix``:
    followed by ``path``'s suffixes, ``.nii.gz`` whole). Nothing is created."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{_stamp()}{''.join(path.suffixes) if keep_suffix else ''}")


def _stamp() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_path(path: str | os.PathLike) -> None:
    """Delete a file, link or directory tree; nothing if it does not exist."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temporaries of ``path`` (:func:`temp_path` names, files or folders) that writers killed
    on this host left behind: those whose pid no longer runs. Temporaries of other hosts, and of live
    processes, are kept (they may still be written). Returns what was deleted."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    name = re.compile(rf"\.{re.escape(path.name)}\.tmp-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{{8}}(\..*)?")
    host = socket.gethostname()
    removed = []
    for p in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        m = name.fullmatch(p.name)
        if m and m["host"] == host and not _pid_alive(int(m["pid"])):
            try:
                remove_path(p)
            except FileNotFoundError:  # another writer on this host cleaned it first
                continue
            removed.append(p)
    return removed


def replace_dir(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Rename the complete directory ``tmp`` to ``path``. rename(2) cannot replace a non-empty directory,
    so an existing ``path`` is first renamed aside (``.<name>.old-<host>-<pid>-<random>``), the new one
    renamed in, and the old one deleted: at every moment ``path`` is either the complete old or the
    complete new directory, except for the instant between the two renames. Returns ``path``.

    Raises:
        OSError: from the renames (``tmp`` missing, another file system).
    """
    tmp, path = Path(tmp), Path(path)
    if path.exists() or path.is_symlink():
        old = path.with_name(f".{path.name}.old-{_stamp()}")
        os.replace(path, old)
        os.replace(tmp, path)
        remove_path(old)
    else:
        os.replace(tmp, path)
    return path


class PendingFile:
    """A file being written under a temporary name (:func:`temp_path`) beside its final ``path``, for a
    writer that outlives one ``with`` block (use :func:`atomic_path` otherwise): write ``.tmp``, then
    :meth:`commit` renames it to ``path`` in one step (over an existing file), or :meth:`discard`
    deletes it. Call :meth:`discard` in a ``finally``: after a commit it does nothing.

    Args:
        path: the final file.
        mkdir: create the parent folder now.
        keep_suffix: the temporary ends in ``path``'s suffixes (:func:`temp_path`).

    Attributes:
        path: the final file. tmp: the temporary (not created: the writer creates it).
    """

    def __init__(self, path: str | os.PathLike, *, mkdir: bool = True, keep_suffix: bool = False) -> None:
        self.path = Path(path)
        if mkdir:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_path(self.path, keep_suffix=keep_suffix)
        self.done = False

    def _move_in(self) -> None:
        os.replace(self.tmp, self.path)

    def commit(self) -> Path:
        """Rename the temporary to ``path``. Returns ``path``.

        Raises:
            RuntimeError: committed or discarded before. OSError: from the rename (``IsADirectoryError`` /
            ``OSError`` where ``path`` is an existing directory; the temporary stays until :meth:`discard`).
        """
        if self.done:
            raise RuntimeError(f"{self.path}: its temporary {self.tmp.name} was already committed or discarded")
        self._move_in()
        self.done = True
        return self.path

    def discard(self) -> None:
        """Delete the temporary (``path`` keeps what it held); nothing after :meth:`commit`."""
        if not self.done:
            self.done = True
            remove_path(self.tmp)


class PendingDir(PendingFile):
    """A directory being filled under a temporary name beside ``path`` (:class:`PendingFile`; ``.tmp``
    exists, empty, from the start); :meth:`commit` puts it in ``path``'s place (:func:`replace_dir`: an
    existing directory is replaced whole).

    Args:
        path: the final directory. mkdir: create the parent folder now.
    """

    def __init__(self, path: str | os.PathLike, *, mkdir: bool = True) -> None:
        super().__init__(path, mkdir=mkdir)
        self.tmp.mkdir()

    def _move_in(self) -> None:
        replace_dir(self.tmp, self.path)


@contextmanager
def _committed(pending: PendingFile) -> Iterator[Path]:
    try:
        yield pending.tmp
        pending.commit()
    finally:
        pending.discard()


@contextmanager
def atomic_path(path: str | os.PathLike, *, mkdir: bool = True, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; write the file there; on leaving the block it is
    renamed to ``path`` (``os.replace``, one atomic step over an existing file; :class:`PendingFile`).

    Args:
        path: the final file.
        mkdir: create the parent folder first.
        keep_suffix: the temporary ends in ``path``'s suffixes (for writers that choose the format by
            them, e.g. ``fig.savefig``, ``nib.save``); not where a reader globs the folder for that suffix.

    Raises:
        whatever the block raises, after deleting the temporary; ``IsADirectoryError`` /
        ``OSError`` where ``path`` is an existing directory (use :func:`atomic_dir`).
    """
    with _committed(PendingFile(path, mkdir=mkdir, keep_suffix=keep_suffix)) as tmp:
        yield tmp


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
    takes ``path``'s place (:class:`PendingDir`, :func:`replace_dir`).

    Raises:
        whatever the block raises, after deleting the temporary directory (``path`` unchanged).
    """
    with _committed(PendingDir(path, mkdir=mkdir)) as tmp:
        yield tmp


__all__ = ["PendingDir", "PendingFile", "atomic_dir", "atomic_path", "atomic_write_bytes", "atomic_write_text",
           "remove_path", "remove_stale_temps", "replace_dir", "temp_path"]


def save_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """Save a matplotlib figure atomically (:func:`atomic_path`; the format from ``path``'s suffix, as
    ``fig.savefig`` picks it) and close it, also when saving fails. Returns ``path``.

    Raises:
        whatever ``fig.savefig`` raises (nothing is left at ``path``'s temporary name).
    """
    import matplotlib.pyplot as plt  # only where a figure is saved: matplotlib is no import of the base layer

    try:
        with atomic_path(path, keep_suffix=True) as tmp:
            fig.savefig(tmp, **savefig_kwargs)
    finally:
        plt.close(fig)
    return Path(path)
