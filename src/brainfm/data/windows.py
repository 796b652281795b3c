"""Windowing, shared by every dataset: the grid of windows over split segments, the resumable
sampler that orders them, and the one collate.

A window (a *clip* of volumes) is ``length`` TRs of one subject run, every ``frame_stride`` TRs; it
spans ``(length - 1) * frame_stride + 1`` TRs. :class:`WindowIndex` numbers the windows of a list
of segments ``(run, first TR, stop TR)`` whose starts lie ``stride`` TRs apart, in O(segments)
memory (no array of every window: 60,000 runs x 1,000 starts would be 60M entries), and places the
second, non-overlapping view of a contrastive pair.

Training visits every window once per epoch in a random order, with a random crop length per
batch; evaluation uses a fixed grid. The order and the lengths are a pure function of
``(seed, epoch)``, drawn by :class:`WindowBatchSampler` in the main process, so a run resumed from
a checkpoint in the middle of an epoch sees exactly the batches an uninterrupted run would have
seen. Each sample carries the time of every frame in seconds from the window's onset (as the TR
embedding of Thomas, Ré & Poldrack (2022) expects) and the onset in seconds from the run start.

Censored TRs (motion censoring, recorded by the store: ``store.censored_trs(run)``) are never seen: the
grid windows that hold one are skipped where every dataset numbers its windows
(:meth:`WindowDataset._index_windows`, :func:`skip_censored`), with one log line saying how many.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from brainfm.errors import ConfigError

log = logging.getLogger(__name__)
#: A training request: (grid window index, crop length in TRs at most the dataset's length) and,
#: for contrastive pairs, a seed that places the second view.
WindowRequest = tuple[int, int] | tuple[int, int, int]
#: keys of a batch that hold integer indices (collated to long tensors)
INDEX_KEYS = frozenset({"subject", "run", "task_run", "dataset", "window", "task_window", "pair"})


class WindowIndex:
    """The grid windows of ``segments``: window ``i`` <-> (segment, start TR).

    Args:
        segments: ``(run, first TR, stop TR)`` ranges (stop exclusive), e.g. one split of a store.
        span: TRs one window covers (``(length - 1) * frame_stride + 1``).
        stride: TRs between the starts of neighbouring grid windows (>= 1).

    Windows of segment ``k`` start at ``lo_k, lo_k + stride, ...`` while they fit before ``hi_k``
    (as ``numpy.arange(lo, hi - span + 1, stride)``). Memory is O(segments).

    Raises:
        ConfigError: a span or stride below 1.
    """

    def __init__(self, segments: Sequence[tuple[int, int, int]], span: int, stride: int) -> None:
        self.span, self.stride = int(span), int(stride)
        if self.span < 1 or self.stride < 1:
            raise ConfigError(f"a window span of {span} TRs and stride of {stride} TRs must be >= 1")
        self.segments = np.asarray(list(segments), dtype=np.int64).reshape(-1, 3)
        lo, hi = self.segments[:, 1], self.segments[:, 2]
        self.counts = np.maximum(0, (hi - self.span - lo) // self.stride + 1)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def longest_segment(self) -> int:
        return int((self.segments[:, 2] - self.segments[:, 1]).max()) if len(self.segments) else 0

    def segment_of(self, i: int) -> int:
        """Index of the segment holding window ``i``. Raises IndexError outside ``[0, len)``."""
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} outside [0, {len(self)})")
        return int(np.searchsorted(self.offsets, i, side="right") - 1)

    def window(self, i: int) -> tuple[int, int]:
        """``(run, start TR)`` of window ``i``."""
        k = self.segment_of(i)
        run, lo, _ = self.segments[k]
        return int(run), int(lo + (int(i) - self.offsets[k]) * self.stride)

    def partner_start(self, i: int, start: int, span: int, seed: int) -> int:
        """A start for a second view of ``span`` TRs in window ``i``'s segment that does not overlap the
        view at ``start`` (when the segment allows), drawn from ``seed``: the positive of a contrastive
        pair (SwiFT and R2T-Net draw it unseeded; here it is a function of the request)."""
        _, lo, hi = (int(v) for v in self.segments[self.segment_of(i)])
        last = hi - int(span)
        before = np.arange(lo, max(lo, start - span + 1))
        after = np.arange(min(last + 1, start + span), last + 1)
        choices = np.concatenate([before, after])
        if len(choices) == 0:  # segment shorter than two views: any other start
            choices = np.setdiff1d(np.arange(lo, last + 1), [start]) if last > lo else np.array([start])
        return int(np.random.default_rng(seed).choice(choices))

    def run_windows(self) -> list[tuple[int, int, int]]:
        """``(run, first window, windows)`` of every segment, in order (R2T draws per run)."""
        return [(int(r), int(o), int(c)) for (r, _, _), o, c in zip(self.segments, self.offsets[:-1], self.counts)]


def skip_censored(segments: Sequence[tuple[int, int, int]], span: int, stride: int,
                  censored_trs: Callable[[int], np.ndarray]) -> tuple[list[tuple[int, int, int]], np.ndarray, int, int]:
    """The grid windows of ``segments`` (as :class:`WindowIndex` numbers them) that hold no censored TR, as
    segments: each maximal stretch of clean consecutive windows of a segment becomes one segment whose own grid
    is exactly those windows (its first start, and its last start + ``span``), so the windows kept are the
    original grid minus the skipped ones, and a second (contrastive) view stays inside clean TRs too.

    Args:
        segments: ``(run, first TR, stop TR)``. span: TRs one window covers. stride: TRs between window starts.
        censored_trs: ``run -> sorted TR indices`` (``store.censored_trs``).

    Returns:
        ``(segments, origin, windows before, windows kept)``; ``origin`` ``(n_segments,)`` int64: the input segment
        each output segment comes from (e.g. to carry a label per segment).
    """
    out, origin, before, kept = [], [], 0, 0
    span, stride = int(span), int(stride)
    for k, (run, lo, hi) in enumerate(segments):
        run, lo, hi = int(run), int(lo), int(hi)
        n = max(0, (hi - span - lo) // stride + 1)
        before += n
        c = np.asarray(censored_trs(run), dtype=np.int64)
        c = c[(c >= lo) & (c < hi)]
        if not len(c) or n == 0:
            out.append((run, lo, hi))
            origin.append(k)
            kept += n
            continue
        # window j (start lo + j * stride) holds TR c when start <= c < start + span
        first = np.maximum(0, -((span - 1 - (c - lo)) // stride))  # ceil((c - lo - span + 1) / stride)
        last = np.minimum(n - 1, (c - lo) // stride)
        hit = np.zeros(n + 1, dtype=np.int64)
        valid = first <= last
        np.add.at(hit, first[valid], 1)
        np.add.at(hit, last[valid] + 1, -1)
        clean = np.cumsum(hit[:n]) == 0
        kept += int(clean.sum())
        edges = np.flatnonzero(np.diff(np.concatenate([[0], clean.astype(np.int8), [0]])))
        for a, b in zip(edges[::2], edges[1::2]):  # clean windows a .. b - 1
            out.append((run, lo + int(a) * stride, lo + int(b - 1) * stride + span))
            origin.append(k)
    return out, np.asarray(origin, dtype=np.int64), before, kept


def clean_windows(store, segments: Sequence[tuple[int, int, int]], span: int, stride: int
                  ) -> tuple[WindowIndex, np.ndarray, int]:
    """The window grid of ``segments`` less the windows that hold a censored TR of ``store``
    (``store.has_censoring``, ``store.censored_trs``; :func:`skip_censored`): the one numbering of windows that the
    datasets (:meth:`WindowDataset._index_windows`) and the pairings built on them (R2T) share.

    Returns:
        ``(index, origin, skipped)``: the :class:`WindowIndex`, the input segment of each of its segments
        ``(n_segments,)`` int64, and the number of windows skipped.
    """
    if getattr(store, "has_censoring", False):
        segments, origin, before, kept = skip_censored(segments, span, stride, store.censored_trs)
        return WindowIndex(segments, span, stride), origin, before - kept
    segments = list(segments)
    return WindowIndex(segments, span, stride), np.arange(len(segments), dtype=np.int64), 0


class WindowDataset(Dataset):
    """Base of the window datasets: the grid of windows of ``segments`` (a :class:`WindowIndex`) and the
    subject index (subject id -> integer label; default: the store's sorted unique ids)."""

    def _index_windows(self, store, segments: Sequence[tuple[int, int, int]], span: int, stride: int,
                       subject_index: dict[str, int] | None, what: str, fix: str) -> None:
        """Set ``index``, ``segments`` and ``subject_index``; windows that hold a censored TR of the store are
        skipped (:func:`clean_windows`; ``censored_skipped``: how many; ``segment_origin``: the input segment of each
        of ``segments``, which are the input ones, cut around censored TRs).

        Raises:
            ConfigError: no segment holds one window (``what``: the window in words, ``fix``: the key to lower).
        """
        self.subject_index = subject_index or {s: i for i, s in enumerate(store.subjects())}
        self.index, self.segment_origin, self.censored_skipped = clean_windows(store, segments, span, stride)
        if self.censored_skipped:
            total = self.censored_skipped + len(self.index)
            log.info("%s: skipped %d of %d windows that hold a censored TR (%s, stride %d TR(s))",
                     store.location, self.censored_skipped, total, what, int(stride))
        self.segments = self.index.segments  # (n_segments, 3) int64: run, first TR, stop TR
        if len(self.index) == 0 and self.censored_skipped:
            raise ConfigError(f"every window ({what}) of these segments of {store.location} holds a censored TR "
                              f"({self.censored_skipped} skipped); lower {fix}, or censor less (brainfm-data import "
                              "--fd-threshold)")
        if len(self.index) == 0:
            raise ConfigError(f"{what}, longer than every segment of {store.location} (longest: "
                              f"{self.index.longest_segment()} TRs); lower {fix}")

    def __len__(self) -> int:
        return len(self.index)

    def window(self, i: int) -> tuple[int, int]:
        """``(run, start TR)`` of grid window ``i``."""
        return self.index.window(i)


def dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def partition(n_items: int) -> np.ndarray:
    """This rank's share of ``n_items`` evaluation windows: positions ``rank::world`` (every window on
    exactly one rank), or all of them when there are fewer windows than ranks (so no rank is idle)."""
    rank, world = dist_rank_world()
    return np.arange(n_items)[rank::world] if n_items >= world else np.arange(n_items)


class PartitionSampler(Sampler[int]):
    """The indices of :func:`partition`, in order (for inference loaders with a plain ``batch_size``:
    Lightning's predict loop wraps their batch sampler)."""

    def __init__(self, n_items: int) -> None:
        self.n_items = int(n_items)

    def __iter__(self) -> Iterator[int]:
        return iter(partition(self.n_items).tolist())

    def __len__(self) -> int:
        return len(partition(self.n_items))


class WindowBatchSampler(Sampler[list[WindowRequest]]):
    """Random, resumable, distributed-aware batches of window requests.

    Epoch ``e`` visits a permutation of the ``n_items`` grid windows drawn from ``(seed, e)``;
    every batch gets a crop length drawn uniformly in ``[min_length, length]`` from
    ``(seed, e, batch)`` (the same on every rank, so DDP ranks take equally long steps). With
    ``pairs`` every request also carries a seed for its second (contrastive) view. Rank ``r`` of ``w``
    takes positions ``r::w``: in training padded by wrapping (as ``DistributedSampler``) so that every
    rank takes the same number of steps; in evaluation (``drop_last=False``) without padding, so that
    every window is evaluated exactly once over the ranks (the ranks may then hold one batch more or
    less; with fewer windows than ranks every rank evaluates all of them). Lightning calls
    :meth:`set_epoch`; :meth:`fast_forward` skips the batches a checkpoint had already consumed.

    Raises:
        ConfigError: fewer windows per rank than one batch.
    """

    def __init__(
        self,
        n_items: int,
        batch_size: int,
        length: int,
        min_length: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        pairs: bool = False,
    ) -> None:
        self.n_items = int(n_items)
        self.batch_size = int(batch_size)
        self.length = int(length)
        self.min_length = int(min_length or length)
        if not 2 <= self.min_length <= self.length:
            raise ConfigError(f"data.window.min_length={min_length} must lie in [2, length={length}]")
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.pairs = bool(pairs)
        self.epoch = 0
        self._skip: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def fast_forward(self, epoch: int, batches: int) -> None:
        """Skip the first ``batches`` batches of epoch ``epoch`` (once)."""
        self._skip = (int(epoch), int(batches))

    def _positions(self) -> np.ndarray:
        """This rank's positions in the epoch's order."""
        if not self.drop_last:  # evaluation: a partition of the windows over the ranks
            return partition(self.n_items)
        rank, world = dist_rank_world()
        return np.resize(np.arange(self.n_items), self._per_rank() * world)[rank::world]

    def _per_rank(self) -> int:
        _, world = dist_rank_world()
        return -(-self.n_items // world)

    def __len__(self) -> int:
        if not self.drop_last:
            return -(-len(self._positions()) // self.batch_size)
        return self._per_rank() // self.batch_size

    def __iter__(self) -> Iterator[list[WindowRequest]]:
        rank, world = dist_rank_world()
        if len(self) == 0:
            raise ConfigError(
                f"the training set has {self._per_rank()} windows per rank, fewer than "
                f"data.batch_size={self.batch_size}; lower the batch size or the window length"
            )
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n_items) if self.shuffle else np.arange(self.n_items)
        pair_seeds = rng.integers(0, 2**62, size=self.n_items) if self.pairs else None
        positions = self._positions()
        skip = self._skip[1] if self._skip and self._skip[0] == self.epoch else 0
        self._skip = None
        for b in range(skip, len(self)):
            pos = positions[b * self.batch_size : (b + 1) * self.batch_size]
            length = self.length
            if self.min_length < self.length:
                length = int(np.random.default_rng([self.seed, self.epoch, b]).integers(self.min_length, self.length + 1))
            if self.pairs:
                yield [(int(order[p]), length, int(pair_seeds[p])) for p in pos]
            else:
                yield [(int(order[p]), length) for p in pos]


def collate_windows(samples: list[dict] | dict) -> dict:
    """Stack samples of equal length into a batch, for every dataset: tensors are stacked (``bold``
    ``(B, L, R)``, ``volume`` ``(B, C, X, Y, Z, L)``, ``t`` ``(B, L)``, ``brain_mask``, second and task
    views), numbers become ``(B,)`` tensors (``subject``, ``run``, ``task_run``: long; ``onset``,
    ``onset2``, ``task_onset``: float32). A batch already assembled by a dataset (a dict, e.g.
    :meth:`~brainfm.data.datasets.volume.VolumeClipDataset.__getitems__`) passes through unchanged."""
    if isinstance(samples, dict):
        return samples
    batch: dict[str, torch.Tensor] = {}
    for key, value in samples[0].items():
        if torch.is_tensor(value):
            batch[key] = torch.stack([s[key] for s in samples])
        else:
            dtype = torch.long if key in INDEX_KEYS else torch.float32
            batch[key] = torch.tensor([s[key] for s in samples], dtype=dtype)
    return batch


class ResumableTrainPosition:
    """Mixin for LightningDataModules whose training batches come from a resumable sampler: the
    checkpoint stores ``{"train_epoch", "train_batches_done"}`` (Lightning saves a datamodule's
    ``state_dict``), and a resumed run sets ``self._resume = (epoch, batches)`` for the sampler's
    ``fast_forward``, so no batch is repeated or skipped."""

    _resume: tuple[int, int] | None = None

    def _train_loader_built(self) -> bool:
        return getattr(self, "_train_sampler", None) is not None

    def state_dict(self) -> dict:
        trainer = self.trainer
        if trainer is None or not self._train_loader_built():
            return {}
        processed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"train_epoch": int(trainer.current_epoch), "train_batches_done": int(processed)}

    def load_state_dict(self, state: dict) -> None:
        if "train_epoch" in state:
            self._resume = (int(state["train_epoch"]), int(state["train_batches_done"]))
