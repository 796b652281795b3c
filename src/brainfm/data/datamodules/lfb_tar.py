"""Streaming windows of Thomas et al.'s WebDataset ``.tar`` shards (``data=lfb_tar``).

Source of the layout and of the sampling: athms/learning-from-brains (``src/batcher/base.py``: shards
shuffled, one random sequence of 10-50 TRs per run sample, ``t_rs = arange(seq_len) * t_r``). Here:

- **Shards** are listed once (:class:`~brainfm.data.stores.lfb_tar.TarShardIndex`: tar headers and
  ``t_r.pyd`` only), split by subject (seeded, the split file of the other recipes) or given as separate
  training / validation patterns (``split.kind=files``, ``data.val_path``).
- **Epoch** ``e``: the shards are permuted from ``(seed, e)``; rank ``r`` of ``w`` takes every ``w``-th shard
  of that order from ``r``, DataLoader worker ``k`` of ``W`` every ``W``-th of those: every shard is read by one
  (rank, worker) stream. A stream reads its shards through ``webdataset`` (a seeded sample shuffle buffer
  of ``shuffle_buffer`` samples) and draws ``windows_per_run`` windows of ``window.length`` TRs per training
  run, each placed by ``(seed, e, key, k)``. An epoch is ``n_train_runs * windows_per_run`` windows; every
  stream yields the same number of batches (``ceil(windows / (w * W)) // batch_size``), wrapping around its
  shards when they hold fewer windows and stopping early when they hold more, so that DDP ranks take equal
  steps. Each batch has one crop length drawn from ``(seed, e, batch)`` in ``[min_length, length]``, as
  :class:`~brainfm.data.windows.WindowBatchSampler` draws it.
- **Resume.** The checkpoint stores ``(epoch, batches done)`` (:class:`~brainfm.data.windows.ResumableTrainPosition`);
  the resumed loader's workers skip exactly those batches (without decoding them) and take over the
  rotation of the DataLoader's round robin, so the batches after the checkpoint are those of an
  uninterrupted run (same ``num_workers`` and number of ranks).
- **Evaluation**: every window of the fixed grid (``window.eval_stride``, default ``length``) of each
  validation run, its shards split over the ranks (all on every rank when there are fewer shards than
  ranks) and the workers.
- **Samples** are z-scored by :class:`~brainfm.data.normalization.ROINormalizer` (``run``: per ROI over the
  sample's TRs; ``none``), and collated by :func:`~brainfm.data.windows.collate_windows`: the keys, shapes
  and dtypes of the ROI datamodule's batches.

Workers are not persistent (``persistent_workers=False``): the epoch and resume position reach the
workers when each epoch's iterator starts them.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from brainfm.data.datamodules.base import StoreDataModule
from brainfm.data.normalization import ROINormalizer
from brainfm.data.stores.lfb_tar import SUBJECT_PATTERN, TarShardIndex, decode_sample, expand_shards, iter_samples
from brainfm.data.windows import collate_windows, dist_rank_world
from brainfm.errors import ConfigError, DataError

NORMALIZATION_MODES = ("run", "none")


def shard_assignment(n_shards: int, epoch: int, seed: int, rank: int, world: int, worker: int, workers: int,
                     shuffle: bool = True) -> list[int]:
    """The shards (positions in the split's list of ``n_shards`` shards) stream ``(rank, worker)`` reads in
    epoch ``epoch``, in reading order.

    Training (``shuffle``): a permutation of the shards from ``(seed, epoch)``, rank ``rank`` takes positions
    ``rank::world`` and worker ``worker`` positions ``worker::workers`` of those. Evaluation: the shards in
    order, split the same way, except that every rank takes all of them when there are fewer than ranks.
    """
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(n_shards) if shuffle else np.arange(n_shards)
    if shuffle or n_shards >= world:
        order = order[rank::world]
    return [int(s) for s in order[worker::workers]]


class LfBWindowStream(IterableDataset):
    """Batches of windows streamed from LfB shards (module docstring); iterated by a DataLoader with
    ``batch_size=None``.

    Args:
        index: the shards' run table. runs: the runs (of ``index``) this split uses. normalizer: the
            ``run``/``none`` z-scoring. length, min_length, frame_stride: window (TRs). batch_size: windows per
            batch. seed: the epoch's shard order, window placement and crop lengths. train: random windows
            (else the evaluation grid, ``eval_stride`` TRs apart). windows_per_run: training windows per run per
            epoch. shuffle_buffer: samples in the seeded shuffle buffer (0: none). subject_index: subject id
            -> integer. label_key: the sample label carried as ``trial_label`` (``task_label``). n_rois: checked.
        rank_world: ``(rank, world)`` (default: the process group).

    Yields (per batch) :func:`collate_windows` of windows: ``bold`` ``(B, L, n_rois)`` float32 z-scored,
    ``t`` ``(B, L)`` float32 seconds from the window onset (frame index x frame_stride x the sample's TR),
    ``onset`` ``(B,)`` float32 seconds from the run start, ``subject``, ``run``, ``window`` (the window's
    number within its run) ``(B,)`` int64, and ``trial_label`` ``(B,)`` int64 when the samples carry
    ``<label_key>.pyd``.

    Raises:
        DataError: a run shorter than one window (named), a batch mixing labelled and unlabelled samples,
            a stream whose shards hold no run of the split; what :func:`decode_sample` raises.
        ConfigError: fewer shards than ranks x workers in training.
    """

    def __init__(self, index: TarShardIndex, runs: Sequence[int], normalizer: ROINormalizer, length: int,
                 batch_size: int, seed: int = 0, train: bool = True, min_length: int | None = None,
                 frame_stride: int = 1, eval_stride: int | None = None, windows_per_run: int = 1,
                 shuffle_buffer: int = 0, subject_index: dict[str, int] | None = None, label_key: str = "task_label",
                 n_rois: int | None = None, rank_world: tuple[int, int] | None = None) -> None:
        self.index = index
        self.runs = np.zeros(len(index), dtype=bool)
        self.runs[np.asarray(list(runs), dtype=np.int64)] = True
        self.n_runs = int(self.runs.sum())
        self.shard_ids = np.unique(index.shard_of[self.runs])  # the shards holding runs of this split
        self.normalizer = normalizer
        self.length, self.batch_size, self.seed, self.train = int(length), int(batch_size), int(seed), bool(train)
        self.min_length = int(min_length or length) if train else int(length)
        self.frame_stride = int(frame_stride)
        self.span = (self.length - 1) * self.frame_stride + 1
        self.eval_stride = int(eval_stride or self.span)
        self.windows_per_run = int(windows_per_run)
        self.shuffle_buffer = int(shuffle_buffer)
        if self.length < 2 or not 2 <= self.min_length <= self.length:
            raise ConfigError(f"data.window.length={length} must be >= 2 and min_length={min_length} in [2, length]")
        if self.frame_stride < 1 or self.windows_per_run < 1 or self.batch_size < 1:
            raise ConfigError("data.window.frame_stride, data.windows_per_run and the batch size must be >= 1")
        self.subject_index = subject_index or {s: i for i, s in enumerate(index.subjects())}
        self.label_key = label_key or None
        self.n_rois = n_rois
        self.rank_world = rank_world
        self.epoch = 0
        self.skip = 0  # batches of this epoch already consumed (a resumed run)
        self.workers = 1  # the DataLoader's num_workers (>= 1), set by the loader
        if self.n_runs == 0:
            raise ConfigError(f"the {'training' if train else 'evaluation'} split of {index.location} holds no runs; "
                              "check data.split and data.path")

    # -- sizes ------------------------------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        return self.rank_world if self.rank_world is not None else dist_rank_world()

    def batches_per_stream(self) -> int:
        """Training batches each (rank, worker) stream yields per epoch."""
        _, world = self._rank_world()
        streams = world * self.workers
        return -(-self.n_runs * self.windows_per_run // streams) // self.batch_size

    def __len__(self) -> int:
        if not self.train:
            raise TypeError("the evaluation stream has no length before it is read")
        return self.batches_per_stream() * self.workers

    def check(self) -> None:
        """Refuse a training stream that cannot give every (rank, worker) stream shards and one batch.

        Raises:
            ConfigError: fewer shards than ranks x workers, or fewer windows per stream than one batch.
        """
        _, world = self._rank_world()
        streams = world * self.workers
        if self.train and len(self.shard_ids) < streams:
            raise ConfigError(
                f"{len(self.shard_ids)} shard(s) with training runs under {self.index.location} for {world} rank(s) x "
                f"{self.workers} DataLoader worker(s): every stream reads its own shards. Fix: lower "
                f"data.num_workers, or write more, smaller shards (brainfm-data h5-to-tar --shard-size N)")
        if self.train and self.batches_per_stream() == 0:
            raise ConfigError(
                f"{self.n_runs} training run(s) x data.windows_per_run={self.windows_per_run} make fewer windows per "
                f"stream ({world} rank(s) x {self.workers} worker(s)) than data.batch_size={self.batch_size}. Fix: "
                "lower the batch size or data.num_workers, or raise data.windows_per_run")

    # -- reading ----------------------------------------------------------------------------------------------
    def _stream_id(self) -> tuple[int, int, int, int]:
        rank, world = self._rank_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank, world, worker, workers

    def _samples(self, shards: list[int], salt: Sequence[int]) -> Iterator[tuple[dict, int]]:
        """``(raw sample, run)`` of the split's runs in ``shards`` (a seeded shuffle buffer in training)."""
        files = [self.index.shards[s] for s in shards]

        def tagged() -> Iterator[tuple[dict, int]]:
            shard_numbers = {f: s for f, s in zip(files, shards)}
            for sample in iter_samples(files):
                run = self.index.run_of.get((shard_numbers[sample["__url__"]], sample["__key__"]))
                if run is not None and self.runs[run]:
                    yield sample, run

        stream = tagged()
        if self.train and self.shuffle_buffer > 1:
            from webdataset.filters import _shuffle

            rng = random.Random("-".join(str(int(v)) for v in (self.seed, *salt)))
            stream = _shuffle(stream, bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)
        yield from stream

    def _decode(self, sample: dict, run: int):
        tr = float(self.index.trs[run]) if np.isfinite(self.index.trs[run]) else None
        decoded, labels = decode_sample(sample, n_rois=self.n_rois, tr=tr, subject_pattern=self.index.pattern)
        n = int(decoded.lengths[0])
        if n < self.span:
            raise DataError(
                f"{self.index.describe_run(run)} has {n} TRs, fewer than a window of {self.length} TRs (every "
                f"{self.frame_stride}). Fix: lower data.window.length, or leave such runs out of data.path")
        return decoded, labels

    def _window(self, decoded, labels: dict, run: int, start: int, length: int, k: int) -> dict:
        stop = start + (length - 1) * self.frame_stride + 1
        x = self.normalizer.bind(decoded).apply(0, decoded.read(0, start, stop, self.frame_stride))
        tr = float(decoded.trs[0])
        out = {
            "bold": torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
            "t": torch.arange(length, dtype=torch.float32) * float(self.frame_stride * tr),
            "onset": start * tr,
            "subject": self.subject_index[self.index.subject_ids[run]],
            "run": int(run),
            "window": int(k),
        }
        if self.label_key in labels:
            out["trial_label"] = torch.tensor(labels[self.label_key], dtype=torch.long)
        return out

    def _collate(self, windows: list[dict]) -> dict:
        with_label = {"trial_label" in w for w in windows}
        if len(with_label) > 1:
            runs = [self.index.describe_run(w["run"]) for w in windows if "trial_label" not in w]
            raise DataError(f"a batch mixes samples with and without {self.label_key}.pyd (e.g. {runs[0]}). Fix: give "
                            "data.path shards that all carry the label, or none")
        return collate_windows(windows)

    def _train_stream(self, rank: int, world: int, physical: int, workers: int) -> Iterator[dict]:
        per_stream = self.batches_per_stream()
        logical = (physical + self.skip) % workers  # take over the round robin of a resumed loader
        first = (physical + self.skip) // workers
        shards = [int(self.shard_ids[i]) for i in
                  shard_assignment(len(self.shard_ids), self.epoch, self.seed, rank, world, logical, workers)]
        if not shards:
            raise ConfigError(f"stream (rank {rank}, worker {logical}) has no shard; see LfBWindowStream.check")

        def windows() -> Iterator[tuple[dict, int, int, int]]:
            for cycle in range(1 << 30):
                found = False
                for sample, run in self._samples(shards, (self.epoch, rank, logical, cycle)):
                    found = True
                    for k in range(self.windows_per_run):
                        yield sample, run, k, cycle
                if not found:
                    raise DataError(f"the shards of stream (rank {rank}, worker {logical}) hold no training run: "
                                    f"{[self.index.shards[s] for s in shards][:3]}. Fix: shuffle subjects across "
                                    "shards when writing them, or lower data.num_workers")

        source = windows()
        for _ in range(first * self.batch_size):  # a resumed run: skip what was consumed, undecoded
            next(source)
        cached: tuple[int, int, Any] | None = None  # the last decoded sample (windows_per_run > 1)
        for j in range(first, per_stream):
            b = j * workers + logical  # this batch's number in the rank's epoch
            length = self.length
            if self.min_length < self.length:
                length = int(np.random.default_rng([self.seed, self.epoch, b]).integers(self.min_length, self.length + 1))
            batch = []
            for _ in range(self.batch_size):
                sample, run, k, cycle = next(source)
                if cached is None or cached[:2] != (run, cycle):
                    cached = (run, cycle, self._decode(sample, run))
                decoded, labels = cached[2]
                crc = zlib.crc32(self.index.keys[run].encode())
                last = int(decoded.lengths[0]) - self.span
                start = int(np.random.default_rng([self.seed, self.epoch, crc, cycle, k]).integers(0, last + 1))
                batch.append(self._window(decoded, labels, run, start, length, k))
            yield self._collate(batch)

    def _eval_stream(self, rank: int, world: int, worker: int, workers: int) -> Iterator[dict]:
        shards = [int(self.shard_ids[i]) for i in
                  shard_assignment(len(self.shard_ids), 0, self.seed, rank, world, worker, workers, shuffle=False)]
        batch: list[dict] = []
        for sample, run in self._samples(shards, ()):
            decoded, labels = self._decode(sample, run)
            n = int(decoded.lengths[0])
            for k, start in enumerate(range(0, n - self.span + 1, self.eval_stride)):
                batch.append(self._window(decoded, labels, run, start, self.length, k))
                if len(batch) == self.batch_size:
                    yield self._collate(batch)
                    batch = []
        if batch:
            yield self._collate(batch)

    def __iter__(self) -> Iterator[dict]:
        rank, world, worker, workers = self._stream_id()
        if self.train:
            yield from self._train_stream(rank, world, worker, workers)
        else:
            yield from self._eval_stream(rank, world, worker, workers)


class LfBLoader(DataLoader):
    """A DataLoader of an :class:`LfBWindowStream` that hands the stream its epoch and resume position
    when each epoch's iterator starts (Lightning sets epochs on samplers only; an iterable dataset has none)."""

    def __init__(self, dataset: LfBWindowStream, position=None, **kwargs) -> None:
        super().__init__(dataset, batch_size=None, collate_fn=collate_windows, persistent_workers=False, **kwargs)
        dataset.workers = max(1, int(kwargs.get("num_workers", 0)))
        self._position = position

    def __iter__(self):
        if self._position is not None:
            self.dataset.epoch, self.dataset.skip = self._position()
        return super().__iter__()


class LfBTarDataModule(StoreDataModule):
    """Windows streamed from Thomas et al.'s WebDataset shards (module docstring; layout in
    :mod:`brainfm.data.stores.lfb_tar`).

    Args:
        name, tr, split_dir, batch_size, eval_batch_size, num_workers, seed, labels, cache:
            as :class:`~brainfm.data.datamodules.base.StoreDataModule`. ``tr``: seconds (every sample's
            ``t_r.pyd`` must agree), ``mixed`` (each sample keeps its own: LfB pools data sets) or None (one TR).
        path: the shards: a brace pattern (``dir/train-{000000..000099}.tar``), a glob or a list.
        val_path: validation shards (``split.kind=files``).
        n_rois: expected ROI count (checked against the samples; ``None``: the first sample's).
        normalization: ``{"mode": "run"|"none", "eps": float}`` (``global`` needs a pass over the data:
            convert with ``brainfm-data tar-to-h5`` and use an ROI recipe).
        window: ``length`` (TRs), ``min_length`` (shortest random crop in training), ``frame_stride``,
            ``eval_stride`` (TRs between evaluation windows; default the window's span). ``train_stride`` is
            not used (training windows are drawn at random per run).
        split: ``{"kind": "subject", "fractions", "seed", "file"}`` (a seeded subject split of the samples'
            subjects, written to ``split_dir``) or ``{"kind": "files"}`` (``path`` trains, ``val_path`` validates).
        windows_per_run: training windows drawn from each run per epoch.
        shuffle_buffer: samples in the seeded WebDataset shuffle buffer (0/1: shard order only; memory:
            this many raw samples per worker).
        subject_pattern: regular expression with a group ``subject`` found in each key (LfB: ``sub-<id>``).
        trial_label_key: the sample member carried as ``trial_label`` (without ``.pyd``; null: none).
        resample_tr: not supported on a stream (ConfigError if set).
        atlas: the parcellation's name, recorded in the checkpoint (the shards name none; Thomas et al.:
            DiFuMo-1024).

    Raises:
        ConfigError: a time split, ``global`` normalization, resampling, an ROI-count or TR mismatch, too few
            shards for the ranks x workers. DataError: unreadable shards, a subject in both the training and
            validation shards, bad samples (when read).
    """

    window_defaults = {"length": 50, "min_length": None, "frame_stride": 1, "train_stride": None, "eval_stride": None}

    def __init__(self, name: str, path: str | Sequence[str], val_path: str | Sequence[str] | None = None,
                 tr: float | str | None = "mixed", n_rois: int | None = None, normalization: dict | None = None,
                 window: dict | None = None, split: dict | None = None, split_dir: str = "data_splits",
                 batch_size: int = 16, eval_batch_size: int = 64, num_workers: int = 0, seed: int = 0,
                 windows_per_run: int = 1, shuffle_buffer: int = 16, subject_pattern: str = SUBJECT_PATTERN,
                 trial_label_key: str | None = "task_label", labels: dict | None = None, cache: dict | None = None,
                 resample_tr: float | None = None, atlas: str | None = None) -> None:
        pattern = path if isinstance(path, str) else ",".join(map(str, path))
        super().__init__(name, pattern, tr=tr, split={"kind": "subject", **(split or {})}, split_dir=split_dir,
                         window=window, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, seed=seed, labels=labels, cache=cache, resample_tr=None)
        if resample_tr is not None:
            raise ConfigError("data.resample_tr is not supported on streamed tar shards. Fix: convert them with "
                              "`brainfm-data tar-to-h5`, then `brainfm-data resample`, and train on the ROI store")
        self.pattern, self.val_pattern = path, val_path
        self.expected_n_rois = n_rois
        self.normalization = {"mode": "run", "eps": 1e-6, **(normalization or {})}
        if self.normalization["mode"] not in NORMALIZATION_MODES:
            raise ConfigError(
                f"data.normalization.mode={self.normalization['mode']!r}: streamed tar shards are z-scored per run "
                f"({NORMALIZATION_MODES}); 'global' needs a pass over the data. Fix: mode=run, or convert with "
                "`brainfm-data tar-to-h5` and train on the ROI store")
        self.windows_per_run, self.shuffle_buffer = int(windows_per_run), int(shuffle_buffer)
        self.subject_pattern = subject_pattern
        self.trial_label_key = trial_label_key
        self.atlas = atlas
        self.normalizer: ROINormalizer | None = None
        self._train_stream: LfBWindowStream | None = None

    # -- setup --------------------------------------------------------------------------------------------------
    def open_store(self) -> TarShardIndex:
        shards = expand_shards(self.pattern, "data.path")
        parts = [0] * len(shards)
        if self.split["kind"] == "files":
            if not self.val_pattern:
                raise ConfigError("data.split.kind=files needs data.val_path=<validation shards>")
            val = [s for s in expand_shards(self.val_pattern, "data.val_path") if s not in set(shards)]
            shards, parts = shards + val, parts + [1] * len(val)
        elif self.val_pattern:
            raise ConfigError("data.val_path is set but data.split.kind is not 'files'. Fix: data.split.kind=files")
        index = TarShardIndex(shards, self.subject_pattern, parts)
        self._index_parts = index.parts[index.shard_of]  # 0: data.path, 1: data.val_path, per run
        return index

    def check_store(self, store: TarShardIndex) -> None:
        if self.expected_n_rois is not None and int(self.expected_n_rois) != store.n_rois:
            raise ConfigError(
                f"ROI count mismatch: {store.describe_run(0)} has {store.n_rois} ROIs but data.n_rois="
                f"{self.expected_n_rois}. Fix: set data.n_rois={store.n_rois} (the model's input layer follows it), "
                "or point data.path at the parcellation you meant (Thomas et al.: 1024 DiFuMo networks)")
        for key in self.window:
            if key == "train_stride" and self.window[key] not in (None, 1):
                raise ConfigError("data.window.train_stride is not used on tar shards (windows are drawn at random "
                                  "per run); set data.windows_per_run instead")

    def split_segments(self, subject_ids, lengths, subject_split=None):
        """``{"train"|"val"|"test": [(run, 0, -1), ...]}``: whole runs (lengths are known only when read).

        Raises:
            ConfigError: ``split.kind=time`` (a stream has no run lengths to cut). DataError: a subject in both
                the training and validation shards.
        """
        kind = self.split["kind"]
        if kind == "time":
            raise ConfigError("data.split.kind=time cuts runs in time, which needs their lengths; tar shards are "
                              "streamed. Fix: data.split.kind=subject, or files with data.val_path")
        if kind == "files":
            parts = self._index_parts
            runs = {"train": np.flatnonzero(parts == 0), "val": np.flatnonzero(parts == 1)}
            train_subjects = {subject_ids[r] for r in runs["train"]}
            both = sorted(train_subjects & {subject_ids[r] for r in runs["val"]})
            if both:
                raise DataError(f"subject(s) {both[:5]} are in both data.path and data.val_path shards (a subject in "
                                "two splits leaks it into the evaluation). Fix: write each subject's runs into one set")
            return {"train": [(int(r), 0, -1) for r in runs["train"]], "val": [(int(r), 0, -1) for r in runs["val"]],
                    "test": []}
        segments = super().split_segments(subject_ids, np.full(len(subject_ids), -1), subject_split)
        return {k: [(int(r), 0, -1) for r, _, _ in v] for k, v in segments.items()}

    def after_setup(self) -> None:
        self.normalizer = ROINormalizer.fit(self.store, self.normalization["mode"], float(self.normalization["eps"]))

    def stream(self, split: str, rank_world: tuple[int, int] | None = None) -> LfBWindowStream:
        """The stream of one split (``train``, ``val`` or ``test``; ``test`` falls back to ``val``)."""
        self.setup()
        if split == "test" and not self.segments.get("test"):
            split = "val"
        train = split == "train"
        return LfBWindowStream(
            self.store, [r for r, _, _ in self.segments[split]], self.normalizer, int(self.window["length"]),
            self.batch_size if train else self.eval_batch_size, seed=self.seed, train=train,
            min_length=self.window.get("min_length"), frame_stride=int(self.window.get("frame_stride") or 1),
            eval_stride=self.window.get("eval_stride"), windows_per_run=self.windows_per_run,
            shuffle_buffer=self.shuffle_buffer, n_rois=self.store.n_rois,
            label_key=self.trial_label_key, rank_world=rank_world)

    @property
    def meta(self) -> dict[str, Any]:
        """What a checkpoint must remember about the data (plain containers)."""
        self.setup()
        return {
            **self.base_meta(),
            "path": str(self.pattern),
            "atlas": self.atlas,
            "n_rois": self.store.n_rois,
            "roi_names": None,
            "normalization": {"mode": self.normalization["mode"], "eps": float(self.normalization["eps"])},
            "windows_per_run": self.windows_per_run,
        }

    # -- loaders ------------------------------------------------------------------------------------------------
    def _train_loader_built(self) -> bool:
        return self._train_stream is not None

    def _position(self) -> tuple[int, int]:
        """``(epoch, batches to skip)`` for the epoch that starts now (the resume position once)."""
        trainer = getattr(self, "trainer", None)
        epoch = int(trainer.current_epoch) if trainer is not None else int(self._train_stream.epoch)
        skip = 0
        if self._resume is not None:
            if self._resume[0] == epoch:
                skip = self._resume[1]
            self._resume = None
        return epoch, skip

    def _loader(self, stream: LfBWindowStream, position=None) -> LfBLoader:
        loader = LfBLoader(stream, position=position, num_workers=self.num_workers)
        stream.check()
        return loader

    def train_dataloader(self) -> LfBLoader:
        self._train_stream = self.stream("train")
        return self._loader(self._train_stream, self._position)

    def val_dataloader(self) -> LfBLoader:
        return self._loader(self.stream("val"))

    def test_dataloader(self) -> LfBLoader:
        return self._loader(self.stream("test"))
