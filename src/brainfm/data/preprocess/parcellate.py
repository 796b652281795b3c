"""NIfTI runs -> ROI time series of an atlas -> the HDF5 ROI store, run by run, sharded and resumable.

:func:`parcellate` never holds more than one run (plus the atlas) in a process:

1. Each run of this shard (``runs[I::N]`` of the runs sorted by (subject, run);
   :mod:`brainfm.data.preprocess.runner`) is parcellated and written atomically (temporary name,
   then rename) as one small **part** ``<output>.parts/<subject>/<run>.npz``: ``series`` float32
   ``(n_rois, T)``, ``tr`` (s), ``ids`` (atlas labels), ``subject``, ``run``, ``source`` (the NIfTI),
   ``status`` (``ok``, or ``skipped-nan`` for a run dropped by ``nan="drop-run"``), the NaN counts and
   ``settings`` (atlas, TR override, brain mask use, NaN policy). A killed job resumes by skipping the
   runs whose part exists with the same settings.
2. When every discovered run has a part, the process that finishes last (``fcntl.flock`` on
   ``<output>.parts/.lock``, so two shards finishing together do not both merge) streams the parts
   in (subject, run) order into the HDF5 with :class:`~brainfm.data.stores.roi.ROIStoreWriter`
   (checking one TR, the same regions in every run and the ROI names, errors naming the run), renames
   it into place, then removes the parts folder. ``merge_only=True`` (``--merge-only``) does only this
   step. The output records a stamp of the settings and runs (root attribute
   ``brainfm_parcellation``): a finished output is not recomputed unless those change or ``overwrite``.

NaN/inf voxels: voxels NaN at every TR are background (left out of every region); a run with voxels
that are NaN/inf at some TRs inside the brain (the fMRIPrep brain mask when used, else the whole field
of view) raises the volume writer's :class:`~brainfm.data.stores.volume.NonFiniteError` (file, TRs,
voxel counts) with ``nan="error"``, is filled with each voxel's temporal mean with ``nan="fill"``, or
is dropped with a warning with ``nan="drop-run"``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainfm.data.preprocess.discover import (
    DEFAULT_SPACE,
    UNREADABLE_ERRORS,
    NiftiFrames,
    RunSource,
    discover_runs,
    load_mask_file,
    load_nifti,
    repetition_time,
    strip_nifti,
)
from brainfm.data.preprocess.runner import parse_shard, run_all
from brainfm.data.preprocess.volumes import NAN_POLICIES
from brainfm.data.stores.roi import ROIStoreWriter
from brainfm.data.stores.rundir import safe_name
from brainfm.data.stores.volume import NonFiniteError, nonfinite_error
from brainfm.errors import ConfigError, DataError
from brainfm.io import atomic_path

PARTS_SUFFIX = ".parts"
PART_FORMAT = 1
STAMP_ATTR = "brainfm_parcellation"


# -- parcellation ------------------------------------------------------------------------------------------------
@dataclass
class Atlas:
    """A parcellation: a 3-D labels image (``kind="labels"``) or 4-D probabilistic maps (``"maps"``)."""

    img: Any
    kind: str
    name: str
    roi_names: list[str] | None
    source: str


def _read_names(path: Path) -> dict[int, str] | list[str]:
    """ROI names: ``.tsv``/``.csv`` with ``index``/``name`` columns (BIDS ``dseg.tsv``; else the
    first two columns) -> {label: name}; ``.txt``: one name per line -> list."""
    if path.suffix in (".tsv", ".csv"):
        import pandas as pd

        df = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
        cols = list(df.columns)
        idx = "index" if "index" in cols else cols[0]
        name = "name" if "name" in cols else cols[1]
        return {int(i): str(n) for i, n in zip(df[idx], df[name])}
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


_NILEARN_ATLASES = {
    "schaefer": ("fetch_atlas_schaefer_2018", "n_rois", "Schaefer 2018 (7 networks, 2 mm)"),
    "difumo": ("fetch_atlas_difumo", "dimension", "DiFuMo (2 mm)"),
}


def load_atlas(atlas: str | os.PathLike, roi_names: str | os.PathLike | None = None, name: str | None = None) -> Atlas:
    """A labels/maps NIfTI file, or a nilearn atlas name (``schaefer<N>``, ``difumo<N>``).

    nilearn's fetchers download on first use (and cache in ``~/nilearn_data``); offline, pass
    the atlas file instead.

    Raises:
        DataError: unreadable file, a labels image with non-integer values, names that do not
            match the regions, or a fetch that fails.
    """
    import nibabel as nib

    spec = str(atlas)
    path = Path(spec)
    names: dict[int, str] | list[str] | None = None
    if path.is_file():
        img = load_nifti(path)
        try:
            data = np.asanyarray(img.dataobj)
        except UNREADABLE_ERRORS as exc:
            raise DataError(f"atlas {path} cannot be read ({exc})") from exc
        if data.ndim == 4 and data.shape[3] > 1:
            img = nib.Nifti1Image(data, img.affine, img.header)
            kind = "maps"
        else:
            data = data.reshape(data.shape[:3])
            if not np.allclose(data, np.round(data)):
                raise DataError(f"atlas {path} is 3-D with non-integer values; a labels image holds integer labels "
                                "(a probabilistic atlas is 4-D: one map per region)")
            img = nib.Nifti1Image(np.round(data).astype(np.int32), img.affine)
            kind = "labels"
        stem = strip_nifti(path.name)
        for ext in (".tsv", ".csv", ".txt"):
            side = path.with_name(stem + ext)
            if roi_names is None and side.is_file():
                roi_names = side
        atlas_name = name or safe_name(stem)
        source = str(path)
    else:
        m = re.fullmatch(r"(schaefer|difumo)(\d+)", spec.lower())
        if not m:
            raise DataError(f"atlas {spec!r} is neither a file nor a known nilearn atlas (schaefer<N>, difumo<N>)")
        fetcher, arg, desc = _NILEARN_ATLASES[m.group(1)]
        from nilearn import datasets

        try:
            kw = {arg: int(m.group(2)), "resolution_mm": 2}
            bunch = getattr(datasets, fetcher)(**kw)
        except Exception as exc:
            raise DataError(f"nilearn could not fetch {spec} ({exc}). Offline: download the atlas elsewhere and "
                            "pass --atlas <labels or maps NIfTI> (--roi-names <tsv|txt>)") from exc
        img = nib.load(bunch.maps) if isinstance(bunch.maps, (str, os.PathLike)) else bunch.maps
        kind = "maps" if len(img.shape) == 4 else "labels"
        labels = bunch.labels
        if hasattr(labels, "columns"):  # DiFuMo: a table
            col = "difumo_names" if "difumo_names" in labels.columns else labels.columns[1]
            labels = list(labels[col])
        labels = [lab.decode() if isinstance(lab, bytes) else str(lab) for lab in labels]
        if labels and labels[0].lower() == "background":
            labels = labels[1:]
        names = labels
        atlas_name = name or spec.lower()
        source = f"nilearn.datasets.{fetcher}({kw})"
    if roi_names is not None:
        names = _read_names(Path(roi_names))
    return Atlas(img, kind, atlas_name, names, source)  # type: ignore[arg-type]


# -- parts -----------------------------------------------------------------------------------------------------
def parts_dir(output: str | os.PathLike) -> Path:
    """The folder of the per-run parts of ``output``: ``<output>.parts``."""
    return Path(str(output) + PARTS_SUFFIX)


def part_path(parts: Path, subject: str, run: str) -> Path:
    """``<parts>/<subject>/<run>.npz`` (subject and run are folder-safe names)."""
    return parts / subject / f"{run}.npz"


def _atlas_settings(at: Atlas, tr: float | None, use_mask: bool, nan: str) -> str:
    """What a part depends on, as canonical JSON: atlas (source, kind, grid and, up to 256 MB, a
    SHA-1 of its values), the TR override, brain mask use and the NaN policy."""
    data = np.asanyarray(at.img.dataobj)
    digest = hashlib.sha1(np.ascontiguousarray(data).tobytes()).hexdigest() if data.nbytes <= 256 << 20 else None
    return json.dumps({"format": PART_FORMAT, "atlas": at.source, "atlas_kind": at.kind,
                       "atlas_shape": [int(v) for v in data.shape],
                       "atlas_affine": np.round(np.asarray(at.img.affine, dtype=np.float64), 5).tolist(),
                       "atlas_sha1": digest, "tr": tr, "use_brain_mask": bool(use_mask), "nan": nan}, sort_keys=True)


def _stamp(settings: str, at: Atlas, runs: Sequence[RunSource]) -> str:
    """SHA-1 of everything the merged file depends on: part settings, atlas name, ROI names, runs."""
    names = at.roi_names if not isinstance(at.roi_names, dict) else sorted(at.roi_names.items())
    payload = json.dumps({"settings": settings, "atlas_name": at.name, "roi_names": names,
                          "runs": [[r.subject, r.run, str(r.path)] for r in runs]})
    return hashlib.sha1(payload.encode()).hexdigest()


def _up_to_date(output: Path, stamp: str) -> bool:
    """``output`` exists and was merged from the same settings and runs."""
    import h5py

    if not output.is_file():
        return False
    try:
        with h5py.File(output, "r") as f:
            got = f.attrs.get(STAMP_ATTR)
    except OSError:
        return False
    return (got.decode() if isinstance(got, bytes) else got) == stamp


def _publish(tmp: Path, path: Path) -> None:
    """The last step before the finished part ``tmp`` is renamed to ``path``: flush it to disk (the tests
    kill a worker here, leaving the part under its temporary name only)."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())


def _write_part(path: Path, **arrays) -> None:
    """``np.savez`` into a temporary sibling, fsync, then rename to ``path`` (:func:`brainfm.io.atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        _publish(tmp, path)


def _read_part(path: Path, settings: str, full: bool = False) -> dict | None:
    """A part's fields (``series`` only with ``full``), or None when it is missing, unreadable
    (e.g. a part a crashed filesystem truncated) or was made with other settings."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["settings"]) != settings:
                return None
            out = {k: z[k] for k in ("tr", "ids", "has_ids", "subject", "run", "source", "status", "message",
                                     "n_rois", "nan_filled_voxels", "nan_filled_values")}
            if full:
                out["series"] = z["series"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    for key in ("subject", "run", "source", "status", "message"):
        out[key] = str(out[key])
    out["tr"], out["has_ids"], out["n_rois"] = float(out["tr"]), bool(out["has_ids"]), int(out["n_rois"])
    out["ids"] = [int(i) for i in out["ids"]] if out["has_ids"] else None
    return out


# -- one run --------------------------------------------------------------------------------------------------
def _brain_nonfinite(raw: np.ndarray, brain: np.ndarray | None, where: str, nan: str) -> tuple[np.ndarray, np.ndarray, int, int]:
    """NaN/inf handling of one run ``raw`` (X, Y, Z, T) in memory, with the volume writer's rules.

    Returns ``(raw, valid, filled_voxels, filled_values)``: ``raw`` with non-finite brain values filled
    (``nan="fill"``) and voxels NaN at every TR set to 0, ``valid`` the voxels not NaN at every TR.

    Raises:
        NonFiniteError: brain voxels NaN/inf at some TRs (``nan`` not ``fill``).
    """
    finite = np.isfinite(raw)
    T = raw.shape[-1]
    if finite.all():
        return raw, np.ones(raw.shape[:3], dtype=bool), 0, 0
    n_bad = T - finite.sum(axis=-1)
    valid = n_bad < T
    bad_brain = (n_bad > 0) & valid & (True if brain is None else brain)
    raw = np.array(raw, dtype=np.result_type(raw.dtype, np.float32), copy=True)
    n_vox, n_val = int(bad_brain.sum()), int(n_bad[bad_brain].sum())
    if n_vox:
        bad = ~finite[bad_brain]  # (k, T)
        if nan != "fill":
            counts = bad.sum(axis=0)
            frames = np.flatnonzero(counts)
            raise nonfinite_error(where, frames, counts[frames], n_vox, T)
        x = raw[bad_brain]
        mean = np.where(bad, 0.0, x).sum(axis=1) / (T - n_bad[bad_brain])
        raw[bad_brain] = np.where(bad, mean[:, None], x)
    raw[~np.isfinite(raw)] = 0.0  # what is left is outside the brain (left out of the regions by the mask)
    return raw, valid, n_vox, n_val


def _parcellate_one(src: RunSource, atlas: Atlas, tr_override: float | None, use_mask: bool, nan: str,
                    part: str, settings: str) -> dict:
    """Parcellate one run and write its part (module docstring); returns ``{"ok", "status", "error"}``."""
    from nilearn.maskers import NiftiLabelsMasker, NiftiMapsMasker

    where = f"{src.path} (subject {src.subject}, run {src.run})"
    base = {"subject": np.str_(src.subject), "run": np.str_(src.run), "source": np.str_(str(src.path)),
            "settings": np.str_(settings)}
    try:
        import nibabel as nib

        img = load_nifti(src.path)
        frames = NiftiFrames(src.path, img)
        notes: list[str] = []
        tr, _ = repetition_time(src.path, img, src.sidecar, tr_override, notes=notes)
        raw = frames._raw if frames._raw is not None else frames._guard(lambda: np.asanyarray(img.dataobj))
        raw = raw.reshape(*frames.spatial_shape, frames.n_frames)
        if frames.slope != 1.0 or frames.inter != 0.0:
            raw = raw * frames.slope + frames.inter
        brain = (load_mask_file(src.mask_path, frames.spatial_shape, frames.affine, src.path)
                 if (use_mask and src.mask_path is not None) else None)
        try:
            raw, valid, n_vox, n_val = _brain_nonfinite(raw, brain, where, nan)
        except NonFiniteError as exc:
            if nan != "drop-run":
                raise
            _write_part(Path(part), series=np.zeros((0, 0), np.float32), tr=np.float64(tr), ids=np.zeros(0, np.int64),
                        has_ids=False, n_rois=0, status="skipped-nan", message=str(exc), nan_filled_voxels=0,
                        nan_filled_values=0, **base)
            return {"ok": True, "status": "skipped-nan", "warning": f"run dropped (--nan drop-run), nothing written: {exc}"}
        keep = valid if brain is None else (brain & valid)
        mask_img = None if keep.all() and brain is None else nib.Nifti1Image(keep.astype(np.uint8), img.affine)
        kw = dict(standardize=False, resampling_target="data", mask_img=mask_img, t_r=tr)
        masker = (NiftiLabelsMasker(atlas.img, strategy="mean", **kw) if atlas.kind == "labels"
                  else NiftiMapsMasker(atlas.img, **kw))
        img4 = nib.Nifti1Image(raw, img.affine)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            series = np.asarray(masker.fit_transform(img4), dtype=np.float32).T  # (n_rois, T)
        del raw, img4
        # region_ids_: {"background": 0 (when the atlas has background voxels), 0: label, 1: label, ...}
        region_ids = getattr(masker, "region_ids_", {}) if atlas.kind == "labels" else {}
        ids = [int(v) for k, v in region_ids.items() if str(k) != "background"] or None
        _write_part(Path(part), series=series, tr=np.float64(tr), ids=np.asarray(ids or [], dtype=np.int64),
                    has_ids=ids is not None, n_rois=series.shape[0], status="ok", message="",
                    nan_filled_voxels=n_vox, nan_filled_values=n_val, **base)
        return {"ok": True, "status": "written", **({"warning": "; ".join(notes)} if notes else {})}
    except (DataError, ConfigError) as exc:
        return {"ok": False, "error": str(exc)}
    except Exception as exc:
        return {"ok": False, "error": f"{src.path}: {type(exc).__name__}: {exc}"}


# -- merge ------------------------------------------------------------------------------------------------------
def _roi_names(at: Atlas, ids: list[int] | None, n: int) -> list[str]:
    names = at.roi_names
    if isinstance(names, dict):
        if ids is None:
            raise DataError("ROI names given as an index table need a labels atlas")
        missing = [i for i in ids if i not in names]
        if missing:
            raise DataError(f"ROI names table lacks labels {missing[:10]}")
        return [names[i] for i in ids]
    if names is None:
        return [f"roi_{i}" for i in ids] if ids else [f"roi_{i}" for i in range(n)]
    if len(names) != n:
        raise DataError(f"{len(names)} ROI names for {n} regions of atlas {at.source}")
    return list(names)


def _merge_parts(runs: Sequence[RunSource], at: Atlas, output: Path, parts: Path, settings: str, stamp: str,
                 input: str) -> Path:
    """Stream the parts of ``runs`` into ``output`` (module docstring, step 2); one run in memory.

    Raises:
        DataError: a missing or stale part, runs with different TRs, a run missing regions, names
            that do not match the regions, every run dropped; nothing is written at ``output``.
    """
    first: dict | None = None
    first_src: RunSource | None = None
    by_tr: dict[float, list[str]] = {}
    coverage: str | None = None
    kept, filled_runs, filled_values, dropped = [], 0, 0, 0
    for src in runs:  # pass 1: the small fields only
        path = part_path(parts, src.subject, src.run)
        info = _read_part(path, settings)
        if info is None:
            raise DataError(f"{path} (subject {src.subject}, run {src.run}) is missing, unreadable or was made with "
                            "other settings (atlas, --tr, --nan, brain mask). Fix: run the shard that owns it again "
                            "(with --overwrite if the settings changed), or delete the part and parcellate again")
        if info["status"] != "ok":
            dropped += 1
            continue
        kept.append(src)
        by_tr.setdefault(round(info["tr"], 6), [])
        if len(by_tr[round(info["tr"], 6)]) < 3:
            by_tr[round(info["tr"], 6)].append(f"{src.subject}/{src.run}")
        filled_runs += info["nan_filled_voxels"] > 0
        filled_values += info["nan_filled_values"]
        if first is None:
            first, first_src = info, src
        elif coverage is None and (info["n_rois"] != first["n_rois"] or info["ids"] != first["ids"]):
            missing = sorted(set(first["ids"] or []) - set(info["ids"] or [])) if first["ids"] else "?"
            coverage = (f"{src.path}: {info['n_rois']} regions of the atlas are in its field of view, "
                        f"{first['n_rois']} in {first_src.path} (missing labels: {missing}); every run must "
                        "cover every region")
    if first is None:
        raise DataError(f"every one of the {len(runs)} run(s) under {input} was dropped (--nan drop-run); nothing "
                        f"to write to {output}")
    if len(by_tr) > 1:
        raise DataError(f"runs under {input} have different TRs {dict(sorted(by_tr.items()))}; an ROI store holds one "
                        "TR. Fix: parcellate each TR into its own file (--pattern), or resample the runs")
    if coverage:
        raise DataError(coverage)
    ids, n = first["ids"], first["n_rois"]
    names = _roi_names(at, ids, n)
    attrs = {"source": str(input), "atlas": at.source,
             "extraction": "nilearn NiftiLabelsMasker(strategy='mean')" if at.kind == "labels"
             else "nilearn NiftiMapsMasker",
             "units": "BOLD as in the input files (not standardised)",
             "roi_labels": np.asarray(ids if ids else list(range(1, n + 1)), dtype=np.int64),
             "nan_policy": json.loads(settings)["nan"], "nan_filled_runs": int(filled_runs),
             "nan_filled_values": int(filled_values), "nan_dropped_runs": int(dropped), STAMP_ATTR: stamp}
    with ROIStoreWriter(output, float(first["tr"]), {at.name: names}, attrs) as writer:
        for src in kept:  # pass 2: one run at a time
            info = _read_part(part_path(parts, src.subject, src.run), settings, full=True)
            if info is None:
                raise DataError(f"{part_path(parts, src.subject, src.run)} changed during the merge; merge again "
                                "(brainfm-preprocess parcellate ... --merge-only)")
            writer.append(src.subject, src.run, {at.name: info["series"]})
    return output


def _merge_when_complete(runs: Sequence[RunSource], at: Atlas, output: Path, parts: Path, settings: str,
                         stamp: str, input: str, required: bool) -> tuple[Path | None, bool]:
    """Merge the parts into ``output`` if every run has one, under ``<parts>/.lock`` (one merger).

    Returns ``(output, True)`` when merged here, ``(output, False)`` when another process merged
    them, ``(None, False)`` when parts are still missing (the last shard merges).

    Raises:
        DataError: parts missing with ``required`` (``--merge-only``), or a failed merge (see
            :func:`_merge_parts`).
    """
    lock = parts / ".lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:  # the parts folder is gone: another process merged
        fd = None
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:  # else the merger that held the lock removed the folder meanwhile
                missing = [r for r in runs if not part_path(parts, r.subject, r.run).is_file()]
                if not missing:
                    _merge_parts(runs, at, output, parts, settings, stamp, input)
                    shutil.rmtree(parts, ignore_errors=True)
                    return output, True
                if required:
                    shown = ", ".join(f"{r.subject}/{r.run}" for r in missing[:10])
                    raise DataError(f"{len(missing)} of {len(runs)} run(s) have no part in {parts} ({shown}"
                                    f"{' ...' if len(missing) > 10 else ''}). Fix: run the shards that own them first "
                                    "(brainfm-preprocess parcellate ... --shard I/N, without --merge-only)")
                return None, False
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
    if _up_to_date(output, stamp):
        return output, False
    if required:
        raise DataError(f"{parts} does not exist and {output} is not a merge of these runs and settings. Fix: "
                        "parcellate first (brainfm-preprocess parcellate ... without --merge-only)")
    return None, False


# -- driver ------------------------------------------------------------------------------------------------------
@dataclass
class ParcellationReport:
    """What :func:`run_parcellation` did: ``output`` (the HDF5, or None while other shards' runs
    lack parts), ``parts`` (the parts folder), runs ``written`` / ``skipped`` (part there before) /
    ``dropped`` (``--nan drop-run``) by this process, ``merged`` (this process wrote the HDF5),
    ``up_to_date`` (nothing to do), ``warnings``."""

    output: Path | None
    parts: Path
    shard: tuple[int, int]
    written: int = 0
    skipped: int = 0
    dropped: int = 0
    merged: bool = False
    up_to_date: bool = False
    warnings: list[str] = field(default_factory=list)


def run_parcellation(
    input: str | os.PathLike,
    atlas: str | os.PathLike,
    output: str | os.PathLike,
    *,
    pattern: str | None = None,
    space: str = DEFAULT_SPACE,
    tr: float | None = None,
    roi_names: str | os.PathLike | None = None,
    atlas_name: str | None = None,
    use_brain_mask: bool = True,
    workers: int = 1,
    progress: bool = True,
    nan: str = "error",
    shard: tuple[int, int] | str | None = None,
    merge_only: bool = False,
    overwrite: bool = False,
) -> ParcellationReport:
    """:func:`parcellate` (same arguments, same errors), returning a :class:`ParcellationReport`
    (counts of this process's runs and whether it merged: what ``brainfm-preprocess parcellate`` prints)."""
    if nan not in NAN_POLICIES:
        raise ConfigError(f"--nan {nan!r} is not one of {NAN_POLICIES}")
    i_shard, n_shards = parse_shard(shard)
    output = Path(output)
    runs = sorted(discover_runs(input, pattern, space), key=lambda r: (r.subject, r.run))
    at = load_atlas(atlas, roi_names, atlas_name)
    settings = _atlas_settings(at, tr, use_brain_mask, nan)
    stamp = _stamp(settings, at, runs)
    parts = parts_dir(output)
    report = ParcellationReport(None, parts, (i_shard, n_shards))
    if not overwrite and not parts.exists() and _up_to_date(output, stamp):
        report.output, report.up_to_date = output, True
        return report
    if not merge_only:
        mine = runs[i_shard::n_shards]
        todo = []
        for r in mine:
            info = None if overwrite else _read_part(part_path(parts, r.subject, r.run), settings)
            if info is None:
                todo.append(r)
            else:
                report.skipped += 1
                report.dropped += info["status"] != "ok"
        parts.mkdir(parents=True, exist_ok=True)
        desc = "brainfm-preprocess parcellate" + (f" (shard {i_shard}/{n_shards})" if n_shards > 1 else "")
        results = run_all(_parcellate_one, [(r, at, tr, use_brain_mask, nan,
                                              str(part_path(parts, r.subject, r.run)), settings) for r in todo],
                           workers, progress, desc, False)
        failed = [r["error"] for r in results if not r["ok"]]
        for r in results:
            if r["ok"]:
                report.written += r["status"] == "written"
                report.dropped += r["status"] == "skipped-nan"
                if r.get("warning"):
                    report.warnings.append(r["warning"])
                    warnings.warn(r["warning"], stacklevel=2)
        if failed:
            with contextlib.suppress(OSError):
                parts.rmdir()  # only if no run has a part: nothing is left behind
            done = report.written + report.skipped
            kept = f"the parts of the other {done} are kept in {parts}" if done else "nothing written"
            raise DataError(f"{len(failed)} of {len(mine)} run(s) failed ({kept}):\n"
                            + "\n".join(f"  - {e}" for e in failed[:20]) + ("\n  ..." if len(failed) > 20 else "")
                            + "\nFix these and run the same command again: runs with a part are skipped.")
    report.output, report.merged = _merge_when_complete(runs, at, output, parts, settings, stamp, str(input),
                                                        merge_only)
    return report


def parcellate(input: str | os.PathLike, atlas: str | os.PathLike, output: str | os.PathLike,
               **options: Any) -> Path | None:
    """ROI time series of every run -> the HDF5 ROI store (``/timeseries/<atlas>``, TR, ROI names),
    one run at a time through per-run parts (module docstring).

    Labels atlases use ``NiftiLabelsMasker(strategy="mean")``, 4-D probabilistic atlases (e.g.
    DiFuMo, Thomas et al. 2022's parcellation) ``NiftiMapsMasker``; the atlas is resampled to
    each run's grid (nearest neighbour for labels). The BOLD is not standardised (the ROI data
    module z-scores per run). fMRIPrep brain masks restrict the voxels when present.

    Args (``options`` are the keywords of :func:`run_parcellation`):
        input, pattern, space, tr: as :func:`~brainfm.data.preprocess.volumes.preprocess_volumes`.
        atlas: labels (3-D integer) or maps (4-D) NIfTI, or ``schaefer<N>``/``difumo<N>``.
        output: the ``.h5`` file (written atomically; parts in ``<output>.parts/`` until the merge).
        roi_names: ``.tsv``/``.csv`` (``index``, ``name``) or ``.txt`` (one per region, in label
            order); default: a file beside the atlas with the same stem, else ``roi_<label>``.
        atlas_name: name under ``/timeseries`` (default: the atlas file's stem).
        use_brain_mask: restrict to fMRIPrep's brain mask when present.
        workers: parallel processes (one run each; peak memory one run plus the atlas per process).
        nan: ``error``, ``fill`` or ``drop-run`` for brain voxels NaN/inf at some TRs (module docstring).
        shard: ``(I, N)`` or ``"I/N"``: parcellate ``runs[I::N]`` of the sorted runs (None: all).
        merge_only: only merge existing parts (every discovered run must have one).
        overwrite: recompute this shard's parts and the output even if they are up to date.

    Returns:
        ``output`` once it is in place (merged by this process or another, or up to date before),
        None while runs of other shards still lack parts (the last shard to finish merges).

    Raises:
        DataError: unreadable runs (all listed; the other runs' parts stay), runs with different
            TRs, regions missing from a run's field of view, names that do not match the regions,
            NaN/inf brain voxels with ``nan="error"``, parts missing with ``merge_only``.
        ConfigError: an invalid ``nan`` or shard.
    """
    return run_parcellation(input, atlas, output, **options).output
