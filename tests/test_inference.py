"""brainfm-evaluate and brainfm-extract on the configured trainer: 2 gloo ranks (each embedding its
share of the windows, rank 0 writing) give the numbers and rows of 1 process; a Swin4D/SimMIM
checkpoint on real NIfTI volumes is evaluated as well."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import subprocess_env

from brainfm import training as train
from brainfm.config import repo_root
from brainfm.eval.extract import read_features

pytestmark = pytest.mark.skipif(os.name != "posix", reason="multi-process tests need POSIX")
TWO = ["trainer=ddp_cpu", "trainer.devices=2"]


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=600,
                          env=subprocess_env(), cwd=repo_root())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def roi_run(tmp_path_factory, hcp_h5):
    from brainfm.config import compose

    tmp = tmp_path_factory.mktemp("roi")
    cfg = compose("train", ["experiment=contrastive", f"data.path={hcp_h5}", f"paths.output_dir={tmp}",
                            f"paths.split_dir={tmp}/splits", "model.d_model=32", "model.depth=1", "trainer.max_steps=10",
                            "trainer.val_check_interval=10", "data.window.length=40", "data.window.min_length=30",
                            "logger=csv", "trainer.enable_progress_bar=false"])
    train.run(cfg)
    return cfg.paths.run_dir


def _table(stdout: str) -> list[str]:
    """The printed table's header and rows (not the progress lines before it, which carry timings)."""
    return [line for line in stdout.splitlines() if "┃" in line or "│" in line]


def test_evaluate_on_two_ranks_prints_the_table_of_one(roi_run, tmp_path):
    args = [f"ckpt={roi_run}", "window_lengths=[30,40]"]
    one = _cli("brainfm.cli.evaluate", *args, f"out_dir={tmp_path}/one")
    two = _cli("brainfm.cli.evaluate", *args, f"out_dir={tmp_path}/two", *TWO)
    a, b = (json.loads((tmp_path / k / "metrics.json").read_text()) for k in ("one", "two"))
    assert a["results"] == b["results"] and a["probe"] == b["probe"]
    assert a["protocol"]["windows"] == b["protocol"]["windows"] == {"30": {"gallery": 7 * 39, "queries": 7 * 39},
                                                                     "40": {"gallery": 7 * 29, "queries": 7 * 29}}
    assert _table(one.stdout) == _table(two.stdout) and len(_table(one.stdout)) >= 4
    assert "Traceback" not in two.stderr


def test_extract_on_two_ranks_writes_the_rows_of_one(roi_run, tmp_path):
    for name, extra in (("one", []), ("two", TWO)):
        _cli("brainfm.cli.extract", f"ckpt={roi_run}", f"out={tmp_path}/{name}.parquet", "splits=[train,val]", *extra)
    fa, ra, _ = read_features(tmp_path / "one.parquet")
    fb, rb, _ = read_features(tmp_path / "two.parquet")
    np.testing.assert_allclose(fb, fa, rtol=1e-5, atol=1e-6)
    assert ra.equals(rb) and len(ra) > 100
    assert not list(tmp_path.glob(".*shards*"))  # the ranks' shards are removed


def test_evaluate_a_swin4d_simmim_checkpoint_on_real_volumes(cfg_for, tmp_path):
    from brainfm.data.embedded import build_nifti_toy_store, fetch

    fetch("nifti_toy", data_dir=repo_root() / "data")
    store = build_nifti_toy_store(repo_root() / "data")
    cfg = cfg_for("experiment=simmim_toy", f"data.path={store}", "trainer.max_steps=4", "trainer.val_check_interval=4",
                  "model.depths=[1,1,1,1]", "model.embed_dim=12")
    train.run(cfg)
    proc = _cli("brainfm.cli.evaluate", f"ckpt={cfg.paths.run_dir}", f"out_dir={tmp_path}/eval", "stride=4")
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(report["results"]) == {"pretrained", "random_init"}  # FC fingerprinting needs ROI series
    assert report["data"]["kind"] == "volume" and list(report["results"]["pretrained"]) == ["8"]
    r = report["results"]["pretrained"]["8"]
    assert r["n_queries"] > 0 and 0.0 <= r["rank1"] <= 1.0 and "8 TRs" in proc.stdout


def test_evaluate_one_session_against_another(roi_run, hcp_h5, tmp_path):
    """gallery_runs/query_runs: whole runs of one session against another (here the two halves of every
    embedded run written as runs REST1 and REST2)."""
    from brainfm.data.stores.roi import ROIStore, write_roi_h5

    store = ROIStore(hcp_h5)
    series, subjects, runs = [], [], []
    for r in range(len(store)):
        x = store.read(r).T  # (ROIs, TRs)
        series += [x[:, :600], x[:, 600:]]
        subjects += [store.subject_ids[r]] * 2
        runs += ["REST1", "REST2"]
    two = write_roi_h5(tmp_path / "sessions.h5", {store.atlas: series}, subjects, store.tr,
                       {store.atlas: store.roi_names}, run_ids=runs)
    _cli("brainfm.cli.evaluate", f"ckpt={roi_run}", f"data_path={two}", "window_lengths=[40]", "gallery_runs=[REST1]",
         "query_runs=[REST2]", f"out_dir={tmp_path}/eval", "probe=false")
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["protocol"]["windows"]["40"] == {"gallery": 7 * 29, "queries": 7 * 29}
    assert "REST1" in report["protocol"]["gallery"] and report["results"]["fc_fingerprint"]["40"]["rank1"] > 0.5
