"""Per-ROI z-scoring of BOLD time series, with the statistics kept for the checkpoint.

Modes:

- ``run``: each ROI of each subject run is z-scored over that run's own valid TRs (the usual
  practice for rs-fMRI: Brain-Semantoks z-scores per ROI per subject). Nothing learnt from the
  training set is needed at inference, but the statistics are saved for provenance.
- ``global``: one mean and standard deviation per ROI, pooled over the training TRs only, and
  applied to every run (needed at inference: they travel with the checkpoint).
- ``none``: the raw signal.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from brainfm.data.stores.roi import ROIStore
from brainfm.errors import ConfigError, DataError

MODES = ("run", "global", "none")


@dataclass
class ROINormalizer:
    """z-scoring statistics.

    Attributes:
        mode: ``run`` | ``global`` | ``none``.
        mean, std: ``(n_runs, n_rois)`` for ``run``; ``(n_rois,)`` for ``global``; ``None`` else.
        eps: a standard deviation below ``eps`` is an error (a constant ROI cannot be z-scored).
    """

    mode: str = "run"
    eps: float = 1e-6
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    subject_ids: list[str] = field(default_factory=list)

    @classmethod
    def fit(
        cls,
        store: ROIStore,
        mode: str = "run",
        eps: float = 1e-6,
        train_segments: Iterable[tuple[int, int, int]] = (),
    ) -> "ROINormalizer":
        """Read every run once, check it is finite, and compute the statistics.

        Args:
            store: the ROI store.
            mode: see the module docstring.
            eps: minimal standard deviation.
            train_segments: ``(run, start, stop)`` TR ranges the ``global`` statistics pool over.

        Raises:
            ConfigError: unknown mode. DataError: NaN inside a run, or a constant ROI.
        """
        if mode not in MODES:
            raise ConfigError(f"data.normalization.mode={mode!r} is not one of {MODES}")
        norm = cls(mode=mode, eps=eps, subject_ids=list(store.subject_ids))
        n_runs, n_rois = store.n_runs, store.n_rois
        run_mean = np.zeros((n_runs, n_rois))
        run_std = np.zeros((n_runs, n_rois))
        g_sum = np.zeros(n_rois)
        g_sq = np.zeros(n_rois)
        g_n = 0
        train = {}
        for run, start, stop in train_segments:
            train.setdefault(run, []).append((start, stop))
        for run in range(n_runs):
            data = store.read(run).astype(np.float64)
            store.check_finite(run, data)
            run_mean[run] = data.mean(axis=1)
            run_std[run] = data.std(axis=1)
            for start, stop in train.get(run, ()):
                seg = data[:, start:stop]
                g_sum += seg.sum(axis=1)
                g_sq += (seg**2).sum(axis=1)
                g_n += seg.shape[1]
        if mode == "run":
            norm.mean, norm.std = run_mean.astype(np.float32), run_std.astype(np.float32)
            bad = np.argwhere(run_std < eps)
            if len(bad):
                run, roi = (int(v) for v in bad[0])
                raise DataError(cls._constant_roi_message(store, roi, f"in {store.describe_run(run)}", len(bad)))
        elif mode == "global":
            if g_n == 0:
                raise ConfigError("normalization.mode=global needs training segments to pool over")
            mean = g_sum / g_n
            std = np.sqrt(np.maximum(g_sq / g_n - mean**2, 0.0))
            norm.mean, norm.std = mean.astype(np.float32), std.astype(np.float32)
            bad = np.flatnonzero(std < eps)
            if len(bad):
                raise DataError(cls._constant_roi_message(store, int(bad[0]), "over the training TRs", len(bad)))
        return norm

    @staticmethod
    def _constant_roi_message(store: ROIStore, roi: int, where: str, count: int) -> str:
        name = store.roi_names[roi] if store.roi_names else f"#{roi}"
        return (
            f"{store.path}: ROI {name!r} (index {roi}) is constant {where} ({count} constant "
            "ROI/run pair(s) in all), so it cannot be z-scored. Fix: drop the ROI from the "
            "parcellation (often a region outside the field of view) or use "
            "data.normalization.mode=none."
        )

    def apply(self, run: int, x: np.ndarray) -> np.ndarray:
        """z-score ``x`` of shape ``(n_rois, n_timepoints)`` from run ``run``; returns float32."""
        if self.mode == "none":
            return x.astype(np.float32, copy=False)
        if self.mode == "run":
            mean, std = self.mean[run], self.std[run]
        else:
            mean, std = self.mean, self.std
        return ((x - mean[:, None]) / std[:, None]).astype(np.float32, copy=False)

    def state(self) -> dict:
        """Plain/tensor state for a checkpoint (loads with ``torch.load(weights_only=True)``)."""
        import torch

        out: dict = {"mode": self.mode, "eps": float(self.eps), "subject_ids": list(self.subject_ids)}
        if self.mean is not None:
            out["mean"] = torch.from_numpy(np.ascontiguousarray(self.mean))
            out["std"] = torch.from_numpy(np.ascontiguousarray(self.std))
        return out

    @classmethod
    def from_state(cls, state: dict) -> "ROINormalizer":
        mean = state.get("mean")
        std = state.get("std")
        return cls(
            mode=state["mode"],
            eps=state.get("eps", 1e-6),
            mean=None if mean is None else np.asarray(mean, dtype=np.float32),
            std=None if std is None else np.asarray(std, dtype=np.float32),
            subject_ids=list(state.get("subject_ids", [])),
        )
