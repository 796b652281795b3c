"""The SwiFT/TFF/R2T frame layout: one ``torch.save``-d tensor per TR, read as is or converted.

Layout (Transconnectome/SwiFT ``preprocessing.py`` and ``datasets.py``)::

    <root>/img/<subject>/frame_0.pt, frame_1.pt, ...   one TR each, float16, shape (X, Y, Z, 1)
                                                       (SwiFT saves the slices of torch.split(.., 1, 3);
                                                       (X, Y, Z) is accepted too), numbered from 0
    <root>/img/<subject>/voxel_mean.pt, voxel_std.pt   optional per-voxel statistics (TFF)

SwiFT's preprocessing z-scores each run over its non-zero voxels x TRs and fills the background
with the minimum (or 0), so the frames are already normalised; they carry no TR, no mask and no
affine. SwiFT's dataset counts a subject's frames as ``len(os.listdir(folder)) - 2``, assuming the
two statistics files exist; its own preprocessing does not write them, so the last 2 TRs of every
subject are silently dropped. :class:`FrameStore` counts the ``frame_<t>.pt`` files themselves and
checks that they are numbered 0..T-1 without gaps.

Reading a clip costs one ``torch.load`` per TR (20-40 file opens per sample);
:func:`convert_frames` writes the same data as a volume store (one contiguous array per run, see
:mod:`brainfm.data.stores.volume`), which reads more than 10x faster (``scripts/bench_volume_loader.py``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from brainfm.errors import ConfigError, DataError

FRAME = re.compile(r"^frame_(\d+)\.pt$")
STATS = ("voxel_mean.pt", "voxel_std.pt")


def _load(path: Path):
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle errors, ...
        raise DataError(f"{path} cannot be loaded with torch.load ({type(exc).__name__}: {exc}); "
                        "the file is truncated or not a tensor: convert this subject again") from exc


class FrameStore:
    """Reader of ``img/<subject>/frame_<t>.pt`` folders with the interface of
    :class:`~brainfm.data.stores.volume.VolumeStore` (one run per subject folder).

    Args:
        root: the data set folder holding ``img/``, or the ``img`` folder itself.
        tr: repetition time in seconds (frames do not record it).
        subjects: subject folders to use (default: every folder with frames).
        normalisation: what the frames hold (``global`` for SwiFT's default preprocessing).

    Attributes as ``VolumeStore``: ``subject_ids``, ``run_ids`` (``"frames"``), ``lengths``,
    ``trs``, ``tr``, ``shape`` (X, Y, Z).

    Raises:
        DataError: no subject folder, a gap in the frame numbers (the missing files are named),
            an unreadable frame, frames of another shape.
    """

    def __init__(self, root: str | os.PathLike, tr: float, subjects: Sequence[str] | None = None,
                 normalisation: str = "global") -> None:
        root = Path(root)
        self.root = root / "img" if (root / "img").is_dir() else root
        if not self.root.is_dir():
            raise DataError(f"frame folder {self.root} does not exist (expected <root>/img/<subject>/frame_<t>.pt)")
        if tr is None or not float(tr) > 0:
            raise ConfigError(f"frame folders carry no TR: pass the repetition time in seconds (got {tr!r})")
        names = sorted(subjects) if subjects is not None else sorted(
            e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        self.subject_ids, self.lengths_list, self.has_stats = [], [], []
        for name in names:
            folder = self.root / name
            if not folder.is_dir():
                raise DataError(f"subject folder {folder} does not exist")
            files = os.listdir(folder)
            idx = sorted(int(m.group(1)) for f in files if (m := FRAME.match(f)))
            if not idx:
                if subjects is not None:
                    raise DataError(f"{folder} holds no frame_<t>.pt files")
                continue
            if idx != list(range(len(idx))):
                missing = sorted(set(range(idx[-1] + 1)) - set(idx))
                shown = ", ".join(f"frame_{t}.pt" for t in missing[:8]) + (" ..." if len(missing) > 8 else "")
                raise DataError(
                    f"{folder}: frames must be numbered 0..T-1 without gaps; missing {shown} "
                    f"({len(missing)} of {idx[-1] + 1}). Fix: convert this subject again"
                )
            self.subject_ids.append(name)
            self.lengths_list.append(len(idx))
            self.has_stats.append(all(s in files for s in STATS))
        if not self.subject_ids:
            raise DataError(f"{self.root} holds no <subject>/frame_<t>.pt folders")
        self.run_ids = ["frames"] * len(self.subject_ids)
        self.lengths = np.array(self.lengths_list, dtype=np.int64)
        self.trs = np.full(len(self.subject_ids), float(tr))
        self.tr = float(tr)
        self.normalisation = normalisation
        first = self._frame(0, 0)
        self.shape: tuple[int, int, int] = tuple(int(s) for s in first.shape)
        self._meta_cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.subject_ids)

    def path(self, i: int) -> Path:
        return self.root / self.subject_ids[i]

    def describe_run(self, i: int) -> str:
        return f"subject {self.subject_ids[i]} ({self.path(i)})"

    def _frame(self, i: int, t: int) -> np.ndarray:
        path = self.path(i) / f"frame_{t}.pt"
        x = _load(path)
        arr = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
        if arr.ndim == 4 and arr.shape[3] == 1:
            arr = arr[..., 0]
        if arr.ndim != 3:
            raise DataError(f"{path} holds shape {tuple(arr.shape)}; a frame is (X, Y, Z) or (X, Y, Z, 1)")
        shape = getattr(self, "shape", None)
        if shape is not None and tuple(arr.shape) != shape:
            raise DataError(f"{path} has shape {tuple(arr.shape)}, other frames {shape}; convert this subject again")
        return arr

    def read_clip(self, i: int, start: int, length: int, stride: int = 1, out: np.ndarray | None = None) -> np.ndarray:
        """``(length, X, Y, Z)`` float16: ``length`` frames from ``start`` every ``stride`` (one
        ``torch.load`` each).

        Raises:
            IndexError: a clip outside the subject's frames. DataError: an unreadable frame.
        """
        n = int(self.lengths[i])
        last = start + (length - 1) * stride
        if length < 1 or stride < 1 or start < 0 or last >= n:
            raise IndexError(f"clip of {length} TRs from TR {start} every {stride} is outside "
                             f"{self.describe_run(i)} ({n} frames)")
        if out is None:
            out = np.empty((length, *self.shape), dtype=np.float16)
        for k in range(length):
            out[k] = self._frame(i, start + k * stride)
        return out

    def mask(self, i: int) -> None:
        """Frame folders hold no brain mask."""
        return None

    def voxel_stats(self, i: int) -> tuple[np.ndarray, np.ndarray] | None:
        """``voxel_mean.pt``/``voxel_std.pt`` as ``(X, Y, Z)`` float32, or None when absent."""
        if not self.has_stats[i]:
            return None
        out = []
        for name in STATS:
            a = _load(self.path(i) / name)
            a = (a.numpy() if hasattr(a, "numpy") else np.asarray(a)).astype(np.float32)
            out.append(a.reshape(self.shape))
        return out[0], out[1]

    def meta(self, i: int) -> dict:
        """Normalisation and brain min/max (from frame 0: the background voxel [0, 0, 0], SwiFT's
        own convention, and the extremes of the first frame's other voxels)."""
        m = self._meta_cache.get(i)
        if m is None:
            f0 = self._frame(i, 0).astype(np.float32)
            bg = float(f0.flat[0])
            brain = f0[f0 != bg]
            lo = float(brain.min()) if brain.size else bg
            m = {"normalisation": self.normalisation, "fill": "zero" if bg == 0 else "min", "fill_value": bg,
                 "min": lo, "max": float(brain.max()) if brain.size else bg, "tr": self.tr, "crop_pad": None}
            self._meta_cache[i] = m
        return m

    def __repr__(self) -> str:
        return f"FrameStore({self.root}, subjects={len(self.subject_ids)}, shape={self.shape}, tr={self.tr:g}s)"


