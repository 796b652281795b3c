"""LightningDataModule of 4-D fMRI clips from a volume store or SwiFT frame folders."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np

from brainfm.data.datasets.volume import (
    LOAD_NORMALISATIONS,
    PooledBatchSampler,
    VolumeClipDataset,
    VolumeClipLoader,
    build_augmentation,
)
from brainfm.data.phenotypes import build_label_table
from brainfm.data.splits import (
    load_or_create_subject_split,
    segments_for_subjects,
    time_split,
)
from brainfm.data.stores.volume import VolumeStore
from brainfm.data.windows import ResumableTrainPosition, WindowBatchSampler
from brainfm.errors import ConfigError, DataError


# -- datamodule -----------------------------------------------------------------------------------
class VolumeDataModule(ResumableTrainPosition, L.LightningDataModule):
    """Clips of fMRI volumes from a volume store (``brainfm-preprocess`` output).

    Args:
        name: data set name (split files go to ``<split_dir>``).
        path: store root (or a SwiFT ``img/`` frame folder with ``layout="frames"``).
        layout: ``volumes`` (the store) or ``frames`` (``img/<subject>/frame_<t>.pt``, read as is).
        tr: expected TR in seconds (every run is checked), ``"mixed"`` to accept runs with
            different TRs (each clip's ``t`` is in its own run's seconds), or None: the store's
            single TR. Required for ``layout="frames"`` (frames carry no TR).
        shape: expected grid ``[X, Y, Z]`` (checked; the model's ``img_size`` follows it).
        normalisation: ``{"stored": "global"|"none"|None (checked against every run),
            "fill": "min"|"zero"|None (checked), "load": one of LOAD_NORMALISATIONS}``.
        clip: ``{"length": TRs, "stride": TRs between frames, "min_length": shortest random crop
            in training (None: always length), "train_clip_stride": TRs between training clip
            starts (None: length * stride, SwiFT's default; 1: every start once per epoch),
            "eval_clip_stride": TRs between evaluation clips (None: length * stride)}``.
        split: as :class:`~brainfm.data.datamodules.roi.ROIDataModule` (``time`` or ``subject``).
        split_dir: folder of this data set's split files (``data_splits/<dataset>``).
        batch_size, eval_batch_size: clips per batch. num_workers, prefetch_factor, pin_memory:
            DataLoader settings. pool_mb: reusable batch buffers per loader (0: none).
        seed: sampler and augmentation seed. pairs: batches carry a second, non-overlapping clip
            of the same run (``volume2``) for contrastive objectives.
        return_mask: batches carry ``brain_mask`` (SimMIM can restrict its loss to the brain).
        augment: :func:`build_augmentation` config for training batches (None: off).
        labels: phenotype labels joined to batches by subject (:mod:`brainfm.data.phenotypes`).

    Raises:
        DataError / ConfigError: from :meth:`setup`: missing or inconsistent store, TR, grid or
        normalisation mismatch, clips longer than a split's runs, invalid split.
    """

    def __init__(
        self,
        name: str,
        path: str,
        layout: str = "volumes",
        tr: float | str | None = None,
        shape: Sequence[int] | None = None,
        normalisation: dict | None = None,
        clip: dict | None = None,
        split: dict | None = None,
        split_dir: str = "data_splits",
        batch_size: int = 4,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        prefetch_factor: int | None = None,
        pin_memory: bool = False,
        pool_mb: float = 2048.0,
        seed: int = 0,
        pairs: bool = False,
        return_mask: bool = True,
        augment: dict | None = None,
        labels: dict | None = None,
    ) -> None:
        super().__init__()
        self.name, self.path, self.layout = name, Path(path), layout
        self.expected_tr = tr
        self.expected_shape = None if shape is None else tuple(int(s) for s in shape)
        self.normalisation = {"stored": None, "fill": None, "load": "stored", **(normalisation or {})}
        self.clip = {"length": 20, "stride": 1, "min_length": None, "train_clip_stride": None,
                     "eval_clip_stride": None, **(clip or {})}
        self.split = {"kind": "time", "train_fraction": 0.5, "fractions": [0.8, 0.1, 0.1], "seed": 0,
                      "file": None, **(split or {})}
        self.split_dir = Path(split_dir)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.num_workers = int(num_workers)
        self.prefetch_factor = prefetch_factor
        self.pin_memory, self.pool_mb = bool(pin_memory), float(pool_mb)
        self.seed, self.pairs, self.return_mask = int(seed), bool(pairs), bool(return_mask)
        self.augment = augment
        self.labels_config = labels
        self.labels = None
        self.store = None
        self.segments: dict[str, list[tuple[int, int, int]]] = {}
        self.subject_split: dict[str, list[str]] | None = None
        self.tr: float | str | None = None
        self._resume: tuple[int, int] | None = None
        self._train_sampler: WindowBatchSampler | None = None

    # -- setup -----------------------------------------------------------------------------------
    def _open_store(self):
        if self.layout == "volumes":
            return VolumeStore(self.path)
        if self.layout == "frames":
            from brainfm.data.stores.frames import FrameStore

            if not isinstance(self.expected_tr, (int, float)):
                raise ConfigError(f"frame folders ({self.path}) carry no TR: set data.tr=<seconds>")
            return FrameStore(self.path, tr=float(self.expected_tr))
        raise ConfigError(f"data.layout={self.layout!r} must be 'volumes' or 'frames'")

    def _check_tr(self, store) -> float | str:
        trs = np.asarray(store.trs, dtype=float)
        if self.expected_tr == "mixed":
            return "mixed" if not np.allclose(trs, trs[0], atol=1e-6) else float(trs[0])
        if self.expected_tr is None:
            if not np.allclose(trs, trs[0], atol=1e-6):
                counts = {f"{t:g} s": int(np.isclose(trs, t).sum()) for t in sorted(set(np.round(trs, 6)))}
                raise ConfigError(
                    f"runs of {self.path} have different TRs (runs per TR: {counts}). Fix: data.tr=mixed to train "
                    "on them together (clip times stay in seconds), or data.tr=<s> after selecting runs"
                )
            return float(trs[0])
        expected = float(self.expected_tr)
        bad = np.flatnonzero(~np.isclose(trs, expected, atol=1e-3))
        if len(bad):
            i = int(bad[0])
            raise ConfigError(
                f"TR mismatch: {store.describe_run(i)} has TR={trs[i]:g} s but data.tr={expected:g} s "
                f"({len(bad)} of {len(trs)} runs differ). Fix: set data.tr={trs[i]:g} if the data are right "
                "(data.tr=mixed for mixed TRs), or preprocess again with the right --tr; models see time in "
                "seconds, so a wrong TR silently changes what they learn."
            )
        return expected

    def setup(self, stage: str | None = None) -> None:
        if self.store is not None:
            return
        store = self._open_store()
        self.tr = self._check_tr(store)
        if store.shape is None:
            raise DataError(f"{self.path} mixes grids {sorted({tuple(r.shape) for r in store.runs})}; "
                            "preprocess every run with one --target-shape")
        if self.expected_shape is not None and tuple(store.shape) != self.expected_shape:
            raise ConfigError(
                f"grid mismatch: {self.path} holds {tuple(store.shape)} volumes but data.shape="
                f"{list(self.expected_shape)}. Fix: set data.shape={list(store.shape)} (and the model's img_size), "
                f"or preprocess again with --target-shape {' '.join(map(str, self.expected_shape))}"
            )
        for key, field_ in (("stored", "normalisation"), ("fill", "fill")):
            want = self.normalisation.get(key)
            if want is None:
                continue
            for i in range(len(store)):
                got = store.meta(i).get(field_)
                if got != want:
                    raise ConfigError(
                        f"{store.describe_run(i)} was written with {field_}={got!r} but "
                        f"data.normalisation.{key}={want!r}. Fix: set data.normalisation.{key}={got!r}, or "
                        f"preprocess again with --{'normalisation' if key == 'stored' else 'fill'} {want}"
                    )
        length, min_length = int(self.clip["length"]), self.clip.get("min_length")
        if length < 2 or (min_length is not None and not 2 <= int(min_length) <= length):
            raise ConfigError(f"data.clip.length={length} must be >= 2 and data.clip.min_length={min_length} "
                              f"in [2, length] (or null)")
        if self.normalisation["load"] not in LOAD_NORMALISATIONS:
            raise ConfigError(f"data.normalisation.load={self.normalisation['load']!r} is not one of {LOAD_NORMALISATIONS}")
        kind = self.split["kind"]
        if kind == "time":
            self.segments = time_split(store.lengths, float(self.split["train_fraction"]))
        elif kind == "subject":
            self.subject_split, self.split_file = self._subject_split(store)
            self.segments = {name: segments_for_subjects(store.subject_ids, store.lengths, subjects)
                             for name, subjects in self.subject_split.items()}
        else:
            raise ConfigError(f"data.split.kind={kind!r} must be 'time' or 'subject'")
        self.store = store
        self.labels = self._label_table(store)
        for name in ("train", "val"):  # fail here, not in the first validation
            if self.segments.get(name):
                self.dataset(name)

    def _subject_split(self, store) -> tuple[dict[str, list[str]], Path]:
        """``(split, split file)`` of ``store``'s subjects: the split file when it exists, else a seeded
        draw written to it (:func:`~brainfm.data.splits.load_or_create_subject_split`). Data set recipes
        (:class:`brainfm.data.datamodules.recipes.RecipeDataModule`) override it with label-stratified draws."""
        split_file = Path(self.split["file"] or self.split_dir / f"seed{int(self.split['seed'])}.txt")
        split = load_or_create_subject_split(split_file, store.subject_ids, self.split["fractions"],
                                             int(self.split["seed"]))
        return split, split_file

    def _label_table(self, store):
        """Phenotype labels of ``store``'s subjects (in subject-index order), or None."""
        return build_label_table(self.labels_config, sorted(set(store.subject_ids)))

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        return self.labels.add_to(batch) if self.labels is not None else batch

    def dataset(self, split: str, clip_stride: int | None = None, augment: bool = False) -> VolumeClipDataset:
        """Grid clips of one split (``train``, ``val`` or ``test``)."""
        self.setup()
        key = "train_clip_stride" if split == "train" else "eval_clip_stride"
        return VolumeClipDataset(
            self.store, self.segments[split], int(self.clip["length"]), int(self.clip["stride"]),
            clip_stride=clip_stride or self.clip.get(key), normalisation=self.normalisation["load"],
            transform=build_augmentation(self.augment) if augment else None, return_mask=self.return_mask,
        )

    @property
    def meta(self) -> dict[str, Any]:
        """What a checkpoint must remember about the data (plain containers)."""
        self.setup()
        metas = [self.store.meta(i) for i in range(len(self.store))]
        crops = {str(m.get("crop_pad")) for m in metas}
        return {
            "dataset": self.name,
            "path": str(self.path),
            "layout": self.layout,
            "tr": self.tr,
            "trs": sorted({round(float(t), 6) for t in self.store.trs}),
            "shape": [int(s) for s in self.store.shape],
            "in_chans": 2 if self.normalisation["load"] == "stored+voxel" else 1,
            "clip_length": int(self.clip["length"]),
            "clip_stride": int(self.clip["stride"]),
            "normalisation": {
                "stored": sorted({str(m.get("normalisation")) for m in metas}),
                "fill": sorted({str(m.get("fill")) for m in metas}),
                "load": self.normalisation["load"],
            },
            "crop_pad": metas[0].get("crop_pad") if len(crops) == 1 else "per run (see meta.json)",
            "split": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in self.split.items()},
            "subjects": sorted(set(self.store.subject_ids)),
        }

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
        sampler = WindowBatchSampler(len(ds), self.batch_size, length=ds.length,
                                     min_length=self.clip.get("min_length") or ds.length, seed=self.seed,
                                     pairs=self.pairs)
        if self._resume is not None:
            sampler.fast_forward(*self._resume)
            self._resume = None
        self._train_sampler = sampler
        return self._loader(ds, sampler, self.batch_size)

    def _eval_loader(self, split: str) -> VolumeClipLoader:
        ds = self.dataset(split)
        sampler = WindowBatchSampler(len(ds), self.eval_batch_size, ds.length, seed=self.seed,
                                     shuffle=False, drop_last=False, pairs=self.pairs)
        return self._loader(ds, sampler, self.eval_batch_size)

    def val_dataloader(self) -> VolumeClipLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> VolumeClipLoader:
        return self._eval_loader("test" if self.segments.get("test") else "val")

