"""The one datamodule base: open a store, check it against the recipe (TR, ROI count, grid), split
it, carry the labels and normalization state, and build resumable loaders.

The ROI, volume (and data set recipe), R2T and multi-data-set datamodules are thin subclasses: they
say which store to open (:meth:`StoreDataModule.open_store`), what else to check
(:meth:`StoreDataModule.check_store`), what a sample is (their datasets) and what their checkpoint
must remember (:attr:`meta`).

Configuration keys are the same in every ``conf/data/*.yaml``: ``path``, ``tr``, ``split``
(``kind: time|subject``, ``train_fraction``, ``val_fraction``, ``fractions``, ``seed``, ``file``, ``unlisted``,
``groups``, ``family_column``), ``window``
(``length``, ``min_length``, ``frame_stride``, ``train_stride``, ``eval_stride``), ``normalization``,
``batch_size``, ``eval_batch_size``, ``num_workers``, ``seed``, ``labels``, ``cache`` (sizes of the
per-process store caches: ``open_runs``, ``masks``, ``voxel_stats``, ``run_stats``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np

from brainfm.data.phenotypes import build_label_table, read_families
from brainfm.data.splits import (
    Families,
    SubjectSplit,
    check_split_groups,
    check_split_sizes,
    resolve_subject_split,
    segments_for_subjects,
    time_split,
)
from brainfm.data.stores.base import cache_sizes
from brainfm.data.stores.resample import ResampledStore
from brainfm.data.windows import ResumableTrainPosition, WindowBatchSampler
from brainfm.errors import ConfigError

SPLIT_DEFAULTS = {"kind": "time", "train_fraction": 0.5, "val_fraction": None, "fractions": [0.8, 0.1, 0.1], "seed": 0,
                  "file": None, "unlisted": "error", "groups": None, "family_column": None}
WINDOW_KEYS = ("length", "min_length", "frame_stride", "train_stride", "eval_stride")


def check_tr(found: float | None, expected: float | None, where: str, key: str = "data.tr", tol: float = 1e-3) -> float:
    """Return the TR in seconds, raising ConfigError if ``found`` and ``expected`` disagree."""
    if found is None and expected is None:
        raise ConfigError(f"{where} records no repetition time; set {key}=<TR in seconds>")
    if found is not None and expected is not None and not math.isclose(found, expected, abs_tol=tol):
        raise ConfigError(
            f"TR mismatch: {where} has TR={found:g} s but {key}={expected:g} s. Fix: set "
            f"{key}={found:g} if the file is right, or resample the data to {expected:g} s; "
            "models see time in seconds, so a wrong TR silently changes what they learn."
        )
    return float(found if found is not None else expected)


def resolve_tr(store, expected: float | str | None, key: str = "data.tr") -> float | str:
    """The TR of ``store``'s runs in seconds, checked against the recipe's ``expected``.

    ``expected``: seconds (every run must agree), ``"mixed"`` (runs keep their own TRs; returns the
    common TR when there is one), or None (the store's single TR).

    Raises:
        ConfigError: a run whose TR differs from ``expected`` (named, with the number of such runs),
            runs with different TRs and ``expected`` None, or no TR anywhere.
    """
    trs = np.asarray(store.trs, dtype=float)
    if not len(trs) or np.isnan(trs).all():  # e.g. an ROI file that records no TR
        return check_tr(None, None if expected in (None, "mixed") else float(expected), str(store.location), key)
    common = float(trs[0]) if np.allclose(trs, trs[0], atol=1e-6) else None
    if expected == "mixed":
        return "mixed" if common is None else common
    if expected is None:
        if common is None:
            counts = {f"{t:g} s": int(np.isclose(trs, t).sum()) for t in sorted(set(np.round(trs, 6)))}
            raise ConfigError(
                f"runs of {store.location} have different TRs (runs per TR: {counts}). Fix: {key}=mixed to train "
                f"on them together (clip times stay in seconds), or {key}=<s> after selecting runs"
            )
        return common
    want = float(expected)
    bad = np.flatnonzero(~np.isclose(trs, want, atol=1e-3))
    if len(bad):
        i = int(bad[0])
        raise ConfigError(
            f"TR mismatch: {store.describe_run(i)} has TR={trs[i]:g} s but {key}={want:g} s "
            f"({len(bad)} of {len(trs)} runs differ). Fix: set {key}={trs[i]:g} if the data are right "
            f"({key}=mixed for mixed TRs), or preprocess again with the right --tr; models see time in "
            "seconds, so a wrong TR silently changes what they learn."
        )
    return want


def check_tr_value(tr: Any, key: str = "data.tr") -> None:
    """Refuse a TR that is a number but not a positive one (``mixed`` and None pass: they are resolved
    against the store).

    Raises:
        ConfigError: ``tr <= 0`` (or NaN), naming the key and what it means.
    """
    if isinstance(tr, (int, float)) and not isinstance(tr, bool) and not tr > 0:
        rest = "null: the data's own TR" if key.endswith(".tr") and "resample" not in key else "null: no resampling"
        raise ConfigError(f"{key}={tr:g} is not a repetition time: {key} must be > 0 seconds (e.g. 0.72 for HCP, "
                          f"2.0 for many rs-fMRI protocols), or {rest}")


def check_batch_sizes(batch_size: Any, eval_batch_size: Any = 1, prefix: str = "data.") -> None:
    """Refuse batch sizes below 1 (windows per batch and rank).

    Raises:
        ConfigError: naming the key and the fix.
    """
    for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if value is not None and int(value) < 1:
            raise ConfigError(f"{prefix}{key}={value} must be at least 1 (windows per batch on each rank). Fix: a "
                              f"positive size, e.g. {prefix}{key}=16")


def plain(value: Any) -> Any:
    """A config value as plain containers (tuples become lists), for checkpoint metadata."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


class StoreDataModule(ResumableTrainPosition, L.LightningDataModule):
    """Base of brainfm's datamodules (module docstring).

    Args:
        name: data set name (split files go to ``split_dir``).
        path: the store (file or folder).
        tr: expected TR in seconds (checked against every run), ``"mixed"`` where a datamodule allows
            runs of different TRs, or None (the store's own).
        split: ``{"kind": "time", "train_fraction": 0.5, "val_fraction": None}`` (the first part of each
            run trains, the next ``val_fraction`` (None: the rest) validates) or ``{"kind": "subject", "fractions": [0.8, 0.1, 0.1], "seed": 0, "file": None,
            "unlisted": "error"}`` (a seeded subject split, written once to ``split_dir`` after the datamodule was
            built and checked, keyed by the data's subjects (:func:`brainfm.data.splits.resolve_subject_split`), then
            read back; ``file``: an explicit split file; ``unlisted``: data subjects that file does not list,
            ``error`` or ``drop``; ``groups``: null (by subject) or ``family`` (whole families in one split, their
            ids from ``family_column`` of a phenotype table, :meth:`families`)).
        split_dir: folder of this data set's split files (``data_splits/<dataset>``).
        window: ``length``, ``min_length`` (shortest random crop in training, None: always ``length``),
            ``frame_stride`` (TRs between a window's frames), ``train_stride`` / ``eval_stride`` (TRs
            between window starts in training / evaluation). Subclasses set the defaults.
        batch_size, eval_batch_size: windows per batch in training / evaluation.
        num_workers: DataLoader worker processes. seed: sampler (and augmentation) seed.
        labels: phenotype labels joined to batches by subject (:mod:`brainfm.data.phenotypes`).
        cache: per-process store cache sizes (:data:`brainfm.data.stores.base.DEFAULT_CACHE`).
        resample_tr: seconds: the runs are resampled to this TR when read
            (:class:`~brainfm.data.stores.resample.ResampledStore`, polyphase, ROI and grayordinate
            stores) after the file's TR was checked against ``tr``; the datamodule's TR is then this
            one. None: the data's TR.

    Raises:
        ConfigError: unknown window keys or cache sizes, ``batch_size`` or ``eval_batch_size`` below 1, a
            ``tr`` or ``resample_tr`` that is not a positive number of seconds, ``split.groups`` that is not null
            or ``family``, or ``family`` on a split that is not by subject. From :meth:`setup` as the
            subclasses say, and DataError: a subject split without a training or validation subject (when
            set up for training, ``stage`` fit or None).
    """

    window_defaults: dict[str, Any] = {"length": 60, "min_length": None, "frame_stride": 1, "train_stride": None,
                                       "eval_stride": None}

    def __init__(self, name: str, path: str, tr: float | str | None = None, split: dict | None = None,
                 split_dir: str = "data_splits", window: dict | None = None, batch_size: int = 16,
                 eval_batch_size: int = 64, num_workers: int = 0, seed: int = 0, labels: dict | None = None,
                 cache: dict | None = None, resample_tr: float | None = None) -> None:
        super().__init__()
        self.name, self.path = name, Path(path)
        check_tr_value(tr, "data.tr")
        check_tr_value(resample_tr, "data.resample_tr")
        self.expected_tr = tr
        self.resample_tr = None if resample_tr is None else float(resample_tr)
        self.split = {**SPLIT_DEFAULTS, **(split or {})}
        self.family_split = check_split_groups(self.split)
        self.split_dir = Path(split_dir)
        unknown = set(window or {}) - set(WINDOW_KEYS)
        if unknown:
            raise ConfigError(f"data.window has unknown key(s) {sorted(unknown)}; allowed: {list(WINDOW_KEYS)} "
                              "(data.clip is now data.window; clip.stride is window.frame_stride, "
                              "train/eval_clip_stride are window.train/eval_stride)")
        self.window = {**self.window_defaults, **(window or {})}
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        check_batch_sizes(batch_size, eval_batch_size)
        self.num_workers, self.seed = int(num_workers), int(seed)
        self.labels_config = labels
        self.labels = None
        try:
            self.cache = cache_sizes(cache)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self.store = None
        self.tr: float | str | None = None
        self.segments: dict[str, list[tuple[int, int, int]]] = {}
        self.subject_split: dict[str, list[str]] | None = None
        self.split_file: Path | None = None
        self._resolved_split: SubjectSplit | None = None
        self._resume: tuple[int, int] | None = None
        self._train_sampler: WindowBatchSampler | None = None

    # -- what subclasses define --------------------------------------------------------------------------
    def open_store(self):
        """The store this datamodule reads (opened, not yet checked)."""
        raise NotImplementedError

    def check_store(self, store) -> None:
        """Checks beyond the TR (ROI count, grid, normalization); raise ConfigError/DataError."""

    def after_setup(self) -> None:
        """Work once the store, TR, segments and labels are set (normalizer, dataset checks)."""

    # -- setup ----------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.store is not None:
            return
        store = self.open_store()
        self.tr = resolve_tr(store, self.expected_tr)  # the file against the recipe: a mismatch is refused
        if self.resample_tr is not None:
            store = ResampledStore(store, self.resample_tr, cache_runs=self.cache["resampled_runs"])
            self.tr = self.resample_tr
        self.check_store(store)
        self.segments = self.split_segments(store.subject_ids, store.lengths)
        if stage in ("fit", None):
            self.check_split()
        self.store = store
        self.labels = self._label_table(store.subjects())
        try:
            self.after_setup()
        except BaseException:
            self.store = None
            raise
        self.write_split()

    def check_split(self) -> None:
        """Refuse a subject split without a training or validation subject (:func:`~brainfm.data.splits.check_split_sizes`;
        a validation share of 0 in ``data.split.fractions`` asks for none).

        Raises:
            DataError: naming the store, the counts and the fix.
        """
        if self._resolved_split is not None:
            fractions = self.split.get("fractions") or (0.8, 0.1, 0.1)
            check_split_sizes(self._resolved_split, f"{self.path} (data={self.name})", float(fractions[1]))

    def write_split(self) -> None:
        """Write a newly drawn subject split to its file (atomically); called at the end of :meth:`setup`, once
        the store, the split and the datasets have been built and checked, so a run that fails before leaves
        no split file behind."""
        if self._resolved_split is not None:
            self._resolved_split.write(self.name)

    def split_segments(self, subject_ids: Sequence[str], lengths: np.ndarray,
                       subject_split: dict[str, list[str]] | None = None) -> dict[str, list[tuple[int, int, int]]]:
        """``{"train"|"val"|"test": [(run, first TR, stop TR), ...]}`` of runs with these subjects and lengths
        (``subject_split``: a subject split already drawn, e.g. over the subjects of several stores).

        Raises:
            ConfigError: an unknown split kind or fraction. DataError: an existing split file that does not
                cover the data's subjects, or a subject in two splits.
        """
        kind = self.split["kind"]
        if kind == "time":
            val = self.split.get("val_fraction")
            return time_split(lengths, float(self.split["train_fraction"]), None if val is None else float(val))
        if kind == "subject":
            if subject_split is None:
                self._resolved_split = self._subject_split(subject_ids)
                self.subject_split, self.split_file = self._resolved_split.split, self._resolved_split.path
            else:
                self.subject_split = subject_split
            return {name: segments_for_subjects(subject_ids, lengths, subjects)
                    for name, subjects in self.subject_split.items()}
        raise ConfigError(f"data.split.kind={kind!r} must be 'time' or 'subject'")

    def _subject_split(self, subject_ids: Sequence[str]) -> SubjectSplit:
        """The subject split of these subjects: its file (``data.split.file``, else the file keyed by these
        subjects, ``<split_dir>/seed<N>_<n>subjects_<fingerprint>.txt``) when it exists, else a seeded draw,
        written by :meth:`write_split` (:func:`~brainfm.data.splits.resolve_subject_split`). Data set recipes
        override it with label-stratified draws."""
        return resolve_subject_split(self.split_dir, f"seed{int(self.split['seed'])}", subject_ids,
                                     self.split["fractions"], int(self.split["seed"]), file=self.split.get("file"),
                                     unlisted=self.split.get("unlisted") or "error", what=self.name,
                                     families=self.families if self.family_split else None)

    def family_tables(self) -> tuple[dict[str, dict], Any, str]:
        """Where ``data.split.groups=family`` finds family ids: ``(phenotype tables, subject-id rules or None, how to
        add a table)``. Here the ``data.labels`` table (it may have no label ``columns``: a table read only for its
        family ids); data set recipes use their ``data.phenotypes`` tables."""
        if self.labels_config:
            return ({"labels": dict(self.labels_config)}, None,
                    f"add the family column to the data.labels table {self.labels_config.get('file')}")
        return {}, None, "data.labels={file: <table.csv>, id_column: <subject column>, columns: {}}"

    def families(self, subjects: Sequence[str]) -> Families:
        """The family of each of ``subjects`` (:func:`~brainfm.data.phenotypes.read_families` over
        :meth:`family_tables`, column ``data.split.family_column`` or found).

        Raises:
            ConfigError: no table with the family column. DataError: a subject without a family id.
        """
        tables, ids, add_table = self.family_tables()
        of, source = read_families(tables, subjects, self.split.get("family_column"), ids=ids, add_table=add_table)
        return Families(of, source)

    def _label_table(self, subjects: Sequence[str]):
        """Phenotype labels of ``subjects`` (in subject-index order), or None."""
        return build_label_table(self.labels_config, subjects)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        return self.labels.add_to(batch) if self.labels is not None else batch

    def base_meta(self) -> dict[str, Any]:
        """What every checkpoint remembers about its data: name, path, TR, split (with the split file)
        and the number of subjects (not their ids: a checkpoint stays small at 50,000 subjects)."""
        return {
            "dataset": self.name,
            "path": str(self.path),
            "tr": self.tr,
            "resample_tr": self.resample_tr,
            "split": plain(self.split),
            "split_file": None if self.split_file is None else str(self.split_file),
            "n_subjects": len(self.store.subjects()),
            "window_length": int(self.window["length"]),
        }

    # -- samplers -----------------------------------------------------------------------------------------
    def train_sampler(self, n_items: int, length: int, min_length: int | None = None,
                      pairs: bool = False) -> WindowBatchSampler:
        """The resumable training sampler (fast-forwarded once when the run resumes mid-epoch).

        Raises:
            ConfigError: fewer training windows per rank than ``batch_size`` (no batch at all: Lightning would
                end the run at step 0 without a word).
        """
        sampler = WindowBatchSampler(n_items, self.batch_size, length=length, min_length=min_length, seed=self.seed,
                                     pairs=pairs)
        if len(sampler) == 0:
            raise ConfigError(
                f"no training batch: the training split of {self.path} (data={self.name}) has {sampler._per_rank()} "
                f"window(s) of {length} TRs per rank, fewer than data.batch_size={self.batch_size} (the last partial "
                "batch is dropped). Fix: a smaller data.batch_size, a shorter data.window.length, or more training "
                "data (subjects, or a larger data.split.train_fraction)"
            )
        if self._resume is not None:
            sampler.fast_forward(*self._resume)
            self._resume = None
        self._train_sampler = sampler
        return sampler

    def eval_sampler(self, n_items: int, length: int, pairs: bool = False) -> WindowBatchSampler:
        """Fixed evaluation batches (in order; pairs seeded, so validation losses compare across steps),
        the windows partitioned over the ranks: each window is evaluated once."""
        return WindowBatchSampler(n_items, self.eval_batch_size, length, seed=self.seed, shuffle=False,
                                  drop_last=False, pairs=pairs)
