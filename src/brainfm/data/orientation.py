"""Voxel orientation of volume data: which way the array's axes point, as nibabel's ``aff2axcodes`` writes it.

An axis code names where each array axis points in the scanner's (RAS+) world: ``LAS`` is "X runs to the
Left, Y to the Anterior, Z to the Superior", FSL's radiological convention, in which SwiFT (Kim et al.,
NeurIPS 2023; Transconnectome/SwiFT) and NeuroSTORM (CUHK-AIM-Group/NeuroSTORM) were trained and their weights
released; fMRIPrep writes ``RAS``. The same brain in the two orientations is mirrored along X in the array, so a
model trained on one runs on the other without an error and sees a mirrored brain (Brainmarks PR #44 flips
fMRIPrep's RAS to LAS before NeuroSTORM and SwiFT).

brainfm therefore declares one orientation per volume store: ``brainfm-preprocess volumes --orientation LAS|RAS``
reorients each run (:func:`reorient`: nibabel's ``io_orientation`` / ``ornt_transform`` / ``apply_orientation``
/ ``inv_ornt_aff``, the same steps as ``nibabel.Nifti1Image.as_reoriented``) and records ``orientation`` and
``source_orientation`` in the run's ``meta.json`` and the store's index; checkpoints carry the orientation of
their training data (``data_meta["orientation"]``), and :func:`brainfm.runs.check_compatible` refuses data of
another orientation.

What older files are taken to be (:func:`orientation_of_meta`, :func:`trained_orientation`):

- a volume run written before orientations were recorded: the axis codes of its stored affine (those writers
  did not reorient, so the affine says how the array lies); ``brainfm-data index <store>`` records it in the
  index; without an affine (frames converted by ``brainfm-preprocess frames``) ``LAS``, SwiFT's;
- SwiFT frame folders (``img/<subject>/frame_<t>.pt``, read as is or converted) carry no affine: ``LAS``;
- a checkpoint without ``orientation`` in its ``data_meta``: ``LAS`` if trained on frame folders, else unknown:
  the check warns once and lets the data through.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from nibabel.orientations import (
    aff2axcodes,
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

from brainfm.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: Orientations ``brainfm-preprocess volumes --orientation`` writes.
ORIENTATIONS = ("LAS", "RAS")
#: The orientation SwiFT's and NeuroSTORM's released weights expect (FSL's; HCP's minimal preprocessing writes it).
DEFAULT_ORIENTATION = "LAS"
#: What SwiFT frame folders (``img/<subject>/frame_<t>.pt``), which carry no affine, are taken to be.
FRAMES_ORIENTATION = "LAS"

_warned: set[tuple[str, str]] = set()
_WARNED_MAX = 1024


def axcodes(affine: np.ndarray | None) -> str | None:
    """The axis codes of a 4x4 voxel-to-world affine as one string (``"LAS"``; nibabel's ``aff2axcodes``, the
    closest axes of an oblique affine), or None without an affine or for an affine with a degenerate axis."""
    if affine is None:
        return None
    codes = aff2axcodes(np.asarray(affine, dtype=np.float64))
    return None if any(c is None for c in codes) else "".join(codes)


def check_orientation_name(orientation: str, key: str = "--orientation") -> str:
    """``orientation`` upper-cased, checked to be one of :data:`ORIENTATIONS`.

    Raises:
        ConfigError: another value, naming ``key`` and the choices.
    """
    value = str(orientation).upper()
    if value not in ORIENTATIONS:
        raise ConfigError(f"{key} {orientation!r} is not one of {', '.join(ORIENTATIONS)} (axis codes as nibabel's "
                          f"aff2axcodes writes them; {DEFAULT_ORIENTATION} is what SwiFT's and NeuroSTORM's weights "
                          "expect, RAS what fMRIPrep writes)")
    return value


class Reorientation:
    """The flips and axis permutation that take a grid of ``shape`` (X, Y, Z) with ``affine`` to ``target``.

    Attributes:
        source: the source's axis codes (``aff2axcodes`` of ``affine``). target: the target's.
        ornt: nibabel orientation array ``(3, 2)`` from source to target (``ornt_transform``).
        shape: the output grid (X, Y, Z) (axes permuted when the source's are). affine: the output grid's
            affine (``affine @ inv_ornt_aff(ornt, shape)``, as ``Nifti1Image.as_reoriented``).
        identity: the source already lies in the target orientation (nothing is moved).

    Raises:
        ConfigError: an unknown target. DataError: an affine without three distinct axes.
    """

    def __init__(self, affine: np.ndarray, shape: Iterable[int], target: str) -> None:
        self.target = check_orientation_name(target)
        affine = np.asarray(affine, dtype=np.float64)
        source = axcodes(affine)
        if source is None:
            raise DataError(f"the affine {affine.round(3).tolist()} has no three distinct axes; its orientation is "
                            "unknown, so it cannot be reoriented")
        self.source = source
        in_shape = tuple(int(s) for s in shape)
        self.ornt = ornt_transform(io_orientation(affine), axcodes2ornt(self.target))
        self.identity = bool((self.ornt == [[0, 1], [1, 1], [2, 1]]).all())
        self.shape = tuple(int(in_shape[int(a)]) for a in np.argsort(self.ornt[:, 0]))
        self.affine = affine @ inv_ornt_aff(self.ornt, in_shape)

    def volume(self, array: np.ndarray) -> np.ndarray:
        """A 3-D array ``(X, Y, Z)`` (a mask) on the output grid (a view where possible)."""
        return array if self.identity else apply_orientation(array, self.ornt)

    def frames(self, array: np.ndarray) -> np.ndarray:
        """TRs ``(T, X, Y, Z)`` on the output grid (a view where possible)."""
        if self.identity:
            return array
        return np.moveaxis(apply_orientation(np.moveaxis(array, 0, -1), self.ornt), -1, 0)


class ReorientedFrames:
    """A frame source (``n_frames`` TRs of a ``spatial_shape`` grid, :class:`~brainfm.data.stores.volume.FrameSource`)
    read in another orientation: every slab of TRs is flipped/permuted as :class:`Reorientation` says."""

    def __init__(self, source, reorientation: Reorientation) -> None:
        self.source, self.reorientation = source, reorientation
        self.name = source.name
        self.n_frames = int(source.n_frames)
        self.spatial_shape = reorientation.shape

    def read(self, t0: int, t1: int) -> np.ndarray:
        """TRs ``[t0, t1)`` as ``(t1 - t0, X, Y, Z)`` on the output grid."""
        return self.reorientation.frames(np.asarray(self.source.read(t0, t1)))


def orientation_of_meta(meta: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """``(orientation, source_orientation)`` of a volume run's ``meta.json``: as recorded, else (runs written before
    orientations were recorded, which were not reoriented) the axis codes of the stored affine for both, else
    ``LAS`` for frames converted by ``brainfm-preprocess frames`` (:data:`FRAMES_ORIENTATION`), else unknown (None)."""
    if meta.get("orientation"):
        return str(meta["orientation"]), (str(meta["source_orientation"]) if meta.get("source_orientation") else None)
    codes = axcodes(meta.get("affine")) if meta.get("affine") is not None else None
    if codes is None and meta.get("input_kind") == "frames":
        codes = FRAMES_ORIENTATION
    return codes, codes


def store_orientation(store) -> str | None:
    """The one orientation of the volumes of ``store`` (a volume store or a SwiFT frame folder), or None when no
    run records one (a store written before orientations were recorded, indexed before: see the module docstring).

    Raises:
        DataError: runs of several orientations, or some runs with and some without one (named, with the fix).
    """
    try:
        values = store.column("orientation")
    except KeyError:
        return None
    counts = Counter(values)
    if len(counts) <= 1:
        return values[0] if values else None
    known = {k: v for k, v in counts.items() if k is not None}
    first = next(i for i, v in enumerate(values) if v != values[0])
    detail = ", ".join(f"{k}: {v} run(s)" for k, v in sorted(known.items()))
    unknown = counts.get(None, 0)
    again = (f"brainfm-preprocess volumes --input <NIfTI folder | BIDS | fMRIPrep> --output <new store> --orientation "
             f"{DEFAULT_ORIENTATION}`")
    fix = (f"brainfm-data index {store.location}` (runs written before orientations were recorded get theirs from "
           f"their affine); if it then still mixes them, re-run `{again} for every run") if unknown else (
           f"{again} (one orientation for every run)")
    raise DataError(
        f"{store.location} mixes voxel orientations ({detail}{f', not recorded: {unknown} run(s)' if unknown else ''}; "
        f"e.g. {store.describe_run(0)} is {values[0]} and {store.describe_run(first)} is {values[first]}): a model "
        f"would see some brains mirrored. Fix: `{fix}"
    )


def common_orientation(values: Iterable[str | None], what: str) -> str | None:
    """The one orientation of several data sets (``None`` entries: unknown, left out), or None.

    Raises:
        DataError: two different known orientations, naming ``what``.
    """
    known = sorted({v for v in values if v is not None})
    if len(known) > 1:
        raise DataError(f"{what} mix voxel orientations {known}; a model would see some brains mirrored. Fix: "
                        f"preprocess every data set with one --orientation (brainfm-preprocess volumes ... "
                        f"--orientation {DEFAULT_ORIENTATION})")
    return known[0] if known else None


def trained_orientation(meta: Mapping[str, Any]) -> str | None:
    """The orientation a checkpoint's data contract (``data_meta``) says its model was trained on: ``orientation``,
    else (checkpoints written before it was recorded) ``LAS`` for SwiFT frame folders (``layout: frames``), else
    the common one of a multi-data-set run's children, else None (unknown)."""
    if meta.get("orientation"):
        return str(meta["orientation"])
    if meta.get("layout") == "frames":
        return FRAMES_ORIENTATION
    children = meta.get("datasets")
    if isinstance(children, Mapping) and children:
        return common_orientation((trained_orientation(m) for m in children.values() if isinstance(m, Mapping)),
                                  "the data sets of the checkpoint")
    return None


def warn_unknown_once(key: tuple[str, str], message: str) -> None:
    """Log ``message`` as a warning once per process for ``key`` (e.g. ``(checkpoint, store)``)."""
    if key in _warned:
        return
    if len(_warned) >= _WARNED_MAX:  # bounded: a long search over many checkpoints may warn again, never grow
        _warned.clear()
    _warned.add(key)
    log.warning(message)
