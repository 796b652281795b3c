"""Training on several data sets at once (``data=multi``): SwiFT v2's multi-data-set pretraining mix.

SwiFT v2 pretrains on UKB + HCP + ABCD resting-state fMRI (49,321 subjects); its lab code builds one
dataset per data set and concatenates them (a ``ConcatDataset``), so a clip is drawn uniformly over
all clips and each data set's share is its share of the clips (UKB dominates). :class:`MultiDataModule`
makes the share a setting: ``weights`` per data set (``None``: proportional to the training clips, the
concatenation's behaviour).

Each training batch comes from one data set (its own loader, grid, TR and clip times), chosen at every
step from ``(seed, epoch, step)``: the same choice on every DDP rank, and a resumed run repeats the
uninterrupted one (the children's positions are replayed from the choices). A data set whose loader
is exhausted starts its next pass (re-shuffled) within the epoch; an epoch is as many steps as the
children's training batches together. Subject indices are offset per data set, so ``batch["subject"]``
is unique across data sets, and ``batch["dataset"]`` says where a batch comes from.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import numpy as np
import torch

from brainfm.data.orientation import common_orientation
from brainfm.data.windows import ResumableTrainPosition
from brainfm.errors import ConfigError

_EPOCH_STRIDE = 1_000_000  # child sampler epoch = global epoch * stride + pass within it


class _EpochSetter:
    """What Lightning looks for on a loader to announce a new epoch (``loader.sampler.set_epoch``)."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


class MixedTrainLoader:
    """Training batches of several datamodules, one data set per batch, chosen by weight.

    Args:
        dm: the :class:`MultiDataModule` (set up).

    ``len`` is the sum of the children's training batches per epoch. Raises nothing itself; the
    children's loaders raise as usual.
    """

    def __init__(self, dm: "MultiDataModule") -> None:
        self.dm = dm
        self.names = list(dm.children)
        self.loaders = [dm.children[n].train_dataloader() for n in self.names]
        self.samplers = [dm.children[n]._train_sampler for n in self.names]
        self.lengths = [len(loader) for loader in self.loaders]
        self.probs = np.array([dm.weights[n] for n in self.names], dtype=np.float64)
        self.sampler = _EpochSetter()

    def __len__(self) -> int:
        return int(sum(length for length, p in zip(self.lengths, self.probs) if p > 0))

    def _choice(self, epoch: int, step: int) -> int:
        return int(np.random.default_rng([self.dm.seed, epoch, step]).choice(len(self.probs), p=self.probs))

    def choices(self, epoch: int, steps: int) -> np.ndarray:
        """Data set index of each of the first ``steps`` batches of ``epoch``."""
        return np.array([self._choice(epoch, b) for b in range(steps)], dtype=np.int64)

    def __iter__(self) -> Iterator[dict]:
        epoch = self.sampler.epoch
        start = 0
        if self.dm._resume is not None and self.dm._resume[0] == epoch:
            start = self.dm._resume[1]
        self.dm._resume = None
        counts = np.bincount(self.choices(epoch, start), minlength=len(self.names)).astype(np.int64)
        iters: list[Iterator | None] = [None] * len(self.names)

        def open_pass(k: int) -> Iterator:
            done = int(counts[k])
            n = max(self.lengths[k], 1)
            self.samplers[k].set_epoch(epoch * _EPOCH_STRIDE + done // n)
            if done % n:
                self.samplers[k].fast_forward(epoch * _EPOCH_STRIDE + done // n, done % n)
            return iter(self.loaders[k])

        for b in range(start, len(self)):
            k = self._choice(epoch, b)
            if iters[k] is None or counts[k] % max(self.lengths[k], 1) == 0:
                iters[k] = open_pass(k)
            batch = next(iters[k])
            counts[k] += 1
            yield self.dm.tag(batch, k)


class _ChainLoader:
    """Evaluation batches of several loaders, one after the other (tagged by :meth:`MultiDataModule.tag`)."""

    def __init__(self, dm: "MultiDataModule", loaders: list) -> None:
        self.dm, self.loaders = dm, loaders

    def __len__(self) -> int:
        return int(sum(len(loader) for _, loader in self.loaders))

    def __iter__(self) -> Iterator[dict]:
        for k, loader in self.loaders:
            for batch in loader:
                yield self.dm.tag(batch, k)


class MultiDataModule(ResumableTrainPosition, L.LightningDataModule):
    """Several data set recipes trained together (SwiFT v2 pretraining; see the module docstring).

    Args:
        datasets: name -> datamodule (instantiated recipes, e.g. :class:`brainfm.data.datamodules.recipes.RecipeDataModule`;
            any :class:`~brainfm.data.datamodules.volume.VolumeDataModule`). Every one keeps its own split files.
        weights: name -> sampling weight (normalized to probabilities; a data set not named, or 0, is left out of
            training but not out of validation), or None: proportional to each data set's training
            clips (SwiFT v2's concatenation).
        seed: seed of the per-step data set choice.
        name: name of the mix (checkpoint meta).
        batch_size, num_workers: the children's shared settings (``conf/data/multi.yaml`` interpolates
            them into every child; each child's own value is what its loader uses).

    Raises:
        ConfigError: no data set, weights naming unknown data sets or negative/all-zero weights, or data
            sets with different grids, clip lengths or channel counts (one model sees them all). DataError: data
            sets of different voxel orientations.
    """

    def _train_loader_built(self) -> bool:
        return self._train_loader is not None

    def __init__(self, datasets: Mapping[str, Any], weights: Mapping[str, float] | None = None, seed: int = 0,
                 name: str = "multi", batch_size: int | None = None, num_workers: int | None = None) -> None:
        super().__init__()
        if not datasets:
            raise ConfigError("data.datasets is empty: give at least one data set recipe")
        self.children = dict(datasets)
        self.weights_config = None if weights is None else {str(k): float(v) for k, v in dict(weights).items()}
        if self.weights_config is not None:
            unknown = sorted(set(self.weights_config) - set(self.children))
            if unknown:
                raise ConfigError(f"data.weights names {unknown}, which are not in data.datasets "
                                  f"{sorted(self.children)}")
            if min(self.weights_config.values(), default=0.0) < 0 or sum(self.weights_config.values()) <= 0:
                raise ConfigError(f"data.weights={self.weights_config} must be non-negative with a positive sum")
        self.seed, self.name = int(seed), name
        self.batch_size, self.num_workers = batch_size, num_workers
        self.weights: dict[str, float] = {}
        self.offsets: list[int] = []
        self._ready = False
        self._resume: tuple[int, int] | None = None
        self._train_loader: MixedTrainLoader | None = None

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        metas = {}
        for name, dm in self.children.items():
            dm.setup(stage)
            metas[name] = dm.meta
        first = next(iter(metas))
        for key in ("shape", "window_length", "in_chans"):
            values = {n: m.get(key) for n, m in metas.items()}
            if len({str(v) for v in values.values()}) > 1:
                what = {"shape": "shape", "window_length": "window.length", "in_chans": "normalization.load"}[key]
                raise ConfigError(f"data sets of data=multi differ in {key}: {values}; one model sees every batch, "
                                  f"so set the same data.datasets.<name>.{what} for all (as {first}'s)")
        common_orientation((m.get("orientation") for m in metas.values()), "the data sets of data=multi")
        if self.weights_config is None:
            clips = {n: len(dm.dataset("train")) for n, dm in self.children.items()}
            raw = {n: float(c) for n, c in clips.items()}
        else:
            raw = {n: float(self.weights_config.get(n, 0.0)) for n in self.children}
        total = sum(raw.values())
        self.weights = {n: v / total for n, v in raw.items()}
        counts = [int(metas[n]["n_subjects"]) for n in self.children]
        self.offsets = [int(v) for v in np.cumsum([0, *counts[:-1]])]
        self._metas = metas
        self._ready = True

    def tag(self, batch: dict, k: int) -> dict:
        """Labels of data set ``k`` (its phenotypes), then subject indices offset to be unique, and
        ``dataset`` ``(B,)`` long."""
        dm = self.children[list(self.children)[k]]
        batch = dm.on_before_batch_transfer(batch, 0)
        batch["subject"] = batch["subject"] + self.offsets[k]
        batch["dataset"] = torch.full_like(batch["subject"], k)
        return batch

    @property
    def meta(self) -> dict[str, Any]:
        """The children's metas, the normalized weights and the shared grid (plain containers)."""
        self.setup()
        first = next(iter(self._metas.values()))
        trs = sorted({t for m in self._metas.values() for t in m.get("trs", [])})
        return {
            "dataset": self.name,
            "datasets": {n: m for n, m in self._metas.items()},
            "weights": dict(self.weights),
            "tr": trs[0] if len(trs) == 1 else "mixed",
            "trs": trs,
            "shape": first.get("shape"),
            "orientation": common_orientation((m.get("orientation") for m in self._metas.values()),
                                              "the data sets of data=multi"),
            "in_chans": first.get("in_chans"),
            "window_length": first.get("window_length"),
            "n_subjects": int(sum(int(m.get("n_subjects", 0)) for m in self._metas.values())),
        }

    def train_dataloader(self) -> MixedTrainLoader:
        self.setup()
        self._train_loader = MixedTrainLoader(self)
        return self._train_loader

    def _chain(self, split: str) -> _ChainLoader:
        self.setup()
        loaders = []
        for k, dm in enumerate(self.children.values()):
            segments = getattr(dm, "segments", {})
            if split == "val" and segments.get("val"):
                loaders.append((k, dm.val_dataloader()))
            elif split == "test" and (segments.get("test") or segments.get("val")):
                loaders.append((k, dm.test_dataloader()))
        return _ChainLoader(self, loaders)

    def val_dataloader(self) -> _ChainLoader:
        return self._chain("val")

    def test_dataloader(self) -> _ChainLoader:
        return self._chain("test")

