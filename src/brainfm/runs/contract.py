"""The data contract of a trained model: what the data must be for the checkpoint to apply to them.

A checkpoint records it under ``hyper_parameters["data_meta"]`` (``meta`` below) and, for ``global``
z-scoring, the statistics under its ``brainfm`` entry:

- atlas and ROI order (``atlas``, ``n_rois``, ``roi_names``): a trained model's input layer is fixed;
- TR in seconds (``tr``: a number, ``"mixed"`` or None), unless the model embeds time in seconds or has
  no time order (:attr:`brainfm.models.backbone.Backbone.any_tr`), which takes the data's TR;
- the volume grid (``shape``) and voxel orientation (``orientation``: ``LAS`` / ``RAS``,
  :mod:`brainfm.data.orientation`) of volume models;
- normalization (``normalization.mode``: ``global`` statistics travel with the checkpoint, ``run``
  statistics are recomputed on the data; volumes: each run's own statistics, or with
  ``data.normalization.statistics=checkpoint`` the training runs' ones, which the checkpoint carries,
  :class:`brainfm.data.normalization.VolumeStatistics`).

:func:`check_compatible` checks a store or a datamodule against it (one TR check, :func:`check_run_tr`, built
on :func:`brainfm.data.datamodules.base.check_tr`; one orientation check, :func:`check_orientation`);
:func:`normalizer_for` and :func:`use_checkpoint_normalization` apply the checkpoint's normalization to the data.

Older checkpoints and stores without an orientation: a checkpoint trained on SwiFT frame folders is taken to be
``LAS``, any other is unknown, as is a store indexed before orientations were recorded; an unknown side is
warned about once and let through (:func:`check_orientation`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
from lightning.pytorch import LightningDataModule

from brainfm.checkpoints import read_data_meta
from brainfm.data.datamodules.base import check_tr
from brainfm.data.normalization import ROINormalizer, VolumeStatistics
from brainfm.data.orientation import store_orientation, trained_orientation, warn_unknown_once
from brainfm.errors import CheckpointError, ConfigError
from brainfm.tasks.base import CHECKPOINT_KEY

log = logging.getLogger(__name__)

#: what :func:`check_compatible` checks (its ``only``)
CHECKS = ("tr", "rois", "grid", "orientation")


def stores_of(data) -> list:
    """The distinct stores of ``data``: a store itself, a datamodule's ``store``, or every store of a datamodule
    with several (R2T's ``stores`` per role, the data sets of ``data=multi``)."""
    if not isinstance(data, LightningDataModule):
        return [data]
    children = getattr(data, "children", None)  # data=multi: its data sets' stores
    if isinstance(children, Mapping) and children:
        return list({id(s): s for dm in children.values() for s in stores_of(dm)}.values())
    stores = getattr(data, "stores", None)
    if isinstance(stores, Mapping) and stores:
        return list({id(s): s for s in stores.values()}.values())
    return [data.store]


def check_compatible(meta: Mapping[str, Any], data, where: str = "the checkpoint", any_tr: bool = False,
                     only: Collection[str] | None = None) -> None:
    """Raise CheckpointError unless ``data`` (a store or a datamodule: each of its stores) has the checkpoint's
    TR, ROI count and order (ROI/grayordinate data) or grid and voxel orientation (volumes).

    Args:
        meta: the checkpoint's ``data_meta``. A ``tr`` of ``"mixed"`` accepts any TR.
        data: a store (``kind``, ``tr``/``trs``, ``n_rois``, ``roi_names`` / ``frame_shape``, ``orientation``
            column) or a datamodule.
        where: how messages name the checkpoint (e.g. ``checkpoint <path>``).
        any_tr: the model takes any TR (it embeds time in seconds, or has no time order): data at another TR
            are accepted and both TRs are logged. Otherwise a TR mismatch is refused with the fix
            (``data.resample_tr``).
        only: check only these parts (of ``tr``, ``rois``, ``grid``, ``orientation``; None: all). Training
            from a checkpoint (``task.init_from``, ``ckpt_path``) checks the orientation only: fine-tuning may
            change the TR, and the model config fixes ROIs and grid.

    A ROI file that records no TR takes the checkpoint's (``store.tr`` is set).

    Raises:
        CheckpointError: TR, ROI count, ROI order, grid or orientation differ; the message names the data, the
            checkpoint and the fix.
        DataError: a store that mixes orientations.
    """
    parts = set(CHECKS if only is None else only)
    for store in stores_of(data):
        if store.kind in ("volume", "frames") and "orientation" in parts:
            check_orientation(meta, store, where)
        if not parts & {"tr", "rois", "grid"}:
            continue
        trained = meta.get("tr")
        if store.kind in ("roi", "grayordinate"):
            if "tr" in parts and (isinstance(trained, (int, float)) or trained is None):  # "mixed": every TR
                tr = check_run_tr(trained, store.tr, str(store.location), where, any_tr=any_tr)
                if store.kind == "roi" and tr is not None:  # a file that records no TR takes the checkpoint's
                    store.tr = tr
            if "rois" in parts and (isinstance(trained, (int, float)) or trained is None):
                check_rois(meta, store, where)
            continue
        if "tr" in parts and isinstance(trained, (int, float)) and not any_tr:
            trs = np.asarray(store.trs, dtype=float)
            bad = np.flatnonzero(~np.isclose(trs, float(trained), atol=1e-3))
            if len(bad):
                i = int(bad[0])
                check_run_tr(trained, float(trs[i]), store.describe_run(i), where,
                             fix=f"resample the data to {float(trained):g} s")
        shape = meta.get("shape")
        grid = store.frame_shape
        if "grid" in parts and shape is not None and grid is not None and list(grid) != [int(s) for s in shape]:
            raise CheckpointError(
                f"grid mismatch: {where} was trained on {list(shape)} volumes but the data hold "
                f"{list(grid)}. Fix: preprocess with --target-shape {' '.join(map(str, shape))}"
            )


def check_training_start(data, init_from: str | os.PathLike | None = None,
                         resume: str | os.PathLike | None = None) -> None:
    """Check the data of a training run that starts from a checkpoint against that checkpoint's data contract
    (:func:`brainfm.checkpoints.read_data_meta`): ``task.init_from`` (weights to fine-tune: a brainfm checkpoint,
    or converted weights such as SwiFT's, ``LAS``) and ``ckpt_path`` (the run being resumed). Only the voxel
    orientation is checked (:func:`check_compatible` with ``only=("orientation",)``): fine-tuning may change
    the TR, and the model config already fixes the ROIs and grid. Weights without a contract (foreign or plain state
    dicts) count as unknown (warned about once, for volume data); a resumed checkpoint without one (a DeepSpeed
    directory) is not checked.

    Raises:
        CheckpointError: the data's orientation differs from the checkpoint's (with the fix); an unreadable file.
        DataError: a store of mixed orientations.
    """
    for key, path in (("task.init_from", init_from), ("ckpt_path", resume)):
        meta = read_data_meta(path) if path else None
        if meta is not None or (path and key == "task.init_from"):
            check_compatible(meta or {}, data, where=f"{key}={path}", only=("orientation",))


def check_orientation(meta: Mapping[str, Any], store, where: str = "the checkpoint") -> None:
    """Raise CheckpointError unless the volumes of ``store`` lie in the voxel orientation the checkpoint's model
    was trained on (:func:`brainfm.data.orientation.trained_orientation` of ``meta``; the store's:
    :func:`brainfm.data.orientation.store_orientation`). Where either is not recorded (older checkpoints and
    stores, module docstring) a warning is logged once and the data are let through.

    Raises:
        CheckpointError: the orientations differ (a model would see every brain mirrored); the fix re-runs
            ``brainfm-preprocess volumes`` with the checkpoint's ``--orientation``.
        DataError: a store of mixed orientations.
    """
    want, have = trained_orientation(meta), store_orientation(store)
    if want is not None and have is not None and want != have:
        raise CheckpointError(
            f"orientation mismatch: {where} was trained on {want} volumes but {store.location} holds {have} volumes; "
            f"the model would see every brain mirrored (fMRIPrep writes RAS; SwiFT's and NeuroSTORM's weights expect "
            f"LAS). Fix: preprocess the runs again in the model's orientation, `brainfm-preprocess volumes --input "
            f"<NIfTI folder | BIDS | fMRIPrep> --output <new store> --orientation {want}`, and use that store")
    if want is None or have is None:
        unknown = "its training data's" if want is None else f"that of {store.location}"
        warn_unknown_once(
            (where, str(store.location)),
            f"voxel orientation not recorded ({unknown}: written by an older brainfm): {where} (orientation "
            f"{want or 'unknown'}) is applied to {store.location} (orientation {have or 'unknown'}) unchecked; "
            "mirrored brains would go unnoticed. Fix: for an older store `brainfm-data index <store>` records each "
            "run's orientation from its affine; `brainfm-preprocess volumes ... --orientation LAS|RAS` writes it")


def check_run_tr(trained: float | None, found: float | None, data: str, where: str = "the checkpoint",
                 any_tr: bool = False, fix: str | None = None) -> float | None:
    """The one TR check of a trained model against data: :func:`brainfm.data.datamodules.base.check_tr` with the
    checkpoint's TR as the expected one.

    Args:
        trained: the TR the model was trained at, seconds (None: not recorded).
        found: the data's TR, seconds (None: not recorded).
        data: how messages name the data (a file, or one run of it).
        where: how messages name the checkpoint.
        any_tr: the model takes any TR: a different TR is logged and accepted.
        fix: the fix a mismatch names (default: resample when the data are read, ``data.resample_tr``, or once
            with ``brainfm-data resample``).

    Returns:
        The TR to use, seconds (``found``, else ``trained``); None where ``any_tr`` accepted another TR.

    Raises:
        CheckpointError: the TRs differ (and not ``any_tr``), or neither is recorded.
    """
    if any_tr and found is not None and trained is not None and abs(float(found) - float(trained)) > 1e-3:
        log.info("data %s at TR %g s, %s trained at TR %g s: the model takes any TR (time in seconds or no "
                 "time order), so it takes the data's TR", data, float(found), where, float(trained))
        return None
    try:
        return check_tr(found, trained, data, key=f"the TR of {where}")
    except ConfigError as exc:
        want = f"{trained:g}" if trained is not None else "<s>"
        fix = fix or (f"resample the data when they are read, data.resample_tr={want} (brainfm-evaluate/extract/"
                      f"predict: +data.resample_tr={want}), or once: brainfm-data resample <in.h5> <out.h5> --tr {want}")
        raise CheckpointError(f"{exc} This model needs its training TR: {fix}") from exc


def check_rois(meta: Mapping[str, Any], store, where: str = "the checkpoint") -> None:
    """Raise CheckpointError unless ``store`` has the checkpoint's ROI count and order (``meta``: its
    ``data_meta``; ROIs of an atlas the file lacks, ``store.roi_mask`` False, have no name to check)."""
    n = meta.get("n_rois")
    if n is not None and int(n) != store.n_rois:
        atlas = meta.get("atlas")
        theirs = getattr(store, "atlas", None)
        fix = (f"a store of atlas {atlas!r}: parcellate the fMRI runs with it (brainfm-preprocess parcellate --input "
               f"<NIfTI/BIDS/fMRIPrep> --atlas {atlas} --output <rois.h5>), or an ROI file that holds "
               f"/timeseries/{atlas}" if atlas else
               f"a store with the {n} ROIs the model was trained on (its atlas, parcellated the same way)")
        raise CheckpointError(
            f"{where} was trained on {n} ROIs{f' of atlas {atlas!r}' if atlas else ''} but {store.location} has "
            f"{store.n_rois}{f' (atlas {theirs!r})' if theirs else ''}. A trained model's input layer is fixed, so "
            f"the data must have its ROIs in its order (data.n_rois cannot change that). Fix: {fix}"
        )
    names, found = meta.get("roi_names"), store.roi_names
    read = getattr(store, "roi_mask", None)
    wrong = [i for i, (a, b) in enumerate(zip(names or [], found or [])) if a != b and (read is None or read[i])]
    if names and found and wrong:
        i = wrong[0]
        raise CheckpointError(
            f"ROI order of {store.location} differs from {where} at index {i}: data {found[i]!r}, "
            f"model {names[i]!r}. Fix: reorder the data's ROIs to the model's order "
            "(roi_names in the checkpoint's data_meta)."
        )


def normalizer_for(ckpt: dict, store) -> ROINormalizer:
    """The checkpoint's z-scoring applied to ``store`` (a ROI store): ``global`` statistics travel with the
    checkpoint, ``run`` statistics are recomputed on the data."""
    state = ckpt[CHECKPOINT_KEY].get("normalization") or {}
    mode = state.get("mode") or ckpt["hyper_parameters"]["data_meta"].get("normalization", {}).get("mode", "run")
    if mode == "global":
        return ROINormalizer.from_state(state, store=store)
    return ROINormalizer.fit(store, mode=mode, eps=float(state.get("eps", 1e-6)))


def use_checkpoint_normalization(ckpt: dict, dm) -> None:
    """Normalize the datamodule ``dm`` (set up) as the checkpoint says, the one place every use of a trained model
    (evaluate, extract, predict, interpret, few-subject curves: :func:`brainfm.runs.load_run`) does it.

    ROI data: with ``global`` z-scoring, the statistics saved in the checkpoint (those of the training data), not
    statistics refitted on the data now given; ``run`` statistics are per run and always come from the data.
    Volume data: ``data.normalization.statistics=store`` (default) normalizes every run with its own statistics,
    as in training; ``checkpoint`` with the training runs' statistics the checkpoint carries
    (:class:`brainfm.data.normalization.VolumeStatistics`, given to the datamodule's ``use_statistics``).

    Raises:
        CheckpointError: ``statistics=checkpoint`` and a checkpoint without training statistics (written before
            brainfm recorded them, or by a datamodule that records none).
        ConfigError: ``data.normalization.statistics`` on data other than brainfm's volume datamodule, or
            statistics without what ``data.normalization.load`` needs.
    """
    state = (ckpt.get(CHECKPOINT_KEY) or {}).get("normalization") or {}
    choice = (getattr(dm, "normalization", None) or {}).get("statistics")
    if hasattr(dm, "use_statistics"):  # volumes
        if choice != "checkpoint":
            return
        if not VolumeStatistics.is_state(state):
            raise CheckpointError(
                f"checkpoint {ckpt.get('_path', '')} carries no statistics of its training data (trained before "
                "brainfm recorded them, or on data that record none), so data.normalization.statistics=checkpoint "
                "cannot apply. Fix: +data.normalization.statistics=store (each run's own statistics, as it was "
                "trained)")
        dm.use_statistics(VolumeStatistics.from_state(state))
        return
    if choice is not None:
        raise ConfigError(
            f"data.normalization.statistics={choice!r} applies to volume data (data=volumes and the volume recipes); "
            "ROI data follow data.normalization.mode (global: the checkpoint's statistics, run: each run's own). "
            "Fix: drop data.normalization.statistics")
    if state.get("mode") != "global" or state.get("mean") is None:
        return
    norm = ROINormalizer.from_state(state)
    if getattr(dm, "normalizer", None) is not None:
        dm.normalizer = norm.bind(dm.store)
    normalizers = getattr(dm, "normalizers", None)
    if isinstance(normalizers, dict):
        for role in list(normalizers):
            normalizers[role] = norm.bind(dm.stores[role])
