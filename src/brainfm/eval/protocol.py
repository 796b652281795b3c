"""The protocol of ``brainfm-evaluate``: a pretrained checkpoint against the same architecture
randomly initialised and against functional-connectivity fingerprinting, on

- subject re-identification (Rank-1, mAP; nearest neighbours, no training), and
- a subject linear probe (``probe=true``): logistic regression on the gallery windows' features
  predicting the subject (N-way), scored on the query windows (:mod:`brainfm.eval.probe`).

Gallery = windows of the first ``gallery_fraction`` of every run, queries = windows of the rest
(for the demo this is exactly pretraining data vs held-out data), at several window lengths.

Progress goes to the ``brainfm.eval.protocol`` logger at INFO (``brainfm-evaluate`` prints it): what is
evaluated, each model's embedding of the windows, and one line per method and window length with its
Rank-1 / mAP and probe accuracy and the time it took.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from brainfm.data.datasets.roi import ROIWindowDataset
from brainfm.data.splits import time_split
from brainfm.data.windows import collate_windows
from brainfm.errors import ConfigError
from brainfm.eval.fingerprinting import fc_features
from brainfm.eval.inference import Group, run_inference
from brainfm.eval.probe import fit_predict_sklearn
from brainfm.eval.reidentification import reidentification, split_by_session
from brainfm.io import atomic_write_text, save_figure
from brainfm.runs import build_task_from_checkpoint, check_compatible, find_checkpoint, load_checkpoint, open_windows

BASELINES = ("random_init", "fc_fingerprint")
#: method names in progress lines (the table's labels)
_LABELS = {"pretrained": "pretrained", "random_init": "random init", "fc_fingerprint": "FC fingerprinting"}

log = logging.getLogger(__name__)


def progress(message: str, *args, logger: logging.Logger = log) -> None:
    """A progress line at INFO on the global rank 0 only (the other ranks of a ``trainer=ddp`` evaluation
    embed their share of the windows silently); the rank is Lightning's, from the launcher's environment."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        logger.info(message, *args, stacklevel=2)


@torch.inference_mode()
def embed_windows(task, dataset: ROIWindowDataset, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings ``(N, D)`` and subject labels ``(N,)`` of every window of ``dataset``."""
    feats, subjects = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_windows):
        feats.append(task.embed(batch).float().cpu().numpy())
        subjects.append(batch["subject"].numpy())
    return np.concatenate(feats), np.concatenate(subjects)


def window_array(dataset: ROIWindowDataset) -> tuple[np.ndarray, np.ndarray]:
    """All windows ``(N, T, R)`` and subject labels ``(N,)``."""
    items = [dataset[i] for i in range(len(dataset))]
    return np.stack([s["bold"].numpy() for s in items]), np.array([s["subject"] for s in items])


def embed_groups(task, groups: list, trainer, shard_dir: Path) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """``(features (N, D), subject indices (N,))`` of each :class:`~brainfm.eval.inference.Group` of windows, in window
    order, embedded by ``task`` (:meth:`embed`) on the ``trainer``'s ranks (:func:`brainfm.eval.inference.run_inference`,
    shards under ``shard_dir``); None on the ranks other than the global rank 0."""
    shards = run_inference(task, lambda t, b: t.embed(b), groups, shard_dir, trainer)
    if shards is None:
        return None
    out = []
    try:
        for k, group in enumerate(shards.groups):
            ds, feats, subjects = group.dataset, [], []
            for indices, values in shards.chunks(k):
                feats.append(values)
                subjects.append([ds.subject_index[ds.store.subject_ids[ds.index.window(i)[0]]] for i in indices.tolist()])
            out.append((np.concatenate(feats), np.concatenate(subjects)))
    finally:
        shards.close()
    return out


def run_reidentification(
    ckpt_path: str | Path,
    window_lengths: Sequence[int] = (30, 60, 120),
    gallery_fraction: float = 0.5,
    stride: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    data_path: str | Path | None = None,
    data_overrides: dict | None = None,
    baselines: Sequence[str] = BASELINES,
    probe: bool = True,
    trainer=None,
    gallery_runs: Sequence[str] | None = None,
    query_runs: Sequence[str] | None = None,
    run_fraction: float = 1.0,
    compare: Mapping[str, str | Path] | None = None,
) -> dict | None:
    """Run the protocol on the configured trainer (the windows partitioned over its ranks, embeddings
    gathered on rank 0); returns a JSON-ready dict of results per method and window length on the global
    rank 0, None on the other ranks.

    ``data_path`` / ``data_overrides``: other data than the checkpoint's (``path``) and changes to the
    run's data config (e.g. ``{"resample_tr": 0.72}``); another TR is taken as the data's where the model
    embeds time in seconds, else refused unless resampled.

    Every checkpoint family: sequence models on ROI windows of each ``window_lengths``; volume models
    (Swin4D, SimMIM, TFF) on clips of the checkpoint's clip length (``window_lengths`` is ignored: the
    model's input has one length; FC fingerprinting needs ROI series and is skipped).

    Gallery and queries are the first ``gallery_fraction`` and the rest of every run, or, with
    ``gallery_runs`` and ``query_runs`` (run ids, e.g. HCP ``[REST1_LR]`` and ``[REST2_LR]``, UKB
    instances), whole runs of one session against another (Finn et al.'s test-retest protocol;
    :func:`~brainfm.eval.reidentification.split_by_session`). ``run_fraction`` < 1 uses only the first
    part of every run (no window reaches past it; with ``normalization.mode=run`` the z-scoring statistics
    are still the whole run's, which FC and correlation readouts do not depend on): ``gallery_fraction=0.333 run_fraction=0.5``
    matches TRs [0, 1/3) against [1/3, 1/2) of each run, a validation protocol inside a model's
    training half that leaves the second half untouched for the final evaluation.

    ``compare``: other trained runs (name -> checkpoint or run directory), e.g. the baselines
    (``model=mean_mlp``, ``brainnetcnn``, ``fc``) trained on the same data, embedded on the same
    windows and reported beside the pretrained model; each is checked against the data (ROI count and
    order; TR unless it takes any TR) and must normalize as the pretrained model does.

    Raises:
        CheckpointError: unloadable checkpoint, or data with another TR / ROI count / ROI order / grid.
        ConfigError: a ``compare`` name that is taken, a compared run that normalizes otherwise, a
            ``run_fraction`` outside (0, 1], or ``gallery_fraction`` not below it.
        ValueError: unknown baseline name.
    """
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; available: {list(BASELINES)}")
    ckpt = load_checkpoint(ckpt_path)
    pretrained = build_task_from_checkpoint(ckpt)
    store, make, volume = open_windows(ckpt_path, ckpt, data_path, any_tr=pretrained.model.any_tr,
                                       data_overrides=data_overrides)
    if volume:
        window_lengths = [int(ckpt["hyper_parameters"]["data_meta"].get("window_length")
                              or ckpt["hyper_parameters"]["model"]["img_size"][3])]
        baselines = [b for b in baselines if b != "fc_fingerprint"]
    if not 0.0 < float(run_fraction) <= 1.0 or not 0.0 < float(gallery_fraction) < float(run_fraction):
        raise ConfigError(f"run_fraction={run_fraction} must lie in (0, 1] and gallery_fraction={gallery_fraction} "
                          "strictly between 0 and it")
    lengths = [int(round(float(n) * float(run_fraction))) for n in store.lengths]
    if gallery_runs or query_runs:
        g, q = split_by_session(store.run_ids, store.subject_ids, gallery=list(gallery_runs or []),
                                query=list(query_runs or []))
        segments = {"train": [(int(r), 0, lengths[r]) for r in g], "val": [(int(r), 0, lengths[r]) for r in q]}
    else:
        segments = time_split(lengths, float(gallery_fraction) / float(run_fraction))
    models = {"pretrained": pretrained}
    if "random_init" in baselines:
        torch.manual_seed(seed)
        models["random_init"] = build_task_from_checkpoint(ckpt, weights=False)
    for name, path in (compare or {}).items():
        models[_compare_name(name, models)] = _compared_task(path, ckpt, store)
    # rows in the order of the table: the checkpoint, its initialisation, FC fingerprinting, compared runs
    names = [*(n for n in models if n in BASELINES or n == "pretrained"),
             *(b for b in baselines if b == "fc_fingerprint"), *(n for n in models if n in (compare or {}))]
    results: dict[str, dict[str, dict]] = {name: {} for name in names}
    probes: dict[str, dict[str, dict]] = {name: {} for name in names}

    def score(name: str, length: int, fg, gid, fq, qid, metric: str) -> None:
        start = time.perf_counter()
        r = results[name][str(length)] = reidentification(fg, gid, fq, qid, metric=metric)
        line = f"{_LABELS.get(name, name)}, {length} TRs: Rank-1 {r['rank1']:.3f}, mAP {r['mAP']:.3f}"
        if probe:
            p = probes[name][str(length)] = fit_predict_sklearn(fg, gid, fq, qid, "classification", seed)
            line += f"; subject probe ({fg.shape[1]} features) accuracy {p['acc']:.3f}"
            line += f" ({time.perf_counter() - start:.1f} s)"  # the slow part; re-identification alone is instant
        progress("%s", line)

    sets = {}
    for length in window_lengths:
        step = int(stride or max(1, length // 2))
        sets[int(length)] = (make(segments["train"], int(length), step), make(segments["val"], int(length), step))
    groups = [Group(f"{part}:{length}", ds, int(batch_size)) for length, pair in sets.items()
              for part, ds in zip(("gallery", "query"), pair)]
    shard_dir = Path(ckpt["_path"]).parent / ".inference-evaluate"
    n_windows = sum(len(ds) for pair in sets.values() for ds in pair)
    progress("evaluating %s on %s (%d subjects)", ckpt["_path"], store.location, len(set(store.subject_ids)))
    progress("%s at window lengths %s TRs (%d windows): re-identification%s",
             ", ".join(_LABELS.get(n, n) for n in names), ", ".join(str(n) for n in sets), n_windows,
             " and the subject probe" if probe else "")
    rank0 = True
    for name, task in models.items():
        progress("%s: embedding %d windows", _LABELS.get(name, name), n_windows)
        embedded = embed_groups(task, groups, trainer, shard_dir)
        if embedded is None:
            rank0 = False
            continue
        for k, length in enumerate(sets):
            (fg, gid), (fq, qid) = embedded[2 * k], embedded[2 * k + 1]
            score(name, length, fg, gid, fq, qid, "cosine")
    if not rank0:
        return None
    if "fc_fingerprint" in baselines:
        progress("FC fingerprinting: correlating the ROIs of %d windows", n_windows)
        for length, (gallery, queries) in sets.items():
            wg, gid = window_array(gallery)
            wq, qid = window_array(queries)
            score("fc_fingerprint", length, fc_features(wg), gid, fc_features(wq), qid, "pearson")
    return {
        "checkpoint": ckpt["_path"],
        "global_step": int(ckpt.get("global_step", -1)),
        "data": {"path": str(store.location), "atlas": getattr(store, "atlas", None), "tr": store.tr,
                 "kind": store.kind, "n_subjects": len(set(store.subject_ids))},
        "compare": {name: str(find_checkpoint(path)) for name, path in (compare or {}).items()},
        "protocol": {
            "gallery": (f"windows of runs {list(gallery_runs)}" if gallery_runs
                        else f"windows of the first {gallery_fraction:g} of each run"),
            "queries": (f"windows of runs {list(query_runs)}" if query_runs else
                        "windows of the rest of each run" if run_fraction == 1 else
                        f"windows of each run from {gallery_fraction:g} to {run_fraction:g}"),
            "run_fraction": float(run_fraction),
            "window_lengths": [int(w) for w in window_lengths],
            "windows": {str(length): {"gallery": len(g), "queries": len(q)} for length, (g, q) in sets.items()},
            "stride": stride or "half the window length",
            "similarity": {"embeddings": "cosine", "fc_fingerprint": "pearson (Finn et al. 2015)"},
            "probe": "standardised features, logistic regression (C by 3-fold CV) fit on gallery windows, "
                     "scored on query windows; solved on the span of the gallery windows' features where they "
                     "are at most a quarter as many as the features (exact: brainfm.eval.probe.RowSpace)"
                     if probe else None,
        },
        "results": results,
        **({"probe": probes} if probe else {}),
    }


def _compare_name(name: str, models: dict) -> str:
    if name in models or name in BASELINES:
        raise ConfigError(f"compare name {name!r} is taken (by the pretrained model or a baseline); rename it")
    return name


def _compared_task(path: str | Path, ckpt: dict, store):
    """Another trained run's task, checked against ``store`` and the pretrained model's normalization.

    Raises:
        CheckpointError: its data contract does not fit ``store``.
        ConfigError: it normalizes its inputs otherwise than the pretrained model.
    """
    other = load_checkpoint(find_checkpoint(path))
    task = build_task_from_checkpoint(other)
    meta = other["hyper_parameters"]["data_meta"]
    check_compatible(meta, store, where=f"checkpoint {other['_path']}", any_tr=task.model.any_tr)
    mode = (meta.get("normalization") or {}).get("mode", "run")
    ours = (ckpt["hyper_parameters"]["data_meta"].get("normalization") or {}).get("mode", "run")
    if mode != ours or mode == "global":
        raise ConfigError(f"compare: {other['_path']} normalizes with mode={mode}, the evaluated checkpoint with "
                          f"mode={ours}; compared runs are embedded on the same windows, so both must use "
                          "data.normalization.mode=run (or none)")
    return task


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` as indented JSON, atomically (:func:`brainfm.io.atomic_write_text`)."""
    atomic_write_text(path, json.dumps(payload, indent=2))


def plot_reidentification(report: dict, path: Path) -> None:
    """Rank-1 and mAP against window length, one curve per method, chance dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = report["data"]["tr"]
    labels = {"pretrained": "pretrained", "random_init": "random init (same architecture)", "fc_fingerprint": "FC fingerprinting"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("rank1", "mAP")):
        chance = None
        for name, per_length in report["results"].items():
            lengths = sorted(int(k) for k in per_length)
            ax.plot(lengths, [per_length[str(n)][key] for n in lengths], marker="o", label=labels.get(name, name))
            chance = [per_length[str(n)][f"{key}_chance"] for n in lengths], lengths
        if chance:
            ax.plot(chance[1], chance[0], "k--", lw=1, label="chance")
        ax.set_xlabel(f"window length (TRs; TR = {tr:g} s)" if tr else "window length (TRs)")
        ax.set_ylabel("Rank-1 accuracy" if key == "rank1" else "mean average precision")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"Subject re-identification, {report['data']['n_subjects']} subjects")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
