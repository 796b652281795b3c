"""A store restricted to some runs, with other subject ids and a crop/pad applied at read time."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence

import numpy as np

from brainfm.data.stores.volume import CropPad, VolumeStore
from brainfm.errors import DataError

log = logging.getLogger(__name__)

LAYOUTS = ("volumes", "frames")
_TABLE_KEYS = {"file", "id_column", "columns", "categories"}


def _show(patterns: Sequence[re.Pattern]) -> str:
    return "[" + ", ".join(rx.pattern for rx in patterns) + "]"


# -- a store restricted to the recipe's runs, with canonical subject ids and crop/pad --------------------
class RecipeStoreView:
    """A :class:`~brainfm.data.stores.volume.VolumeStore` or :class:`~brainfm.data.stores.frames.FrameStore`
    restricted to some runs, with the data set's subject ids and (for frames) SwiFT's crop/pad to the
    model grid applied at read time. It has the reader interface the clip datasets use.

    Args:
        base: the store. runs: indices of the runs kept (base order). subject_ids: canonical subject
            id of each kept run. crop_pad: applied to every read (None: the base grid).

    ``read_clip`` returns ``(length, X, Y, Z)`` float16 on the output grid; padding takes the clip's
    background value (its first voxel, as SwiFT's ``y.flatten()[0]``); ``mask`` pads with False;
    ``voxel_stats`` pads the mean with the run's background value and the standard deviation with 0.
    """

    def __init__(self, base, runs: Sequence[int], subject_ids: Sequence[str], crop_pad: CropPad | None = None) -> None:
        if len(runs) != len(subject_ids):
            raise ValueError("one subject id per kept run")
        self.base = base
        self.index = np.asarray(runs, dtype=np.int64)
        self.subject_ids = [str(s) for s in subject_ids]
        self.source_subject_ids = [base.subject_ids[int(i)] for i in self.index]
        self.run_ids = [base.run_ids[int(i)] for i in self.index]
        self.lengths = np.asarray(base.lengths, dtype=np.int64)[self.index]
        self.trs = np.asarray(base.trs, dtype=np.float64)[self.index]
        self.tr = float(self.trs[0]) if len(self.trs) and np.allclose(self.trs, self.trs[0], atol=1e-6) else None
        self.root = getattr(base, "root", None)
        self.crop_pad = None if crop_pad is None or crop_pad.is_identity else crop_pad
        in_shape = getattr(base, "shape", None)
        if self.crop_pad is not None and in_shape is None:
            raise DataError(f"{self.root} mixes grids; a crop/pad needs one input grid")
        self.in_shape = None if in_shape is None else tuple(int(s) for s in in_shape)
        self.shape = self.in_shape if self.crop_pad is None else self.crop_pad.output_shape(self.in_shape)
        self._slices = None if self.crop_pad is None else self.crop_pad.slices(self.in_shape)
        self.frames = not isinstance(base, VolumeStore)

    def __len__(self) -> int:
        return len(self.index)

    def _j(self, i: int) -> int:
        return int(self.index[i])

    @property
    def runs(self) -> list:
        base_runs = getattr(self.base, "runs", None)
        return [] if base_runs is None else [base_runs[self._j(i)] for i in range(len(self))]

    def describe_run(self, i: int) -> str:
        return self.base.describe_run(self._j(i))

    def meta(self, i: int):
        """The run's ``meta.json`` (stores). For frame folders, whose facts need a frame read, a lazy
        mapping: ``normalisation``, ``tr``, ``crop_pad``, ``shape`` without reading; ``min``, ``max`` and
        ``fill_value`` (frame 0) on first access."""
        j = self._j(i)
        if not self.frames:
            return self.base.meta(j)
        cheap = {"normalisation": self.base.normalisation, "fill": "first voxel of each clip (SwiFT)",
                 "tr": float(self.trs[i]), "shape": list(self.shape), "original_shape": list(self.in_shape),
                 "crop_pad": None if self.crop_pad is None else self.crop_pad.as_list(),
                 "source": str(self.base.path(j))}
        return _LazyMeta(cheap, lambda: self.base.meta(j))

    def _place(self, src: np.ndarray, out: np.ndarray, fill: float) -> np.ndarray:
        region_in, region_out = self._slices
        lead = (slice(None),) * (src.ndim - 3)
        out[...] = fill
        out[(*lead, *region_out)] = src[(*lead, *region_in)]
        return out

    def read_clip(self, i: int, start: int, length: int, stride: int = 1, out: np.ndarray | None = None) -> np.ndarray:
        """``(length, X, Y, Z)`` float16 of run ``i`` (see the class docstring). Raises as the base."""
        j = self._j(i)
        if self.crop_pad is None:
            return self.base.read_clip(j, start, length, stride, out=out)
        raw = self.base.read_clip(j, start, length, stride)
        if out is None:
            out = np.empty((length, *self.shape), dtype=np.float16)
        return self._place(raw, out, float(raw.flat[0]))  # SwiFT: pad with y.flatten()[0]

    def mask(self, i: int):
        m = self.base.mask(self._j(i))
        if m is None or self.crop_pad is None:
            return m
        return self._place(np.asarray(m), np.zeros(self.shape, dtype=bool), False)

    def voxel_stats(self, i: int):
        j = self._j(i)
        stats = self.base.voxel_stats(j)
        if stats is None or self.crop_pad is None:
            return stats
        fill = float(self.base.meta(j).get("fill_value") or 0.0)
        mean = self._place(np.asarray(stats[0], dtype=np.float32), np.empty(self.shape, np.float32), fill)
        std = self._place(np.asarray(stats[1], dtype=np.float32), np.empty(self.shape, np.float32), 0.0)
        return mean, std

    def __repr__(self) -> str:
        return (f"RecipeStoreView({self.base!r}, runs={len(self)}, subjects={len(set(self.subject_ids))}, "
                f"shape={self.shape}, crop_pad={None if self.crop_pad is None else self.crop_pad.as_list()})")


class _LazyMeta(Mapping):
    """A run's facts: ``cheap`` ones at once, the others from ``load()`` on first access."""

    def __init__(self, cheap: dict, load) -> None:
        self._cheap, self._load, self._full = cheap, load, None

    def _all(self) -> dict:
        if self._full is None:
            self._full = {**self._load(), **self._cheap}
        return self._full

    def __getitem__(self, key):
        if key in self._cheap:
            return self._cheap[key]
        return self._all()[key]

    def __iter__(self):
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


