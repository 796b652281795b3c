"""LightningDataModule for ROI time series (store -> z-scoring -> windows -> batches)."""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from brainfm.data.datamodules.base import StoreDataModule
from brainfm.data.datasets.roi import ROIWindowDataset
from brainfm.data.normalization import ROINormalizer
from brainfm.data.stores import open_store
from brainfm.data.trial_labels import labelled_blocks, shift_trs, trial_labels_config
from brainfm.data.windows import collate_windows
from brainfm.errors import ConfigError


class ROIDataModule(StoreDataModule):
    """Windows of z-scored ROI time series from an HDF5 ROI store.

    Args:
        name, path, tr, split, split_dir, batch_size, eval_batch_size, num_workers, seed, labels, cache,
        resample_tr:
            as :class:`~brainfm.data.datamodules.base.StoreDataModule` (``path``: the ``.h5`` store,
            layout in :mod:`brainfm.data.stores.roi`).
        atlas: atlas under ``/timeseries`` (optional if the file holds one).
        n_rois: expected ROI count (checked; ``None``: the file's).
        normalization: ``{"mode": "run"|"global"|"none", "eps": float}`` (:mod:`brainfm.data.normalization`).
        window: ``{"length": TRs, "min_length": TRs or None (random crop lengths in training),
            "train_stride": TRs between training window starts (default 1: every start once per
            epoch), "eval_stride": TRs or None (default: length)}``.
        preload: read the whole store into memory (``"auto"``: when under 512 MB).
        pairs: training batches carry a second, non-overlapping window of the same run
            (``bold2``, ``t2``) for contrastive objectives.
        trial_labels: ``{"name": "task", "shift_s": seconds or None}``: per-TR labels
            ``/trial_labels/<name>`` for decoding (:mod:`brainfm.data.trial_labels`): windows are cut
            inside blocks of one label only, and batches carry ``trial_label`` ``(B,)`` int64;
            ``shift_s`` is the haemodynamic shift (HCP 2.88 s, MDTB 3 s; null: as stored).

    Raises:
        DataError / ConfigError: from :meth:`setup`, for a missing file, a TR or ROI-count mismatch,
        or an invalid split; NaN inside a run or a constant ROI when a window of that run is read
        (or, for ``global`` statistics, at setup).
    """

    window_defaults = {"length": 60, "min_length": None, "frame_stride": 1, "train_stride": 1, "eval_stride": None}

    def __init__(self, name: str, path: str, atlas: str | None = None, tr: float | None = None,
                 n_rois: int | None = None, normalization: dict | None = None, window: dict | None = None,
                 split: dict | None = None, split_dir: str = "data_splits", batch_size: int = 16,
                 eval_batch_size: int = 64, num_workers: int = 0, seed: int = 0, preload: bool | str = "auto",
                 pairs: bool = False, labels: dict | None = None, cache: dict | None = None,
                 resample_tr: float | None = None, trial_labels: dict | None = None) -> None:
        super().__init__(name, path, tr=tr, split=split, split_dir=split_dir, window=window, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed, labels=labels,
                         cache=cache, resample_tr=resample_tr)
        self.atlas = atlas
        self.expected_n_rois = n_rois
        self.normalization = {"mode": "run", "eps": 1e-6, **(normalization or {})}
        self.preload = preload
        self.pairs = bool(pairs)
        self.normalizer: ROINormalizer | None = None

        self.trial_labels = trial_labels_config(trial_labels)
        self.segment_labels: dict[str, list[int]] = {}

    # -- setup ----------------------------------------------------------------------------------
    def open_store(self):
        return open_store("roi", self.path, atlas=self.atlas, preload=self.preload, cache=self.cache)

    def check_store(self, store) -> None:
        store.tr = float(self.tr)
        if self.expected_n_rois is not None and int(self.expected_n_rois) != store.n_rois:
            raise ConfigError(
                f"ROI count mismatch: {self.path} (atlas {store.atlas!r}) has {store.n_rois} ROIs but "
                f"data.n_rois={self.expected_n_rois}. Fix: set data.n_rois={store.n_rois} (the model's "
                "input layer follows it), or point data.path at the parcellation you meant."
            )

    def after_setup(self) -> None:
        self.normalizer = ROINormalizer.fit(
            self.store, self.normalization["mode"], float(self.normalization["eps"]), self.segments["train"]
        )
        if self.trial_labels is not None:
            self._label_blocks()

    def _label_blocks(self) -> None:
        """Decoding: the split segments become their labelled blocks (:func:`~brainfm.data.trial_labels.labelled_blocks`)."""
        if self.resample_tr is not None or not hasattr(self.store, "trial_label_info"):
            raise ConfigError(f"data.trial_labels needs the ROI store's own TR grid ({self.path}); unset data.resample_tr")
        cfg = self.trial_labels
        info = self.store.trial_label_info(cfg["name"])
        shift = shift_trs(cfg["shift_s"], info["shift_s"], float(self.tr))
        self.trial_labels = {**cfg, "classes": info["classes"], "shift_trs": shift,
                             "shift_s_applied": info["shift_s"] + shift * float(self.tr)}
        for split, segments in list(self.segments.items()):
            self.segments[split], self.segment_labels[split] = labelled_blocks(
                self.store, cfg["name"], segments, int(self.window.get("min_length") or self.window["length"]), shift)

    def dataset(self, split: str, length: int | None = None, stride: int | None = None) -> ROIWindowDataset:
        """Grid windows of one split (``train``, ``val`` or ``test``)."""
        self.setup()
        length = int(length or self.window["length"])
        return ROIWindowDataset(
            self.store, self.normalizer, self.segments[split], length,
            stride or self.window.get("eval_stride") or length,
            segment_labels=self.segment_labels.get(split) if self.trial_labels is not None else None,
        )

    @property
    def meta(self) -> dict[str, Any]:
        """What a checkpoint must remember about the data (plain containers)."""
        self.setup()
        return {
            **self.base_meta(),
            "atlas": self.store.atlas,
            "n_rois": self.store.n_rois,
            "roi_names": list(self.store.roi_names) if self.store.roi_names else None,
            "normalization": {"mode": self.normalization["mode"], "eps": float(self.normalization["eps"])},
            **({"trial_labels": dict(self.trial_labels)} if self.trial_labels is not None else {}),
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
        sampler = self.train_sampler(len(ds), int(self.window["length"]), self.window.get("min_length"), self.pairs)
        return self._loader(ds, batch_sampler=sampler)

    def _eval_loader(self, split: str) -> DataLoader:
        """Fixed batches of one split, partitioned over the ranks (pairs seeded, so validation losses
        compare across steps)."""
        ds = self.dataset(split)
        return self._loader(ds, batch_sampler=self.eval_sampler(len(ds), ds.length, pairs=self.pairs))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test" if self.segments.get("test") else "val")
