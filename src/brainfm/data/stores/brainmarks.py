"""Brainmarks' data sets: Hugging Face Arrow folders read as an ROI store, and ROI stores written as one.

Brainmarks (MedARC, ``pip install brainmarks``; arXiv 2510.13768), the field's evaluation suite,
keeps each data set as a ``datasets`` ``DatasetDict.save_to_disk`` folder::

    <root>/<name>.<space>.arrow/
        dataset_dict.json
        train/       data-*.arrow, dataset_info.json, state.json
        validation/  ...
        test/        ...

one row per sample (a run, or a window of one), with the columns (MedARC's ``fmri-fm-eval`` data
scripts, ``datasets/*/scripts/make_*.py``)::

    bold   Array2D((None, dim), float16)  (T, dim) z-scored over time per dimension (a dimension constant
                                          over the sample: 0, with mean 0 and std 0)
    mean   Array2D((1, dim), float32)     the mean and (population) standard deviation the sample was
    std    Array2D((1, dim), float32)     z-scored with: bold * std + mean is the signal before scaling
    tr     float32                        repetition time, seconds
    sub    string                         subject id
    ...    targets and metadata           gender (string), age_q (int32), cond_id, path, start, end, ...

``space`` is a key of ``brainmarks.readers.DATA_DIMS`` (:data:`brainfm.data.atlases.BRAINMARKS_SPACES`:
``schaefer400`` 400, ``schaefer400_tians3`` 450, ``schaefer400_tians3_buckner7`` 457, ``a424`` 424, ...).

:class:`BrainmarksStore` reads such a folder with ``datasets`` (memory-mapped, nothing copied; a
sample is decoded when a window of it is first read, in a bounded cache) as an ROI store: one run per
sample, in the order train, validation, test; ``read`` gives the signal before Brainmarks' scaling
(``bold * std + mean``) and ``run_stats`` the stored ``mean``/``std``, so brainfm's
``data.normalization.mode=run`` gives back Brainmarks' ``bold`` exactly as stored, ``global`` pools the
unscaled signal and ``none`` is the unscaled signal. Every scalar column other than ``sub`` and ``tr``
is a per-run label (:meth:`BrainmarksStore.run_labels`, as ``/labels/<name>`` of an ROI HDF5 file).

:func:`brainfm.data.stores.brainmarks_writer.write_brainmarks` writes any brainfm ROI store (HDF5, or
another Brainmarks folder) with its per-run labels in that layout (``brainfm-data to-brainmarks``).

``datasets`` is imported only here, when a Brainmarks folder is read or written (``pip install
datasets``); its progress bars and info logging are switched off while brainfm calls it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from brainfm.data.atlases import BRAINMARKS_SPACES
from brainfm.data.stores.base import LRUCache, StoreBase, cache_sizes, ensure_out
from brainfm.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: Brainmarks' split folders and brainfm's names for them
SPLITS: dict[str, str] = {"train": "train", "validation": "val", "test": "test"}
#: columns that are the sample itself, not a label
SAMPLE_COLUMNS = ("bold", "mean", "std", "tr", "sub")
#: columns :func:`write_brainmarks` adds besides the labels
WRITTEN_COLUMNS = (*SAMPLE_COLUMNS, "run", "n_frames")
#: a standard deviation at or below this is a constant dimension (Brainmarks' ``nisc.scale`` default)
EPS = 1e-6
_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


def _datasets():
    """The ``datasets`` module, or a ConfigError with the install command."""
    try:
        import datasets
    except ImportError as exc:
        raise ConfigError("Brainmarks data (Hugging Face Arrow folders) are read and written with the `datasets` "
                          "package, which is not installed. Fix: pip install datasets "
                          "(or pip install 'brainfm[brainmarks]')") from exc
    return datasets


@contextmanager
def quiet_datasets() -> Iterator[Any]:
    """``datasets`` with its progress bars and info/warning logging off (restored afterwards): brainfm
    reports what it read or wrote itself."""
    hf = _datasets()
    from datasets.utils import logging as hf_logging

    bars_were_off = hf_logging.is_progress_bar_enabled() is False
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield hf
    finally:
        hf_logging.set_verbosity(level)
        if not bars_were_off:
            hf_logging.enable_progress_bar()


def split_name(path: str | os.PathLike) -> tuple[str, str | None]:
    """``(name, space)`` of a folder named ``<name>.<space>.arrow`` (``hcpya-rest1lr.schaefer400.arrow`` ->
    ``("hcpya-rest1lr", "schaefer400")``); ``(folder name, None)`` for any other name."""
    base = Path(path).name
    if base.endswith(".arrow") and "." in base[: -len(".arrow")]:
        name, space = base[: -len(".arrow")].rsplit(".", 1)
        if name and space:
            return name, space
    return base, None


def load_splits(path: str | os.PathLike) -> dict[str, Any]:
    """The three splits of a Brainmarks folder as ``{"train"|"validation"|"test": datasets.Dataset}``,
    memory-mapped (``datasets.load_from_disk`` on a ``save_to_disk`` split; a split folder holding only
    ``*.arrow`` files, as Brainmarks' own loader accepts, is read with ``Dataset.from_file``).

    Raises:
        DataError: no folder at ``path``, a missing split folder, a split without Arrow files or one
            ``datasets`` cannot read (file named, with the fix).
        ConfigError: ``datasets`` is not installed.
    """
    path = Path(path)
    fix = ("Fix: data.path=<root>/<name>.<space>.arrow, the folder holding train/, validation/ and test/ "
           "(Brainmarks' layout; `brainfm-data to-brainmarks <store.h5> <out>` writes one)")
    if not path.exists():
        raise DataError(f"Brainmarks data set {path} does not exist. {fix}")
    if not path.is_dir():
        raise DataError(f"{path} is a file, not a Brainmarks data set folder. {fix}")
    missing = [s for s in SPLITS if not (path / s).is_dir()]
    if missing:
        found = sorted(p.name for p in path.iterdir())[:10]
        raise DataError(f"{path} has no split folder(s) {missing} (found: {found or 'nothing'}); a Brainmarks "
                        f"data set holds train/, validation/ and test/. {fix}")
    out = {}
    with quiet_datasets() as hf:
        for split in SPLITS:
            folder = path / split
            files = sorted(folder.glob("*.arrow"))
            if not files:
                raise DataError(f"{folder} holds no *.arrow file; write the split again ({fix})")
            try:
                if (folder / "state.json").is_file():
                    ds = hf.load_from_disk(str(folder))
                else:
                    parts = [hf.Dataset.from_file(str(f)) for f in files]
                    ds = parts[0] if len(parts) == 1 else hf.concatenate_datasets(parts)
            except Exception as exc:  # datasets raises many kinds for a broken folder; name it
                raise DataError(f"{folder} cannot be read as a Hugging Face Arrow split ({type(exc).__name__}: "
                                f"{exc}). Fix: write it again with datasets' save_to_disk") from exc
            if not isinstance(ds, hf.Dataset):
                raise DataError(f"{folder} holds a DatasetDict, not one split; point data.path at its parent")
            out[split] = ds
    return out


def _column(ds, name: str) -> Any:
    """A column of a split as a ``pyarrow.ChunkedArray`` (no Python object per row)."""
    return ds.data.column(name)


def _lengths(ds, where: str) -> np.ndarray:
    """TRs of every sample of a split, from the Arrow list offsets of ``bold`` (no sample is read)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out = []
    for chunk in _column(ds, "bold").chunks:
        storage = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
        if not pa.types.is_list(storage.type) and not pa.types.is_large_list(storage.type):
            raise DataError(f"{where}: column 'bold' is {chunk.type}, not a (T, dim) array per sample")
        out.append(np.asarray(pc.list_value_length(storage).to_numpy(zero_copy_only=False)))
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)


def _values(ds, name: str) -> np.ndarray:
    """One scalar column of a split as a numpy array (strings as ``str``; missing numbers NaN)."""
    col = _column(ds, name)
    import pyarrow as pa

    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return np.array(["" if v is None else v for v in col.to_pylist()], dtype=object).astype(str)
    return np.asarray(col.to_numpy())


class BrainmarksStore(StoreBase):
    """A Brainmarks data set folder ``<name>.<space>.arrow`` read as an ROI store (module docstring).

    Runs are the samples of ``train``, ``validation`` and ``test``, in that order (:attr:`split_of_run`,
    :meth:`split_runs`); ``run_ids`` are ``<split>/<row>``. The folder is opened with ``datasets``
    (:func:`load_splits`) in each process that reads it (safe with DataLoader workers); opening reads the
    ``sub``, ``tr`` and list lengths of ``bold`` only.

    Shapes and units: ``read(run, start, stop, stride)`` -> ``(n, dim)`` float32, the sample before
    Brainmarks' scaling (``bold * std + mean``); ``run_stats(run)`` -> ``n`` (TRs), ``mean`` and ``std``
    ``(dim,)`` float64, the stored ones (a dimension stored with std 0, constant over the sample: mean 0,
    std 1, so that ``run`` z-scoring gives its stored zeros); ``trs`` ``(n_runs,)`` seconds from ``tr``;
    ``frame_shape`` ``(dim,)``.

    Attributes: ``kind`` ``"roi"`` (its frames are ROI vectors: every reader of ROI windows takes it),
    ``layout`` ``"brainmarks"``, ``name`` and ``space`` (from the folder name), ``atlas`` (the space, else
    the folder name), ``n_rois``, ``roi_names`` (None: Brainmarks stores none), ``roi_mask`` (None),
    ``run_label_names``.

    Args:
        path: the ``<name>.<space>.arrow`` folder.
        cache: ``data.cache`` sizes (``open_runs``: decoded samples a process keeps; ``run_stats``).

    Raises:
        DataError: as :func:`load_splits`; a split without a ``bold``, ``mean``, ``std``, ``tr`` or ``sub``
            column, splits of different dimensions, a space whose dimension is not the data's, a non-positive
            TR. ConfigError: ``datasets`` is not installed.
    """

    kind = "roi"
    layout = "brainmarks"

    def __init__(self, path: str | os.PathLike, cache: Mapping[str, int] | None = None) -> None:
        self.path = self.location = Path(path)
        splits = load_splits(self.path)
        self.name, self.space = split_name(self.path)
        subjects, trs, lengths, split_of, run_ids, dims = [], [], [], [], [], set()
        labels: dict[str, list[np.ndarray]] = {}
        names: list[str] | None = None
        for split, ds in splits.items():
            where = f"{self.path / split}"
            absent = [c for c in SAMPLE_COLUMNS if c not in ds.column_names]
            if absent:
                raise DataError(f"{where} has no column(s) {absent} (columns: {ds.column_names}); a Brainmarks "
                                "sample holds bold (T, dim), mean and std (1, dim), tr (s) and sub")
            n = len(ds)
            subjects.extend(str(s) for s in _values(ds, "sub"))
            trs.append(np.round(np.asarray(_values(ds, "tr"), dtype=np.float64), 6))  # float32 0.72 -> 0.72
            lengths.append(_lengths(ds, where))
            split_of.extend([SPLITS[split]] * n)
            run_ids.extend(f"{split}/{i}" for i in range(n))
            dims.add(self._dim(ds, where))
            scalar = [c for c in ds.column_names if c not in SAMPLE_COLUMNS and self._is_scalar(ds, c)]
            names = scalar if names is None else [c for c in names if c in scalar]
            for c in scalar:
                labels.setdefault(c, []).append(_values(ds, c))
        dims.discard(None)
        if len(dims) > 1:
            raise DataError(f"{self.path}: the splits hold samples of different dimensions {sorted(dims)}")
        self.subject_ids = subjects
        self.run_ids = run_ids
        self.split_of_run = np.array(split_of)
        self.lengths = np.concatenate(lengths)
        self._trs = np.concatenate(trs)
        self.run_label_names = sorted(names or [])
        self._labels = {c: np.concatenate(labels[c]) for c in self.run_label_names}
        self._split_sizes = {s: len(ds) for s, ds in splits.items()}
        if dims:
            self.n_rois = int(dims.pop())
        else:  # no fixed shape in the schema: the first sample's
            first = next(ds for ds in splits.values() if len(ds))
            self.n_rois = int(np.asarray(first.with_format("numpy")[0]["bold"]).shape[-1])
        if self.space in BRAINMARKS_SPACES and BRAINMARKS_SPACES[self.space] != self.n_rois:
            raise DataError(f"{self.path} is named for Brainmarks space {self.space!r} ({BRAINMARKS_SPACES[self.space]} "
                            f"dimensions) but its samples have {self.n_rois}; rename the folder or write it again")
        bad = np.flatnonzero(~(self._trs > 0))
        if len(bad):
            raise DataError(f"{self.path}: {self.describe_run(int(bad[0]))} has tr={self._trs[bad[0]]!r}; a Brainmarks "
                            "sample's tr is its repetition time in seconds. Fix the data set's tr column")
        self.atlas = self.space or self.name
        self.roi_names: list[str] | None = None
        self.roi_mask = None
        self.frame_shape = (self.n_rois,)
        self.has_run_stats = True
        self.attrs = {"layout": "brainmarks", "name": self.name, "space": self.space}
        self._tr_override: float | None = None
        sizes = cache_sizes(cache)
        self._samples = LRUCache(sizes["open_runs"])
        self._stats = LRUCache(sizes["run_stats"])
        self._splits: dict[str, Any] | None = splits
        self._pid: int | None = os.getpid()

    @staticmethod
    def _dim(ds, where: str) -> int | None:
        """``dim`` of the ``bold`` feature (``Array2D((None, dim))``), None when the schema does not fix it."""
        feature = ds.features["bold"]
        shape = getattr(feature, "shape", None)
        if shape is not None:
            if len(shape) != 2:
                raise DataError(f"{where}: 'bold' has shape {shape}; a Brainmarks sample is (T, dim)")
            return int(shape[1])
        return None

    @staticmethod
    def _is_scalar(ds, column: str) -> bool:
        return type(ds.features[column]).__name__ in ("Value", "ClassLabel")

    # -- the run table -------------------------------------------------------------------------------------
    @property
    def trs(self) -> np.ndarray:
        """``(n_runs,)`` seconds: each sample's ``tr``."""
        return self._trs if self._tr_override is None else np.full(len(self._trs), self._tr_override)

    @property
    def tr(self) -> float | None:
        """The TR every sample shares (seconds), or None when they differ."""
        return StoreBase.tr.fget(self)

    @tr.setter
    def tr(self, value: float | None) -> None:
        """The datamodules assign the TR they resolved; a Brainmarks sample records its own, which must agree."""
        if value is None:
            return
        value = float(value)
        if not np.allclose(self._trs, value, atol=1e-3):
            raise ConfigError(f"{self.path}: its samples have TRs {sorted(set(np.round(self._trs, 6)))} s, not {value:g} s")
        self._tr_override = value

    def split_runs(self) -> dict[str, list[int]]:
        """``{"train"|"val"|"test": [run, ...]}``: the rows of each of Brainmarks' splits."""
        return {s: np.flatnonzero(self.split_of_run == s).tolist() for s in SPLITS.values()}

    def describe_run(self, run: int) -> str:
        return f"subject {self.subject_ids[run]} (sample {self.run_ids[run]}, row {run})"

    # -- reading -------------------------------------------------------------------------------------------
    def _open(self) -> dict[str, Any]:
        if self._splits is None or self._pid != os.getpid():
            self._splits = load_splits(self.path)
            self._pid = os.getpid()
        return self._splits

    def _locate(self, run: int) -> tuple[str, int]:
        """``(split folder, row in it)`` of a run."""
        run = int(run)
        if not 0 <= run < len(self.lengths):
            raise IndexError(f"run {run} of {self.path} ({len(self.lengths)} samples)")
        first = 0
        for split, size in self._split_sizes.items():
            if run < first + size:
                return split, run - first
            first += size
        raise IndexError(run)  # pragma: no cover - the sizes add up to the runs

    def sample(self, run: int) -> dict[str, np.ndarray]:
        """The stored ``bold`` ``(T, dim)`` float32, ``mean`` and ``std`` ``(dim,)`` float32 of one sample
        (decoded once per process into a bounded cache).

        Raises:
            DataError: a sample of another shape than its split's.
        """
        def load() -> dict[str, np.ndarray]:
            split, row = self._locate(run)
            ds = self._open()[split]
            with quiet_datasets():
                item = ds.select_columns(["bold", "mean", "std"]).with_format("numpy")[row]
            bold = np.asarray(item["bold"], dtype=np.float32)
            mean = np.asarray(item["mean"], dtype=np.float32).reshape(-1)
            std = np.asarray(item["std"], dtype=np.float32).reshape(-1)
            n = int(self.lengths[run])
            if bold.shape != (n, self.n_rois) or mean.shape != (self.n_rois,) or std.shape != (self.n_rois,):
                raise DataError(f"{self.path / split}: {self.describe_run(run)} has bold {bold.shape}, mean {mean.shape}, "
                                f"std {std.shape}; expected ({n}, {self.n_rois}) and (1, {self.n_rois})")
            return {"bold": bold, "mean": mean, "std": std}

        return self._samples.get(int(run), load)

    def read(self, run: int, start: int = 0, stop: int | None = None, stride: int = 1,
             out: np.ndarray | None = None) -> np.ndarray:
        """TRs ``start, start + stride, ... < stop`` of one sample before Brainmarks' scaling
        (``bold * std + mean``): ``(n, dim)`` float32.

        Raises:
            IndexError: TRs outside the sample. ValueError: an ``out`` of the wrong shape.
        """
        frames = self._frames(run, start, stop, stride)
        s = self.sample(run)
        x = s["bold"][frames.start:frames.stop:frames.step] * s["std"][None, :] + s["mean"][None, :]
        if out is None:
            return x.astype(np.float32, copy=False)
        ensure_out(out, (len(frames), self.n_rois), np.float32, self.describe_run(run))[...] = x
        return out

    def run_stats(self, run: int) -> dict[str, Any]:
        """``n`` (TRs), ``mean`` and ``std`` ``(dim,)`` float64: the sample's stored statistics (class docstring)."""
        def load() -> dict[str, Any]:
            s = self.sample(run)
            mean, std = s["mean"].astype(np.float64), s["std"].astype(np.float64)
            constant = std <= EPS
            return {"n": int(self.lengths[run]), "mean": np.where(constant, 0.0, mean), "std": np.where(constant, 1.0, std)}

        return self._stats.get(int(run), load)

    def run_labels(self, name: str) -> np.ndarray:
        """A scalar column, one value per run ``(n_runs,)`` (strings as ``str``; missing numbers NaN).

        Raises:
            DataError: no such column (the columns named).
        """
        if name not in self._labels:
            raise DataError(f"{self.path} has no scalar column {name!r} in every split (per-run labels: "
                            f"{self.run_label_names or 'none'}); fix the label name")
        return self._labels[name]

    def validate(self, eps: float = EPS) -> list[str]:
        """Problems of the data set for ``brainfm-data validate``: non-finite values (reads every sample)."""
        problems = []
        for run in range(len(self)):
            s = self.sample(run)
            if not all(np.isfinite(v).all() for v in s.values()):
                problems.append(f"{self.path}: NaN/inf in {self.describe_run(run)}")
        return problems

    def close(self) -> None:
        self._splits = None

    def __getstate__(self):  # workers reopen the memory maps lazily
        state = dict(self.__dict__)
        state["_splits"] = None
        state["_pid"] = None
        return state

    def __repr__(self) -> str:
        tr = self.tr
        return (f"BrainmarksStore({self.path}, space={self.space!r}, samples={len(self)} "
                f"({', '.join(f'{k} {v}' for k, v in self._split_sizes.items())}), dim={self.n_rois}, "
                f"tr={'mixed' if tr is None else f'{tr:g}s'}, subjects={len(set(self.subject_ids))})")


__all__ = ["BrainmarksStore", "EPS", "SAMPLE_COLUMNS", "SPLITS", "WRITTEN_COLUMNS", "load_splits", "quiet_datasets",
           "split_name"]
