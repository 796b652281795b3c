"""LightningDataModule for ROI time series (store -> z-scoring -> windows -> batches)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from brainfm.data.datasets.roi import ROIWindowDataset
from brainfm.data.normalization import ROINormalizer
from brainfm.data.phenotypes import build_label_table
from brainfm.data.splits import (
    load_or_create_subject_split,
    segments_for_subjects,
    time_split,
)
from brainfm.data.stores.roi import ROIStore
from brainfm.data.windows import (
    ResumableTrainPosition,
    WindowBatchSampler,
    collate_windows,
)
from brainfm.errors import ConfigError


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


class ROIDataModule(ResumableTrainPosition, L.LightningDataModule):
    """Windows of z-scored ROI time series from an HDF5 ROI store.

    Args:
        name: data set name (split files go to ``<split_dir>``).
        path: the ``.h5`` store (layout in :mod:`brainfm.data.stores.roi`).
        atlas: atlas under ``/timeseries`` (optional if the file holds one).
        tr: expected repetition time in seconds (checked against the file; ``None``: the file's).
        n_rois: expected ROI count (checked; ``None``: the file's).
        normalization: ``{"mode": "run"|"global"|"none", "eps": float}``.
        window: ``{"length": TRs, "min_length": TRs or None (random crop lengths in training),
            "train_stride": TRs between training window starts (default 1: every start once per
            epoch), "eval_stride": TRs or None (default: length)}``.
        split: ``{"kind": "time", "train_fraction": 0.5}`` (first part of each run trains, the rest
            validates) or ``{"kind": "subject", "fractions": [0.8, 0.1, 0.1], "seed": 0,
            "file": None}`` (seeded subject split written to ``split_dir``).
        split_dir: folder of this data set's split files (``data_splits/<dataset>``).
        batch_size, eval_batch_size: windows per batch in training / evaluation.
        num_workers: DataLoader worker processes.
        seed: seed of the random crops.
        preload: read the whole store into memory (``"auto"``: when under 512 MB).
        pairs: training batches carry a second, non-overlapping window of the same run
            (``bold2``, ``t2``) for contrastive objectives.
        labels: phenotype labels joined to batches by subject (:mod:`brainfm.data.phenotypes`).

    Raises:
        DataError / ConfigError: from :meth:`setup`, for a missing file, a TR or ROI-count
        mismatch, NaN inside a run, a constant ROI, or an invalid split.
    """

    def __init__(
        self,
        name: str,
        path: str,
        atlas: str | None = None,
        tr: float | None = None,
        n_rois: int | None = None,
        normalization: dict | None = None,
        window: dict | None = None,
        split: dict | None = None,
        split_dir: str = "data_splits",
        batch_size: int = 16,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        preload: bool | str = "auto",
        pairs: bool = False,
        labels: dict | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.path = Path(path)
        self.atlas = atlas
        self.expected_tr = tr
        self.expected_n_rois = n_rois
        self.normalization = {"mode": "run", "eps": 1e-6, **(normalization or {})}
        self.window = {"length": 60, "min_length": None, "train_stride": 1, "eval_stride": None, **(window or {})}
        self.split = {"kind": "time", "train_fraction": 0.5, "fractions": [0.8, 0.1, 0.1], "seed": 0,
                      "file": None, **(split or {})}
        self.split_dir = Path(split_dir)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.preload = preload
        self.pairs = bool(pairs)
        self.labels_config = labels
        self.labels = None
        self.store: ROIStore | None = None
        self.normalizer: ROINormalizer | None = None
        self.segments: dict[str, list[tuple[int, int, int]]] = {}
        self.subject_split: dict[str, list[str]] | None = None
        self._resume: tuple[int, int] | None = None
        self._train_sampler: WindowBatchSampler | None = None

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.store is not None:
            return
        store = ROIStore(self.path, atlas=self.atlas, preload=self.preload)
        self.tr = check_tr(store.tr, self.expected_tr, str(self.path))
        store.tr = self.tr
        if self.expected_n_rois is not None and int(self.expected_n_rois) != store.n_rois:
            raise ConfigError(
                f"ROI count mismatch: {self.path} (atlas {store.atlas!r}) has {store.n_rois} ROIs but "
                f"data.n_rois={self.expected_n_rois}. Fix: set data.n_rois={store.n_rois} (the model's "
                "input layer follows it), or point data.path at the parcellation you meant."
            )
        kind = self.split["kind"]
        if kind == "time":
            self.segments = time_split(store.lengths, float(self.split["train_fraction"]))
        elif kind == "subject":
            split_file = Path(self.split["file"] or self.split_dir / f"seed{int(self.split['seed'])}.txt")
            self.subject_split = load_or_create_subject_split(
                split_file, store.subject_ids, self.split["fractions"], int(self.split["seed"])
            )
            self.split_file = split_file
            self.segments = {
                name: segments_for_subjects(store.subject_ids, store.lengths, subjects)
                for name, subjects in self.subject_split.items()
            }
        else:
            raise ConfigError(f"data.split.kind={kind!r} must be 'time' or 'subject'")
        self.normalizer = ROINormalizer.fit(
            store, self.normalization["mode"], float(self.normalization["eps"]), self.segments["train"]
        )
        self.labels = build_label_table(self.labels_config, sorted(set(store.subject_ids)))
        self.store = store

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        return self.labels.add_to(batch) if self.labels is not None else batch

    def dataset(self, split: str, length: int | None = None, stride: int | None = None) -> ROIWindowDataset:
        """Grid windows of one split (``train``, ``val`` or ``test``)."""
        self.setup()
        length = int(length or self.window["length"])
        return ROIWindowDataset(
            self.store, self.normalizer, self.segments[split], length,
            stride or self.window.get("eval_stride") or length,
        )

    @property
    def meta(self) -> dict[str, Any]:
        """What a checkpoint must remember about the data (plain containers)."""
        self.setup()
        return {
            "dataset": self.name,
            "path": str(self.path),
            "atlas": self.store.atlas,
            "tr": self.tr,
            "n_rois": self.store.n_rois,
            "roi_names": list(self.store.roi_names) if self.store.roi_names else None,
            "normalization": {"mode": self.normalization["mode"], "eps": float(self.normalization["eps"])},
            "window_length": int(self.window["length"]),
            "split": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in self.split.items()},
            "subjects": sorted(set(self.store.subject_ids)),
        }

    # -- loaders --------------------------------------------------------------------------------
    def _loader(self, dataset, **kwargs) -> DataLoader:
        return DataLoader(
            dataset,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_windows,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        ds = self.dataset("train", stride=int(self.window.get("train_stride") or 1))
        sampler = WindowBatchSampler(
            len(ds), self.batch_size, length=int(self.window["length"]),
            min_length=self.window.get("min_length"), seed=self.seed, pairs=self.pairs,
        )
        if self._resume is not None:
            sampler.fast_forward(*self._resume)
            self._resume = None
        self._train_sampler = sampler
        return self._loader(ds, batch_sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        ds = self.dataset("val")
        if self.pairs:  # fixed pairs (seeded, not shuffled) so validation losses compare across steps
            sampler = WindowBatchSampler(len(ds), self.eval_batch_size, ds.length, seed=self.seed,
                                         shuffle=False, drop_last=False, pairs=True)
            return self._loader(ds, batch_sampler=sampler)
        return self._loader(ds, batch_size=self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        split = "test" if self.segments.get("test") else "val"
        return self._loader(self.dataset(split), batch_size=self.eval_batch_size, shuffle=False)

