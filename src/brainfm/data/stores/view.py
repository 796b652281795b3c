"""A store restricted to some runs, with other subject ids and a crop/pad applied at read time.

Data set recipes (:mod:`brainfm.data.datamodules.recipes`) keep the runs of their subjects, name
them by the data set's own subject id (the UKB eid, the ABCD subject key) and, for SwiFT frame
folders, apply SwiFT's crop/pad to the model grid when a clip is read. A :class:`StoreView` is
itself a store (:mod:`brainfm.data.stores.base`), so datasets read it as any other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from brainfm.data.stores.base import StoreBase, ensure_out
from brainfm.data.stores.volume import CropPad
from brainfm.errors import DataError


class StoreView(StoreBase):
    """Runs ``runs`` of store ``base``, with ``subject_ids`` as their subjects and ``crop_pad`` applied.

    Args:
        base: the store (a volume store or frame folders for a crop/pad; any store otherwise).
        runs: indices of the runs kept (base order). subject_ids: subject id of each kept run.
        crop_pad: applied to every read of a volume store (None: the base grid).

    ``read`` returns ``(n, X, Y, Z)`` on the output grid; padding takes the clip's background value
    (its first voxel, as SwiFT's ``y.flatten()[0]``); ``mask`` pads with False; ``voxel_stats`` pads the
    mean with the run's background value and the standard deviation with 0.

    Raises:
        DataError: a crop/pad of a store that mixes grids. ValueError: one subject id per run is needed.
    """

    def __init__(self, base, runs: Sequence[int], subject_ids: Sequence[str], crop_pad: CropPad | None = None) -> None:
        if len(runs) != len(subject_ids):
            raise ValueError("one subject id per kept run")
        self.base = base
        self.kind = base.kind  # a view reads as the store it restricts
        self.index = np.asarray(runs, dtype=np.int64)
        self.subject_ids = [str(s) for s in subject_ids]
        self.source_subject_ids = [base.subject_ids[int(i)] for i in self.index]
        self.run_ids = [base.run_ids[int(i)] for i in self.index]
        self.lengths = np.asarray(base.lengths, dtype=np.int64)[self.index]
        self.trs = np.asarray(base.trs, dtype=np.float64)[self.index]
        self.location = self.root = base.location
        self.crop_pad = None if crop_pad is None or crop_pad.is_identity else crop_pad
        in_shape = base.frame_shape
        if self.crop_pad is not None and in_shape is None:
            raise DataError(f"{self.root} mixes grids; a crop/pad needs one input grid")
        self.in_shape = None if in_shape is None else tuple(int(s) for s in in_shape)
        self.frame_shape = self.in_shape if self.crop_pad is None else self.crop_pad.output_shape(self.in_shape)
        self.shape = self.frame_shape
        base_shapes = getattr(base, "shapes", None)
        self.shapes = (np.asarray(base_shapes)[self.index] if self.crop_pad is None and base_shapes is not None
                       else np.tile(np.asarray(self.frame_shape or (), dtype=np.int64), (len(self.index), 1)))
        self._slices = None if self.crop_pad is None else self.crop_pad.slices(self.in_shape)

    def _j(self, i: int) -> int:
        return int(self.index[i])

    def describe_run(self, i: int) -> str:
        base = self.base.describe_run(self._j(i))
        if self.subject_ids[i] == self.source_subject_ids[i]:
            return base
        return f"subject {self.subject_ids[i]} ({base})"

    def meta(self, i: int) -> Mapping[str, Any]:
        """The base run's metadata, with this view's grid and crop/pad."""
        m = dict(self.base.meta(self._j(i)))
        if self.crop_pad is not None:
            m.update(shape=list(self.frame_shape), original_shape=list(self.in_shape), crop_pad=self.crop_pad.as_list())
        return m

    def run_stats(self, i: int) -> Mapping[str, Any]:
        return self.base.run_stats(self._j(i))

    @property
    def has_censoring(self) -> bool:
        return bool(getattr(self.base, "has_censoring", False))

    def censored_trs(self, i: int) -> np.ndarray:
        return self.base.censored_trs(self._j(i))

    def column(self, name: str) -> list:
        """An index column of the base store, for the kept runs."""
        values = self.base.column(name)
        return [values[j] for j in self.index.tolist()]

    def crop_pads(self) -> list:
        if self.crop_pad is not None:
            return [self.crop_pad.as_list()] * len(self)
        base = self.base.crop_pads() if hasattr(self.base, "crop_pads") else [None] * len(self.base)
        return [base[j] for j in self.index.tolist()]

    def _place(self, src: np.ndarray, out: np.ndarray, fill: float) -> np.ndarray:
        region_in, region_out = self._slices
        lead = (slice(None),) * (src.ndim - 3)
        out[...] = fill
        out[(*lead, *region_out)] = src[(*lead, *region_in)]
        return out

    def read(self, run: int, start: int = 0, stop: int | None = None, stride: int = 1,
             out: np.ndarray | None = None) -> np.ndarray:
        """The base run's TRs (as the base's ``read``), cropped/padded to this view's grid."""
        self._frames(run, start, stop, stride)  # range errors in this view's numbering
        j = self._j(run)
        if self.crop_pad is None:
            return self.base.read(j, start, stop, stride, out=out)
        raw = self.base.read(j, start, stop, stride)
        out = ensure_out(out, (len(raw), *self.frame_shape), raw.dtype, self.describe_run(run))
        return self._place(raw, out, float(raw.flat[0]))  # SwiFT: pad with y.flatten()[0]

    def mask(self, i: int):
        m = self.base.mask(self._j(i))
        if m is None or self.crop_pad is None:
            return m
        return self._place(np.asarray(m), np.zeros(self.frame_shape, dtype=bool), False)

    def voxel_stats(self, i: int):
        j = self._j(i)
        stats = self.base.voxel_stats(j)
        if stats is None or self.crop_pad is None:
            return stats
        fill = float(self.base.meta(j).get("fill_value") or 0.0)
        mean = self._place(np.asarray(stats[0], dtype=np.float32), np.empty(self.frame_shape, np.float32), fill)
        std = self._place(np.asarray(stats[1], dtype=np.float32), np.empty(self.frame_shape, np.float32), 0.0)
        return mean, std

    def __repr__(self) -> str:
        return (f"StoreView({self.base!r}, runs={len(self)}, subjects={len(set(self.subject_ids))}, "
                f"shape={self.frame_shape}, crop_pad={None if self.crop_pad is None else self.crop_pad.as_list()})")
