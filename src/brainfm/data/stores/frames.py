"""The SwiFT/TFF/R2T frame layout: one ``torch.save``-d tensor per TR, read as is or converted.

Layout (Transconnectome/SwiFT ``preprocessing.py`` and ``datasets.py``)::

    <root>/img/<subject>/frame_0.pt, frame_1.pt, ...   one TR each, float16, shape (X, Y, Z, 1)
                                                       (SwiFT saves the slices of torch.split(.., 1, 3);
                                                       (X, Y, Z) is accepted too), numbered from 0
    <root>/img/<subject>/voxel_mean.pt, voxel_std.pt   optional per-voxel statistics (TFF)

SwiFT's preprocessing z-scores each run over its non-zero voxels x TRs and fills the background
with the minimum (or 0), so the frames are already normalized; they carry no TR, no mask and no
affine. They are taken to be in FSL's LAS orientation, the one SwiFT's preprocessing of HCP/UKB/ABCD
(FSL outputs) keeps (:mod:`brainfm.data.orientation`). SwiFT's dataset counts a subject's frames as
``len(os.listdir(folder)) - 2``, assuming the two statistics files exist; its own preprocessing does not
write them, so the last 2 TRs of every subject are silently dropped. :class:`FrameStore` counts the
``frame_<t>.pt`` files themselves and checks that they are numbered 0..T-1 without gaps.

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

from brainfm.data.orientation import FRAMES_ORIENTATION
from brainfm.data.stores.base import LRUCache, StoreBase, cache_sizes, ensure_out
from brainfm.data.stores.index import read_index, write_index
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


class FrameStore(StoreBase):
    """Reader of ``img/<subject>/frame_<t>.pt`` folders, one run per subject folder (the store
    interface of :mod:`brainfm.data.stores.base`).

    Opening lists each subject folder to count its frames, unless the folder has a run index
    (``<img>/index.parquet``, written by ``brainfm-data index <folder> --tr S``: one row per subject
    with its frame count, frame shape and whether it has per-voxel statistics), which is read instead.

    Args:
        root: the data set folder holding ``img/``, or the ``img`` folder itself.
        tr: repetition time in seconds (frames do not record it).
        subjects: subject folders to use (default: every folder with frames).
        normalization: what the frames hold (``global`` for SwiFT's default preprocessing).
        cache: ``data.cache`` sizes (``run_stats``: subjects whose frame-0 facts a process keeps).

    Attributes as every store: ``subject_ids``, ``run_ids`` (``"frames"``), ``lengths``, ``trs``,
    ``tr``, ``frame_shape`` / ``shape`` (X, Y, Z).

    Raises:
        DataError: no subject folder, a gap in the frame numbers (the missing files are named),
            an unreadable frame, frames of another shape.
    """

    kind = "frames"

    def __init__(self, root: str | os.PathLike, tr: float, subjects: Sequence[str] | None = None,
                 normalization: str = "global", cache: dict | None = None) -> None:
        root = Path(root)
        self.root = self.location = root / "img" if (root / "img").is_dir() else root
        if not self.root.is_dir():
            raise DataError(f"frame folder {self.root} does not exist (expected <root>/img/<subject>/frame_<t>.pt)")
        if tr is None or not float(tr) > 0:
            raise ConfigError(f"frame folders carry no TR: pass the repetition time in seconds (got {tr!r})")
        index = read_index(self.root, self.kind)
        if index is not None:
            keep = None if subjects is None else set(subjects)
            rows = [i for i, s in enumerate(index["subject"]) if keep is None or s in keep]
            if keep is not None and len(rows) != len(keep):
                missing = sorted(keep - {index["subject"][i] for i in rows})
                raise DataError(f"subject folder(s) {missing[:5]} are not in {self.root / 'index.parquet'}")
            self.subject_ids = [str(index["subject"][i]) for i in rows]
            self.lengths = np.asarray([index["n_frames"][i] for i in rows], dtype=np.int64)
            self.has_stats = [bool(index["has_stats"][i]) for i in rows]
            shapes = {tuple(int(v) for v in index["shape"][i]) for i in rows}
            if len(shapes) > 1:
                raise DataError(f"{self.root}: subjects have frames of different shapes {sorted(shapes)}")
            self.shape: tuple[int, int, int] = shapes.pop()  # type: ignore[assignment]
        else:
            self.subject_ids, self.has_stats = [], []
            lengths = []
            for name in (sorted(subjects) if subjects is not None else self._folders(self.root)):
                n, has_stats = self.count_frames(self.root / name, required=subjects is not None)
                if n:
                    self.subject_ids.append(name)
                    lengths.append(n)
                    self.has_stats.append(has_stats)
            self.lengths = np.array(lengths, dtype=np.int64)
        if not self.subject_ids:
            raise DataError(f"{self.root} holds no <subject>/frame_<t>.pt folders")
        self.run_ids = ["frames"] * len(self.subject_ids)
        self.trs = np.full(len(self.subject_ids), float(tr))
        self.normalization = normalization
        if index is None:
            self.shape = tuple(int(s) for s in self._frame(0, 0).shape)  # type: ignore[assignment]
        self.frame_shape = self.shape
        self._meta_cache = LRUCache(cache_sizes(cache)["run_stats"])

    @staticmethod
    def _folders(root: Path) -> list[str]:
        return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))

    @staticmethod
    def count_frames(folder: Path, required: bool = True) -> tuple[int, bool]:
        """``(frames, has per-voxel statistics)`` of one subject folder.

        Raises:
            DataError: a missing folder, no frames (when ``required``), a gap in the numbers.
        """
        if not folder.is_dir():
            raise DataError(f"subject folder {folder} does not exist")
        files = os.listdir(folder)
        idx = sorted(int(m.group(1)) for f in files if (m := FRAME.match(f)))
        if not idx:
            if required:
                raise DataError(f"{folder} holds no frame_<t>.pt files")
            return 0, False
        if idx != list(range(len(idx))):
            missing = sorted(set(range(idx[-1] + 1)) - set(idx))
            shown = ", ".join(f"frame_{t}.pt" for t in missing[:8]) + (" ..." if len(missing) > 8 else "")
            raise DataError(
                f"{folder}: frames must be numbered 0..T-1 without gaps; missing {shown} "
                f"({len(missing)} of {idx[-1] + 1}). Fix: convert this subject again"
            )
        return len(idx), all(s in files for s in STATS)

    @classmethod
    def build_index(cls, root: str | os.PathLike, tr: float) -> Path:
        """Write ``<img>/index.parquet`` (``brainfm-data index``): every subject folder's frame count."""
        store = cls(root, tr)
        rows = [{"subject": s, "run": "frames", "n_frames": int(n), "shape": list(store.shape), "has_stats": bool(h)}
                for s, n, h in zip(store.subject_ids, store.lengths, store.has_stats)]
        return write_index(store.root, rows, cls.kind)

    def validate(self) -> list[str]:
        """Every problem of the folders, for ``brainfm-data validate``: frame counts that differ from the
        index, gaps, and unreadable or mis-shaped first and last frames."""
        problems = []
        for i, subject in enumerate(self.subject_ids):
            try:
                n, _ = self.count_frames(self.path(i))
                if n != int(self.lengths[i]):
                    problems.append(f"{self.path(i)} holds {n} frames but the index says {int(self.lengths[i])}; run "
                                    f"`brainfm-data index {self.root} --tr {self.tr:g}`")
                self._frame(i, 0)
                self._frame(i, n - 1)
            except DataError as exc:
                problems.append(str(exc))
        return problems

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

    def read(self, run: int, start: int = 0, stop: int | None = None, stride: int = 1,
             out: np.ndarray | None = None) -> np.ndarray:
        """``(n, X, Y, Z)`` float16: frames ``start, start + stride, ... < stop`` (one ``torch.load`` each).

        Raises:
            IndexError: frames outside the subject's. DataError: an unreadable frame.
        """
        frames = self._frames(run, start, stop, stride)
        out = ensure_out(out, (len(frames), *self.shape), np.float16, self.describe_run(run))
        for k, t in enumerate(frames):
            out[k] = self._frame(run, t)
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
        """Normalization and brain min/max (from frame 0: the background voxel [0, 0, 0], SwiFT's
        own convention, and the extremes of the first frame's other voxels; read on first use)."""
        def load() -> dict:
            f0 = self._frame(i, 0).astype(np.float32)
            bg = float(f0.flat[0])
            brain = f0[f0 != bg]
            lo = float(brain.min()) if brain.size else bg
            return {"normalization": self.normalization, "fill": "zero" if bg == 0 else "min", "fill_value": bg,
                    "min": lo, "max": float(brain.max()) if brain.size else bg, "tr": float(self.trs[i]),
                    "crop_pad": None}

        return self._meta_cache.get(i, load)

    def column(self, name: str) -> list:
        """Per-subject facts as the volume store's index columns: ``normalization`` (as given), ``orientation``
        and ``source_orientation`` (``LAS``: SwiFT's frames carry no affine and are taken to be in FSL's
        orientation, :data:`brainfm.data.orientation.FRAMES_ORIENTATION`), and ``fill``, ``fill_value``, ``min``,
        ``max`` from each subject's frame 0 (read on first use)."""
        if name == "normalization":
            return [self.normalization] * len(self)
        if name in ("orientation", "source_orientation"):
            return [FRAMES_ORIENTATION] * len(self)
        return [self.meta(i)[name] for i in range(len(self))]

    def crop_pads(self) -> list:
        return [None] * len(self)

    def run_stats(self, run: int) -> dict:
        """``n`` (frames) and :meth:`meta`'s normalization, fill and brain min/max (frame 0 is read)."""
        return {"n": int(self.lengths[run]), **self.meta(run)}

    def __repr__(self) -> str:
        return f"FrameStore({self.root}, subjects={len(self.subject_ids)}, shape={self.shape}, tr={self.tr:g}s)"
