"""The volume data contract (issue 22, items 1 and 4): voxel orientation recorded by preprocessing and checked
against checkpoints (train with init_from / ckpt_path, evaluate, extract, predict, interpret), and whose
intensity statistics normalize data at evaluation time (data.normalization.statistics=store|checkpoint)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import exit_status, train_quiet
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform
from omegaconf import OmegaConf

from brainfm.checkpoints import read_data_meta, read_state_dict, write_state_dict
from brainfm.cli.preprocess import main as preprocess_main
from brainfm.config import compose
from brainfm.data.datamodules.volume import VolumeDataModule
from brainfm.data.datasets.volume import VolumeClipDataset
from brainfm.data.normalization import VolumeStatistics
from brainfm.data.orientation import store_orientation, trained_orientation
from brainfm.data.preprocess.volumes import preprocess_volumes
from brainfm.data.stores.index import INDEX
from brainfm.data.stores.volume import VolumeStore, write_volume_run
from brainfm.errors import CheckpointError, ConfigError, DataError
from brainfm.runs import (
    check_compatible,
    check_training_start,
    load_checkpoint,
    load_run,
    open_windows,
    use_checkpoint_normalization,
)

SHAPE = (8, 8, 8)
LAS_2MM = np.diag([-2.0, 2.0, 2.0, 1.0])  # FSL's orientation (SwiFT's weights)
RAS_2MM = np.diag([2.0, 2.0, 2.0, 1.0])  # fMRIPrep's
MASK = np.zeros(SHAPE, dtype=bool)
MASK[1:-1, 1:-1, 1:-1] = True


def _bold(seed: int, t: int = 16) -> np.ndarray:
    """Raw BOLD ``(X, Y, Z, T)`` (~900 in a brain box, 0 outside) with a bright blob on one side of X, so that a
    flip moves it."""
    rng = np.random.default_rng(seed)
    x = np.zeros((*SHAPE, t), dtype=np.float32)
    x[MASK] = 900 + 20 * rng.standard_normal((int(MASK.sum()), t))
    x[1:3, 2:5, 2:5] += 300
    return x


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray, tr: float = 2.0) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = tr
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


LAS_CHECKPOINT = {"orientation": "LAS", "shape": list(SHAPE)}  # the data contract of a model trained on LAS


# -- item 1: orientation -------------------------------------------------------------------------------------
def test_ras_store_is_refused_by_an_las_checkpoint_until_preprocessed_again_as_las(tmp_path, capsys):
    src = _nifti(tmp_path / "fmriprep" / "sub-01_task-rest_bold.nii.gz", _bold(0), RAS_2MM)
    store_dir = tmp_path / "store"
    preprocess_main(["volumes", "--input", str(src.parent), "--output", str(store_dir), "--orientation", "RAS",
                     "--no-progress"])
    ras = VolumeStore(store_dir)
    assert ras.column("orientation") == ["RAS"] and store_orientation(ras) == "RAS"
    fix = (r"`brainfm-preprocess volumes --input <NIfTI folder \| BIDS \| fMRIPrep> --output <new store> "
           r"--orientation LAS`")
    with pytest.raises(CheckpointError, match=r"orientation mismatch: checkpoint swift\.ckpt was trained on LAS "
                                              rf"volumes but .*store holds RAS.*{fix}"):
        check_compatible(LAS_CHECKPOINT, ras, where="checkpoint swift.ckpt")
    # the fix as typed, on the same output: the finished RAS run is not silently kept ...
    code, out = exit_status(capsys, preprocess_main, ["volumes", "--input", str(src.parent), "--output",
                                                      str(store_dir), "--orientation", "LAS", "--no-progress"])
    assert code == 2 and "stored in orientation RAS, not the --orientation LAS" in out and "--overwrite" in out
    # ... it is rewritten with --overwrite (LAS is the default)
    preprocess_main(["volumes", "--input", str(src.parent), "--output", str(store_dir), "--overwrite", "--no-progress"])
    las = VolumeStore(store_dir)
    assert las.column("orientation") == ["LAS"] and las.column("source_orientation") == ["RAS"]
    check_compatible(LAS_CHECKPOINT, las, where="checkpoint swift.ckpt")  # accepted
    preprocess_main(["info", str(store_dir)])
    assert "orientation=LAS" in (out := capsys.readouterr().out) and "TR 2 s, global/min, LAS (from RAS)" in out

    # the LAS store holds what nibabel's reorientation of the same image, written as LAS, preprocesses to
    img = nib.load(str(src))
    flipped = img.as_reoriented(ornt_transform(io_orientation(img.affine), axcodes2ornt("LAS")))
    _nifti(tmp_path / "las" / src.name, np.asanyarray(flipped.dataobj), flipped.affine)
    preprocess_volumes(tmp_path / "las", tmp_path / "reference", progress=False)
    ref = VolumeStore(tmp_path / "reference")
    assert ref.column("source_orientation") == ["LAS"] and ref.column("orientation") == ["LAS"]
    for name in ("bold.npy", "mask.npy", "voxel_mean.npy", "voxel_std.npy"):
        np.testing.assert_array_equal(np.load(las.path(0) / name), np.load(ref.path(0) / name), err_msg=name)
    np.testing.assert_allclose(las.meta(0)["affine"], ref.meta(0)["affine"], atol=1e-6)
    a = VolumeClipDataset(las, [(0, 0, 16)], length=16)[0]
    b = VolumeClipDataset(ref, [(0, 0, 16)], length=16)[0]
    assert torch.equal(a["volume"], b["volume"]) and torch.equal(a["brain_mask"], b["brain_mask"])
    # and it is the RAS store mirrored along X: the blob (RAS X 1-2) lies at X 5-6 in LAS
    las_bold = np.load(las.path(0) / "bold.npy").astype(np.float32)
    assert las_bold[:, 5:7, 2:5, 2:5].mean() > las_bold[:, 1:3, 2:5, 2:5].mean() + 2
    preprocess_volumes(src.parent, tmp_path / "ras_again", orientation="RAS", progress=False)
    np.testing.assert_array_equal(las_bold[:, ::-1], np.load(VolumeStore(tmp_path / "ras_again").path(0) / "bold.npy"))


def test_store_of_mixed_orientations_is_refused(tmp_path):
    for subject, affine in (("a", RAS_2MM), ("b", LAS_2MM)):
        write_volume_run(tmp_path, subject, "r", np.moveaxis(_bold(1), -1, 0), tr=2.0, mask=MASK, affine=affine)
    dm = VolumeDataModule(name="mixed", path=str(tmp_path), window={"length": 4})
    with pytest.raises(DataError, match=r"mixes voxel orientations \(LAS: 1 run\(s\), RAS: 1 run\(s\).*subject a .* is "
                                        r"RAS and subject b .* is LAS.*--orientation LAS"):
        dm.setup()


def test_older_stores_and_checkpoints_without_an_orientation(tmp_path, caplog):
    """A run written before orientations were recorded is taken to lie as its affine says (``brainfm-data index``
    records it); a store indexed before is unknown: warned about once and let through. A checkpoint without one is
    unknown, LAS when it was trained on SwiFT frame folders."""
    write_volume_run(tmp_path, "a", "r", np.moveaxis(_bold(2), -1, 0), tr=2.0, mask=MASK, affine=RAS_2MM)
    meta_file = tmp_path / "a" / "r" / "meta.json"
    meta = json.loads(meta_file.read_text())
    for key in ("orientation", "source_orientation", "source_offset", "source_scale"):
        meta.pop(key)
    meta_file.write_text(json.dumps(meta))
    VolumeStore.build_index(tmp_path)  # then without the new columns: an index an older brainfm wrote
    table = pq.read_table(tmp_path / INDEX)
    old = table.drop_columns(["orientation", "source_orientation", "source_offset", "source_scale"])
    pq.write_table(old.replace_schema_metadata(table.schema.metadata), tmp_path / INDEX)
    store = VolumeStore(tmp_path)
    assert store.column("orientation") == [None] and store_orientation(store) is None
    stats = store.run_stats(0)  # how the run was stored, from the older columns: z-scored by its global statistics
    assert stats["source_offset"] == pytest.approx(meta["global_mean"])
    assert stats["source_scale"] == pytest.approx(1 / meta["global_std"])
    with caplog.at_level(logging.WARNING, logger="brainfm.data.orientation"):
        check_compatible(LAS_CHECKPOINT, store, where="checkpoint old.ckpt")
        check_compatible(LAS_CHECKPOINT, store, where="checkpoint old.ckpt")
    warned = [r.getMessage() for r in caplog.records if "orientation not recorded" in r.getMessage()]
    assert len(warned) == 1 and "brainfm-data index <store>" in warned[0]
    VolumeStore.build_index(tmp_path)  # brainfm-data index: the orientation from the run's affine
    with pytest.raises(CheckpointError, match="trained on LAS volumes but .* holds RAS"):
        check_compatible(LAS_CHECKPOINT, VolumeStore(tmp_path), where="checkpoint old.ckpt")
    assert trained_orientation({"layout": "frames"}) == "LAS" and trained_orientation({"layout": "volumes"}) is None
    assert trained_orientation({"datasets": {"ukb": {"orientation": "LAS"}, "hcp": {"layout": "frames"}}}) == "LAS"


def _swift_checkpoint(path: Path) -> Path:
    """A tiny SwiFT-style Lightning checkpoint (``model.*`` backbone keys, a head)."""
    from brainfm.models.swin4d import SwinTransformer4D

    model = SwinTransformer4D(img_size=(8, 8, 8, 4), embed_dim=12, depths=(1, 1), num_heads=(2, 2),
                              window_size=(4, 4, 4, 4), first_window_size=(4, 4, 4, 4), patch_size=(2, 2, 2, 1))
    torch.save({"state_dict": {**{f"model.{k}": v for k, v in model.state_dict().items()},
                               "output_head.head.weight": torch.zeros(1, 24)}}, path)
    return path


def test_converted_swift_weights_record_las_and_fine_tuning_checks_it(tmp_path):
    from brainfm.models.convert import convert

    src = _swift_checkpoint(tmp_path / "swift.ckpt")
    for dst in (tmp_path / "swift.safetensors", tmp_path / "swift.pt"):
        state, _ = convert("swift", src, dst)
        assert read_data_meta(dst) == {"orientation": "LAS"}
        assert set(read_state_dict(dst)) == set(state)  # the weights read as before
    assert read_data_meta(src) is None  # a foreign file records no contract
    write_state_dict({"w": torch.zeros(1)}, tmp_path / "plain.safetensors")
    assert read_data_meta(tmp_path / "plain.safetensors") is None
    frames = np.moveaxis(_bold(3, t=24), -1, 0)
    for name, affine in (("ras", RAS_2MM), ("las", LAS_2MM)):
        write_volume_run(tmp_path / name, "sub-01", "rest", frames, tr=2.0, mask=MASK, affine=affine)
    ras = VolumeDataModule(name="ras", path=str(tmp_path / "ras"), window={"length": 4})
    ras.setup("fit")
    with pytest.raises(CheckpointError, match=r"task\.init_from=.*swift\.safetensors was trained on LAS volumes"):
        check_training_start(ras, init_from=tmp_path / "swift.safetensors")
    las = VolumeDataModule(name="las", path=str(tmp_path / "las"), window={"length": 4})
    las.setup("fit")
    check_training_start(las, init_from=tmp_path / "swift.safetensors")
    # brainfm-train with task.init_from refuses the RAS store before building the model
    from brainfm import training as train

    cfg = compose("train", ["data=volumes", f"data.path={tmp_path / 'ras'}", "data.shape=[8,8,8]",
                            "data.window.length=4", "data.split.kind=time", "data.num_workers=0",
                            "data.pin_memory=false", "model=swin4d_v7", "task=supervised", "task.target=subject",
                            f"task.init_from={tmp_path / 'swift.safetensors'}", f"paths.output_dir={tmp_path}/out",
                            f"paths.split_dir={tmp_path}/splits"])
    with pytest.raises(CheckpointError, match="orientation mismatch: task.init_from="):
        train.run(cfg)
    assert not (tmp_path / "out").exists()


# -- a trained volume run: orientation and statistics at evaluation ------------------------------------------------
def _write_store(root: Path, scale: float = 1.0, offset: float = 0.0, affine: np.ndarray = LAS_2MM,
                 n_subjects: int = 3) -> tuple[Path, list[np.ndarray]]:
    """One 24-TR run per subject; the source intensities ``scale * raw + offset``. Returns the store and the
    source arrays ``(T, X, Y, Z)``."""
    sources = []
    for i in range(n_subjects):
        x = scale * np.moveaxis(_bold(10 + i, t=24), -1, 0).astype(np.float64) + offset
        x[:, ~MASK] = 0.0
        write_volume_run(root, f"sub-{i:02d}", "rest", x, tr=2.0, mask=MASK, affine=affine)
        sources.append(x)
    return root, sources


@pytest.fixture(scope="module")
def volume_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("volume_run")
    store, sources = _write_store(tmp / "train")
    run = train_quiet(tmp, "data=volumes", "model=swin4d_v7", "task=simmim", "experiment_name=contract",
                      f"data.path={store}", "data.shape=[8,8,8]", "data.window.length=4", "data.split.kind=time",
                      "data.num_workers=0", "data.pin_memory=false", "data.pool_mb=4", "data.batch_size=2",
                      "data.eval_batch_size=4", "model.img_size=[8,8,8,4]", "model.embed_dim=12", "model.depths=[1,1]",
                      "model.num_heads=[2,2]", "model.window_size=[4,4,4,4]", "model.first_window_size=[4,4,4,4]",
                      "model.patch_size=[2,2,2,1]", "trainer.max_steps=2", "trainer.val_check_interval=2")
    return SimpleNamespace(tmp=tmp, run=run, store=store, sources=sources)


def test_a_trained_run_refuses_data_of_another_orientation(volume_run):
    ckpt = load_checkpoint(volume_run.run)
    assert ckpt["hyper_parameters"]["data_meta"]["orientation"] == "LAS"
    ras, _ = _write_store(volume_run.tmp / "ras_eval", affine=RAS_2MM)
    fix = "--orientation LAS"
    with pytest.raises(CheckpointError, match=f"trained on LAS volumes but .*ras_eval holds RAS.*{fix}"):
        load_run(volume_run.run, {"path": str(ras)})  # brainfm-extract / predict / interpret
    with pytest.raises(CheckpointError, match=f"trained on LAS volumes but .*ras_eval holds RAS.*{fix}"):
        open_windows(volume_run.run, ckpt, data_path=ras)  # brainfm-evaluate (and its few-subject protocol)
    from brainfm import training as train

    cfg = compose("train", ["data=volumes", f"data.path={ras}", "data.shape=[8,8,8]", "data.window.length=4",
                            "data.split.kind=time", "data.num_workers=0", "data.pin_memory=false", "model=swin4d_v7",
                            "task=simmim", "model.img_size=[8,8,8,4]", "model.embed_dim=12", "model.depths=[1,1]",
                            "model.num_heads=[2,2]", "model.window_size=[4,4,4,4]", "model.first_window_size=[4,4,4,4]",
                            "model.patch_size=[2,2,2,1]", "trainer=cpu", "logger=csv", "run_name=resumed",
                            f"ckpt_path={volume_run.run / 'checkpoints' / 'last.ckpt'}", "trainer.max_steps=4",
                            f"paths.output_dir={volume_run.tmp}/resume", f"paths.split_dir={volume_run.tmp}/splits"])
    with pytest.raises(CheckpointError, match=r"ckpt_path=.*last\.ckpt was trained on LAS volumes"):
        train.run(cfg)


def test_statistics_store_or_checkpoint_give_the_expected_tensors_in_every_consumer(volume_run):
    ckpt = load_checkpoint(volume_run.run)
    state = ckpt["brainfm"]["normalization"]
    assert state["kind"] == "volume" and state["stored"] == "global" and state["runs"] == 3
    summary = ckpt["hyper_parameters"]["data_meta"]["normalization"]["training_statistics"]
    assert summary == {k: state[k] for k in summary}  # data_meta carries the same, without arrays
    # pooled over brain voxels x the training TRs (the first half of each run): every run weighs the same here
    brain = [x[:, MASK] for x in volume_run.sources]
    mu = np.mean([b.mean() for b in brain])
    assert state["global_mean"] == pytest.approx(mu)
    assert state["global_std"] == pytest.approx(np.sqrt(np.mean([b.var() + b.mean() ** 2 for b in brain]) - mu**2))

    # another site: the same brains at 3x the intensity + 500 (raw BOLD units are arbitrary)
    other, sources = _write_store(volume_run.tmp / "other_site", scale=3.0, offset=500.0)
    trained = load_run(volume_run.run).datamodule.dataset("val")
    windows = {}
    for choice in ("store", "checkpoint"):
        dm = load_run(volume_run.run, {"path": str(other), "normalization": {"statistics": choice}}).datamodule
        ds = dm.dataset("val")  # extract, predict, interpret
        run, start = ds.clip(0)
        x = ds[0]["volume"][0].float()  # (X, Y, Z, T)
        # evaluate / few-subject: brainfm-evaluate's overrides reach open_windows the same way
        cfg = compose("evaluate", [f"ckpt={volume_run.run}", f"data_path={other}",
                                   f"+data.normalization.statistics={choice}"])
        make = open_windows(volume_run.run, ckpt, data_path=cfg.data_path,
                            data_overrides=OmegaConf.to_container(cfg.data, resolve=True)).make
        y = make([(run, start, start + 4)], 4, 4)[0]["volume"][0].float()
        assert torch.equal(x, y)
        windows[choice] = (x, run, start)
    x, run, start = windows["store"]  # each run's own statistics: as the training site's, whatever the scale
    torch.testing.assert_close(x, trained[0]["volume"][0].float(), atol=2e-3, rtol=0)
    x, run, start = windows["checkpoint"]  # the training runs' global mean and std on the source intensities
    src = torch.from_numpy(sources[run][start:start + 4]).permute(1, 2, 3, 0)
    expected = (src - state["global_mean"]) / state["global_std"]
    mask = torch.from_numpy(MASK)
    torch.testing.assert_close(x[mask], expected[mask].float(), rtol=2e-3, atol=0.05)
    # a "min" background stays the brain's minimum (of the run, on the new scale)
    lo = (sources[run][:, MASK].min() - state["global_mean"]) / state["global_std"]
    assert x[~mask].unique().tolist() == pytest.approx([lo], rel=2e-3)
    assert x[mask].mean() > 10  # 3 x 900 + 500 against a training mean of ~900: far from z-scores

    # the CLI takes the choice as an override: brainfm-extract, same model, same windows, different inputs
    from brainfm.cli import extract as extract_cli
    from brainfm.eval.extract import read_features

    feats = {}
    for choice in ("store", "checkpoint"):
        out = volume_run.tmp / f"feats_{choice}.h5"
        cfg = compose("extract", [f"ckpt={volume_run.run}", f"out={out}", f"data_path={other}",
                                  f"+data.normalization.statistics={choice}"])
        extract_cli.run(cfg)
        feats[choice] = read_features(out)[0]
    out = volume_run.tmp / "feats_training.h5"
    extract_cli.run(compose("extract", [f"ckpt={volume_run.run}", f"out={out}"]))
    np.testing.assert_allclose(feats["store"], read_features(out)[0], atol=1e-3)
    assert np.abs(feats["checkpoint"] - feats["store"]).max() > 0.1


def test_statistics_checkpoint_is_refused_in_training_and_without_statistics(volume_run):
    dm = VolumeDataModule(name="t", path=str(volume_run.store), window={"length": 4},
                          normalization={"statistics": "checkpoint"})
    with pytest.raises(ConfigError, match=r"statistics=checkpoint normalizes data with a trained model's statistics "
                                          r"when it is evaluated.*Fix: data.normalization.statistics=store"):
        dm.setup("fit")
    with pytest.raises(ConfigError, match="is not one of"):
        VolumeDataModule(name="t", path=str(volume_run.store), normalization={"statistics": "training"})
    ckpt = load_checkpoint(volume_run.run)
    del ckpt["brainfm"]["normalization"]  # a checkpoint of an older brainfm
    dm = VolumeDataModule(name="t", path=str(volume_run.store), window={"length": 4},
                          normalization={"statistics": "checkpoint"})
    dm.setup("predict")
    with pytest.raises(CheckpointError, match=r"carries no statistics of its training data.*"
                                              r"\+data.normalization.statistics=store"):
        use_checkpoint_normalization(ckpt, dm)
    roi = SimpleNamespace(normalization={"mode": "run", "statistics": "checkpoint"})
    with pytest.raises(ConfigError, match="applies to volume data"):
        use_checkpoint_normalization(ckpt, roi)


def test_voxel_and_minmax_statistics_of_the_training_runs(tmp_path):
    store_dir, _ = _write_store(tmp_path / "train", n_subjects=2)
    store = VolumeStore(store_dir)
    segments = [(0, 0, 12), (1, 0, 24)]  # run 1 weighs twice run 0
    stats = VolumeStatistics.fit(store, segments, "voxel")
    (m0, s0), (m1, s1) = (tuple(np.asarray(a, np.float64) for a in store.voxel_stats(r)) for r in (0, 1))
    mean = (m0 + 2 * m1) / 3
    std = np.sqrt((s0**2 + m0**2 + 2 * (s1**2 + m1**2)) / 3 - mean**2)
    np.testing.assert_allclose(stats.voxel_mean[MASK], mean[MASK], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.voxel_std[MASK], std[MASK], rtol=1e-4, atol=1e-5)
    assert (stats.voxel_mean[~MASK] == 0).all() and (stats.voxel_std[~MASK] == 0).all() and stats.voxel_runs == 2
    assert VolumeStatistics.from_state(stats.state()).voxel_mean.tobytes() == stats.voxel_mean.tobytes()
    other_dir, _ = _write_store(tmp_path / "other", scale=3.0, offset=500.0, n_subjects=1)
    other = VolumeStore(other_dir)
    z = other.read_clip(0, 0, 4).astype(np.float32)  # stored values (each run z-scored with its own statistics)
    x = VolumeClipDataset(other, [(0, 0, 4)], 4, normalization="voxel", statistics=stats)[0]["volume"][0].float()
    inv = np.where(stats.voxel_std > 1e-6, 1 / np.where(stats.voxel_std > 1e-6, stats.voxel_std, 1), 0)
    expected = np.moveaxis((z - stats.voxel_mean) * inv, 0, -1)
    np.testing.assert_allclose(x.numpy(), expected, atol=2e-2, rtol=2e-3)
    own = VolumeClipDataset(other, [(0, 0, 4)], 4, normalization="voxel")[0]["volume"][0].float()
    assert (x - own).abs().max() > 0.1  # not the run's own per-voxel statistics
    mm = VolumeStatistics.fit(store, segments, "minmax")
    lo, hi = min(store.run_stats(r)["min"] for r in (0, 1)), max(store.run_stats(r)["max"] for r in (0, 1))
    assert (mm.min, mm.max) == (lo, hi) and mm.voxel_mean is None and mm.stored is None
    x = VolumeClipDataset(other, [(0, 0, 4)], 4, normalization="minmax", statistics=mm)[0]["volume"][0].float()
    np.testing.assert_allclose(x.numpy(), np.moveaxis((z - lo) / (hi - lo), 0, -1), atol=2e-3)
    with pytest.raises(ConfigError, match="hold no per-voxel statistics"):
        VolumeClipDataset(other, [(0, 0, 4)], 4, normalization="voxel", statistics=mm)
