"""Windows of ROI time series: the dataset."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from brainfm.data.normalization import ROINormalizer
from brainfm.data.windows import WindowDataset, WindowRequest
from brainfm.errors import ConfigError


class ROIWindowDataset(WindowDataset):
    """Windows of z-scored ROI time series.

    Indexing with an ``int`` returns grid window ``i`` (length ``length``, stride ``stride``).
    Indexing with a :data:`WindowRequest` ``(i, L)`` returns the first ``L <= length`` TRs of
    grid window ``i``; ``(i, L, seed)`` adds a second view (``bold2``, ``t2``, ``onset2``): ``L``
    TRs of the same run segment that do not overlap the first (when the segment allows), placed
    at random by ``seed``. Pairs of one run are the positives of contrastive objectives.

    Args:
        store: the ROI store (or any store whose frames are feature vectors: grayordinates).
        normalizer: fitted z-scoring statistics.
        segments: ``(run, start, stop)`` TR ranges windows are taken from.
        length: window length in TRs.
        stride: grid stride in TRs (default: ``length``, non-overlapping).
        subject_index: subject id -> integer label (default: sorted unique ids of the store).
        segment_labels: optional class index of each segment (decoding: the segments are labelled
            blocks, :func:`brainfm.data.trial_labels.labelled_blocks`); items then carry ``trial_label``,
            a 0-d int64 tensor (batches: ``(B,)`` int64).

    Returns (per item) a dict: ``bold`` ``(L, n_rois)`` float32 (z-scored BOLD), ``t`` ``(L,)``
    float32 seconds from the window onset, ``onset`` float seconds from the run start,
    ``subject`` int, ``run`` int (row in the store), ``window`` int (grid window index); from a
    store of several atlases (``data.atlas=[...]``) also ``roi_mask`` ``(n_rois,)`` bool (False: the
    ROI's atlas is not in the file and was read as zeros; batches ``(B, n_rois)``).

    Raises:
        ConfigError: no segment is long enough for one window.
    """

    def __init__(
        self,
        store,
        normalizer: ROINormalizer,
        segments: Sequence[tuple[int, int, int]],
        length: int,
        stride: int | None = None,
        subject_index: dict[str, int] | None = None,
        segment_labels: Sequence[int] | None = None,
    ) -> None:
        self.store = store
        self.normalizer = normalizer
        self.length = int(length)
        self.stride = int(stride or length)
        if self.length < 2 or self.stride < 1:
            raise ConfigError(f"window length {length} and stride {stride} must be >= 2 and >= 1 TRs")
        self.tr = float(store.tr)
        self._index_windows(store, segments, self.length, self.stride, subject_index,
                            f"a window of {self.length} TRs", "data.window.length")
        self.segment_labels = None if segment_labels is None else np.asarray(segment_labels, dtype=np.int64)
        if self.segment_labels is not None:
            if len(self.segment_labels) != len(segments):
                raise ConfigError(f"{len(self.segment_labels)} segment labels for {len(segments)} segments")
            self.segment_labels = self.segment_labels[self.segment_origin]  # segments cut around censored TRs

    def _label(self, sample: dict, i: int) -> dict:
        if self.segment_labels is not None:
            sample["trial_label"] = torch.tensor(int(self.segment_labels[self.index.segment_of(i)]))
        return sample

    def _sample(self, run: int, start: int, length: int) -> dict:
        x = self.store.read(run, start, start + length)
        if not np.isfinite(x).all():  # stores written by brainfm refuse NaN; foreign files are checked here
            self.store.check_finite(run)
        x = self.normalizer.apply(run, x)
        sample = {
            "bold": torch.from_numpy(np.ascontiguousarray(x)),
            "t": torch.arange(length, dtype=torch.float32) * self.tr,
            "onset": start * self.tr,
            "subject": self.subject_index[self.store.subject_ids[run]],
            "run": run,
        }
        roi_mask = getattr(self.store, "roi_mask", None)  # several atlases read as one (stores.roi): which were read
        if roi_mask is not None:
            sample["roi_mask"] = torch.from_numpy(roi_mask)
        return sample

    def __getitem__(self, item: int | WindowRequest) -> dict:
        if isinstance(item, tuple):
            i, length, *pair = item
            run, start = self.window(int(i))
            length = min(int(length), self.length)
            sample = self._sample(run, start, length)
            if pair:
                other = self._sample(run, self.index.partner_start(int(i), start, length, pair[0]), length)
                sample.update(bold2=other["bold"], t2=other["t"], onset2=other["onset"])
            sample["window"] = int(i)
            return self._label(sample, int(i))
        run, start = self.window(int(item))
        return self._label({**self._sample(run, start, self.length), "window": int(item)}, int(item))
