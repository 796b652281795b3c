"""brainfm-interpret: captum Integrated Gradients / SmoothGrad of fine-tuned checkpoints (a tiny Swin4D on a
padded volume store, a tiny GPT on the embedded HCP ROI series, both trained a few steps): completeness
(sum of the attributions = f(x) - f(baseline) within 1 %), NIfTI maps on the scan's original grid with its
affine, ROI x time HDF5 with the ROI names, SmoothGrad, and the errors that name the key."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import train_quiet

from brainfm.cli import interpret as interpret_cli
from brainfm.config import compose
from brainfm.errors import ConfigError
from brainfm.runs import load_run, window_dataset

#: the scan's grid before preprocessing and its affine (3 mm voxels, an MNI-like origin)
ORIGINAL = (7, 6, 8)
AFFINE = np.array([[-3.0, 0, 0, 90], [0, 3.0, 0, -126], [0, 0, 3.0, -72], [0, 0, 0, 1]])
N_STEPS = 128


pytestmark = pytest.mark.usefixtures("one_thread")


def _interpret(run_dir: Path, out: Path, *overrides: str):
    cfg = compose("interpret", [f"ckpt={run_dir}", f"out_dir={out}", *overrides])
    assert interpret_cli.run(cfg) == out
    import pandas as pd

    return pd.read_csv(out / f"attributions_{cfg.method}.csv", dtype={"subject_id": str, "run_id": str})


def _batch(ds, indices):
    from brainfm.data.windows import collate_windows

    return collate_windows([ds[i] for i in indices])


def _assert_complete(res, rtol=0.01):
    """IG's completeness: per window, sum(attributions) = f(x) - f(baseline) within ``rtol``."""
    diff = (res.output - res.baseline_output).double()
    total = res.attributions.flatten(1).sum(dim=1).double()
    assert (diff.abs() > 1e-4).all(), diff  # a non-trivial difference to be complete about
    np.testing.assert_allclose(total.numpy(), diff.numpy(), rtol=rtol)
    assert (res.delta.double().abs() <= rtol * diff.abs()).all(), (res.delta, diff)
    np.testing.assert_allclose(res.delta.double().numpy(), (total - diff).numpy(), atol=1e-4 * float(diff.abs().max()))


# -- a tiny Swin4D fine-tuned on a padded volume store ------------------------------------------------------------
@pytest.fixture(scope="module")
def swin_run(tmp_path_factory):
    from brainfm.data.stores.volume import CropPad, write_volume_run

    tmp = tmp_path_factory.mktemp("swin")
    rng = np.random.default_rng(0)
    mask = np.zeros(ORIGINAL, dtype=bool)
    mask[1:-1, 1:-1, 1:-1] = True
    cp = CropPad.centred(ORIGINAL, (8, 8, 8))  # pads x by (0, 1), y by (1, 1), keeps z
    for i in range(3):
        frames = 1000.0 + 30.0 * rng.standard_normal((24, *ORIGINAL)) + 50.0 * i * mask
        write_volume_run(tmp / "store", f"sub-{i:02d}", "REST1_LR", frames, tr=0.72, affine=AFFINE, mask=mask,
                         crop_pad=cp)
    run = train_quiet(tmp, "data=volumes", "model=swin4d_v7", "task=supervised", "experiment_name=swin_sup",
                      f"data.path={tmp / 'store'}", "data.shape=[8,8,8]", "data.window.length=4",
                      "data.split.kind=time", "data.num_workers=0", "data.pin_memory=false", "data.pool_mb=4",
                      "data.batch_size=2", "data.eval_batch_size=4", "data.normalization.stored=null",
                      "data.normalization.fill=null", "task.target=subject", "task.kind=multiclass",
                      "task.num_classes=3", "task.optimizer.lr=1e-3", "model.img_size=[8,8,8,4]", "model.embed_dim=12",
                      "model.depths=[1,1]", "model.num_heads=[2,2]", "model.window_size=[4,4,4,4]",
                      "model.first_window_size=[4,4,4,4]", "model.patch_size=[2,2,2,1]", "model.drop_rate=0",
                      "model.attn_drop_rate=0", "model.drop_path_rate=0", "trainer.max_steps=3",
                      "trainer.val_check_interval=3")
    return run


def test_swin4d_integrated_gradients_are_complete(swin_run):
    from brainfm.eval.interpret import attribute

    loaded = load_run(swin_run)
    ds = window_dataset(loaded.datamodule, "val")
    batch = _batch(ds, [0, len(ds) - 1])
    res = attribute(loaded.task, batch, target="predicted", n_steps=N_STEPS, internal_batch_size=48)
    assert res.attributions.shape == batch["volume"].shape == (2, 1, 8, 8, 8, 4)
    _assert_complete(res)
    assert res.target.tolist() == loaded.task.logits(batch).argmax(1).tolist()
    # every class of one window, with the stored background as the baseline (SwiFT's choice)
    batch["background"] = torch.tensor([ds.store.run_stats(int(r))["fill_value"] for r in batch["run"]])
    for k in range(3):
        _assert_complete(attribute(loaded.task, batch, target=k, n_steps=N_STEPS, baseline="background"))


def test_swin4d_nifti_maps_on_the_original_grid_with_the_store_affine(swin_run, tmp_path):
    import nibabel as nib

    from brainfm.data.stores.volume import CropPad

    rows = _interpret(swin_run, tmp_path / "maps", f"n_steps={N_STEPS}", "target=all", "max_windows=2")
    store = load_run(swin_run).datamodule.store
    assert len(rows) == 2 * 3 and set(rows["target_name"]) == {"class0", "class1", "class2"}
    assert (rows["relative_delta"] <= 0.01).all()
    np.testing.assert_allclose(rows["attribution_sum"], rows["output"] - rows["baseline_output"], rtol=0.01)
    meta = store.meta(int(rows["run"][0]))
    # the store's affine is the padded grid's; the original grid's is the store's shifted back by the padding
    cp = CropPad.from_axis_order([v for p in meta["crop_pad"] for v in p])
    for _, row in rows.iterrows():
        four = nib.load(row["file"])
        assert four.shape == (*ORIGINAL, 4) and str(four.get_data_dtype()) == "float32"
        np.testing.assert_allclose(four.affine, AFFINE, atol=1e-5)
        np.testing.assert_allclose(cp.affine(four.affine), meta["affine"], atol=1e-5)
        assert four.header.get_zooms() == pytest.approx((3.0, 3.0, 3.0, 0.72))
        assert four.header["descrip"].item().startswith(b"integrated_gradients")
        data = np.asarray(four.dataobj)
        # only the padding is dropped: what it held is outside_sum
        assert data.sum(dtype=np.float64) + row["outside_sum"] == pytest.approx(row["attribution_sum"], rel=1e-4,
                                                                                 abs=1e-6)
        mean_abs = nib.load(row["file"].replace("_4d.nii.gz", "_meanabs.nii.gz"))
        assert mean_abs.shape == ORIGINAL
        np.testing.assert_allclose(np.asarray(mean_abs.dataobj), np.abs(data).mean(axis=3), rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(mean_abs.affine, AFFINE, atol=1e-5)
    subject = rows["subject_id"][0]
    assert nib.load(tmp_path / "maps" / subject / "subject_integrated_gradients_class0_meanabs.nii.gz").shape == ORIGINAL
    assert not list((tmp_path / "maps").rglob(".tmp-*"))
    # with the background as the baseline the padding (filled with the background) gets nothing
    bg = _interpret(swin_run, tmp_path / "bg", f"n_steps={N_STEPS}", "baseline=background", "max_windows=1")
    assert abs(bg["outside_sum"][0]) < 1e-6 * max(1.0, abs(bg["attribution_sum"][0])) and bg["relative_delta"][0] <= 0.01
    # grid=model: the preprocessed 8^3 grid with the store's affine
    model = _interpret(swin_run, tmp_path / "model", "n_steps=16", "grid=model", "max_windows=1")
    img = nib.load(model["file"][0])
    assert img.shape == (8, 8, 8, 4) and np.allclose(img.affine, meta["affine"], atol=1e-5)


# -- a tiny GPT fine-tuned on the embedded HCP ROI series ------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory, hcp_h5):
    tmp = tmp_path_factory.mktemp("gpt")
    return train_quiet(tmp, "model=gpt", "task=supervised", "experiment_name=gpt_sup", f"data.path={hcp_h5}",
                       "task.target=subject", "task.kind=multiclass", "task.num_classes=7", "task.optimizer.lr=1e-3",
                       "model.d_model=16", "model.depth=1", "model.n_heads=2", "model.dropout=0",
                       "model.attn_dropout=0", "data.window.length=40", "data.window.min_length=null",
                       "trainer.max_steps=3", "trainer.val_check_interval=3")


def test_sequence_integrated_gradients_are_complete_for_classes_and_regression(gpt_run):
    from brainfm.eval.interpret import attribute
    from brainfm.runs import build_task_from_checkpoint
    from brainfm.tasks.supervised import SupervisedTask

    loaded = load_run(gpt_run)
    ds = window_dataset(loaded.datamodule, "val")
    batch = _batch(ds, [0, 5, 30])
    res = attribute(loaded.task, batch, target="predicted", n_steps=N_STEPS)
    assert res.attributions.shape == batch["bold"].shape == (3, 40, ds.store.n_rois)
    _assert_complete(res)
    # regression: the prediction in the label's units (label_std * output + label_mean)
    hp = dict(loaded.ckpt["hyper_parameters"])
    hp.update(kind="regression", label_mean=30.0, label_std=5.0)
    reg = SupervisedTask(**hp).eval()
    reg.model.load_state_dict(loaded.task.model.state_dict())
    out = attribute(reg, batch, target=None, n_steps=N_STEPS)
    _assert_complete(out)
    np.testing.assert_allclose(out.output.numpy(), (reg.logits(batch).squeeze(-1) * 5 + 30).detach().numpy(), rtol=1e-5)
    # a pretrained-only checkpoint has no head: refused with the fix, or its embedding norm on request
    bare = build_task_from_checkpoint(loaded.ckpt)
    bare.logits = None  # as a self-supervised task: no prediction head
    with pytest.raises(ConfigError, match="output=embedding_norm"):
        attribute(bare, batch)
    _assert_complete(attribute(bare, batch, output="embedding_norm", n_steps=N_STEPS))


def test_the_task_contract_says_what_has_a_head_as_for_brainfm_predict():
    """interpret asks ``BrainfmTask.has_prediction_head`` / ``head_output``, as brainfm-predict asks ``predicts``: a
    fine-tuned R2T model (a head, no ``logits``) is explained in the targets' units; R2T trained self-supervised is
    refused; a decoding head (a label per window, which brainfm-predict refuses and sends here) is explained per window."""
    from brainfm.eval.interpret import attribute, output_names
    from brainfm.tasks.decoding import DecodingTask
    from brainfm.tasks.r2t import R2TTask

    torch.manual_seed(0)
    seq = dict(_target_="brainfm.models.sequence.SequenceTransformer", n_rois=12, d_model=16, depth=1, n_heads=2)
    batch = {"bold": torch.randn(3, 20, 12), "t": torch.arange(20.0).repeat(3, 1) * 0.72}
    reg = R2TTask(seq, embed_dim=8, target=["wm", "gambling"], label_mean=[10.0, 20.0], label_std=[2.0, 3.0]).eval()
    assert reg.has_prediction_head and not hasattr(reg, "logits")
    names = output_names(reg)
    assert names == ["prediction_wm", "prediction_gambling"]  # brainfm-predict's columns
    res = attribute(reg, batch, target="prediction_gambling", n_steps=N_STEPS, names=names)
    # R2T's projection starts with a LayerNorm: IG's path from the zero baseline needs more points than N_STEPS to
    # be complete within 1 % (the tolerance warning), so the attributions are checked for existence here
    assert res.target.tolist() == [1, 1, 1] and res.attributions.shape == batch["bold"].shape
    assert torch.isfinite(res.attributions).all() and (res.attributions.flatten(1).abs().sum(1) > 0).all()
    np.testing.assert_allclose(res.output.numpy(), reg.predict(batch)[:, 1].numpy(), rtol=1e-5)
    binary = R2TTask(seq, embed_dim=8, target="sex", kind="binary").eval()
    res = attribute(binary, batch, target=1, n_steps=N_STEPS)  # the log-odds of class 1, not predict's probability
    np.testing.assert_allclose(torch.sigmoid(res.output).numpy(), binary.predict(batch)[:, 0].numpy(), rtol=1e-5)
    ssl = R2TTask(seq, embed_dim=8, mode="self_supervised").eval()
    with pytest.raises(ConfigError, match=r"R2TTask checkpoint has no trained prediction head.*output=embedding_norm"):
        attribute(ssl, batch)
    with pytest.raises(ConfigError, match="self_supervised"):  # brainfm-predict's refusal of the same checkpoint
        ssl.predict(batch)
    assert attribute(ssl, batch, output="embedding_norm", n_steps=N_STEPS).attributions.shape == batch["bold"].shape
    dec = DecodingTask(seq, num_classes=3).eval()
    res = attribute(dec, batch, target="predicted", n_steps=N_STEPS)
    assert dec.predicts == "window" and res.target.tolist() == dec.logits(batch).argmax(1).tolist()
    _assert_complete(res)


def test_sequence_roi_time_maps_with_roi_names(gpt_run, tmp_path):
    from brainfm.eval.interpret import read_roi_map

    rows = _interpret(gpt_run, tmp_path / "roi", f"n_steps={N_STEPS}", "windows=[0,3]")
    store = load_run(gpt_run).datamodule.store
    assert len(rows) == 2 and (rows["relative_delta"] <= 0.01).all()
    for _, row in rows.iterrows():
        attr, names, times, attrs = read_roi_map(row["file"])
        assert attr.shape == (40, store.n_rois) and names == list(store.roi_names)
        np.testing.assert_allclose(times, np.arange(40) * 0.72, rtol=1e-5)
        assert attr.sum() == pytest.approx(row["attribution_sum"], rel=1e-5)
        assert attrs["subject_id"] == row["subject_id"] and attrs["window_start_tr"] == row["window_start_tr"]
        png = Path(row["file"]).with_suffix(".png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    subject_file = next((tmp_path / "roi" / rows["subject_id"][0]).glob("subject_*.h5"))
    import h5py

    with h5py.File(subject_file) as f:
        assert f["roi_importance"].shape == (store.n_rois,)


def test_smoothgrad_runs_and_differs_from_integrated_gradients(gpt_run, tmp_path):
    from brainfm.eval.interpret import attribute, read_roi_map

    loaded = load_run(gpt_run)
    batch = _batch(window_dataset(loaded.datamodule, "val"), [0])
    with warnings.catch_warnings(record=True) as caught:  # captum's notes do not reach the user
        warnings.simplefilter("always")
        ig = attribute(loaded.task, batch, target=0, n_steps=32)
        torch.manual_seed(0)
        sg = attribute(loaded.task, batch, method="smoothgrad", target=0, n_steps=32, nt_samples=4, stdevs=0.3)
    assert not [str(w.message) for w in caught]
    assert sg.attributions.shape == ig.attributions.shape and torch.isfinite(sg.attributions).all()
    assert not torch.allclose(sg.attributions, ig.attributions, rtol=1e-3, atol=1e-6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = _interpret(loaded.run_dir, tmp_path / "sg", "method=smoothgrad", "n_steps=16", "nt_samples=3",
                          "max_windows=1", "target=1")
    assert not [str(w.message) for w in caught if "captum" in w.filename or "nibabel" in w.filename
                or "matplotlib" in w.filename or "interpret" in w.filename]
    assert rows["method"].tolist() == ["smoothgrad"] and rows["target"].tolist() == [1]
    assert read_roi_map(rows["file"][0])[0].shape == (40, loaded.datamodule.store.n_rois)


def test_bad_options_raise_config_errors_naming_the_key(gpt_run, tmp_path):
    for overrides, key in ((["method=saliency"], "method="), (["n_steps=1"], "n_steps="),
                           (["method=smoothgrad", "nt_type=sq"], "nt_type="), (["baseline=blur"], "baseline="),
                           (["grid=mni"], "grid="), (["target=9"], "target=")):
        with pytest.raises(ConfigError, match=key):
            _interpret(gpt_run, tmp_path / "bad", "max_windows=1", *overrides)
    with pytest.raises(ConfigError, match="baseline=background"):
        _interpret(gpt_run, tmp_path / "bad", "baseline=background", "max_windows=1", "n_steps=8")
    assert not (tmp_path / "bad").exists() or not list((tmp_path / "bad").rglob("*.h5"))


def test_too_few_steps_are_reported_with_the_fix(gpt_run, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="brainfm.eval.interpret"):
        rows = _interpret(gpt_run, tmp_path / "few", "n_steps=4", "max_windows=2", "target=all")
    assert (rows["relative_delta"] > 0.01).any()
    assert any("miss completeness" in r.getMessage() and "n_steps=8" in r.getMessage() for r in caplog.records)
