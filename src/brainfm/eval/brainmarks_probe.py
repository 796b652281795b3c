"""Brainmarks' probe protocol in brainfm (``brainfm-evaluate protocol=probe``).

Brainmarks (MedARC, ``pip install brainmarks``; arXiv 2510.13768; ``brainmarks/main_probe.py`` and
``classifiers.py`` of 0.1.1, after CAPI's ``eval_classification.py``) trains small classification heads on frozen
embeddings, and so does this module, with its defaults (``config/default_probe.yaml``; :data:`DEFAULTS`):

1. one embedding per sample of every split, as ``protocol=logistic`` gets it
   (:func:`brainfm.eval.logistic.checkpoint_sample_features`): ``cls`` the task's pooled embedding ``(N, 1, D)``,
   ``patch`` its tokens ``(N, L, D)`` (:meth:`BrainfmTask.tokens`); ``reg`` (register tokens) no brainfm model has;
2. a grid of heads, one per ``(lr_scale, wd_scale)`` of ``lr_scale_grid`` x ``wd_scale_grid`` (49 x 1), all
   starting from the same initialisation (:data:`brainfm.models.heads.PROBE_HEADS`: ``linear``, ``attn``,
   ``mlp``), trained together: cross-entropy, the mean over the heads of each head's batch-mean loss, AdamW with
   ``lr = lr * lr_scale`` and ``weight_decay * wd_scale`` (none on biases and norms), batches of 64 (shuffled,
   the last partial one dropped), gradients accumulated over ``accum_iter`` 2 batches and clipped per head to
   ``clip_grad`` 1.0, ``epochs`` 20 of ``steps_per_epoch`` 200 updates, linear warm-up over 5 epochs then cosine
   decay to 0; a head whose loss exceeds ``20 ln(C)`` is zeroed and frozen (diverged);
3. after every epoch, every head is scored on the validation split; the best head of the epoch is the one with
   the highest ``cv_metric`` (``acc``; first on ties), and the epoch whose best head beats every earlier epoch's
   (strictly) is kept (``early_stopping``; else the last epoch);
4. that head is scored on train, validation and test: accuracy, balanced accuracy and macro-F1, with
   Brainmarks' bootstrap standard deviation (:func:`brainfm.eval.logistic.bootstrap_std`, ``seed`` 4466).

The table always carries the FC baseline (Pearson connectome of the sample, upper triangle, as a ``cls``
embedding; :func:`brainfm.eval.logistic.fc_sample_features`) through the same grid with the ``fc_classifier`` head
(``linear`` by default: the heads of ``attn``/``mlp`` on 79,800 FC features would hold billions of weights).
Everything runs in a forked torch RNG seeded with ``seed``: the same seed gives the same numbers.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from brainfm.errors import ConfigError, DataError
from brainfm.eval.logistic import (
    bootstrap_std,
    checkpoint_sample_features,
    classification_metrics,
    fc_sample_features,
    labelled_report,
    load_for_labelled,
    open_labelled,
    report_window_length,
)
from brainfm.models.heads import PROBE_HEADS

log = logging.getLogger(__name__)

#: np.logspace(-1.7, 1.7, 49) to two significant digits: Brainmarks' ``lr_scale_grid``
LR_SCALE_GRID = [0.02, 0.023, 0.028, 0.033, 0.038, 0.045, 0.053, 0.062, 0.074, 0.087, 0.1, 0.12, 0.14, 0.17, 0.2,
                 0.23, 0.27, 0.32, 0.38, 0.44, 0.52, 0.61, 0.72, 0.85, 1, 1.2, 1.4, 1.6, 1.9, 2.3, 2.7, 3.1, 3.7, 4.3,
                 5.1, 6, 7.1, 8.3, 9.8, 12, 14, 16, 19, 22, 26, 31, 36, 43, 50]
#: Brainmarks' defaults (``brainmarks/config/default_probe.yaml`` of 0.1.1), its key names; ``amp`` and ``device``
#: differ (float32 heads; the CUDA device when there is one) and ``bootstrap`` is Brainmarks' fixed 500
DEFAULTS: dict[str, Any] = {
    "seed": 4466, "classifier": "linear", "representation": "cls",
    "classifier_kwargs": {"embed_dim": None, "dropout": 0.0, "xavier_init": True, "norm": True},
    "lr_scale_grid": LR_SCALE_GRID, "wd_scale_grid": [1.0], "balanced_sampling": False,
    "epochs": 20, "steps_per_epoch": 200, "batch_size": 64, "accum_iter": 2, "lr": 3e-4, "warmup_epochs": 5,
    "no_decay": False, "weight_decay": 0.05, "clip_grad": 1.0, "cv_metric": "acc", "early_stopping": True,
    "amp": False, "device": "auto", "bootstrap": 500,
}
#: brainfm's metric names -> Brainmarks' (``cv_metric`` takes either, or ``neg_loss``)
METRICS = {"acc": "acc", "balanced_acc": "bacc", "f1_macro": "f1"}
REPRESENTATIONS = ("cls", "reg", "patch")
#: a grid larger than this many weights (x4 with AdamW's state) is refused with the fix
MAX_GRID_PARAMETERS = 250_000_000


def lr_schedule(base_lr: float, total_steps: int, warmup_steps: int, no_decay: bool = False) -> np.ndarray:
    """Learning rate of every update ``(total_steps,)``: linear from 0 to ``base_lr`` over ``warmup_steps``
    (both ends included), then half a cosine from ``base_lr`` to 0 over the rest (``no_decay``: constant)."""
    rest = max(total_steps - warmup_steps, 0)
    decay = np.ones(rest) if no_decay else (np.cos(np.linspace(0, np.pi, rest)) + 1) / 2
    return (base_lr * np.concatenate([np.linspace(0.0, 1.0, warmup_steps), decay]))[:total_steps]


def _cv_score(name: str, scores: Mapping[str, float]) -> float:
    if name == "neg_loss":
        return -scores["loss"]
    return scores[{v: k for k, v in METRICS.items()}.get(name, name)]


def _scores(logits, y) -> dict[str, float]:
    """``loss`` (mean cross-entropy) and the metrics of one head's logits ``(N, C)`` on labels ``(N,)``."""
    import torch

    loss = float(torch.nn.functional.cross_entropy(logits, y))
    return {"loss": loss, **classification_metrics(y.numpy(), logits.argmax(dim=1).numpy())}


def train_head_grid(train: tuple[np.ndarray, np.ndarray], validation: tuple[np.ndarray, np.ndarray],
                    n_classes: int, **settings: Any) -> dict[str, Any]:
    """Train the grid of heads of Brainmarks' probe protocol (module docstring, steps 2-3) on fixed embeddings.

    Args:
        train, validation: ``(embeddings (N, L, D) float32, class ids (N,) int in [0, n_classes))``.
        n_classes: C. settings: :data:`DEFAULTS` (``classifier``, ``classifier_kwargs``, grids, optimisation,
            ``cv_metric``, ``early_stopping``, ``seed``, ``device``, ``amp``; ``representation`` and
            ``bootstrap`` unused here).

    Returns:
        ``{"heads": ModuleList of the kept epoch (CPU), "grid": [{"lr", "weight_decay", "lr_scale", "wd_scale"}],
        "cv_scores": [[validation cv_metric of every grid point] per epoch], "chosen": {"epoch", "index", "lr",
        "weight_decay",
        "score"}, "diverged": [grid indices]}``.

    Raises:
        ConfigError: an unknown head or ``cv_metric``; a grid too large (the fix names ``embed_dim`` or the head);
            fewer training samples than ``batch_size``.
    """
    import torch
    from torch import nn

    s = {**DEFAULTS, **settings}
    if s["classifier"] not in PROBE_HEADS:
        raise ConfigError(f"probe_heads.classifier={s['classifier']!r} is not a head; available: {list(PROBE_HEADS)} "
                          "(Brainmarks' names)")
    if s["cv_metric"] not in {"neg_loss", *METRICS, *METRICS.values()}:
        raise ConfigError(f"probe_heads.cv_metric={s['cv_metric']!r} must be one of acc, bacc, f1, neg_loss")
    x, y = (torch.as_tensor(np.asarray(a)) for a in train)
    vx, vy = (torch.as_tensor(np.asarray(a)) for a in validation)
    x, vx, y, vy = x.float(), vx.float(), y.long(), vy.long()
    batch_size, accum = int(s["batch_size"]), int(s["accum_iter"])
    if len(x) < batch_size:
        raise ConfigError(f"{len(x)} training samples, fewer than one batch (probe_heads.batch_size={batch_size}; the "
                          f"last partial batch is dropped, as in Brainmarks). Fix: probe_heads.batch_size={len(x)}")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if s["device"] == "auto" else s["device"])
    grid = [(float(a), float(b)) for a in s["lr_scale_grid"] for b in s["wd_scale_grid"]]
    head_cls = PROBE_HEADS[s["classifier"]]
    # each head takes the classifier_kwargs it has (Brainmarks' filter_kwargs)
    accepted = inspect.signature(head_cls).parameters
    kwargs = {k: v for k, v in dict(s["classifier_kwargs"] or {}).items() if k in accepted}
    try:  # its size first, on the meta device (no memory)
        with torch.device("meta"):
            size = sum(p.numel() for p in head_cls(in_dim=int(x.shape[-1]), out_dim=int(n_classes),
                                                   **kwargs).parameters()) * len(grid)
    except ValueError as exc:
        raise ConfigError(f"probe_heads.classifier={s['classifier']}: {exc} (probe_heads.classifier_kwargs."
                          "embed_dim=64)") from exc
    if size > MAX_GRID_PARAMETERS:
        raise ConfigError(f"the grid of {len(grid)} {s['classifier']} heads on {x.shape[-1]}-dim embeddings holds "
                          f"{size:,} weights (> {MAX_GRID_PARAMETERS:,}). Fix: probe_heads.classifier_kwargs."
                          "embed_dim=256 (the hidden width of attn/mlp), probe_heads.fc_classifier=linear for the "
                          "FC row, or fewer probe_heads.lr_scale_grid values")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(s["seed"]))
        first = head_cls(in_dim=int(x.shape[-1]), out_dim=int(n_classes), **kwargs)
        heads = nn.ModuleList([copy.deepcopy(first) for _ in grid]).to(device)  # every head: the same start
        groups: dict[tuple[float, float], dict] = {}
        for head, (lr_scale, wd_scale) in zip(heads, grid):
            for name, p in head.named_parameters():
                wd = 0.0 if name.endswith(".bias") or "norm" in name else wd_scale
                group = groups.setdefault((lr_scale, wd), {"params": [], "lr_scale": lr_scale, "wd_scale": wd})
                group["params"].append(p)
        param_groups = list(groups.values())
        for g in param_groups:
            g["weight_decay"] = float(s["weight_decay"]) * g["wd_scale"]
            g["lr"] = float(s["lr"]) * g["lr_scale"]
        optimizer = torch.optim.AdamW(param_groups)
        steps_per_epoch = int(s["steps_per_epoch"] or (len(x) // batch_size) // accum) or 1
        epochs = int(s["epochs"])
        schedule = lr_schedule(float(s["lr"]), epochs * steps_per_epoch, int(s["warmup_epochs"]) * steps_per_epoch,
                               bool(s["no_decay"]))
        if s["balanced_sampling"]:
            counts = torch.bincount(y, minlength=n_classes).double()
            weights = (counts.max() / counts.clamp(min=1))[y]
            sampler = torch.utils.data.WeightedRandomSampler(weights, num_samples=len(x))
        else:
            sampler = torch.utils.data.RandomSampler(range(len(x)))
        batches = torch.utils.data.BatchSampler(sampler, batch_size, drop_last=True)
        threshold = 20 * math.log(n_classes)
        amp = bool(s["amp"])
        validation_scores: list[list[float]] = []
        diverged: set[int] = set()
        best = (-math.inf, None, None, None)  # score, epoch, index, state
        last = None
        for epoch in range(epochs):
            heads.train()
            stream = iter(batches)
            for i in range(steps_per_epoch * accum):
                try:
                    idx = next(stream)
                except StopIteration:  # another pass, newly shuffled (Brainmarks' infinite loader)
                    stream = iter(batches)
                    idx = next(stream)
                update = (i + 1) % accum == 0
                if update:
                    lr = float(schedule[epoch * steps_per_epoch + (i + 1) // accum - 1])
                    for g in optimizer.param_groups:
                        g["lr"] = lr * g["lr_scale"]
                xb, yb = x[idx].to(device), y[idx].to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    logits = torch.stack([h(xb) for h in heads], dim=-1)  # (B, C, K)
                    losses = nn.functional.cross_entropy(logits.float(), yb[:, None].expand(-1, len(heads)),
                                                         reduction="none").mean(dim=0)  # (K,)
                loss = losses.mean()
                if not math.isfinite(loss.item()):
                    raise DataError(f"the probe's loss is {loss.item()} at epoch {epoch}; check the embeddings (NaN?)")
                (loss / accum).backward()
                if update:
                    for h in heads:
                        nn.utils.clip_grad_norm_(h.parameters(), float(s["clip_grad"]))
                    optimizer.step()
                    optimizer.zero_grad()
                    for k, value in enumerate(losses.tolist()):
                        if value > threshold and k not in diverged:
                            log.warning("probe head %d (lr %.2g, weight decay %.2g) diverged (loss %.1f > 20 ln C) at "
                                        "epoch %d; zeroed and frozen, as Brainmarks does", k, grid[k][0] * s["lr"],
                                        grid[k][1] * s["weight_decay"], value, epoch)
                            diverged.add(k)
                            heads[k].requires_grad_(False)
                            for p in heads[k].parameters():
                                p.data.zero_()
            scores = [_cv_score(s["cv_metric"], sc) for sc in _evaluate(heads, vx, vy, device, amp)]
            validation_scores.append(scores)
            k = int(np.argmax(scores))
            if scores[k] > best[0]:
                best = (scores[k], epoch, k, copy.deepcopy(heads.state_dict()))
            last = (scores[k], epoch, k, None)
        score, epoch, k, state = best if s["early_stopping"] else last
        if state is not None:
            heads.load_state_dict(state)
    return {
        "heads": heads.cpu(),
        "grid": [{"lr_scale": a, "wd_scale": b, "lr": a * float(s["lr"]), "weight_decay": b * float(s["weight_decay"])}
                 for a, b in grid],
        "cv_scores": validation_scores,
        "chosen": {"epoch": int(epoch), "index": int(k), "lr": grid[k][0] * float(s["lr"]),
                   "weight_decay": grid[k][1] * float(s["weight_decay"]), "score": float(score)},
        "diverged": sorted(diverged),
    }


def _evaluate(heads, x, y, device, amp: bool, batch_size: int = 1024) -> list[dict[str, float]]:
    """Scores (:func:`_scores`) of every head on ``(x, y)``."""
    import torch

    heads.eval()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        logits = torch.cat([torch.stack([h(x[i:i + batch_size].to(device)) for h in heads], dim=-1).float().cpu()
                            for i in range(0, len(x), batch_size)])
    return [_scores(logits[..., k], y) for k in range(logits.shape[-1])]


def probe_protocol(features: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray], **settings: Any
                   ) -> dict[str, Any]:
    """Steps 2-4 of the module docstring on one feature set.

    Args:
        features: ``{"train"|"val"|"test": (N_s, L, D)}``; labels: ``{split: (N_s,)}`` (any sortable values).
        settings: :data:`DEFAULTS`.

    Returns:
        ``{"chosen": ..., "grid": ..., "cv_scores": ..., "diverged": ..., "train"|"validation"|"test": metrics
        (``acc``, ``balanced_acc``, ``f1_macro``, their ``_std`` over the bootstrap, ``loss``), "dim"}``.
    """
    import torch

    s = {**DEFAULTS, **settings}
    classes = np.unique(np.concatenate([np.asarray(v) for v in labels.values()]))
    ids = {k: np.searchsorted(classes, np.asarray(v)) for k, v in labels.items()}
    fit = train_head_grid((features["train"], ids["train"]), (features["val"], ids["val"]), len(classes), **s)
    k = fit["chosen"]["index"]
    head = torch.nn.ModuleList([fit["heads"][k]])
    out = {key: fit[key] for key in ("chosen", "grid", "cv_scores", "diverged")}
    for split, name in (("train", "train"), ("val", "validation"), ("test", "test")):
        x = torch.as_tensor(np.asarray(features[split])).float()
        y = torch.as_tensor(ids[split]).long()
        scores = _evaluate(head, x, y, torch.device("cpu"), False)[0]
        if s["bootstrap"]:
            with torch.inference_mode():
                pred = head[0](x).argmax(dim=1).numpy()
            scores.update({f"{m}_std": v for m, v in bootstrap_std(ids[split], pred, int(s["bootstrap"]),
                                                                    int(s["seed"])).items()})
        out[name] = scores
    out["dim"] = int(np.asarray(features["train"]).shape[-1])
    out["classes"] = [str(c) for c in classes]
    return out


def run_probe(ckpt_path: str | Path | None, data_path: str | Path | None, target: str | None, *,
              atlas: Any = None, split: Mapping[str, Any] | None = None, window_length: int | None = None,
              fc_length: int | None = None, fc_classifier: str | None = "linear", inference_batch_size: int = 64,
              trainer=None, shard_dir: str | Path | None = None, **settings: Any) -> dict | None:
    """Brainmarks' probe protocol (module docstring) on a checkpoint (``ckpt_path``; None: the FC baseline alone,
    ``model=fc``) and the FC baseline, on the labelled store ``data_path`` (default: the checkpoint's data): an
    ROI HDF5 store with ``/labels/<target>`` or a Brainmarks ``<name>.<space>.arrow`` folder, split as
    :func:`brainfm.eval.logistic.open_labelled` splits it.

    Args:
        settings: :data:`DEFAULTS` (Brainmarks' keys; ``batch_size`` is the heads'). inference_batch_size:
            windows a batch of the checkpoint's inference (``brainfm-evaluate``'s ``batch_size``).
        fc_classifier: the FC row's head (None: the model row's).

    Returns:
        A JSON-ready report on the global rank 0 (``results``: ``{"model"|"fc": probe_protocol(...)}``), None on the
        other ranks.

    Raises:
        ConfigError: unknown settings, representation or head; ``reg`` (no brainfm model has register tokens);
            ``patch`` of a checkpoint whose task has no tokens; neither a checkpoint nor ``data_path``.
        DataError / CheckpointError: as :func:`brainfm.eval.logistic.open_labelled` and
            :func:`brainfm.eval.logistic.checkpoint_sample_features`.
    """
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown probe_heads setting(s) {unknown}; available: {sorted(DEFAULTS)}")
    settings = {**DEFAULTS, **{k: v for k, v in settings.items() if v is not None}}
    representation = settings["representation"]
    if representation not in REPRESENTATIONS:
        raise ConfigError(f"probe_heads.representation={representation!r} must be one of {list(REPRESENTATIONS)}")
    for key, head in (("classifier", settings["classifier"]), ("fc_classifier", fc_classifier)):
        if head is not None and head not in PROBE_HEADS:
            raise ConfigError(f"probe_heads.{key}={head!r} is not a head; available: {list(PROBE_HEADS)} "
                              "(Brainmarks' names)")
    ckpt, task, data_path, atlas = load_for_labelled(ckpt_path, data_path, atlas)
    if ckpt is not None and representation == "reg":
        raise ConfigError(f"probe_heads.representation=reg: brainfm models have no register tokens (checkpoint "
                          f"{ckpt['_path']}; Brainmarks' plugin returns reg=None). Fix: probe_heads.representation="
                          "cls or patch")
    if not data_path:
        raise ConfigError("protocol=probe model=fc needs the labelled data: data_path=<ROI store .h5 with /labels, "
                          "or a Brainmarks <name>.<space>.arrow folder>")
    data = open_labelled(data_path, target, atlas=atlas, split=split, atlas_key="probe_heads.atlas")
    parts = ("train", "val", "test")
    features: dict[str, dict[str, np.ndarray]] = {}
    if task is not None:
        order = np.concatenate([data.runs[k] for k in parts])
        feats = checkpoint_sample_features(
            task, ckpt, data.store, order, window_length=window_length,
            representation="cls" if representation == "cls" else "patch", batch_size=inference_batch_size,
            trainer=trainer,
            shard_dir=Path(shard_dir) if shard_dir else Path(ckpt["_path"]).parent / ".inference-probe",
            pool_tokens=False, setting="probe_heads")
        if feats is None:
            return None
        if feats.ndim == 2:  # cls: one token, as Brainmarks' (B, 1, D)
            feats = feats[:, None]
        bounds = np.cumsum([0, *(len(data.runs[k]) for k in parts)])
        features["model"] = {k: feats[bounds[i]:bounds[i + 1]] for i, k in enumerate(parts)}
    features["fc"] = {k: fc_sample_features(data.store, data.runs[k], fc_length)[:, None] for k in parts}
    results = {}
    for name, f in features.items():
        row = dict(settings)
        if name == "fc":
            row.update(representation="cls", classifier=fc_classifier or settings["classifier"])
        n_heads = len(row["lr_scale_grid"]) * len(row["wd_scale_grid"])
        log.info("%s (%s, %d features): training %d %s heads, %d epochs of %s updates", "FC" if name == "fc" else name,
                 row["representation"], np.asarray(f["train"]).shape[-1], n_heads, row["classifier"],
                 int(row["epochs"]), row["steps_per_epoch"] or "one pass")
        start = time.perf_counter()
        results[name] = probe_protocol(f, data.labels, **row)
        log.info("%s: test accuracy %.3f (%.1f s)", "FC" if name == "fc" else name, results[name]["test"]["acc"],
                 time.perf_counter() - start)
        results[name]["classifier"] = row["classifier"]
        results[name]["representation"] = row["representation"]
    return {
        **labelled_report("probe", ckpt, data, target),
        "settings": {**settings, "fc_classifier": fc_classifier, "fc_length": fc_length,
                     "window_length": report_window_length(ckpt, window_length),
                     "fc": "Pearson connectome of the sample, upper triangle (Brainmarks' Connectome, cls)"},
        "results": results,
    }


def print_table(report: dict) -> None:
    """Rows: the model (when a checkpoint was given) and FC, each with its head and the chosen lr / weight decay;
    columns: accuracy, balanced accuracy, macro-F1 on the test split (± bootstrap std)."""
    from rich.console import Console
    from rich.table import Table

    d, s = report["data"], report["settings"]
    print(f"Brainmarks probe protocol: target {d['target']!r} of {d['path']} ({d['samples']['train']} train, "
          f"{d['samples']['val']} validation, {d['samples']['test']} test samples; "
          f"{len(s['lr_scale_grid']) * len(s['wd_scale_grid'])} lr x weight decay grid points, best on validation {s['cv_metric']}; seed {s['seed']})")
    run = Path(report["checkpoint"]).parent.parent if report.get("checkpoint") else None
    name = f"{run.parent.name}/{run.name}" if run is not None else "model"
    table = Table()
    for column in ("model", "head", "lr / wd (epoch)", "acc", "balanced acc", "macro-F1"):
        table.add_column(column, justify="left" if column in ("model", "head") else "right")
    for key, r in report["results"].items():
        c, t = r["chosen"], r["test"]
        table.add_row(name if key == "model" else "FC", f"{r['classifier']} ({r['representation']})",
                      f"{c['lr']:.2g} / {c['weight_decay']:.2g} ({c['epoch']})",
                      *(f"{t[m]:.3f}" + (f" ± {t[m + '_std']:.3f}" if m + "_std" in t else "") for m in METRICS))
    Console().print(table)
    diverged = {k: len(r["diverged"]) for k, r in report["results"].items() if r["diverged"]}
    if diverged:
        print(f"note: {', '.join(f'{k}: {v}' for k, v in diverged.items())} grid head(s) diverged (loss > 20 ln C) and "
              "were zeroed and frozen, as Brainmarks does; usually the largest learning rates")


__all__ = ["DEFAULTS", "LR_SCALE_GRID", "lr_schedule", "print_table", "probe_protocol", "run_probe",
           "train_head_grid"]
