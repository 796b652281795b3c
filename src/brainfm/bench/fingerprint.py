"""``make bench-fingerprint``: does a model trained by brainfm beat functional-connectivity (FC)
fingerprinting? Every model / readout / objective combination of :data:`CONFIGS`, trained on the
embedded HCP data (``data=hcp_rest_roi``) and re-identified against FC, at several window lengths,
mean and standard deviation over seeds, in one table.

Two protocols, never mixed:

- ``final``: each configuration is trained on the first half of every HCP run (seeds 0, 1, 2) and
  evaluated on (a) the held-out second halves (gallery: windows of the first half, queries: windows
  of the second; ``brainfm-evaluate``'s protocol) and (b) zero-shot on another site, the 5 ``gw``
  subjects (``data=gw_rest_roi``, TR 2 s, never seen in training), first half against second half.
- ``selection``: what the recipe was chosen on; reads only the first half of every HCP run, so the
  second halves and ``gw`` stay untouched until ``final``. Two validation splits, written as their own
  stores under ``<out>/selection``:
  (a) later time, same subjects: training on TRs [0, 280) of the 7 subjects (validation loss on
  [280, 400)), gallery [0, 400) and queries [400, 600);
  (b) new subjects: three folds (:data:`FOLDS`), each training on 4 subjects' first halves (TRs
  [0, 450); the validation loss on [450, 600)) and re-identifying the 3 others (gallery [0, 300),
  queries [300, 600) of their first halves).
  The score of a configuration is the mean of its mAP over (a) at 30/60/120 TRs and (b) at 30/60/120
  TRs (averaged over folds); the recipe of ``experiment=demo`` is the best one (README).

Each training and evaluation goes through the same code as ``brainfm-train`` / ``brainfm-evaluate``
(:func:`brainfm.training.run`, :func:`brainfm.eval.protocol.run_reidentification`). Results are
written as JSON and Markdown under ``<out>`` and printed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from brainfm import training
from brainfm.config import compose
from brainfm.data.embedded import fetch
from brainfm.data.stores.roi import ROIStore, write_roi_h5
from brainfm.errors import ConfigError
from brainfm.eval.protocol import run_reidentification
from brainfm.io import atomic_write_text
from brainfm.logs import tidy_logging

#: name -> (what it is, the overrides of ``brainfm-train``: an ``experiment=`` preset and its changes)
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "fc_learned": ("correlation of a learned projection of the ROIs (identity init), no deep network "
                   "(experiment=fingerprint)", ["experiment=fingerprint"]),
    "fc_learned_fisher-z": ("... with Fisher-z edges (arctanh r): the demo's recipe (experiment=demo)",
                            ["experiment=demo"]),
    "fc_learned_augment": ("... + ROI dropout 0.1 and TR jitter 0.2",
                           ["experiment=fingerprint", "task.roi_dropout=0.1", "task.tr_jitter=0.2"]),
    "bert_mean_mlp-head": ("the earlier demo: bidirectional transformer, mean pooling, SimCLR head",
                           ["experiment=fingerprint", "model=bert", "model.pooling=mean", "task.projection=mlp"]),
    "bert_correlation": ("transformer + correlation readout of [input, TR states], NT-Xent on the readout",
                         ["experiment=fingerprint", "model=bert", "model.pooling=correlation"]),
    "bert_correlation_slow-backbone": ("... with the transformer at lr x 0.1",
                                       ["experiment=fingerprint", "model=bert", "model.pooling=correlation",
                                        "task.optimizer.backbone_lr_scale=0.1"]),
    "bert_correlation_fc-target": ("... + auxiliary FC target (weight 1)",
                                   ["experiment=fingerprint", "model=bert", "model.pooling=correlation",
                                    "task.fc_target_weight=1.0"]),
    "bert_correlation_tube-mask": ("... + masked reconstruction of 75 % tube-masked ROIs",
                                   ["experiment=fingerprint", "model=bert", "model.pooling=correlation",
                                    "task.mask_weight=1.0"]),
    "bert_correlation_augment": ("... + ROI dropout 0.1 and TR jitter 0.2",
                                 ["experiment=fingerprint", "model=bert", "model.pooling=correlation",
                                  "task.roi_dropout=0.1", "task.tr_jitter=0.2"]),
    "bert_correlation_regularised": ("... with all three brakes: lr x 0.1, FC target, Fisher z",
                                     ["experiment=fingerprint", "model=bert", "model.pooling=correlation",
                                      "model.readout.fisher_z=true", "task.optimizer.backbone_lr_scale=0.1",
                                      "task.fc_target_weight=1.0"]),
    "bert_correlation_early-stop": ("... trained up to 3000 steps with early stopping on the validation loss "
                                    "(patience 3 x 100 steps)",
                                    ["experiment=fingerprint", "model=bert", "model.pooling=correlation",
                                     "callbacks=early_stopping", "trainer.max_steps=3000",
                                     "trainer.val_check_interval=100"]),
    "mean_mlp": ("meanMLP (Popov et al. 2024), mean over TRs, SimCLR head", ["experiment=baseline_mean_mlp"]),
    "mean_mlp_correlation": ("meanMLP + correlation readout of [input, per-TR features]",
                             ["experiment=baseline_mean_mlp", "model.pooling=correlation", "task.projection=none"]),
    "brainnetcnn": ("BrainNetCNN (Kawahara et al. 2017) on the window's FC, SimCLR head",
                    ["experiment=baseline_brainnetcnn"]),
    "fc_mlp": ("MLP on the FC upper triangle (Sarar, Rao & Liu 2021), SimCLR head", ["experiment=baseline_fc_mlp"]),
}
#: configurations measured by the selection protocol only: early stopping needs validation windows that are not
#: the test's, which the selection stores give and the final protocol's first/second-half split does not
SELECTION_ONLY = ("bert_correlation_early-stop",)
FINAL_WINDOWS = (30, 60, 120)
GW_WINDOWS = (30, 60)
#: folds of the new-subject selection split: held-out subjects by index in the sorted subject list
FOLDS = ((0, 1, 2), (3, 4, 5), (6, 0, 1))

log = logging.getLogger("brainfm.bench")


def _quiet() -> None:
    tidy_logging()
    os.environ.setdefault("PYTHONWARNINGS", "ignore")


def write_subset(store_path: Path, out: Path, subjects: Sequence[int] | None, stop_fraction: float) -> Path:
    """A copy of an ROI store with only ``subjects`` (indices of runs; None: all) and the first
    ``stop_fraction`` of every run (the selection stores)."""
    if out.is_file():
        return out
    store = ROIStore(store_path, preload=False)
    rows = list(range(store.n_runs)) if subjects is None else list(subjects)
    series = [store.read(r, 0, int(round(store.lengths[r] * stop_fraction))).T for r in rows]
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_roi_h5(out, {store.atlases[0]: series}, [store.subject_ids[r] for r in rows], float(store.tr),
                        {store.atlases[0]: store.roi_names}, run_ids=[store.run_ids[r] for r in rows],
                        attrs={"derived_from": str(store_path), "stop_fraction": float(stop_fraction)})


def train(name: str, overrides: Sequence[str], seed: int, data_path: Path, data_name: str, out: Path,
          steps: int | None, train_fraction: float = 0.5, val_fraction: float | None = None) -> Path:
    """Train one configuration on the time split ``train_fraction`` / ``val_fraction`` of every run of
    ``data_path``; return the run directory. A finished run (its ``summary.json`` exists, not marked
    ``interrupted`` by Ctrl-C) is skipped; an interrupted one resumes from its ``last.ckpt`` (``ckpt_path=auto``)."""
    run_dir = out / data_name / f"{name}_seed{seed}"
    summary = run_dir / "summary.json"
    if summary.is_file() and not json.loads(summary.read_text() or "{}").get("interrupted"):  # Ctrl-C: resume it
        return run_dir
    args = ["ckpt_path=auto", *overrides, f"seed={seed}", f"data.path={data_path}", f"data.name={data_name}",
            f"data.split.train_fraction={train_fraction}",
            f"data.split.val_fraction={'null' if val_fraction is None else val_fraction}", "logger=csv", f"paths.output_dir={out}",
            f"experiment_name={data_name}", f"run_name={name}_seed{seed}", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false"]
    if steps:
        args += [f"trainer.max_steps={steps}", f"trainer.val_check_interval={max(1, steps // 2)}"]
    training.run(compose("train", args))
    return run_dir


def reid(run_dir: Path, data_path: Path | None, windows: Sequence[int], gallery_fraction: float = 0.5) -> dict:
    """``{"model": {length: {rank1, mAP}}, "random_init": ..., "fc_fingerprint": ...}``.

    The result is kept in ``run_dir/bench_reid/<data>_<windows>_<gallery_fraction>.json`` (one file per
    protocol a run is evaluated with) and reused while it is newer than the run's ``last.ckpt``."""
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    key = f"{Path(data_path).stem if data_path else 'own'}_{'-'.join(map(str, windows))}_{gallery_fraction:.4f}"
    kept = run_dir / "bench_reid" / f"{key}.json"
    if kept.is_file() and kept.stat().st_mtime >= ckpt.stat().st_mtime:
        return {k: {int(n): r for n, r in v.items()} for k, v in json.loads(kept.read_text()).items()}
    report = run_reidentification(ckpt, window_lengths=list(windows),
                                  gallery_fraction=gallery_fraction, data_path=data_path, probe=False)
    result = {{"pretrained": "model"}.get(k, k): {int(n): {m: float(r[m]) for m in ("rank1", "mAP")}
                                                  for n, r in v.items()}
              for k, v in report["results"].items()}
    kept.parent.mkdir(exist_ok=True)
    atomic_write_text(kept, json.dumps(result))
    return result


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarise(per_seed: dict[int, dict], key: str, windows: Sequence[int]) -> dict:
    """``{length: {rank1: [mean, std], mAP: [mean, std]}}`` of ``key`` (``model``, ``fc_fingerprint``, ...)."""
    return {n: {m: _mean_std([per_seed[s][key][n][m] for s in per_seed]) for m in ("rank1", "mAP")}
            for n in windows}


def run_final(configs: Sequence[str], seeds: Sequence[int], out: Path, hcp: Path, gw: Path, steps: int | None) -> dict:
    results: dict = {}
    for name in configs:
        _, overrides = CONFIGS[name]
        per_seed = {}
        t0 = time.perf_counter()
        for seed in seeds:
            run_dir = train(name, overrides, seed, hcp, "hcp_rest_roi", out / "final", steps)
            per_seed[seed] = {"hcp": reid(run_dir, None, FINAL_WINDOWS), "gw": reid(run_dir, gw, GW_WINDOWS)}
        results[name] = {
            "per_seed": {str(s): v for s, v in per_seed.items()},
            "hcp": {k: summarise({s: v["hcp"] for s, v in per_seed.items()}, k, FINAL_WINDOWS)
                    for k in ("model", "random_init", "fc_fingerprint")},
            "gw": {k: summarise({s: v["gw"] for s, v in per_seed.items()}, k, GW_WINDOWS)
                   for k in ("model", "random_init", "fc_fingerprint")},
            "seconds": time.perf_counter() - t0,
        }
        print(f"[{name}] {_row(results[name], 'model')}", flush=True)
    return results


def run_selection(configs: Sequence[str], seed: int, out: Path, hcp: Path, steps: int | None) -> dict:
    sel = out / "selection"
    first_half = write_subset(hcp, sel / "hcp_first_half.h5", None, 0.5)
    n_subjects = ROIStore(hcp, preload=False).n_runs
    folds = []
    for k, held in enumerate(FOLDS):
        train_rows = [r for r in range(n_subjects) if r not in held]
        folds.append((write_subset(hcp, sel / f"fold{k}_train.h5", train_rows, 0.5),
                      write_subset(hcp, sel / f"fold{k}_eval.h5", held, 0.5)))
    results = {}
    for name in configs:
        _, overrides = CONFIGS[name]
        # training TRs [0, 280), validation [280, 400) (one 120-TR window): the queries [400, 600) are never read in
        # training
        later = reid(train(name, overrides, seed, first_half, "sel_later_time", sel, steps, train_fraction=280 / 600,
                           val_fraction=120 / 600), None, FINAL_WINDOWS, gallery_fraction=2 / 3)
        new = [reid(train(name, overrides, seed, tr, f"sel_fold{k}", sel, steps, train_fraction=0.75), ev, FINAL_WINDOWS)
               for k, (tr, ev) in enumerate(folds)]
        new_mean = {key: {n: {m: float(np.mean([f[key][n][m] for f in new])) for m in ("rank1", "mAP")}
                          for n in FINAL_WINDOWS} for key in ("model", "fc_fingerprint")}
        score = 0.5 * (np.mean(_maps(later["model"])) + np.mean(_maps(new_mean["model"])))
        results[name] = {"later_time": later, "new_subjects": new_mean, "folds": new, "score": float(score)}
        print(f"[{name}] selection score {score:.3f}", flush=True)
    return results


def _cell(stat: dict, n: int) -> str:
    (r1, r1s), (ap, aps) = stat[n]["rank1"], stat[n]["mAP"]
    return f"{r1:.3f} ± {r1s:.3f} / {ap:.3f} ± {aps:.3f}"


def _row(result: dict, key: str) -> str:
    return " | ".join([*(_cell(result["hcp"][key], n) for n in FINAL_WINDOWS),
                       *(_cell(result["gw"][key], n) for n in GW_WINDOWS)])


def final_table(results: dict, seeds: Sequence[int]) -> str:
    head = ("| configuration | HCP 30 TRs | HCP 60 TRs | HCP 120 TRs | gw 30 TRs (zero-shot) | gw 60 TRs (zero-shot) |\n"
            "|---|---|---|---|---|---|\n")
    any_result = next(iter(results.values()))
    lines = [f"| FC fingerprinting (Finn et al. 2015) | {_row(any_result, 'fc_fingerprint')} |"]
    lines += [f"| {name} | {_row(r, 'model')} |" for name, r in results.items()]
    return (f"Rank-1 / mAP, mean ± std over seeds {list(seeds)}; HCP: 7 subjects, held-out second halves; gw: 5 "
            f"unseen subjects of another site, TR 2 s\n\n" + head + "\n".join(lines) + "\n")


def _maps(per_window: dict) -> list[float]:
    return [per_window[n]["mAP"] for n in FINAL_WINDOWS]


def selection_table(results: dict) -> str:
    head = ("| configuration | later time mAP 30 / 60 / 120 | new subjects mAP 30 / 60 / 120 | score |\n"
            "|---|---|---|---|\n")

    def line(name: str, later: dict, new: dict) -> str:
        score = 0.5 * (np.mean(_maps(later)) + np.mean(_maps(new)))
        return (f"| {name} | {' / '.join(f'{v:.3f}' for v in _maps(later))} | "
                f"{' / '.join(f'{v:.3f}' for v in _maps(new))} | {score:.3f} |")

    first = next(iter(results.values()))
    lines = [line("FC fingerprinting", first["later_time"]["fc_fingerprint"], first["new_subjects"]["fc_fingerprint"])]
    for name, r in sorted(results.items(), key=lambda kv: -kv[1]["score"]):
        lines.append(line(name, r["later_time"]["model"], r["new_subjects"]["model"]))
    return ("Selection (first halves of the HCP runs only): mAP; later time = TRs [0, 400) vs [400, 600) of the "
            "training subjects (trained on [0, 280)), new subjects = 3 held-out subjects per fold (mean of 3 "
            "folds), gallery [0, 300) vs queries [300, 600)\n\n" + head + "\n".join(lines) + "\n")


def main(protocol: str, configs: Sequence[str] | None, seeds: Sequence[int], out: str | Path,
         steps: int | None, data_dir: str | Path = "data") -> int:
    """Run ``protocol`` (``final``, ``selection`` or ``both``); print and write the tables."""
    _quiet()
    names = list(configs or CONFIGS)
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        raise ConfigError(f"unknown configuration(s) {unknown}; available: {sorted(CONFIGS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hcp, gw = fetch("hcp_rest_roi", data_dir), fetch("gw_rest_roi", data_dir)
    if protocol in ("selection", "both"):
        sel = run_selection(names, int(seeds[0]), out, hcp, steps)
        atomic_write_text(out / "selection.json", json.dumps(sel, indent=2))
        table = selection_table(sel)
        atomic_write_text(out / "selection.md", table)
        print(table)
    if protocol in ("final", "both"):
        res = run_final([n for n in names if n not in SELECTION_ONLY], list(seeds), out, hcp, gw, steps)
        atomic_write_text(out / "final.json", json.dumps(res, indent=2))
        table = final_table(res, seeds)
        atomic_write_text(out / "final.md", table)
        print(table)
    print(f"wrote {out}")
    return 0
