"""Fake subjects in each data set's exact on-disk layout, for the recipe tests (tests/test_recipes.py).

Folder and file names, subject-id forms and phenotype tables and columns are those the recipes
(conf/data/<dataset>.yaml) read:

- SwiFT's per-TR layout (UKB, ABCD, HCP, ABIDE): ``<root>/img/<subject folder>/frame_<t>.pt`` (float16
  ``(X, Y, Z, 1)``, global z-norm, background = brain minimum, as SwiFT's ``preprocessing.py`` writes them)
  and ``<root>/metadata/<table>.csv``.
- BIDS (EMBARC, OASIS-3): ``<root>/sub-<id>/ses-<s>/func/sub-<id>_ses-<s>_task-rest_run-<r>_bold.nii.gz``
  (TR in the header), a phenotype table, and the volume store written from them by brainfm-preprocess.

``shape="real"`` writes the data sets' real input grids (UKB 91x109x91, ABCD 79x97x85 rest / 96x96x95 task,
HCP 75x93x81, ABIDE 97x115x97): the crop/pad presets are tested on those. Training tests use a small grid
(``shape="small"``) and crop it to the model's grid with ``data.crop_pad=null``. The values are random;
every subject has its own offset so clips of different subjects differ.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

REAL_SHAPES = {"ukb": (91, 109, 91), "abcd": (79, 97, 85), "abcd_task": (96, 96, 95), "hcp": (75, 93, 81),
               "abide": (97, 115, 97)}
SMALL = (28, 30, 26)
TRS = {"ukb": 0.735, "abcd": 0.8, "hcp": 0.72, "abide": 2.0, "embarc": 2.0, "oasis3": 2.2}


def _grid(name: str, shape) -> tuple[int, int, int]:
    if shape == "real":
        return REAL_SHAPES[name]
    return SMALL if shape in (None, "small") else tuple(shape)


def swift_frames(folder: Path, seed: int, shape, n_frames: int, minmax: bool = False) -> np.ndarray:
    """Write ``frame_<t>.pt`` files as SwiFT's preprocessing does; return the ``(T, X, Y, Z)`` float16 data."""
    rng = np.random.default_rng(seed)
    x, y, z = shape
    gx, gy, gz = np.meshgrid(np.linspace(-1, 1, x), np.linspace(-1, 1, y), np.linspace(-1, 1, z), indexing="ij")
    brain = gx**2 + gy**2 + gz**2 < 0.5
    data = np.zeros((n_frames, *shape), dtype=np.float32)
    data[:, brain] = seed + rng.standard_normal((n_frames, int(brain.sum()))).astype(np.float32)
    if minmax:  # ABCD task: brain scaled to [0, 1], background 0
        lo, hi = data[:, brain].min(), data[:, brain].max()
        data[:, brain] = (data[:, brain] - lo) / (hi - lo)
    else:
        vals = data[:, brain]
        data[:, brain] = (vals - vals.mean()) / vals.std()
        data[:, ~brain] = data[:, brain].min()
    data = data.astype(np.float16)
    folder.mkdir(parents=True, exist_ok=True)
    for t in range(n_frames):
        torch.save(torch.from_numpy(data[t])[..., None].clone(), folder / f"frame_{t}.pt")
    return data


def _write_csv(path: Path, header: list[str], rows: list[list], sep: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=sep)
        w.writerow(header)
        w.writerows(rows)
    return path


def _sexes(n: int) -> list[int]:
    return [i % 2 for i in range(n)]  # alternate female (0) / male (1)


# -- SwiFT layouts ---------------------------------------------------------------------------------------------
def make_ukb(root: Path, n: int = 6, n_frames: int = 8, shape="small", task: bool = False, seed: int = 0) -> dict:
    """UKB: img/<eid>_20227_2_0 (task: _20249_2_0), plus one repeat-imaging folder _20227_3_0 (ignored);
    metadata/UKB_phenotype_gps_fluidint.csv (eid, sex 0/1, age, fluid) and
    metadata/UKB_phenotype_depression_included.csv (eid, sex, age, fluid, Depressed.Current)."""
    field = 20249 if task else 20227
    eids = [str(1000000 + 137 * i + 5) for i in range(n)]
    g = _grid("ukb", shape)
    folders = []
    for i, eid in enumerate(eids):
        swift_frames(root / "img" / f"{eid}_{field}_2_0", seed + i, g, n_frames)
        folders.append(f"{eid}_{field}_2_0")
    swift_frames(root / "img" / f"{eids[0]}_{field}_3_0", seed + 99, g, n_frames)
    sex = _sexes(n)
    rows = [[e, s, 50 + i, 4 + i % 9] for i, (e, s) in enumerate(zip(eids, sex))]
    _write_csv(root / "metadata" / "UKB_phenotype_gps_fluidint.csv", ["eid", "sex", "age", "fluid"], rows)
    _write_csv(root / "metadata" / "UKB_phenotype_depression_included.csv",
               ["eid", "sex", "age", "fluid", "Depressed.Current"], [r + [i % 2] for i, r in enumerate(rows)])
    return {"root": root, "subjects": eids, "folders": folders, "sex": dict(zip(eids, sex)), "tr": TRS["ukb"]}


def abcd_key(i: int) -> str:
    return f"{i:04d}AB{i % 7}Z"[:8].upper().rjust(8, "X")


def make_abcd(root: Path, n: int = 6, n_frames: int = 8, shape="small", task: bool = False, seed: int = 10) -> dict:
    """ABCD: img/sub-NDARINV<8> (BIDS folder form), metadata/ABCD_phenotype_total.csv with NDA's subject
    keys NDAR_INV<8> (subjectkey, sex F/M, age, nihtbx_totalcomp_uncorrected, cbcl_scr_dsm5_depress_t)."""
    keys = [abcd_key(i) for i in range(n)]
    g = _grid("abcd_task" if task else "abcd", shape)
    for i, k in enumerate(keys):
        swift_frames(root / "img" / f"sub-NDARINV{k}", seed + i, g, n_frames, minmax=task)
    sex = _sexes(n)
    rows = [[f"NDAR_INV{k}", "FM"[s], 110 + i, 90 + i, 50 + 3 * i] for i, (k, s) in enumerate(zip(keys, sex))]
    _write_csv(root / "metadata" / "ABCD_phenotype_total.csv",
               ["subjectkey", "sex", "age", "nihtbx_totalcomp_uncorrected", "cbcl_scr_dsm5_depress_t"], rows)
    subjects = [f"NDARINV{k}" for k in keys]
    return {"root": root, "subjects": subjects, "folders": [f"sub-{s}" for s in subjects],
            "sex": dict(zip(subjects, sex)), "tr": TRS["abcd"]}


def make_hcp(root: Path, n: int = 6, n_frames: int = 8, shape="small", seed: int = 20) -> dict:
    """HCP: img/<6-digit id>; metadata/HCP_1200_gender.csv (Subject, Release, Acquisition, Gender F/M, Age bin,
    CogTotalComp_AgeAdj, ...) and metadata/HCP_1200_precise_age.csv (subject, sex, age)."""
    ids = [str(100206 + 101 * i) for i in range(n)]
    g = _grid("hcp", shape)
    for i, s in enumerate(ids):
        swift_frames(root / "img" / s, seed + i, g, n_frames)
    sex = _sexes(n)
    _write_csv(root / "metadata" / "HCP_1200_gender.csv",
               ["Subject", "Release", "Acquisition", "Gender", "Age", "3T_RS-fMRI_Count", "CogTotalComp_AgeAdj"],
               [[s, "S1200", "Q12", "FM"[x], "26-30", 4, 100 + i] for i, (s, x) in enumerate(zip(ids, sex))])
    _write_csv(root / "metadata" / "HCP_1200_precise_age.csv", ["subject", "sex", "age", "race"],
               [[s, "FM"[x], 22 + i, "White"] for i, (s, x) in enumerate(zip(ids, sex))])
    return {"root": root, "subjects": ids, "folders": ids, "sex": dict(zip(ids, sex)), "tr": TRS["hcp"]}


def make_abide(root: Path, n: int = 6, n_frames: int = 8, shape="small", seed: int = 30) -> dict:
    """ABIDE: img/ABIDE1/<SUB_ID> and img/ABIDE2/<SUB_ID>, one subject in both (its ABIDE II copy wins);
    metadata/ABIDE1_pheno.csv and metadata/ABIDE2_pheno_total.csv (SITE_ID, SUB_ID, DX_GROUP 1 autism /
    2 control, SEX 1 male / 2 female, AGE_AT_SCAN, FIQ). Returns ``both``: the subject in both releases."""
    g = _grid("abide", shape)
    half = n // 2
    abide1 = [str(50002 + i) for i in range(half)]
    abide2 = [str(28675 + i) for i in range(n - half)]
    both = abide1[0]
    for i, s in enumerate(abide1):
        swift_frames(root / "img" / "ABIDE1" / s, seed + i, g, n_frames)
    for i, s in enumerate([*abide2, both]):
        swift_frames(root / "img" / "ABIDE2" / s, seed + 50 + i, g, n_frames)
    subjects = abide1 + abide2
    asd = {s: i % 2 for i, s in enumerate(subjects)}  # class 1 = autism
    sex = {s: (i // 2) % 2 for i, s in enumerate(subjects)}  # class 1 = male
    site = {s: ("NYU" if i < half else "ABIDEII-KKI_1") for i, s in enumerate(subjects)}
    header = ["SITE_ID", "SUB_ID", "DX_GROUP", "AGE_AT_SCAN", "SEX", "FIQ"]

    def row(s):
        return [site[s], s, 1 if asd[s] else 2, 12.5, 1 if sex[s] else 2, 105]

    _write_csv(root / "metadata" / "ABIDE1_pheno.csv", header, [row(s) for s in abide1])
    rows2 = [row(s) for s in abide2] + [[site[both], both, 1 if asd[both] else 2, 14.0, 1 if sex[both] else 2, 99]]
    _write_csv(root / "metadata" / "ABIDE2_pheno_total.csv", header, rows2)
    return {"root": root, "subjects": subjects, "both": both, "asd": asd, "sex": sex, "site": site, "tr": TRS["abide"]}


# -- BIDS layouts, written to the volume store -----------------------------------------------------------------
def _bids_run(path: Path, seed: int, shape, n_frames: int, tr: float) -> None:
    import nibabel as nib

    rng = np.random.default_rng(seed)
    x, y, z = shape
    data = np.zeros((x, y, z, n_frames), dtype=np.float32)
    data[2:-2, 2:-2, 2:-2] = 800 + seed + 20 * rng.standard_normal((x - 4, y - 4, z - 4, n_frames))
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = tr
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def _bids(root: Path, runs: list[tuple[str, str, str]], seed: int, shape, n_frames: int, tr: float) -> None:
    (root / "dataset_description.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text('{"Name": "fixture", "BIDSVersion": "1.8.0"}')
    for k, (sub, ses, name) in enumerate(runs):
        _bids_run(root / f"sub-{sub}" / f"ses-{ses}" / "func" / f"sub-{sub}_ses-{ses}_{name}_bold.nii.gz",
                  seed + k, shape, n_frames, tr)


def _store(root: Path, store: Path, shape) -> None:
    from brainfm.data.preprocess.volumes import preprocess_volumes

    preprocess_volumes(root, store, target_shape=shape, progress=False)


def make_embarc(root: Path, n: int = 6, n_frames: int = 8, store_shape=(24, 24, 24), seed: int = 40) -> dict:
    """EMBARC (BIDS): sub-<site code><4 digits>/ses-1/func/..._task-rest_run-1_bold.nii.gz (the first subject
    also run-2 and a task run, which the recipe's runs.include leaves out); participants.tsv
    (participant_id, sex F/M, age, group control/MDD); the store in <root>/derivatives/brainfm."""
    sites = ["CU", "MG", "TX", "UM"]
    ids = [f"{sites[i % 4]}{i + 1:04d}" for i in range(n)]
    runs = [(s, "1", "task-rest_run-1") for s in ids] + [(ids[0], "1", "task-rest_run-2"), (ids[0], "1", "task-ert_run-1")]
    _bids(root, runs, seed, (store_shape[0] + 2, store_shape[1] + 4, store_shape[2] + 2), n_frames, TRS["embarc"])
    sex = _sexes(n)
    group = {s: "MDD" if i % 3 else "control" for i, s in enumerate(ids)}
    _write_csv(root / "participants.tsv", ["participant_id", "sex", "age", "group"],
               [[f"sub-{s}", "FM"[x], 30 + i, group[s]] for i, (s, x) in enumerate(zip(ids, sex))], sep="\t")
    _store(root, root / "derivatives" / "brainfm", store_shape)
    return {"root": root, "store": root / "derivatives" / "brainfm", "subjects": ids, "sex": dict(zip(ids, sex)),
            "group": group, "tr": TRS["embarc"]}


def make_oasis3(root: Path, n: int = 6, n_frames: int = 8, store_shape=(24, 24, 24), seed: int = 50) -> dict:
    """OASIS-3 (BIDS): sub-OAS3<4 digits>/ses-d<days>/func/..._task-rest_run-01_bold.nii.gz, the first subject
    with a second (longitudinal) session; OASIS3_demographics.csv (OASISID, AgeatEntry, GENDER 1 male /
    2 female, ...); the store in <root>/derivatives/brainfm."""
    ids = [f"OAS3{1 + 3 * i:04d}" for i in range(n)]
    runs = [(s, f"d{129 + i:04d}", "task-rest_run-01") for i, s in enumerate(ids)] + [(ids[0], "d3132", "task-rest_run-01")]
    _bids(root, runs, seed, (store_shape[0] + 2, store_shape[1] + 4, store_shape[2] + 2), n_frames, TRS["oasis3"])
    sex = _sexes(n)
    _write_csv(root / "OASIS3_demographics.csv", ["OASISID", "AgeatEntry", "AgeatDeath", "GENDER", "HAND", "EDUC"],
               [[s, 65.5 + i, "", 1 if x else 2, "R", 16] for i, (s, x) in enumerate(zip(ids, sex))])
    _store(root, root / "derivatives" / "brainfm", store_shape)
    return {"root": root, "store": root / "derivatives" / "brainfm", "subjects": ids, "sex": dict(zip(ids, sex)),
            "tr": TRS["oasis3"]}


MAKERS = {"ukb": make_ukb, "abcd": make_abcd, "hcp": make_hcp, "abide": make_abide, "embarc": make_embarc,
          "oasis3": make_oasis3}
