"""``data=brainmarks``: windows of a Brainmarks data set (``<name>.<space>.arrow``), its own split, its
columns as labels.

A thin :class:`~brainfm.data.datamodules.roi.ROIDataModule`: the store is a
:class:`~brainfm.data.stores.brainmarks.BrainmarksStore` (one run per sample); everything else
(windows, normalization, loaders, checkpoint metadata) is the ROI datamodule's. What differs:

- split: ``data.split.kind=given`` (the default) uses Brainmarks' ``train``/``validation``/``test`` as
  brainfm's ``train``/``val``/``test``, whole samples, never re-drawn (``time`` and ``subject`` still work,
  as for any store, when asked for). Brainmarks splits some data sets by sample (AABC), so a subject
  may be in two splits: that is logged and the split used as given, as Brainmarks evaluates it.
- TR: each sample's ``tr``. One TR for all: that TR (checked against ``data.tr`` when set). Several: the
  windows carry one TR, so set ``data.resample_tr=<s>`` (every sample resampled to it when read, as
  brainfm's any-TR code does) or refused with that fix.
- labels: ``data.labels.columns`` ``{batch key: column}`` of the data set (Brainmarks' targets:
  ``gender``, ``age_q``, ...), joined to batches by subject as phenotype labels are; strings, integers
  and booleans are classes (sorted values, as Brainmarks' ``np.unique``; ``data.labels.categories``
  fixes the order), floats numbers. ``data.labels.file`` reads a phenotype table instead
  (:mod:`brainfm.data.phenotypes`). Every scalar column is also a per-run label of the store
  (``callbacks.probe.label=<column>``).
- normalization: ``run`` (the default) is Brainmarks' ``bold`` as stored; ``global`` and ``none`` work on
  the signal before Brainmarks' scaling (``bold * std + mean``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from brainfm.data.datamodules.roi import ROIDataModule
from brainfm.data.phenotypes import LabelTable
from brainfm.data.splits import SPLITS, check_disjoint
from brainfm.data.stores.brainmarks import BrainmarksStore
from brainfm.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class BrainmarksDataModule(ROIDataModule):
    """Windows of a Brainmarks data set (module docstring).

    Args:
        path: the ``<name>.<space>.arrow`` folder (layout: :mod:`brainfm.data.stores.brainmarks`).
        tr: seconds (every sample must have it), ``"mixed"`` or None (the samples' own; several TRs need
            ``resample_tr``).
        split: ``{"kind": "given"}`` (Brainmarks' splits), or ``time``/``subject`` as for every store.
        labels: ``{"columns": {key: column}, "categories": {key: [classes]}}`` from the data set's columns,
            or a phenotype table (``file``, ``id_column``, ``columns``, ``categories``).
        name, n_rois, normalization, window, split_dir, batch_size, eval_batch_size, num_workers, seed,
        pairs, cache, resample_tr: as :class:`~brainfm.data.datamodules.roi.ROIDataModule` (``n_rois``: the
        expected dimension, checked).

    Raises:
        DataError: from :meth:`setup`: as :class:`~brainfm.data.stores.brainmarks.BrainmarksStore`; a label
            column that is missing, varies within a subject or lacks values for some subjects.
        ConfigError: samples of several TRs without ``resample_tr``, a ``data.tr`` they do not have, unknown
            label keys.
    """

    def __init__(self, name: str, path: str, tr: float | str | None = None, n_rois: int | None = None,
                 normalization: dict | None = None, window: dict | None = None, split: dict | None = None,
                 split_dir: str = "data_splits", batch_size: int = 16, eval_batch_size: int = 64,
                 num_workers: int = 0, seed: int = 0, pairs: bool = False, labels: dict | None = None,
                 cache: dict | None = None, resample_tr: float | None = None) -> None:
        super().__init__(name, path, atlas=None, tr=tr, n_rois=n_rois, normalization=normalization, window=window,
                         split={"kind": "given", **(split or {})}, split_dir=split_dir, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed, preload=False,
                         pairs=pairs, labels=labels, cache=cache, resample_tr=resample_tr)
        if tr is None:  # the samples' own TR(s): one is used, several need resample_tr (check_store)
            self.expected_tr = "mixed"
        self._brainmarks: BrainmarksStore | None = None

    def open_store(self) -> BrainmarksStore:
        self._brainmarks = BrainmarksStore(self.path, cache=self.cache)
        return self._brainmarks

    def check_store(self, store) -> None:
        if self.tr == "mixed":
            trs = np.asarray(store.trs, dtype=float)
            counts = {f"{t:g} s": int(np.isclose(trs, t).sum()) for t in sorted(set(np.round(trs, 6)))}
            raise ConfigError(f"samples of {self.path} have different TRs (samples per TR: {counts}); brainfm's ROI "
                              "windows carry one TR. Fix: data.resample_tr=<s> resamples every sample to that TR "
                              "when it is read")
        super().check_store(store)

    # -- split ---------------------------------------------------------------------------------------------
    def split_segments(self, subject_ids, lengths, subject_split=None):
        """Brainmarks' own split for ``kind=given`` (module docstring), else the base class's."""
        if self.split["kind"] != "given":
            return super().split_segments(subject_ids, lengths, subject_split)
        store = self._given_store
        runs = store.split_runs()
        subjects = {k: sorted({store.subject_ids[r] for r in rows}) for k, rows in runs.items()}
        try:
            check_disjoint(subjects, source=str(self.path))
        except DataError:
            shared = sorted(set(subjects["train"]) & (set(subjects["val"]) | set(subjects["test"]))
                            | set(subjects["val"]) & set(subjects["test"]))
            log.warning("%s: %d subject(s) have samples in more than one of Brainmarks' splits (e.g. %s): the data "
                        "set is split by sample, and brainfm uses its split as given, as Brainmarks does",
                        self.path, len(shared), shared[:3])
        self.subject_split = subjects
        return {k: [(int(r), 0, int(lengths[r])) for r in runs[k]] for k in SPLITS}

    @property
    def _given_store(self) -> BrainmarksStore:
        """The Brainmarks store (under any resampling wrapper: the split and labels are its rows')."""
        if self._brainmarks is None:
            self.setup()
        return self._brainmarks

    def _label_table(self, subjects):
        config = self.labels_config
        if not config or config.get("file"):
            return super()._label_table(subjects)
        unknown = set(config) - {"columns", "categories"}
        if unknown:
            raise ConfigError(f"data.labels has unknown key(s) {sorted(unknown)}; with data=brainmarks: columns "
                              "({key: column of the data set}) and categories, or file/id_column for a phenotype table")
        columns = dict(config.get("columns") or {})
        if not columns:
            return None
        return self.labels_from_columns(columns, config.get("categories"), subjects)

    def labels_from_columns(self, columns: dict[str, str], categories: dict | None, subjects) -> LabelTable:
        """A :class:`~brainfm.data.phenotypes.LabelTable` of ``subjects`` from the data set's columns.

        Raises:
            DataError: a missing column, a value that differs between a subject's samples, a subject
                without a value.
        """
        import pandas as pd

        store = self._given_store
        categories = {k: [str(c) for c in v] for k, v in dict(categories or {}).items()}
        frame = {}
        for key, column in columns.items():
            if column not in store.run_label_names:
                raise DataError(f"{self.path} has no column {column!r} (data.labels.columns.{key}); scalar columns: "
                                f"{store.run_label_names}")
            values = store.run_labels(column)
            by_subject: dict[str, set] = {}
            for s, v in zip(store.subject_ids, values.tolist()):
                if v is None or (isinstance(v, float) and np.isnan(v)) or v == "":
                    continue
                by_subject.setdefault(s, set()).add(v)
            varying = [s for s, v in by_subject.items() if len(v) > 1]
            if varying:
                raise DataError(
                    f"{self.path}: column {column!r} differs between the samples of subject {varying[0]} "
                    f"({sorted(map(str, by_subject[varying[0]]))[:5]}; {len(varying)} subject(s) in all), so it is no "
                    "subject label, and brainfm joins labels to batches by subject. Fix: use it per sample "
                    f"(callbacks.probe.label={column}), or drop data.labels.columns.{key}")
            if key not in categories and values.dtype.kind in "USObiu":
                categories[key] = [str(c) for c in sorted({v for s in by_subject.values() for v in s})]
            frame[key] = {s: (next(iter(v)) if v else None) for s, v in by_subject.items()}
        df = pd.DataFrame(frame).astype(object)
        return LabelTable.from_frame(df, {k: k for k in columns}, list(subjects), categories, source=str(self.path),
                                     config_key="data.labels")

    @property
    def meta(self) -> dict[str, Any]:
        """The ROI datamodule's metadata plus ``layout: brainmarks`` and the data set's ``space``."""
        meta = super().meta
        store = self._given_store
        return {**meta, "layout": "brainmarks", "space": store.space}
