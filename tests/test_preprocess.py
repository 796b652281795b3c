"""brainfm-preprocess on real NIfTI (the nitime/nipy runs of nifti_toy) and on the files users get
wrong: truncated, 3-D, no TR, NaN frames, BIDS sidecars, fMRIPrep masks; parcellation to the ROI store."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from brainfm.config import repo_root
from brainfm.data.preprocess.discover import discover_runs
from brainfm.data.preprocess.parcellate import parcellate
from brainfm.data.preprocess.volumes import preprocess_volumes
from brainfm.data.stores.roi import ROIStore
from brainfm.data.stores.volume import VolumeStore
from brainfm.errors import ConfigError, DataError

TOY_RUNS = [("sub-nipy", "run-1"), ("sub-nitime", "run-1"), ("sub-nitime", "run-2")]
#: the affine of the synthetic runs: 2 mm voxels in FSL's LAS orientation (stored as they lie by default)
LAS_2MM = np.diag([-2.0, 2.0, 2.0, 1.0])


@pytest.fixture(scope="session")
def toy_dir() -> Path:
    """``data/nifti_toy``, extracted from the nitime/nipy wheels if missing."""
    from brainfm.data.embedded import fetch_nifti_toy

    return fetch_nifti_toy(repo_root() / "data")


@pytest.fixture(scope="session")
def toy_store(toy_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy") / "store"
    preprocess_volumes(toy_dir, out, target_shape=(48, 48, 48), progress=False)
    return out


def _nifti(path: Path, data: np.ndarray, tr: float = 2.0, unit: str = "sec", affine=None) -> Path:
    """A NIfTI file of ``data``; the default affine is LAS, 2 mm (FSL's orientation, the one brainfm-preprocess
    stores by default: its voxels stay where they are)."""
    img = nib.Nifti1Image(data, LAS_2MM if affine is None else affine)
    img.header.set_xyzt_units("mm", unit)
    if data.ndim == 4:
        img.header["pixdim"][4] = tr
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def _bold(seed: int = 0, shape=(8, 9, 7), t: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = np.zeros((*shape, t), dtype=np.float32)
    data[2:-2, 2:-2, 1:-1] = 800 + 20 * rng.standard_normal((shape[0] - 4, shape[1] - 4, shape[2] - 2, t))
    return data


# -- the real toy data ---------------------------------------------------------------------------------
def test_toy_runs_preprocess_to_a_48_cube(toy_dir, toy_store):
    store = VolumeStore(toy_store)
    assert list(zip(store.subject_ids, store.run_ids)) == TOY_RUNS
    assert store.shape == (48, 48, 48) and store.lengths.tolist() == [20, 40, 40]
    assert store.trs.tolist() == [2.0, 1.35, 1.35]
    # nipy's run is LAS; nitime's are LSP (10, 10, 18), stored LAS (the default) on a (10, 18, 10) grid
    for i, (orig, cp, source) in enumerate([([17, 21, 3, 20], [[15, 16], [13, 14], [22, 23]], "LAS"),
                                            ([10, 18, 10, 40], [[19, 19], [15, 15], [19, 19]], "LSP"),
                                            ([10, 18, 10, 40], [[19, 19], [15, 15], [19, 19]], "LSP")]):
        meta = store.meta(i)
        assert meta["original_shape"] == orig and meta["crop_pad"] == cp
        assert meta["orientation"] == "LAS" and meta["source_orientation"] == source
        assert meta["tr_source"].startswith("header pixdim[4]") and meta["source_dtype"] == "int16"
        assert meta["normalization"] == "global" and meta["fill"] == "min"
        bold, mask = store.memmap(i), store.mask(i)
        brain = bold[:, mask].astype(np.float64)
        assert abs(brain.mean()) < 2e-3 and brain.std() == pytest.approx(1.0, abs=2e-3)
        assert (bold[:, ~mask] == np.float16(meta["fill_value"])).all() and meta["fill_value"] == float(brain.min())
        assert 0.8 < meta["mask"]["brain_voxels"] / np.prod(orig[:3]) <= 1.0  # in-brain fields of view
    img = nib.load(str(toy_dir / "sub-nitime_run-1_bold.nii.gz"))
    las = img.as_reoriented(ornt_transform(io_orientation(img.affine), axcodes2ornt("LAS")))  # nibabel's own
    np.testing.assert_allclose(np.array(store.meta(1)["affine"]), las.affine @ np.array(
        [[1, 0, 0, -19], [0, 1, 0, -15], [0, 0, 1, -19], [0, 0, 0, 1]]), atol=1e-4)
    # the stored values are the raw BOLD, reoriented and z-scored: check one voxel's time course (source voxel
    # [4, 5, 9] of the LSP grid is [4, 17 - 9, 5] of the LAS one)
    raw = np.asanyarray(las.dataobj).astype(np.float64)
    np.testing.assert_array_equal(raw[4, 8, 5], np.asanyarray(img.dataobj)[4, 5, 9])
    meta = store.meta(1)
    z = (raw[4, 8, 5, :] - meta["global_mean"]) / meta["global_std"]
    np.testing.assert_allclose(store.memmap(1)[:, 4 + 19, 8 + 15, 5 + 19], z, atol=4e-3)
    assert "nitime" not in sys.modules and "nipy" not in sys.modules


def test_second_run_skips_finished_runs_and_redoes_missing_ones(toy_dir, tmp_path):
    import shutil

    out = tmp_path / "store"
    preprocess_volumes(toy_dir, out, target_shape=(48, 48, 48), progress=False, workers=2)
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/*/bold.npy")}
    assert len(mtimes) == 3
    results = preprocess_volumes(toy_dir, out, target_shape=(48, 48, 48), progress=False)
    assert [r.status for r in results] == ["skipped"] * 3
    shutil.rmtree(out / "sub-nitime" / "run-2")
    results = preprocess_volumes(toy_dir, out, target_shape=(48, 48, 48), progress=False)
    assert [r.status for r in results] == ["skipped", "skipped", "written"]
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items() if "run-2" not in str(p))


def test_toy_recipe_batches_feed_swin4d(toy_store):
    from hydra.utils import instantiate

    from brainfm.config import compose

    cfg = compose("train", ["data=nifti_toy", f"data.path={toy_store}"])
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup()
    assert dm.meta["tr"] == "mixed" and dm.meta["shape"] == [48, 48, 48] and dm.meta["window_length"] == 8
    batch = next(iter(dm.train_dataloader()))
    assert batch["volume"].shape == (2, 1, 48, 48, 48, 8) and batch["volume"].dtype == torch.float16
    from brainfm.models.swin4d import SwinTransformer4D

    model = SwinTransformer4D(img_size=(48, 48, 48, 8), embed_dim=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                              window_size=(4, 4, 4, 4), first_window_size=(2, 2, 2, 2))
    with torch.no_grad():
        out = model(batch["volume"])
    assert out.shape[0] == 2 and out.shape[-1] == 8 and torch.isfinite(out).all()


def test_toy_recipe_simmim_smoke_training(toy_store, tmp_path):
    if not (repo_root() / "conf" / "task" / "simmim.yaml").is_file():
        pytest.skip("task=simmim is not in this checkout")
    from brainfm import training as train
    from brainfm.config import compose

    cfg = compose("train", [
        "data=nifti_toy", f"data.path={toy_store}", "model=swin4d_v7", "task=simmim",
        "model.img_size=[48,48,48,8]", "model.embed_dim=12", "model.depths=[1,1,1,1]", "model.num_heads=[1,1,1,1]",
        "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "logger=csv",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "callbacks=none",
        f"paths.output_dir={tmp_path}", f"paths.split_dir={tmp_path}/splits",
    ])
    metrics = train.run(cfg)
    assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["val/loss"])


# -- inputs users get wrong ---------------------------------------------------------------------------------
def test_truncated_nifti_is_named_and_the_other_runs_are_kept(toy_dir, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    good = (toy_dir / "sub-nitime_run-1_bold.nii.gz").read_bytes()
    (inp / "sub-01_bold.nii.gz").write_bytes(good)
    (inp / "sub-02_bold.nii.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"(?s)1 of 2 run\(s\) failed .*sub-02_bold.nii.gz: reading the image data failed.*truncated or corrupt"):
        preprocess_volumes(inp, tmp_path / "out", progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".index.lock", "index.parquet", "sub-01"]
    assert [p.name for p in (tmp_path / "out" / "sub-01").iterdir()] == ["run-1"]  # no temporary folder left
    store = VolumeStore(tmp_path / "out")
    assert store.indexed and store.subject_ids == ["sub-01"]  # the finished run is indexed


def test_large_files_stream_in_slabs(toy_dir, tmp_path):
    from brainfm.data.preprocess.discover import NiftiFrames
    from brainfm.data.stores.volume import write_volume_run

    path = toy_dir / "sub-nipy_run-1_bold.nii.gz"
    whole, slabs = NiftiFrames(path), NiftiFrames(path, in_memory_mb=0)  # scaled int16 (scl_slope)
    assert whole._raw is not None and slabs._raw is None
    np.testing.assert_array_equal(slabs.read(3, 9), whole.read(3, 9))
    assert whole.read(0, 20).shape == (20, 17, 21, 3) and whole.read(0, 1).dtype == np.float64
    a = write_volume_run(tmp_path, "a", "r", whole, tr=2.0, mask="threshold")
    b = write_volume_run(tmp_path, "b", "r", NiftiFrames(path, in_memory_mb=0), tr=2.0, mask="threshold", chunk_frames=3)
    np.testing.assert_array_equal(np.load(a / "bold.npy"), np.load(b / "bold.npy"))


def test_3d_file_where_4d_is_expected(tmp_path):
    _nifti(tmp_path / "in" / "sub-01_T1w.nii.gz", _bold()[..., 0])
    with pytest.raises(DataError, match=r"sub-01_T1w.nii.gz has shape \(8, 9, 7\): a 3-D image.*expects 4-D BOLD"):
        preprocess_volumes(tmp_path / "in", tmp_path / "out", progress=False)


def test_repetition_time_sources_and_errors(tmp_path):
    _nifti(tmp_path / "none" / "a_bold.nii.gz", _bold(), tr=0.0)
    with pytest.raises(DataError, match=r"no repetition time.*pixdim\[4\] is 0.*--tr"):
        preprocess_volumes(tmp_path / "none", tmp_path / "o1", progress=False)
    r = preprocess_volumes(tmp_path / "none", tmp_path / "o1", progress=False, tr=0.8)
    meta = VolumeStore(tmp_path / "o1").meta(0)
    assert r[0].status == "written" and meta["tr"] == 0.8 and meta["tr_source"] == "--tr"
    _nifti(tmp_path / "bad" / "a_bold.nii.gz", _bold(), tr=2000.0, unit="sec")
    with pytest.raises(DataError, match="implausible repetition time 2000 s"):
        preprocess_volumes(tmp_path / "bad", tmp_path / "o2", progress=False)
    _nifti(tmp_path / "ms" / "a_bold.nii.gz", _bold(), tr=720.0, unit="msec")
    preprocess_volumes(tmp_path / "ms", tmp_path / "o3", progress=False)
    assert VolumeStore(tmp_path / "o3").tr == 0.72
    _nifti(tmp_path / "side" / "a_bold.nii.gz", _bold(), tr=1.0)
    (tmp_path / "side" / "a_bold.json").write_text(json.dumps({"RepetitionTime": 1.5}))
    preprocess_volumes(tmp_path / "side", tmp_path / "o4", progress=False)
    assert VolumeStore(tmp_path / "o4").meta(0)["tr_source"] == "sidecar RepetitionTime"
    assert VolumeStore(tmp_path / "o4").tr == 1.5


def test_nan_frames_name_the_file_and_trs(tmp_path):
    data = _bold()
    data[4, 4, 3, [2, 9]] = np.nan
    _nifti(tmp_path / "in" / "sub-07_bold.nii.gz", data)
    with pytest.raises(DataError, match=r"sub-07_bold.nii.gz \(subject sub-07, run run-1\): NaN/inf .* TR\(s\) 2, 9"):
        preprocess_volumes(tmp_path / "in", tmp_path / "out", progress=False)


def test_bids_sidecar_inheritance_and_ids(tmp_path):
    root = tmp_path / "bids"
    (root).mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.8.0"}))
    (root / "task-rest_bold.json").write_text(json.dumps({"RepetitionTime": 0.8}))
    _nifti(root / "sub-01" / "func" / "sub-01_task-rest_bold.nii.gz", _bold(1), tr=1.0)
    _nifti(root / "sub-02" / "ses-1" / "func" / "sub-02_ses-1_task-rest_run-2_bold.nii.gz", _bold(2), tr=1.0)
    (root / "sub-02" / "ses-1" / "func" / "sub-02_ses-1_task-rest_run-2_bold.json").write_text(
        json.dumps({"RepetitionTime": 0.9}))
    _nifti(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz", _bold()[..., 0])  # not a run
    runs = discover_runs(root)
    assert [(r.kind, r.subject, r.run, r.sidecar["RepetitionTime"]) for r in runs] == [
        ("bids", "sub-01", "task-rest", 0.8), ("bids", "sub-02", "ses-1_task-rest_run-2", 0.9)]
    preprocess_volumes(root, tmp_path / "out", progress=False)
    assert VolumeStore(tmp_path / "out").trs.tolist() == [0.8, 0.9]


def test_fmriprep_space_and_brain_mask(tmp_path):
    root = tmp_path / "fmriprep"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "fMRIPrep - fMRI PREProcessing workflow",
                                                               "GeneratedBy": [{"Name": "fMRIPrep", "Version": "23.2.0"}]}))
    func = root / "sub-01" / "func"
    data = _bold(3) + 5.0  # a non-zero background: the mask must come from the file
    stem = "sub-01_task-rest_space-MNI152NLin2009cAsym_res-2"
    _nifti(func / f"{stem}_desc-preproc_bold.nii.gz", data, tr=2.0)
    (func / f"{stem}_desc-preproc_bold.json").write_text(json.dumps({"RepetitionTime": 2.0}))
    mask = np.zeros(data.shape[:3], dtype=np.uint8)
    mask[3:-3, 3:-3, 2:-2] = 1
    _nifti(func / f"{stem}_desc-brain_mask.nii.gz", mask)
    _nifti(func / "sub-01_task-rest_space-T1w_desc-preproc_bold.nii.gz", data)  # another space: ignored
    runs = discover_runs(root)
    assert len(runs) == 1 and runs[0].kind == "fmriprep" and runs[0].run == "task-rest"
    preprocess_volumes(root, tmp_path / "out", progress=False)
    store = VolumeStore(tmp_path / "out")
    np.testing.assert_array_equal(store.mask(0), mask.astype(bool))
    assert store.meta(0)["mask_file"].endswith("desc-brain_mask.nii.gz")
    with pytest.raises(DataError, match="mask .* has shape"):
        preprocess_volumes(root, tmp_path / "o2", progress=False, overwrite=True,
                           mask=str(_nifti(tmp_path / "m.nii.gz", np.ones((4, 4, 4), dtype=np.uint8))))


def test_swift_hcp_padding_and_target_shape(tmp_path):
    data = np.zeros((75, 93, 81, 2), dtype=np.int16)
    data[5:70, 5:88, 5:76] = 1000 + np.arange(2, dtype=np.int16)
    data[5, 5, 5, 0] = 1500
    _nifti(tmp_path / "in" / "100307_bold.nii.gz", data, tr=0.72)  # LAS, as HCP's
    preprocess_volumes(tmp_path / "in", tmp_path / "out", crop_pad="swift_hcp", progress=False)
    store = VolumeStore(tmp_path / "out")
    assert store.subject_ids == ["100307_bold"] and store.shape == (96, 96, 96)
    bold = store.memmap(0)
    assert bold[0, 5 + 11, 5 + 2, 5 + 8] == bold[0].max()  # X padded by 11 before, Y by 2, Z by 8
    with pytest.raises(ConfigError, match=r"takes a \(75, 93, 81\) grid to \(96, 96, 96\), not the target \(48, 48, 48\)"):
        preprocess_volumes(tmp_path / "in", tmp_path / "o2", crop_pad="swift_hcp", target_shape=(48, 48, 48),
                           progress=False, fail_fast=True)


def test_cli_volumes(toy_dir, tmp_path, capsys):
    from brainfm.cli.preprocess import main

    main(["volumes", "--input", str(toy_dir), "--output", str(tmp_path / "s"), "--pattern", "sub-nitime*",
          "--target-shape", "12", "12", "18", "--fill", "zero", "--no-progress"])
    out = capsys.readouterr().out
    assert "wrote 2 run(s), skipped 0" in out and "shape=(12, 12, 18)" in out
    store = VolumeStore(tmp_path / "s")
    assert store.meta(0)["fill_value"] == 0.0 and (store.memmap(0)[:, ~store.mask(0)] == 0).all()
    main(["info", str(tmp_path / "s")])
    assert "sub-nitime/run-2: 40 TRs, TR 1.35 s, global/zero" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["volumes", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "x")])
    assert info.value.code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # the old spelling is still accepted, with a notice
        main(["volumes", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "x"), "--normalisation=none"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "does not exist" in err
    assert "--normalisation is spelled --normalization now" in err


# -- parcellation -----------------------------------------------------------------------------------------------
def _labels_atlas(toy_dir, tmp_path) -> tuple[Path, np.ndarray]:
    img = nib.load(str(toy_dir / "sub-nitime_run-1_bold.nii.gz"))
    labels = np.zeros(img.shape[:3], dtype=np.int16)
    labels[:5, :, :9], labels[5:, :, :9], labels[:, :, 9:] = 1, 3, 7
    path = tmp_path / "atlas.nii.gz"
    nib.save(nib.Nifti1Image(labels, img.affine), str(path))
    (tmp_path / "atlas.tsv").write_text("index\tname\n1\tleft\n3\tright\n7\ttop\n")
    return path, labels


def test_parcellate_labels_to_the_roi_store(toy_dir, tmp_path, capsys):
    atlas, labels = _labels_atlas(toy_dir, tmp_path)
    out = parcellate(toy_dir, atlas, tmp_path / "rois.h5", pattern="sub-nitime*", progress=False)
    store = ROIStore(out)
    assert store.atlas == "atlas" and store.n_rois == 3 and store.roi_names == ["left", "right", "top"]
    assert store.tr == 1.35 and store.subject_ids == ["sub-nitime", "sub-nitime"] and store.run_ids == ["run-1", "run-2"]
    raw = np.asanyarray(nib.load(str(toy_dir / "sub-nitime_run-2_bold.nii.gz")).dataobj).astype(np.float64)
    for k, lab in enumerate((1, 3, 7)):
        np.testing.assert_allclose(store.read(1)[:, k], raw[labels == lab].mean(axis=0), rtol=1e-5)
    from brainfm.cli.preprocess import main

    main(["parcellate", "--input", str(toy_dir), "--pattern", "sub-nitime*", "--atlas", str(atlas),
          "--atlas-name", "toy3", "--output", str(tmp_path / "cli.h5"), "--no-progress"])
    assert "atlas='toy3', runs=2, rois=3, tr=1.35s" in capsys.readouterr().out
    with pytest.raises(DataError, match=r"sub-nipy_run-1_bold.nii.gz: BoundingBoxError: The field of view"):
        parcellate(toy_dir, atlas, tmp_path / "nipy.h5", progress=False)  # the atlas misses nipy's slab
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    img = nib.load(str(toy_dir / "sub-nitime_run-1_bold.nii.gz"))
    nib.save(img, str(mixed / "sub-a_bold.nii.gz"))
    img.header["pixdim"][4] = 2.0
    nib.save(img, str(mixed / "sub-b_bold.nii.gz"))
    with pytest.raises(DataError, match=r"have different TRs \{1.35: \['sub-a/run-1'\], 2.0: \['sub-b/run-1'\]\}"):
        parcellate(mixed, atlas, tmp_path / "mixed.h5", progress=False)
    assert not (tmp_path / "mixed.h5").exists() and not (tmp_path / "nipy.h5").exists()


def test_parcellate_probabilistic_maps(toy_dir, tmp_path):
    img = nib.load(str(toy_dir / "sub-nitime_run-1_bold.nii.gz"))
    maps = np.zeros((*img.shape[:3], 2), dtype=np.float32)
    maps[:5, :, :, 0] = 1.0
    maps[5:, :, :, 1] = 0.5
    nib.save(nib.Nifti1Image(maps, img.affine), str(tmp_path / "maps.nii.gz"))
    store = ROIStore(parcellate(toy_dir, tmp_path / "maps.nii.gz", tmp_path / "m.h5", pattern="sub-nitime_run-1*",
                                progress=False))
    assert store.n_rois == 2 and store.roi_names == ["roi_0", "roi_1"] and store.lengths.tolist() == [40]
    raw = np.asanyarray(img.dataobj).astype(np.float64)
    np.testing.assert_allclose(store.read(0)[:, 0], raw[:5].reshape(-1, 40).mean(axis=0), rtol=1e-4)


# -- embedded data ------------------------------------------------------------------------------------------------
def test_nifti_toy_wheel_with_wrong_checksum_is_refused(tmp_path):
    from brainfm.data.embedded import NITIME, fetch

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / NITIME.wheel).write_bytes(b"not the wheel")
    with pytest.raises(DataError, match="sha256"):
        fetch("nifti_toy", data_dir=tmp_path / "data", wheel=wheels)
    assert not (tmp_path / "data" / "nifti_toy").exists()
    assert [p.name for p in (tmp_path / "data").iterdir()] == []


# -- at scale: shards, resume, the run index, NaN policy, parcellation parts -------------------------------------
_SLURM_ARRAY = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP")


@pytest.fixture(autouse=True)
def _no_slurm_array(monkeypatch):
    """The CLI reads its shard from SLURM array variables: a test run inside an array job must not shard."""
    for name in _SLURM_ARRAY:
        monkeypatch.delenv(name, raising=False)


def _runs(root: Path, n_subjects: int = 4, n_runs: int = 2, nan_frame: dict | None = None) -> Path:
    """``n_subjects x n_runs`` tiny BIDS-named runs (8x9x7 voxels, 12 TRs, TR 2 s); ``nan_frame`` maps a
    (subject index, run index) to the TR whose brain voxels are NaN."""
    for s in range(n_subjects):
        for r in range(n_runs):
            data = _bold(10 * s + r)
            t = (nan_frame or {}).get((s, r))
            if t is not None:
                data[..., t] = np.nan
            _nifti(root / f"sub-{s + 1:02d}_task-rest_run-{r + 1}_bold.nii.gz", data)
    return root


def _store_files(root: Path) -> dict:
    """Every run folder's arrays and meta.json, and the index rows (for comparing two stores)."""
    from brainfm.data.stores.index import read_index

    out = {}
    for meta in sorted(root.glob("*/*/meta.json")):
        rdir = meta.parent
        out[(rdir.parent.name, rdir.name)] = {
            "meta": json.loads(meta.read_text()),
            **{f: np.load(rdir / f) for f in ("bold.npy", "mask.npy", "voxel_mean.npy", "voxel_std.npy")}}
    cols = read_index(root, "volume")
    rows = [{k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in cols.items()}
            for i in range(len(cols["subject"]))]
    return {"runs": out, "index": rows}


def _assert_same_store(a: dict, b: dict) -> None:
    assert sorted(a["runs"]) == sorted(b["runs"])
    for key, run in a["runs"].items():
        assert run["meta"] == b["runs"][key]["meta"], key  # no field differs: same input, no timestamps
        for name in ("bold.npy", "mask.npy", "voxel_mean.npy", "voxel_std.npy"):
            np.testing.assert_array_equal(run[name], b["runs"][key][name], err_msg=f"{key} {name}")
    assert a["index"] == b["index"]


def test_shard_option_and_slurm_array_variables():
    from brainfm.data.preprocess.runner import (
        parse_shard,
        resolve_shard,
        shard_from_env,
        take_shard,
    )

    assert parse_shard("1/4") == (1, 4) and parse_shard(None) == (0, 1) and parse_shard((2, 3)) == (2, 3)
    for bad, msg in (("3/3", r"0-based and must lie in 0\.\.2"), ("-1/2", "0-based"), ("0/0", "at least 1"),
                     ("a/b", "is not I/N"), ("1", "is not I/N")):
        with pytest.raises(ConfigError, match=msg):
            parse_shard(bad)
    assert shard_from_env({}) == (0, 1)
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "16"}) == (5, 16)
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "16",
                           "SLURM_ARRAY_TASK_MIN": "1"}) == (0, 16)  # --array=1-16
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0",
                           "SLURM_ARRAY_TASK_STEP": "2"}) == (3, 4)  # --array=0-6:2
    with pytest.raises(ConfigError, match=r"gives shard 10/9.*contiguous range.*--shard I/N"):
        shard_from_env({"SLURM_ARRAY_TASK_ID": "10", "SLURM_ARRAY_TASK_COUNT": "9", "SLURM_ARRAY_TASK_MIN": "0"})
    with pytest.raises(ConfigError, match="not integers"):
        shard_from_env({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "2"})
    env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"}
    assert resolve_shard(None, env) == (1, 2) and resolve_shard("0/3", env) == (0, 3)  # --shard wins
    assert take_shard(list(range(7)), (1, 3)) == [1, 4]


def test_two_concurrent_shards_write_the_same_store_and_index_as_one_run(tmp_path):
    import os
    import subprocess

    from brainfm.data.stores.index import index_path

    inp = _runs(tmp_path / "in")  # 8 runs
    env = {k: v for k, v in os.environ.items() if k not in _SLURM_ARRAY}
    cmd = [sys.executable, "-m", "brainfm.cli.preprocess", "volumes", "--input", str(inp),
           "--output", str(tmp_path / "sharded"), "--no-progress", "--shard"]
    procs = [subprocess.Popen([*cmd, f"{i}/2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in (0, 1)]  # both at once, on one store and one index
    results = preprocess_volumes(inp, tmp_path / "one", progress=False)
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all(f"(shard {i}/2): wrote 4 run(s)" in o for i, (o, _) in enumerate(outs))
    assert [r.status for r in results] == ["written"] * 8
    one = _store_files(tmp_path / "one")
    assert len(one["runs"]) == 8 and len(one["index"]) == 8
    _assert_same_store(_store_files(tmp_path / "sharded"), one)
    assert VolumeStore(tmp_path / "sharded").indexed
    # resume: finished runs that the index lacks (a job killed before its flush) are indexed again
    index_path(tmp_path / "sharded").unlink()
    r1 = preprocess_volumes(inp, tmp_path / "sharded", progress=False, shard="1/2")
    assert [r.status for r in r1] == ["skipped"] * 4 and [r.subject for r in r1] == ["sub-01", "sub-02", "sub-03", "sub-04"]
    assert len(_store_files(tmp_path / "sharded")["index"]) == 4
    preprocess_volumes(inp, tmp_path / "sharded", progress=False, shard=(0, 2))
    _assert_same_store(_store_files(tmp_path / "sharded"), one)
    # --overwrite rewrites the shard's runs and replaces their rows
    preprocess_volumes(inp, tmp_path / "sharded", progress=False, shard=(0, 2), overwrite=True, fill="zero")
    rows = _store_files(tmp_path / "sharded")["index"]
    assert len(rows) == 8 and [r["fill"] for r in rows] == ["zero", "min"] * 4


def test_nan_frame_is_an_error_naming_the_file_and_tr_and_leaves_nothing(tmp_path, capsys):
    from brainfm.cli.preprocess import main

    inp = _runs(tmp_path / "in", 1, 1, nan_frame={(0, 0): 5})  # the 6th frame is NaN
    with pytest.raises(SystemExit) as info:
        main(["volumes", "--input", str(inp), "--output", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "sub-01_task-rest_run-1_bold.nii.gz (subject sub-01, run task-rest_run-1): NaN/inf values in 100 brain " \
           "voxel(s) at TR(s) 5 (of 12; 0-based; non-finite brain voxels per TR: TR 5: 100)" in err
    assert "--nan fill" in err and "--nan drop-run" in err
    assert list((tmp_path / "out").rglob("*")) == []  # no run folder, no temporary folder, no index


def test_nan_fill_uses_each_voxels_temporal_mean_and_records_it(tmp_path):
    inp = _runs(tmp_path / "in", 1, 1, nan_frame={(0, 0): 5})
    raw = np.asanyarray(nib.load(str(next(inp.glob("*.nii.gz")))).dataobj).astype(np.float64)
    raw[3, 3, 3, :] = np.nan  # NaN at every TR: background, not filled
    _nifti(next(inp.glob("*.nii.gz")), raw.astype(np.float32))
    [r] = preprocess_volumes(inp, tmp_path / "out", nan="fill", progress=False)
    assert r.status == "written"
    store = VolumeStore(tmp_path / "out")
    meta, mask, bold = store.meta(0), store.mask(0), store.memmap(0).astype(np.float64)
    assert meta["nan_policy"] == "fill" and meta["nan_filled_voxels"] == 99 and meta["nan_filled_values"] == 99
    brain = np.zeros(raw.shape[:3], dtype=bool)
    brain[2:-2, 2:-2, 1:-1] = True
    brain[3, 3, 3] = False
    np.testing.assert_array_equal(mask, brain)
    filled = raw[brain]  # (voxels, T)
    filled[:, 5] = np.delete(filled, 5, axis=1).mean(axis=1)
    assert meta["global_mean"] == pytest.approx(filled.mean()) and meta["global_std"] == pytest.approx(filled.std())
    np.testing.assert_allclose(bold[:, mask].T, (filled - filled.mean()) / filled.std(), atol=4e-3)
    assert np.isfinite(bold).all() and (bold[:, 3, 3, 3] == meta["fill_value"]).all()


def test_nan_drop_run_skips_the_run_with_a_warning(tmp_path, capsys):
    from brainfm.cli.preprocess import main

    inp = _runs(tmp_path / "in", 2, 1, nan_frame={(1, 0): 5})
    main(["volumes", "--input", str(inp), "--output", str(tmp_path / "out"), "--no-progress", "--nan", "drop-run"])
    out, err = capsys.readouterr()
    assert "wrote 1 run(s), skipped 0 finished before, dropped 1 with NaN/inf (skipped-nan)" in out
    assert "warning: run dropped (--nan drop-run), nothing written: " in err and "sub-02_task-rest_run-1" in err
    assert not (tmp_path / "out" / "sub-02").exists() and VolumeStore(tmp_path / "out").subject_ids == ["sub-01"]
    results = preprocess_volumes(inp, tmp_path / "out", nan="drop-run", progress=False)
    assert [r.status for r in results] == ["skipped", "skipped-nan"]


def _grid_atlas(tmp_path: Path) -> Path:
    labels = np.zeros((8, 9, 7), dtype=np.int16)
    labels[2:4, 2:-2, 1:-1], labels[4:6, 2:-2, 1:-1] = 1, 2
    path = tmp_path / "grid.nii.gz"
    nib.save(nib.Nifti1Image(labels, LAS_2MM), str(path))  # the runs' grid (_nifti)
    return path


def _h5(path: Path) -> dict:
    """Every data set and attribute of an HDF5 file (for comparing two ROI stores)."""
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        for name, obj in [("/", f), *((n, f[n]) for n in list(out))]:
            for k, v in obj.attrs.items():
                out[f"{name}@{k}"] = v
    return out


def _assert_same_h5(a: Path, b: Path) -> None:
    x, y = _h5(a), _h5(b)
    assert sorted(x) == sorted(y)
    for k in x:
        np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]), err_msg=k)


def test_parcellate_nan_policies(tmp_path):
    from brainfm.data.stores.volume import NonFiniteError

    atlas = _grid_atlas(tmp_path)
    inp = _runs(tmp_path / "in", 2, 1, nan_frame={(1, 0): 5})
    bad = r"sub-02_task-rest_run-1_bold.nii.gz \(subject sub-02, run task-rest_run-1\): NaN/inf values in 504 brain " \
          r"voxel\(s\) at TR\(s\) 5 .*TR 5: 504"
    with pytest.raises(DataError, match=bad):
        parcellate(inp, atlas, tmp_path / "err.h5", progress=False)
    assert not (tmp_path / "err.h5").exists() and not (tmp_path / "err.h5.parts" / "sub-02").exists()
    with pytest.raises(DataError, match=bad):
        parcellate(inp, atlas, tmp_path / "one.h5", pattern="sub-02*", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["err.h5.parts", "grid.nii.gz", "in"]  # nothing of one.h5
    store = ROIStore(parcellate(inp, atlas, tmp_path / "fill.h5", progress=False, nan="fill"))
    raw = np.asanyarray(nib.load(str(inp / "sub-02_task-rest_run-1_bold.nii.gz")).dataobj).astype(np.float64)
    filled = raw.copy()
    filled[..., 5] = np.delete(raw, 5, axis=-1).mean(axis=-1)
    labels = np.asanyarray(nib.load(str(atlas)).dataobj)
    for k, lab in enumerate((1, 2)):
        np.testing.assert_allclose(store.read(1)[:, k], filled[labels == lab].mean(axis=0), rtol=1e-5)
    assert store.subject_ids == ["sub-01", "sub-02"] and not (tmp_path / "fill.h5.parts").exists()
    with pytest.warns(UserWarning, match=r"run dropped \(--nan drop-run\).*sub-02"):
        out = parcellate(inp, atlas, tmp_path / "drop.h5", progress=False, nan="drop-run")
    assert ROIStore(out).subject_ids == ["sub-01"] and _h5(out)["/@nan_dropped_runs"] == 1
    assert issubclass(NonFiniteError, DataError)


_KILL_AFTER_TWO_PARTS = """
import importlib, os, signal, sys

pc = importlib.import_module("brainfm.data.preprocess.parcellate")  # the package exports a function of that name

real, n = pc._publish, [0]

def publish(tmp, path):
    n[0] += 1
    if n[0] == 3:  # the third part is on disk under its temporary name: killed before the rename
        os.kill(os.getpid(), signal.SIGKILL)
    real(tmp, path)

pc._publish = publish
pc.parcellate(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
"""


def test_parcellation_killed_midway_resumes_to_the_same_file(tmp_path):
    import subprocess

    from brainfm.data.preprocess.parcellate import run_parcellation

    atlas, inp = _grid_atlas(tmp_path), _runs(tmp_path / "in", 3, 2)  # 6 runs
    out = tmp_path / "rois.h5"
    killed = subprocess.run([sys.executable, "-c", _KILL_AFTER_TWO_PARTS, str(inp), str(atlas), str(out)],
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    parts = tmp_path / "rois.h5.parts"
    assert sorted(p.name for p in parts.glob("*/*.npz")) == ["task-rest_run-1.npz", "task-rest_run-2.npz"]
    assert len(list(parts.glob("*/.*.tmp-*"))) == 1 and not out.exists()
    report = run_parcellation(inp, atlas, out, progress=False)
    assert (report.written, report.skipped, report.merged) == (4, 2, True)
    assert not parts.exists()
    whole = parcellate(inp, atlas, tmp_path / "whole.h5", progress=False)
    _assert_same_h5(out, whole)
    store = ROIStore(out)
    assert store.lengths.tolist() == [12] * 6 and store.tr == 2.0 and store.roi_names == ["roi_1", "roi_2"]
    assert run_parcellation(inp, atlas, out, progress=False).up_to_date  # finished: nothing recomputed


def test_two_shard_parcellation_equals_one_run_and_merge_only(tmp_path, monkeypatch, capsys):
    import importlib

    from brainfm.cli.preprocess import main

    pc = importlib.import_module("brainfm.data.preprocess.parcellate")

    atlas, inp = _grid_atlas(tmp_path), _runs(tmp_path / "in", 3, 2)
    whole = parcellate(inp, atlas, tmp_path / "whole.h5", progress=False)
    out = tmp_path / "rois.h5"
    first = pc.run_parcellation(inp, atlas, out, progress=False, shard=(0, 2))
    assert first.output is None and first.written == 3 and len(list((tmp_path / "rois.h5.parts").glob("*/*.npz"))) == 3
    args = ["parcellate", "--input", str(inp), "--atlas", str(atlas), "--output", str(out), "--no-progress"]
    with pytest.raises(SystemExit):
        main([*args, "--merge-only"])
    assert "3 of 6 run(s) have no part" in capsys.readouterr().err
    monkeypatch.setattr(pc, "_merge_parts", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt("killed in the merge")))
    with pytest.raises(KeyboardInterrupt):
        pc.parcellate(inp, atlas, out, progress=False, shard="1/2")
    monkeypatch.undo()
    assert not out.exists() and len(list((tmp_path / "rois.h5.parts").glob("*/*.npz"))) == 6
    main([*args, "--merge-only"])
    assert "wrote ROIStore(" in capsys.readouterr().out
    _assert_same_h5(out, whole)
    assert not (tmp_path / "rois.h5.parts").exists()
    # the usual path: the second shard to finish merges
    out2 = tmp_path / "rois2.h5"
    assert pc.parcellate(inp, atlas, out2, progress=False, shard=(1, 2)) is None
    main([*args[:-3], "--output", str(out2), "--no-progress", "--shard", "0/2"])
    assert "(shard 0/2): parcellated 3 run(s)" in capsys.readouterr().out
    _assert_same_h5(out2, whole)
