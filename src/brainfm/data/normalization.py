"""Per-ROI z-scoring of BOLD time series, with the statistics the checkpoint needs.

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
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from brainfm.errors import ConfigError, DataError

MODES = ("run", "global", "none")


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
        import torch

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
