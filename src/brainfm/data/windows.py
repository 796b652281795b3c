"""Windows of ROI time series: a dataset of fixed-grid windows and a resumable random sampler.

A window is ``length`` consecutive TRs of one subject run. Each sample carries the time of every
TR in seconds from the window's onset (``t = arange(length) * TR``), as the TR embedding of
Thomas, Ré & Poldrack (2022) expects, plus the onset in seconds from the start of the run.

Training visits every window start (stride 1 by default) once per epoch in a random order, with
a random crop length per batch; evaluation uses a fixed grid (``stride`` TRs apart). The order
and the lengths are a pure function of ``(seed, epoch)``, drawn by :class:`WindowBatchSampler`
in the main process, so a run resumed from a checkpoint in the middle of an epoch sees exactly
the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from brainfm.errors import ConfigError

#: A training request: (grid window index, crop length in TRs at most the dataset's length) and,
#: for contrastive pairs, a seed that places the second view.
WindowRequest = tuple[int, int] | tuple[int, int, int]


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class WindowBatchSampler(Sampler[list[WindowRequest]]):
    """Random, resumable, distributed-aware batches of window requests.

    Epoch ``e`` visits a permutation of the ``n_items`` grid windows drawn from ``(seed, e)``;
    every batch gets a crop length drawn uniformly in ``[min_length, length]`` from
    ``(seed, e, batch)`` (the same on every rank, so DDP ranks take equally long steps). With
    ``pairs`` every request also carries a seed for its second (contrastive) view. Rank ``r`` of ``w`` takes positions ``r::w`` (padded by
    wrapping, as ``DistributedSampler``). Lightning calls :meth:`set_epoch`; :meth:`fast_forward`
    skips the batches a checkpoint had already consumed.

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

    def _per_rank(self) -> int:
        _, world = _dist_rank_world()
        return -(-self.n_items // world)

    def __len__(self) -> int:
        n = self._per_rank()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[WindowRequest]]:
        rank, world = _dist_rank_world()
        if len(self) == 0:
            raise ConfigError(
                f"the training set has {self._per_rank()} windows per rank, fewer than "
                f"data.batch_size={self.batch_size}; lower the batch size or the window length"
            )
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n_items) if self.shuffle else np.arange(self.n_items)
        pair_seeds = rng.integers(0, 2**62, size=self.n_items) if self.pairs else None
        total = self._per_rank() * world
        positions = np.resize(np.arange(self.n_items), total)[rank::world]
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


def collate_windows(samples: list[dict]) -> dict:
    """Stack samples of equal length into a batch: ``bold`` ``(B, L, R)``, ``t`` ``(B, L)``,
    ``onset`` ``(B,)``, ``subject`` ``(B,)`` long, ``run`` ``(B,)`` long (and ``bold2``, ``t2``,
    ``onset2`` for pairs)."""
    batch = {
        "bold": torch.stack([s["bold"] for s in samples]),
        "t": torch.stack([s["t"] for s in samples]),
        "onset": torch.tensor([s["onset"] for s in samples], dtype=torch.float32),
        "subject": torch.tensor([s["subject"] for s in samples], dtype=torch.long),
        "run": torch.tensor([s["run"] for s in samples], dtype=torch.long),
    }
    if "bold2" in samples[0]:
        batch["bold2"] = torch.stack([s["bold2"] for s in samples])
        batch["t2"] = torch.stack([s["t2"] for s in samples])
        batch["onset2"] = torch.tensor([s["onset2"] for s in samples], dtype=torch.float32)
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
