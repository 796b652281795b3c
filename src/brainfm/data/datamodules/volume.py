"""LightningDataModule of 4-D fMRI clips from a volume store or SwiFT frame folders."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from brainfm.data.datamodules.base import StoreDataModule
from brainfm.data.datasets.volume import (
    LOAD_NORMALIZATIONS,
    PooledBatchSampler,
    VolumeClipDataset,
    VolumeClipLoader,
    build_augmentation,
)
from brainfm.data.normalization import STATISTICS, VolumeStatistics
from brainfm.data.orientation import store_orientation
from brainfm.data.stores import open_store
from brainfm.data.windows import WindowBatchSampler
from brainfm.errors import ConfigError, DataError

LAYOUTS = ("volumes", "frames")


class VolumeDataModule(StoreDataModule):
    """Clips of fMRI volumes from a volume store (``brainfm-preprocess`` output).

    Args:
        name, path, tr, split, split_dir, batch_size, eval_batch_size, num_workers, seed, labels, cache:
            as :class:`~brainfm.data.datamodules.base.StoreDataModule`. ``path``: the store root (or a
            SwiFT ``img/`` frame folder with ``layout="frames"``); ``tr``: seconds (every run is
            checked), ``"mixed"`` to accept runs with different TRs (each clip's ``t`` is in its own
            run's seconds), or None: the store's single TR (required for frames, which carry none).
        layout: ``volumes`` (the store) or ``frames`` (``img/<subject>/frame_<t>.pt``, read as is).
        shape: expected grid ``[X, Y, Z]`` (checked; the model's ``img_size`` follows it).
        normalization: ``{"stored": "global"|"none"|None (checked against every run's index row),
            "fill": "min"|"zero"|None (checked), "load": one of LOAD_NORMALIZATIONS, "statistics": "store" |
            "checkpoint"}``. ``statistics`` (:mod:`brainfm.data.normalization`): ``store`` (default) normalizes
            every run with its own statistics, as training does; ``checkpoint`` with a trained model's training
            statistics, given by :meth:`use_statistics` (brainfm-evaluate/extract/predict/interpret set them from
            the checkpoint; training refuses it).
        window: ``{"length": TRs per clip, "frame_stride": TRs between a clip's frames, "min_length":
            shortest random crop in training (None: always length), "train_stride": TRs between
            training clip starts (None: length * frame_stride, SwiFT's default; 1: every start once per
            epoch), "eval_stride": TRs between evaluation clips (None: length * frame_stride)}``.
        prefetch_factor, pin_memory: DataLoader settings. pool_mb: reusable batch buffers per loader
            (0: none).
        pairs: batches carry a second, non-overlapping clip of the same run (``volume2``) for
            contrastive objectives.
        return_mask: batches carry ``brain_mask`` (SimMIM can restrict its loss to the brain).
        augment: :func:`build_augmentation` config for training batches (None: off).

    Attributes (after :meth:`setup`):
        normalizer: the training statistics of this data (:class:`~brainfm.data.normalization.VolumeStatistics`,
            pooled over the training split when set up for training; None otherwise): the task saves them in the
            checkpoint, which normalizes other data with them under ``statistics=checkpoint``.

    Raises:
        DataError / ConfigError: from :meth:`setup`: missing or inconsistent store, TR, grid or
        normalization mismatch, runs of several voxel orientations, clips longer than a split's runs, invalid
        split, ``statistics=checkpoint`` when set up for training.
    """

    window_defaults = {"length": 20, "min_length": None, "frame_stride": 1, "train_stride": None,
                       "eval_stride": None}

    def __init__(self, name: str, path: str, layout: str = "volumes", tr: float | str | None = None,
                 shape: Sequence[int] | None = None, normalization: dict | None = None, window: dict | None = None,
                 split: dict | None = None, split_dir: str = "data_splits", batch_size: int = 4,
                 eval_batch_size: int = 8, num_workers: int = 0, prefetch_factor: int | None = None,
                 pin_memory: bool = False, pool_mb: float = 2048.0, seed: int = 0, pairs: bool = False,
                 return_mask: bool = True, augment: dict | None = None, labels: dict | None = None,
                 cache: dict | None = None) -> None:
        super().__init__(name, path, tr=tr, split=split, split_dir=split_dir, window=window, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed, labels=labels,
                         cache=cache)
        if layout not in LAYOUTS:
            raise ConfigError(f"data.layout={layout!r} must be one of {LAYOUTS}")
        self.layout = layout
        self.expected_shape = None if shape is None else tuple(int(s) for s in shape)
        self.normalization = {"stored": None, "fill": None, "load": "stored", "statistics": "store",
                              **(normalization or {})}
        if self.normalization["statistics"] not in STATISTICS:
            raise ConfigError(f"data.normalization.statistics={self.normalization['statistics']!r} is not one of "
                              f"{STATISTICS} (store: each run's own statistics; checkpoint: a trained model's)")
        self.normalizer: VolumeStatistics | None = None
        self.checkpoint_statistics: VolumeStatistics | None = None
        self._stage: str | None = None
        self.prefetch_factor = prefetch_factor
        self.pin_memory, self.pool_mb = bool(pin_memory), float(pool_mb)
        self.pairs, self.return_mask = bool(pairs), bool(return_mask)
        self.augment = augment

    # -- setup -----------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.store is None:
            self._stage = stage
        super().setup(stage)

    def open_store(self):
        kind = "volume" if self.layout == "volumes" else "frames"
        return open_store(kind, self.path, tr=self.expected_tr, cache=self.cache)

    def check_store(self, store) -> None:
        if store.frame_shape is None:
            raise DataError(f"{self.path} mixes grids {sorted({tuple(r) for r in store.shapes.tolist()})}; "
                            "preprocess every run with one --target-shape")
        if self.expected_shape is not None and tuple(store.frame_shape) != self.expected_shape:
            raise ConfigError(
                f"grid mismatch: {self.path} holds {tuple(store.frame_shape)} volumes but data.shape="
                f"{list(self.expected_shape)}. Fix: set data.shape={list(store.frame_shape)} (and the model's "
                f"img_size), or preprocess again with --target-shape {' '.join(map(str, self.expected_shape))}"
            )
        for key, field_ in (("stored", "normalization"), ("fill", "fill")):
            want = self.normalization.get(key)
            if want is None:
                continue
            for i, got in enumerate(store.column(field_)):
                if got != want:
                    raise ConfigError(
                        f"{store.describe_run(i)} was written with {field_}={got!r} but "
                        f"data.normalization.{key}={want!r}. Fix: set data.normalization.{key}={got!r}, or "
                        f"preprocess again with --{'normalization' if key == 'stored' else 'fill'} {want}"
                    )
        length, min_length = int(self.window["length"]), self.window.get("min_length")
        if length < 2 or (min_length is not None and not 2 <= int(min_length) <= length):
            raise ConfigError(f"data.window.length={length} must be >= 2 and data.window.min_length={min_length} "
                              f"in [2, length] (or null)")
        if self.normalization["load"] not in LOAD_NORMALIZATIONS:
            raise ConfigError(f"data.normalization.load={self.normalization['load']!r} is not one of "
                              f"{LOAD_NORMALIZATIONS}")
        store_orientation(store)  # one orientation per store (DataError naming the runs otherwise)

    def after_setup(self) -> None:
        training = self._stage in ("fit", None)
        if training and self.normalization["statistics"] == "checkpoint":
            raise ConfigError(
                "data.normalization.statistics=checkpoint normalizes data with a trained model's statistics when it is "
                "evaluated (brainfm-evaluate/extract/predict/interpret ... +data.normalization.statistics=checkpoint); "
                "training normalizes every run with its own. Fix: data.normalization.statistics=store")
        if training and self.segments.get("train"):
            self.normalizer = VolumeStatistics.fit(self.store, self.segments["train"], self.normalization["load"])
        if self.normalization["statistics"] == "checkpoint" and self.checkpoint_statistics is None:
            return  # the datasets wait for the checkpoint's statistics (use_statistics)
        for name in ("train", "val"):  # fail here, not in the first validation
            if self.segments.get(name):
                self.dataset(name)

    def use_statistics(self, statistics: VolumeStatistics) -> None:
        """Normalize with ``statistics`` (a trained model's) under ``data.normalization.statistics=checkpoint``
        (:func:`brainfm.runs.use_checkpoint_normalization`); checked against the load mode and grid at once."""
        self.checkpoint_statistics = statistics
        if self.store is not None and self.segments.get("val"):
            self.dataset("val")

    def dataset(self, split: str, clip_stride: int | None = None, augment: bool = False) -> VolumeClipDataset:
        """Grid clips of one split (``train``, ``val`` or ``test``)."""
        self.setup()
        key = "train_stride" if split == "train" else "eval_stride"
        return self.clips(self.segments[split], clip_stride or self.window.get(key), augment=augment)

    def clips(self, segments: Sequence[tuple[int, int, int]], clip_stride: int | None = None, augment: bool = False,
              return_mask: bool | None = None, length: int | None = None) -> VolumeClipDataset:
        """Clips of ``length`` TRs (default ``data.window.length``) of ``segments`` (``(run, start, stop)``) every
        ``clip_stride`` TRs, normalized as this data's
        ``data.normalization`` says (load mode and whose statistics): the one place the datasets of training and
        of every use of a trained model (:func:`brainfm.runs.open_windows`) are built.

        Raises:
            ConfigError: ``statistics=checkpoint`` before :meth:`use_statistics` gave them, or statistics without
                what the load mode needs.
        """
        self.setup()
        statistics = None
        if self.normalization["statistics"] == "checkpoint":
            statistics = self.checkpoint_statistics
            if statistics is None:
                raise ConfigError("data.normalization.statistics=checkpoint but no checkpoint gave its statistics to "
                                  f"data {self.name!r} (they are given when a trained model is evaluated). Fix: "
                                  "data.normalization.statistics=store")
        return VolumeClipDataset(
            self.store, segments, int(length or self.window["length"]), int(self.window["frame_stride"]),
            clip_stride=clip_stride, normalization=self.normalization["load"],
            transform=build_augmentation(self.augment) if augment else None,
            return_mask=self.return_mask if return_mask is None else return_mask, statistics=statistics,
        )

    @property
    def meta(self) -> dict[str, Any]:
        """What a checkpoint must remember about the data (plain containers)."""
        self.setup()
        crops = self.store.crop_pads()
        unique_crops = {str(c) for c in crops}
        return {
            **self.base_meta(),
            "layout": self.layout,
            "trs": sorted({round(float(t), 6) for t in self.store.trs}),
            "shape": [int(s) for s in self.store.frame_shape],
            "in_chans": 2 if self.normalization["load"] == "stored+voxel" else 1,
            "frame_stride": int(self.window["frame_stride"]),
            "orientation": store_orientation(self.store),
            "normalization": {
                "stored": sorted({str(v) for v in self.store.column("normalization")}),
                "fill": sorted({str(v) for v in self._fills()}),
                "load": self.normalization["load"],
                "training_statistics": None if self.normalizer is None else self.normalizer.summary(),
            },
            "crop_pad": crops[0] if len(unique_crops) == 1 else "per run (see meta.json)",
        }

    def _fills(self) -> list:
        return self.store.column("fill")

    # -- loaders ----------------------------------------------------------------------------------
    def _loader(self, ds: VolumeClipDataset, sampler: WindowBatchSampler, max_batch: int) -> VolumeClipLoader:
        return VolumeClipLoader(
            ds, PooledBatchSampler(sampler, None, self.seed), max_batch=max_batch, seed=self.seed,
            pool_mb=self.pool_mb, pin_memory=self.pin_memory, num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> VolumeClipLoader:
        ds = self.dataset("train", augment=True)
        sampler = self.train_sampler(len(ds), ds.length, self.window.get("min_length") or ds.length, self.pairs)
        return self._loader(ds, sampler, self.batch_size)

    def _eval_loader(self, split: str) -> VolumeClipLoader:
        ds = self.dataset(split)
        return self._loader(ds, self.eval_sampler(len(ds), ds.length, pairs=self.pairs), self.eval_batch_size)

    def val_dataloader(self) -> VolumeClipLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> VolumeClipLoader:
        return self._eval_loader("test" if self.segments.get("test") else "val")
