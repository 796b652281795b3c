"""Synthetic stores in the real layouts, to measure at UK Biobank scale what cannot be held here.

:func:`synth_volumes` writes ``n_runs`` run folders of the volume store (``bold.npy``, ``mask.npy``,
``voxel_mean.npy``, ``voxel_std.npy``, ``meta.json``; :mod:`brainfm.data.stores.volume`) and their run
index, on a small grid so that 45,000 runs fit on a laptop disk; :func:`synth_rois` writes an ROI
HDF5 store. The data are seeded Gaussian noise inside a spherical brain mask (or, with
``data="zeros"``, sparse files that take no disk blocks), z-scored as ``brainfm-preprocess`` would
leave them, with every field a real run's ``meta.json`` has. Runs are written straight to their
folders without the per-file ``fsync`` of :func:`~brainfm.data.stores.volume.write_volume_run`: a
synthetic store is rebuilt, not recovered.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from brainfm.data.stores.index import write_index
from brainfm.data.stores.kinds import META
from brainfm.data.stores.roi import ROIStoreWriter
from brainfm.data.stores.volume import BOLD, LAYOUT, LAYOUT_VERSION, MASK, VOXEL_MEAN, VOXEL_STD, VolumeStore
from brainfm.errors import ConfigError


def _sphere(shape: Sequence[int]) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, int(n)) for n in shape], indexing="ij"))
    return (grid**2).sum(axis=0) <= 1.0


def _npy_header(shape: Sequence[int], dtype) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": tuple(int(s) for s in shape)})
    return buf.getvalue()


def _write_runs(args: tuple) -> list[dict]:
    root, items, n_trs, grid, tr, data, seed = args
    root = Path(root)
    mask = _sphere(grid)
    n_vox = int(np.prod(grid))
    header = _npy_header((n_trs, *grid), np.float16)
    rows = []
    for index, subject, run in items:
        folder = root / subject / run
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, index])
        with open(folder / BOLD, "wb") as f:
            f.write(header)
            if data == "zeros":  # a sparse file: the right size, no data blocks
                f.truncate(len(header) + n_trs * n_vox * 2)
                lo = hi = 0.0
            else:
                x = rng.standard_normal((n_trs, n_vox), dtype=np.float32)
                x[:, ~mask.reshape(-1)] = 0.0
                lo, hi = float(x.min()), float(x.max())
                x[:, ~mask.reshape(-1)] = lo
                f.write(x.astype(np.float16).tobytes())
        np.save(folder / MASK, mask)
        np.save(folder / VOXEL_MEAN, np.where(mask, 0.0, lo).astype(np.float32))
        np.save(folder / VOXEL_STD, mask.astype(np.float32))
        meta = {
            "layout": LAYOUT, "layout_version": LAYOUT_VERSION, "subject": subject, "run": run, "tr": float(tr),
            "n_frames": int(n_trs), "shape": list(grid), "dtype": "float16", "axes": "T X Y Z",
            "affine": np.diag([2.0, 2.0, 2.0, 1.0]).tolist(), "original_shape": [*grid, int(n_trs)],
            "crop_pad": [[0, 0], [0, 0], [0, 0]], "normalization": "global", "global_mean": 1000.0,
            "global_std": 100.0, "min": float(np.float16(lo)), "max": float(np.float16(hi)), "fill": "min",
            "fill_value": float(np.float16(lo)), "mask": {"rule": "synthetic sphere", "brain_voxels": int(mask.sum()),
                                                          "brain_voxels_cropped": 0},
            "source": f"brainfm-data synth (seed {seed}, run {index})", "brainfm_version": "synthetic",
        }
        raw = json.dumps(meta, indent=1).encode()
        (folder / META).write_bytes(raw)
        rows.append({"subject": subject, "run": run, "n_frames": int(n_trs), "tr": float(tr), "shape": list(grid),
                     "dtype": "float16", "data_offset": len(header), "nbytes": len(header) + n_trs * n_vox * 2,
                     "meta_sha1": hashlib.sha1(raw).hexdigest(), **VolumeStore.extra_row(meta)})
    return rows


def run_names(n_runs: int, runs_per_subject: int = 1, subject_format: str = "sub-{i:06d}",
              run_names: Sequence[str] | None = None) -> list[tuple[int, str, str]]:
    """``(index, subject, run)`` of ``n_runs`` runs, ``runs_per_subject`` per subject (the last subject
    may have fewer). Subject ``i`` is ``subject_format.format(i=i)`` (UKB folders: ``"{i:07d}_20227_2_0"``,
    ABCD: ``"sub-NDARINV{i:08d}"``, HCP: ``"{i:06d}"``); runs are ``run-<k>`` (or ``run_names``).

    Raises:
        ConfigError: sizes below 1, too few run names, or a format without ``{i}``.
    """
    k = int(runs_per_subject)
    if k < 1 or n_runs < 1:
        raise ConfigError(f"--runs {n_runs} and --runs-per-subject {runs_per_subject} must be >= 1")
    names = list(run_names) if run_names else [f"run-{j + 1}" for j in range(k)]
    if len(names) < k:
        raise ConfigError(f"{len(names)} run names for {k} runs per subject")
    if subject_format.format(i=0) == subject_format.format(i=1):
        raise ConfigError(f"--subject-format {subject_format!r} must contain {{i}} (e.g. 'sub-{{i:06d}}')")
    return [(i, subject_format.format(i=i // k), names[i % k]) for i in range(int(n_runs))]


def synth_volumes(out: str | os.PathLike, n_runs: int, n_trs: int, grid: Sequence[int], *, tr: float = 0.735,
                  runs_per_subject: int = 1, subject_format: str = "sub-{i:06d}", run_ids: Sequence[str] | None = None,
                  data: str = "random", seed: int = 0, workers: int = 1, chunk: int = 500) -> Path:
    """Write a synthetic volume store of ``n_runs`` runs (module docstring) with its run index.

    Args:
        out: store folder (created; must not hold runs yet).
        n_runs: runs. n_trs: TRs per run (UKB rest: 490). grid: ``(X, Y, Z)`` voxels.
        tr: repetition time in seconds (UKB 0.735, ABCD 0.8, HCP 0.72).
        runs_per_subject: runs per subject (ABCD: 4). subject_format, run_ids: names (:func:`run_names`).
        data: ``random`` (seeded noise) or ``zeros`` (sparse files). seed: the noise seed.
        workers: processes. chunk: runs per work item.

    Returns:
        The store folder.

    Raises:
        ConfigError: bad sizes, an unknown ``data``, or a folder that already holds runs.
    """
    out = Path(out)
    grid = tuple(int(g) for g in grid)
    if len(grid) != 3 or min(grid) < 2 or int(n_trs) < 2:
        raise ConfigError(f"--grid needs three sizes >= 2 and --trs >= 2, got {grid}, {n_trs}")
    if data not in ("random", "zeros"):
        raise ConfigError(f"--data {data!r} must be 'random' or 'zeros'")
    if out.exists() and any(out.glob(f"*/*/{META}")):
        raise ConfigError(f"{out} already holds runs; choose an empty --out")
    out.mkdir(parents=True, exist_ok=True)
    items = run_names(n_runs, runs_per_subject, subject_format, run_ids)
    jobs = [(str(out), items[i:i + chunk], int(n_trs), grid, float(tr), data, int(seed))
            for i in range(0, len(items), chunk)]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=int(workers)) as pool:
            rows = [r for part in pool.map(_write_runs, jobs) for r in part]
    else:
        rows = [r for job in jobs for r in _write_runs(job)]
    write_index(out, rows, VolumeStore.kind)
    return out


def synth_rois(out: str | os.PathLike, n_runs: int, n_trs: int, n_rois: int, *, tr: float = 0.735,
               runs_per_subject: int = 1, subject_format: str = "sub-{i:06d}", atlas: str = "synthetic",
               seed: int = 0) -> Path:
    """Write a synthetic ROI HDF5 store (Brain-Semantoks layout with per-run statistics): AR(1) noise
    around 100 per ROI, ``n_runs`` runs of ``(n_rois, n_trs)``.

    Raises:
        ConfigError: bad sizes.
    """
    from scipy.signal import lfilter

    if int(n_rois) < 1 or int(n_trs) < 2:
        raise ConfigError(f"--rois {n_rois} and --trs {n_trs} must be >= 1 and >= 2")
    names = [f"roi{i}" for i in range(int(n_rois))]
    with ROIStoreWriter(out, tr, {atlas: names}, {"source": f"brainfm-data synth (seed {seed})"}) as writer:
        for index, subject, run in run_names(n_runs, runs_per_subject, subject_format):
            rng = np.random.default_rng([seed, index])
            x = lfilter([1.0], [1.0, -0.8], rng.standard_normal((int(n_rois), int(n_trs))), axis=1)  # AR(1)
            writer.append(subject, run, {atlas: (100.0 + x).astype(np.float32)})
    return Path(out)
