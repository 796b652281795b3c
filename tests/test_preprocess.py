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
from brainfm.data.preprocess.parcellate import parcellate

from brainfm.config import repo_root
from brainfm.data.preprocess.discover import discover_runs
from brainfm.data.preprocess.volumes import preprocess_volumes
from brainfm.data.stores.roi import ROIStore
from brainfm.data.stores.volume import VolumeStore
from brainfm.errors import ConfigError, DataError

TOY_RUNS = [("sub-nipy", "run-1"), ("sub-nitime", "run-1"), ("sub-nitime", "run-2")]


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
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine)
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
    for i, (orig, cp) in enumerate([([17, 21, 3, 20], [[15, 16], [13, 14], [22, 23]]),
                                    ([10, 10, 18, 40], [[19, 19], [19, 19], [15, 15]]),
                                    ([10, 10, 18, 40], [[19, 19], [19, 19], [15, 15]])]):
        meta = store.meta(i)
        assert meta["original_shape"] == orig and meta["crop_pad"] == cp
        assert meta["tr_source"].startswith("header pixdim[4]") and meta["source_dtype"] == "int16"
        assert meta["normalisation"] == "global" and meta["fill"] == "min"
        bold, mask = store.memmap(i), store.mask(i)
        brain = bold[:, mask].astype(np.float64)
        assert abs(brain.mean()) < 2e-3 and brain.std() == pytest.approx(1.0, abs=2e-3)
        assert (bold[:, ~mask] == np.float16(meta["fill_value"])).all() and meta["fill_value"] == float(brain.min())
        assert 0.8 < meta["mask"]["brain_voxels"] / np.prod(orig[:3]) <= 1.0  # in-brain fields of view
    img = nib.load(str(toy_dir / "sub-nitime_run-1_bold.nii.gz"))
    np.testing.assert_allclose(np.array(store.meta(1)["affine"]), img.affine @ np.array(
        [[1, 0, 0, -19], [0, 1, 0, -19], [0, 0, 1, -15], [0, 0, 0, 1]]), atol=1e-4)
    # the stored values are the raw BOLD, z-scored: check one voxel's time course
    raw = np.asanyarray(img.dataobj).astype(np.float64)
    meta = store.meta(1)
    z = (raw[4, 5, 9, :] - meta["global_mean"]) / meta["global_std"]
    np.testing.assert_allclose(store.memmap(1)[:, 4 + 19, 5 + 19, 9 + 15], z, atol=4e-3)
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
    from brainfm.cli import train
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
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["sub-01"]
    assert [p.name for p in (tmp_path / "out" / "sub-01").iterdir()] == ["run-1"]  # no temporary folder left
    assert VolumeStore(tmp_path / "out").subject_ids == ["sub-01"]


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
    _nifti(tmp_path / "in" / "100307_bold.nii.gz", data, tr=0.72)
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
