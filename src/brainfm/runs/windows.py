"""The windows a trained model is applied to: the evaluation windows of a split of its data, and the store and
window maker of ``brainfm-evaluate``'s protocols (:func:`open_windows`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from brainfm.data.datasets.roi import ROIWindowDataset
from brainfm.data.normalization import ROINormalizer
from brainfm.data.stores import open_store
from brainfm.runs.checkpoint import find_checkpoint, run_dir_of
from brainfm.runs.contract import check_compatible, normalizer_for
from brainfm.runs.load import load_run


def has_split(dm, split: str) -> bool:
    """Whether datamodule ``dm`` has windows in ``split`` (R2T: rest windows)."""
    segments = getattr(dm, "segments", {}) or {}
    value = segments.get(split)
    if isinstance(value, Mapping):  # R2T: per role
        return bool(value.get("rest"))
    return bool(value)


def window_dataset(dm, split: str):
    """The deterministic evaluation windows of ``split``: grid windows of a ROI/volume datamodule, or
    R2T's rest-only windows (every subject of the split with a rest run)."""
    if hasattr(dm, "rest_dataset"):
        return dm.rest_dataset(split)
    return dm.dataset(split)


class Windows(NamedTuple):
    """A store and how to cut it into the windows a trained model takes (:func:`open_windows`).

    Attributes:
        store: the store (ROI, grayordinate or volume).
        make: ``make(segments, length, step) -> dataset``: windows of ``length`` TRs every ``step`` TRs of the
            ``(run, start, stop)`` segments, normalized as the checkpoint was trained.
        volume: True for volume clips (the length is the model's clip length).
    """

    store: Any
    make: Callable[[list, int, int], Any]
    volume: bool


def open_windows(ckpt_path: str | os.PathLike, ckpt: dict, data_path: str | os.PathLike | None = None,
                 any_tr: bool = False, data_overrides: dict | None = None) -> Windows:
    """The store a checkpoint is evaluated on and how to cut it. From the run's ``config.yaml`` when there is one
    (every family: ROI windows, volume clips; :func:`brainfm.runs.load_run`), else (a checkpoint file on its own)
    from the ROI store the checkpoint names (``data_meta["path"]``), checked against the checkpoint
    (:func:`brainfm.runs.check_compatible`) and normalized as it was trained (:func:`brainfm.runs.normalizer_for`).

    Args:
        ckpt_path: the checkpoint file or run directory ``ckpt`` was loaded from.
        ckpt: the loaded checkpoint (:func:`brainfm.runs.load_checkpoint`).
        data_path: other data than the checkpoint's.
        any_tr: the model takes any TR.
        data_overrides: changes to the run's data config (e.g. ``{"resample_tr": 0.72}``).

    Raises:
        CheckpointError / ConfigError / DataError: as :func:`brainfm.runs.load_run` and
            :func:`brainfm.runs.check_compatible`.
    """
    meta = ckpt["hyper_parameters"]["data_meta"]
    if (run_dir_of(find_checkpoint(ckpt_path)) / "config.yaml").is_file():
        overrides = {**({"path": str(data_path)} if data_path else {}), **(data_overrides or {})}
        dm = load_run(ckpt_path, overrides or None).datamodule
        store = dm.store
        if store.kind in ("roi", "grayordinate"):
            norm = dm.normalizer or ROINormalizer(mode="none", store=store)
            return Windows(store, lambda seg, length, step: ROIWindowDataset(store, norm, seg, length, step), False)
        # the datamodule's clips: its load mode and whose statistics (data.normalization.statistics), as every
        # other use of the run
        return Windows(store, lambda seg, length, step: dm.clips(seg, clip_stride=step, return_mask=False,
                                                                 length=length), True)
    store = open_store("roi", data_path or meta["path"], atlas=meta.get("atlas"))
    check_compatible(meta, store, where=f"checkpoint {ckpt['_path']}", any_tr=any_tr)
    norm = normalizer_for(ckpt, store)
    return Windows(store, lambda seg, length, step: ROIWindowDataset(store, norm, seg, length, step), False)
