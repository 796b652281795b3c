"""Brainmarks' logistic protocol in brainfm (``brainfm-evaluate protocol=logistic``; docs/brainmarks_protocols.md):
parity with ``python -m brainmarks.main_logistic`` and Brainmarks' own ``Connectome`` on a data set brainfm wrote,
a checkpoint's row beside FC, and the errors.

The parity test runs the real, unmodified brainmarks package; it is skipped only when brainmarks does not import
and ``BRAINFM_REQUIRE_BRAINMARKS`` is unset (``make test`` installs brainmarks and sets it)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import QUIET, require_brainmarks, train_in

from brainfm.cli import evaluate as evaluate_cli
from brainfm.config import compose
from brainfm.data.splits import draw_subject_split
from brainfm.data.stores.roi import ROIStore, write_roi_h5
from brainfm.errors import ConfigError, DataError

pytest.importorskip("datasets")

# a local Brainmarks data set (its registry imports every module of the brainmarks.datasets namespace package) and
# Brainmarks' own Connectome registered for the synthetic 12-ROI space (its registered connectome_schaefer400 takes
# the same code; 400 ROIs make 79,800 features and a minute of fitting)
DATASET_PLUGIN = '''
import os
from brainmarks.datasets.base import HFDataset, load_arrow_dataset
from brainmarks.datasets.registry import register_dataset

@register_dataset
def brainfm_parity(space, **kwargs):
    root = os.environ["BRAINFM_PARITY_DATA"]
    return {s: HFDataset(load_arrow_dataset(f"{root}/{s}"), target_key="gender") for s in ("train", "validation", "test")}
'''
MODEL_PLUGIN = '''
from brainmarks.models.connectome import Connectome
from brainmarks.models.registry import register_model

@register_model
def connectome_toy(**kwargs):
    model = Connectome()
    model.__space__ = "toy"
    return model
'''

pytestmark = pytest.mark.usefixtures("one_thread")


def _synthetic(root: Path, n_subjects: int = 60, n_rois: int = 12, n_trs: int = 40, seed: int = 0) -> tuple[Path, Path]:
    """An ROI store with a learnable per-run label ``gender`` (class M: a latent signal shared by 8 ROIs, of random
    strength) and its ``to-brainmarks`` copy (float32); labels alternate inside each split of the subject draw, so
    every split holds both classes."""
    from brainfm.data.stores.brainmarks_writer import write_brainmarks

    rng = np.random.default_rng(seed)
    subjects = [f"s{i:03d}" for i in range(n_subjects)]
    split = draw_subject_split(subjects, (0.8, 0.1, 0.1), 0)  # the split to-brainmarks writes
    label = {s: j % 2 for members in split.values() for j, s in enumerate(sorted(members))}
    series = []
    for s in subjects:
        x = rng.normal(size=(n_rois, n_trs))
        x[:8] += ((0.5 if label[s] else 0.0) + rng.normal(0, 0.3)) * rng.normal(size=n_trs)
        series.append(100.0 + 5.0 * x)
    h5 = write_roi_h5(root / "syn.h5", {"toy": series}, subjects, 2.0, {"toy": [f"r{k}" for k in range(n_rois)]},
                      labels={"gender": ["M" if label[s] else "F" for s in subjects]})
    return h5, write_brainmarks(h5, root / "syn.toy.arrow", dtype="float32")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, Path]:
    return _synthetic(tmp_path_factory.mktemp("bm_protocol"))


def _evaluate(*overrides: str) -> dict:
    return evaluate_cli.run(compose("evaluate", list(overrides)))


def test_bootstrap_metrics_equal_scikit_learn():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    from brainfm.eval.logistic import _confusion_metrics

    rng = np.random.default_rng(0)
    for k in (2, 3, 5):
        t, p = rng.integers(0, k, 40), rng.integers(0, k, 40)
        p[p == k - 1] = 0  # a class never predicted
        with np.errstate(all="ignore"):
            expected = (accuracy_score(t, p), balanced_accuracy_score(t, p), f1_score(t, p, average="macro"))
        np.testing.assert_allclose(_confusion_metrics(t, p, k), expected, atol=1e-12)


def test_fc_alone_equals_brainmarks_main_logistic(synthetic, tmp_path):
    """``brainfm-evaluate protocol=logistic model=fc`` against ``python -m brainmarks.main_logistic`` with Brainmarks'
    Connectome on the same Arrow data set: the same C, the same fixed-split metrics (and bootstrap stds), the same
    randomised trials; the ROI HDF5 store it was written from gives the same table."""
    require_brainmarks("brainmarks.main_logistic")
    h5, arrow = synthetic
    plug = tmp_path / "plug" / "brainmarks"
    (plug / "datasets").mkdir(parents=True)
    (plug / "models").mkdir()
    (plug / "datasets" / "brainfm_parity.py").write_text(DATASET_PLUGIN)
    (plug / "models" / "brainfm_parity_connectome.py").write_text(MODEL_PLUGIN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "plug"), os.environ.get("PYTHONPATH", "")]),
           "BRAINFM_PARITY_DATA": str(arrow), "HF_DATASETS_CACHE": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    # float32 features on the CPU: Brainmarks' default amp=true computes the connectome in bfloat16
    proc = subprocess.run([sys.executable, "-m", "brainmarks.main_logistic", "connectome_toy", "cls", "brainfm_parity",
                           "--overrides", "device=cpu", "amp=false", "num_workers=1", "n_trials=2",
                           f"output_root={tmp_path / 'bm'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(next((tmp_path / "bm").rglob("eval_table.csv"))) as f:
        rows = list(csv.DictReader(f))
    fixed = next(r for r in rows if r["trial"] == "" and r["split"] == "test")
    trials = [r for r in rows if r["trial"] != "" and r["split"] == "test"]

    for data in (arrow, h5):
        out = tmp_path / f"ours_{Path(data).suffix.strip('.')}"
        report = _evaluate("protocol=logistic", "model=fc", f"data_path={data}", "target=gender",
                           "logistic.n_trials=2", f"out_dir={out}")
        assert list(report["results"]) == ["fc"]
        assert json.loads((out / "metrics.json").read_text())["results"]["fc"]["fixed"]["test"] == \
            report["results"]["fc"]["fixed"]["test"]
        ours = report["results"]["fc"]
        assert ours["fixed"]["C"] == pytest.approx(float(fixed["C"]), rel=1e-9)
        for name, theirs in (("acc", "acc"), ("balanced_acc", "bacc"), ("f1_macro", "f1")):
            assert ours["fixed"]["test"][name] == pytest.approx(float(fixed[theirs]), abs=1e-6)
            assert ours["fixed"]["test"][f"{name}_std"] == pytest.approx(float(fixed[f"{theirs}_std"]), abs=1e-6)
            assert ours["trials"]["test"][name]["values"] == pytest.approx([float(r[theirs]) for r in trials], abs=1e-6)
    assert 0.0 < ours["fixed"]["test"]["balanced_acc"] < 1.0 or ours["trials"]["test"]["balanced_acc"]["mean"] > 0.5


@pytest.fixture(scope="module")
def segmented_hcp(hcp_h5, tmp_path_factory) -> Path:
    """The embedded HCP runs cut into 6 samples of 200 TRs each, label ``half`` alternating a/b per sample (every
    split of the 7 subjects holds both classes)."""
    store = ROIStore(hcp_h5)
    series, subjects, labels = [], [], []
    for run in range(len(store.subject_ids)):
        x = store.read(run)
        for k in range(6):
            series.append(x[200 * k:200 * (k + 1)].T)
            subjects.append(store.subject_ids[run])
            labels.append("ab"[k % 2])
    path = tmp_path_factory.mktemp("hcp_cut") / "hcp_cut.h5"
    return write_roi_h5(path, {store.atlas: series}, subjects, store.tr, {store.atlas: list(store.roi_names)},
                        labels={"half": labels, "constant": ["x"] * len(labels)})


def test_checkpoint_row_beside_fc(hcp_h5, segmented_hcp, tmp_path, capsys):
    run_dir, _ = train_in(tmp_path, *QUIET, "experiment=gpt", f"data.path={hcp_h5}", "model.d_model=32",
                          "model.depth=1", "model.n_heads=2", "data.window.length=40", "data.window.min_length=null")
    report = _evaluate("protocol=logistic", f"ckpt={run_dir}", f"data_path={segmented_hcp}", "target=half",
                       "logistic.n_trials=2", "logistic.bootstrap=20")
    out = run_dir / "eval" / "logistic_half"
    assert json.loads((out / "metrics.json").read_text())["results"].keys() == {"model", "fc"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no shards or temporary file left
    assert report["results"]["model"]["dim"] == 32 and report["results"]["fc"]["dim"] == 94 * 93 // 2
    assert report["settings"]["window_length"] == 40 and report["data"]["samples"]["train"] > 0
    for row in report["results"].values():
        assert 0.0 <= row["fixed"]["test"]["balanced_acc"] <= 1.0 and row["trials"]["n"] == 2
    table = capsys.readouterr().out
    assert "FC" in table and f"gpt/{run_dir.name} (cls)" in table and "balanced acc" in table

    # errors name the fix
    with pytest.raises(DataError, match="has 200 TRs, fewer than the window of 300.*window_length=200"):
        _evaluate("protocol=logistic", f"ckpt={run_dir}", f"data_path={segmented_hcp}", "target=half",
                  "logistic.window_length=300", "logistic.n_trials=0")
    with pytest.raises(ConfigError, match="model=fc is the FC baseline alone.*drop model=fc, or drop ckpt="):
        _evaluate("protocol=logistic", "model=fc", f"ckpt={run_dir}", f"data_path={segmented_hcp}", "target=half")


def test_errors_name_the_labels_and_the_fix(synthetic, segmented_hcp, small_h5, tmp_path):
    h5, arrow = synthetic
    with pytest.raises(ConfigError, match=r"target='sex' is not a label of .*available: \['gender'.*target=gender"):
        _evaluate("protocol=logistic", "model=fc", f"data_path={arrow}", "target=sex")
    with pytest.raises(ConfigError, match=r"needs target=<label>.*\['gender'\]"):
        _evaluate("protocol=logistic", "model=fc", f"data_path={h5}")
    with pytest.raises(DataError, match="'constant' .* has one class"):
        _evaluate("protocol=logistic", "model=fc", f"data_path={segmented_hcp}", "target=constant")
    with pytest.raises(DataError, match="no per-run labels.*/labels/<name>"):
        _evaluate("protocol=logistic", "model=fc", f"data_path={small_h5}", "target=sex")
    with pytest.raises(ConfigError, match="model=fc needs the labelled data: data_path="):
        _evaluate("protocol=logistic", "model=fc", "target=gender")
    with pytest.raises(ConfigError, match="model=.*: protocol=logistic evaluates a trained checkpoint"):
        _evaluate("protocol=logistic", "model=bert", f"data_path={h5}", "target=gender")
    with pytest.raises(ConfigError, match="needs ckpt=.*or model=fc"):
        _evaluate("protocol=logistic", f"data_path={h5}", "target=gender")
    with pytest.raises(ConfigError, match="model=fc is for protocol=logistic"):
        _evaluate("model=fc", "ckpt=nowhere")
    with h5py.File(h5, "r") as f:
        assert "labels/gender" in f
    rng = np.random.default_rng(0)
    series = {a: [rng.normal(size=(12, 48)) for _ in range(60)] for a in ("aal", "toy")}
    two = write_roi_h5(tmp_path / "two_atlases.h5", series, [f"s{i:03d}" for i in range(60)], 0.72,
                       {a: [f"r{k}" for k in range(12)] for a in series}, labels={"gender": ["M", "F"] * 30})
    # the fix names the key of the protocol's own section (data.atlas does not exist in brainfm-evaluate's config)
    with pytest.raises(DataError, match=r"logistic\.atlas=") as err:
        _evaluate("protocol=logistic", "model=fc", f"data_path={two}", "target=gender")
    assert "data.atlas" not in str(err.value)
