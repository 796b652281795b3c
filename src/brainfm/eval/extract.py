"""Export from a trained checkpoint: per-window embeddings or R2T signatures to HDF5/Parquet
(``brainfm-extract``) and per-subject predictions to a CSV (``brainfm-predict``).

The data are rebuilt from the run's own ``config.yaml`` (written by ``brainfm-train`` beside
``checkpoints/``), optionally with ``data.*`` overrides (another file with the same TR, ROIs or
grid), and checked against the facts the checkpoint recorded (TR, ROI count and order, grid).
Windows come from the deterministic evaluation grid of each requested split (for ``split.kind=time``
``val`` is the second part of every run), in order, and every output row says where it came from:
subject id (the store's string id), subject index, run (row in the store) and run id (e.g.
``REST1_LR``), window start in TRs and in seconds from the run start, TR in seconds, split.

Embeddings are :meth:`BrainfmTask.embed` ``(B, D)`` (any backbone); signatures are R2T-Net's
rest+task concatenation :meth:`brainfm.tasks.r2t.R2TTask.signature` ``(B, 2 * embed_dim)`` of the
split's fixed rest/task pairs (rest-only R2T embeddings: ``kind=embedding``). Predictions follow
R2T-Net's rest-only inference (``inference.py``: subject mean of the rest windows' predictions,
:func:`brainfm.tasks.r2t.predict_subjects`) and SwiFT's clip -> subject averaging of a
:class:`~brainfm.tasks.supervised.SupervisedTask` (mean logit per subject, then de-standardised
for regression, or the class probabilities and the most probable class).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import brainfm
from brainfm.errors import ConfigError, DataError
from brainfm.eval.inference import Group, run_inference
from brainfm.io import PendingFile, atomic_path
from brainfm.runs import LoadedRun, datamodules_of, has_split, load_run, window_dataset
from brainfm.tasks.base import CHECKPOINT_KEY
from brainfm.tasks.r2t import R2TTask

KINDS = ("embedding", "signature")
FORMATS = ("h5", "parquet")
#: file name suffix -> export format
SUFFIX_FORMATS = {".h5": "h5", ".hdf5": "h5", ".parquet": "parquet", ".pq": "parquet"}
SPLITS = ("train", "val", "test")
#: Per-row columns of an export, besides the ``embedding`` matrix.
ROW_COLUMNS = ("subject_id", "subject_index", "run", "run_id", "window_start_tr", "window_start_s", "tr", "split",
               "dataset")


# -- the windows of a split ---------------------------------------------------------------------------------
def _locate(dataset, i: int) -> tuple[int, int]:
    """``(run, start TR)`` of grid window/clip ``i``."""
    return dataset.index.window(i)


def _subject_names(dataset) -> list[str]:
    names = [""] * len(dataset.subject_index)
    for s, i in dataset.subject_index.items():
        names[i] = s
    return names


def _row(dataset, run: int, start: int, split: str, name: str, prefix: str = "") -> dict[str, Any]:
    store = dataset.store
    tr = float(store.trs[run]) if np.isfinite(store.trs[run]) else float(dataset.tr)
    subject = store.subject_ids[run]
    run_ids = store.run_ids
    return {
        f"{prefix}subject_id": str(subject),
        f"{prefix}subject_index": int(dataset.subject_index[subject]),
        f"{prefix}run": int(run),
        f"{prefix}run_id": str(run_ids[run]),
        f"{prefix}window_start_tr": int(start),
        f"{prefix}window_start_s": float(start * tr),
        f"{prefix}tr": tr,
        f"{prefix}split": split,
        f"{prefix}dataset": name,
    }


def _check_splits(datamodule, splits: Sequence[str]) -> list[str]:
    splits = [str(s) for s in splits]
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise ConfigError(f"splits={splits} must be a non-empty list of {list(SPLITS)}")
    available = [s for s in splits if any(has_split(dm, s) for _, dm in datamodules_of(datamodule))]
    if not available:
        kinds = {str((getattr(dm, "split", {}) or {}).get("kind")) for _, dm in datamodules_of(datamodule)}
        raise ConfigError(f"none of splits={splits} has data (data.split.kind={'/'.join(sorted(kinds))}: a time split "
                          "has only train and val). Fix: splits=[train,val]")
    return available


def _window_rows(ds, split: str, name: str, prefix: str = "") -> "Any":
    def rows(indices: np.ndarray) -> dict[str, list]:
        cols: dict[str, list] = {}
        for i in indices.tolist():
            for key, value in _row(ds, *_locate(ds, i), split, name, prefix).items():
                cols.setdefault(key, []).append(value)
        return cols

    return rows


def _pair_rows(pairs, split: str, name: str) -> "Any":
    def rows(indices: np.ndarray) -> dict[str, list]:
        cols: dict[str, list] = {}
        for i in indices.tolist():
            r, t = pairs.pair(i, i)  # pair i is drawn with seed i: fixed
            row = _row(pairs.rest, *_locate(pairs.rest, r), split, name)
            row.update(_row(pairs.task, *_locate(pairs.task, t), split, name, prefix="task_"))
            for key in ("task_split", "task_dataset", "task_subject_id", "task_subject_index"):
                row.pop(key)
            for key, value in row.items():
                cols.setdefault(key, []).append(value)
        return cols

    return rows


def groups_of(loaded: LoadedRun, kind: str, splits: Sequence[str], batch_size: int | None = None) -> list:
    """The :class:`~brainfm.eval.inference.Group` of each (data set, split) with windows: its evaluation
    windows (``embedding``) or its fixed rest/task pairs (``signature``)."""
    out = []
    for name, dm in datamodules_of(loaded.datamodule):
        bs = int(batch_size or getattr(dm, "eval_batch_size", 16))
        for split in splits:
            if not has_split(dm, split):
                continue
            if kind == "signature":
                pairs = getattr(dm, "_pairs", {}).get(split)
                if pairs is not None:
                    out.append(Group(f"{name}:{split}", pairs, bs, _pair_rows(pairs, split, name)))
            else:
                ds = window_dataset(dm, split)
                out.append(Group(f"{name}:{split}", ds, bs, _window_rows(ds, split, name)))
    return out


def _output_fn(task, kind: str):
    if kind not in KINDS:
        raise ConfigError(f"kind={kind!r} must be one of {KINDS}")
    if kind == "signature":
        if not isinstance(task, R2TTask):
            raise ConfigError(f"kind=signature is R2T-Net's rest+task signature; {type(task).__name__} checkpoints "
                              "have embeddings only: use kind=embedding")
        return lambda t, b: t.signature(b)
    return lambda t, b: t.embed(b)


def extract(loaded: LoadedRun, kind: str = "embedding", splits: Sequence[str] = ("val",),
            batch_size: int | None = None, trainer=None, shard_dir: str | os.PathLike | None = None
            ) -> tuple[np.ndarray, dict[str, list]] | None:
    """Embeddings or signatures of every evaluation window of ``splits``, with their provenance, in memory
    (:func:`export` streams them to a file instead).

    Args:
        loaded: from :func:`load_run`.
        kind: ``embedding`` (:meth:`embed`, any task) or ``signature`` (R2T checkpoints: rest and task
            embeddings of the split's fixed rest/task pairs, concatenated).
        splits: among ``train``, ``val``, ``test``; a split without data is skipped (one with none: error).
        batch_size: windows per forward pass (None: the data's ``eval_batch_size``).
        trainer: the ``trainer`` config to run on (None: one CPU process).
        shard_dir: the ranks' shard folder (default: a temporary folder beside the run).

    Returns:
        ``(features (N, D) float32, columns)`` on the global rank 0 (None on the others): ``columns`` maps
        each name of :data:`ROW_COLUMNS` (and, for signatures, the same names prefixed ``task_`` for the
        task window) to ``N`` values.

    Raises:
        ConfigError: unknown kind, splits without data, ``signature`` on a non-R2T checkpoint.
        DataError: non-finite features (a diverged checkpoint).
    """
    feats, columns = [], {}
    for values, cols in _stream(loaded, kind, splits, batch_size, trainer, shard_dir):
        feats.append(values)
        for key, v in cols.items():
            columns.setdefault(key, []).extend(v)
    if not feats and not columns:
        return None
    return np.concatenate(feats).astype(np.float32, copy=False), columns


def _stream(loaded: LoadedRun, kind: str, splits: Sequence[str], batch_size: int | None, trainer,
            shard_dir) -> Iterator[tuple[np.ndarray, dict[str, list]]]:
    """Run the inference and yield ``(features chunk, columns chunk)`` in window order (rank 0 only)."""
    fn = _output_fn(loaded.task, kind)
    groups = groups_of(loaded, kind, _check_splits(loaded.datamodule, splits), batch_size)
    if not groups:
        raise ConfigError(f"no {'paired' if kind == 'signature' else 'evaluation'} windows in splits {list(splits)}")
    root = Path(shard_dir) if shard_dir else loaded.run_dir / f".inference-{kind}"
    shards = run_inference(loaded.task, fn, groups, root, trainer)
    if shards is None:
        return
    try:
        for k, group in enumerate(shards.groups):
            for indices, values in shards.chunks(k):
                yield values, group.rows(indices)
    finally:
        shards.close()


# -- writing ----------------------------------------------------------------------------------------------
def _attrs(loaded: LoadedRun, kind: str, dim: int) -> dict[str, Any]:
    meta = loaded.ckpt["hyper_parameters"].get("data_meta") or {}
    return {
        "kind": kind,
        "dim": int(dim),
        "checkpoint": str(loaded.ckpt["_path"]),
        "global_step": int(loaded.ckpt.get("global_step", -1)),
        "task_class": str(loaded.ckpt[CHECKPOINT_KEY]["task_class"]),
        "model": str(loaded.ckpt["hyper_parameters"]["model"].get("_target_", "")),
        "trained_on": str(meta.get("path", "")),
        "data": str(getattr(loaded.datamodule, "path", "")),
        "brainfm_version": str(getattr(brainfm, "__version__", "")),
    }



def feature_format(path: str | os.PathLike, fmt: str | None = None) -> str:
    """The export format of ``path``: its suffix (``.h5``/``.hdf5`` -> ``h5``, ``.parquet``/``.pq`` ->
    ``parquet``), which ``fmt`` (``format=``) may only confirm, never contradict.

    Raises:
        ConfigError: ``fmt`` not in :data:`FORMATS`; a suffix that is neither (``out=e.csv``: brainfm never
            writes one format under another's name); ``fmt`` and the suffix disagree.
    """
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r} for {path} must be one of {FORMATS}")
    by_suffix = SUFFIX_FORMATS.get(path.suffix.lower())
    if by_suffix is None:
        stem = path.with_suffix("") if path.suffix else path
        raise ConfigError(f"out={path}: features are written as HDF5 or Parquet, and the file name says which. "
                          f"Fix: out={stem}.h5 or out={stem}.parquet")
    if fmt is not None and fmt != by_suffix:
        raise ConfigError(f"format={fmt} but out={path} is a {by_suffix} file name. Fix: drop format= (the suffix "
                          f"decides), or out={path.with_suffix('.h5' if fmt == 'h5' else '.parquet')}")
    return by_suffix


class FeatureWriter:
    """Write features and their per-row columns chunk by chunk, atomically (a temporary file renamed by
    :meth:`close`; :meth:`abort` leaves nothing).

    HDF5 (``fmt="h5"``): dataset ``features`` ``(N, D)`` float32 plus one 1-D dataset per column
    (strings as UTF-8), ``attrs`` on the root. Parquet: one row per window, the columns plus
    ``features`` as a fixed-size list of float32 (one row group per chunk), ``attrs`` in the schema
    metadata (key ``brainfm``, JSON). Memory: one chunk.

    Raises:
        ConfigError: unknown format; from :meth:`append`: columns whose length is not the chunk's, or a
            feature width that changes.
    """

    def __init__(self, path: str | os.PathLike, fmt: str, attrs: Mapping[str, Any] | None = None) -> None:
        if fmt not in FORMATS:
            raise ConfigError(f"format={fmt!r} for {path} must be one of {FORMATS} (or use a .h5/.parquet file name)")
        self.path, self.fmt, self.attrs = Path(path), fmt, dict(attrs or {})
        self._pending = PendingFile(self.path)  # makes the parent folder
        self.tmp = self._pending.tmp
        self.rows, self.dim = 0, None
        self._file = None

    def append(self, features: np.ndarray, columns: Mapping[str, Sequence]) -> None:
        feats = np.ascontiguousarray(features, dtype=np.float32)
        n = len(feats)
        bad = {k: len(v) for k, v in columns.items() if len(v) != n}
        if bad:
            raise ConfigError(f"columns {bad} do not have one value per row ({n})")
        if self.dim is None:
            self.dim = int(feats.shape[1])
        elif feats.shape[1] != self.dim:
            raise ConfigError(f"features of width {feats.shape[1]} after {self.dim}")
        if self.fmt == "h5":
            self._append_h5(feats, columns)
        else:
            self._append_parquet(feats, columns)
        self.rows += n

    def _append_h5(self, feats: np.ndarray, columns: Mapping[str, Sequence]) -> None:
        import h5py

        if self._file is None:
            self._file = h5py.File(self.tmp, "w")
            self._file.create_dataset("features", shape=(0, self.dim), maxshape=(None, self.dim), dtype=np.float32,
                                      chunks=(min(4096, max(1, len(feats))), self.dim))
            for key, value in self.attrs.items():
                self._file.attrs[key] = value
        f, n = self._file, self.rows
        f["features"].resize(n + len(feats), axis=0)
        f["features"][n:] = feats
        for key, values in columns.items():
            arr = np.asarray(values)
            text = arr.dtype.kind in "US"
            if key not in f:
                dtype = h5py.string_dtype("utf-8") if text else arr.dtype
                f.create_dataset(key, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(4096,))
            f[key].resize(n + len(arr), axis=0)
            f[key][n:] = arr.astype(object) if text else arr

    def _append_parquet(self, feats: np.ndarray, columns: Mapping[str, Sequence]) -> None:
        import json

        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({**{k: pa.array(list(v)) for k, v in columns.items()},
                          "features": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), self.dim)})
        table = table.replace_schema_metadata({"brainfm": json.dumps(self.attrs)})
        if self._file is None:
            self._file = pq.ParquetWriter(self.tmp, table.schema)
        self._file.write_table(table)

    def close(self) -> Path:
        """Finish the file and rename it into place. Raises ConfigError when nothing was appended."""
        try:
            if self._file is None:
                raise ConfigError(f"no rows to write to {self.path}")
            self._file.close()
            self._file = None
            self._pending.commit()
        finally:
            self.abort()
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file (nothing is written at ``path``; after :meth:`close`: nothing)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._pending.discard()


def write_features(path: str | os.PathLike, features: np.ndarray, columns: Mapping[str, Sequence],
                   fmt: str | None = None, attrs: Mapping[str, Any] | None = None) -> Path:
    """Write ``features`` ``(N, D)`` and the per-row ``columns`` at once (:class:`FeatureWriter`; ``fmt=None``:
    from the suffix, ``.h5``/``.hdf5`` or ``.parquet``/``.pq``). Raises as :class:`FeatureWriter`."""
    path = Path(path)
    writer = FeatureWriter(path, feature_format(path, fmt), attrs)
    try:
        writer.append(features, columns)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def read_features(path: str | os.PathLike) -> tuple[np.ndarray, "Any", dict]:
    """Read a :func:`write_features` file: ``(features (N, D), pandas DataFrame of the columns, attrs)``."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    if path.suffix.lower() in (".parquet", ".pq"):
        import json

        import pyarrow.parquet as pq

        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {}).get(b"brainfm", b"{}"))
        feats = np.stack(table.column("features").to_numpy(zero_copy_only=False)).astype(np.float32)
        return feats, table.drop(["features"]).to_pandas(), meta
    import h5py

    with h5py.File(path, "r") as f:
        feats = f["features"][:]
        cols = {}
        for key in f:
            if key == "features":
                continue
            values = f[key][:]
            cols[key] = [v.decode() if isinstance(v, bytes) else v for v in values] if values.dtype.kind in "OS" else values
        return feats, pd.DataFrame(cols), dict(f.attrs)


def export(ckpt: str | os.PathLike, out: str | os.PathLike, kind: str = "embedding", fmt: str | None = None,
           splits: Sequence[str] = ("val",), data_overrides: Mapping[str, Any] | Sequence[str] | None = None,
           batch_size: int | None = None, trainer=None) -> tuple[Path, int, int] | None:
    """``brainfm-extract``: load, run on the configured trainer and stream the rows to ``out``; returns
    ``(path, rows, dim)`` on the global rank 0, None on the other ranks. Raises as :func:`load_run`,
    :func:`extract` and :class:`FeatureWriter`."""
    fmt = feature_format(out, fmt)
    loaded = load_run(ckpt, data_overrides)
    out = Path(out)
    writer = None
    try:
        for values, cols in _stream(loaded, kind, splits, batch_size, trainer, out.with_name(f".{out.name}.shards")):
            if writer is None:
                writer = FeatureWriter(out, fmt, _attrs(loaded, kind, values.shape[1]))
            writer.append(values, cols)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is None:
        return None
    return writer.close(), writer.rows, writer.dim


# -- per-subject predictions --------------------------------------------------------------------------------
def predict(loaded: LoadedRun, splits: Sequence[str] | None = None, batch_size: int | None = None,
            trainer=None, shard_dir: str | os.PathLike | None = None) -> "Any":
    """Per-subject predictions from the evaluation windows of ``splits`` (R2T: rest windows only), run on
    the configured trainer (the windows partitioned over its ranks).

    R2T fine-tune checkpoints: the subject mean of the rest windows' predictions
    (:meth:`~brainfm.tasks.r2t.R2TTask.predict`: targets in their own units / class probabilities;
    R2T-Net's ``inference.py``). SupervisedTask: the subject mean of its clips' outputs (SwiFT), then
    de-standardised (regression) or turned into probabilities (classification).

    Returns:
        On the global rank 0 a pandas DataFrame with ``subject_id`` and, for regression, ``prediction``
        (one target) or ``prediction_<target>``; for classification ``prediction`` (the most probable
        class: its name when the data's labels give categories, else its index) and
        ``probability_<class>``. Rows are in subject order; a subject of several splits is averaged over
        all its windows. None on the other ranks.

    Raises:
        ConfigError: a checkpoint without a trained prediction head (self-supervised tasks).
    """
    task = loaded.task.eval()
    r2t = isinstance(task, R2TTask)
    if r2t and task.mode != "fine_tune":
        task.predict({})  # raises R2T's explanation of an untrained head
    if not task.has_prediction_head:  # the task contract's answer (BrainfmTask.predicts)
        raise ConfigError(f"{type(task).__name__} checkpoints have no prediction head; brainfm-predict takes an R2T "
                          "fine-tune (task=r2t task.mode=fine_tune) or a supervised (task=supervised) checkpoint. "
                          "Use brainfm-extract for embeddings")
    if task.predicts != "subject":
        raise ConfigError(f"{type(task).__name__} predicts a label per {task.predicts}, not per subject; brainfm-predict "
                          "writes one row per subject. Use brainfm-interpret (its head's outputs per window) or "
                          "brainfm-extract for embeddings")
    if not splits:
        has_test = any(has_split(dm, "test") for _, dm in datamodules_of(loaded.datamodule))
        splits = ["test" if has_test else "val"]
    groups = groups_of(loaded, "embedding", _check_splits(loaded.datamodule, splits), batch_size)
    fn = (lambda t, b: t.predict(b)) if r2t else (lambda t, b: t.logits(b))
    shards = run_inference(task, fn, groups, Path(shard_dir) if shard_dir else loaded.run_dir / ".inference-predict",
                           trainer)
    if shards is None:
        return None
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    try:
        for k, group in enumerate(shards.groups):
            for indices, values in shards.chunks(k):
                for subject, v in zip(group.rows(indices)["subject_id"], values.astype(np.float64)):
                    sums[subject] = sums.get(subject, 0.0) + v
                    counts[subject] = counts.get(subject, 0) + 1
    finally:
        shards.close()
    ids = sorted(sums)
    mean = torch.from_numpy(np.stack([sums[s] / counts[s] for s in ids])).float() if ids else torch.zeros(0, 1)
    if r2t:
        kind, targets = task.kind, task.targets
        if kind == "regression":
            return _frame(ids, mean, [f"prediction_{t}" for t in targets] if len(targets) > 1 else ["prediction"])
        probs = torch.cat([1 - mean, mean], dim=1) if kind == "binary" else mean
        return _classes(ids, probs, loaded.label_categories(targets[0]))
    if task.kind == "regression":
        return _frame(ids, mean * task.label_std + task.label_mean, ["prediction"])
    if task.kind == "binary":
        p = torch.sigmoid(mean)
        probs = torch.cat([1 - p, p], dim=1)
    else:
        probs = mean.softmax(dim=-1)
    return _classes(ids, probs, loaded.label_categories(task.target))


def _frame(ids: list[str], values: torch.Tensor, names: list[str]):
    import pandas as pd

    df = pd.DataFrame({"subject_id": ids})
    for j, name in enumerate(names):
        df[name] = values[:, j].numpy().astype(np.float64)
    return df


def _classes(ids: list[str], probs: torch.Tensor, categories: list[str] | None):
    import pandas as pd

    classes = categories if categories and len(categories) == probs.shape[1] else [str(c) for c in range(probs.shape[1])]
    df = pd.DataFrame({"subject_id": ids, "prediction": [classes[i] for i in probs.argmax(dim=1).tolist()]})
    for j, c in enumerate(classes):
        df[f"probability_{c}"] = probs[:, j].numpy().astype(np.float64)
    return df


def write_csv(path: str | os.PathLike, frame) -> Path:
    """Write a DataFrame as CSV atomically (temporary file, rename); floats with 6 significant digits."""
    path = Path(path)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
    return path


def predict_to_csv(ckpt: str | os.PathLike, out: str | os.PathLike, splits: Sequence[str] | None = None,
                   data_overrides: Mapping[str, Any] | Sequence[str] | None = None,
                   batch_size: int | None = None, trainer=None) -> tuple[Path, "Any"] | None:
    """``brainfm-predict``: load, predict per subject and write the CSV; returns ``(path, frame)`` on the
    global rank 0, None on the others.

    Raises as :func:`load_run` and :func:`predict`; DataError for non-finite predictions; ConfigError for an
    ``out`` that is not a ``.csv`` file name.
    """
    if Path(out).suffix.lower() != ".csv":
        raise ConfigError(f"out={out}: brainfm-predict writes CSV (one row per subject). Fix: "
                          f"out={Path(out).with_suffix('') if Path(out).suffix else out}.csv")
    loaded = load_run(ckpt, data_overrides)
    frame = predict(loaded, splits, batch_size, trainer, Path(out).with_name(f".{Path(out).name}.shards"))
    if frame is None:
        return None
    numeric = frame.select_dtypes("number").to_numpy()
    if numeric.size and not np.isfinite(numeric).all():
        raise DataError(f"predictions of {loaded.ckpt['_path']} are not finite; the checkpoint has diverged")
    return write_csv(out, frame), frame
