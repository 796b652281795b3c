"""Clips of 4-D fMRI volumes: dataset, reusable shared-memory batches, loader and datamodule.

A clip is ``length`` TRs of one subject run, taken every ``stride`` TRs; it spans
``(length - 1) * stride + 1`` TRs. Grid clips start every ``clip_stride`` TRs (default
``length * stride``: non-overlapping, as SwiFT's default). Samples are in SwiFT's layout
``(C, H, W, D, T)``: ``volume`` is ``(C=1, X, Y, Z, T)`` float16 (the model casts).

Differences from SwiFT (Transconnectome/SwiFT ``datasets.py``), on purpose:

- SwiFT stores its step between clip starts in the slot it later reads as the clip duration, so
  ``stride_between_seq != 1`` changes the clip *length*; here length, frame stride and clip
  stride are independent.
- SwiFT's last possible start is ``T - length * stride_within_seq`` (one clip too few when
  ``stride > 1``); here it is ``T - span``.
- SwiFT counts a subject's frames as "files in the folder minus 2" (for ``voxel_mean.pt`` and
  ``voxel_std.pt``), silently dropping the last 2 TRs when those files are absent; here the
  volume store records the TR count (and :mod:`brainfm.data.stores.frames` counts ``frame_<t>.pt``).
- SwiFT's second (contrastive) clip is drawn with the unseeded global NumPy generator and
  excludes one non-overlapping start; here it is a function of the request's seed, never
  overlaps, and stays in the same split segment.

Speed. A clip of a stored run is one contiguous byte range, copied from the memory map straight
into the batch tensor. Fresh memory costs more than the copy itself (every page is zeroed on its
first write: ~3x slower for 35 MB clips; fresh shared memory ~6x), so :class:`VolumeClipLoader`
keeps a small pool of batch buffers in shared memory: DataLoader workers write clips into a
buffer chosen by the main process, send back only the buffer's number, and the main process
hands out tensors that are views of it. A buffer is reused only when no tensor (or view, or
NumPy array) of a previous batch still references it (the storage's reference count) and its
batch is not among the last ``prefetch_factor * num_workers`` dispatched, so reuse never
overwrites a batch in use; when none is free the batch gets fresh memory as usual.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from brainfm.data.normalization import VolumeStatistics, run_source_map
from brainfm.data.stores.base import LRUCache
from brainfm.data.stores.frames import FrameStore
from brainfm.data.windows import WindowDataset, WindowRequest, collate_windows
from brainfm.errors import ConfigError, DataError

#: Load-time normalizations of the stored clip (the store's own one is ``stored``).
LOAD_NORMALIZATIONS = ("stored", "voxel", "minmax", "stored+voxel")
_ALIGN = 64


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


# -- requests and the buffer pool ---------------------------------------------------------------------
@dataclass(frozen=True)
class ClipBatchRequest:
    """A batch of clip requests as dispatched by :class:`PooledBatchSampler`.

    ``items``: :data:`~brainfm.data.windows.WindowRequest` tuples; ``slot``: pool buffer to write
    into (None: fresh memory); ``seed``: augmentation seed of the batch.
    """

    items: tuple
    slot: int | None
    seed: int


def _use_count(storage: torch.UntypedStorage) -> int:
    return int(torch._C._storage_Use_Count(storage._cdata))


class ClipBufferPool:
    """Reusable batch buffers (raw bytes), in shared memory when DataLoader workers write them.

    Owned by the main process. :meth:`acquire` returns a buffer no live tensor references and
    that none of the last ``in_flight`` dispatched batches uses, or None.

    Args:
        slot_bytes: bytes per buffer. n_slots: buffers. in_flight: batches a DataLoader may have
            dispatched but not yet returned (``prefetch_factor * num_workers``; 0 in-process).
        shared: allocate in shared memory (needed with workers).
    """

    def __init__(self, slot_bytes: int, n_slots: int, in_flight: int, shared: bool) -> None:
        self.slot_bytes, self.in_flight, self.shared = int(slot_bytes), int(in_flight), bool(shared)
        self.tensors: list[torch.Tensor] = []
        for _ in range(int(n_slots)):
            if shared:  # pages are committed on first write, so unused buffers cost nothing
                storage = torch.UntypedStorage._new_shared(self.slot_bytes)
                t = torch.empty(0, dtype=torch.uint8).set_(storage)
                del storage
            else:
                t = torch.empty(self.slot_bytes, dtype=torch.uint8)
            self.tensors.append(t)
        self._base = [_use_count(t.untyped_storage()) for t in self.tensors]
        self._history: list[int] = []
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.tensors)

    def acquire(self) -> int | None:
        recent = set(self._history[-self.in_flight:]) if self.in_flight > 0 else set()
        for k, t in enumerate(self.tensors):
            if k not in recent and _use_count(t.untyped_storage()) <= self._base[k]:
                self._history = (self._history + [k])[-max(self.in_flight, 1):]
                self.hits += 1
                return k
        self._history = (self._history + [-1])[-max(self.in_flight, 1):]
        self.misses += 1
        return None

    def __getstate__(self):  # workers need the buffers, not the bookkeeping of the main process
        return {"slot_bytes": self.slot_bytes, "in_flight": self.in_flight, "shared": self.shared,
                "tensors": self.tensors, "_base": [], "_history": [], "hits": 0, "misses": 0}


class PooledBatchSampler(Sampler[ClipBatchRequest]):
    """Wraps a batch sampler (e.g. :class:`~brainfm.data.windows.WindowBatchSampler`): each
    batch of requests becomes a :class:`ClipBatchRequest` with a pool buffer and a seed.

    ``set_epoch``, ``fast_forward``, ``epoch`` and ``len`` are those of the wrapped sampler, so
    resuming works as with ROI windows.
    """

    def __init__(self, batch_sampler, pool: ClipBufferPool | None = None, seed: int = 0) -> None:
        self.batch_sampler, self.pool, self.seed = batch_sampler, pool, int(seed)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    @property
    def epoch(self) -> int:
        return int(getattr(self.batch_sampler, "epoch", 0))

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)

    def fast_forward(self, epoch: int, batches: int) -> None:
        self.batch_sampler.fast_forward(epoch, batches)

    def __iter__(self) -> Iterator[ClipBatchRequest]:
        epoch = self.epoch
        for items in self.batch_sampler:
            first = items[0] if isinstance(items[0], tuple) else (items[0],)
            seed = int(np.random.SeedSequence([self.seed, epoch, *(int(v) % 2**63 for v in first)]).generate_state(1)[0])
            slot = self.pool.acquire() if self.pool is not None else None
            yield ClipBatchRequest(tuple(items), slot, seed)


# -- dataset -------------------------------------------------------------------------------------------
class VolumeClipDataset(WindowDataset):
    """Clips of a volume store (or of SwiFT frame folders, :class:`brainfm.data.stores.frames.FrameStore`).

    Indexing:

    - ``ds[i]``: grid clip ``i`` (``length`` TRs).
    - ``ds[(i, L)]``: its first ``L <= length`` TRs (random crop lengths of
      :class:`~brainfm.data.windows.WindowBatchSampler`).
    - ``ds[(i, L, seed)]``: plus a second clip of ``L`` TRs of the same run segment that does not
      overlap the first (when the segment allows), placed by ``seed``: ``volume2``, ``t2``,
      ``onset2`` (positives of contrastive objectives, e.g. SwiFT's and R2T-Net's NT-Xent).
    - ``ds.__getitems__(ClipBatchRequest)``: a whole batch, written into one buffer (the fast
      path of :class:`VolumeClipLoader`).

    Args:
        store: :class:`~brainfm.data.stores.volume.VolumeStore` or ``FrameStore``.
        segments: ``(run, first TR, stop TR)`` ranges clips are taken from (a split).
        length: TRs per clip. stride: TRs between a clip's frames.
        clip_stride: TRs between grid clip starts (default ``length * stride``: non-overlapping).
        normalization: at load time: ``stored`` (as written: SwiFT's global z-norm), ``voxel``
            (per-voxel z-norm over time from the stored statistics, TFF; 0 outside the brain),
            ``minmax`` (the run's brain [min, max] -> [0, 1]), ``stored+voxel`` (two channels, TFF).
        transform: callable on one clip ``(C * L, X, Y, Z)`` float32 (frames as channels, so
            MONAI's spatial transforms move every frame alike), e.g. from
            :func:`build_augmentation`; randomisable transforms are re-seeded per clip.
        return_mask: add ``brain_mask`` ``(X, Y, Z)`` bool (stores without masks: omitted).
        subject_index: subject id -> integer label (default: sorted unique ids).
        statistics: the statistics ``normalization`` uses: None (each run's own, ``data.normalization.statistics=
            store``), or a model's training statistics (:class:`~brainfm.data.normalization.VolumeStatistics`,
            ``statistics=checkpoint``): ``stored`` maps each run back to its source intensities (its recorded
            offset and scale) and z-scores them with the training runs' global mean and standard deviation
            (a ``zero`` background stays 0; a ``min`` one stays the brain minimum), ``voxel`` uses the training
            runs' per-voxel mean and standard deviation, ``minmax`` their brain minimum and maximum.

    Returns (per item) a dict: ``volume`` ``(C, X, Y, Z, L)`` float16 (a permuted view of a
    ``(C, L, X, Y, Z)`` buffer), ``t`` ``(L,)`` float32 seconds from the clip onset (frame ``k`` at
    ``k * stride * TR``), ``onset`` seconds of the first frame from the run start, ``subject`` int,
    ``run`` int (row in the store), ``window`` int (grid clip index), ``brain_mask``, and for pairs
    ``volume2``, ``t2``, ``onset2``.

    Raises:
        ConfigError: no segment long enough for one clip, bad strides or normalization; ``statistics`` without
            what ``normalization`` needs, or of another grid; (when a clip is read) a run whose source
            intensities are unknown (normalized upstream) with ``stored`` and training statistics.
    """

    def __init__(
        self,
        store,
        segments: Sequence[tuple[int, int, int]],
        length: int,
        stride: int = 1,
        clip_stride: int | None = None,
        normalization: str = "stored",
        transform=None,
        return_mask: bool = True,
        subject_index: dict[str, int] | None = None,
        statistics: VolumeStatistics | None = None,
    ) -> None:
        self.store = store
        self.length, self.stride = int(length), int(stride)
        if self.length < 1 or self.stride < 1:
            raise ConfigError(f"clip length {length} and stride {stride} must be >= 1")
        self.span = (self.length - 1) * self.stride + 1
        self.clip_stride = int(clip_stride or self.length * self.stride)
        if self.clip_stride < 1:
            raise ConfigError(f"clip_stride {clip_stride} must be >= 1 TR")
        if normalization not in LOAD_NORMALIZATIONS:
            raise ConfigError(f"data.normalization.load={normalization!r} is not one of {LOAD_NORMALIZATIONS}")
        self.normalization = normalization
        self.channels = 2 if normalization == "stored+voxel" else 1
        self.transform = transform
        if store.frame_shape is None:
            raise DataError(f"{store.location} mixes grids {sorted({tuple(r) for r in store.shapes.tolist()})}; "
                            "a clip dataset needs one grid. Fix: preprocess with one --target-shape")
        self.shape = tuple(int(s) for s in store.frame_shape)
        self.statistics = statistics
        if statistics is not None:
            self._check_statistics(statistics)
        self.return_mask = bool(return_mask) and store.mask(0) is not None
        self._index_windows(store, segments, self.span, self.clip_stride, subject_index,
                            f"a clip of {self.length} TRs every {self.stride} spans {self.span} TRs",
                            "data.window.length or data.window.frame_stride")
        self._stats = LRUCache(16)
        self._pool: ClipBufferPool | None = None

    def clip(self, i: int) -> tuple[int, int]:
        """``(run, start TR)`` of grid clip ``i`` (as :meth:`window`)."""
        return self.index.window(i)

    def _check_statistics(self, stats: VolumeStatistics) -> None:
        fix = "Fix: data.normalization.statistics=store (each run's own statistics, as the model was trained)"
        if self.normalization in ("voxel", "stored+voxel"):
            if stats.voxel_mean is None:
                raise ConfigError(f"the checkpoint's training statistics hold no per-voxel statistics (its training "
                                  f"loaded data.normalization.load other than voxel), but data.normalization.load="
                                  f"{self.normalization!r} with data.normalization.statistics=checkpoint needs "
                                  f"them. {fix}")
            if tuple(stats.voxel_mean.shape) != self.shape:
                raise ConfigError(f"the checkpoint's per-voxel statistics are on a {tuple(stats.voxel_mean.shape)} "
                                  f"grid but {self.store.location} holds {self.shape} volumes. {fix}")
        if self.normalization in ("stored", "stored+voxel") and stats.source_scaling() is None:
            raise ConfigError("the checkpoint does not know the source intensities of its training runs (normalized "
                              "before brainfm, e.g. SwiFT frames, or a mix of normalizations), so "
                              f"data.normalization.load={self.normalization!r} cannot use them. {fix}")
        if self.normalization == "minmax" and (stats.min is None or stats.max is None):
            raise ConfigError("the checkpoint's training statistics hold no brain minimum/maximum (its training loaded "
                              f"data.normalization.load other than minmax). {fix}")

    # -- reading one clip into a buffer ----------------------------------------------------------
    def _voxel_stats(self, run: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-voxel mean and inverse standard deviation (float32) of a run, or of the training runs with
        ``statistics`` (a small LRU)."""
        if self.statistics is not None:
            return self._stats.get("training", lambda: self._inverse(self.statistics.voxel_mean,
                                                                     self.statistics.voxel_std))

        def load() -> tuple[np.ndarray, np.ndarray]:
            stats = self.store.voxel_stats(run)
            if stats is None:
                raise ConfigError(f"{self.store.describe_run(run)} has no per-voxel statistics; "
                                  f"data.normalization.load={self.normalization!r} needs them")
            return self._inverse(*stats)

        return self._stats.get(run, load)

    @staticmethod
    def _inverse(mean, std) -> tuple[np.ndarray, np.ndarray]:
        mean, std = (np.asarray(a, dtype=np.float32) for a in (mean, std))
        inv = np.zeros_like(std)
        np.divide(1.0, std, out=inv, where=std > 1e-6)
        return mean, inv

    def _fill(self, run: int, start: int, length: int, out: np.ndarray) -> None:
        """Write a clip into ``out`` ``(C, length, X, Y, Z)`` float16."""
        self.store.read_clip(run, start, length, self.stride, out=out[0])
        if self.normalization == "stored":
            if self.statistics is not None:
                self._training_scale(run, out[0])
            return
        if self.normalization == "minmax":
            stats = self.store.run_stats(run) if self.statistics is None else vars(self.statistics)
            lo, hi = float(stats["min"]), float(stats["max"])
            scale = np.float32(1.0 / (hi - lo)) if hi > lo else np.float32(0.0)
            for k in range(length):
                out[0, k] = (out[0, k].astype(np.float32) - np.float32(lo)) * scale
            return
        mean, inv = self._voxel_stats(run)
        dst = out[1] if self.channels == 2 else out[0]
        for k in range(length):
            dst[k] = (out[0, k].astype(np.float32) - mean) * inv
        if self.channels == 2 and self.statistics is not None:  # channel 0 after channel 1 read it as stored
            self._training_scale(run, out[0])

    def _training_scale(self, run: int, clip: np.ndarray) -> None:
        """``clip`` ``(L, X, Y, Z)`` (stored values of ``run``) in place: back to the run's source intensities,
        z-scored with the training runs' global mean and standard deviation; a ``zero`` background stays 0."""
        source = run_source_map(self.store, run)
        if source is None:
            raise ConfigError(
                f"{self.store.describe_run(run)} was normalized before brainfm (e.g. SwiFT frames): its source "
                "intensities are unknown, so the checkpoint's training statistics cannot be applied to it. Fix: "
                "data.normalization.statistics=store, or preprocess the source NIfTI with brainfm-preprocess volumes")
        offset, scale = source
        mean, inv = self.statistics.source_scaling()
        a, b = np.float32(inv / scale), np.float32((offset - mean) * inv)
        zero = str(self.store.run_stats(run).get("fill")) == "zero"
        mask = self.store.mask(run) if zero else None
        for k in range(len(clip)):
            z = clip[k].astype(np.float32)
            frame = z * a + b
            if zero:  # the background (outside the brain mask; a store without masks: its 0 voxels) stays 0
                frame[~mask if mask is not None else z == 0] = 0.0
            clip[k] = frame

    def _augment(self, clip: np.ndarray, seed: int) -> None:
        """Apply ``transform`` in place to one clip ``(C, L, X, Y, Z)`` float16."""
        c, n = clip.shape[:2]
        x = torch.from_numpy(clip.reshape(c * n, *self.shape).astype(np.float32))
        if hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed=seed % 2**32)
        y = self.transform(x)
        y = torch.as_tensor(np.asarray(y)) if not torch.is_tensor(y) else y.as_subclass(torch.Tensor)
        clip[...] = y.reshape(clip.shape).numpy()

    def _partner_start(self, i: int, start: int, length: int, seed: int) -> int:
        """A start of a ``length``-TR clip in clip ``i``'s segment whose span does not overlap ``start``'s."""
        return self.index.partner_start(i, start, (length - 1) * self.stride + 1, seed)

    def _times(self, run: int, start: int, length: int) -> tuple[torch.Tensor, float]:
        tr = float(self.store.trs[run])
        return torch.arange(length, dtype=torch.float32) * float(self.stride * tr), start * tr

    def _parse(self, item) -> tuple[int, int, int, int, int | None]:
        """``(i, run, start, length, pair seed)`` of a request."""
        if isinstance(item, tuple):
            i, length, *pair = item
            run, start = self.clip(int(i))
            return int(i), run, start, min(int(length), self.length), (int(pair[0]) if pair else None)
        run, start = self.clip(int(item))
        return int(item), run, start, self.length, None

    def __getitem__(self, item: int | WindowRequest) -> dict:
        i, run, start, length, pair = self._parse(item)
        sample = self._sample(run, start, length, seed=hash((i, length, pair)) & 0x7FFFFFFF)
        if pair is not None:
            other = self._sample(run, self._partner_start(i, start, length, pair), length, seed=pair)
            sample.update(volume2=other["volume"], t2=other["t"], onset2=other["onset"])
        sample["window"] = i
        return sample

    def _sample(self, run: int, start: int, length: int, seed: int) -> dict:
        buf = torch.empty((self.channels, length, *self.shape), dtype=torch.float16)
        self._fill(run, start, length, buf.numpy())
        if self.transform is not None:
            self._augment(buf.numpy(), seed)
        t, onset = self._times(run, start, length)
        out = {"volume": buf.permute(0, 2, 3, 4, 1), "t": t, "onset": onset,
               "subject": self.subject_index[self.store.subject_ids[run]], "run": run}
        if self.return_mask:
            out["brain_mask"] = torch.from_numpy(np.ascontiguousarray(self.store.mask(run)))
        return out

    # -- whole batches (VolumeClipLoader) -------------------------------------------------------------
    def batch_layout(self, n: int, length: int, pairs: bool) -> dict[str, tuple[int, torch.dtype, tuple]]:
        """Byte offset, dtype and shape of every tensor of a batch in one buffer."""
        vol = (n, self.channels, length, *self.shape)
        layout, off = {}, 0
        for key in ("volume", "volume2") if pairs else ("volume",):
            layout[key] = (off, torch.float16, vol)
            off = _aligned(off + math.prod(vol) * 2)
        if self.return_mask:
            layout["brain_mask"] = (off, torch.bool, (n, *self.shape))
            off = _aligned(off + n * math.prod(self.shape))
        layout["_bytes"] = (off, torch.uint8, ())
        return layout

    @staticmethod
    def views(buffer: torch.Tensor, layout: dict) -> dict[str, torch.Tensor]:
        """Tensors of a batch as views of ``buffer`` (uint8); volumes in ``(B, C, X, Y, Z, T)``."""
        out = {}
        for key, (off, dtype, shape) in layout.items():
            if key == "_bytes":
                continue
            size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            t = buffer[off : off + size].view(dtype).view(shape)
            out[key] = t.permute(0, 1, 3, 4, 5, 2) if key.startswith("volume") else t
        return out

    def __getitems__(self, request):
        if not isinstance(request, ClipBatchRequest):  # plain DataLoader: one dict per sample
            return [self[r] for r in request]
        parsed = [self._parse(item) for item in request.items]
        n, length = len(parsed), parsed[0][3]
        if any(p[3] != length for p in parsed):
            raise ConfigError("all requests of a batch must have the same length")
        pairs = parsed[0][4] is not None
        layout = self.batch_layout(n, length, pairs)
        nbytes = layout["_bytes"][0]
        if request.slot is not None and self._pool is not None:
            buffer = self._pool.tensors[request.slot]
        elif torch.utils.data.get_worker_info() is not None:  # shared memory from the start: no copy later
            buffer = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(nbytes))
        else:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
        views = self.views(buffer, layout)
        vol = views["volume"].permute(0, 1, 5, 2, 3, 4).numpy()  # (B, C, L, X, Y, Z) contiguous
        vol2 = views["volume2"].permute(0, 1, 5, 2, 3, 4).numpy() if pairs else None
        t, onset, t2, onset2 = [], [], [], []
        for b, (i, run, start, _, pair) in enumerate(parsed):
            self._fill(run, start, length, vol[b])
            if self.transform is not None:
                self._augment(vol[b], (request.seed + 2 * b) % 2**63)
            tt, on = self._times(run, start, length)
            t.append(tt)
            onset.append(on)
            if pairs:
                s2 = self._partner_start(i, start, length, pair)
                self._fill(run, s2, length, vol2[b])
                if self.transform is not None:
                    self._augment(vol2[b], (request.seed + 2 * b + 1) % 2**63)
                tt, on = self._times(run, s2, length)
                t2.append(tt)
                onset2.append(on)
            if self.return_mask:
                views["brain_mask"][b].numpy()[...] = self.store.mask(run)
        batch: dict[str, Any] = {
            "t": torch.stack(t),
            "onset": torch.tensor(onset, dtype=torch.float32),
            "subject": torch.tensor([self.subject_index[self.store.subject_ids[p[1]]] for p in parsed], dtype=torch.long),
            "run": torch.tensor([p[1] for p in parsed], dtype=torch.long),
            "window": torch.tensor([p[0] for p in parsed], dtype=torch.long),
        }
        if pairs:
            batch["t2"] = torch.stack(t2)
            batch["onset2"] = torch.tensor(onset2, dtype=torch.float32)
        if request.slot is not None and self._pool is not None:
            batch["_slot"] = (request.slot, n, length, pairs)  # the main process makes the views
        else:
            batch.update(views)
        return batch


# -- loader -----------------------------------------------------------------------------------------
class _MaterialisingIterator:
    def __init__(self, base, loader: "VolumeClipLoader") -> None:
        self.base, self.loader = base, loader

    def __iter__(self):
        return self

    def __len__(self) -> int:
        return len(self.base)

    def __next__(self) -> dict:
        return self.loader.materialise(next(self.base))


class VolumeClipLoader(DataLoader):
    """``DataLoader`` over a :class:`VolumeClipDataset` with batches in reusable buffers.

    Args:
        dataset: the clip dataset. batch_sampler: yields lists of requests (e.g.
            :class:`~brainfm.data.windows.WindowBatchSampler`); it is wrapped in a
            :class:`PooledBatchSampler`. max_batch: largest batch it yields (buffer size).
        seed: augmentation seed. pool_mb: memory for reusable buffers (0: no reuse).
        pin_memory: copy batches to pinned memory (CUDA only) after assembly.
        Other keyword arguments go to ``torch.utils.data.DataLoader``.

    Batches are dicts as :func:`~brainfm.data.windows.collate_windows`; ``volume`` is a view of a pooled
    buffer, valid for as long as you hold it (the buffer is not reused while any tensor or
    array refers to it).
    """

    def __init__(self, dataset: VolumeClipDataset, batch_sampler, max_batch: int, seed: int = 0,
                 pool_mb: float = 2048.0, pin_memory: bool = False, num_workers: int = 0,
                 prefetch_factor: int | None = None, persistent_workers: bool = False, **kwargs) -> None:
        if not isinstance(batch_sampler, PooledBatchSampler):
            batch_sampler = PooledBatchSampler(batch_sampler, None, seed)
        if num_workers > 0 and prefetch_factor is None:
            prefetch_factor = 2
        super().__init__(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                         collate_fn=collate_windows, pin_memory=False, prefetch_factor=prefetch_factor,
                         persistent_workers=persistent_workers, **kwargs)
        self.max_batch, self.pool_mb, self.pin = int(max_batch), float(pool_mb), bool(pin_memory)
        self.pool: ClipBufferPool | None = None

    def _ensure_pool(self) -> None:
        ds, sampler = self.dataset, self.batch_sampler
        if self.pool is not None or self.pool_mb <= 0:
            return
        pairs = bool(getattr(sampler.batch_sampler, "pairs", False))
        length = max(int(getattr(sampler.batch_sampler, "length", ds.length)), ds.length)
        slot_bytes = ds.batch_layout(self.max_batch, length, pairs)["_bytes"][0]
        in_flight = (self.prefetch_factor or 0) * self.num_workers
        n_slots = min(in_flight + 3, int(self.pool_mb * 2**20 // max(slot_bytes, 1)))
        if n_slots < 1:
            return
        self.pool = ClipBufferPool(slot_bytes, n_slots, in_flight, shared=self.num_workers > 0)
        sampler.pool = self.pool
        ds._pool = self.pool  # before the workers start: they inherit it (fork) or receive it (spawn)

    def __iter__(self):
        self._ensure_pool()
        return _MaterialisingIterator(super().__iter__(), self)

    def materialise(self, batch: dict) -> dict:
        """Turn a pooled batch (buffer number) into tensors viewing the main process's buffer."""
        token = batch.pop("_slot", None)
        if token is not None:
            slot, n, length, pairs = token
            batch.update(self.dataset.views(self.pool.tensors[slot], self.dataset.batch_layout(n, length, pairs)))
        if self.pin and torch.cuda.is_available():
            batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
        return batch


def build_augmentation(config: dict | None):
    """MONAI transforms for whole clips (frames as channels: one spatial transform per clip).

    ``config``: ``{"affine": {"prob", "rotate_range" (radians), "scale_range", "translate_range"
    (voxels), "padding_mode"}, "noise": {"prob", "std"}}``; missing/None entries are off; None -> None.
    SwiFT v2 and R2T-Net augment with affine jitter and Gaussian noise (R2T-Net: std 0.01, p 0.1).
    """
    if not config:
        return None
    from monai.transforms import Compose, RandAffine, RandGaussianNoise

    steps = []
    aff = config.get("affine")
    if aff:
        steps.append(RandAffine(
            prob=float(aff.get("prob", 0.5)), rotate_range=aff.get("rotate_range"), scale_range=aff.get("scale_range"),
            translate_range=aff.get("translate_range"), padding_mode=aff.get("padding_mode", "border"),
            mode="bilinear",
        ))
    noise = config.get("noise")
    if noise:
        steps.append(RandGaussianNoise(prob=float(noise.get("prob", 0.1)), std=float(noise.get("std", 0.01))))
    return Compose(steps) if steps else None




class FrameClipDataset:
    """Clips of a SwiFT frame folder: :class:`~brainfm.data.datasets.volume.VolumeClipDataset` over a
    :class:`FrameStore` (whole subjects; same arguments and samples)."""

    def __new__(cls, root: str | os.PathLike, tr: float, length: int, **kwargs):
        store = FrameStore(root, tr)
        segments = [(i, 0, int(n)) for i, n in enumerate(store.lengths)]
        return VolumeClipDataset(store, segments, length, **kwargs)


