"""Folder stores: one directory per subject run (``<root>/<subject>/<run>/``), an array of TRs in it,
a ``meta.json`` written last, and the run index (:mod:`brainfm.data.stores.index`) beside them.

:class:`RunDirStore` is what the volume store and the grayordinate store share: opening from the
index (one file) or, for a store without one, from its ``meta.json`` files; lazy validation of a
run's array the first time a process reads it; reads with ``os.preadv`` straight into the caller's
buffer through a bounded cache of file descriptors (no memory map stays mapped, so a DataLoader
worker's resident memory does not grow with the runs it has read); and the helpers that write a run
folder atomically (a temporary folder renamed when complete).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from brainfm.data.stores.base import LRUCache, StoreBase, cache_sizes, ensure_out
from brainfm.data.stores.index import INDEX, read_index, write_index
from brainfm.data.stores.kinds import META, wrong_kind_message
from brainfm.deprecations import current_keys
from brainfm.errors import DataError
from brainfm.io import remove_stale_temps, replace_dir, temp_path

log = logging.getLogger(__name__)

_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
#: An index-less store with more runs than this logs a warning (every meta.json is read at open).
SCAN_WARN_RUNS = 1000


# -- names and atomic run folders -----------------------------------------------------------------------
def check_name(value: str, what: str) -> str:
    """A subject or run id usable as a folder name (letters, digits, ``._-``); DataError otherwise."""
    value = str(value)
    if not value or value.startswith(".") or not set(value) <= _SAFE or value == INDEX:
        raise DataError(
            f"{what} {value!r} cannot be a store folder name; use letters, digits, '.', '_' and '-' "
            "(not starting with '.')"
        )
    return value


def safe_name(value: str) -> str:
    """``value`` with characters outside ``[A-Za-z0-9._-]`` replaced by ``_``."""
    out = "".join(c if c in _SAFE else "_" for c in str(value)).lstrip(".")
    return out or "_"


def run_dir(root: str | os.PathLike, subject: str, run: str) -> Path:
    return Path(root) / check_name(subject, "subject id") / check_name(run, "run id")


def npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int, int]:
    """``(shape, dtype, expected file size, data offset)`` from a ``.npy`` header.

    Raises:
        DataError: not a readable ``.npy`` file, or a Fortran-ordered one. OSError: a missing file.
    """
    with open(path, "rb") as f:
        return _parse_npy_header(f, path)


def _parse_npy_header(f, path: Path) -> tuple[tuple[int, ...], np.dtype, int, int]:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except ValueError as exc:
        raise DataError(f"{path}: not a readable .npy file ({exc})") from exc
    offset = f.tell()
    if fortran:
        raise DataError(f"{path}: Fortran-ordered array; brainfm writes C order")
    dtype = np.dtype(dtype)
    return tuple(int(s) for s in shape), dtype, offset + int(np.prod(shape)) * dtype.itemsize, offset


def fsync_path(path: Path) -> None:
    """Flush a file or a directory entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` followed by ``fsync``."""
    with open(path, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


def temp_run_dir(root: str | os.PathLike, subject: str, run: str) -> Path:
    """A new hidden temporary folder beside ``<root>/<subject>/<run>`` (:func:`brainfm.io.temp_path`:
    ``.<run>.tmp-<host>-<pid>-<rand>``), after removing the ones killed writers on this host left behind."""
    final = run_dir(root, subject, run)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temp(root, subject, run)
    tmp = temp_path(final)
    tmp.mkdir()
    return tmp


@contextmanager
def staged_run_dir(root: str | os.PathLike, subject: str, run: str) -> Iterator[Path]:
    """A temporary folder for a run being written (:func:`temp_run_dir`), removed when the block
    ends unless :func:`publish_run_dir` moved it into place: a failed or interrupted write leaves nothing."""
    tmp = temp_run_dir(root, subject, run)
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_run_dir(tmp: Path, final: Path, meta: dict, meta_name: str = META) -> None:
    """Finish a run folder written under the temporary name ``tmp``: write its ``meta_name`` (the
    file whose presence marks a complete run) durably, then move it to ``final`` in one rename,
    replacing an existing folder (an overwrite, or a folder left without a complete meta file;
    :func:`brainfm.io.replace_dir`)."""
    with open(tmp / meta_name, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    replace_dir(tmp, final)
    fsync_path(final.parent)


def clean_stale_temp(root: str | os.PathLike, subject: str, run: str) -> list[Path]:
    """Remove temporary directories of ``run`` left by killed writers on this host
    (:func:`brainfm.io.remove_stale_temps`)."""
    return remove_stale_temps(Path(root) / subject / run)


def brainfm_version() -> str:
    try:
        from importlib.metadata import version

        return version("brainfm")
    except Exception:  # not installed (source checkout on the path)
        return "unknown"


# -- the shared reader -----------------------------------------------------------------------------------
class RunDirStore(StoreBase):
    """Base of the folder stores (module docstring). Subclasses set the class attributes and add
    their own index columns in :meth:`extra_row`.

    Runs are ordered by (subject, run); ``run`` everywhere is the position in that order.

    Args:
        root: the store folder.
        cache: sizes of the per-process caches (``data.cache``: ``open_runs``, ``masks``, ...).
        validate: check every run's array headers and sizes now (``True``; what
            ``brainfm-data validate`` does), instead of at the first read of each run in each process
            (default). A store without an index always checks them at open.

    Attributes:
        root / location: the folder. indexed: opened from ``index.parquet``. subject_ids, run_ids,
        lengths, trs: the run table. shapes: ``(n_runs, k)`` int64 frame shape of each run.
        frame_shape: the common frame shape (None when runs differ).

    Raises:
        DataError: a missing folder (or a store of another kind there, e.g. an ROI HDF5 file: named, with the
            recipe that reads it), no runs, an unreadable ``meta.json`` or index, or (at open without
            an index, or at first read with one) an array whose header disagrees with the record, or a
            truncated one.
    """

    kind: ClassVar[str] = "rundir"
    LAYOUT: ClassVar[str] = ""
    LAYOUT_VERSION: ClassVar[int] = 1
    ARRAY: ClassVar[str] = "bold.npy"
    DTYPE: ClassVar[np.dtype] = np.dtype(np.float16)
    FIX: ClassVar[str] = "Fix: write the run again (delete its folder first)."
    #: index columns that :meth:`run_stats` returns
    STATS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, root: str | os.PathLike, cache: Mapping[str, int] | None = None,
                 validate: bool = False) -> None:
        self.root = self.location = Path(root)
        if not self.root.is_dir():
            raise DataError(wrong_kind_message(self.root, self.kind) or self.missing_message())
        import pyarrow as pa

        table = read_index(self.root, self.kind, as_table=True)
        self.indexed = table is not None
        if table is None:
            rows = self.scan(self.root)
            if len(rows) > SCAN_WARN_RUNS:
                log.warning("%s has no run index: opening it read %d meta.json files and array headers. Write the "
                            "index once with `brainfm-data index %s`", self.root, len(rows), self.root)
            table = pa.Table.from_pylist(rows) if rows else None
        if table is None or table.num_rows == 0:
            raise DataError(f"{self.root} holds no runs (<subject>/<run>/{META}). Fix: write runs into it, or point "
                            "data.path at the store root")
        # numbers as numpy arrays; other columns stay Arrow arrays (no Python object per run and column)
        self._columns = {name: table.column(name) for name in table.column_names}
        self.complete_columns(self._columns, table.num_rows)
        self.subject_ids = table.column("subject").to_pylist()
        self.run_ids = table.column("run").to_pylist()
        self.lengths = table.column("n_frames").to_numpy().astype(np.int64)
        self.trs = table.column("tr").to_numpy().astype(np.float64)
        flat = pa.chunked_array(table.column("shape")).combine_chunks().flatten().to_numpy()
        self.shapes = np.asarray(flat, dtype=np.int64).reshape(table.num_rows, -1)
        self._offsets = table.column("data_offset").to_numpy().astype(np.int64)
        self._nbytes = table.column("nbytes").to_numpy().astype(np.int64)
        unique = {tuple(s) for s in self.shapes.tolist()}
        self.frame_shape: tuple[int, ...] | None = tuple(int(v) for v in next(iter(unique))) if len(unique) == 1 else None
        sizes = cache_sizes(cache)
        self._fds = LRUCache(sizes["open_runs"], on_evict=os.close)
        self._metas = LRUCache(64)
        self._validated = np.zeros(len(self.lengths), dtype=bool)  # runs whose headers this process checked
        self._pid = os.getpid()
        if validate and self.indexed:
            for i in range(len(self)):
                self.check_run(i)

    # -- what subclasses define -------------------------------------------------------------------------
    def missing_message(self) -> str:
        return f"store {self.root} does not exist"

    @classmethod
    def extra_row(cls, meta: dict) -> dict[str, Any]:
        """Index columns of one run beyond the common ones (its statistics), from its ``meta.json``."""
        return {}

    @classmethod
    def complete_columns(cls, columns: dict[str, Any], n_rows: int) -> None:
        """Add (in place) the columns :meth:`extra_row` writes that an index of an older brainfm lacks."""

    @classmethod
    def frame_shape_of(cls, meta: dict) -> tuple[int, ...]:
        raise NotImplementedError

    @classmethod
    def check_files(cls, rdir: Path, meta: dict) -> None:
        """Check the run's other files (masks, statistics) at a full validation."""

    # -- index rows ---------------------------------------------------------------------------------------
    @classmethod
    def read_run_meta(cls, rdir: Path) -> tuple[dict, str]:
        """``(meta.json as a dict, its SHA-1)`` of a run folder, checked to be of this store's layout."""
        path = rdir / META
        try:
            raw = path.read_bytes()
            meta = json.loads(raw)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path} is unreadable ({exc}). {cls.FIX}") from exc
        if not isinstance(meta, dict) or meta.get("layout") != cls.LAYOUT:
            found = meta.get("layout") if isinstance(meta, dict) else None
            raise DataError(f"{path} is not a brainfm {cls.kind} run (layout {found!r}). {cls.FIX}")
        if int(meta.get("layout_version", 0)) > cls.LAYOUT_VERSION:
            raise DataError(f"{path}: layout version {meta['layout_version']} is newer than this brainfm "
                            f"({cls.LAYOUT_VERSION}); upgrade brainfm")
        return current_keys(meta), hashlib.sha1(raw).hexdigest()

    @classmethod
    def index_row(cls, rdir: Path) -> dict[str, Any]:
        """The index row of one finished run folder, with its array header checked against ``meta.json``.

        Raises:
            DataError: unreadable ``meta.json``, a run in the wrong folder, a missing, mismatched or
                truncated array.
        """
        meta, sha1 = cls.read_run_meta(rdir)
        try:
            subject, run = str(meta["subject"]), str(meta["run"])
            n, tr = int(meta["n_frames"]), float(meta["tr"])
            frame = tuple(int(s) for s in cls.frame_shape_of(meta))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{rdir / META} lacks a field ({exc}). {cls.FIX}") from exc
        if (subject, run) != (rdir.parent.name, rdir.name):
            raise DataError(f"{rdir / META} says subject {subject!r} run {run!r} but lies in "
                            f"{rdir.parent.name}/{rdir.name}")
        path = rdir / cls.ARRAY
        where = f"(subject {subject}, run {run})"
        if not path.is_file():
            raise DataError(f"{path} is missing {where}. {cls.FIX}")
        shape, dtype, size, offset = npy_layout(path)
        cls._check_header(path, shape, dtype, (n, *frame), where)
        actual = path.stat().st_size
        if actual < size:
            raise DataError(f"{path} is truncated: {actual} bytes of {size} {where}. {cls.FIX}")
        cls.check_files(rdir, meta)
        return {"subject": subject, "run": run, "n_frames": n, "tr": tr, "shape": list(frame),
                "dtype": str(dtype), "data_offset": int(offset), "nbytes": int(size), "meta_sha1": sha1,
                **cls.extra_row(meta)}

    @classmethod
    def _check_header(cls, path: Path, shape, dtype, want: tuple, where: str) -> None:
        if tuple(shape) != tuple(want) or np.dtype(dtype) != cls.DTYPE:
            raise DataError(f"{path} holds {np.dtype(dtype)} {tuple(shape)} but meta.json says {cls.DTYPE} "
                            f"{tuple(want)} {where}. {cls.FIX}")

    @classmethod
    def run_folders(cls, root: Path) -> list[Path]:
        """Finished-looking run folders (``<subject>/<run>/meta.json``, no hidden parts), sorted."""
        out = []
        for meta_path in sorted(Path(root).glob(f"*/*/{META}")):
            rdir = meta_path.parent
            if not (rdir.name.startswith(".") or rdir.parent.name.startswith(".")):
                out.append(rdir)
        return out

    @classmethod
    def scan(cls, root: Path) -> list[dict[str, Any]]:
        """Index rows of every run folder under ``root`` (reads every ``meta.json``: index-less stores)."""
        return [cls.index_row(rdir) for rdir in cls.run_folders(root)]

    @classmethod
    def build_index(cls, root: str | os.PathLike) -> Path:
        """Write ``<root>/index.parquet`` from the run folders (``brainfm-data index``)."""
        rows = cls.scan(Path(root))
        if not rows:
            raise DataError(f"{root} holds no runs (<subject>/<run>/{META}) to index")
        return write_index(root, rows, cls.kind)

    # -- reading -------------------------------------------------------------------------------------------
    def path(self, run: int) -> Path:
        """The run's folder."""
        return self.root / self.subject_ids[run] / self.run_ids[run]

    def describe_run(self, run: int) -> str:
        return f"subject {self.subject_ids[run]} ({self.run_ids[run]}, {self.path(run)})"

    def meta(self, run: int) -> dict:
        """The run's ``meta.json`` (read on first use; a small cache per process)."""
        return self._metas.get(run, lambda: self.read_run_meta(self.path(run))[0])

    def column(self, name: str) -> list:
        """One index column (one value per run), e.g. ``normalization`` or ``global_std``.

        Raises:
            KeyError: a column this store kind does not record.
        """
        return self._columns[name].to_pylist()

    def run_stats(self, run: int) -> dict[str, Any]:
        """``n`` (TRs) and the run's :attr:`STATS` columns of the index (nothing is read)."""
        out: dict[str, Any] = {"n": int(self.lengths[run])}
        for key in self.STATS:
            out[key] = self._columns[key][run].as_py()
        return out

    def check_run(self, run: int) -> None:
        """Check the run's array against the index: header, dtype and size (and its other files).

        Raises:
            DataError: a missing, mismatched or truncated file (named, with the fix).
        """
        row = self.index_row(self.path(run))
        want = (int(self.lengths[run]), *(int(v) for v in self.shapes[run]))
        if tuple([row["n_frames"], *row["shape"]]) != want or row["data_offset"] != self._offsets[run]:
            raise DataError(f"{self.path(run) / self.ARRAY} no longer matches {self.root / INDEX} (the run was "
                            f"rewritten after indexing). Fix: `brainfm-data index {self.root}`")

    def validate(self) -> list[str]:
        """Every problem of the store, for ``brainfm-data validate``: runs whose files are missing,
        mismatched or truncated, and (with an index) run folders the index lacks or rows without a folder.
        Reads every run's headers (not its data)."""
        problems = []
        if self.indexed:
            on_disk = {(r.parent.name, r.name) for r in self.run_folders(self.root)}
            listed = set(zip(self.subject_ids, self.run_ids))
            for subject, run in sorted(on_disk - listed)[:20]:
                problems.append(f"{self.root / subject / run} is not in {self.root / INDEX}; run "
                                f"`brainfm-data index {self.root}`")
            for subject, run in sorted(listed - on_disk)[:20]:
                problems.append(f"{self.root / INDEX} lists {subject}/{run}, which has no finished run folder")
        for i in range(len(self)):
            try:
                self.check_run(i)
            except DataError as exc:
                problems.append(str(exc))
        return problems

    def _fd(self, run: int) -> int:
        def open_run() -> int:
            path = self.path(run) / self.ARRAY
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise DataError(f"{path} is missing ({self.describe_run(run)}). {self.FIX}") from None
            if not self._validated[run]:  # lazy validation: header and size, once per process
                try:
                    with os.fdopen(os.dup(fd), "rb") as f:
                        shape, dtype, size, offset = _parse_npy_header(f, path)
                    want = (int(self.lengths[run]), *(int(v) for v in self.shapes[run]))
                    self._check_header(path, shape, dtype, want, f"({self.describe_run(run)})")
                    actual = os.fstat(fd).st_size
                    if actual < size or offset != int(self._offsets[run]):
                        raise DataError(f"{path} is truncated or rewritten: {actual} bytes of {size}, data at byte "
                                        f"{offset} (index: {int(self._offsets[run])}) ({self.describe_run(run)}). "
                                        f"{self.FIX}")
                except BaseException:
                    os.close(fd)
                    raise
                self._validated[run] = True
            return fd

        if self._pid != os.getpid():
            self._validated, self._pid = np.zeros(len(self.lengths), dtype=bool), os.getpid()
        return self._fds.get(run, open_run)

    def read(self, run: int, start: int = 0, stop: int | None = None, stride: int = 1,
             out: np.ndarray | None = None) -> np.ndarray:
        """TRs ``start, start + stride, ... < stop`` of run ``run``: ``(n, *frame_shape)`` in the stored dtype.

        Read with ``os.preadv`` into ``out`` (a C-contiguous array of that shape and dtype, e.g. a
        shared-memory batch buffer) or a new array, which is returned read-only.

        Raises:
            IndexError: TRs outside the run. DataError: a missing, mismatched or truncated array.
            ValueError: an ``out`` of the wrong shape or dtype.
        """
        frames = self._frames(run, start, stop, stride)
        frame = tuple(int(v) for v in self.shapes[run])
        fresh = out is None
        out = ensure_out(out, (len(frames), *frame), self.DTYPE, self.describe_run(run))
        fd = self._fd(run)
        frame_bytes = int(np.prod(frame)) * self.DTYPE.itemsize
        base = int(self._offsets[run])
        if stride == 1:
            parts = [(memoryview(out.reshape(-1).view(np.uint8)), base + frames.start * frame_bytes)]
        else:
            parts = [(memoryview(out[k].reshape(-1).view(np.uint8)), base + t * frame_bytes) for k, t in enumerate(frames)]
        for view, offset in parts:
            got = os.preadv(fd, [view], offset)
            if got != view.nbytes:
                raise DataError(f"{self.path(run) / self.ARRAY}: short read ({got} of {view.nbytes} bytes at {offset}); "
                                f"the file is truncated ({self.describe_run(run)}). {self.FIX}")
        if fresh:
            out.flags.writeable = False
        return out

    def memmap(self, run: int) -> np.memmap:
        """Read-only memory map of the run's whole array (not cached)."""
        return np.load(self.path(run) / self.ARRAY, mmap_mode="r")

    def close(self) -> None:
        self._fds.clear()

    def __del__(self) -> None:
        try:
            self._fds.clear()
        except Exception:
            pass
