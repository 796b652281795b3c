"""Any TR: models that embed time in seconds evaluate data at another TR (the demo checkpoint on
94-ROI AAL2 data at TR 2 s); ``data.resample_tr`` resamples runs when read, equal to
``scipy.signal.resample_poly``; ``brainfm-data resample`` writes a resampled store; a file whose
TR differs from the recipe is still refused at training time."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy.signal import resample_poly

from brainfm import training as train
from brainfm.config import compose
from brainfm.data.datamodules.roi import ROIDataModule
from brainfm.data.stores import open_store
from brainfm.data.stores.resample import (
    resample_factors,
    resample_run,
    write_resampled_roi_h5,
)
from brainfm.errors import CheckpointError, ConfigError


def _raw_run(path: Path, run: int) -> np.ndarray:
    with h5py.File(path, "r") as f:
        atlas = next(iter(f["timeseries"]))
        n = int(f["ts_len"][run])
        return np.asarray(f["timeseries"][atlas][run, :, :n], dtype=np.float64).T  # (T, n_rois)


def test_resample_factors():
    assert resample_factors(0.72, 2.0) == (9, 25)
    assert resample_factors(0.8, 0.72) == (10, 9)
    assert resample_factors(2.0, 2.0) == (1, 1)
    with pytest.raises(ConfigError, match="positive"):
        resample_factors(0.72, 0.0)


@pytest.mark.parametrize("tr_out", [2.0, 0.8, 0.5])
def test_resample_run_is_scipy_resample_poly(hcp_h5, tr_out):
    x = _raw_run(hcp_h5, 0)
    up, down = resample_factors(0.72, tr_out)
    want = resample_poly(x, up, down, axis=0, padtype="line")
    got = resample_run(x, 0.72, tr_out)
    assert got.shape == (int(np.ceil(len(x) * up / down)), x.shape[1]) == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-3 * np.abs(x).max() * 1e-3)
    # the slow fluctuations survive: the resampled series at the original time points correlates with it
    t_new = np.arange(len(got)) * tr_out
    back = np.interp(np.arange(len(x)) * 0.72, t_new, got[:, 3])
    inner = slice(10, len(x) - 10)
    assert np.corrcoef(back[inner], x[inner, 3])[0, 1] > (0.9 if tr_out < 1 else 0.5)


def test_datamodule_resamples_when_read(hcp_h5, tmp_path):
    dm = ROIDataModule(name="hcp", path=str(hcp_h5), tr=0.72, resample_tr=2.0, split_dir=str(tmp_path),
                       window={"length": 20})
    dm.setup()
    assert dm.tr == 2.0 and dm.meta["tr"] == 2.0 and dm.meta["resample_tr"] == 2.0
    assert list(dm.store.lengths) == [432] * len(dm.store)  # ceil(1200 * 9 / 25)
    np.testing.assert_allclose(dm.store.read(2, 100, 120), resample_run(_raw_run(hcp_h5, 2), 0.72, 2.0)[100:120],
                               rtol=1e-6)
    batch = next(iter(dm.val_dataloader()))
    assert batch["bold"].shape[1:] == (20, 94)
    np.testing.assert_allclose(batch["t"][0].numpy(), np.arange(20) * 2.0)  # times in seconds at the new TR
    # the file's TR is still checked against the recipe first
    bad = ROIDataModule(name="hcp", path=str(hcp_h5), tr=2.0, resample_tr=2.0, split_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="TR mismatch"):
        bad.setup()


def test_resample_command_writes_a_store_at_the_new_tr(hcp_h5, tmp_path):
    from brainfm.cli.data import main

    out = tmp_path / "tr2.h5"
    main(["resample", str(hcp_h5), str(out), "--tr", "2"])
    store = open_store("roi", out)
    assert store.tr == 2.0 and store.n_rois == 94 and list(store.lengths) == [432] * 7
    np.testing.assert_allclose(store.read(1), resample_run(_raw_run(hcp_h5, 1), 0.72, 2.0), rtol=1e-6)
    assert store.roi_names == open_store("roi", hcp_h5).roi_names
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left


def test_training_refuses_a_file_at_another_tr_than_the_recipe(cfg_for, hcp_h5, tmp_path):
    tr2 = write_resampled_roi_h5(hcp_h5, tmp_path / "tr2.h5", 2.0)
    with pytest.raises(Exception, match="TR mismatch") as info:
        train.run(cfg_for(f"data.path={tr2}", "trainer.max_steps=1"))  # the recipe says 0.72 s
    assert "2 s" in str(info.value) and "0.72" in str(info.value)


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory, hcp_h5) -> Path:
    """A contrastive transformer (experiment=contrastive, the earlier demo; time in seconds) on the embedded HCP data,
    TR 0.72 s, a few steps."""
    tmp = tmp_path_factory.mktemp("demo")
    cfg = compose("train", [f"paths.output_dir={tmp}/outputs", f"paths.split_dir={tmp}/splits", f"data.path={hcp_h5}",
                            "experiment=contrastive", "run_name=demo", "trainer.max_steps=4", "trainer.val_check_interval=4",
                            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=csv",
                            "model.d_model=32", "model.depth=1"])
    train.run(cfg)
    return Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt"


def test_evaluate_takes_data_at_another_tr(demo_ckpt, hcp_h5, tmp_path, capsys):
    """The demo checkpoint (trained at TR 0.72 s) on 94-ROI AAL2 data at TR 2 s: no TR refusal, and
    the table states the data's TR and the windows' seconds at that TR."""
    from brainfm.cli import evaluate

    tr2 = write_resampled_roi_h5(hcp_h5, tmp_path / "aal2_tr2.h5", 2.0)
    cfg = compose("evaluate", [f"ckpt={demo_ckpt}", f"data_path={tr2}", "window_lengths=[30]",
                               "baselines=[random_init]", "probe=false", f"out_dir={tmp_path}/eval"])
    report = evaluate.run(cfg)
    out = capsys.readouterr().out
    assert report["data"]["tr"] == 2.0 and report["data"]["path"] == str(tr2)
    assert "at TR 2 s" in out and "30 TRs (60 s)" in out
    assert 0.0 <= report["results"]["pretrained"]["30"]["rank1"] <= 1.0


def test_a_model_with_a_fixed_tr_is_refused_with_the_fix(hcp_h5, tmp_path):
    from brainfm.runs import check_compatible

    tr2 = open_store("roi", write_resampled_roi_h5(hcp_h5, tmp_path / "tr2.h5", 2.0))
    meta = {"tr": 0.72, "n_rois": 94}
    with pytest.raises(CheckpointError, match=r"TR mismatch.*data.resample_tr=0.72"):
        check_compatible(meta, tr2, any_tr=False)
    check_compatible(meta, tr2, any_tr=True)  # time in seconds: accepted
    assert tr2.tr == 2.0
