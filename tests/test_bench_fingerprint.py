"""``make bench-fingerprint`` (brainfm.bench.fingerprint) without training: the selection stores hold only the
chosen runs and the first part of each, the tables print mean ± std (ddof 1) with FC first, and every
configuration composes and builds, so the bench does not fail an hour in."""

from __future__ import annotations

import statistics

import h5py
import numpy as np
import pytest
from omegaconf import OmegaConf

from brainfm.bench.fingerprint import (
    CONFIGS,
    FINAL_WINDOWS,
    GW_WINDOWS,
    SELECTION_ONLY,
    final_table,
    selection_table,
    summarise,
    write_subset,
)
from brainfm.config import compose
from brainfm.data.stores.roi import ROIStore
from brainfm.models import build_model


# -- selection stores -----------------------------------------------------------------------------------------
def test_write_subset_keeps_the_chosen_runs_and_the_first_part_of_each(hcp_h5, tmp_path):
    out = write_subset(hcp_h5, tmp_path / "sel" / "fold.h5", [5, 2], 0.5)
    assert out == tmp_path / "sel" / "fold.h5" and out.is_file()
    src, sub = ROIStore(hcp_h5, preload=False), ROIStore(out, preload=False)
    assert sub.n_runs == 2 and list(sub.lengths) == [600, 600]
    assert list(sub.subject_ids) == [src.subject_ids[5], src.subject_ids[2]]
    assert list(sub.run_ids) == [src.run_ids[5], src.run_ids[2]]
    assert sub.tr == pytest.approx(src.tr) and list(sub.roi_names) == list(src.roi_names)
    assert sub.atlases == src.atlases
    for row, r in enumerate([5, 2]):
        np.testing.assert_array_equal(sub.read(row), src.read(r, 0, 600))
    with h5py.File(out) as f:
        assert f.attrs["derived_from"] == str(hcp_h5) and f.attrs["stop_fraction"] == 0.5
    # None: every run; another fraction cuts each at round(fraction x length)
    every = ROIStore(write_subset(hcp_h5, tmp_path / "all.h5", None, 1 / 3), preload=False)
    assert list(every.subject_ids) == list(src.subject_ids) and list(every.lengths) == [400] * 7
    np.testing.assert_array_equal(every.read(6), src.read(6, 0, 400))


def test_write_subset_reuses_an_existing_file(hcp_h5, tmp_path):
    out = write_subset(hcp_h5, tmp_path / "first_half.h5", [0, 1], 0.5)
    before = out.read_bytes()
    mtime = out.stat().st_mtime_ns
    again = write_subset(hcp_h5, tmp_path / "first_half.h5", [3], 0.25)  # other arguments: the file is kept
    assert again == out and out.read_bytes() == before and out.stat().st_mtime_ns == mtime
    assert ROIStore(out, preload=False).n_runs == 2


# -- tables ---------------------------------------------------------------------------------------------------
def _per_seed(offset: float) -> dict:
    """Two seeds of hand-made results: ``rank1`` = offset + 0.1 (seed 0) or + 0.3 (seed 1) plus the window length
    / 1000; ``mAP`` = half of that."""
    out = {}
    for seed, delta in ((0, 0.1), (1, 0.3)):
        out[seed] = {key: {n: {"rank1": offset + k + delta + n / 1000, "mAP": (offset + k + delta + n / 1000) / 2}
                           for n in FINAL_WINDOWS}
                     for key, k in (("model", 0.0), ("random_init", 0.05), ("fc_fingerprint", 0.02))}
    return out


def _results(offsets: dict[str, float]) -> dict:
    results = {}
    for name, offset in offsets.items():
        hcp, gw = _per_seed(offset), _per_seed(offset + 0.01)
        keys = ("model", "random_init", "fc_fingerprint")
        results[name] = {"hcp": {k: summarise(hcp, k, FINAL_WINDOWS) for k in keys},
                         "gw": {k: summarise(gw, k, GW_WINDOWS) for k in keys}}
    return results


def test_summarise_is_mean_and_sample_std_over_seeds():
    stats = summarise(_per_seed(0.2), "model", FINAL_WINDOWS)
    assert sorted(stats) == list(FINAL_WINDOWS)
    mean, std = stats[30]["rank1"]
    values = [0.2 + 0.1 + 0.03, 0.2 + 0.3 + 0.03]
    assert mean == pytest.approx(0.43) and std == pytest.approx(statistics.stdev(values))
    assert std == pytest.approx(0.2 / np.sqrt(2))  # ddof=1 (ddof=0 would give 0.1)
    assert summarise({0: _per_seed(0.2)[0]}, "model", FINAL_WINDOWS)[30]["rank1"] == pytest.approx((0.33, 0.0))


def _cell(values_r1: list[float], values_ap: list[float]) -> str:
    return (f"{statistics.mean(values_r1):.3f} ± {statistics.stdev(values_r1):.3f} / "
            f"{statistics.mean(values_ap):.3f} ± {statistics.stdev(values_ap):.3f}")


def test_final_table_rows_are_mean_pm_std_with_fc_first():
    table = final_table(_results({"fc_learned": 0.2, "bert_correlation": 0.4}), [0, 1])
    lines = table.splitlines()
    assert "mean ± std over seeds [0, 1]" in lines[0]
    head = lines.index("| configuration | HCP 30 TRs | HCP 60 TRs | HCP 120 TRs | gw 30 TRs (zero-shot) | "
                       "gw 60 TRs (zero-shot) |")
    assert lines[head + 1] == "|---|---|---|---|---|---|"
    rows = lines[head + 2:]
    assert [r.split(" | ")[0] for r in rows] == ["| FC fingerprinting (Finn et al. 2015)", "| fc_learned",
                                                 "| bert_correlation"]
    # by hand: fc_learned, HCP 30 TRs: rank1 0.33 / 0.53 -> 0.430 ± 0.141; mAP 0.165 / 0.265 -> 0.215 ± 0.071
    assert rows[1].startswith("| fc_learned | 0.430 ± 0.141 / 0.215 ± 0.071 | ")
    for row, (name, offset, key_offset) in zip(rows, [("FC", 0.2, 0.02), ("fc_learned", 0.2, 0.0),
                                                      ("bert_correlation", 0.4, 0.0)]):
        cells = []
        for site_offset, windows in ((0.0, FINAL_WINDOWS), (0.01, GW_WINDOWS)):
            for n in windows:
                r1 = [offset + site_offset + key_offset + d + n / 1000 for d in (0.1, 0.3)]
                cells.append(_cell(r1, [v / 2 for v in r1]))
        assert row.endswith(" | " + " | ".join(cells) + " |"), (name, row)
        assert row.count("±") == 2 * (len(FINAL_WINDOWS) + len(GW_WINDOWS))


def _selection(score_order: dict[str, float]) -> dict:
    """Per configuration: later-time and new-subject mAPs of one level; the score as run_selection computes it."""
    results = {}
    for name, level in score_order.items():
        later = {"model": {n: {"rank1": 0.0, "mAP": level + n / 1000} for n in FINAL_WINDOWS},
                 "fc_fingerprint": {n: {"rank1": 0.0, "mAP": 0.3 + n / 1000} for n in FINAL_WINDOWS}}
        new = {"model": {n: {"rank1": 0.0, "mAP": level / 2} for n in FINAL_WINDOWS},
               "fc_fingerprint": {n: {"rank1": 0.0, "mAP": 0.1} for n in FINAL_WINDOWS}}
        score = 0.5 * (np.mean([level + n / 1000 for n in FINAL_WINDOWS]) + level / 2)
        results[name] = {"later_time": later, "new_subjects": new, "score": float(score)}
    return results


def test_selection_table_puts_fc_first_then_the_best_score():
    table = selection_table(_selection({"mean_mlp": 0.2, "fc_learned": 0.6, "bert_correlation": 0.4}))
    lines = table.splitlines()
    head = lines.index("| configuration | later time mAP 30 / 60 / 120 | new subjects mAP 30 / 60 / 120 | score |")
    rows = lines[head + 2:]
    assert rows == [
        # FC: later 0.330 / 0.360 / 0.420, new 0.1; score 0.5 * (0.37 + 0.1) = 0.235
        "| FC fingerprinting | 0.330 / 0.360 / 0.420 | 0.100 / 0.100 / 0.100 | 0.235 |",
        # fc_learned: later 0.63 / 0.66 / 0.72 (mean 0.67), new 0.3: 0.485
        "| fc_learned | 0.630 / 0.660 / 0.720 | 0.300 / 0.300 / 0.300 | 0.485 |",
        "| bert_correlation | 0.430 / 0.460 / 0.520 | 0.200 / 0.200 / 0.200 | 0.335 |",
        "| mean_mlp | 0.230 / 0.260 / 0.320 | 0.100 / 0.100 / 0.100 | 0.185 |",
    ]


# -- every configuration composes and builds --------------------------------------------------------------------
def _fake_reid(run_dir, data_path, windows, gallery_fraction=0.5):
    return {key: {n: {"rank1": 0.5, "mAP": 0.4} for n in windows} for key in ("model", "random_init", "fc_fingerprint")}


@pytest.fixture(scope="module")
def bench_configs(tmp_path_factory, hcp_h5):
    """Every training config both protocols would launch (``run_selection`` and ``run_final`` with
    :func:`brainfm.training.run` and the evaluation replaced: nothing is trained), by configuration name:
    ``[(data set name, composed config), ...]``."""
    import brainfm.bench.fingerprint as bench
    import brainfm.training

    out = tmp_path_factory.mktemp("bench")
    launched: dict[str, list] = {}

    def capture(cfg):
        name = cfg.run_name.rsplit("_seed", 1)[0]
        launched.setdefault(name, []).append((cfg.data.name, cfg))
        return {}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(brainfm.training, "run", capture)
        mp.setattr(bench, "reid", _fake_reid)
        selection = bench.run_selection(list(CONFIGS), 0, out, hcp_h5, None)
        final = bench.run_final([n for n in CONFIGS if n not in SELECTION_ONLY], [0, 1], out, hcp_h5, hcp_h5, None)
    assert set(selection) == set(CONFIGS) and set(final) == set(CONFIGS) - set(SELECTION_ONLY)
    return launched


def test_both_protocols_launch_every_configuration(bench_configs):
    assert set(bench_configs) == set(CONFIGS)
    for name, runs in bench_configs.items():
        data_sets = sorted(d for d, _ in runs)
        expected = ["sel_fold0", "sel_fold1", "sel_fold2", "sel_later_time"]
        if name not in SELECTION_ONLY:
            expected = sorted([*expected, "hcp_rest_roi", "hcp_rest_roi"])  # seeds 0 and 1
        assert data_sets == expected, name


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_configuration_composes_and_builds(name, bench_configs, hcp_h5):
    """The model (``build_model``), the task (where the objective's options are checked against the backbone)
    and the callbacks of each configuration, as the bench composes them."""
    from hydra.utils import instantiate

    from brainfm.tasks.contrastive import ContrastiveSequenceModeling

    _, overrides = CONFIGS[name]
    runs = bench_configs[name]
    for data_name, cfg in runs:
        assert cfg.data.name == data_name and cfg.data.pairs is True
    # one model, objective and callbacks per configuration, whatever the data set and seed
    parts = {key: [OmegaConf.to_container(cfg[key], resolve=True) for _, cfg in runs] for key in ("model", "task")}
    assert all(p == parts[key][0] for key in parts for p in parts[key]), name
    cfg = runs[0][1]
    model_cfg = parts["model"][0]
    model = build_model(model_cfg)
    assert model.n_rois == 94 and model.out_dim > 0
    task = instantiate(cfg.task, model=model_cfg, data_meta={}, seed=int(cfg.seed), _recursive_=False)
    assert isinstance(task, ContrastiveSequenceModeling)
    for node in (cfg.get("callbacks") or {}).values():
        if node is not None:
            instantiate(node, _convert_="all")
    # the configuration's overrides alone (what `brainfm-train` is given to reproduce a row) compose to the same model
    alone = compose("train", [*overrides, f"data.path={hcp_h5}"])
    assert OmegaConf.to_container(alone.model, resolve=True) == model_cfg


def test_every_bench_split_holds_its_windows_and_later_time_keeps_the_queries_out(bench_configs):
    """Each distinct store / split / window of the launched runs: the datamodule sets up and its training and
    validation windows exist (a validation segment shorter than the window fails at the first validation, an
    hour in). The later-time split trains and validates on TRs before the queries [400, 600) of its 600-TR store."""
    from hydra.utils import instantiate

    seen = {}
    for runs in bench_configs.values():
        for data_name, cfg in runs:
            key = (cfg.data.path, cfg.data.split.train_fraction, cfg.data.split.val_fraction, cfg.data.window.length,
                   cfg.data.window.min_length, cfg.data.window.eval_stride)
            seen.setdefault(key, (data_name, cfg))
    assert {d for d, _ in seen.values()} == {"hcp_rest_roi", "sel_later_time", "sel_fold0", "sel_fold1", "sel_fold2"}
    for data_name, cfg in seen.values():
        dm = instantiate(cfg.data, _convert_="all")
        dm.setup("fit")
        val = dm.dataset("val")
        assert len(dm.dataset("train")) > 0 and len(val) > 0, data_name
        assert val.length == cfg.data.window.length == 120
        if data_name == "sel_later_time":
            assert set(dm.store.lengths) == {600}
            assert all(stop <= 400 for _, _, stop in dm.segments["train"] + dm.segments["val"])
            assert dm.segments["test"] == [(r, 400, 600) for r in range(7)]


# -- resuming an interrupted bench ----------------------------------------------------------------------------
def test_train_skips_a_finished_run_and_resumes_an_interrupted_one(monkeypatch, tmp_path):
    """A run with ``summary.json`` is not trained again; one with only checkpoints is trained with
    ``ckpt_path=auto`` (resumed, not restarted over its own checkpoints)."""
    import brainfm.bench.fingerprint as bench
    from brainfm import training

    calls = []
    monkeypatch.setattr(training, "run", lambda cfg: calls.append(cfg.ckpt_path))
    run_dir = tmp_path / "hcp" / "fc_learned_seed0"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert bench.train("fc_learned", ["experiment=fingerprint"], 0, tmp_path / "d.h5", "hcp", tmp_path, 10) == run_dir
    assert calls == ["auto"]
    (run_dir / "summary.json").write_text('{"interrupted": true}')  # stopped by Ctrl-C: resumed
    bench.train("fc_learned", ["experiment=fingerprint"], 0, tmp_path / "d.h5", "hcp", tmp_path, 10)
    assert calls == ["auto", "auto"]
    (run_dir / "summary.json").write_text("{}")
    bench.train("fc_learned", ["experiment=fingerprint"], 0, tmp_path / "d.h5", "hcp", tmp_path, 10)
    assert calls == ["auto", "auto"]


def test_reid_is_kept_per_protocol_and_recomputed_after_the_checkpoint_changes(monkeypatch, tmp_path):
    import os

    import brainfm.bench.fingerprint as bench

    calls = []

    def fake(ckpt, window_lengths, gallery_fraction, data_path, probe):
        calls.append((data_path, tuple(window_lengths)))
        return {"results": {"pretrained": {n: {"rank1": 0.5, "mAP": 0.25 * len(calls)} for n in window_lengths}}}

    monkeypatch.setattr(bench, "run_reidentification", fake)
    (tmp_path / "checkpoints").mkdir()
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(b"x")
    os.utime(ckpt, (1_000, 1_000))
    first = bench.reid(tmp_path, None, [30, 60])
    assert first == {"model": {30: {"rank1": 0.5, "mAP": 0.25}, 60: {"rank1": 0.5, "mAP": 0.25}}}
    assert bench.reid(tmp_path, None, [30, 60]) == first and len(calls) == 1
    bench.reid(tmp_path, tmp_path / "gw.h5", [30])  # another protocol: computed
    assert len(calls) == 2
    os.utime(ckpt)  # retrained: newer than what was kept
    assert bench.reid(tmp_path, None, [30, 60])["model"][30]["mAP"] == 0.75
