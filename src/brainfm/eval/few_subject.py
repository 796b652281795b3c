"""``brainfm-evaluate protocol=few_subject``: decoding accuracy against the number of training
subjects (Thomas, Ré & Poldrack 2022, athms/learning-from-brains, Fig. 4: HCP 1-48, MDTB 1-11
training individuals).

Windows are cut from the checkpoint's data (or ``data_path``) inside blocks of one per-TR label
(``/trial_labels/<name>``, shifted by the haemodynamic delay: :mod:`brainfm.data.trial_labels`), or
from whole runs labelled with a per-run label (``/labels/<name>``, ``few_subject.source=run``). The
pretrained backbone and, as a baseline, the same architecture randomly initialised embed every
window once (frozen, :meth:`BrainfmTask.embed`, on the configured trainer). A seeded
``test_fraction`` of the subjects is held out; for each ``n`` of ``n_train_subjects`` and each of
``repeats`` seeded draws of ``n`` training subjects, the linear probe of :mod:`brainfm.eval.probe`
(standardisation + logistic regression, C by inner CV) is fit on their windows and scored on the
held-out subjects' windows (:func:`brainfm.eval.probe.few_subject_curve`). Written to ``out_dir``:
``few_subject.json`` (everything), ``few_subject.csv`` (one row per method and ``n``: mean and sd of
accuracy and balanced accuracy) and ``few_subject.png`` (the curve, mean ± sd, chance dashed).

Thomas et al. fine-tune the whole model for each ``n``; a linear probe of frozen embeddings is the
cheap, deterministic version of the same question (how much labelled data a pretrained
representation saves); fine-tuning is ``brainfm-train experiment=decoding`` on a subject split.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from brainfm.data.trial_labels import labelled_blocks, shift_trs
from brainfm.errors import ConfigError, DataError
from brainfm.eval.inference import Group
from brainfm.eval.probe import few_subject_curve
from brainfm.eval.protocol import embed_groups, progress, write_json
from brainfm.io import atomic_path, save_figure
from brainfm.runs import build_task_from_checkpoint, find_checkpoint, load_checkpoint, open_windows

SOURCES = ("trial", "run")
BASELINES = ("random_init",)
#: the default n of Thomas et al.'s HCP curve (MDTB: 1-11)
HCP_N_SUBJECTS = (1, 2, 4, 8, 16, 32, 48)

log = logging.getLogger(__name__)


def _labelled_windows(store, make, source: str, label: str, length: int, step: int, shift_s: float | None,
                      where: str):
    """``(dataset, window labels (N,), classes, shift info)`` of every run of ``store``."""
    runs = [(r, 0, int(store.lengths[r])) for r in range(len(store.lengths))]
    if source == "trial":
        if not hasattr(store, "trial_label_info") or getattr(store, "base", None) is not None:
            raise ConfigError(f"few_subject.source=trial needs per-TR labels of an ROI store at its own TR ({where})")
        info = store.trial_label_info(label)
        k = shift_trs(shift_s, info["shift_s"], float(store.tr))
        segments, seg_labels = labelled_blocks(store, label, runs, length, k)
        classes = info["classes"]
        shift = {"stored_s": info["shift_s"], "delay_trs": k, "total_s": info["shift_s"] + k * float(store.tr)}
        if not segments:
            raise DataError(f"{where}: no block of one label in /trial_labels/{label} holds a window of {length} TRs; "
                            "lower few_subject.window_length")
        seg_labels = np.asarray(seg_labels)
    else:
        if not hasattr(store, "run_labels"):
            raise ConfigError(f"few_subject.source=run needs an ROI store with /labels/<name> ({where})")
        values = store.run_labels(label)
        classes = sorted({str(v) for v in values})
        seg_labels = np.array([classes.index(str(v)) for v in values])
        segments, shift = runs, None
    ds = make(segments, int(length), int(step))
    seg_of = np.searchsorted(ds.index.offsets, np.arange(len(ds)), side="right") - 1
    seg_of = ds.segment_origin[seg_of]  # the input segment of each window (segments are cut around censored TRs)
    return ds, seg_labels[seg_of], list(classes), shift


def run_few_subject(
    ckpt_path: str | Path,
    label: str = "task",
    source: str = "trial",
    shift_s: float | None = None,
    n_train_subjects: Sequence[int] = HCP_N_SUBJECTS,
    repeats: int = 5,
    test_fraction: float = 0.3,
    window_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    data_path: str | Path | None = None,
    baselines: Sequence[str] = BASELINES,
    trainer=None,
    data_overrides: dict | None = None,
) -> dict | None:
    """Run the protocol (module docstring); a JSON-ready report on the global rank 0, None elsewhere.

    Args:
        ckpt_path: checkpoint file or run directory. label: ``/trial_labels/<label>`` (``source=trial``)
            or ``/labels/<label>`` (``source=run``). shift_s: haemodynamic shift in seconds (null: the
            checkpoint's ``data.trial_labels.shift_s``, else the labels as stored).
        n_train_subjects: training-set sizes (subjects). repeats: seeded draws per size.
        test_fraction: of the subjects, held out for scoring. window_length: TRs (null: the checkpoint's).
        stride: TRs between window starts inside a block (null: half the window). seed: of the draws
            and of the random-init baseline. baselines: ``random_init`` or none. data_path,
            data_overrides: other data and changes to the run's data config, as for
            :func:`~brainfm.eval.protocol.run_reidentification` (e.g. ``{"resample_tr": 0.72}``).

    Raises:
        ConfigError: an unknown source or baseline, a size larger than the subjects left after the
            hold-out, a volume checkpoint. DataError: a store without the labels (named).
        CheckpointError: unloadable checkpoint, data with another TR / ROI count / ROI order.
    """
    if source not in SOURCES:
        raise ConfigError(f"few_subject.source={source!r} must be one of {SOURCES}")
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise ConfigError(f"few_subject.baselines has unknown {unknown}; available: {list(BASELINES)}")
    ckpt = load_checkpoint(ckpt_path)
    pretrained = build_task_from_checkpoint(ckpt)
    meta = ckpt["hyper_parameters"].get("data_meta") or {}
    store, make, volume = open_windows(ckpt_path, ckpt, data_path, any_tr=pretrained.model.any_tr,
                                       data_overrides=data_overrides)
    if volume:
        raise ConfigError("protocol=few_subject runs on ROI time series; this checkpoint's data are volumes")
    if shift_s is None and source == "trial":
        shift_s = (meta.get("trial_labels") or {}).get("shift_s")
    length = int(window_length or meta.get("window_length") or 20)
    step = int(stride or max(1, length // 2))
    ds, labels, classes, shift = _labelled_windows(store, make, source, label, length, step, shift_s,
                                                   str(store.location))
    sizes = [int(n) for n in n_train_subjects]
    n_subj = len(np.unique([ds.store.subject_ids[int(r)] for r in ds.segments[:, 0]]))
    n_test = max(1, int(round(float(test_fraction) * n_subj)))
    if not sizes or min(sizes) < 1 or max(sizes) > n_subj - n_test:
        raise ConfigError(f"few_subject.n_train_subjects={sizes}: {n_subj} subjects have labelled windows, "
                          f"{n_test} are held out (few_subject.test_fraction={test_fraction}), so sizes must lie in "
                          f"[1, {n_subj - n_test}]; lower them (Thomas et al.: HCP 1-48, MDTB 1-11)")
    models = {"pretrained": pretrained}
    if "random_init" in baselines:
        torch.manual_seed(seed)
        models["random_init"] = build_task_from_checkpoint(ckpt, weights=False)
    shard_dir = Path(ckpt["_path"]).parent / ".inference-few-subject"
    results = {}
    progress("few-subject decoding of %s (%d classes) on %s: %d windows of %d TRs, %d subjects (%d held out); "
             "%s; %d draws of n = %s training subjects", label, len(classes), store.location, len(labels), length,
             n_subj, n_test, ", ".join(models), int(repeats), ", ".join(map(str, sizes)), logger=log)
    for name, task in models.items():
        progress("%s: embedding %d windows", name, len(labels), logger=log)
        embedded = embed_groups(task, [Group("few_subject", ds, int(batch_size))], trainer, shard_dir)
        if embedded is None:
            return None  # not the global rank 0
        features, subjects = embedded[0]
        start = time.perf_counter()
        results[name] = few_subject_curve(features, labels, subjects, sizes, "classification", int(repeats),
                                          float(test_fraction), int(seed), metric="acc")
        log.info("%s: %d probes fit, accuracy %s (%.1f s)", name, len(sizes) * int(repeats),
                 ", ".join(f"{r['mean']:.3f} at n = {r['n_subjects']}" for r in results[name]),
                 time.perf_counter() - start)
    return {
        "checkpoint": ckpt["_path"],
        "global_step": int(ckpt.get("global_step", -1)),
        "data": {"path": str(store.location), "atlas": getattr(store, "atlas", None), "tr": store.tr,
                 "n_subjects": n_subj},
        "protocol": {
            "name": "few_subject",
            "label": f"/{'trial_labels' if source == 'trial' else 'labels'}/{label}",
            "source": source, "classes": classes, "chance": 1.0 / len(classes),
            "haemodynamic_shift": shift,
            "window_length": length, "stride": step, "n_windows": int(len(labels)),
            "windows_per_class": np.bincount(labels, minlength=len(classes)).astype(int).tolist(),
            "n_train_subjects": sizes, "repeats": int(repeats), "n_test_subjects": n_test,
            "test_fraction": float(test_fraction), "seed": int(seed),
            "windows": "inside blocks of one per-TR label (straddling windows skipped)" if source == "trial"
                       else "whole runs, the run's label",
            "probe": "standardised frozen embeddings, logistic regression (C by 3-fold CV) fit on the windows of n "
                     "training subjects, scored on the held-out subjects' windows",
        },
        "results": results,
    }


def write_csv(report: dict, path: Path) -> None:
    """One row per method and training-set size: mean and sd of accuracy and balanced accuracy."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "n_train_subjects", "repeats", "acc_mean", "acc_std", "balanced_acc_mean",
                    "balanced_acc_std", "chance", "n_test_subjects"])
        for method, rows in report["results"].items():
            for r in rows:
                stats = [r["metrics"].get(k, {}).get(s, float("nan")) for k in ("acc", "balanced_acc")
                         for s in ("mean", "std")]
                w.writerow([method, r["n_subjects"], len(r["values"]), *stats, report["protocol"]["chance"],
                            r["n_test_subjects"]])


def plot_curve(report: dict, path: Path) -> None:
    """Accuracy (mean ± sd over the draws) against the number of training subjects, one curve per
    method, chance dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"pretrained": "pretrained (frozen)", "random_init": "random init (same architecture)"}
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = report["protocol"]["n_train_subjects"]
    for method, rows in report["results"].items():
        n = np.array([r["n_subjects"] for r in rows])
        mean = np.array([r["mean"] for r in rows])
        sd = np.array([r["std"] for r in rows])
        ax.plot(n, mean, marker="o", label=names.get(method, method))
        ax.fill_between(n, mean - sd, mean + sd, alpha=0.2)
    ax.axhline(report["protocol"]["chance"], color="k", ls="--", lw=1, label="chance")
    if max(sizes) / min(sizes) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("training subjects")
    ax.set_ylabel("decoding accuracy (held-out subjects)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    p = report["protocol"]
    ax.set_title(f"{len(p['classes'])}-way decoding of {p['label']}, {p['n_test_subjects']} held-out subjects",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def print_table(report: dict) -> None:
    """The curve as a rich table: accuracy / balanced accuracy, mean ± sd over the draws, per method."""
    from rich.console import Console
    from rich.table import Table

    p = report["protocol"]
    table = Table(title=f"Few-subject decoding ({len(p['classes'])} classes of {p['label']}; {p['n_windows']} windows "
                  f"of {p['window_length']} TRs; {p['n_test_subjects']} held-out subjects; {p['repeats']} draws): "
                  "mean ± sd")
    table.add_column("training\nsubjects", justify="right")
    for method in report["results"]:
        table.add_column(f"{method}\naccuracy", justify="right")
        table.add_column(f"{method}\nbal. acc.", justify="right")
    table.add_column("chance", justify="right")
    for i, n in enumerate(p["n_train_subjects"]):
        row = [str(n)]
        for rows in report["results"].values():
            m = rows[i]["metrics"]
            row += [f"{m[k]['mean']:.3f}±{m[k]['std']:.3f}" if k in m else "n/a" for k in ("acc", "balanced_acc")]
        row.append(f"{p['chance']:.3f}")
        table.add_row(*row)
    Console().print(table)


def run_from_config(cfg) -> dict | None:
    """``brainfm-evaluate protocol=few_subject`` (the ``few_subject`` section of ``conf/evaluate.yaml``):
    run, write ``few_subject.json|csv|png`` into ``out_dir`` and print the table."""
    from omegaconf import OmegaConf


    fs = cfg.get("few_subject") or {}
    ckpt = find_checkpoint(cfg.ckpt)
    report = run_few_subject(
        ckpt, label=fs.get("label", "task"), source=fs.get("source", "trial"), shift_s=fs.get("shift_s"),
        n_train_subjects=list(fs.get("n_train_subjects", HCP_N_SUBJECTS)), repeats=int(fs.get("repeats", 5)),
        test_fraction=float(fs.get("test_fraction", 0.3)), window_length=fs.get("window_length"),
        stride=fs.get("stride"), batch_size=int(cfg.batch_size), seed=int(cfg.seed), data_path=cfg.data_path,
        baselines=list(fs.get("baselines", BASELINES)), trainer=cfg.get("trainer"),
        data_overrides=OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") else None,
    )
    if report is None:
        return None
    out = Path(cfg.out_dir) if cfg.out_dir else ckpt.parent.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    report["config"] = OmegaConf.to_container(cfg, resolve=True)
    write_json(out / "few_subject.json", report)
    write_csv(report, out / "few_subject.csv")
    plot_curve(report, out / "few_subject.png")
    print_table(report)
    print(f"wrote {out / 'few_subject.json'}, {out / 'few_subject.csv'} and {out / 'few_subject.png'}")
    return report
