"""NIfTI runs -> ROI time series of an atlas -> the HDF5 ROI store."""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brainfm.data.preprocess.discover import (
    _UNREADABLE,
    DEFAULT_SPACE,
    NiftiFrames,
    RunSource,
    discover_runs,
    in_memory,
    load_nifti,
    repetition_time,
    strip_nifti,
)
from brainfm.data.preprocess.runner import _run_all
from brainfm.data.stores.rundir import safe_name
from brainfm.errors import ConfigError, DataError


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
        except _UNREADABLE as exc:
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


def _parcellate_one(src: RunSource, atlas: Atlas, tr_override: float | None, use_mask: bool) -> dict:
    from nilearn.maskers import NiftiLabelsMasker, NiftiMapsMasker

    try:
        img = load_nifti(src.path)
        frames = NiftiFrames(src.path, img)
        tr, _ = repetition_time(src.path, img, src.sidecar, tr_override)
        data = frames._raw if frames._raw is not None else None
        if data is not None and not np.isfinite(data).all():
            t = np.flatnonzero(~np.isfinite(data).reshape(-1, frames.n_frames).all(axis=0))
            raise DataError(f"{src.path}: NaN/inf at TR(s) {', '.join(map(str, t[:10]))}; fix the run first")
        mask_img = in_memory(load_nifti(src.mask_path)) if (use_mask and src.mask_path is not None) else None
        kw = dict(standardize=False, resampling_target="data", mask_img=mask_img, t_r=tr)
        masker = (NiftiLabelsMasker(atlas.img, strategy="mean", **kw) if atlas.kind == "labels"
                  else NiftiMapsMasker(atlas.img, **kw))
        import nibabel as nib

        raw = frames._raw if frames._raw is not None else np.asanyarray(img.dataobj)
        raw = raw.reshape(*frames.spatial_shape, frames.n_frames)
        if frames.slope != 1.0 or frames.inter != 0.0:
            raw = raw * frames.slope + frames.inter
        img4 = nib.Nifti1Image(raw, img.affine)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            series = np.asarray(masker.fit_transform(img4), dtype=np.float32).T  # (n_rois, T)
        ids = list(getattr(masker, "region_ids_", {}).values()) if atlas.kind == "labels" else None
        ids = [int(i) for i in ids if str(i) != "background"] if ids else None
        return {"ok": True, "tr": tr, "series": series, "ids": ids}
    except (DataError, ConfigError) as exc:
        return {"ok": False, "error": str(exc)}
    except Exception as exc:
        return {"ok": False, "error": f"{src.path}: {type(exc).__name__}: {exc}"}


def parcellate(
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
) -> Path:
    """ROI time series of every run -> the HDF5 ROI store (``/timeseries/<atlas>``, TR, ROI names).

    Labels atlases use ``NiftiLabelsMasker(strategy="mean")``, 4-D probabilistic atlases (e.g.
    DiFuMo, Thomas et al. 2022's parcellation) ``NiftiMapsMasker``; the atlas is resampled to
    each run's grid (nearest neighbour for labels). The BOLD is not standardised (the ROI data
    module z-scores per run). fMRIPrep brain masks restrict the voxels when present.

    Args:
        input, pattern, space, tr: as :func:`preprocess_volumes`.
        atlas: labels (3-D integer) or maps (4-D) NIfTI, or ``schaefer<N>``/``difumo<N>``.
        output: the ``.h5`` file (written atomically).
        roi_names: ``.tsv``/``.csv`` (``index``, ``name``) or ``.txt`` (one per region, in label
            order); default: a file beside the atlas with the same stem, else ``roi_<label>``.
        atlas_name: name under ``/timeseries`` (default: the atlas file's stem).
        use_brain_mask: restrict to fMRIPrep's brain mask when present.
        workers: parallel processes.

    Raises:
        DataError: unreadable runs (all listed), runs with different TRs, regions missing from a
            run's field of view, or names that do not match the regions.
    """
    from brainfm.data.stores.roi import write_roi_h5

    runs = discover_runs(input, pattern, space)
    at = load_atlas(atlas, roi_names, atlas_name)
    results = _run_all(_parcellate_one, [(r, at, tr, use_brain_mask) for r in runs], workers, progress,
                       "brainfm-preprocess parcellate", False)
    failed = [r["error"] for r in results if not r["ok"]]
    if failed:
        raise DataError(f"{len(failed)} of {len(runs)} run(s) failed; nothing written:\n"
                        + "\n".join(f"  - {e}" for e in failed[:20]))
    trs = sorted({round(r["tr"], 6) for r in results})
    if len(trs) > 1:
        by_tr = {t: [f"{s.subject}/{s.run}" for s, r in zip(runs, results) if round(r["tr"], 6) == t][:3] for t in trs}
        raise DataError(f"runs under {input} have different TRs {by_tr}; an ROI store holds one TR. Fix: "
                        "parcellate each TR into its own file (--pattern), or resample the runs")
    ids = results[0]["ids"]
    n = results[0]["series"].shape[0]
    for s, r in zip(runs, results):
        if r["series"].shape[0] != n or r["ids"] != ids:
            missing = sorted(set(ids or []) - set(r["ids"] or [])) if ids else "?"
            raise DataError(f"{s.path}: {r['series'].shape[0]} regions of the atlas are in its field of view, "
                            f"{n} in {runs[0].path} (missing labels: {missing}); every run must cover every region")
    names = at.roi_names
    if isinstance(names, dict):
        if ids is None:
            raise DataError("ROI names given as an index table need a labels atlas")
        missing = [i for i in ids if i not in names]
        if missing:
            raise DataError(f"ROI names table lacks labels {missing[:10]}")
        names = [names[i] for i in ids]
    elif names is None:
        names = [f"roi_{i}" for i in ids] if ids else [f"roi_{i}" for i in range(n)]
    elif len(names) != n:
        raise DataError(f"{len(names)} ROI names for {n} regions of atlas {at.source}")
    return write_roi_h5(
        output,
        series={at.name: [r["series"] for r in results]},
        subject_ids=[r.subject for r in runs],
        run_ids=[r.run for r in runs],
        tr=float(results[0]["tr"]),
        roi_names={at.name: names},
        attrs={"source": str(input), "atlas": at.source,
               "extraction": "nilearn NiftiLabelsMasker(strategy='mean')" if at.kind == "labels"
               else "nilearn NiftiMapsMasker",
               "units": "BOLD as in the input files (not standardised)",
               "roi_labels": np.asarray(ids if ids else list(range(1, n + 1)), dtype=np.int64)},
    )
