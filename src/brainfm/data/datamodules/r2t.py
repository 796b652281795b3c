"""Rest <-> task pairs of the same subject, for R2T-Net (rest2task/R2T-Net).

R2T-Net trains on pairs ``(rest window, task window)`` of one subject: a window of a resting-state
run and a window of a task run (HCP: ``REST1_LR``, 1200 TRs, with ``WM_LR``, 405 TRs; TR 0.72 s),
drawn at random in every epoch (the reference's ``PairedFMRIWindowDataset`` picks a rest scan and
a task scan of the subject uniformly, then a start uniformly in each). Subjects of other pairs in
a batch are the negatives of its NT-Xent loss. The three input kinds of the reference are
supported, each from a brainfm store:

- ``volume``: frames ``[1, X, Y, Z]`` (raw 4-D NIfTI in the reference) from a
  :class:`~brainfm.data.stores.volume.VolumeStore` (or SwiFT/R2T ``img/<subject>/frame_<t>.pt``
  folders); batch view ``volume`` ``(B, 1, X, Y, Z, L)`` float16, for Swin4D.
- ``grayordinate``: frames ``[91282]`` (CIFTI ``.dtseries.nii``) from a :class:`GrayordinateStore`
  (this module); batch view ``bold`` ``(B, L, 91282)`` float32.
- ``roi``: frames ``[V]`` (parcellated) from a :class:`~brainfm.data.stores.roi.ROIStore`; batch
  view ``bold`` ``(B, L, V)`` float32 (z-scored per ROI and run by default).

Rest and task runs are told apart by their run ids (``rest_runs``/``task_runs``: shell patterns,
case-insensitive, e.g. ``*REST*`` and ``*WM*``); they may sit in one store or in two
(``task_path``: e.g. the embedded resting-state ROI file plus a task file of the same atlas).

A paired batch carries the rest view under the usual keys (``bold``/``volume``, ``t``, ``onset``,
``run``) and the task view under ``task_``-prefixed keys (``task_bold``/``task_volume``,
``task_t``, ``task_onset``, ``task_run``), plus ``subject`` (index into
:attr:`R2TDataModule.subjects`). A rest-only batch (rest-only inference, R2T-Net's ``predict``)
is an ordinary window batch: ``bold``/``volume``, ``t``, ``subject``.

One datamodule per input kind, on one base (:class:`R2TDataModule`: stores, roles, subject split, pairs,
loaders): :class:`ROIR2TDataModule`, :class:`GrayordinateR2TDataModule` and :class:`VolumeR2TDataModule`
(the ``_target_`` of ``conf/data/r2t_roi.yaml``, ``r2t_grayordinate.yaml``, ``r2t_volume.yaml``) say only
how their kind opens, checks, windows and describes a store. ``R2TDataModule(kind=...)`` builds the
subclass of ``kind``.

The grayordinate store's layout is in :mod:`brainfm.data.stores.grayordinate`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from brainfm.data.datamodules.base import StoreDataModule, plain, resolve_tr
from brainfm.data.datasets.pairs import ROLES, R2TPairDataset, assign_roles
from brainfm.data.datasets.roi import ROIWindowDataset
from brainfm.data.datasets.volume import LOAD_NORMALIZATIONS, VolumeClipDataset
from brainfm.data.normalization import ROINormalizer
from brainfm.data.orientation import common_orientation, store_orientation
from brainfm.data.stores import open_store
from brainfm.data.windows import WindowBatchSampler, clean_windows, collate_windows
from brainfm.errors import ConfigError, DataError

KINDS = ("volume", "grayordinate", "roi")


class R2TDataModule(StoreDataModule):
    """Rest/task pairs of the same subject (R2T-Net) for volumes, grayordinates or ROI series: the part
    every kind shares. ``R2TDataModule(kind=...)`` returns the subclass of that kind
    (:class:`ROIR2TDataModule`, :class:`GrayordinateR2TDataModule`, :class:`VolumeR2TDataModule`), which
    implements the hooks :meth:`_open`, :meth:`_check_values`, :meth:`_check_same_space`,
    :meth:`_role_dataset` and :meth:`_kind_meta`.

    Args:
        name: data set name (subject split files go to ``split_dir``).
        kind: ``volume`` | ``grayordinate`` | ``roi``.
        path: the store with the rest runs (and the task runs unless ``task_path``): a volume store
            (or SwiFT ``img/`` frames with ``layout=frames``), a grayordinate store, or a ROI HDF5.
        task_path: a second store of the same kind holding the task runs (None: ``path``).
        rest_runs, task_runs: shell patterns on run ids (case-insensitive); ``task_runs=None``:
            every run that is not rest. Frame folders (``layout=frames``) have no run ids: every run
            of ``path`` is rest and every run of ``task_path`` (required) is task.
        tr: expected TR in seconds (checked against every store; None: the stores' own, which must agree).
        n_rois: expected values per TR for ``roi`` (ROIs) and ``grayordinate`` (91282 for HCP); checked.
        atlas: ROI atlas under ``/timeseries`` (``roi``). preload: ROI store preload.
        normalization: ``roi``: ``{"mode": "run"|"global"|"none", "eps"}`` (per store). ``volume``:
            ``{"load": one of LOAD_NORMALIZATIONS}``. ``grayordinate``: None (the store is normalized
            when written).
        layout, shape: ``volume``: ``volumes``|``frames`` and the expected grid ``[X, Y, Z]``.
        window: ``{"length": TRs per window (Swin4D: the model's img_size[3]), "frame_stride": TRs between
            a clip's frames (volume only), "eval_stride": TRs between rest-only evaluation windows}``.
        split: ``{"kind": "subject", "fractions", "seed", "file"}`` (subjects of both stores) or
            ``{"kind": "time", "train_fraction"}`` (the start of every run trains, the rest validates).
        split_dir: folder of the split files.
        pairs_per_subject: training pairs per subject and epoch (new random windows each time).
        unpaired: a subject of a split with rest but no task runs (or the reverse, or runs shorter
            than a window): ``skip`` (warned, listing them; R2T-Net skips them silently) or ``error``.
            Rest-only subjects still get rest-only predictions.
        batch_size, eval_batch_size, num_workers, seed: loaders (``seed``: pair draws).
        labels: phenotype labels joined by subject (:mod:`brainfm.data.phenotypes`), e.g. HCP's
            working-memory accuracies, R2T-Net's supervised targets.

    Raises:
        ConfigError: an unknown ``kind``, or one that is not the subclass's (the recipe to use named).
        ConfigError / DataError: from :meth:`setup`: missing stores, a TR, ROI-count, ROI-order or grid
        mismatch between stores or with the recipe, no paired training subjects, unpaired subjects with
        ``unpaired=error``, fewer training pairs than a batch.
    """

    window_defaults = {"length": 20, "min_length": None, "frame_stride": 1, "train_stride": 1, "eval_stride": None}
    #: the input kind (one of :data:`KINDS`), set by each subclass
    kind: str | None = None
    #: the batch entry of a window: ``bold`` (ROI / grayordinate series) or ``volume``
    view = "bold"
    #: ``data.normalization`` defaults of the kind
    normalization_defaults: dict[str, Any] = {}

    def __new__(cls, *args: Any, **kwargs: Any):
        if cls is R2TDataModule:  # the base: the subclass of data.kind
            kind = kwargs.get("kind", args[1] if len(args) > 1 else None)
            if kind not in KINDS:
                raise ConfigError(f"data.kind={kind!r} must be one of {KINDS}")
            cls = next(c for c in _subclasses(R2TDataModule) if c.kind == kind)
        return super().__new__(cls)

    def __init__(
        self,
        name: str,
        kind: str,
        path: str,
        task_path: str | None = None,
        rest_runs: Sequence[str] = ("*REST*",),
        task_runs: Sequence[str] | None = None,
        tr: float | None = None,
        n_rois: int | None = None,
        atlas: str | None = None,
        preload: bool | str = "auto",
        normalization: dict | None = None,
        layout: str = "volumes",
        shape: Sequence[int] | None = None,
        window: dict | None = None,
        split: dict | None = None,
        split_dir: str = "data_splits",
        pairs_per_subject: int = 1,
        unpaired: str = "skip",
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        labels: dict | None = None,
        cache: dict | None = None,
    ) -> None:
        super().__init__(name, path, tr=tr, split={"kind": "subject", **(split or {})}, split_dir=split_dir,
                         window=window, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, seed=seed, labels=labels, cache=cache)
        if kind not in KINDS:
            raise ConfigError(f"data.kind={kind!r} must be one of {KINDS}")
        if kind != self.kind:
            raise ConfigError(f"data.kind={kind!r} but {type(self).__name__} reads {self.kind} stores. Fix: data=r2t_{kind} "
                              f"(target {KIND_CLASS_NAMES[kind]})")
        if unpaired not in ("skip", "error"):
            raise ConfigError(f"data.unpaired={unpaired!r} must be 'skip' or 'error'")
        self.task_path = Path(task_path) if task_path else None
        self.rest_runs = [str(p) for p in (rest_runs or [])]
        self.task_runs = None if task_runs is None else [str(p) for p in task_runs]
        if not self.rest_runs:
            raise ConfigError("data.rest_runs needs at least one pattern (e.g. ['*REST*'])")
        self.expected_n_rois = n_rois
        self.atlas, self.preload = atlas, preload
        self.normalization = {**self.normalization_defaults, **(normalization or {})}
        self.layout = layout
        self.expected_shape = None if shape is None else tuple(int(s) for s in shape)
        self.pairs_per_subject = int(pairs_per_subject)
        self.unpaired = unpaired
        self.stores: dict[str, Any] = {}
        self.normalizers: dict[str, ROINormalizer | None] = {}
        self.normalizer: ROINormalizer | None = None
        self.roles: dict[str, list[str | None]] = {}
        self.subjects: list[str] = []
        self.subject_index: dict[str, int] = {}
        self.segments: dict[str, dict[str, list[tuple[int, int, int]]]] = {}  # type: ignore[assignment]
        self.paired_subjects: dict[str, list[str]] = {}
        self.unpaired_subjects: dict[str, list[str]] = {}
        self._pairs: dict[str, R2TPairDataset] = {}

    # -- what each kind says (subclasses) -----------------------------------------------------------------------
    def _open(self, path: Path):
        """The store at ``path`` (:func:`brainfm.data.stores.open_store`)."""
        return open_store(self._store_kind(), path, atlas=self.atlas, preload=self.preload, tr=self.expected_tr,
                          cache=self.cache)

    def _store_kind(self) -> str:
        return str(self.kind)

    def _check_values(self, store, path: Path) -> None:
        """Check the values per TR (ROIs, grayordinates) or the grid of ``store`` against the recipe."""
        raise NotImplementedError

    def _check_same_space(self, rest, task) -> None:
        """Check that the rest and task stores are in one space (ROIs and their order, or the grid)."""
        raise NotImplementedError

    def _check_options(self) -> None:
        """Check the kind's own options before any store is opened (default: none)."""

    @property
    def frames(self) -> bool:
        """The stores are SwiFT/R2T frame folders (no run ids: ``path`` rest, ``task_path`` task)."""
        return False

    @property
    def frame_stride(self) -> int:
        """TRs between a window's frames (1 but for volume clips)."""
        return 1

    def _fit_normalizers(self, stores: dict[str, Any], train: dict[str, list[tuple[int, int, int]]]) -> None:
        """Fit the per-store normalization on the training segments (default: none, the store is normalized)."""

    def _role_dataset(self, role: str, segments: list[tuple[int, int, int]], stride: int | None = None):
        """The window (or clip) dataset of ``role``'s store over ``segments``, windows every ``stride`` TRs."""
        raise NotImplementedError

    def _kind_meta(self, rest) -> dict[str, Any]:
        """The kind's entries of :attr:`meta` (``rest``: the rest store)."""
        raise NotImplementedError

    # -- setup --------------------------------------------------------------------------------------------
    def _check_store(self, store, path: Path) -> float:
        """TR of ``store`` (one per store, checked against the recipe), plus its value count or grid."""
        tr = resolve_tr(store, None if self.expected_tr is None else float(self.expected_tr))
        self._check_values(store, path)
        return float(tr)

    def _span(self) -> int:
        return (int(self.window["length"]) - 1) * self.frame_stride + 1

    def setup(self, stage: str | None = None) -> None:
        if self.stores:
            return
        length = int(self.window["length"])
        if length < 2:
            raise ConfigError(f"data.window.length={length} must be >= 2 TRs")
        self._check_options()
        frames = self.frames
        if frames and not self.task_path:
            raise ConfigError(f"frame folders ({self.path}) hold one run per subject: put the rest frames in data.path "
                              "and the task frames (R2T-Net's preprocessing_HCP_Task.py output) in data.task_path")
        rest_store = self._open(self.path)
        task_store = self._open(self.task_path) if self.task_path else rest_store
        trs = {self._check_store(rest_store, self.path)}
        if task_store is not rest_store:
            trs.add(self._check_store(task_store, self.task_path))
            self._check_same_space(rest_store, task_store)
        if len(trs) > 1:
            raise ConfigError(f"{self.path} has TR {min(trs):g} s and {self.task_path} TR {max(trs):g} s; set data.tr "
                              "and resample one of them")
        self.tr = trs.pop()
        stores = {"rest": rest_store, "task": task_store}
        roles = {}
        for role, store in stores.items():
            if frames:  # no run ids: every run of data.path is rest, every run of data.task_path is task
                assigned = [role] * len(store.run_ids)
            else:
                assigned = assign_roles(store.run_ids, self.rest_runs, self.task_runs)
            roles[role] = assigned
            if role not in assigned:
                where = self.task_path if role == "task" and self.task_path else self.path
                raise ConfigError(
                    f"no {role} runs in {where}: run ids {sorted(set(store.run_ids))[:8]} match none of "
                    f"data.{role}_runs={self.rest_runs if role == 'rest' else self.task_runs}. Fix the patterns"
                )
        self.subjects = sorted({s for role in ROLES for s, r in zip(stores[role].subject_ids, roles[role]) if r == role})
        self.subject_index = {s: i for i, s in enumerate(self.subjects)}
        if self.split["kind"] == "subject":  # subjects of both stores, one split
            self._resolved_split = self._subject_split(self.subjects)
            self.subject_split, self.split_file = self._resolved_split.split, self._resolved_split.path
            if stage in ("fit", None):
                self.check_split()
        per_split: dict[str, dict[str, list[tuple[int, int, int]]]] = {name: {} for name in ("train", "val", "test")}
        for role in ROLES:
            parts = self.split_segments(stores[role].subject_ids, stores[role].lengths, self.subject_split)
            for name in per_split:
                per_split[name][role] = [s for s in parts.get(name, []) if roles[role][s[0]] == role]
        self._fit_normalizers(stores, per_split["train"])
        self.normalizer = self.normalizers.get("rest")
        self.stores, self.roles, self.segments = stores, roles, per_split
        self.store = rest_store
        self.labels = self._label_table(self.subjects)
        self._pairs = {}
        for name in ("train", "val", "test"):
            self._pairs_for(name, must_exist=name == "train")
        train = self._pairs.get("train")
        if train is not None and len(train) < self.batch_size:
            raise ConfigError(
                f"{len(train.subjects)} paired training subject(s) x data.pairs_per_subject={self.pairs_per_subject} "
                f"give {len(train)} pairs per epoch, fewer than data.batch_size={self.batch_size}. Fix: lower "
                "data.batch_size or raise data.pairs_per_subject"
            )
        self.write_split()  # a new subject split, once everything above was checked

    def _pairs_for(self, split: str, must_exist: bool = False) -> R2TPairDataset | None:
        span = self._span()
        windows: dict[str, dict[str, list[tuple[int, int]]]] = {}
        present: dict[str, set[str]] = {}
        for role in ROLES:
            store, segs = self.stores[role], self.segments[split].get(role, [])
            windows[role] = {}
            for run, first, count in clean_windows(store, segs, span, 1)[0].run_windows():  # as the datasets number them
                if count:
                    windows[role].setdefault(store.subject_ids[run], []).append((first, count))
            present[role] = {store.subject_ids[run] for run, _, _ in segs}
        subjects = present["rest"] | present["task"]
        paired = sorted(s for s in subjects if s in windows["rest"] and s in windows["task"])
        missing = sorted(subjects - set(paired))
        self.paired_subjects[split], self.unpaired_subjects[split] = paired, missing
        if missing:
            why = {s: ("no task window" if s in windows["rest"] else "no rest window") for s in missing}
            shown = ", ".join(f"{s} ({w})" for s, w in list(why.items())[:8]) + (" ..." if len(why) > 8 else "")
            msg = (f"{len(missing)} {split} subject(s) of {self.name} cannot be paired: {shown}. A subject needs a rest "
                   f"run (data.rest_runs={self.rest_runs}) and a task run (data.task_runs={self.task_runs}) of at least "
                   f"{span} TRs in the split. Fix the run patterns, add the runs, or exclude the subjects")
            if self.unpaired == "error":
                raise DataError(msg + " (data.unpaired=error)")
            warnings.warn(msg + "; they are skipped (data.unpaired=skip)", UserWarning, stacklevel=2)
        if not paired:
            if must_exist:
                raise ConfigError(f"no paired {split} subjects in {self.name} (subjects with both a rest and a task window "
                                  f"of {span} TRs); check data.rest_runs / data.task_runs and data.window.length")
            return None
        rest = self._role_dataset("rest", self.segments[split]["rest"])
        task = self._role_dataset("task", self.segments[split]["task"])
        ds = R2TPairDataset(rest, task, windows["rest"], windows["task"], paired, self.view,
                            self.pairs_per_subject if split == "train" else 1)
        self._pairs[split] = ds
        return ds

    def pair_dataset(self, split: str) -> R2TPairDataset:
        """Rest/task pairs of ``split`` (``train``, ``val`` or ``test``).

        Raises:
            ConfigError: the split has no paired subjects.
        """
        self.setup()
        if split not in self._pairs:
            raise ConfigError(f"split {split!r} of {self.name} has no paired subjects")
        return self._pairs[split]

    def rest_dataset(self, split: str = "test") -> Dataset:
        """Rest-only windows of every subject of ``split`` with a rest run (also those without a task
        run): R2T-Net's rest-only inference. Windows every ``window.eval_stride`` TRs (default: length).

        Raises:
            ConfigError: no rest run in the split is long enough for one window.
        """
        self.setup()
        segs = self.segments[split].get("rest", [])
        if not segs:
            raise ConfigError(f"split {split!r} of {self.name} has no rest runs")
        stride = int(self.window.get("eval_stride") or self._span())  # default: one window span
        return self._role_dataset("rest", segs, stride=stride)

    def label_stats(self, split: str = "train") -> dict[str, dict]:
        """Mean/std (numeric) or class counts (categorical) of each label over the paired subjects of
        ``split`` (the training subjects by default: targets are standardised with training
        statistics, as R2T-Net's StandardScaler)."""
        self.setup()
        if self.labels is None:
            return {}
        idx = torch.tensor([self.subject_index[s] for s in self.paired_subjects.get(split, [])], dtype=torch.long)
        return self.labels.stats(idx)

    @property
    def meta(self) -> dict[str, Any]:
        """What a checkpoint must remember about the data (plain containers)."""
        self.setup()
        rest = self.stores["rest"]
        out: dict[str, Any] = {
            **self.base_meta(),
            "n_subjects": len(self.subjects),
            "kind": self.kind,
            "task_path": str(self.task_path) if self.task_path else None,
            "rest_runs": list(self.rest_runs),
            "task_runs": None if self.task_runs is None else list(self.task_runs),
            "normalization": plain(self.normalization),
            "n_paired_subjects": {k: len(v) for k, v in self.paired_subjects.items()},
        }
        out.update(self._kind_meta(rest))
        return out

    # -- loaders ----------------------------------------------------------------------------------------------
    def _pair_loader(self, ds: R2TPairDataset, sampler: WindowBatchSampler) -> DataLoader:
        return DataLoader(ds, batch_sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, collate_fn=collate_windows)

    def train_dataloader(self) -> DataLoader:
        ds = self.pair_dataset("train")
        return self._pair_loader(ds, self.train_sampler(len(ds), int(self.window["length"]), pairs=True))

    def _eval_pairs(self, split: str):
        self.setup()
        ds = self._pairs.get(split)
        if ds is None:
            return []
        return self._pair_loader(ds, self.eval_sampler(len(ds), int(self.window["length"]), pairs=True))

    def val_dataloader(self):
        return self._eval_pairs("val")

    def test_dataloader(self):
        return self._eval_pairs("test" if self._pairs.get("test") else "val")

    def predict_dataloader(self) -> DataLoader:
        """Rest-only windows of the test split (val when there is none): R2T-Net's ``predict``."""
        self.setup()
        split = "test" if self.segments["test"].get("rest") else "val"
        ds = self.rest_dataset(split)
        return DataLoader(ds, batch_sampler=self.eval_sampler(len(ds), int(self.window["length"])),
                          num_workers=self.num_workers, collate_fn=collate_windows)


class _SeriesR2TDataModule(R2TDataModule):
    """What ROI and grayordinate series share: values per TR checked, one space for rest and task,
    :class:`~brainfm.data.datasets.roi.ROIWindowDataset` windows, ``bold`` ``(B, L, V)`` float32."""

    #: what one value per TR is called in messages
    values = "ROIs"

    def _check_values(self, store, path: Path) -> None:
        what = self.values
        if self.expected_n_rois is not None and int(self.expected_n_rois) != store.n_rois:
            raise ConfigError(
                f"{what} mismatch: {path} has {store.n_rois} {what} per TR but data.n_rois={self.expected_n_rois}. "
                f"Fix: set data.n_rois={store.n_rois} (the model's input layer follows it), or point data.path "
                "at the data you meant"
            )

    def _check_same_space(self, rest, task) -> None:
        if rest.n_rois != task.n_rois:
            raise ConfigError(f"{self.path} has {rest.n_rois} values per TR but task_path {self.task_path} has "
                              f"{task.n_rois}; rest and task must be in the same parcellation / CIFTI space")
        if rest.roi_names and task.roi_names and list(rest.roi_names) != list(task.roi_names):
            i = next(i for i, (a, b) in enumerate(zip(rest.roi_names, task.roi_names)) if a != b)
            raise ConfigError(f"ROI order of {self.task_path} differs from {self.path} at index {i}: "
                              f"{task.roi_names[i]!r} vs {rest.roi_names[i]!r}. Fix: reorder the task store's ROIs")

    def _role_dataset(self, role: str, segments: list[tuple[int, int, int]], stride: int | None = None):
        return ROIWindowDataset(self.stores[role], self.normalizers.get(role) or ROINormalizer(mode="none"), segments,
                                int(self.window["length"]), stride=stride or 1, subject_index=self.subject_index)

    def _kind_meta(self, rest) -> dict[str, Any]:
        return {"n_rois": int(rest.n_rois), "roi_names": list(rest.roi_names) if rest.roi_names else None}


class ROIR2TDataModule(_SeriesR2TDataModule):
    """R2T pairs of parcellated ROI series from ROI HDF5 stores (``data=r2t_roi``): frames ``[V]``, z-scored
    per ROI and run by default (``normalization.mode``: ``run`` | ``global`` | ``none``, per store, fitted on
    the training windows). Arguments: :class:`R2TDataModule`."""

    kind = "roi"
    normalization_defaults = {"mode": "run", "eps": 1e-6}

    def _fit_normalizers(self, stores: dict[str, Any], train: dict[str, list[tuple[int, int, int]]]) -> None:
        for role, store in stores.items():
            if role not in self.normalizers:
                train_segs = [s for r in ROLES if stores[r] is store for s in train.get(r, [])]
                norm = ROINormalizer.fit(store, self.normalization["mode"], float(self.normalization["eps"]), train_segs)
                self.normalizers[role] = norm
                if stores["task"] is stores["rest"]:
                    self.normalizers["task"] = norm

    def _kind_meta(self, rest) -> dict[str, Any]:
        return {**super()._kind_meta(rest), "atlas": rest.atlas}


class GrayordinateR2TDataModule(_SeriesR2TDataModule):
    """R2T pairs of grayordinate series (CIFTI, 91282 values per TR for HCP) from grayordinate stores
    (``data=r2t_grayordinate``), normalized when written. Arguments: :class:`R2TDataModule`."""

    kind = "grayordinate"
    values = "grayordinates"


class VolumeR2TDataModule(R2TDataModule):
    """R2T pairs of 4-D volume clips (``data=r2t_volume``) from a volume store or SwiFT/R2T frame folders
    (``layout=frames``: ``path`` rest, ``task_path`` task): frames ``[1, X, Y, Z]``, clips of ``window.length``
    frames every ``window.frame_stride`` TRs, batch view ``volume`` ``(B, 1, X, Y, Z, L)`` float16; the grid
    checked against ``shape``; ``normalization.load`` one of ``LOAD_NORMALIZATIONS``. Arguments:
    :class:`R2TDataModule`."""

    kind = "volume"
    view = "volume"
    normalization_defaults = {"load": "stored"}

    def _store_kind(self) -> str:
        if self.layout not in ("volumes", "frames"):
            raise ConfigError(f"data.layout={self.layout!r} must be 'volumes' or 'frames'")
        return "volume" if self.layout == "volumes" else "frames"

    def _check_options(self) -> None:
        if self.normalization.get("load", "stored") not in LOAD_NORMALIZATIONS:
            raise ConfigError(f"data.normalization.load={self.normalization['load']!r} is not one of {LOAD_NORMALIZATIONS}")

    @property
    def frames(self) -> bool:
        return self.layout == "frames"

    @property
    def frame_stride(self) -> int:
        return int(self.window.get("frame_stride") or 1)

    def _check_values(self, store, path: Path) -> None:
        if store.frame_shape is None:
            raise DataError(f"{path} mixes grids; preprocess every run with one --target-shape")
        store_orientation(store)  # one voxel orientation per store
        if self.expected_shape is not None and tuple(store.frame_shape) != self.expected_shape:
            raise ConfigError(f"grid mismatch: {path} holds {tuple(store.frame_shape)} volumes but data.shape="
                              f"{list(self.expected_shape)}. Fix: set data.shape={list(store.frame_shape)} (and the "
                              "model's img_size)")

    def _check_same_space(self, rest, task) -> None:
        if rest.frame_shape != task.frame_shape:
            raise ConfigError(f"{self.path} holds {rest.frame_shape} volumes but task_path {self.task_path} holds "
                              f"{task.frame_shape}")
        common_orientation((store_orientation(rest), store_orientation(task)),
                           f"{self.path} (rest) and task_path {self.task_path}")

    def _role_dataset(self, role: str, segments: list[tuple[int, int, int]], stride: int | None = None):
        return VolumeClipDataset(self.stores[role], segments, int(self.window["length"]), self.frame_stride,
                                 clip_stride=stride or 1, normalization=self.normalization.get("load", "stored"),
                                 return_mask=False, subject_index=self.subject_index)

    def _kind_meta(self, rest) -> dict[str, Any]:
        return {"shape": [int(s) for s in rest.frame_shape], "frame_stride": self.frame_stride,
                "orientation": store_orientation(rest),
                "in_chans": 2 if self.normalization.get("load") == "stored+voxel" else 1}


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


#: the datamodule of each ``data.kind`` (``conf/data/r2t_<kind>.yaml``'s ``_target_``)
KIND_CLASS_NAMES = {"roi": f"{__name__}.ROIR2TDataModule", "grayordinate": f"{__name__}.GrayordinateR2TDataModule",
                    "volume": f"{__name__}.VolumeR2TDataModule"}
