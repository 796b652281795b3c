"""Windows of ROI time series: the dataset."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from brainfm.data.normalization import ROINormalizer
from brainfm.data.stores.roi import ROIStore
from brainfm.data.windows import WindowRequest
from brainfm.errors import ConfigError


class ROIWindowDataset(Dataset):
    """Windows of z-scored ROI time series.

    Indexing with an ``int`` returns grid window ``i`` (length ``length``, stride ``stride``).
    Indexing with a :data:`WindowRequest` ``(i, L)`` returns the first ``L <= length`` TRs of
    grid window ``i``; ``(i, L, seed)`` adds a second view (``bold2``, ``t2``, ``onset2``): ``L``
    TRs of the same run segment that do not overlap the first (when the segment allows), placed
    at random by ``seed``. Pairs of one run are the positives of contrastive objectives.

    Args:
        store: the ROI store.
        normalizer: fitted z-scoring statistics.
        segments: ``(run, start, stop)`` TR ranges windows are taken from.
        length: window length in TRs.
        stride: grid stride in TRs (default: ``length``, non-overlapping).
        subject_index: subject id -> integer label (default: sorted unique ids of the store).

    Returns (per item) a dict: ``bold`` ``(L, n_rois)`` float32 (z-scored BOLD), ``t`` ``(L,)``
    float32 seconds from the window onset, ``onset`` float seconds from the run start,
    ``subject`` int, ``run`` int (row in the store).

    Raises:
        ConfigError: no segment is long enough for one window.
    """

    def __init__(
        self,
        store: ROIStore,
        normalizer: ROINormalizer,
        segments: Sequence[tuple[int, int, int]],
        length: int,
        stride: int | None = None,
        subject_index: dict[str, int] | None = None,
    ) -> None:
        self.store = store
        self.normalizer = normalizer
        self.length = int(length)
        self.stride = int(stride or length)
        if self.length < 2 or self.stride < 1:
            raise ConfigError(f"window length {length} and stride {stride} must be >= 2 and >= 1 TRs")
        self.tr = float(store.tr)
        self.subject_index = subject_index or {s: i for i, s in enumerate(sorted(set(store.subject_ids)))}
        seg_of, starts = [], []
        self.segments = [tuple(int(v) for v in s) for s in segments]
        for k, (_, start, stop) in enumerate(self.segments):
            grid = np.arange(start, stop - self.length + 1, self.stride)
            seg_of.append(np.full(len(grid), k))
            starts.append(grid)
        self._seg_of = np.concatenate(seg_of) if seg_of else np.zeros(0, dtype=int)
        self._starts = np.concatenate(starts) if starts else np.zeros(0, dtype=int)
        if len(self._starts) == 0:
            longest = max((stop - start for _, start, stop in self.segments), default=0)
            raise ConfigError(
                f"window length {self.length} TRs is longer than every segment of {store.path} "
                f"(longest: {longest} TRs); lower data.window.length"
            )

    def __len__(self) -> int:
        return len(self._starts)

    def window(self, i: int) -> tuple[int, int]:
        """``(run, start TR)`` of grid window ``i``."""
        return self.segments[self._seg_of[i]][0], int(self._starts[i])

    def _sample(self, run: int, start: int, length: int) -> dict:
        x = self.store.read(run, start, start + length)
        x = self.normalizer.apply(run, x)
        return {
            "bold": torch.from_numpy(np.ascontiguousarray(x.T)),
            "t": torch.arange(length, dtype=torch.float32) * self.tr,
            "onset": start * self.tr,
            "subject": self.subject_index[self.store.subject_ids[run]],
            "run": run,
        }

    def _partner_start(self, i: int, start: int, length: int, seed: int) -> int:
        """A start of ``length`` TRs in window ``i``'s segment, not overlapping ``start``."""
        _, lo, hi = self.segments[self._seg_of[i]]
        last = hi - length
        before = np.arange(lo, max(lo, start - length + 1))
        after = np.arange(min(last + 1, start + length), last + 1)
        choices = np.concatenate([before, after])
        if len(choices) == 0:  # segment shorter than two windows: any other start
            choices = np.setdiff1d(np.arange(lo, last + 1), [start]) if last > lo else np.array([start])
        return int(np.random.default_rng(seed).choice(choices))

    def __getitem__(self, item: int | WindowRequest) -> dict:
        if isinstance(item, tuple):
            i, length, *pair = item
            run, start = self.window(int(i))
            length = min(int(length), self.length)
            sample = self._sample(run, start, length)
            if pair:
                other = self._sample(run, self._partner_start(int(i), start, length, pair[0]), length)
                sample.update(bold2=other["bold"], t2=other["t"], onset2=other["onset"])
            return sample
        run, start = self.window(int(item))
        return self._sample(run, start, self.length)


