"""brainfm-extract and brainfm-predict on a checkpoint of every model family: tiny runs of a few steps,
then the outputs are read back (shapes, ids, window starts in seconds, no NaN)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import train_quiet

from brainfm.cli import extract as extract_cli
from brainfm.cli import predict as predict_cli
from brainfm.config import compose
from brainfm.errors import CheckpointError, ConfigError
from brainfm.eval.extract import read_features
from brainfm.runs import load_run, window_dataset

HCP_IDS = ["101309", "102311", "102816", "131217", "211619", "213522", "377451"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _extract(run_dir: Path, out: Path, *overrides: str) -> tuple[np.ndarray, pd.DataFrame, dict]:
    cfg = compose("extract", [f"ckpt={run_dir}", f"out={out}", *overrides])
    path = extract_cli.run(cfg)
    assert path == out and not list(out.parent.glob(".*tmp*"))
    return read_features(out)


def _predict(run_dir: Path, out: Path, *overrides: str) -> pd.DataFrame:
    cfg = compose("predict", [f"ckpt={run_dir}", f"out={out}", *overrides])
    assert predict_cli.run(cfg) == out
    return pd.read_csv(out, dtype={"subject_id": str})


def _check_rows(feats, rows, dim, expected_windows):
    """Shapes, ids and window starts against the datamodule's own evaluation grid."""
    assert feats.shape == (len(expected_windows), dim) and feats.dtype == np.float32
    assert np.isfinite(feats).all() and feats.std(axis=0).max() > 0
    assert list(zip(rows["run"], rows["window_start_tr"])) == expected_windows


# -- sequence models on the embedded HCP data ----------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory, hcp_h5):
    tmp = tmp_path_factory.mktemp("gpt")
    return train_quiet(tmp, "experiment=gpt", f"data.path={hcp_h5}", "model.d_model=32", "model.depth=1",
                       "model.n_heads=2", "data.window.length=40", "data.window.min_length=null", "trainer.max_steps=2",
                       "trainer.val_check_interval=2")


@pytest.mark.parametrize("fmt", ["h5", "parquet"])
def test_gpt_embeddings_of_both_splits_carry_subject_run_onset_and_tr(gpt_run, tmp_path, fmt):
    feats, rows, attrs = _extract(gpt_run, tmp_path / f"emb.{fmt}", "splits=[train,val]")
    loaded = load_run(gpt_run)
    dm = loaded.datamodule
    expected = [ds.window(i) for ds in (window_dataset(dm, "train"), window_dataset(dm, "val")) for i in range(len(ds))]
    _check_rows(feats, rows, 32, expected)
    n_train = len(window_dataset(dm, "train"))
    assert list(rows["split"]) == ["train"] * n_train + ["val"] * (len(rows) - n_train)
    # the store's string ids and run ids, the TR of the file, onsets in seconds
    assert sorted(set(rows["subject_id"])) == HCP_IDS
    assert [HCP_IDS[i] for i in rows["subject_index"]] == list(rows["subject_id"])
    assert set(rows["run_id"]) <= {f"run{i}" for i in range(7)} | {"REST1_LR"}
    assert np.allclose(rows["tr"], 0.72)
    np.testing.assert_allclose(rows["window_start_s"], rows["window_start_tr"] * 0.72, rtol=1e-6)
    assert rows["window_start_tr"][n_train] == 600  # val = the second half of each 1200-TR run (time split)
    assert attrs["kind"] == "embedding" and attrs["dim"] == 32 and attrs["checkpoint"].endswith("last.ckpt")
    # equal to task.embed on the first val window, computed by hand
    sample = window_dataset(dm, "val")[0]
    batch = {k: (torch.as_tensor(v)[None] if not torch.is_tensor(v) else v[None]) for k, v in sample.items()}
    np.testing.assert_allclose(feats[n_train], loaded.task.embed(batch)[0].numpy(), rtol=1e-4, atol=1e-5)


def test_data_overrides_and_errors_name_the_fix(gpt_run, tmp_path, hcp_h5):
    from brainfm.data.stores.roi import ROIStore, write_roi_h5

    store = ROIStore(hcp_h5)
    # other data with the same TR/ROIs: two subjects, stride of 20 TRs between windows
    other = write_roi_h5(tmp_path / "other.h5", series={store.atlas: [store.read(0).T, store.read(3).T]},
                         subject_ids=["subA", "subB"], tr=0.72, roi_names={store.atlas: store.roi_names})
    feats, rows, _ = _extract(gpt_run, tmp_path / "o.h5", f"data_path={other}", "+data.window.eval_stride=20",
                              "+data.split_dir=" + str(tmp_path / "sp"))
    assert set(rows["subject_id"]) == {"subA", "subB"} and np.diff(rows["window_start_tr"][:3]).tolist() == [20, 20]
    assert feats.shape[0] == 2 * ((600 - 40) // 20 + 1)
    tr2 = write_roi_h5(tmp_path / "tr2.h5", series={store.atlas: [store.read(0).T]}, subject_ids=["s"], tr=2.0,
                       roi_names={store.atlas: store.roi_names})
    # another TR: the GPT embeds time in seconds, so the data's own TR is taken, not refused
    feats2, rows2, _ = _extract(gpt_run, tmp_path / "tr2_feats.h5", f"data_path={tr2}")
    assert set(rows2["subject_id"]) == {"s"} and feats2.shape[1] == feats.shape[1]
    with pytest.raises(ConfigError, match="kind=signature"):
        _extract(gpt_run, tmp_path / "x.h5", "kind=signature")
    with pytest.raises(ConfigError, match="splits=\\[train,val\\]"):
        _extract(gpt_run, tmp_path / "x.h5", "splits=[test]")
    with pytest.raises(ConfigError, match="no prediction head"):
        _predict(gpt_run, tmp_path / "p.csv")
    with pytest.raises(CheckpointError, match="does not exist"):
        _extract(tmp_path / "nothing.ckpt", tmp_path / "x.h5")
    # the file name decides the format; a name of another format is refused, not filled with HDF5
    with pytest.raises(ConfigError, match=r"Fix: out=.*e\.h5 or out=.*e\.parquet"):
        _extract(gpt_run, tmp_path / "e.csv")
    with pytest.raises(ConfigError, match="format=h5 but out=.*parquet"):
        _extract(gpt_run, tmp_path / "e.parquet", "format=h5")
    with pytest.raises(ConfigError, match=r"writes CSV.*Fix: out=.*pred\.csv"):
        _predict(gpt_run, tmp_path / "pred.parquet")
    assert not (tmp_path / "x.h5").exists() and not list(tmp_path.glob("e.*")) and not list(tmp_path.glob("pred*"))


def test_lstm_autoencoder_embeddings_to_parquet(tmp_path_factory, hcp_h5):
    tmp = tmp_path_factory.mktemp("lstm")
    run = train_quiet(tmp, "experiment=lstm_ae", f"data.path={hcp_h5}", "model.d_model=16", "model.depth=1",
                      "data.window.length=30", "data.window.min_length=null", "trainer.max_steps=2",
                      "trainer.val_check_interval=2")
    feats, rows, attrs = _extract(run, tmp / "lstm.parquet")
    ds = window_dataset(load_run(run).datamodule, "val")
    _check_rows(feats, rows, 16, [ds.window(i) for i in range(len(ds))])
    assert sorted(set(rows["subject_id"])) == HCP_IDS and set(rows["split"]) == {"val"}
    assert attrs["model"].endswith("LSTMAutoencoder")


# -- volumes: Swin4D (SimMIM) and TFF -------------------------------------------------------------------------
def test_swin4d_simmim_clip_embeddings(tmp_path_factory):
    from fixtures_r2t import subject_ids, write_volume_pairs

    tmp = tmp_path_factory.mktemp("simmim")
    store = write_volume_pairs(tmp / "store", n_subjects=3, shape=(8, 8, 8), rest_trs=24, task_trs=16)
    run = train_quiet(tmp, "data=volumes", "model=swin4d_v7", "task=simmim", "experiment_name=simmim_tiny",
                      f"data.path={store}", "data.shape=[8,8,8]", "data.window.length=4", "data.split.kind=time",
                      "data.num_workers=0", "data.pin_memory=false", "data.pool_mb=4", "data.batch_size=2",
                      "data.eval_batch_size=4", "data.normalization.stored=null", "data.normalization.fill=null",
                      "model.img_size=[8,8,8,4]", "model.embed_dim=12", "model.depths=[1,1]", "model.num_heads=[2,2]",
                      "model.window_size=[4,4,4,4]", "model.first_window_size=[4,4,4,4]", "model.patch_size=[2,2,2,1]",
                      "trainer.max_steps=2", "trainer.val_check_interval=2")
    feats, rows, attrs = _extract(run, tmp / "swin.h5", "splits=[val]")
    ds = window_dataset(load_run(run).datamodule, "val")
    assert len(ds) == 3 * (8 // 4 + 12 // 4)  # val: second half of each run (REST 24 -> 12 TRs, WM 16 -> 8 TRs)
    _check_rows(feats, rows, feats.shape[1], [ds.clip(i) for i in range(len(ds))])
    assert sorted(set(rows["subject_id"])) == sorted(subject_ids(3))
    assert set(rows["run_id"]) == {"REST1_LR", "WM_LR"} and np.allclose(rows["tr"], 0.72)
    assert rows["window_start_tr"].min() >= 8 and attrs["task_class"].endswith("SimMIM")
    np.testing.assert_allclose(rows["window_start_s"], rows["window_start_tr"] * 0.72, rtol=1e-6)


def test_tff_clip_embeddings(tmp_path_factory):
    from test_tff import _nitime_store, _small_tff_hcp

    tmp = tmp_path_factory.mktemp("tff")
    run = train_quiet(tmp, *_small_tff_hcp(tmp, _nitime_store(tmp))[5:], "trainer.max_steps=2",
                      "trainer.val_check_interval=2")
    feats, rows, attrs = _extract(run, tmp / "tff.parquet")
    ds = window_dataset(load_run(run).datamodule, "val")
    _check_rows(feats, rows, feats.shape[1], [ds.clip(i) for i in range(len(ds))])
    assert np.allclose(rows["tr"], 1.35) and attrs["task_class"].endswith("TFFAutoencoder")
    store = ds.store
    assert list(rows["subject_id"]) == [store.subject_ids[r] for r in rows["run"]]
    assert list(rows["run_id"]) == [store.run_ids[r] for r in rows["run"]] and rows["subject_id"].nunique() >= 1


# -- R2T: rest-only embeddings, rest+task signatures, rest-only predictions ------------------------------------
@pytest.fixture(scope="module")
def r2t_run(tmp_path_factory):
    from fixtures_r2t import subject_ids, write_labels, write_roi_pairs

    tmp = tmp_path_factory.mktemp("r2t")
    path, _ = write_roi_pairs(tmp / "pairs.h5", n_subjects=6, n_rois=12, rest_trs=80, task_trs=40)
    labels = write_labels(tmp / "behavioral.csv", subject_ids(6))
    run = train_quiet(tmp, "data=r2t_roi", "task=r2t", "model=temporal_mlp", "experiment_name=r2t_tiny",
                      f"data.path={path}", "data.task_path=null", "data.atlas=toy", "data.n_rois=12",
                      "data.window.length=20", "data.split.fractions=[0.5,0.25,0.25]", "data.pairs_per_subject=2",
                      "data.batch_size=3", f"+data.labels.file={labels}", "+data.labels.id_column=Subject",
                      "+data.labels.columns={wm_0bk: WM_Task_0bk_Acc, wm_2bk: WM_Task_2bk_Acc}", "task.mode=fine_tune",
                      "task.target=[wm_0bk,wm_2bk]", "task.embed_dim=16", "task.head_hidden=8", "model.d_model=16",
                      "model.depth=1", "trainer.max_steps=2", "trainer.val_check_interval=2")
    return run


def test_r2t_rest_embeddings_and_signatures(r2t_run, tmp_path):
    loaded = load_run(r2t_run)
    dm = loaded.datamodule
    feats, rows, _ = _extract(r2t_run, tmp_path / "rest.h5", "splits=[val,test]")
    expected = [ds.window(i) for ds in (dm.rest_dataset("val"), dm.rest_dataset("test")) for i in range(len(ds))]
    _check_rows(feats, rows, 16, expected)
    assert set(rows["run_id"]) == {"REST1_LR"}
    assert sorted(set(rows["subject_id"])) == sorted(dm.subject_split["val"] + dm.subject_split["test"])
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)  # R2T embeddings are L2-normalized

    sig, srows, attrs = _extract(r2t_run, tmp_path / "sig.parquet", "kind=signature", "splits=[val]")
    pairs = dm.pair_dataset("val")
    assert sig.shape == (len(pairs), 32) and np.isfinite(sig).all() and attrs["kind"] == "signature"
    assert list(srows["subject_id"]) == pairs.subjects and set(srows["task_run_id"]) == {"WM_LR"}
    assert set(srows["run_id"]) == {"REST1_LR"} and (srows["task_run"] != srows["run"]).all()
    from brainfm.data.windows import collate_windows

    np.testing.assert_allclose(sig[0], loaded.task.signature(collate_windows([pairs[0]]))[0].numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(srows["task_window_start_s"], srows["task_window_start_tr"] * 0.72, rtol=1e-6)


def test_r2t_rest_only_prediction_csv(r2t_run, tmp_path):
    from brainfm.tasks.r2t import predict_subjects

    loaded = load_run(r2t_run)
    dm = loaded.datamodule
    df = _predict(r2t_run, tmp_path / "pred.csv")
    assert list(df.columns) == ["subject_id", "prediction_wm_0bk", "prediction_wm_2bk"]
    assert list(df["subject_id"]) == sorted(dm.subject_split["test"]) and np.isfinite(df.iloc[:, 1:].to_numpy()).all()
    expected = predict_subjects(loaded.task, dm.predict_dataloader(), dm.subjects)
    np.testing.assert_allclose(df.iloc[:, 1:].to_numpy(), torch.stack(list(expected.values())).numpy(), rtol=1e-4)


# -- supervised: subject mean of the clips' outputs -------------------------------------------------------------
def test_supervised_subject_probabilities(tmp_path_factory, hcp_h5):
    tmp = tmp_path_factory.mktemp("sup")
    run = train_quiet(tmp, "model=gpt", "task=supervised", "experiment_name=sup", f"data.path={hcp_h5}",
                      "task.target=subject", "task.kind=multiclass", "task.num_classes=7", "model.d_model=16",
                      "model.depth=1", "model.n_heads=2", "data.window.length=60", "data.window.min_length=null",
                      "trainer.max_steps=2", "trainer.val_check_interval=2")
    df = _predict(run, tmp / "sup.csv")  # a time split: no test split, so val
    assert list(df.columns) == ["subject_id", "prediction", *(f"probability_{c}" for c in range(7))]
    assert list(df["subject_id"]) == HCP_IDS
    probs = df.iloc[:, 2:].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert (df["prediction"].to_numpy() == probs.argmax(axis=1)).all()
    # by hand: mean logit of subject 0's val windows, then softmax
    loaded = load_run(run)
    ds = window_dataset(loaded.datamodule, "val")
    from torch.utils.data import DataLoader

    from brainfm.data.windows import collate_windows

    logits = torch.cat([loaded.task.logits(b) for b in DataLoader(ds, batch_size=64, collate_fn=collate_windows)])
    subjects = torch.tensor([ds[i]["subject"] for i in range(len(ds))])
    np.testing.assert_allclose(probs[0], logits[subjects == 0].mean(0).softmax(-1).detach().numpy(), rtol=1e-4)


def test_semantoks_embeddings(tmp_path_factory, hcp_h5):
    """Brain-Semantoks (network tokenizer + SimDINO), skipped while its task is not importable."""
    pytest.importorskip("brainfm.tasks.self_distillation")
    tmp = tmp_path_factory.mktemp("semantoks")
    run = train_quiet(tmp, "experiment=semantoks", f"data.path={hcp_h5}", "model.conv_channels=16",
                      "model.long_conv_channels=16", "model.depth=1", "model.n_heads=2", "task.head.hidden_dim=32",
                      "task.head.bottleneck_dim=16", "data.batch_size=8", "data.window.length=60",
                      "data.window.min_length=null", "trainer.max_steps=2", "trainer.val_check_interval=2")
    feats, rows, attrs = _extract(run, tmp / "semantoks.h5")
    ds = window_dataset(load_run(run).datamodule, "val")
    _check_rows(feats, rows, feats.shape[1], [ds.window(i) for i in range(len(ds))])
    assert sorted(set(rows["subject_id"])) == HCP_IDS and attrs["task_class"].endswith("SimDINO")
