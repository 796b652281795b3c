"""Re-identification, FC fingerprinting, NT-Xent: numbers checked by hand; the evaluate CLI end to end."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from brainfm import training as train
from brainfm.data.stores.roi import ROIStore, write_roi_h5
from brainfm.errors import CheckpointError
from brainfm.eval.fingerprinting import fc_features
from brainfm.eval.reidentification import average_precision, reidentification
from brainfm.runs import check_compatible
from brainfm.tasks.losses import nt_xent


def test_reidentification_by_hand():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    g_ids = np.array([0, 1, 0, 1])
    queries = np.array([[1.0, 0.05], [0.7, 0.8]])
    q_ids = np.array([0, 1])
    r = reidentification(gallery, g_ids, queries, q_ids)
    # query 0 ranks [0, 2, 3, 1] -> rel [1, 1, 0, 0]: rank-1 hit, AP 1
    # query 1 (cos to g: .66, .75, .71, .79 approx) ranks [3, 1, 2, 0] -> rel [1, 1, 0, 0]: AP 1
    assert r["rank1"] == 1.0 and r["mAP"] == 1.0
    q_ids_wrong = np.array([1, 0])
    r = reidentification(gallery, g_ids, queries, q_ids_wrong)
    # rel [0, 0, 1, 1] for both: AP = (1/3 + 2/4) / 2
    assert r["rank1"] == 0.0
    assert r["mAP"] == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert r["rank1_chance"] == 0.5


def test_average_precision_formula():
    rel = np.array([[True, False, True, False], [False, False, False, True]])
    np.testing.assert_allclose(average_precision(rel), [(1 + 2 / 3) / 2, 1 / 4])


def test_pearson_similarity_ignores_offsets():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(6, 20))
    r1 = reidentification(g, np.arange(6), g + 5.0, np.arange(6), metric="pearson")
    assert r1["rank1"] == 1.0


def test_fc_features_match_numpy_corrcoef():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 50, 5))
    feats = fc_features(w)
    assert feats.shape == (3, 10)
    iu = np.triu_indices(5, k=1)
    for i in range(3):
        np.testing.assert_allclose(feats[i], np.corrcoef(w[i].T)[iu], rtol=1e-5, atol=1e-6)


def test_nt_xent_against_hand_computation_4x2():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]])
    z2 = torch.tensor([[2.0, 0.1], [-0.1, 1.0], [1.0, 0.8], [0.5, -1.0]])
    t = 0.5
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1).tolist()
    total = 0.0
    for i in range(8):
        p = (i + 4) % 8
        dots = {k: sum(a * b for a, b in zip(z[i], z[k])) / t for k in range(8) if k != i}
        total += -(dots[p] - math.log(sum(math.exp(v) for v in dots.values())))
    assert float(nt_xent(z1, z2, temperature=t)) == pytest.approx(total / 8, rel=1e-5)
    # with groups: items 0 and 1 share a run, so they are not each other's negatives
    groups = torch.tensor([0, 0, 1, 2])
    total = 0.0
    for i in range(8):
        p = (i + 4) % 8
        excluded = {i} | {k for k in range(8) if groups[k % 4] == groups[i % 4] and k != p}
        dots = {k: sum(a * b for a, b in zip(z[i], z[k])) / t for k in range(8) if k not in excluded}
        total += -(dots[p] - math.log(sum(math.exp(v) for v in dots.values())))
    assert float(nt_xent(z1, z2, temperature=t, groups=groups)) == pytest.approx(total / 8, rel=1e-5)


def test_pairs_are_two_non_overlapping_windows_of_one_run(small_h5):
    from brainfm.data.datamodules.roi import ROIDataModule

    dm = ROIDataModule(name="toy", path=str(small_h5), window={"length": 30}, pairs=True, batch_size=4)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["bold2"].shape == batch["bold"].shape
    assert (torch.abs(batch["onset2"] - batch["onset"]) >= 30 * 2.0).all()  # TR 2 s, 30 TRs


def test_checkpoint_data_mismatches_are_named(small_h5):
    store = ROIStore(small_h5)
    meta = {"tr": 2.0, "n_rois": 6, "roi_names": [f"roi{i}" for i in range(6)], "atlas": "toy"}
    check_compatible(meta, store)
    with pytest.raises(CheckpointError, match="TR mismatch"):
        check_compatible({**meta, "tr": 0.72}, ROIStore(small_h5))
    with pytest.raises(CheckpointError, match="trained on 94 ROIs"):
        check_compatible({**meta, "n_rois": 94}, ROIStore(small_h5))
    swapped = [*meta["roi_names"]]
    swapped[2], swapped[3] = swapped[3], swapped[2]
    with pytest.raises(CheckpointError, match=r"differs .* at index 2: data 'roi2', model 'roi3'"):
        check_compatible({**meta, "roi_names": swapped}, ROIStore(small_h5))


def test_evaluate_cli_writes_metrics_and_plot(cfg_for, tmp_path):
    cfg = cfg_for("experiment=contrastive", "model.d_model=32", "trainer.max_steps=30",
                  "trainer.val_check_interval=30", "data.window.length=40", "data.window.min_length=30")
    train.run(cfg)
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, "-m", "brainfm.cli.evaluate", f"ckpt={cfg.paths.run_dir}", "window_lengths=[30,40]",
         f"out_dir={out}"], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["results"]) == {"pretrained", "random_init", "fc_fingerprint"}
    for method in report["results"].values():
        assert set(method) == {"30", "40"}
        for r in method.values():
            assert 0.0 <= r["rank1"] <= 1.0 and 0.0 < r["mAP"] <= 1.0
            assert r["rank1_chance"] == pytest.approx(1 / 7)
    # 600 TRs per half, stride 15: (600 - 30) // 15 + 1 windows per run, 7 runs
    assert report["results"]["fc_fingerprint"]["30"]["n_queries"] == 7 * ((600 - 30) // 15 + 1)
    assert (out / "reid.png").stat().st_size > 10_000
    assert "pretrained" in proc.stdout and "FC fingerprinting" in proc.stdout
    # the 7-way subject linear probe: FC features of real HCP subjects are far above chance
    assert set(report["probe"]) == set(report["results"])
    assert report["probe"]["fc_fingerprint"]["40"]["acc"] > 0.6
    assert "subject linear probe" in proc.stdout
    # progress while it runs (brainfm's logger, printed by the CLI before the tables)
    assert "pretrained: embedding" in proc.stdout and "FC fingerprinting, 40 TRs: Rank-1" in proc.stdout
    assert proc.stdout.index("random init, 30 TRs: Rank-1") < proc.stdout.index("Subject re-identification")


SEMANTOKS_SMALL = ("experiment=semantoks", "model.conv_channels=16", "model.long_conv_channels=16", "model.depth=1",
                   "model.n_heads=2", "task.head.hidden_dim=64", "task.head.bottleneck_dim=16", "data.window.length=60",
                   "data.window.min_length=null")


@pytest.mark.parametrize("family", ["gpt", "semantoks"])
def test_evaluate_at_another_tr(family, cfg_for, tmp_path, hcp_h5):
    """GPT embeds time in seconds: it evaluates TR-2 s data (the table says so). Brain-Semantoks cuts
    fixed 20-TR patches: it refuses them, naming data.resample_tr, and writes nothing."""
    small = (("experiment=gpt", "model.d_model=32", "data.window.length=30", "data.window.min_length=null")
             if family == "gpt" else SEMANTOKS_SMALL)
    cfg = cfg_for(*small, "trainer.max_steps=2", "trainer.val_check_interval=2")
    train.run(cfg)
    store = ROIStore(hcp_h5)
    other = write_roi_h5(tmp_path / "tr2.h5", {"aal2": [store.read(r).T for r in range(7)]}, store.subject_ids, 2.0,
                         {"aal2": store.roi_names})
    proc = subprocess.run([sys.executable, "-m", "brainfm.cli.evaluate", f"ckpt={cfg.paths.run_dir}",
                           f"data_path={other}", f"out_dir={tmp_path}/e", "window_lengths=[60]", "probe=false"],
                          capture_output=True, text=True, timeout=300)
    if family == "gpt":
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "at TR 2 s" in proc.stdout and (tmp_path / "e" / "metrics.json").exists()
    else:
        assert proc.returncode == 2
        assert "TR mismatch" in proc.stderr and "+data.resample_tr=0.72" in proc.stderr
        assert "Traceback" not in proc.stderr and not (tmp_path / "e" / "metrics.json").exists()
        # the fix it names works: resampled to the training TR when read
        proc = subprocess.run([sys.executable, "-m", "brainfm.cli.evaluate", f"ckpt={cfg.paths.run_dir}",
                               f"data_path={other}", "+data.resample_tr=0.72", f"out_dir={tmp_path}/e",
                               "window_lengths=[60]", "probe=false"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "at TR 0.72 s" in proc.stdout


def _blobs(n_subjects=12, per_subject=10, dim=8, signal=3.0, seed=0):
    """Windows of subjects whose label (two classes) shifts the features along one axis."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_subjects), per_subject)
    subject_label = np.arange(n_subjects) % 2
    y = subject_label[groups]
    x = rng.normal(size=(len(groups), dim))
    x[:, 0] += signal * (y - 0.5)
    return x, y, groups


def test_sklearn_probe_is_subject_grouped_and_learns_a_real_signal():
    from brainfm.eval.probe import sklearn_probe

    x, y, g = _blobs(signal=4.0)  # Bayes accuracy Phi(2) = 0.977
    good = sklearn_probe(x, y, g, n_splits=4)
    assert good["acc"] > 0.85 and good["auroc"] > 0.9
    # labels that are a property of the subject only (a per-subject random offset, no class signal):
    # a window-level split would memorise subjects; grouped CV stays near chance
    rng = np.random.default_rng(1)
    offsets = rng.normal(scale=5.0, size=(12, 8))
    x_id = offsets[g] + 0.1 * rng.normal(size=x.shape)
    chance = sklearn_probe(x_id, y, g, n_splits=4)
    assert chance["balanced_acc"] < 0.75
    with pytest.raises(ValueError, match="subject-grouped folds"):
        sklearn_probe(x, y, g, n_splits=20)
    with pytest.raises(ValueError, match="NaN"):
        sklearn_probe(np.full_like(x, np.nan), y, g)


def test_regression_probe_metrics_match_their_formulas():
    from brainfm.eval.probe import metrics

    y = np.array([1.0, 2.0, 3.0, 4.0])
    p = np.array([1.5, 2.0, 2.5, 4.5])
    m = metrics("regression", y, p)
    assert m["mse"] == pytest.approx(np.mean((y - p) ** 2))
    assert m["mae"] == pytest.approx(0.375)
    assert m["r2"] == pytest.approx(1 - np.sum((y - p) ** 2) / np.sum((y - y.mean()) ** 2))
    assert m["pearson_r"] == pytest.approx(np.corrcoef(y, p)[0, 1])


def test_torch_probe_bn_linear_learns_classes_and_regression():
    from brainfm.eval.probe import torch_probe

    x, y, g = _blobs(per_subject=20)
    train, test = g < 8, g >= 8
    assert torch_probe(x[train], y[train], x[test], y[test])["acc"] > 0.85
    target = 2.0 * x[:, 0] + 10.0
    r = torch_probe(x[train], target[train], x[test], target[test], kind="regression", epochs=300)
    assert r["r2"] > 0.9


def _subject_features(signal: float, seed: int = 0):
    """5 subjects x 24 windows of 600 float32 features (like embeddings): a subject centre scaled by ``signal``
    plus unit noise; even windows train, odd ones test."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(5, 600))
    y = np.repeat(np.arange(5), 24)
    x = (signal * centres[y] + rng.normal(size=(len(y), 600))).astype(np.float32)
    train = np.arange(len(y)) % 2 == 0
    return x[train], y[train], x[~train], y[~train]


@pytest.mark.parametrize("signal,acc,C", [(0.2, 0.9, 0.01), (0.25, 59 / 60, 1e-4)])
def test_subject_probe_on_the_row_space_equals_logistic_regression_on_the_features(signal, acc, C):
    """The fast subject probe (RowSpace: 60 training windows of 600 features -> 60 coordinates) against the
    reference, LogisticRegressionCV on the standardised features themselves: the same C, the same
    predictions and accuracy (numbers of this seed)."""
    from brainfm.eval.probe import _model, fit_predict_sklearn

    train_x, train_y, test_x, test_y = _subject_features(signal)
    fast = _model("classification", 0).fit(train_x, train_y)
    reference = _model("classification", 0, reduce=False).fit(train_x, train_y)
    assert fast[1].basis_.shape == (600, 60) and len(reference) == 2  # reduced; the reference is not
    assert fast[-1].C_ == reference[-1].C_ == C
    np.testing.assert_array_equal(fast.predict(test_x), reference.predict(test_x))
    result = fit_predict_sklearn(train_x, train_y, test_x, test_y)
    assert result["acc"] == pytest.approx(acc) == np.mean(reference.predict(test_x) == test_y)


def test_subject_probe_reduction_is_exact_once_the_solvers_converge():
    """A weak signal (accuracy near 0.6), where the C chosen by CV accuracy hangs on near-ties that L-BFGS's
    default tolerance (1e-4) can tip either way: with both solvers converged (tol 1e-10) the fast probe and the
    reference choose the same C and give the same probabilities to 1e-8."""
    from brainfm.eval.probe import _model

    train_x, train_y, test_x, test_y = _subject_features(0.15, seed=2)
    fast, reference = (_model("classification", 0, reduce=reduce).set_params(logisticregressioncv__tol=1e-10)
                       .fit(train_x, train_y) for reduce in (True, False))
    assert fast[-1].C_ == reference[-1].C_ == 1.0
    np.testing.assert_allclose(fast.predict_proba(test_x), reference.predict_proba(test_x), atol=1e-8)
    assert np.mean(fast.predict(test_x) == test_y) == pytest.approx(35 / 60)


def test_subject_probe_keeps_the_features_when_they_are_few():
    """More than a quarter as many windows as features: no reduction, the reference's numbers bit for bit."""
    from brainfm.eval.probe import _model, fit_predict_sklearn, metrics

    x, y, g = _blobs(per_subject=20)  # 240 windows, 8 features
    train, test = g < 8, g >= 8
    model = _model("classification", 0).fit(x[train], y[train])
    assert model[1].basis_ is None
    reference = _model("classification", 0, reduce=False).fit(x[train], y[train])
    expected = metrics("classification", y[test], reference.predict(x[test]), reference.predict_proba(x[test]))
    assert fit_predict_sklearn(x[train], y[train], x[test], y[test]) == expected


def test_evaluate_logs_progress(fingerprint_runs, caplog):
    """What runs, each model's embedding, then one line per method and window length with its numbers."""
    import logging

    from brainfm.eval.protocol import run_reidentification

    with caplog.at_level(logging.INFO, logger="brainfm.eval.protocol"):
        report = run_reidentification(fingerprint_runs["demo"], window_lengths=[30, 60], run_fraction=0.5,
                                      gallery_fraction=1 / 3)
    lines = [r.getMessage() for r in caplog.records if r.name == "brainfm.eval.protocol"]
    windows = sum(w["gallery"] + w["queries"] for w in report["protocol"]["windows"].values())
    assert lines[0].startswith("evaluating ") and lines[0].endswith(" (7 subjects)")
    assert lines[1] == (f"pretrained, random init, FC fingerprinting at window lengths 30, 60 TRs ({windows} windows): "
                        "re-identification and the subject probe")
    assert lines[2] == f"pretrained: embedding {windows} windows"
    fc = report["results"]["fc_fingerprint"]["60"]
    assert re.fullmatch(rf"FC fingerprinting, 60 TRs: Rank-1 {fc['rank1']:.3f}, mAP {fc['mAP']:.3f}; subject probe "
                        rf"\(4371 features\) accuracy {report['probe']['fc_fingerprint']['60']['acc']:.3f} "
                        r"\(\d+\.\d s\)", lines[-1])
    assert len(lines) == 2 + 3 * 3  # the plan; per model: embedding + 2 lengths; FC: correlating + 2 lengths
    assert all(len(line) < 140 for line in lines[1:]), lines


def test_few_subject_curve_improves_with_more_subjects():
    from brainfm.eval.probe import few_subject_curve

    x, y, g = _blobs(n_subjects=30, per_subject=4, signal=1.0)
    curve = few_subject_curve(x, y, g, [2, 16], repeats=5, seed=0)
    assert [c["n_subjects"] for c in curve] == [2, 16] and all(len(c["values"]) == 5 for c in curve)
    assert curve[1]["mean"] > curve[0]["mean"]
    with pytest.raises(ValueError, match="only"):
        few_subject_curve(x, y, g, [100])


# -- run_fraction and compare= (brainfm.eval.protocol.run_reidentification) -----------------------------------
def _tiny_run(root, hcp_h5, name: str, *extra: str):
    """A run trained for a few steps on the embedded HCP data, under ``root``; its run directory."""
    from brainfm.config import compose

    cfg = compose("train", [f"paths.output_dir={root}/outputs", f"paths.split_dir={root}/splits", f"data.path={hcp_h5}",
                            f"run_name={name}", "trainer.enable_progress_bar=false",
                            "trainer.enable_model_summary=false", "logger=csv", *extra])
    train.run(cfg)
    return cfg.paths.run_dir


@pytest.fixture(scope="module")
def fingerprint_runs(tmp_path_factory, hcp_h5):
    """The demo's learned FC readout (4 steps), a meanMLP baseline (2 steps), and the demo's model z-scored with
    global statistics (2 steps)."""
    root = tmp_path_factory.mktemp("fingerprint")
    return {
        "demo": _tiny_run(root, hcp_h5, "demo", "experiment=demo", "trainer.max_steps=4",
                          "trainer.val_check_interval=4"),
        "mean_mlp": _tiny_run(root, hcp_h5, "mean_mlp", "experiment=baseline_mean_mlp", "trainer.max_steps=2",
                              "trainer.val_check_interval=2"),
        "global": _tiny_run(root, hcp_h5, "global", "experiment=demo", "data.normalization.mode=global",
                            "trainer.max_steps=2", "trainer.val_check_interval=2"),
    }


def _grid_windows(start: int, stop: int, length: int) -> int:
    """Windows of ``length`` TRs, stride ``length // 2``, inside TRs [start, stop)."""
    return (stop - start - length) // (length // 2) + 1


def test_run_fraction_reads_only_the_first_half_of_each_run(fingerprint_runs, monkeypatch):
    """``run_fraction=0.5 gallery_fraction=1/3`` on 1200-TR runs: gallery windows in TRs [0, 400), queries in
    [400, 600); no window reaches into the second half."""
    from brainfm.data.datasets.roi import ROIWindowDataset
    from brainfm.eval.protocol import run_reidentification

    reads: list[tuple[int, int, int]] = []
    sample = ROIWindowDataset._sample

    def recording(self, run, start, length):
        reads.append((int(run), int(start), int(length)))
        return sample(self, run, start, length)

    monkeypatch.setattr(ROIWindowDataset, "_sample", recording)
    report = run_reidentification(fingerprint_runs["demo"], window_lengths=[30, 60, 120], run_fraction=0.5,
                                  gallery_fraction=1 / 3, probe=False)
    windows = report["protocol"]["windows"]
    for length in (30, 60, 120):
        assert windows[str(length)] == {"gallery": 7 * _grid_windows(0, 400, length),
                                        "queries": 7 * _grid_windows(400, 600, length)}
        for name in ("pretrained", "random_init", "fc_fingerprint"):
            assert report["results"][name][str(length)]["n_queries"] == 7 * _grid_windows(400, 600, length)
    assert windows["30"] == {"gallery": 7 * 25, "queries": 7 * 12}  # by hand: (370 // 15 + 1), (170 // 15 + 1)
    assert report["protocol"]["run_fraction"] == 0.5
    # the last query window of each length ends at or before TR 600: 400 + 11 x 15 + 30 = 595 at 30 TRs
    last_end = max(400 + (_grid_windows(400, 600, n) - 1) * (n // 2) + n for n in (30, 60, 120))
    assert last_end == 595 and max(start + length for _, start, length in reads) == last_end
    assert {run for run, _, _ in reads} == set(range(7))
    # the whole run (the default) reads the second half
    reads.clear()
    full = run_reidentification(fingerprint_runs["demo"], window_lengths=[60], baselines=[], probe=False)
    assert full["protocol"]["windows"]["60"] == {"gallery": 7 * _grid_windows(0, 600, 60),
                                                 "queries": 7 * _grid_windows(600, 1200, 60)}
    assert max(start + length for _, start, length in reads) == 1200


@pytest.mark.parametrize("run_fraction,gallery_fraction", [(0.0, 0.2), (1.5, 0.5), (0.5, 0.5), (0.5, 0.7),
                                                          (0.5, 0.0)])
def test_bad_run_or_gallery_fraction_is_refused(fingerprint_runs, run_fraction, gallery_fraction):
    from brainfm.errors import ConfigError
    from brainfm.eval.protocol import run_reidentification

    with pytest.raises(ConfigError, match=rf"run_fraction={run_fraction} must lie in \(0, 1\] and "
                                          rf"gallery_fraction={gallery_fraction} strictly between 0 and it"):
        run_reidentification(fingerprint_runs["demo"], window_lengths=[30], run_fraction=run_fraction,
                             gallery_fraction=gallery_fraction, probe=False)


def test_compare_adds_a_trained_run_on_the_same_windows(fingerprint_runs):
    from brainfm.eval.protocol import run_reidentification
    from brainfm.runs import find_checkpoint

    report = run_reidentification(fingerprint_runs["demo"], window_lengths=[30, 60], run_fraction=0.5,
                                  gallery_fraction=1 / 3, probe=False, compare={"other": fingerprint_runs["mean_mlp"]})
    results = report["results"]
    assert list(results) == ["pretrained", "random_init", "fc_fingerprint", "other"]  # the table's row order
    assert report["compare"] == {"other": str(find_checkpoint(fingerprint_runs["mean_mlp"]))}
    for length in ("30", "60"):
        ours, other = results["pretrained"][length], results["other"][length]
        assert (other["n_gallery"], other["n_queries"]) == (ours["n_gallery"], ours["n_queries"])
        assert 0.0 <= other["rank1"] <= 1.0 and 0.0 < other["mAP"] <= 1.0
    assert set(results["other"]) == set(results["pretrained"]) == {"30", "60"}
    # a different model: its numbers are its own, not a copy of the pretrained model's
    assert results["other"]["30"]["mAP"] != results["pretrained"]["30"]["mAP"]


@pytest.mark.parametrize("name", ["fc_fingerprint", "random_init", "pretrained"])
def test_compare_name_taken_by_a_baseline_is_refused(fingerprint_runs, name):
    from brainfm.errors import ConfigError
    from brainfm.eval.protocol import run_reidentification

    with pytest.raises(ConfigError, match=f"compare name '{name}' is taken"):
        run_reidentification(fingerprint_runs["demo"], window_lengths=[30], probe=False,
                             compare={name: fingerprint_runs["mean_mlp"]})


def test_compared_run_with_global_normalization_is_refused(fingerprint_runs):
    from brainfm.errors import ConfigError
    from brainfm.eval.protocol import run_reidentification

    with pytest.raises(ConfigError, match=r"normalizes with mode=global, the evaluated checkpoint with mode=run.*"
                                          r"data.normalization.mode=run"):
        run_reidentification(fingerprint_runs["demo"], window_lengths=[30], probe=False,
                             compare={"global_z": fingerprint_runs["global"]})
