"""WebDataset ``.tar`` shards of parcellated BOLD in the layout of Thomas, Ré & Poldrack (2022).

Source: athms/learning-from-brains (``src/preprocessor.py`` ``write_bold_to_tar`` and ``make_key``,
``scripts/dataprep/upstream|downstream/*_dataprep.py``, ``src/batcher/base.py``). One sample per
subject run (upstream) or per trial of a run (downstream); each sample is a group of tar members
``<key>.<suffix>``:

==========================  =============================================================================
``__key__``                 ``ds-<dataset>_sub-<id>[_ses-..][_task-..][_run-..]`` (downstream trials add
                            ``_sample_<NNN>``); no dot in a key (WebDataset splits names at the first dot)
``bold.pyd``                pickled ``numpy.float32`` array ``(T, n_rois)`` (1024 DiFuMo networks), time first
``t_r.pyd``                 pickled ``numpy.float32`` repetition time in seconds
``task_label.pyd``          downstream: pickled ``int`` label of the sample (the task of the trial)
``label_across_tasks.pyd``  downstream: pickled ``int`` mental-state label across tasks (and other ``*.pyd``
                            integers, e.g. ``label_in_task.pyd``)
==========================  =============================================================================

``.pyd`` members are Python pickles (that is the published format): read shards from sources you trust.

This module is the data-set side: :class:`TarShardIndex` (the run table of a set of shards, read from
the tar headers and the small ``t_r.pyd`` members only), :func:`iter_samples` (a shard's samples, through
``webdataset``), :func:`decode_sample`, and the two converters to and from brainfm's ROI HDF5 store
(:func:`tar_to_h5`, :func:`h5_to_tar`; ``brainfm-data tar-to-h5`` / ``h5-to-tar``). A sample's scalar
``task_label`` becomes the per-TR HDF5 data set :data:`TRIAL_LABELS_TASK` ``(n_runs, T_max)`` int64,
the label over that sample's TRs and :data:`NO_LABEL` elsewhere; the other integer ``*.pyd`` labels
become ``labels/<name>`` (one per run). The streaming windows live in :mod:`brainfm.data.datamodules.lfb_tar`.
"""

from __future__ import annotations

import glob
import logging
import os
import pickle
import re
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brainfm.data.stores.base import StoreBase, common_tr
from brainfm.data.stores.roi import TRIAL_LABELS_GROUP, ROIStore, ROIStoreWriter, run_moments, write_trial_labels
from brainfm.errors import ConfigError, DataError
from brainfm.io import PendingFile, atomic_dir

log = logging.getLogger(__name__)

#: The name of the per-TR labels a sample's ``task_label`` maps to (``/trial_labels/<name>`` of the ROI store).
TRIAL_LABEL_NAME = "task"
#: The HDF5 per-TR label data set a sample's ``task_label`` maps to: ``(n_runs, T_max)`` int64.
TRIAL_LABELS_TASK = f"{TRIAL_LABELS_GROUP}/{TRIAL_LABEL_NAME}"
#: The value of TRs without a label in :data:`TRIAL_LABELS_TASK`.
NO_LABEL = -1
#: Members of a sample that are not labels.
BOLD, TR_KEY, TASK_LABEL = "bold.pyd", "t_r.pyd", "task_label.pyd"
#: LfB keys name the subject as ``sub-<id>`` (``Preprocessor.make_key``).
SUBJECT_PATTERN = r"sub-(?P<subject>[^_]+)"
#: The ``_sample_<NNN>`` suffix of a downstream (trial) key.
_TRIAL_SUFFIX = re.compile(r"_sample_\d+$")


def expand_shards(pattern: str | Sequence[str], what: str = "data.path") -> list[str]:
    """The shard files of a brace pattern (``train-{000000..000099}.tar``, WebDataset's notation), a
    glob (``shards/*.tar``) or a list of either, sorted and de-duplicated.

    Raises:
        ConfigError: nothing given. DataError: a pattern that matches no file (named).
    """
    from webdataset.shardlists import expand_urls

    patterns = [pattern] if isinstance(pattern, (str, os.PathLike)) else list(pattern or [])
    if not patterns:
        raise ConfigError(f"{what} is empty: give a brace pattern or glob of .tar shards")
    found: set[str] = set()
    for pat in patterns:
        pat = os.path.expanduser(str(pat))
        for url in expand_urls(pat):
            matches = glob.glob(url) if glob.has_magic(url) else ([url] if os.path.isfile(url) else [])
            if not matches:
                raise DataError(f"{what}={pat!r}: no shard {url!r}. Fix: point {what} at existing .tar files "
                                "(a brace pattern like 'dir/train-{000000..000009}.tar' or a glob 'dir/*.tar')")
            found.update(os.path.abspath(m) for m in matches)
    return sorted(found)


def split_name(name: str) -> tuple[str | None, str | None]:
    """``(key, suffix)`` of a tar member name, as WebDataset groups them (at the first dot of the base name)."""
    from webdataset.tariterators import base_plus_ext

    return base_plus_ext(name)


def subject_of(key: str, pattern: re.Pattern) -> str:
    """The subject id in a sample key (the ``subject`` group of ``pattern``; the key without a trial
    suffix when it does not match)."""
    m = pattern.search(key)
    if m:
        return m.group("subject")
    return _TRIAL_SUFFIX.sub("", key)


def _unpickle(data: bytes, where: str) -> Any:
    try:
        return pickle.loads(data)
    except Exception as exc:  # a damaged member: pickle raises many kinds
        raise DataError(f"{where} is not a readable pickle ({type(exc).__name__}: {exc}). Fix: write the "
                        "shard again") from exc


class TarShardIndex(StoreBase):
    """The run table of a set of LfB ``.tar`` shards, read from tar headers and ``t_r.pyd`` members.

    Opening seeks over every shard's members (the BOLD is not read, except the first sample's, for the
    ROI count), so it costs one pass over the tar headers. Runs are numbered in shard order (sorted file
    names), then member order.

    Args:
        shards: shard files (:func:`expand_shards`). subject_pattern: regular expression with a group
            ``subject`` found in each key (default :data:`SUBJECT_PATTERN`). parts: optional part number of
            each shard (e.g. 0 training, 1 validation shards).

    Attributes:
        shards: the files. shard_of: ``(n_runs,)`` int64 shard of each run. keys: ``__key__`` of each run.
        subject_ids, run_ids (= keys): lists. trs: ``(n_runs,)`` float64 seconds (NaN without ``t_r.pyd``).
        has_label: ``(n_runs,)`` bool, the sample has ``task_label.pyd``. n_rois: ROIs of the first sample.
        parts: ``(n_shards,)`` int64. lengths: unknown without reading the BOLD: ``(n_runs,)`` of -1.

    Raises:
        DataError: an unreadable shard, a sample without ``bold.pyd``, a duplicate key, a bad ``t_r.pyd``.
    """

    kind = "tar"

    def __init__(self, shards: Sequence[str], subject_pattern: str = SUBJECT_PATTERN,
                 parts: Sequence[int] | None = None) -> None:
        self.shards = [str(s) for s in shards]
        if not self.shards:
            raise ConfigError("no .tar shards given")
        self.location = Path(os.path.commonpath(self.shards)) if len(self.shards) > 1 else Path(self.shards[0])
        try:
            self.pattern = re.compile(subject_pattern)
        except re.error as exc:
            raise ConfigError(f"data.subject_pattern={subject_pattern!r} is not a regular expression ({exc})") from exc
        if "subject" not in self.pattern.groupindex:
            raise ConfigError(f"data.subject_pattern={subject_pattern!r} needs a named group (?P<subject>...)")
        self.parts = np.zeros(len(self.shards), dtype=np.int64) if parts is None else np.asarray(parts, dtype=np.int64)
        keys, shard_of, trs, labels = [], [], [], []
        self._first: tuple[int, str] | None = None  # shard and member name of the first bold.pyd
        seen: dict[str, str] = {}
        for s, path in enumerate(self.shards):
            for key, members, tr in self._scan(path):
                if BOLD not in members:
                    raise DataError(f"{path}: sample {key!r} has no {BOLD} (members: {sorted(members)}). Fix: write "
                                    "each sample with bold.pyd (T x n_rois) as Thomas et al.'s dataprep does")
                if key in seen:
                    raise DataError(f"sample key {key!r} is in {seen[key]} and {path}: keys must be unique. Fix: "
                                    "rename one, or remove the duplicate shard from data.path")
                seen[key] = path
                if self._first is None:
                    self._first = (s, members[BOLD])
                keys.append(key)
                shard_of.append(s)
                trs.append(tr)
                labels.append(TASK_LABEL in members)
        if not keys:
            raise DataError(f"the shards under {self.location} hold no samples")
        self.keys = keys
        self.run_ids = keys
        self.subject_ids = [subject_of(k, self.pattern) for k in keys]
        self.shard_of = np.asarray(shard_of, dtype=np.int64)
        self.trs = np.asarray(trs, dtype=np.float64)
        self.has_label = np.asarray(labels, dtype=bool)
        self.lengths = np.full(len(keys), -1, dtype=np.int64)
        self.run_of = {(int(s), k): i for i, (s, k) in enumerate(zip(shard_of, keys))}
        first = self.read_first()
        if first.ndim != 2:
            raise DataError(f"{self.shards[self._first[0]]}: {keys[0]}.{BOLD} has shape {first.shape}; expected "
                            "(T, n_rois) (time first, as Thomas et al.)")
        self.n_rois = int(first.shape[1])
        self.frame_shape = (self.n_rois,)
        self.roi_names = None

    @staticmethod
    def _scan(path: str) -> Iterator[tuple[str, dict[str, str], float]]:
        """``(key, {suffix: member name}, TR)`` of every sample of one shard, in order."""
        try:
            tf = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by the `with` below, after the error check
        except (OSError, tarfile.TarError) as exc:
            raise DataError(f"{path} cannot be read as a tar file ({exc}). The shard is truncated or not a tar; "
                            "write it again (brainfm-data h5-to-tar writes to a temporary name)") from exc
        key, members, tr = None, {}, np.nan
        with tf:
            try:
                for info in tf:
                    if not info.isreg():
                        continue
                    k, suffix = split_name(info.name)
                    if k is None or k.startswith("__"):
                        continue
                    if k != key:
                        if key is not None:
                            yield key, members, tr
                        key, members, tr = k, {}, np.nan
                    members[suffix.lower()] = info.name
                    if suffix.lower() == TR_KEY:
                        value = _unpickle(tf.extractfile(info).read(), f"{path}: {info.name}")
                        try:
                            tr = float(np.asarray(value).reshape(()))
                        except (TypeError, ValueError) as exc:
                            raise DataError(f"{path}: {info.name} holds {value!r}, not one number of seconds") from exc
                        if not np.isfinite(tr) or tr <= 0:
                            raise DataError(f"{path}: {info.name} is {tr!r}; a TR must be a positive number of "
                                            "seconds. Fix: write the shard again with the run's TR")
            except tarfile.TarError as exc:
                raise DataError(f"{path}: damaged tar file ({exc}); write the shard again") from exc
        if key is not None:
            yield key, members, tr

    def read_first(self) -> np.ndarray:
        """The BOLD ``(T, n_rois)`` float32 of the first sample (read from its shard by member name)."""
        s, name = self._first
        try:
            with tarfile.open(self.shards[s], "r:*") as tf:
                data = tf.extractfile(name).read()
        except (OSError, tarfile.TarError, KeyError) as exc:
            raise DataError(f"{self.shards[s]}: {name} cannot be read ({exc}); write the shard again") from exc
        return np.asarray(_unpickle(data, f"{self.shards[s]}: {name}"), dtype=np.float32)

    def runs_in(self, shard: int) -> np.ndarray:
        """The runs of one shard, in member order."""
        return np.flatnonzero(self.shard_of == shard)

    def describe_run(self, run: int) -> str:
        return f"sample {self.keys[run]!r} (subject {self.subject_ids[run]}) of {self.shards[self.shard_of[run]]}"

    def read(self, run, start=0, stop=None, stride=1, out=None):
        raise DataError(f"{self.location}: tar shards are read as a stream (brainfm.data.datamodules.lfb_tar); "
                        "for random access convert them with `brainfm-data tar-to-h5`")

    def __repr__(self) -> str:
        tr = common_tr(self.trs[np.isfinite(self.trs)]) if np.isfinite(self.trs).any() else None
        return (f"TarShardIndex({self.location}, shards={len(self.shards)}, runs={len(self)}, rois={self.n_rois}, "
                f"tr={tr if tr is not None else 'mixed'}, subjects={len(set(self.subject_ids))})")


def iter_samples(shards: Sequence[str]) -> Iterator[dict[str, Any]]:
    """The raw samples of ``shards`` in order (WebDataset's ``tarfile_samples``: ``{"__key__", "__url__",
    "<suffix>": bytes}``), with a shard's name in errors."""
    from webdataset.tariterators import tarfile_samples

    def reraise(exc: Exception) -> bool:  # webdataset calls it at each level: wrap the first error only
        if isinstance(exc, DataError):  # webdataset appended the stream and url to its args: keep the message
            raise DataError(exc.args[0]) from exc.__cause__
        raise DataError(f"reading WebDataset shard: {exc.args[0] if exc.args else exc}. The shard is truncated or "
                        "damaged; write it again") from exc

    yield from tarfile_samples(({"url": s} for s in shards), handler=reraise)


class SampleRun(StoreBase):
    """One decoded sample as a one-run store, so that brainfm's normalizer and finiteness checks apply
    to it unchanged (:class:`~brainfm.data.normalization.ROINormalizer` ``run`` mode reads
    :meth:`run_stats`: the per-ROI mean and standard deviation over the sample's TRs).

    Args:
        bold: ``(T, n_rois)`` float32. tr: seconds. key, subject: names. shard: its file.
    """

    kind = "sample"

    def __init__(self, bold: np.ndarray, tr: float, key: str, subject: str, shard: str) -> None:
        self.bold = bold
        self.key, self.shard = key, shard
        self.location = Path(shard)
        self.subject_ids, self.run_ids = [subject], [key]
        self.lengths = np.asarray([len(bold)], dtype=np.int64)
        self.trs = np.asarray([tr], dtype=np.float64)
        self.frame_shape = (int(bold.shape[1]),)
        self.roi_names = None
        self._moments = run_moments
        self._stats: dict | None = None

    def read(self, run=0, start=0, stop=None, stride=1, out=None):
        frames = self._frames(run, start, stop, stride)
        x = self.bold[frames.start:frames.stop:frames.step]
        if out is not None:
            out[...] = x
            return out
        return x

    def run_stats(self, run: int = 0) -> dict[str, Any]:
        if self._stats is None:
            mean, std = self._moments(self.bold.T)
            self._stats = {"n": len(self.bold), "mean": mean, "std": std}
        return self._stats

    def describe_run(self, run: int = 0) -> str:
        return f"sample {self.key!r} (subject {self.subject_ids[0]})"


def decode_sample(sample: dict[str, Any], n_rois: int | None = None, tr: float | None = None,
                  subject_pattern: re.Pattern | None = None) -> tuple[SampleRun, dict[str, int]]:
    """Decode one raw sample: ``(SampleRun, {label name: int})`` (labels: the integer ``*.pyd`` members
    besides ``bold.pyd`` and ``t_r.pyd``, named without ``.pyd``).

    Args:
        n_rois: expected ROI count (checked). tr: the TR to use when the sample has no ``t_r.pyd``.

    Raises:
        DataError: a missing or malformed ``bold.pyd``, NaN/inf inside it, a wrong ROI count, no TR.
    """
    key, url = sample["__key__"], sample.get("__url__", "?")
    where = f"{url}: sample {key!r}"
    if BOLD not in sample:
        raise DataError(f"{where} has no {BOLD}")
    bold = np.asarray(_unpickle(sample[BOLD], f"{where}.{BOLD}"), dtype=np.float32)
    if bold.ndim != 2:
        raise DataError(f"{where}: {BOLD} has shape {bold.shape}; expected (T, n_rois)")
    if n_rois is not None and bold.shape[1] != int(n_rois):
        raise DataError(f"{where} has {bold.shape[1]} ROIs, the data set {n_rois}. Fix: parcellate every run with "
                        "the same atlas, or point data.path at shards of one parcellation")
    if TR_KEY in sample:
        value = float(np.asarray(_unpickle(sample[TR_KEY], f"{where}.{TR_KEY}")).reshape(()))
    elif tr is not None:
        value = float(tr)
    else:
        raise DataError(f"{where} has no {TR_KEY}; set data.tr=<seconds>")
    subject = subject_of(key, subject_pattern or re.compile(SUBJECT_PATTERN))
    run = SampleRun(bold, value, key, subject, url)
    if not np.isfinite(bold).all():
        run.check_finite(0)
    labels = {}
    for name, data in sample.items():
        if name.endswith(".pyd") and name not in (BOLD, TR_KEY):
            value_ = _unpickle(data, f"{where}.{name}")
            try:
                labels[name[: -len(".pyd")]] = int(np.asarray(value_).reshape(()))
            except (TypeError, ValueError):
                log.debug("%s: %s is not an integer label; not read", where, name)
    return run, labels


# -- converters ----------------------------------------------------------------------------------------------------
class _RowLabels(Sequence):
    """Per-TR labels of each row, made when asked: row ``i`` is ``(T_i,)`` int64 of its one label."""

    def __init__(self, rows: list[tuple[int, int]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        n, label = self.rows[i]
        return np.full(n, label, dtype=np.int64)


def tar_to_h5(pattern: str | Sequence[str], out: str | os.PathLike, atlas: str = "difumo",
              subject_pattern: str = SUBJECT_PATTERN, tr: float | None = None, shift_s: float = 0.0) -> Path:
    """Convert LfB shards to one ROI HDF5 store (:class:`~brainfm.data.stores.roi.ROIStoreWriter` and
    :func:`~brainfm.data.stores.roi.write_trial_labels`), atomically.

    Each sample becomes a row: ``timeseries/<atlas>`` ``(n_rois, T)`` (the store is ROI-first),
    ``long_subject_id`` from the key (``subject_pattern``), ``run_id`` = the key, the TR as the file's
    ``tr``; ``task_label`` fills :data:`TRIAL_LABELS_TASK` over the sample's TRs (:data:`NO_LABEL`
    elsewhere and in unlabelled samples; class names from the samples' ``task_name`` members where they
    have one, else the label's number); other integer labels go to ``labels/<name>``. ROI names are
    ``<atlas>_<i>`` (the shards carry none).

    Args:
        pattern: brace pattern, glob or list (:func:`expand_shards`). out: the ``.h5`` file.
        atlas: the atlas name under ``/timeseries``. tr: seconds, for samples without ``t_r.pyd``.
        shift_s: the haemodynamic shift (seconds) the labels already include, recorded with them. Thomas
            et al. cut downstream samples with the delay applied: 2.88 s (4 TRs) for HCP, 3 s for MDTB.

    Returns:
        ``out``.

    Raises:
        DataError: samples of different TRs or ROI counts (an ROI store has one TR; convert each data set
            separately), a label present in some samples only, a negative ``task_label``, an unreadable
            shard. Nothing is left at ``out`` on error.
    """
    shards = expand_shards(pattern, "pattern")
    out = Path(out)
    pattern_rx = re.compile(subject_pattern)
    # the writer renames its file to here (and makes the folder); the trial labels are added, then it moves to ``out``
    pending = PendingFile(out, mkdir=False)
    tmp = pending.tmp
    writer = None
    label_names: set[str] | None = None
    trial: list[tuple[int, int]] = []  # (TRs, label) per row, as ROIStoreWriter keeps one label per row
    class_names: dict[int, str] = {}
    first_key = ""
    try:
        for sample in iter_samples(shards):
            run, labels = decode_sample(sample, n_rois=None if writer is None else len(writer.roi_names[atlas]),
                                        tr=tr, subject_pattern=pattern_rx)
            task = labels.pop(TASK_LABEL[: -len(".pyd")], None)
            where = f"{sample.get('__url__')}: sample {run.key!r}"
            if writer is None:
                first_key = where
                writer = ROIStoreWriter(tmp, float(run.trs[0]), {atlas: [f"{atlas}_{i}" for i in range(run.frame_shape[0])]},
                                        attrs={"source": "learning-from-brains tar shards", "shards": len(shards)})
                label_names = set(labels)
            if not np.isclose(run.trs[0], writer.tr, atol=1e-6):
                raise DataError(f"{where} has TR {run.trs[0]:g} s but {first_key} {writer.tr:g} s; an ROI store holds "
                                "one TR. Fix: convert the shards of each data set (TR) into separate .h5 files")
            if set(labels) != label_names:
                raise DataError(f"{where} has labels {sorted(labels)} but {first_key} {sorted(label_names)}. Fix: "
                                "convert samples with the same label members together")
            writer.append(run.subject_ids[0], run.key, {atlas: run.bold.T}, labels)
            if task is not None and task < 0:
                raise DataError(f"{where}: task_label {task} is negative; -1 means 'no label' in the ROI store")
            if task is not None and "task_name" in sample:
                class_names.setdefault(int(task), bytes(sample["task_name"]).decode("utf-8", "replace"))
            trial.append((len(run.bold), NO_LABEL if task is None else int(task)))
        if writer is None:
            raise DataError(f"{pattern}: the shards hold no samples")
        writer.close()
        n_classes = max(label for _, label in trial) + 1
        if n_classes > 0:
            classes = [class_names.get(i, str(i)) for i in range(n_classes)]
            write_trial_labels(tmp, TRIAL_LABEL_NAME, _RowLabels(trial), classes, shift_s=float(shift_s))
        return pending.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        pending.discard()


def _trial_segments(labels: np.ndarray) -> list[tuple[int, int, int]]:
    """``(first TR, stop TR, label)`` of each run of equal labels >= 0 in ``labels`` ``(T,)``."""
    out, t, n = [], 0, len(labels)
    while t < n:
        if labels[t] < 0:
            t += 1
            continue
        stop = t + 1
        while stop < n and labels[stop] == labels[t]:
            stop += 1
        out.append((t, stop, int(labels[t])))
        t = stop
    return out


def sample_key(subject: str, run_id: str, pattern: re.Pattern | None = None) -> str:
    """The LfB key of a store row: its ``run_id`` when that is a valid WebDataset key (no dot or slash) naming
    the row's subject (``pattern``, as rows written by :func:`tar_to_h5`), else ``sub-<subject>_<run_id>``
    (``sub-`` not doubled) with dots and slashes replaced by ``-``."""
    pattern = pattern or re.compile(SUBJECT_PATTERN)
    if re.fullmatch(r"[^./]+", run_id) and subject_of(run_id, pattern) == subject:
        return run_id
    sub = subject if subject.startswith("sub-") else f"sub-{subject}"
    return re.sub(r"[./]", "-", f"{sub}_{run_id}")


def h5_to_tar(path: str | os.PathLike, out_dir: str | os.PathLike, shard_size: int = 100, atlas: str | None = None,
              prefix: str = "shard") -> list[Path]:
    """Write an ROI HDF5 store as LfB shards ``<out_dir>/<prefix>-%06d.tar`` (WebDataset ``ShardWriter``).

    Each row becomes a sample ``{__key__: run_id, bold.pyd: (T, n_rois) float32, t_r.pyd: float32 TR}``
    plus ``<name>.pyd`` for every integer ``labels/<name>``. A row whose :data:`TRIAL_LABELS_TASK` labels
    are one value on all its TRs gets ``task_label.pyd``; a row whose labels change over time or leave TRs
    unlabelled (a labelled task run) becomes one sample per stretch of one label (unlabelled TRs are left
    out), keyed ``<key>_sample_<NNN>`` as Thomas et al.'s downstream shards. Keys: :func:`sample_key`.

    The shards are written into a temporary folder beside ``out_dir`` and moved into place when all are
    written.

    Args:
        path: the ``.h5`` store. out_dir: the folder to create (absent or empty). shard_size: samples per shard.
        atlas: the atlas (default: the only one).

    Returns:
        The shard files.

    Raises:
        DataError: ``out_dir`` exists and is not empty; an unreadable store or one without a TR.
        ConfigError: ``shard_size < 1``.
    """
    import h5py
    import webdataset as wds

    if int(shard_size) < 1:
        raise ConfigError(f"--shard-size {shard_size} must be >= 1")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir} exists and is not an empty folder. Fix: remove it or choose another output folder")
    store = ROIStore(path, atlas=atlas, preload=False)
    if store.tr is None:
        raise DataError(f"{path} records no TR (attribute 'tr'); LfB shards carry one per sample. Fix: write the "
                        "store with its TR")
    with h5py.File(path, "r") as f:
        labels = {name: np.asarray(f["labels"][name][:]) for name in f["labels"]} if "labels" in f else {}
    labels = {k: v for k, v in labels.items() if np.issubdtype(v.dtype, np.integer)}
    has_trials = TRIAL_LABEL_NAME in getattr(store, "trial_label_names", [])
    pattern = re.compile(SUBJECT_PATTERN)
    t_r = np.float32(store.tr)
    seen: set[str] = set()
    with atomic_dir(out_dir) as tmp:  # makes the parent folder
        with wds.ShardWriter(str(tmp / f"{prefix}-%06d.tar"), maxcount=int(shard_size), verbose=0) as sink:
            for run in range(len(store)):
                base = sample_key(store.subject_ids[run], store.run_ids[run], pattern)
                extra = {f"{k}.pyd": int(v[run]) for k, v in labels.items()}
                bold = store.read(run)
                n = int(store.lengths[run])
                row = store.trial_labels(run, TRIAL_LABEL_NAME) if has_trials else None
                if row is None or (row < 0).all():
                    pieces = [(base, 0, n, None)]
                else:
                    segments = _trial_segments(row)
                    if len(segments) == 1 and (row[row >= 0] == segments[0][2]).all() and segments[0][:2] == (0, n):
                        pieces = [(base, 0, n, segments[0][2])]
                    else:
                        pieces = [(f"{base}_sample_{i:03d}", a, b, lab) for i, (a, b, lab) in enumerate(segments, 1)]
                for key, a, b, label in pieces:
                    if key in seen:
                        raise DataError(f"{path}: two rows give the sample key {key!r}; run ids must be unique per "
                                        "subject. Fix: rename the runs")
                    seen.add(key)
                    sample = {"__key__": key, BOLD: np.ascontiguousarray(bold[a:b], dtype=np.float32), TR_KEY: t_r,
                              **extra}
                    if label is not None:
                        sample[TASK_LABEL] = int(label)
                    sink.write(sample)
        if out_dir.exists():
            out_dir.rmdir()  # the empty folder checked above: refuses one filled meanwhile
    return sorted(out_dir.glob(f"{prefix}-*.tar"))


def read_shards(pattern: str | Sequence[str]) -> list[dict[str, Any]]:
    """Every sample of ``pattern`` decoded (``__key__``, ``bold`` ``(T, n_rois)`` float32, ``t_r`` float and the
    integer labels), for tests and small tools (holds all samples in memory)."""
    out = []
    for sample in iter_samples(expand_shards(pattern, "pattern")):
        run, labels = decode_sample(sample)
        out.append({"__key__": run.key, "bold": run.bold, "t_r": float(run.trs[0]), **labels})
    return out


__all__ = ["NO_LABEL", "SUBJECT_PATTERN", "TRIAL_LABELS_TASK", "TRIAL_LABEL_NAME", "SampleRun", "TarShardIndex", "decode_sample",
           "expand_shards", "h5_to_tar", "iter_samples", "read_shards", "sample_key", "tar_to_h5"]
