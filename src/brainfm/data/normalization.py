"""Per-ROI z-scoring of BOLD time series, with the statistics the checkpoint needs; and the training
statistics of volume data (:class:`VolumeStatistics`, end of this docstring).

Modes:

- ``run``: each ROI of each subject run is z-scored over that run's own TRs (the usual practice for
  rs-fMRI: Brain-Semantoks z-scores per ROI per subject). Nothing is fitted: a run's mean and
  standard deviation come from the store's per-run statistics (its index) when a window of the run is
  read, so the same model applies to any data set, and the checkpoint carries only the mode.
- ``global``: one mean and standard deviation per ROI, pooled over the training TRs only, and
  applied to every run (needed at inference: they travel with the checkpoint, ``(n_rois,)`` each).
  When the training segments are whole runs they are pooled from the per-run statistics without
  reading the data; otherwise (a split in time) the training TRs are read once, split over the
  ranks of a distributed job and summed with ``all_reduce``.
- ``none``: the raw signal.

Volume data are normalized per run (each run with its own statistics: SwiFT's global z-score at
preprocessing, then ``data.normalization.load``: ``stored``, ``voxel``, ``minmax``, ``stored+voxel``; see
:mod:`brainfm.data.datasets.volume`). A trained model's checkpoint also carries the statistics of its training
runs (:class:`VolumeStatistics`), so that data can be normalized at evaluation with those instead
(``data.normalization.statistics``):

- ``store`` (default): every run with its own statistics, the rule the model was trained with (each training
  run was normalized with its own); intensities in arbitrary scanner units and short or task runs of any site
  reach the model on the scale it saw.
- ``checkpoint``: every run with the training runs' pooled statistics in place of its own: ``stored`` maps the
  run back to its source intensities and z-scores them with the training runs' global mean and standard
  deviation; ``voxel`` subtracts and divides by the training runs' per-voxel mean and standard deviation
  (pooled in stored units); ``minmax`` scales by the training runs' brain minimum and maximum. Use it for data of
  the training site and protocol where a run's own statistics remove the signal asked about (the per-voxel mean
  of a single-task run is its activation map: NeuroSTORM's HCP 21-task decoding went from 17.5 % to 70.5 % once
  its evaluation-time voxel normalization matched training, Brainmarks PR #53).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from brainfm.errors import ConfigError, DataError

MODES = ("run", "global", "none")
#: ``data.normalization.statistics`` of volume data: each run's own statistics, or the training runs' (checkpoint).
STATISTICS = ("store", "checkpoint")
#: the pooled per-voxel statistics read at most this many training runs (evenly spaced; 7 MB each at 96^3)
MAX_VOXEL_RUNS = 128


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(values: list[np.ndarray]) -> list[np.ndarray]:
    """Sum float64 arrays over the ranks of the default process group (identity without one)."""
    _, world = _dist()
    if world == 1:
        return values
    import torch
    import torch.distributed as dist

    flat = torch.from_numpy(np.concatenate([np.ravel(v) for v in values]).astype(np.float64))
    if dist.get_backend() == "nccl":
        flat = flat.cuda()
    dist.all_reduce(flat)
    flat = flat.cpu().numpy()
    out, k = [], 0
    for v in values:
        out.append(flat[k:k + np.size(v)].reshape(np.shape(v)))
        k += np.size(v)
    return out


@dataclass
class ROINormalizer:
    """z-scoring of ROI series read from ``store``.

    Attributes:
        mode: ``run`` | ``global`` | ``none``.
        eps: a standard deviation below ``eps`` is an error (a constant ROI cannot be z-scored).
        mean, std: ``(n_rois,)`` float32 for ``global``; None otherwise.
        store: the store whose runs :meth:`apply` z-scores (``run`` mode reads its ``run_stats``).
    """

    mode: str = "run"
    eps: float = 1e-6
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    store: Any = None

    @classmethod
    def fit(
        cls,
        store,
        mode: str = "run",
        eps: float = 1e-6,
        train_segments: Iterable[tuple[int, int, int]] = (),
    ) -> "ROINormalizer":
        """The normalizer of ``store`` (see the module docstring for what each mode computes).

        Args:
            store: an ROI store (or any store of feature vectors with ``run_stats`` mean/std).
            mode: ``run``, ``global`` or ``none``.
            eps: minimal standard deviation.
            train_segments: ``(run, start, stop)`` TR ranges the ``global`` statistics pool over.

        Raises:
            ConfigError: unknown mode, or ``global`` without training segments. DataError: NaN inside
                a training run, or a constant ROI over the training TRs.
        """
        if mode not in MODES:
            raise ConfigError(f"data.normalization.mode={mode!r} is not one of {MODES}")
        norm = cls(mode=mode, eps=float(eps), store=store)
        if mode != "global":
            return norm
        segments = [tuple(int(v) for v in s) for s in train_segments]
        if not segments:
            raise ConfigError("normalization.mode=global needs training segments to pool over")
        n_rois = int(store.frame_shape[0])
        g_sum, g_sq, g_n = np.zeros(n_rois), np.zeros(n_rois), np.zeros(1)
        whole = all(start == 0 and stop == int(store.lengths[run]) for run, start, stop in segments)
        if whole and getattr(store, "has_run_stats", False):  # pooled from the index: nothing is read
            for run, _, _ in segments:
                stats = store.run_stats(run)
                n, mean, std = stats["n"], stats["mean"], stats["std"]
                g_sum += n * mean
                g_sq += n * (std**2 + mean**2)
                g_n += n
        else:  # one pass over the training TRs, split over the ranks
            rank, world = _dist()
            for run, start, stop in segments[rank::world]:
                x = store.read(run, start, stop).astype(np.float64)
                if not np.isfinite(x).all():
                    store.check_finite(run)
                g_sum += x.sum(axis=0)
                g_sq += (x**2).sum(axis=0)
                g_n += len(x)
            g_sum, g_sq, g_n = _all_reduce([g_sum, g_sq, g_n])
        mean = g_sum / g_n[0]
        std = np.sqrt(np.maximum(g_sq / g_n[0] - mean**2, 0.0))
        read = getattr(store, "roi_mask", None)  # ROIs of an atlas the file lacks (zeros): left as they are
        if read is not None:
            mean, std = np.where(read, mean, 0.0), np.where(read, std, 1.0)
        norm.mean, norm.std = mean.astype(np.float32), std.astype(np.float32)
        bad = np.flatnonzero(std < eps)
        if len(bad):
            raise DataError(cls._constant_roi_message(store, int(bad[0]), "over the training TRs", len(bad)))
        return norm

    def bind(self, store) -> "ROINormalizer":
        """This normalizer applied to the runs of ``store`` (e.g. a checkpoint's on other data)."""
        return ROINormalizer(self.mode, self.eps, self.mean, self.std, store)

    @staticmethod
    def _constant_roi_message(store, roi: int, where: str, count: int) -> str:
        names = getattr(store, "roi_names", None)
        name = names[roi] if names else f"#{roi}"
        return (
            f"{store.location}: ROI {name!r} (index {roi}) is constant {where} ({count} constant "
            "ROI/run pair(s) in all), so it cannot be z-scored. Fix: drop the ROI from the "
            "parcellation (often a region outside the field of view) or use "
            "data.normalization.mode=none."
        )

    def apply(self, run: int, x: np.ndarray) -> np.ndarray:
        """z-score ``x`` ``(n_timepoints, n_rois)`` of run ``run``; returns float32.

        Raises:
            DataError: ``run`` mode and an ROI that is constant over the run (named).
        """
        if self.mode == "none":
            return x.astype(np.float32, copy=False)
        if self.mode == "run":
            if self.store is None:
                raise ConfigError("a run-mode normalizer needs the store it reads from (ROINormalizer.bind(store))")
            stats = self.store.run_stats(run)
            std = stats["std"]
            bad = np.flatnonzero(std < self.eps)
            if len(bad):
                raise DataError(self._constant_roi_message(self.store, int(bad[0]), f"in {self.store.describe_run(run)}",
                                                           len(bad)))
            mean, std = stats["mean"].astype(np.float32), std.astype(np.float32)
        else:
            mean, std = self.mean, self.std
        return ((x - mean[None, :]) / std[None, :]).astype(np.float32, copy=False)

    def state(self) -> dict:
        """Plain/tensor state for a checkpoint (loads with ``torch.load(weights_only=True)``): the mode,
        ``eps`` and, for ``global``, the ``(n_rois,)`` mean and standard deviation."""
        out: dict = {"mode": self.mode, "eps": float(self.eps)}
        if self.mode == "global" and self.mean is not None:
            out["mean"] = torch.from_numpy(np.ascontiguousarray(self.mean))
            out["std"] = torch.from_numpy(np.ascontiguousarray(self.std))
        return out

    @classmethod
    def from_state(cls, state: dict, store=None) -> "ROINormalizer":
        """The normalizer of a checkpoint, applied to ``store``. Older checkpoints that also saved one row
        of statistics per training run in ``run`` mode are read the same way (those rows are unused)."""
        mode = state["mode"]
        mean = state.get("mean") if mode == "global" else None
        std = state.get("std") if mode == "global" else None
        return cls(
            mode=mode,
            eps=state.get("eps", 1e-6),
            mean=None if mean is None else np.asarray(mean, dtype=np.float32),
            std=None if std is None else np.asarray(std, dtype=np.float32),
            store=store,
        )


def _columns(store, runs: list[int], names: tuple[str, ...]) -> list[np.ndarray]:
    """Index columns ``names`` of ``store`` at ``runs`` as float64 arrays (one Arrow read per column, not one
    Python dict per run: a 45,000-run store), or from each run's statistics where the store has no such column."""
    out = []
    for name in names:
        try:
            values = store.column(name)
            out.append(np.asarray([values[r] for r in runs], dtype=np.float64))
        except KeyError:
            out.append(np.asarray([store.run_stats(r)[name] for r in runs], dtype=np.float64))
    return out


def run_source_map(store, run: int) -> tuple[float, float] | None:
    """``(offset, scale)`` with which run ``run`` of ``store`` holds its source intensities (stored = (source -
    offset) * scale: :func:`brainfm.data.stores.volume.source_map`), or None where they are unknown (SwiFT frames
    and runs normalized before brainfm: ``global`` with no scale applied)."""
    stats = store.run_stats(run)
    if "source_scale" not in stats or stats["source_scale"] is None:
        return None
    offset, scale = float(stats["source_offset"]), float(stats["source_scale"])
    if str(stats.get("normalization")) != "none" and offset == 0.0 and scale == 1.0:
        return None
    return offset, scale


@dataclass
class VolumeStatistics:
    """Intensity statistics pooled over a model's training runs of a volume store: what
    ``data.normalization.statistics=checkpoint`` normalizes other data with (module docstring). The checkpoint
    carries them under its ``brainfm`` entry (:meth:`state`; the per-voxel arrays are tensors, 2 x 4 bytes per
    voxel: 7.1 MB at 96^3) and a summary without the arrays in ``data_meta["normalization"]["statistics"]``.

    Attributes:
        stored: how the training runs were stored: ``global`` (z-scored by brainfm: ``global_mean``/``global_std``
            are the training runs' pooled source mean and standard deviation over brain voxels x training TRs,
            from the store's index, nothing read), ``none`` (source values as they are), or None (unknown: runs
            normalized upstream, such as SwiFT frames, or a mix).
        global_mean, global_std: source units (``stored="global"``).
        min, max: the lowest and highest brain value of the training runs, stored units (``load=minmax``).
        voxel_mean, voxel_std: ``(X, Y, Z)`` float32, stored units: each voxel's mean and standard deviation over
            the training TRs of the runs where it is brain (``voxel_std > 0``), pooled from the runs' per-voxel
            statistics (``load=voxel`` and ``stored+voxel``); 0 where no training run has brain. Read from at most
            :data:`MAX_VOXEL_RUNS` training runs, evenly spaced (an estimate past that).
        runs, voxel_runs: training runs pooled (all; for the per-voxel statistics).
    """

    stored: str | None = None
    global_mean: float | None = None
    global_std: float | None = None
    min: float | None = None
    max: float | None = None
    voxel_mean: np.ndarray | None = None
    voxel_std: np.ndarray | None = None
    runs: int = 0
    voxel_runs: int = 0

    @classmethod
    def fit(cls, store, train_segments: Iterable[tuple[int, int, int]], load: str,
            max_voxel_runs: int = MAX_VOXEL_RUNS) -> "VolumeStatistics":
        """The statistics of ``store``'s training runs that load mode ``load`` uses (``stored`` and ``stored+voxel``:
        global; ``minmax``: min/max; ``voxel`` and ``stored+voxel``: per voxel). Each run weighs its training TRs
        (per-run statistics describe the whole run, so with a split in time they include its validation TRs).

        Args:
            store: a volume store (or a frame folder: no global statistics, per-voxel ones where it has them).
            train_segments: ``(run, start, stop)`` training TR ranges.
            load: ``data.normalization.load``.
            max_voxel_runs: runs whose per-voxel statistics are read at most.
        """
        weights: dict[int, int] = {}
        for run, start, stop in train_segments:
            weights[int(run)] = weights.get(int(run), 0) + int(stop) - int(start)
        runs = sorted(r for r, n in weights.items() if n > 0)
        out = cls(runs=len(runs))
        if not runs:
            return out
        if load in ("stored", "stored+voxel") and store.kind == "volume":  # frame folders: source unknown
            out._fit_global(store, runs, weights)
        if load == "minmax":
            lo, hi = _columns(store, runs, ("min", "max"))
            out.min, out.max = float(lo.min()), float(hi.max())
        if load in ("voxel", "stored+voxel"):
            out._fit_voxel(store, runs, weights, max_voxel_runs)
        return out

    def _fit_global(self, store, runs: list[int], weights: dict[int, int]) -> None:
        normalization = store.column("normalization")
        norm = [normalization[r] for r in runs]
        offset, scale, mean, std, voxels = _columns(store, runs, ("source_offset", "source_scale", "global_mean",
                                                                  "global_std", "brain_voxels"))
        kept = (offset == 0.0) & (scale == 1.0)  # stored as given: source values, or normalized upstream
        if not kept.any():  # every run z-scored by brainfm: pool their source statistics
            w = np.array([weights[r] for r in runs], float) * np.maximum(voxels, 1)
            g_mean = float((w * mean).sum() / w.sum())
            g_var = float((w * (std**2 + mean**2)).sum() / w.sum() - g_mean**2)
            self.stored, self.global_mean, self.global_std = "global", g_mean, float(np.sqrt(max(g_var, 0.0)))
        elif kept.all() and all(n == "none" for n in norm):
            self.stored = "none"

    def _fit_voxel(self, store, runs: list[int], weights: dict[int, int], max_runs: int) -> None:
        if len(runs) > max_runs:
            runs = [runs[i] for i in np.unique(np.linspace(0, len(runs) - 1, int(max_runs)).round().astype(int))]
        n = s1 = s2 = None
        used = 0
        for r in runs:
            stats = store.voxel_stats(r)
            if stats is None:
                continue
            mean, std = (np.asarray(a, dtype=np.float64) for a in stats)
            w = weights[r] * (std > 0)
            if n is None:
                n, s1, s2 = np.zeros(mean.shape), np.zeros(mean.shape), np.zeros(mean.shape)
            n += w
            s1 += w * mean
            s2 += w * (std**2 + mean**2)
            used += 1
        if n is None:
            return
        brain = n > 0
        m = np.divide(s1, n, out=np.zeros_like(s1), where=brain)
        v = np.divide(s2, n, out=np.zeros_like(s2), where=brain) - m**2
        self.voxel_mean = m.astype(np.float32)
        self.voxel_std = np.sqrt(np.maximum(v, 0.0)).astype(np.float32)
        self.voxel_runs = used

    def state(self) -> dict:
        """Plain/tensor state for a checkpoint's ``brainfm`` entry (loads with ``torch.load(weights_only=True)``):
        :meth:`summary` and the per-voxel arrays as tensors."""
        out = {**self.summary()}
        for key in ("voxel_mean", "voxel_std"):
            value = getattr(self, key)
            if value is not None:
                out[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        return out

    def summary(self) -> dict:
        """The statistics without the per-voxel arrays (plain values, for ``data_meta``), with ``kind: volume``."""
        return {"kind": "volume", "stored": self.stored, "global_mean": self.global_mean,
                "global_std": self.global_std, "min": self.min, "max": self.max, "runs": int(self.runs),
                "voxel": self.voxel_mean is not None, "voxel_runs": int(self.voxel_runs)}

    @classmethod
    def from_state(cls, state: dict) -> "VolumeStatistics":
        """The statistics of a checkpoint's ``brainfm`` entry (:meth:`state`)."""
        arrays = {k: None if state.get(k) is None else np.asarray(state[k], dtype=np.float32)
                  for k in ("voxel_mean", "voxel_std")}
        return cls(stored=state.get("stored"), global_mean=state.get("global_mean"), global_std=state.get("global_std"),
                   min=state.get("min"), max=state.get("max"), runs=int(state.get("runs") or 0),
                   voxel_runs=int(state.get("voxel_runs") or 0), **arrays)

    def source_scaling(self) -> tuple[float, float] | None:
        """``(mean, 1 / std)`` that z-scored the training runs' source intensities (``(0, 1)``: stored as they
        were), or None when the checkpoint does not know them."""
        if self.stored == "global" and self.global_std:
            return float(self.global_mean), 1.0 / float(self.global_std)
        return (0.0, 1.0) if self.stored == "none" else None

    @classmethod
    def is_state(cls, state: dict | None) -> bool:
        """Whether a checkpoint's ``brainfm["normalization"]`` entry holds volume statistics (not an ROI
        normalizer's)."""
        return isinstance(state, dict) and state.get("kind") == "volume"
