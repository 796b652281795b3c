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

:func:`write_brainmarks` writes any brainfm ROI store (HDF5, or another Brainmarks folder) with its
per-run labels in that layout (``brainfm-data to-brainmarks``), atomically.

``datasets`` is imported only here, when a Brainmarks folder is read or written (``pip install
datasets``); its progress bars and info logging are switched off while brainfm calls it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from brainfm.data.atlases import BRAINMARKS_SPACES, brainmarks_space
from brainfm.data.stores.base import LRUCache, StoreBase, cache_sizes, ensure_out
from brainfm.errors import ConfigError, DataError
from brainfm.io import temp_path

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


# -- writing -------------------------------------------------------------------------------------------------
def output_path(out: str | os.PathLike, atlas: str | None, n_rois: int, default_name: str,
                space: str | None = None) -> tuple[Path, str]:
    """``(folder, space)`` :func:`write_brainmarks` writes: ``out`` itself when it is named
    ``<name>.<space>.arrow``, else ``<out>/<default_name>.<space>.arrow``.

    The space is ``space``, else the one in ``out``'s name, else the Brainmarks space of the store's
    atlas (:func:`brainfm.data.atlases.brainmarks_space`), else the atlas' own name. A space that is not
    one of Brainmarks' (:data:`~brainfm.data.atlases.BRAINMARKS_SPACES`) is allowed (:func:`write_brainmarks`
    warns: Brainmarks' readers and models know only those).

    Raises:
        DataError: a Brainmarks space of another dimension than ``n_rois``; ``space`` and ``out``'s name
            disagreeing; a name or space that is not letters, digits, ``_`` and ``-``; an ``out`` ending in
            ``.arrow`` without a space.
    """
    out = Path(out)
    named, named_space = split_name(out)
    if out.name.endswith(".arrow") and named_space is None:
        raise DataError(f"{out}: a Brainmarks data set folder is named <name>.<space>.arrow (e.g. "
                        f"{out.name[:-len('.arrow')] or default_name}.schaefer400.arrow); give such a name, or a "
                        "parent folder to write <folder>/<name>.<space>.arrow into")
    if named_space is not None and space is not None and named_space != space:
        raise DataError(f"{out} names space {named_space!r} but --space {space}; drop one of them")
    space = space or named_space or brainmarks_space(atlas, n_rois) or re.sub(r"[^A-Za-z0-9_-]+", "_", str(atlas or "rois"))
    name = named if named_space is not None else default_name
    for what, value in (("name", name), ("space", space)):
        if not _TOKEN.match(value):
            raise DataError(f"{out}: the data set {what} {value!r} may hold letters, digits, '_' and '-' only "
                            "(Brainmarks parses <name>.<space>.arrow)")
    if space in BRAINMARKS_SPACES and BRAINMARKS_SPACES[space] != int(n_rois):
        raise DataError(f"Brainmarks space {space!r} has {BRAINMARKS_SPACES[space]} dimensions but the store "
                        f"(atlas {atlas!r}) has {n_rois} ROIs. Fix: --space <name of your parcellation>")
    return (out if named_space is not None else out / f"{name}.{space}.arrow"), space


def subject_split_for(subjects: Sequence[str], seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1),
                      split_file: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """The subject split :func:`write_brainmarks` writes: ``split_file`` (SwiFT format, e.g.
    ``data_splits/<dataset>/seed0.txt``; every subject must be listed), else the seeded draw
    :func:`brainfm.data.splits.draw_subject_split` ``(subjects, fractions, seed)`` -- the split
    ``data.split.kind=subject data.split.seed=<seed> data.split.fractions=<fractions>`` draws for the same
    subjects.

    Raises:
        DataError: a missing split file or one that does not list every subject; a split that would be empty
            (Brainmarks needs three). ConfigError: bad fractions.
    """
    from brainfm.data.splits import draw_subject_split, load_or_create_subject_split

    if split_file is not None:
        if not Path(split_file).is_file():
            raise DataError(f"split file {split_file} does not exist; give an existing SwiFT-format file or leave "
                            "--split-file out to draw a seeded split")
        split = load_or_create_subject_split(split_file, subjects, fractions, seed)
        source = f"split file {split_file}"
    else:
        split = draw_subject_split(subjects, fractions, seed)
        source = f"the seeded subject split (seed {seed}, fractions {list(fractions)})"
    empty = [k for k, v in split.items() if not v]
    if empty:
        raise DataError(f"{source} leaves split(s) {empty} without subjects ({len(set(subjects))} subjects in all); "
                        "a Brainmarks data set needs train, validation and test. Fix: --fractions with a larger share "
                        "for them, or a split file listing subjects in each")
    return split


def _rows(kind: str, path: str, atlas: Any, runs: Sequence[int], labels: Sequence[str], dtype: str,
          tr: float | None) -> Iterator[dict[str, Any]]:
    """Brainmarks rows of ``runs`` of a store (a generator for ``datasets.Dataset.from_generator``; it opens
    the store itself, so that ``datasets`` hashes a path, not the data)."""
    from brainfm.data.stores import open_store

    atlas = list(atlas) if isinstance(atlas, tuple) else atlas
    store = open_store(kind, path, atlas=atlas, preload=False)
    values = {name: store.run_labels(name) for name in labels}
    for run in runs:
        x = np.asarray(store.read(int(run)), dtype=np.float64)
        if not np.isfinite(x).all():
            store.check_finite(int(run))
        mean, std = x.mean(axis=0), x.std(axis=0)
        valid = std > EPS  # as Brainmarks' nisc.scale: a constant dimension is stored as 0 with mean 0, std 0
        bold = np.where(valid, (x - mean) / np.where(valid, std, 1.0), 0.0)
        run_tr = float(store.trs[int(run)]) if tr is None else float(tr)
        row = {
            "sub": str(store.subject_ids[int(run)]),
            "run": str(store.run_ids[int(run)]),
            "n_frames": int(len(x)),
            "tr": run_tr,
            "bold": bold.astype(dtype),
            "mean": np.where(valid, mean, 0.0)[None, :].astype(np.float32),
            "std": np.where(valid, std, 0.0)[None, :].astype(np.float32),
        }
        for name, v in values.items():
            item = v[int(run)]
            row[name] = item.item() if hasattr(item, "item") else item
        yield row


def _label_feature(hf, values: np.ndarray, name: str, where: str):
    kind = np.asarray(values).dtype.kind
    if kind in "USO":
        return hf.Value("string")
    if kind == "b":
        return hf.Value("bool")
    if kind in "iu":
        return hf.Value("int64")
    if kind == "f":
        return hf.Value("float64")
    raise DataError(f"{where}: label {name!r} has values of type {np.asarray(values).dtype}; write strings or numbers")


def write_brainmarks(store_path: str | os.PathLike, out: str | os.PathLike, *, atlas: Any = None,
                     space: str | None = None, name: str | None = None, seed: int = 0,
                     fractions: Sequence[float] = (0.8, 0.1, 0.1), split_file: str | os.PathLike | None = None,
                     dtype: str = "float16", tr: float | None = None) -> Path:
    """Write an ROI store with its per-run labels as a Brainmarks data set (``brainfm-data to-brainmarks``).

    One row per run: ``sub`` (subject id), ``run`` (the store's run id), ``n_frames`` (TRs), ``tr``
    (float32 seconds), ``bold`` ``(T, n_rois)`` (``dtype``: Brainmarks' float16, or float32) z-scored over
    the run per ROI with the population standard deviation, ``mean`` and ``std`` ``(1, n_rois)`` float32 (an
    ROI constant over the run, std <= 1e-6: bold 0, mean 0, std 0, as Brainmarks' ``nisc.scale``), and one
    column per label ``/labels/<name>`` of the store (strings, integers, floats or booleans). Runs go to
    ``train``/``validation``/``test`` by their subject (:func:`subject_split_for`).

    Written with ``datasets`` (``Dataset.from_generator``, one run in memory at a time, then
    ``DatasetDict.save_to_disk``) into a temporary folder beside the output, renamed into place when
    complete: a failure leaves nothing at the output.

    Args:
        store_path: an ROI HDF5 store (or a Brainmarks folder). out: ``<name>.<space>.arrow``, or a folder
            to write ``<name>.<space>.arrow`` into (:func:`output_path`). atlas: the store's atlas (default:
            its only one; a list reads several as one ROI axis). space: the Brainmarks space (default: from
            ``out``'s name, else the atlas': ``schaefer400``, ``schaefer400+tian3`` -> ``schaefer400_tians3``,
            ``schaefer400+tian3+buckner7``, ``a424``; another atlas keeps its own name, with a warning).
            name: the data set name when ``out`` is a parent folder (default: the store's file name).
            seed, fractions, split_file: the subject split. dtype: ``float16`` or ``float32``. tr: seconds,
            for a store that records none (checked against one that does).

    Returns:
        The folder written.

    Raises:
        DataError: ``out`` exists (the fix named), as :func:`output_path` and :func:`subject_split_for`, a
            store without a TR and no ``tr``, a label named like a written column, NaN inside a run.
        ConfigError: a bad ``dtype``, ``datasets`` not installed.
    """
    from brainfm.data.stores import detect_kind, open_store

    if dtype not in ("float16", "float32"):
        raise ConfigError(f"--dtype {dtype}: write float16 (Brainmarks' own) or float32")
    store_path = Path(store_path)
    kind = detect_kind(store_path)
    store = open_store(kind, store_path, atlas=atlas, preload=False)
    if getattr(store, "kind", None) != "roi":
        raise DataError(f"{store_path} is a {store.kind} store; Brainmarks data sets written here are ROI time series "
                        "(parcellate it first: brainfm-preprocess)")
    default_name = re.sub(r"[^A-Za-z0-9_-]+", "_", split_name(store_path)[0] if kind == "brainmarks" else store_path.stem)
    target, space = output_path(out, store.atlas, store.n_rois, name or default_name, space)
    if target.exists():
        raise DataError(f"{target} already exists; brainfm does not overwrite a data set. Fix: remove it "
                        f"(rm -r {target}) or choose another output")
    trs = np.asarray(store.trs, dtype=np.float64)
    tr_arg = None  # the store's own TRs
    if np.isnan(trs).any():
        if tr is None:
            raise DataError(f"{store_path} records no TR for some runs; a Brainmarks sample carries one. Fix: --tr <seconds>")
        tr_arg = float(tr)
    elif tr is not None and not np.allclose(trs, float(tr), atol=1e-3):
        raise DataError(f"TR mismatch: {store_path} records TR(s) {sorted(set(np.round(trs, 6)))} s but --tr {tr:g}. "
                        "Fix: leave --tr out (the store's TR is written), or resample the store first "
                        f"(brainfm-data resample {store_path} <out.h5> --tr {tr:g})")
    # a Brainmarks folder written again: its run/n_frames are written anew
    labels = [n for n in store.run_label_names if not (kind == "brainmarks" and n in WRITTEN_COLUMNS)]
    clash = [n for n in labels if n in WRITTEN_COLUMNS]
    if clash:
        raise DataError(f"{store_path}: label(s) {clash} are named like the columns Brainmarks' rows hold "
                        f"({list(WRITTEN_COLUMNS)}); rename them in the store")
    split = subject_split_for(store.subject_ids, seed, fractions, split_file)
    split_of = {s: k for k, subjects in split.items() for s in subjects}
    runs = {b: [r for r, s in enumerate(store.subject_ids) if split_of.get(s) == k] for b, k in SPLITS.items()}

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)  # holds datasets' cache beside the data set, so not brainfm.io.PendingDir
    tmp.mkdir()
    try:
        with quiet_datasets() as hf:
            features = hf.Features({
                "sub": hf.Value("string"), "run": hf.Value("string"), "n_frames": hf.Value("int32"),
                "tr": hf.Value("float32"),
                "bold": hf.Array2D(shape=(None, int(store.n_rois)), dtype=dtype),
                "mean": hf.Array2D(shape=(1, int(store.n_rois)), dtype="float32"),
                "std": hf.Array2D(shape=(1, int(store.n_rois)), dtype="float32"),
                **{n: _label_feature(hf, store.run_labels(n), n, str(store_path)) for n in labels},
            })
            parts = {}
            for split_dir, rows in runs.items():
                parts[split_dir] = hf.Dataset.from_generator(
                    _rows, features=features, cache_dir=str(tmp / "cache"), split=hf.NamedSplit(split_dir),
                    gen_kwargs={"kind": kind, "path": str(store_path), "dtype": dtype, "tr": tr_arg,
                                # tuples: datasets shards a generator over its list arguments
                                "atlas": tuple(atlas) if isinstance(atlas, (list, tuple)) else atlas,
                                "runs": tuple(rows), "labels": tuple(labels)})
            hf.DatasetDict(parts).save_to_disk(str(tmp / "data"))
            del parts
        try:
            os.rename(tmp / "data", target)  # not brainfm.io, which replaces: refuses a non-empty folder made meanwhile
        except OSError:
            raise DataError(f"{target} appeared while it was written; nothing was overwritten. Remove it or choose "
                            "another output") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s (%s)", target, ", ".join(f"{k} {len(v)}" for k, v in runs.items()))
    if space not in BRAINMARKS_SPACES:
        log.warning("note: %s: space %r (atlas %s, %d ROIs) is not one of Brainmarks' spaces (%s); the data set is "
                    "written for your own use (brainfm's data=brainmarks reads it), but Brainmarks' models take only "
                    "their spaces", target, space, store.atlas, int(store.n_rois),
                    ", ".join(k for k, v in BRAINMARKS_SPACES.items() if v < 1000))
    return target


__all__ = ["BrainmarksStore", "EPS", "SAMPLE_COLUMNS", "SPLITS", "load_splits", "output_path", "quiet_datasets",
           "split_name", "subject_split_for", "write_brainmarks"]
