"""``brainfm-data import``: parcellated time series as XCP-D writes them (BIDS derivatives) -> an ROI store.

The tree is written here with XCP-D's names: ``xcp_d/sub-XX/[ses-1/]func/<source>_space-MNI152NLin6Asym_seg-Toy6_
stat-mean_timeseries.tsv`` (header: ROI names, one row per TR) with XCP-D's placeholder sidecar
(``"SamplingFrequency": "TR"``), the run's ``*_desc-denoised_bold.json`` (``RepetitionTime``), ``*_motion.tsv``
(``framewise_displacement``), and a raw BIDS data set ``bids/`` with ``participants.tsv``, ``*_events.tsv`` (a block
design of two classes, ``face`` / ``house``, whose ROIs rise during their blocks) and a root
``task-faces_bold.json`` (BIDS inheritance). 4 subjects, 5 runs (sub-01: two sessions), 6 ROIs, 96 TRs at 2 s.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import CPU_QUIET, exit_status, train_in

from brainfm.cli import data as data_cli
from brainfm.data.datamodules.roi import ROIDataModule
from brainfm.data.datasets.roi import ROIWindowDataset
from brainfm.data.preprocess.bids_timeseries import import_bids_timeseries
from brainfm.data.stores.resample import ResampledStore, write_resampled_roi_h5
from brainfm.data.stores.roi import ROIStore
from brainfm.data.trial_labels import events_to_trial_labels
from brainfm.data.windows import WindowIndex, skip_censored
from brainfm.errors import ConfigError, DataError

TR, N_TRS, ATLAS, SPACE = 2.0, 96, "Toy6", "MNI152NLin6Asym"
ROIS = ["LH_Vis_1", "LH_Vis_2", "LH_SomMot_1", "RH_Vis_1", "RH_Default_1", "Thalamus"]
#: (subject, session or None, run)
RUNS = [("01", "1", 1), ("01", "2", 1), ("02", None, 1), ("02", None, 2), ("03", None, 1)]
CLASSES = ["face", "house"]
FD = "framewise_displacement"


def source(sub: str, ses: str | None, run: int) -> str:
    return f"sub-{sub}{f'_ses-{ses}' if ses else ''}_task-faces_run-{run}"


def folder(root: Path, sub: str, ses: str | None) -> Path:
    return root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "func"


def events(k: int) -> pd.DataFrame:
    """Blocks of 12 TRs (24 s), 6 TRs of rest between, the class alternating from run to run."""
    rows, t, c = [], 3, k % 2
    while t + 12 <= N_TRS:
        rows.append({"onset": t * TR, "duration": 12 * TR, "trial_type": CLASSES[c]})
        t, c = t + 18, 1 - c
    return pd.DataFrame(rows)


def write_tsv(path: Path, df: pd.DataFrame) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, sep="\t", index=False, na_rep="n/a")
    return path


def make_tree(root: Path, seed: int = 0) -> dict:
    """The tree (module docstring); returns the series ``(T, 6)`` and FD of each run, keyed by source name."""
    rng = np.random.default_rng(seed)
    xcp, bids = root / "xcp_d", root / "bids"
    for d, name in ((xcp, "XCP-D"), (bids, None)):
        d.mkdir(parents=True)
        desc = {"Name": "toy", "BIDSVersion": "1.9.0"}
        if name:
            desc |= {"DatasetType": "derivative", "GeneratedBy": [{"Name": name, "Version": "0.10.0"}]}
        (d / "dataset_description.json").write_text(json.dumps(desc))
    (bids / "task-faces_bold.json").write_text(json.dumps({"RepetitionTime": TR, "TaskName": "faces"}))
    write_tsv(bids / "participants.tsv", pd.DataFrame(
        {"participant_id": ["sub-01", "sub-02", "sub-03"], "age": ["21", "34", "n/a"], "sex": ["F", "M", "F"]}))
    series, fd = {}, {}
    for k, (sub, ses, run) in enumerate(RUNS):
        src = source(sub, ses, run)
        ev = events(k)
        labels, _ = events_to_trial_labels(ev, N_TRS, TR, 0.0, CLASSES)
        x = 100 + rng.normal(size=(N_TRS, len(ROIS)))
        x[labels == 0, :3] += 3.0
        x[labels == 1, 3:] += 3.0
        f = np.abs(rng.normal(0.15, 0.1, size=N_TRS))
        f[rng.choice(N_TRS, 4, replace=False)] = 0.9  # four high-motion TRs per run
        d = folder(xcp, sub, ses)
        ts = write_tsv(d / f"{src}_space-{SPACE}_seg-{ATLAS}_stat-mean_timeseries.tsv", pd.DataFrame(x, columns=ROIS))
        ts.with_suffix(".json").write_text(json.dumps({"SamplingFrequency": "TR"}))  # XCP-D's placeholder
        (d / f"{src}_space-{SPACE}_desc-denoised_bold.json").write_text(json.dumps({"RepetitionTime": TR}))
        # no FD for the first TR (n/a, as fMRIPrep writes it): counts as 0 mm
        write_tsv(d / f"{src}_motion.tsv", pd.DataFrame({"trans_x": np.zeros(N_TRS), FD: [np.nan, *f[1:]]}))
        write_tsv(folder(bids, sub, ses) / f"{src}_events.tsv", ev)
        series[src], fd[src] = x, np.r_[0.0, f[1:]]
    return {"xcp": xcp, "bids": bids, "series": series, "fd": fd}


@pytest.fixture
def tree(tmp_path) -> dict:
    return make_tree(tmp_path / "study")


def imported(tree, out: Path, **kwargs) -> ROIStore:
    import_bids_timeseries(tree["xcp"], ATLAS, out, events_dir=tree["bids"], **kwargs)
    return ROIStore(out, preload=False)


# -- the import -------------------------------------------------------------------------------------------------
def test_xcpd_tree_imports_with_its_runs_tr_rois_and_labels(tree, tmp_path):
    store = imported(tree, tmp_path / "toy.h5")
    assert store.subject_ids == ["sub-01", "sub-01", "sub-02", "sub-02", "sub-03"]
    assert store.run_ids == ["ses-1_task-faces_run-1", "ses-2_task-faces_run-1", "task-faces_run-1", "task-faces_run-2",
                             "task-faces_run-1"]
    assert store.tr == TR and store.roi_names == ROIS and store.atlas == ATLAS and store.lengths.tolist() == [N_TRS] * 5
    for row, (sub, ses, run) in enumerate(RUNS):
        np.testing.assert_allclose(store.read(row), tree["series"][source(sub, ses, run)], rtol=1e-6)
    # participants.tsv: one value per run from its subject's row; numbers with NaN for n/a, text as strings
    np.testing.assert_array_equal(store.run_labels("age"), [21, 21, 34, 34, np.nan])
    assert store.run_labels("sex").tolist() == ["F", "F", "M", "M", "F"]
    # events.tsv of the raw data set -> per-TR labels, stimulus-locked
    assert store.trial_label_info("task") == {"classes": CLASSES, "shift_s": 0.0}
    for row in range(5):
        want, _ = events_to_trial_labels(events(row), N_TRS, TR, 0.0, CLASSES)
        np.testing.assert_array_equal(store.trial_labels(row, "task"), want)
    assert store.attrs["pipeline"] == "XCP-D 0.10.0" and store.attrs["space"] == SPACE
    assert not store.has_censoring  # no --fd-threshold, nothing removed by the pipeline


def test_tr_from_bids_inheritance_or_tr_and_refused_when_missing(tree, tmp_path):
    for bold_json in tree["xcp"].rglob("*_desc-denoised_bold.json"):
        bold_json.unlink()
    first = next(iter(sorted(tree["xcp"].rglob("*_timeseries.tsv"))))
    with pytest.raises(DataError, match=rf"no repetition time for {first}.*Fix: --tr <seconds>, or --events-dir"):
        import_bids_timeseries(tree["xcp"], ATLAS, tmp_path / "a.h5")
    assert not (tmp_path / "a.h5").exists()
    # the raw data set's root task-faces_bold.json applies to every run (BIDS inheritance)
    assert imported(tree, tmp_path / "b.h5").tr == TR
    assert ROIStore(tmp_path / "b.h5").attrs["tr_source"] == f"sidecars of 5 run(s), e.g. {tree['bids'] / 'task-faces_bold.json'}"
    import_bids_timeseries(tree["xcp"], ATLAS, tmp_path / "c.h5", tr=2.0)
    assert ROIStore(tmp_path / "c.h5").tr == 2.0 and ROIStore(tmp_path / "c.h5").attrs["tr_source"] == "--tr for 5 run(s)"
    with pytest.raises(DataError, match=r"TR mismatch: .*task-faces_bold.json records 2 s .* but --tr 0.72"):
        import_bids_timeseries(tree["xcp"], ATLAS, tmp_path / "d.h5", events_dir=tree["bids"], tr=0.72)


# -- motion censoring ---------------------------------------------------------------------------------------------
def test_fd_censoring_records_the_trs_and_skips_exactly_their_windows(tree, tmp_path, caplog):
    store = imported(tree, tmp_path / "toy.h5", fd_threshold=0.5)
    want = {row: np.flatnonzero(tree["fd"][source(*r)] > 0.5) for row, r in enumerate(RUNS)}
    for row in range(5):
        np.testing.assert_array_equal(store.censored_trs(row), want[row])
    assert store.censoring["n_censored"] == sum(len(v) for v in want.values()) and store.censoring["fd_threshold_mm"] == 0.5
    store.close()
    dm = ROIDataModule(name="toy", path=str(tmp_path / "toy.h5"), window={"length": 10, "eval_stride": 4},
                       split={"kind": "time", "train_fraction": 0.5}, split_dir=str(tmp_path / "splits"))
    dm.setup()
    with caplog.at_level(logging.INFO, logger="brainfm.data.windows"):
        ds = dm.dataset("val")
    # the grid windows (10 TRs every 4) of the validation halves, less exactly those that hold a censored TR
    grid = [(run, s) for run, lo, hi in dm.segments["val"] for s in range(lo, hi - 10 + 1, 4)]
    clean = [(run, s) for run, s in grid if not np.isin(np.arange(s, s + 10), want[run]).any()]
    assert [ds.window(i) for i in range(len(ds))] == clean and len(clean) < len(grid)
    assert f"skipped {len(grid) - len(clean)} of {len(grid)} windows" in caplog.text
    assert ds.censored_skipped == len(grid) - len(clean)
    for i in range(len(ds)):  # no window, nor its contrastive partner, reads a censored TR
        run, start = ds.window(i)
        other = ds.index.partner_start(i, start, 10, seed=i)
        assert not np.isin(np.r_[start:start + 10, other:other + 10], want[run]).any()
    # a segment whose every window holds a censored TR says so
    c = int(next(t for t in want[0] if 2 <= t <= N_TRS - 3))
    with pytest.raises(ConfigError, match=r"every window \(a window of 5 TRs\) .* holds a censored TR \(1 skipped\)"):
        ROIWindowDataset(dm.store, dm.normalizer, [(0, c - 2, c + 3)], length=5)


def test_fd_from_fmriprep_confounds_in_another_folder(tree, tmp_path):
    """nilearn-based pipelines: the time series in one derivatives folder, fMRIPrep's confounds in another."""
    for k, (sub, ses, run) in enumerate(RUNS):
        src = source(sub, ses, run)
        (folder(tree["xcp"], sub, ses) / f"{src}_motion.tsv").unlink()
        fd = tree["fd"][src] if k else tree["fd"][src][:-1]  # the first run's table one row short
        write_tsv(folder(tmp_path / "fmriprep", sub, ses) / f"{src}_desc-confounds_timeseries.tsv",
                  pd.DataFrame({"global_signal": np.ones(len(fd)), FD: [np.nan, *fd[1:]]}))
    with pytest.raises(DataError, match=rf"{source(*RUNS[0])}_desc-confounds_timeseries.tsv has 95 rows but .* 96 TRs"):
        imported(tree, tmp_path / "a.h5", fd_threshold=0.5, confounds_dir=tmp_path / "fmriprep")
    src = source(*RUNS[0])
    write_tsv(folder(tmp_path / "fmriprep", "01", "1") / f"{src}_desc-confounds_timeseries.tsv",
              pd.DataFrame({FD: [np.nan, *tree["fd"][src][1:]]}))
    store = imported(tree, tmp_path / "b.h5", fd_threshold=0.5, confounds_dir=tmp_path / "fmriprep")
    for row, r in enumerate(RUNS):
        np.testing.assert_array_equal(store.censored_trs(row), np.flatnonzero(tree["fd"][source(*r)] > 0.5))


def test_skip_censored_keeps_the_grid_windows_without_a_censored_tr():
    rng = np.random.default_rng(0)
    for _ in range(200):
        span, stride = int(rng.integers(1, 9)), int(rng.integers(1, 5))
        segments = [(int(r), int(lo), int(lo + rng.integers(0, 40))) for r, lo in enumerate(rng.integers(0, 10, 3))]
        censored = {r: np.unique(rng.integers(0, 50, rng.integers(0, 4))) for r in range(3)}
        kept, origin, before, after = skip_censored(segments, span, stride, censored.__getitem__)
        grid = WindowIndex(segments, span, stride)
        want = [grid.window(i) for i in range(len(grid))]
        want = [(r, s) for r, s in want if not np.isin(np.arange(s, s + span), censored[r]).any()]
        got = WindowIndex(kept, span, stride)
        assert [got.window(i) for i in range(len(got))] == want and (before, after) == (len(grid), len(want))
        assert all(lo >= segments[k][1] and hi <= segments[k][2] and r == segments[k][0]
                   for (r, lo, hi), k in zip(kept, origin))


def test_xcpd_linc_removed_trs_are_put_back_and_censored(tree, tmp_path):
    """XCP-D's linc mode drops its outliers from the time series and lists them in *_outliers.tsv."""
    src = source(*RUNS[2])
    d = folder(tree["xcp"], "02", None)
    outliers = np.zeros(N_TRS, dtype=int)
    outliers[[0, 40, 41, 95]] = 1
    write_tsv(d / f"{src}_outliers.tsv", pd.DataFrame({FD: outliers}))
    x = tree["series"][src]
    write_tsv(d / f"{src}_space-{SPACE}_seg-{ATLAS}_stat-mean_timeseries.tsv", pd.DataFrame(x[outliers == 0], columns=ROIS))
    store = imported(tree, tmp_path / "toy.h5")
    assert store.lengths[2] == N_TRS and store.censored_trs(2).tolist() == [0, 40, 41, 95]
    assert [len(store.censored_trs(r)) for r in (0, 1, 3, 4)] == [0, 0, 0, 0]
    y = store.read(2)
    np.testing.assert_allclose(y[outliers == 0], x[outliers == 0], rtol=1e-6)
    np.testing.assert_allclose(y[40], x[39] + (x[42] - x[39]) / 3, rtol=1e-6)  # interpolated between its neighbours
    assert store.censoring["n_removed_by_pipeline"] == 4
    # an outliers table of another run length is refused
    write_tsv(d / f"{src}_outliers.tsv", pd.DataFrame({FD: np.zeros(N_TRS + 3, dtype=int)}))
    with pytest.raises(DataError, match=rf"has 92 TRs but .*{src}_outliers.tsv lists 99"):
        imported(tree, tmp_path / "other.h5")


def test_resampled_store_maps_the_censored_trs_to_its_grid(tree, tmp_path):
    store = imported(tree, tmp_path / "toy.h5", fd_threshold=0.5)
    resampled = ResampledStore(store, 1.0)  # TR 2 s -> 1 s: TR c lies at 2c s; new TRs 2c - 1 .. 2c + 1 touch it
    for row in range(5):
        c = store.censored_trs(row)
        want = np.unique(np.clip(np.concatenate([[2 * t - 1, 2 * t, 2 * t + 1] for t in c]), 0, resampled.lengths[row] - 1))
        np.testing.assert_array_equal(resampled.censored_trs(row), want)
    assert resampled.has_censoring
    # brainfm-data resample carries them into the file it writes
    out = write_resampled_roi_h5(tmp_path / "toy.h5", tmp_path / "toy_tr1.h5", 1.0)
    again = ROIStore(out)
    assert again.tr == 1.0 and again.censoring["fd_threshold_mm"] == 0.5
    for row in range(5):
        np.testing.assert_array_equal(again.censored_trs(row), resampled.censored_trs(row))


# -- training and decoding ---------------------------------------------------------------------------------------
def test_brainfm_train_decodes_the_imported_events(tree, tmp_path, one_thread):
    store = tmp_path / "toy.h5"
    import_bids_timeseries(tree["xcp"], ATLAS, store, events_dir=tree["bids"], fd_threshold=0.5)
    _, metrics = train_in(tmp_path, *CPU_QUIET, "experiment=decoding", f"data.path={store}", "data.name=toy",
                          f"data.atlas={ATLAS}", "data.tr=2.0", f"data.n_rois={len(ROIS)}", "data.split.kind=time",
                          "data.window.length=8", "data.window.eval_stride=4", "data.batch_size=16",
                          "task.num_classes=null", "model.d_model=32", "model.depth=1", "model.n_heads=2",
                          "task.optimizer.lr=3e-3", "trainer.max_steps=20", "trainer.val_check_interval=20",
                          "callbacks.progress_bar=null")
    # windows cut inside one event block (less those holding a censored TR), second half of every run; chance 0.5
    assert metrics["val/n_windows"] >= 10 and metrics["val/acc"] >= 0.9 and metrics["val/balanced_acc"] >= 0.9


# -- errors ------------------------------------------------------------------------------------------------------
def test_errors_name_the_file_and_the_fix(tree, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"holds no parcellated time series .*seg-<atlas>_stat-mean_timeseries.tsv"):
        import_bids_timeseries(empty, ATLAS, tmp_path / "x.h5")
    with pytest.raises(DataError, match="does not exist"):
        import_bids_timeseries(tmp_path / "nowhere", ATLAS, tmp_path / "x.h5")
    # another atlas beside (XCP-D >= 26 spells the entity atlas-): listed when the one asked for is absent
    src = source(*RUNS[0])
    d = folder(tree["xcp"], "01", "1")
    write_tsv(d / f"{src}_space-{SPACE}_atlas-Glasser_stat-mean_timeseries.tsv", pd.DataFrame(np.ones((4, 2))))
    with pytest.raises(DataError, match=r"no time series of atlas 'toy6' .*atlases found: \['Glasser', 'Toy6'\]\. Fix: --atlas Toy6"):
        import_bids_timeseries(tree["xcp"], "toy6", tmp_path / "x.h5")
    # the same atlas in another space needs --space
    cifti = write_tsv(d / f"{src}_space-fsLR_seg-{ATLAS}_den-91k_stat-mean_timeseries.tsv", pd.DataFrame(np.ones((4, 6))))
    with pytest.raises(DataError, match=r"several spaces \['MNI152NLin6Asym', 'fsLR'\].*Fix: --space MNI152NLin6Asym"):
        import_bids_timeseries(tree["xcp"], ATLAS, tmp_path / "x.h5")
    cifti.unlink()
    # ROI names that differ: the first disagreeing file (in subject/run order) is named
    bad = folder(tree["xcp"], "02", None) / f"{source(*RUNS[3])}_space-{SPACE}_seg-{ATLAS}_stat-mean_timeseries.tsv"
    write_tsv(bad, pd.DataFrame(tree["series"][source(*RUNS[3])], columns=[*ROIS[:4], "RH_Vis_9", ROIS[5]]))
    with pytest.raises(DataError, match=rf"{bad} has other ROIs than .*{source(*RUNS[0])}.*column 4 \('RH_Vis_9' vs "
                                        "'RH_Default_1'\\)"):
        import_bids_timeseries(tree["xcp"], ATLAS, tmp_path / "x.h5", events_dir=tree["bids"])
    assert not (tmp_path / "x.h5").exists()
    write_tsv(bad, pd.DataFrame(tree["series"][source(*RUNS[3])], columns=ROIS))
    # FD censoring without motion files; a store that exists is not overwritten
    for motion in tree["xcp"].rglob("*_motion.tsv"):
        motion.unlink()
    with pytest.raises(DataError, match=r"--fd-threshold: no motion file of sub-01 ses-1_task-faces_run-1 .*--confounds-dir"):
        import_bids_timeseries(tree["xcp"], ATLAS, tmp_path / "x.h5", events_dir=tree["bids"], fd_threshold=0.5)
    (tmp_path / "x.h5").write_text("keep me")
    with pytest.raises(DataError, match="already exists; brainfm does not overwrite"):
        import_bids_timeseries(tree["xcp"], ATLAS, tmp_path / "x.h5", events_dir=tree["bids"])
    assert (tmp_path / "x.h5").read_text() == "keep me"


def test_cli_import_and_info_show_the_censoring(tree, tmp_path, capsys):
    out = tmp_path / "toy.h5"
    code, text = exit_status(capsys, data_cli.main, ["import", str(tree["xcp"]), "--atlas", ATLAS, "--out", str(out),
                                                     "--events-dir", str(tree["bids"]), "--fd-threshold", "0.5"])
    n = sum(int((f > 0.5).sum()) for f in tree["fd"].values())
    assert code == 0 and "imported 5 run(s) of 3 subject(s), atlas Toy6 in space MNI152NLin6Asym: 6 ROIs, TR 2 s" in text
    assert "per-run labels from participants.tsv: age, sex" in text and ": face, house" in text
    assert f"censored TRs: {n} in 5 run(s) (FD > 0.5 mm: {n}; removed by the pipeline: 0)" in text
    code, text = exit_status(capsys, data_cli.main, ["info", str(out)])
    assert code == 0 and f"censored TRs: {n} of {5 * N_TRS} in 5 run(s) (FD threshold: 0.5 mm" in text
    code, text = exit_status(capsys, data_cli.main, ["import", str(tree["xcp"]), "--atlas", "nope", "--out", str(out) + "2"])
    assert code != 0 and "atlases found: ['Toy6']" in text
