"""The one interface every store implements, and the bounded per-process cache they share.

A *store* holds the BOLD of many subject runs in one layout on disk (the ROI HDF5 file, the volume
store, SwiFT frame folders, the grayordinate store, or a restricted view of one of them). Datasets,
datamodules, evaluation and extraction only use this interface, so they never test which store
they were given:

- run table: ``subject_ids``, ``run_ids`` (lists, one per run), ``lengths`` (``(n_runs,)`` int64 TRs),
  ``trs`` (``(n_runs,)`` float64 seconds), ``tr`` (the common TR or None), ``frame_shape`` (what one
  TR is: ``(n_rois,)``, ``(X, Y, Z)`` or ``(n_grayordinates,)``), ``len(store)``;
- ``read(run, start, stop, stride=1, out=None)``: TRs ``start, start + stride, ... < stop`` of one run
  as a time-first ``(n, *frame_shape)`` array (``out``: an array to read into);
- ``run_stats(run)``: the run's statistics (a mapping; see each store), from the run index when the
  store has one, never by reading every run at open;
- ``describe_run(run)``: the run in words (subject, run id, file), for error messages.

Every per-run resource a store keeps open (file handles, masks, statistics) lives in an
:class:`LRUCache` with a configured size, so a DataLoader worker that visits every run of UK
Biobank keeps a bounded number of them.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from brainfm.errors import DataError

#: Default sizes of the per-process caches (``data.cache`` in the configs): open files or memory maps,
#: brain masks, per-run statistics, runs resampled to ``data.resample_tr``.
DEFAULT_CACHE = {"open_runs": 32, "masks": 32, "run_stats": 4096, "resampled_runs": 64}


@runtime_checkable
class Store(Protocol):
    """What every store provides (module docstring). ``kind`` is ``roi``, ``volume``, ``frames``,
    ``grayordinate`` or ``view``; ``location`` is the file or folder it reads."""

    kind: str
    location: Path
    subject_ids: Sequence[str]
    run_ids: Sequence[str]
    lengths: np.ndarray
    trs: np.ndarray
    tr: float | None
    frame_shape: tuple[int, ...]

    def __len__(self) -> int: ...

    def read(self, run: int, start: int = 0, stop: int | None = None, stride: int = 1,
             out: np.ndarray | None = None) -> np.ndarray: ...

    def run_stats(self, run: int) -> Mapping[str, Any]: ...

    def describe_run(self, run: int) -> str: ...


class LRUCache:
    """A bounded, least-recently-used cache owned by one process.

    A forked DataLoader worker starts with an empty cache (the parent's entries, such as open file
    descriptors, are not shared), and pickling (spawned workers) carries no entries.

    Args:
        maxsize: entries kept (>= 1).
        on_evict: called with each evicted value (e.g. ``os.close`` for file descriptors).

    Raises:
        ValueError: ``maxsize < 1``.
    """

    def __init__(self, maxsize: int, on_evict: Callable[[Any], None] | None = None) -> None:
        if int(maxsize) < 1:
            raise ValueError(f"cache size must be >= 1, got {maxsize}")
        self.maxsize = int(maxsize)
        self.on_evict = on_evict
        self._data: OrderedDict = OrderedDict()
        self._pid = os.getpid()

    def _own(self) -> None:
        if self._pid != os.getpid():  # a forked worker: the parent's entries are not ours to use or close
            self._data, self._pid = OrderedDict(), os.getpid()

    def get(self, key: Hashable, factory: Callable[[], Any]) -> Any:
        """The cached value of ``key``, else ``factory()`` (cached, evicting the oldest beyond ``maxsize``)."""
        self._own()
        try:
            value = self._data[key]
        except KeyError:
            value = factory()
            self._data[key] = value
            while len(self._data) > self.maxsize:
                _, old = self._data.popitem(last=False)
                if self.on_evict is not None:
                    self.on_evict(old)
            return value
        self._data.move_to_end(key)
        return value

    def clear(self) -> None:
        self._own()
        while self._data:
            _, old = self._data.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(old)

    def __len__(self) -> int:
        self._own()
        return len(self._data)

    def __getstate__(self) -> dict:
        return {"maxsize": self.maxsize, "on_evict": self.on_evict, "_data": OrderedDict(), "_pid": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()


def cache_sizes(cache: Mapping[str, int] | None) -> dict[str, int]:
    """``DEFAULT_CACHE`` updated with ``cache`` (``data.cache``).

    Raises:
        ValueError: an unknown key or a size below 1.
    """
    out = dict(DEFAULT_CACHE)
    for key, value in dict(cache or {}).items():
        if key not in out:
            raise ValueError(f"data.cache has no key {key!r}; known: {sorted(out)}")
        if int(value) < 1:
            raise ValueError(f"data.cache.{key}={value} must be >= 1")
        out[key] = int(value)
    return out


def common_tr(trs: np.ndarray) -> float | None:
    """The TR shared by every run (seconds), or None when runs differ (or there are none)."""
    trs = np.asarray(trs, dtype=np.float64)
    if len(trs) and np.allclose(trs, trs[0], atol=1e-6):
        return float(trs[0])
    return None


class StoreBase:
    """Shared behaviour of the stores: ``len``, range checks, ``read_clip`` and ``subjects``."""

    kind = "store"
    location: Path
    subject_ids: Sequence[str]
    run_ids: Sequence[str]
    lengths: np.ndarray
    trs: np.ndarray
    frame_shape: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def tr(self) -> float | None:
        """The TR shared by every run (seconds), or None when runs differ."""
        return common_tr(self.trs)

    def _frames(self, run: int, start: int, stop: int | None, stride: int) -> range:
        """The TRs a read covers; IndexError naming the run when they fall outside it."""
        n = int(self.lengths[run])
        stop = n if stop is None else int(stop)
        start, stride = int(start), int(stride)
        if stride < 1 or not 0 <= start < stop <= n:
            raise IndexError(f"TRs [{start}, {stop}) every {stride} are outside run {run} ({self.describe_run(run)}, {n} TRs)")
        return range(start, stop, stride)

    def read_clip(self, run: int, start: int, length: int, stride: int = 1, out: np.ndarray | None = None) -> np.ndarray:
        """``length`` TRs from ``start``, every ``stride``: ``read(run, start, start + (length - 1) * stride + 1,
        stride, out)``, ``(length, *frame_shape)``. Raises IndexError for a clip outside the run."""
        if int(length) < 1:
            raise IndexError(f"a clip of {length} TRs of {self.describe_run(run)}")
        return self.read(run, start, int(start) + (int(length) - 1) * int(stride) + 1, stride, out)

    def check_finite(self, run: int, data: np.ndarray | None = None) -> None:
        """Raise a DataError naming the run and TRs if it holds NaN/inf (``data``: the run, time-first)."""
        data = self.read(run) if data is None else np.asarray(data)
        bad = ~np.isfinite(data.reshape(len(data), -1)).all(axis=1)
        if bad.any():
            trs = np.flatnonzero(bad)
            shown = ", ".join(str(int(t)) for t in trs[:8]) + (" ..." if len(trs) > 8 else "")
            raise DataError(f"{self.location}: NaN/inf inside {self.describe_run(run)} at TR(s) {shown}. Fix: "
                            "interpolate or censor these frames and write the run again")

    #: whether some TRs are censored (motion); the window datasets skip windows that hold one
    has_censoring: bool = False

    def censored_trs(self, run: int) -> np.ndarray:
        """Sorted indices ``(n,)`` int64 of the censored TRs of one run (the ROI store records them:
        :func:`brainfm.data.stores.roi.write_censored_trs`); none here."""
        return np.empty(0, dtype=np.int64)

    def subjects(self) -> list[str]:
        """The unique subject ids, sorted (the datasets' subject index order)."""
        return sorted(set(self.subject_ids))

    def describe_run(self, run: int) -> str:  # pragma: no cover - every store overrides it
        return f"run {run} of {self.location}"

    def read(self, run: int, start: int = 0, stop: int | None = None, stride: int = 1,
             out: np.ndarray | None = None) -> np.ndarray:  # pragma: no cover - every store overrides it
        raise NotImplementedError


def ensure_out(out: np.ndarray | None, shape: tuple[int, ...], dtype, where: str) -> np.ndarray:
    """``out`` checked to be a C-contiguous array of ``shape`` and ``dtype``, or a new one.

    Raises:
        ValueError: an ``out`` of another shape, dtype or layout.
    """
    if out is None:
        return np.empty(shape, dtype=dtype)
    if tuple(out.shape) != tuple(shape) or out.dtype != np.dtype(dtype) or not out.flags.c_contiguous:
        raise ValueError(f"{where}: out must be a C-contiguous {np.dtype(dtype)} array of shape {tuple(shape)}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    return out
