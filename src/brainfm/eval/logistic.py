"""Brainmarks' logistic protocol in brainfm (``brainfm-evaluate protocol=logistic``).

Brainmarks (MedARC, ``pip install brainmarks``; arXiv 2510.13768; ``brainmarks/main_logistic.py`` of
0.1.1) evaluates a frozen model on a labelled data set with three splits like this, and so does this
module, step for step (docs/brainmarks_protocols.md says what is and is not the same):

1. one embedding per sample (a run, or the clip a Brainmarks row holds) of every split; samples whose
   target is missing are left out (Brainmarks' ``HFDataset``: ``pd.isna``; an empty string here too);
2. ``train`` and ``validation`` merged into one training set; ``validation_size`` = its share of it;
3. a classifier: ``StandardScaler`` + ``LogisticRegressionCV(Cs=10, max_iter=1000,
   scoring=balanced_accuracy)`` whose C is chosen on ``cv_folds=5`` stratified shuffle splits
   (``StratifiedShuffleSplit(test_size=validation_size)``) seeded by ``RandomState(seed).randint(1000,
   10000)``, ``seed`` 4466; L2 penalty, lbfgs;
4. on the fixed split: accuracy, macro-F1 and balanced accuracy of the train and test predictions, with
   Brainmarks' bootstrap standard deviation (500 stratified resamples of the predictions, seeded by
   ``seed``);
5. ``n_trials`` (100) randomised splits: all samples, ``train_test_split(train_size=<training set size>,
   stratify=targets, random_state=seed + trial)``, the same classifier; mean and (sample, ``ddof=1``)
   standard deviation over trials.

Every table also carries the FC baseline: the Pearson connectome of the sample (upper triangle,
:func:`brainfm.eval.fingerprinting.fc_features`; Brainmarks' ``Connectome`` model, a ``cls`` embedding)
through the same classifier. A brainfm checkpoint's sample embedding is the task's :meth:`embed` of the
sample's first ``window_length`` TRs (the checkpoint's window), z-scored and at the TR the checkpoint
needs, as Brainmarks' plugin ``brainfm`` (``src/brainmarks/models/brainfm.py``) gives it; ``patch`` is the
mean of its tokens (Brainmarks averages ``(B, L, D)`` embeddings over ``L``).

The data: a Brainmarks Arrow folder (its ``train``/``validation``/``test`` as given) or an ROI HDF5
store with ``/labels/<name>`` (split by subject as ``brainfm-data to-brainmarks`` splits it, so both give
the same table).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brainfm.data.datasets.roi import ROIWindowDataset
from brainfm.data.stores import detect_kind, open_store
from brainfm.data.stores.brainmarks_writer import subject_split_for
from brainfm.data.stores.resample import ResampledStore
from brainfm.errors import CheckpointError, ConfigError, DataError
from brainfm.eval.fingerprinting import fc_features
from brainfm.eval.inference import Group, run_inference
from brainfm.eval.probe import metrics
from brainfm.runs import build_task_from_checkpoint, check_compatible, find_checkpoint, load_checkpoint, normalizer_for

log = logging.getLogger(__name__)

#: Brainmarks' defaults (``brainmarks/config/default_logistic.yaml`` of 0.1.1)
DEFAULTS: dict[str, Any] = {"seed": 4466, "Cs": 10, "cv_folds": 5, "max_iter": 1000, "cv_metric": "bacc",
                            "balanced_sampling": False, "n_trials": 100, "bootstrap": 500}
#: metric names in brainfm's reports -> Brainmarks' names
METRICS = {"acc": "acc", "balanced_acc": "bacc", "f1_macro": "f1"}
#: Brainmarks' ``cv_metric`` -> scikit-learn scoring
SCORING = {"acc": "accuracy", "bacc": "balanced_accuracy", "f1": "f1_macro"}
REPRESENTATIONS = ("cls", "patch")


# -- the classifier ----------------------------------------------------------------------------------------
def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """``acc``, ``balanced_acc`` (:func:`brainfm.eval.probe.metrics`) and ``f1_macro`` (macro-averaged F1)."""
    from sklearn.metrics import f1_score

    out = metrics("classification", y_true, y_pred)
    out["f1_macro"] = float(f1_score(y_true, y_pred, average="macro"))
    return out


def _confusion_metrics(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> tuple[float, float, float]:
    """``(acc, balanced_acc, f1_macro)`` of integer labels in ``[0, k)`` from one confusion matrix: scikit-learn's
    definitions (balanced accuracy: mean recall over the classes present in ``y_true``; macro-F1 over the classes
    in ``y_true`` or ``y_pred``, 0 where undefined, as ``zero_division`` gives). Written out because the bootstrap
    scores 500 resamples and scikit-learn's input checks cost ~3 ms a call; ``test_brainmarks_protocols`` checks it
    against scikit-learn."""
    cm = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k).astype(np.float64)
    tp, support, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    present = (support + predicted) > 0
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros(k), where=denom > 0)
    recall = tp[support > 0] / support[support > 0]
    return float(tp.sum() / len(y_true)), float(recall.mean()), float(f1[present].mean())


def bootstrap_std(y_true: np.ndarray, y_pred: np.ndarray, n: int = 500, seed: int = DEFAULTS["seed"]) -> dict[str, float]:
    """Standard deviation of ``acc``, ``balanced_acc`` and ``f1_macro`` over ``n`` stratified bootstrap resamples
    of ``(y_pred, y_true)`` (``sklearn.utils.resample(stratify=y_true)`` from ``check_random_state(seed)``:
    Brainmarks' ``bootstrap_ci``)."""
    from sklearn.utils import check_random_state, resample

    classes, codes = np.unique(np.concatenate([np.asarray(y_true), np.asarray(y_pred)]), return_inverse=True)
    t_idx, p_idx = codes[: len(y_true)], codes[len(y_true):]
    rng = check_random_state(int(seed))
    values = []
    for _ in range(int(n)):
        p, t = resample(p_idx, t_idx, random_state=rng, stratify=t_idx)
        values.append(_confusion_metrics(t, p, len(classes)))
    if not values:
        return {k: float("nan") for k in METRICS}
    return dict(zip(("acc", "balanced_acc", "f1_macro"), (float(v) for v in np.std(np.array(values), axis=0))))


@dataclass
class Fit:
    """One fitted classifier: the chosen ``C``, metrics of each scored partition, and how many of its
    lbfgs fits stopped at ``max_iter`` (scikit-learn's ``ConvergenceWarning``, collected, not shown)."""

    C: float
    metrics: dict[str, dict[str, float]]
    not_converged: int


def fit_logistic(train_x: np.ndarray, train_y: np.ndarray, score: Mapping[str, tuple[np.ndarray, np.ndarray]],
                 validation_size: float, seed: int = DEFAULTS["seed"], Cs: int = DEFAULTS["Cs"],
                 cv_folds: int = DEFAULTS["cv_folds"], max_iter: int = DEFAULTS["max_iter"],
                 cv_metric: str = DEFAULTS["cv_metric"], balanced_sampling: bool = False,
                 bootstrap: int = 0) -> Fit:
    """Brainmarks' classifier (``main_logistic.evaluate``): standardisation + L2 logistic regression, C among
    ``Cs`` log-spaced values chosen by ``cv_metric`` over ``cv_folds`` stratified shuffle splits holding out
    ``validation_size`` of the training samples (seeded by ``RandomState(seed).randint(1000, 10000)``).

    Args:
        train_x: ``(N, D)`` features; train_y: ``(N,)`` class labels (any sortable values).
        score: ``{partition name: (features (M, D), labels (M,))}`` to predict and score.
        bootstrap: resamples for the standard deviation of each metric (0: none).

    Returns:
        :class:`Fit`; ``metrics[name]`` holds ``acc``, ``balanced_acc``, ``f1_macro`` (+ ``<metric>_std`` with
        ``bootstrap``).

    Raises:
        ValueError: fewer than two classes, a class with one sample (stratified splits need two), NaN features.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedShuffleSplit
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.utils import check_random_state

    if cv_metric not in SCORING:
        raise ConfigError(f"logistic.cv_metric={cv_metric!r} must be one of {list(SCORING)} (Brainmarks' names)")
    if not np.isfinite(train_x).all():
        raise ValueError("features contain NaN/inf; check the embeddings")
    random_state = check_random_state(int(seed))
    cv = StratifiedShuffleSplit(n_splits=int(cv_folds), test_size=float(validation_size),
                                random_state=random_state.randint(1000, 10000))
    # l1_ratios=(0,) and use_legacy_attributes=False: scikit-learn >= 1.8 asks for them explicitly (FutureWarning);
    # the model is the one Brainmarks' defaults give (L2, lbfgs)
    clf = Pipeline([("scaler", StandardScaler()), ("clf", LogisticRegressionCV(
        Cs=int(Cs), cv=cv, scoring=SCORING[cv_metric], max_iter=int(max_iter), l1_ratios=(0.0,),
        class_weight="balanced" if balanced_sampling else None, random_state=random_state,
        use_legacy_attributes=False))])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(train_x, train_y)
    for w in caught:  # anything but non-convergence is shown as it came
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    not_converged = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    out = {}
    for name, (x, y) in score.items():
        pred = clf.predict(x)
        out[name] = classification_metrics(y, pred)
        if bootstrap:
            out[name].update({f"{k}_std": v for k, v in bootstrap_std(y, pred, bootstrap, seed).items()})
    return Fit(float(np.ravel(clf[-1].C_)[0]), out, int(not_converged))


def logistic_protocol(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                      test_x: np.ndarray, test_y: np.ndarray, n_trials: int = DEFAULTS["n_trials"],
                      bootstrap: int = DEFAULTS["bootstrap"], **settings: Any) -> dict[str, Any]:
    """The whole protocol on one feature set (module docstring): train+validation merged, the fixed split,
    then ``n_trials`` randomised stratified splits of all samples with ``random_state=seed + trial``.

    Args:
        train_x, val_x, test_x: ``(N_s, D)`` features of each split (rows in the data set's order);
        train_y, val_y, test_y: ``(N_s,)`` labels. settings: ``seed``, ``Cs``, ``cv_folds``, ``max_iter``,
        ``cv_metric``, ``balanced_sampling`` of :func:`fit_logistic`.

    Returns:
        ``{"fixed": {"C", "train": metrics, "test": metrics (with bootstrap stds)}, "trials": {"n", "C",
        "C_std", "test": {metric: {"mean", "std", "values"}}}, "not_converged": fits}``.

    Raises:
        ValueError: as :func:`fit_logistic` (a class too small for a stratified split is named).
    """
    from sklearn.model_selection import train_test_split

    seed = int(settings.get("seed", DEFAULTS["seed"]))
    x = np.concatenate([train_x, val_x])
    y = np.concatenate([train_y, val_y])
    validation_size = len(val_x) / len(x)
    fixed = fit_logistic(x, y, {"train": (x, y), "test": (test_x, test_y)}, validation_size,
                         bootstrap=bootstrap, **settings)
    report: dict[str, Any] = {"fixed": {"C": fixed.C, **fixed.metrics}}
    not_converged = fixed.not_converged
    if n_trials:
        every_x, every_y = np.concatenate([x, test_x]), np.concatenate([y, test_y])
        per_trial, cs = [], []
        for trial in range(1, int(n_trials) + 1):
            tx, sx, ty, sy = train_test_split(every_x, every_y, train_size=len(x), stratify=every_y,
                                              random_state=seed + trial)
            fit = fit_logistic(tx, ty, {"test": (sx, sy)}, validation_size, **settings)
            per_trial.append(fit.metrics["test"])
            cs.append(fit.C)
            not_converged += fit.not_converged
        ddof = 1 if len(per_trial) > 1 else 0  # pandas' std, as Brainmarks' summary table
        report["trials"] = {
            "n": len(per_trial), "C": float(np.mean(cs)), "C_std": float(np.std(cs, ddof=ddof)),
            "test": {k: {"mean": float(np.mean([t[k] for t in per_trial])),
                         "std": float(np.std([t[k] for t in per_trial], ddof=ddof)),
                         "values": [t[k] for t in per_trial]} for k in METRICS},
        }
    report["not_converged"] = int(not_converged)
    return report


# -- the data ------------------------------------------------------------------------------------------------
@dataclass
class LabelledSplits:
    """The samples of a labelled store: ``runs[split]`` (rows of the store, in order) and ``labels[split]``
    for ``split`` in ``train``, ``val``, ``test``; ``dropped``: samples left out for a missing target."""

    store: Any
    kind: str
    target: str
    runs: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    dropped: int
    split_source: str


def open_labelled(path: str | Path, target: str | None, atlas: Any = None, split: Mapping[str, Any] | None = None,
                  atlas_key: str = "logistic.atlas") -> LabelledSplits:
    """Open a labelled store and its three splits.

    A Brainmarks folder (``<name>.<space>.arrow``): its ``train``/``validation``/``test`` as given; an ROI
    HDF5 store: its subjects split as ``brainfm-data to-brainmarks`` splits them
    (:func:`brainfm.data.stores.brainmarks.subject_split_for`: ``split.seed`` 0, ``split.fractions``
    ``[0.8, 0.1, 0.1]`` or ``split.file``), runs in store order. ``atlas_key``: the key that sets ``atlas``
    (``logistic.atlas``, ``probe_heads.atlas``), named in the fixes of the store's messages.

    Raises:
        DataError: no store at ``path``, a store that is not ROI data, no per-run labels, a target with fewer
            than two classes among the training samples, an empty split, float targets that are not classes.
        ConfigError: no ``target``, or one the store does not hold (the available labels are named).
    """
    path = Path(path)
    kind = detect_kind(path)
    if kind not in ("roi", "brainmarks"):
        raise DataError(f"{path} is a {kind} store; protocol=logistic reads ROI time series: an ROI HDF5 store with "
                        "/labels/<name> or a Brainmarks <name>.<space>.arrow folder")
    store = open_store(kind, path, atlas=atlas, atlas_key=atlas_key) if kind == "roi" else open_store(kind, path)
    names = list(getattr(store, "run_label_names", []) or [])
    if not names:
        fix = ("add a per-run label array /labels/<name> (one value per run, e.g. sex) to the file" if kind == "roi"
               else "write the data set with its target columns (brainfm-data to-brainmarks <labelled store> <out>)")
        raise DataError(f"{path} has no per-run labels, so there is nothing to classify. Fix: {fix}")
    if not target:
        raise ConfigError(f"protocol=logistic needs target=<label>: the label to classify; {path} has "
                          f"{names}. Fix: target={names[0]}")
    if target not in names:
        raise ConfigError(f"target={target!r} is not a label of {path}; available: {names}. Fix: target={names[0]}")
    values = np.asarray(store.run_labels(target))
    if values.dtype.kind in "USO":
        values = values.astype(str)
        present = values != ""
    else:
        present = ~np.isnan(values.astype(np.float64)) if values.dtype.kind == "f" else np.ones(len(values), bool)
        if values.dtype.kind == "f" and present.any() and not np.all(values[present] == np.round(values[present])):
            raise DataError(f"target={target!r} of {path} holds non-integer numbers; the logistic protocol classifies. "
                            f"Fix: bin it into classes first (Brainmarks' age_q: quantile bins) and pick that label")
    if kind == "brainmarks":
        by_split = {k: np.asarray(v, dtype=np.int64) for k, v in store.split_runs().items()}
        source = "the data set's train / validation / test"
    else:
        cfg = dict(split or {})
        seed, fractions = int(cfg.get("seed", 0)), list(cfg.get("fractions") or (0.8, 0.1, 0.1))
        subjects = subject_split_for(store.subject_ids, seed, fractions, cfg.get("file"))
        split_of = {s: k for k, ss in subjects.items() for s in ss}
        by_split = {k: np.array([r for r, s in enumerate(store.subject_ids) if split_of.get(s) == k], dtype=np.int64)
                    for k in ("train", "val", "test")}
        source = (f"split file {cfg['file']}" if cfg.get("file") else
                  f"subjects split as to-brainmarks splits them (seed {seed}, fractions {fractions})")
    runs = {k: r[present[r]] for k, r in by_split.items()}
    dropped = int(sum(len(by_split[k]) - len(runs[k]) for k in runs))
    empty = [k for k, r in runs.items() if not len(r)]
    if empty:
        raise DataError(f"{path}: split(s) {empty} hold no sample with a {target!r} value ({source}); the protocol "
                        "needs train, validation and test samples")
    labels = {k: values[r] for k, r in runs.items()}
    every = np.unique(np.concatenate(list(labels.values())))
    lacking = {k: sorted(map(str, set(every) - set(v))) for k, v in labels.items() if len(np.unique(v)) < len(every)}
    if lacking:
        log.warning("%s: split(s) lack class(es) of target %r: %s. brainfm scores the labels as they are; Brainmarks "
                    "(HFDataset) numbers the classes of each split separately, so there its ids of such a split shift "
                    "and its numbers differ from these", path, target, lacking)
    classes = np.unique(np.concatenate([labels["train"], labels["val"]]))
    if len(classes) < 2:
        raise DataError(f"target={target!r} of {path} has one class ({classes.tolist()}) among the training and "
                        f"validation samples; there is nothing to classify. Fix: choose another target of {names}")
    return LabelledSplits(store, kind, target, runs, labels, dropped, source)


def fc_sample_features(store, runs: Sequence[int], length: int | None = None) -> np.ndarray:
    """The FC baseline's embedding of each sample: Pearson correlations of its ROIs over its TRs, upper
    triangle (:func:`~brainfm.eval.fingerprinting.fc_features`; Brainmarks' ``Connectome``), ``(N, R (R-1)/2)``
    float32. ``length``: the first ``length`` TRs (None: the whole sample, as Brainmarks)."""
    out = []
    for run in runs:
        n = int(store.lengths[int(run)])
        x = store.read(int(run), 0, n if length is None else min(n, int(length)))
        out.append(fc_features(x[None])[0])
    return np.stack(out)


def checkpoint_sample_features(task, ckpt: dict, store, runs: Sequence[int], *, window_length: int | None,
                               representation: str, batch_size: int, trainer, shard_dir: Path,
                               pool_tokens: bool = True, setting: str = "logistic") -> np.ndarray | None:
    """A checkpoint's embedding of each sample: the first ``window_length`` TRs (the checkpoint's window by
    default), normalized as the checkpoint was trained (:func:`brainfm.runs.normalizer_for`) and
    resampled to its TR when the model needs its TR (not ``any_tr``), embedded on the configured trainer
    (:func:`brainfm.eval.inference.run_inference`). ``representation``: ``cls`` (the task's :meth:`embed`, ``(N, D)``)
    or ``patch`` (the mean of its :meth:`tokens`; with ``pool_tokens=False`` the tokens themselves, ``(N, L, D)``,
    as ``protocol=probe`` trains on them). ``setting``: the config section named in errors (``logistic``,
    ``probe_heads``). None on ranks other than the global rank 0.

    Raises:
        CheckpointError: data with another ROI count/order than the checkpoint's, a volume checkpoint.
        DataError: a sample shorter than the window (the shortest named, with the fix).
    """
    meta = ckpt["hyper_parameters"].get("data_meta") or {}
    where = f"checkpoint {ckpt['_path']}"
    if meta.get("shape") is not None or "volume" in getattr(task.model, "input_keys", ()):
        raise CheckpointError(f"{where} is a volume model; protocol=logistic embeds ROI time series (ROI families)")
    trained_tr = meta.get("tr") if isinstance(meta.get("tr"), (int, float)) else None
    if not task.model.any_tr and trained_tr is not None and store.tr is not None and abs(store.tr - trained_tr) > 1e-3:
        log.info("%s: resampled from TR %g s to the checkpoint's %g s (the model needs its training TR)",
                 store.location, float(store.tr), float(trained_tr))
        store = ResampledStore(store, float(trained_tr))
    check_compatible(meta, store, where=where, any_tr=bool(task.model.any_tr))
    length = int(window_length or meta.get("window_length") or 0)
    if length < 2:
        raise CheckpointError(f"{where} records no window length; pass {setting}.window_length=<TRs>")
    lengths = np.asarray(store.lengths)[np.asarray(runs, dtype=np.int64)]
    if lengths.min() < length:
        i = int(np.argmin(lengths))
        raise DataError(f"{store.describe_run(int(runs[i])) if hasattr(store, 'describe_run') else f'run {runs[i]}'} of "
                        f"{store.location} has {int(lengths[i])} TRs, fewer than the window of {length} TRs the "
                        f"sample embedding takes. Fix: {setting}.window_length={int(lengths.min())} (every sample's first "
                        "TRs; the model must take windows that short)")
    if representation not in REPRESENTATIONS:
        raise ConfigError(f"{setting}.representation={representation!r} must be one of {list(REPRESENTATIONS)}")
    dataset = ROIWindowDataset(store, normalizer_for(ckpt, store), [(int(r), 0, length) for r in runs], length, length)
    token_shape: list[tuple[int, int]] = []  # (L, D) of the unpooled tokens (the shards hold flat rows)
    if representation == "cls":
        fn = lambda t, b: t.embed(b)  # noqa: E731
    else:
        def fn(t, b):
            tokens = t.tokens(b)
            if tokens is None:
                raise ConfigError(f"{type(t).__name__} (checkpoint {ckpt['_path']}) has no tokens (Brainmarks' patch); "
                                  f"use {setting}.representation=cls")
            if pool_tokens:
                return tokens.float().mean(dim=1)
            token_shape[:] = [tuple(tokens.shape[1:])]
            return tokens.float().reshape(len(tokens), -1)
    shards = run_inference(task, fn, [Group("logistic", dataset, int(batch_size))], shard_dir, trainer)
    if shards is None:
        return None
    position = {int(r): i for i, r in enumerate(runs)}
    out: np.ndarray | None = None
    try:
        for indices, values in shards.chunks(0):
            if out is None:
                out = np.zeros((len(runs), values.shape[1]), dtype=np.float32)
            for i, v in zip(indices.tolist(), values):
                out[position[int(dataset.index.window(i)[0])]] = v
    finally:
        shards.close()
    if out is not None and not pool_tokens and representation == "patch":
        out = out.reshape(len(out), *token_shape[0])
    return out


# -- the protocol ---------------------------------------------------------------------------------------------
def load_for_labelled(ckpt_path: str | Path | None, data_path: str | Path | None, atlas: Any
                      ) -> tuple[dict | None, Any, str | Path | None, Any]:
    """The checkpoint of a labelled protocol (logistic, probe) and the data it defaults to.

    Returns:
        ``(ckpt, task, data_path, atlas)``: the loaded checkpoint and its task (both None when ``ckpt_path`` is None,
        the FC baseline alone), ``data_path`` or else the checkpoint's training data, ``atlas`` or else the
        checkpoint's.

    Raises:
        CheckpointError: as :func:`brainfm.runs.load_checkpoint`.
    """
    if ckpt_path is None:
        return None, None, data_path, atlas

    ckpt = load_checkpoint(find_checkpoint(ckpt_path))
    task = build_task_from_checkpoint(ckpt)
    meta = ckpt["hyper_parameters"].get("data_meta") or {}
    return ckpt, task, data_path or meta.get("path"), atlas if atlas is not None else meta.get("atlas")


def labelled_report(protocol: str, ckpt: dict | None, data: LabelledSplits, target: str | None) -> dict:
    """The head of a labelled protocol's report: ``protocol``, ``checkpoint``, ``global_step`` and ``data`` (the
    store, the target, the split and the class counts of each part)."""
    store = data.store
    counts = {k: {str(c): int(n) for c, n in zip(*np.unique(v, return_counts=True))} for k, v in data.labels.items()}
    return {
        "protocol": protocol,
        "checkpoint": None if ckpt is None else ckpt["_path"],
        "global_step": None if ckpt is None else int(ckpt.get("global_step", -1)),
        "data": {"path": str(store.location), "kind": data.kind, "atlas": getattr(store, "atlas", None),
                 "tr": store.tr, "n_rois": int(store.n_rois), "target": target, "split": data.split_source,
                 "samples": {k: int(len(v)) for k, v in data.runs.items()}, "classes": counts,
                 "dropped_missing_target": data.dropped},
    }


def report_window_length(ckpt: dict | None, window_length: int | None) -> int | None:
    """The window a checkpoint's sample embedding took (``window_length``, else the checkpoint's); None without one."""
    if ckpt is None:
        return None
    return int(window_length or (ckpt["hyper_parameters"].get("data_meta") or {}).get("window_length") or 0)


def run_logistic(ckpt_path: str | Path | None, data_path: str | Path | None, target: str | None, *,
                 atlas: Any = None, split: Mapping[str, Any] | None = None, window_length: int | None = None,
                 fc_length: int | None = None, representation: str = "cls", batch_size: int = 64, trainer=None,
                 shard_dir: str | Path | None = None, **settings: Any) -> dict | None:
    """Brainmarks' logistic protocol (module docstring) on a checkpoint (``ckpt_path``; None: the FC baseline
    alone, ``model=fc``) and the FC baseline, on the labelled store ``data_path`` (default: the checkpoint's
    training data).

    Args:
        settings: ``seed``, ``Cs``, ``cv_folds``, ``max_iter``, ``cv_metric``, ``balanced_sampling``,
            ``n_trials``, ``bootstrap`` (:data:`DEFAULTS`: Brainmarks').

    Returns:
        A JSON-ready report on the global rank 0 (``results``: ``{"model"|"fc": logistic_protocol(...)}``,
        the FC row last), None on the other ranks.

    Raises:
        ConfigError: neither a checkpoint nor ``data_path``; bad settings; as :func:`open_labelled`.
        DataError / CheckpointError: as :func:`open_labelled` and :func:`checkpoint_sample_features`.
    """
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown logistic setting(s) {unknown}; available: {sorted(DEFAULTS)}")
    settings = {**DEFAULTS, **{k: v for k, v in settings.items() if v is not None}}
    ckpt, task, data_path, atlas = load_for_labelled(ckpt_path, data_path, atlas)
    if not data_path:
        raise ConfigError("protocol=logistic model=fc needs the labelled data: data_path=<ROI store .h5 with /labels, "
                          "or a Brainmarks <name>.<space>.arrow folder>")
    data = open_labelled(data_path, target, atlas=atlas, split=split)
    store = data.store
    parts = ("train", "val", "test")
    features: dict[str, dict[str, np.ndarray]] = {}
    if task is not None:
        order = np.concatenate([data.runs[k] for k in parts])
        feats = checkpoint_sample_features(
            task, ckpt, store, order, window_length=window_length, representation=representation,
            batch_size=batch_size, trainer=trainer,
            shard_dir=Path(shard_dir) if shard_dir else Path(ckpt["_path"]).parent / ".inference-logistic")
        if feats is None:
            return None
        bounds = np.cumsum([0, *(len(data.runs[k]) for k in parts)])
        features["model"] = {k: feats[bounds[i]:bounds[i + 1]] for i, k in enumerate(parts)}
    features["fc"] = {k: fc_sample_features(store, data.runs[k], fc_length) for k in parts}
    proto = {k: settings[k] for k in ("seed", "Cs", "cv_folds", "max_iter", "cv_metric", "balanced_sampling")}
    results = {}
    for name, f in features.items():
        log.info("%s (%d features): logistic regression, C by %d-fold CV, on the fixed split and %d randomised trials",
                 LABELS.get(name, name), f["train"].shape[1], int(settings["cv_folds"]), int(settings["n_trials"]))
        start = time.perf_counter()
        try:
            results[name] = logistic_protocol(f["train"], data.labels["train"], f["val"], data.labels["val"],
                                               f["test"], data.labels["test"], n_trials=int(settings["n_trials"]),
                                               bootstrap=int(settings["bootstrap"]), **proto)
        except ValueError as exc:  # scikit-learn: a class too small to stratify, ...
            counts = {str(c): int(n) for c, n in zip(*np.unique(np.concatenate(list(data.labels.values())),
                                                               return_counts=True))}
            raise DataError(f"the logistic protocol cannot run on target={target!r} of {data_path} (class counts "
                            f"{counts}): {exc}. Fix: a target whose classes have at least 2 samples in every split "
                            "(stratified splits), or logistic.n_trials=0 to skip the randomised trials") from exc
        results[name]["dim"] = int(f["train"].shape[1])
        log.info("%s: test balanced accuracy %.3f (%.1f s)", LABELS.get(name, name),
                 results[name]["fixed"]["test"]["balanced_acc"], time.perf_counter() - start)
    return {
        **labelled_report("logistic", ckpt, data, target),
        "settings": {**settings, "representation": representation,
                     "window_length": report_window_length(ckpt, window_length),
                     "fc_length": fc_length,
                     "classifier": "StandardScaler + LogisticRegressionCV (L2, lbfgs), C by StratifiedShuffleSplit",
                     "fc": "Pearson connectome of the sample, upper triangle (Brainmarks' Connectome, cls)"},
        "results": results,
    }


LABELS = {"model": "model", "fc": "FC"}


def print_table(report: dict) -> None:
    """Rows: the model (when a checkpoint was given) and FC; columns: accuracy, balanced accuracy and macro-F1
    on the fixed split's test samples (± bootstrap std), then their mean ± std over the randomised trials."""
    from rich.console import Console
    from rich.table import Table

    d = report["data"]
    s = report["settings"]
    n_trials = next(iter(report["results"].values())).get("trials", {}).get("n", 0)
    print(f"Brainmarks logistic protocol: target {d['target']!r} of {d['path']} ({d['samples']['train']} train + "
          f"{d['samples']['val']} validation -> {d['samples']['test']} test samples; seed {s['seed']}"
          + (f"; {n_trials} randomised splits" if n_trials else "") + ")")
    run = Path(report["checkpoint"]).parent.parent if report.get("checkpoint") else None
    name = f"{run.parent.name}/{run.name}" if run is not None else None  # <experiment>/<run name>
    labels = {k: f"{name} ({s['representation']})" if k == "model" and name else LABELS.get(k, k)
              for k in report["results"]}
    parts = [("fixed split, test samples: score ± bootstrap std", lambda r, m: (r["fixed"]["test"][m],
                                                                                r["fixed"]["test"].get(m + "_std")))]
    if n_trials:
        parts.append((f"{n_trials} randomised splits, test samples: mean ± std",
                      lambda r, m: (r["trials"]["test"][m]["mean"], r["trials"]["test"][m]["std"])))
    for title, cell in parts:  # one table each: readable at 80 columns
        print(title)
        table = Table()
        table.add_column("model")
        for column in ("acc", "balanced acc", "macro-F1"):
            table.add_column(column, justify="right")
        for key, r in report["results"].items():
            values = [cell(r, m) for m in METRICS]
            table.add_row(labels[key], *(f"{v:.3f}" + ("" if sd is None else f" ± {sd:.3f}") for v, sd in values))
        Console().print(table)
    stopped = {k: r["not_converged"] for k, r in report["results"].items() if r.get("not_converged")}
    if stopped:
        print(f"note: {', '.join(f'{LABELS.get(k, k)}: {v}' for k, v in stopped.items())} logistic-regression fits "
              f"stopped at max_iter={s['max_iter']} before converging (scikit-learn's ConvergenceWarning; Brainmarks "
              "keeps them too; usually the largest C values, the weakest regularisation); logistic.max_iter=<more> lets them finish")


__all__ = ["DEFAULTS", "LabelledSplits", "bootstrap_std", "checkpoint_sample_features", "classification_metrics",
           "fc_sample_features", "fit_logistic", "logistic_protocol", "open_labelled", "print_table", "run_logistic"]

