"""Small rest and task runs in brainfm's real layouts, for the R2T tests.

The embedded data are resting state only, so task runs are generated. Every subject has its own
spatial loadings of a few slow latent signals (its "functional fingerprint", shared by its rest
and task runs), and task runs add a task-locked signal: a block design (blocks of ``block_s``
seconds on, as HCP's working-memory blocks) convolved with a gamma HRF, on a task map that is the
same for every subject. Run ids follow HCP: ``REST1_LR`` and ``WM_LR``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def hrf(tr: float, length_s: float = 25.0) -> np.ndarray:
    """Gamma haemodynamic response (peak ~5 s) sampled every ``tr`` seconds, unit sum."""
    t = np.arange(0.0, length_s, tr)
    h = t**5 * np.exp(-t)
    return h / h.sum()


def task_regressor(n_trs: int, tr: float, block_s: float = 25.0) -> np.ndarray:
    """Blocks on/off of ``block_s`` seconds convolved with the HRF, ``(n_trs,)`` in [0, 1]."""
    t = np.arange(n_trs) * tr
    box = ((t // block_s) % 2 == 1).astype(float)
    reg = np.convolve(box, hrf(tr))[:n_trs]
    return reg / max(reg.max(), 1e-9)


def subject_loadings(subject: int, n_values: int, k: int = 4) -> np.ndarray:
    """Subject-specific loadings ``(n_values, k)`` of ``k`` latent signals."""
    return np.random.default_rng(1000 + subject).normal(size=(n_values, k))


def series(subject: int, n_values: int, n_trs: int, tr: float, task: bool, seed: int, k: int = 4,
           task_amplitude: float = 1.0) -> np.ndarray:
    """One run ``(n_trs, n_values)``: the subject's loadings x AR(1) latents + noise (+ task signal), mean 100."""
    rng = np.random.default_rng(seed)
    z = np.zeros((n_trs, k))
    e = rng.normal(size=(n_trs, k))
    for t in range(1, n_trs):
        z[t] = 0.8 * z[t - 1] + e[t]
    x = z @ subject_loadings(subject, n_values, k).T + 0.3 * rng.normal(size=(n_trs, n_values))
    if task:
        task_map = np.random.default_rng(7).normal(size=n_values)
        x = x + task_amplitude * 3.0 * task_regressor(n_trs, tr)[:, None] * task_map[None, :]
    return 100.0 + x


def subject_ids(n: int) -> list[str]:
    return [f"{100000 + 1111 * i}" for i in range(n)]


def write_roi_pairs(path: Path, n_subjects: int = 6, n_rois: int = 12, rest_trs: int = 120, task_trs: int = 60,
                    tr: float = 0.72, no_task: tuple[int, ...] = (), task_path: Path | None = None,
                    roi_names: list[str] | None = None, atlas: str = "toy") -> tuple[Path, Path | None]:
    """ROI HDF5 store(s) (Brain-Semantoks layout) with ``REST1_LR`` runs for every subject and
    ``WM_LR`` runs for all but ``no_task``; the task runs go to ``task_path`` when given."""
    from brainfm.data.stores.roi import write_roi_h5

    ids = subject_ids(n_subjects)
    names = roi_names or [f"roi{i}" for i in range(n_rois)]
    rest = [(s, "REST1_LR", series(i, n_rois, rest_trs, tr, False, seed=10 * i).T) for i, s in enumerate(ids)]
    task = [(s, "WM_LR", series(i, n_rois, task_trs, tr, True, seed=10 * i + 1).T)
            for i, s in enumerate(ids) if i not in no_task]

    def write(p: Path, rows) -> Path:
        return write_roi_h5(p, series={atlas: [r[2] for r in rows]}, subject_ids=[r[0] for r in rows], tr=tr,
                            roi_names={atlas: names}, run_ids=[r[1] for r in rows])

    if task_path is None:
        return write(path, rest + task), None
    return write(path, rest), write(task_path, task)


def write_grayordinate_pairs(root: Path, n_subjects: int = 4, n_grayordinates: int = 200, rest_trs: int = 60,
                             task_trs: int = 40, tr: float = 0.72, dtseries_dir: Path | None = None,
                             no_task: tuple[int, ...] = ()) -> Path:
    """A grayordinate store with ``REST1_LR`` and ``WM_LR`` runs; through ``.dtseries.nii`` files
    (nibabel, left/right cortex brain models) when ``dtseries_dir`` is given."""
    from brainfm.data.stores.grayordinate import write_grayordinate_run

    for i, s in enumerate(subject_ids(n_subjects)):
        for run, task, n in (("REST1_LR", False, rest_trs), ("WM_LR", True, task_trs)):
            if task and i in no_task:
                continue
            data = series(i, n_grayordinates, n, tr, task, seed=10 * i + int(task)).astype(np.float32)
            if dtseries_dir is not None:
                src = write_dtseries(dtseries_dir / f"{s}_{run}.dtseries.nii", data, tr)
                write_grayordinate_run(root, s, run, src)
            else:
                write_grayordinate_run(root, s, run, data, tr=tr)
    return root


def write_dtseries(path: Path, data: np.ndarray, tr: float) -> Path:
    """A CIFTI-2 dense time series ``(T, N)`` with N/2 left and N/2 right cortical vertices."""
    import nibabel as nib
    from nibabel.cifti2 import BrainModelAxis, SeriesAxis

    n = data.shape[1]
    left = BrainModelAxis.from_mask(np.ones(n // 2, dtype=bool), name="CortexLeft")
    right = BrainModelAxis.from_mask(np.ones(n - n // 2, dtype=bool), name="CortexRight")
    series_axis = SeriesAxis(start=0.0, step=tr, size=data.shape[0], unit="SECOND")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Cifti2Image(np.asarray(data, dtype=np.float32), header=(series_axis, left + right)), str(path))
    return path


def write_volume_pairs(root: Path, n_subjects: int = 4, shape=(8, 8, 8), rest_trs: int = 24, task_trs: int = 16,
                       tr: float = 0.72) -> Path:
    """A volume store with ``REST1_LR`` and ``WM_LR`` runs: a subject-specific anatomy (static map)
    plus its latent loadings over the brain voxels, and the task signal in task runs."""
    from brainfm.data.stores.volume import write_volume_run

    mask = np.zeros(shape, dtype=bool)
    mask[1:-1, 1:-1, 1:-1] = True
    n_vox = int(mask.sum())
    for i, s in enumerate(subject_ids(n_subjects)):
        anatomy = np.random.default_rng(500 + i).uniform(800, 1200, n_vox)
        for run, task, n in (("REST1_LR", False, rest_trs), ("WM_LR", True, task_trs)):
            x = series(i, n_vox, n, tr, task, seed=10 * i + int(task)) - 100.0
            frames = np.zeros((n, *shape))
            frames[:, mask] = anatomy[None, :] + 20.0 * x
            write_volume_run(root, s, run, frames, tr=tr, mask=mask, affine=np.eye(4))
    return root


def write_labels(path: Path, subjects: list[str], seed: int = 0) -> Path:
    """HCP-like behavioural CSV: ``Subject``, working-memory and relational accuracies, ``Gender``."""
    rng = np.random.default_rng(seed)
    rows = ["Subject,WM_Task_0bk_Acc,WM_Task_2bk_Acc,Relational_Task_Acc,Gender"]
    for i, s in enumerate(subjects):
        acc = np.clip(rng.normal([0.9, 0.8, 0.75], 0.05), 0, 1)
        rows.append(f"{s},{acc[0]:.4f},{acc[1]:.4f},{acc[2]:.4f},{'FM'[i % 2]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return path
