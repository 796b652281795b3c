"""ROI stores written as Brainmarks data sets (``brainfm-data to-brainmarks``): any brainfm ROI store (an HDF5
file, or another Brainmarks folder) with its per-run labels, in the layout :mod:`brainfm.data.stores.brainmarks`
reads (its docstring has the columns), atomically.

Apart from the reader because it opens any store (:func:`brainfm.data.stores.open_store`), which the reader's
module is one of.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brainfm.data.atlases import BRAINMARKS_SPACES, brainmarks_space
from brainfm.data.splits import draw_subject_split, load_or_create_subject_split
from brainfm.data.stores import detect_kind, open_store
from brainfm.data.stores.brainmarks import EPS, SPLITS, WRITTEN_COLUMNS, quiet_datasets, split_name
from brainfm.errors import ConfigError, DataError
from brainfm.io import temp_path

log = logging.getLogger(__name__)
_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


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




__all__ = ["output_path", "subject_split_for", "write_brainmarks"]
