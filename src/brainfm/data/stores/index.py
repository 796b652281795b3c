"""The run index: one Parquet file that describes every run of a folder store.

Opening a store of 60,000 runs by listing its folders and parsing every ``meta.json`` costs
~225,000 metadata operations on Lustre per rank, at every start, requeue and Optuna trial. A store
with an index reads one file instead: ``<root>/index.parquet``, one row per run (subject, run,
n_frames, TR, shape, dtype, the byte size and data offset of the run's array, its per-run
statistics and the SHA-1 of its ``meta.json``), sorted by (subject, run). The columns beyond the
common ones belong to the store kind (:meth:`~brainfm.data.stores.rundir.RunDirStore.index_row`).

Writers (``brainfm-preprocess``, ``brainfm-data synth``, ``brainfm-data index``) add rows as runs
finish through :class:`IndexWriter`, which merges them into the file under an exclusive lock
(``fcntl.flock`` on ``<root>/.index.lock``; Lustre on Perlmutter supports it) and replaces the
file atomically (temporary name, then rename), so array tasks of one preprocessing job share one
index and a reader never sees a half-written file. A run that finished after the last flush (a
killed job) is found again when the job resumes: finished runs that the index lacks are re-indexed.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from brainfm.deprecations import current_columns
from brainfm.errors import DataError
from brainfm.io import atomic_path

INDEX = "index.parquet"
LOCK = ".index.lock"
INDEX_VERSION = 1
KEYS = ("subject", "run")


def index_path(root: str | os.PathLike) -> Path:
    return Path(root) / INDEX


def read_index(root: str | os.PathLike, kind: str, as_table: bool = False) -> dict[str, Any] | Any | None:
    """The index of the store at ``root`` as ``{column: list or numpy array}`` (``as_table``: the
    ``pyarrow.Table`` itself, whose string columns cost no Python object per run), or None without one.

    Raises:
        DataError: an unreadable index, or one written for another store kind or a newer brainfm.
    """
    import pyarrow.parquet as pq

    path = index_path(root)
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        return None
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a damaged file
        raise DataError(f"{path} is not a readable run index ({type(exc).__name__}: {exc}). Fix: rebuild it with "
                        f"`brainfm-data index {root}`") from exc
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if meta.get("brainfm_kind") != kind:
        raise DataError(f"{path} indexes a {meta.get('brainfm_kind')!r} store, not a {kind!r} one. Fix: rebuild it "
                        f"with `brainfm-data index {root}`")
    if int(meta.get("brainfm_index_version", 0)) > INDEX_VERSION:
        raise DataError(f"{path}: index version {meta['brainfm_index_version']} is newer than this brainfm "
                        f"({INDEX_VERSION}); upgrade brainfm")
    table = current_columns(table)
    if as_table:
        return table
    import pyarrow.types as pat

    out: dict[str, Any] = {}
    for name in table.column_names:
        col = table.column(name)
        numeric = pat.is_integer(col.type) or pat.is_floating(col.type) or pat.is_boolean(col.type)
        out[name] = col.to_numpy() if numeric and col.null_count == 0 else col.to_pylist()
    return out


def _table(rows: list[Mapping[str, Any]], kind: str):
    import pyarrow as pa

    rows = sorted(rows, key=lambda r: (str(r["subject"]), str(r["run"])))
    # every row's columns (from_pylist takes the first row's): rows of an older index merged with new rows
    # lack the new columns, which are null there
    names = list(dict.fromkeys(k for r in rows for k in r))
    table = pa.Table.from_pylist([{k: r.get(k) for k in names} for r in rows])
    meta = {"brainfm_kind": kind, "brainfm_index_version": str(INDEX_VERSION)}
    return table.replace_schema_metadata(meta)


def _write(root: Path, rows: list[Mapping[str, Any]], kind: str) -> Path:
    import pyarrow.parquet as pq

    path = index_path(root)
    with atomic_path(path) as tmp:
        pq.write_table(_table(rows, kind), tmp, compression="zstd")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    return path


@contextmanager
def locked(root: str | os.PathLike):
    """Hold the exclusive index lock of the store at ``root``."""
    Path(root).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(root) / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_index(root: str | os.PathLike, rows: Iterable[Mapping[str, Any]], kind: str) -> Path:
    """Replace the index of ``root`` with ``rows`` (one per run), atomically and under the lock."""
    with locked(root):
        return _write(Path(root), list(rows), kind)


def merge_into_index(root: str | os.PathLike, rows: Iterable[Mapping[str, Any]], kind: str,
                     remove: Iterable[tuple[str, str]] = ()) -> Path:
    """Add or replace ``rows`` (by subject and run) in the index of ``root`` and drop the runs in
    ``remove``, under the lock, replacing the file atomically.

    Raises:
        DataError: the existing index is unreadable or of another kind.
    """
    rows = list(rows)
    with locked(root):
        old = read_index(root, kind)
        new_keys = {(str(r["subject"]), str(r["run"])) for r in rows} | {(str(s), str(r)) for s, r in remove}
        kept: list[dict] = []
        if old is not None:
            names = list(old)
            for i in range(len(old["subject"])):
                if (str(old["subject"][i]), str(old["run"][i])) not in new_keys:
                    kept.append({n: _py(old[n][i]) for n in names})
        return _write(Path(root), kept + rows, kind)


def _py(value):
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value


class IndexWriter:
    """Collects index rows of finished runs and merges them into the index in batches.

    Args:
        root: the store. kind: store kind (recorded in the file). every_rows, every_seconds: flush
            after this many rows or seconds (whichever comes first); :meth:`close` flushes the rest.

    Use as a context manager; a run that finished after the last flush is re-indexed when the job
    resumes, so a kill loses no run.
    """

    def __init__(self, root: str | os.PathLike, kind: str, every_rows: int = 256, every_seconds: float = 60.0) -> None:
        self.root, self.kind = Path(root), kind
        self.every_rows, self.every_seconds = int(every_rows), float(every_seconds)
        self._rows: list[Mapping[str, Any]] = []
        self._removed: list[tuple[str, str]] = []
        self._last = time.monotonic()
        self.flushes = 0

    def add(self, row: Mapping[str, Any]) -> None:
        self._rows.append(row)
        if len(self._rows) >= self.every_rows or time.monotonic() - self._last >= self.every_seconds:
            self.flush()

    def remove(self, subject: str, run: str) -> None:
        self._removed.append((str(subject), str(run)))

    def flush(self) -> None:
        if self._rows or self._removed:
            merge_into_index(self.root, self._rows, self.kind, self._removed)
            self.flushes += 1
        self._rows, self._removed = [], []
        self._last = time.monotonic()

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "IndexWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
