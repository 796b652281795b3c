"""Runs of a time-series store resampled to another TR (``data.resample_tr``), by polyphase
filtering (``scipy.signal.resample_poly``: upsample by ``up``, a Kaiser-windowed FIR anti-aliasing
low-pass, downsample by ``down``, with ``up / down = TR_in / TR_out`` as a fraction).

For models that need a fixed TR (Brain-Semantoks' 20-TR patches at 2 s, Swin4D's frames): data at
another TR are resampled when read (:class:`ResampledStore`, a store itself) or once, in
preprocessing (``brainfm-data resample <in.h5> <out.h5> --tr <s>``, :func:`write_resampled_roi_h5`).
Models that embed time in seconds (GPT, BERT, the LSTM autoencoder, the temporal MLP) take any TR
without resampling.

Edges: the signal is extended by a line fitted to each end (``padtype="line"``) before filtering,
so a BOLD series with a large mean (scanner units) does not ring at the run's first and last TRs
as it would with zero padding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from brainfm.data.stores import open_store
from brainfm.data.stores.base import LRUCache, StoreBase, ensure_out
from brainfm.data.stores.roi import ROIStoreWriter, write_censored_trs
from brainfm.errors import ConfigError
from brainfm.io import atomic_path

#: the largest ``up`` / ``down`` of a rational TR ratio (0.72 s -> 0.8 s is 9 / 10)
MAX_DENOMINATOR = 1000
#: the kinds of store whose reads are ``(n, channels)`` time-first matrices
TIME_SERIES_KINDS = ("roi", "grayordinate")


def resample_factors(tr_in: float, tr_out: float) -> tuple[int, int]:
    """``(up, down)``: the smallest integers with ``up / down = tr_in / tr_out`` (within
    :data:`MAX_DENOMINATOR`), e.g. 0.72 s -> 2 s gives ``(9, 25)``.

    Raises:
        ConfigError: a TR that is not a positive number.
    """
    if not (tr_in > 0 and tr_out > 0 and math.isfinite(tr_in) and math.isfinite(tr_out)):
        raise ConfigError(f"data.resample_tr={tr_out} (data at TR {tr_in} s): TRs must be positive seconds")
    ratio = Fraction(float(tr_in) / float(tr_out)).limit_denominator(MAX_DENOMINATOR)
    return ratio.numerator, ratio.denominator


def resampled_length(n: int, up: int, down: int) -> int:
    """TRs of a run of ``n`` TRs after resampling by ``up / down`` (``ceil(n * up / down)``, as scipy)."""
    return -(-int(n) * int(up) // int(down))


def resample_run(x: np.ndarray, tr_in: float, tr_out: float) -> np.ndarray:
    """One run ``(T, ...)`` (time first) at ``tr_in`` seconds -> ``(T', ...)`` float32 at ``tr_out``
    seconds, ``T' = ceil(T * tr_in / tr_out)``; computed in float64
    (``scipy.signal.resample_poly(x, up, down, axis=0, padtype="line")``).

    Raises:
        ConfigError: bad TRs (:func:`resample_factors`).
    """
    from scipy.signal import resample_poly

    up, down = resample_factors(tr_in, tr_out)
    if up == down:
        return np.asarray(x, dtype=np.float32)
    return resample_poly(np.asarray(x, dtype=np.float64), up, down, axis=0, padtype="line").astype(np.float32)


class ResampledStore(StoreBase):
    """The runs of a time-series store (ROI or grayordinate) at TR ``tr`` seconds.

    A run is read whole from ``base``, resampled (:func:`resample_run`) and kept in an LRU cache of
    ``cache_runs`` runs (per process); windows are slices of it. ``run_stats`` are those of the
    resampled run. Every other attribute (``atlas``, ``n_rois``, ``roi_names``, ...) is the base's.

    Shapes: ``read(run, start, stop, stride)`` -> ``(n, channels)`` float32, TRs of the new grid.

    Raises:
        ConfigError: a store that is not a time series (volumes are resampled in preprocessing), or
            runs without a TR.
    """

    def __init__(self, base, tr: float, cache_runs: int = 64) -> None:
        if base.kind not in TIME_SERIES_KINDS:
            raise ConfigError(f"data.resample_tr resamples ROI and grayordinate data when they are read; "
                              f"{base.location} is a {base.kind} store. Fix: resample volumes when preprocessing")
        trs = np.asarray(base.trs, dtype=np.float64)
        if not len(trs) or not np.isfinite(trs).all():
            raise ConfigError(f"data.resample_tr: {base.location} records no TR for some runs; set data.tr=<s>")
        self.base = base
        self.kind = base.kind
        self.location = base.location
        self.subject_ids, self.run_ids = base.subject_ids, base.run_ids
        self.source_trs = trs
        self.target_tr = float(tr)
        self.factors = [resample_factors(float(t), self.target_tr) for t in trs]
        self.lengths = np.asarray([resampled_length(n, *f) for n, f in zip(base.lengths, self.factors)],
                                  dtype=np.int64)
        self._runs = LRUCache(int(cache_runs))
        self._stats = LRUCache(max(int(cache_runs), 1024))

    @property
    def trs(self) -> np.ndarray:
        return np.full(len(self.lengths), self.target_tr)

    @property
    def tr(self) -> float:
        return self.target_tr

    @tr.setter
    def tr(self, value: float | None) -> None:  # the datamodules assign the resolved TR: it is this one
        if value is not None and not math.isclose(float(value), self.target_tr, abs_tol=1e-6):
            raise ConfigError(f"data.resample_tr={self.target_tr:g} s but TR {value:g} s was asked of {self.location}")

    @property
    def frame_shape(self):
        return self.base.frame_shape

    @property
    def has_censoring(self) -> bool:
        return bool(getattr(self.base, "has_censoring", False))

    def censored_trs(self, run: int) -> np.ndarray:
        """The base run's censored TRs on the new grid: every new TR less than one source TR away from a
        censored source TR (whose value the resampling filter spreads over its neighbours), sorted ``(n,)`` int64."""
        src = np.asarray(self.base.censored_trs(run), dtype=np.float64) if self.has_censoring else np.empty(0)
        if not len(src):
            return np.empty(0, dtype=np.int64)
        tr_in, tr_out, n = float(self.source_trs[run]), self.target_tr, int(self.lengths[run])
        first = np.floor((src * tr_in - tr_in) / tr_out).astype(np.int64) + 1  # j * tr_out > t - tr_in
        last = np.ceil((src * tr_in + tr_in) / tr_out).astype(np.int64) - 1    # j * tr_out < t + tr_in
        out = np.concatenate([np.arange(max(a, 0), min(b, n - 1) + 1) for a, b in zip(first, last)])
        return np.unique(out).astype(np.int64)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def _run(self, run: int) -> np.ndarray:
        def load() -> np.ndarray:
            x = self.base.read(run)
            self.base.check_finite(run, x)
            return resample_run(x, float(self.source_trs[run]), self.target_tr)

        return self._runs.get(int(run), load)

    def read(self, run: int, start: int = 0, stop: int | None = None, stride: int = 1,
             out: np.ndarray | None = None) -> np.ndarray:
        """TRs ``start, start + stride, ... < stop`` of the resampled run ``(n, channels)`` float32.

        Raises:
            IndexError: TRs outside the resampled run. DataError: NaN/inf in the source run.
        """
        frames = self._frames(run, start, stop, stride)
        x = self._run(run)[frames.start:frames.stop:frames.step]
        if out is None:
            return x.copy()
        ensure_out(out, x.shape, np.float32, self.describe_run(run))[...] = x
        return out

    def run_stats(self, run: int) -> Mapping[str, Any]:
        """``n`` (TRs), ``mean`` and ``std`` (per channel, float64) of the resampled run."""
        def load() -> dict[str, Any]:
            x = self._run(run).astype(np.float64)
            return {"n": int(self.lengths[run]), "mean": x.mean(axis=0), "std": x.std(axis=0)}

        return self._stats.get(int(run), load)

    def describe_run(self, run: int) -> str:
        return f"{self.base.describe_run(run)} resampled from TR {self.source_trs[run]:g} s to {self.target_tr:g} s"

    def __repr__(self) -> str:
        return f"ResampledStore({self.base!r}, tr={self.target_tr:g})"


def write_resampled_roi_h5(src: str | Path, dst: str | Path, tr: float, atlas: str | None = None) -> Path:
    """``brainfm-data resample``: the ROI HDF5 store ``src`` with every run resampled to ``tr``
    seconds, written to ``dst`` (brainfm's ROI layout, per-run statistics, atomically) with the
    labels of ``src``.

    Raises:
        ConfigError / DataError: unreadable input, bad TRs, NaN inside a run (named).
    """
    store = ResampledStore(open_store("roi", Path(src), atlas=atlas, preload=False), tr, cache_runs=1)
    labels = _run_labels(Path(src))
    names = list(store.roi_names) if store.roi_names else [f"roi{i}" for i in range(store.n_rois)]
    with atomic_path(Path(dst)) as tmp:  # the censored TRs are added before the file takes its name
        with ROIStoreWriter(tmp, tr=float(tr), roi_names={store.atlas: names},
                            attrs={"resampled_from": str(src)}) as writer:
            for run in range(len(store)):
                writer.append(store.subject_ids[run], store.run_ids[run], {store.atlas: store.read(run).T},
                              labels={k: v[run] for k, v in labels.items()})
        if store.has_censoring:
            write_censored_trs(tmp, [store.censored_trs(run) for run in range(len(store))], attrs={
                "fd_threshold_mm": store.base.censoring.get("fd_threshold_mm", np.nan),
                "source": f"{src}, resampled: the TRs less than one source TR from a censored one"})
    return Path(dst)


def _run_labels(path: Path) -> dict[str, np.ndarray]:
    import h5py

    with h5py.File(path, "r") as f:
        if "labels" not in f:
            return {}
        return {k: [v.decode() if isinstance(v, bytes) else v.item() for v in f["labels"][k][:]] for k in f["labels"]}
