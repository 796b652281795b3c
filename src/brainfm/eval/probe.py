"""Linear probes and few-subject curves on frozen embeddings.

- :func:`sklearn_probe`: standardisation + logistic regression (classification) or ridge
  (regression) with the regularisation chosen by inner cross-validation, evaluated with
  subject-grouped K-fold cross-validation (no subject in both the training and the test fold).
- :func:`fit_predict_sklearn`: the same model on a fixed train/test partition (e.g. the 7-way
  subject probe of the demo data, where the label *is* the subject, so folds are split in time).
- :class:`RowSpace`: the exact reduction that makes the logistic probe fast when there are far fewer
  windows than features (FC: 4,371 edges of 94 ROIs against a few hundred windows).
- :func:`torch_probe`: BatchNorm without affine parameters + a linear layer trained with AdamW
  (the linear-probing protocol of Brain-JEPA / MAE: robust to the small spread of pooled features).
- :func:`few_subject_curve`: the probe metric against the number of training subjects (Thomas, Ré
  & Poldrack 2022, Fig. 4: downstream performance with few training individuals), repeated over
  random draws of the training subjects.

Features are ``(N, D)`` float arrays (one row per window/clip), labels ``(N,)``, groups ``(N,)``
subject ids. Metrics: accuracy and balanced accuracy (+ AUROC when binary) for classification,
R², Pearson r, MAE and MSE for regression.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

KINDS = ("classification", "regression")


def _check(features: np.ndarray, labels: np.ndarray, groups: np.ndarray | None, kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} must be one of {KINDS}")
    if features.ndim != 2 or len(features) != len(labels) or (groups is not None and len(groups) != len(labels)):
        raise ValueError(f"features must be (N, D) with N labels/groups; got {features.shape}, {len(labels)} labels, "
                         f"{None if groups is None else len(groups)} groups")
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN/inf; check the embeddings")


def metrics(kind: str, y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray | None = None) -> dict[str, float]:
    """Classification: ``acc``, ``balanced_acc`` (+ ``auroc`` for two classes with scores);
    regression: ``r2``, ``pearson_r``, ``mae``, ``mse``."""
    from sklearn import metrics as skm

    if kind == "classification":
        out = {"acc": float(skm.accuracy_score(y_true, y_pred)),
               "balanced_acc": float(skm.balanced_accuracy_score(y_true, y_pred))}
        if proba is not None and proba.ndim == 2 and proba.shape[1] == 2 and len(np.unique(y_true)) == 2:
            out["auroc"] = float(skm.roc_auc_score(y_true, proba[:, 1]))
        return out
    r = float(np.corrcoef(y_true, y_pred)[0, 1]) if np.std(y_pred) > 0 and np.std(y_true) > 0 else 0.0
    return {"r2": float(skm.r2_score(y_true, y_pred)), "pearson_r": r,
            "mae": float(skm.mean_absolute_error(y_true, y_pred)), "mse": float(skm.mean_squared_error(y_true, y_pred))}


class RowSpace(TransformerMixin, BaseEstimator):
    """Features ``(N, D)`` -> their coordinates ``(N, N)`` in an orthonormal basis of the span of the
    training rows, when ``N <= max_fraction * D``; otherwise the features unchanged.

    Exact for any L2-penalised linear model with an unpenalised intercept (logistic regression, ridge):
    at the optimum of ``sum_i loss(W x_i + b, y_i) + ||W||^2 / (2 C)`` the gradient in ``W`` vanishes, so
    ``W = -C sum_i g_i x_i^T``: every row of ``W`` lies in the span of the training rows ``x_i``. With ``Q``
    ``(D, N)`` orthonormal columns spanning them (``X^T = Q R``, a reduced QR; a rank-deficient ``X``, e.g.
    centred, is spanned all the same), ``W = A Q^T`` gives ``W x = A (Q^T x)`` for every ``x`` (training,
    validation or test rows) and ``||W|| = ||A||``: the problem on ``X Q`` has the same objective, the same
    optimum and the same predictions, on ``N`` instead of ``D`` coordinates. The cross-validation folds of
    a ``LogisticRegressionCV`` after it train on subsets of the rows, whose span lies inside the same one,
    so every C of the search is the same problem too.

    What can differ is the iterative solver's stopping point: L-BFGS stops when the largest gradient component
    is below ``tol`` (1e-4), and components are other numbers in other coordinates. Converged (tol 1e-10), the
    two give the same C and probabilities to 1e-8 (tested). At the default tolerance: on the demo's windows the
    same C and predictions for all 9 probes (3 methods x 3 window lengths; probabilities within 0.14, at C = 10),
    and on synthetic subjects with an informative signal (accuracy >= 0.87) the same C and predictions; on a
    weak one (accuracy near 0.6) the C chosen by CV accuracy hangs on near-ties that either stopping point can
    tip (3 seeds: the reference matched its own converged answer in 1, the fast probe in 2).

    scikit-learn's ``PCA`` keeps ``min(N, D)`` directions of the centred rows, one of them outside the span
    (the centred rows have rank ``N - 1``) and costs an SVD: a reduced QR (half the cost, no rank
    decision) is all the argument needs, hence this small transformer.

    ``max_fraction``: reduce only where it pays. Measured with one thread, 4,371 features, 50 classes: 1,000
    rows 2.1 s (QR 0.8 s + fit 1.3 s) against 4.4 s; 2,500 rows 15.8 s (QR 5.7 s) against 10.4 s.
    """

    def __init__(self, max_fraction: float = 0.25):
        self.max_fraction = max_fraction

    def fit(self, X, y=None):
        X = np.asarray(X)
        n, d = X.shape
        self.n_features_in_ = d
        self.basis_ = (np.linalg.qr(X.T.astype(np.float64), mode="reduced")[0]
                       if 0 < n <= self.max_fraction * d else None)
        return self

    def transform(self, X):
        X = np.asarray(X)
        if self.basis_ is None:
            return X
        # float32 features stay float32 (the precision the solver worked in without the reduction)
        return (X.astype(np.float64) @ self.basis_).astype(X.dtype if X.dtype == np.float32 else np.float64)


def _model(kind: str, seed: int, reduce: bool = True):
    """Standardisation, then (``reduce``, classification) :class:`RowSpace`, then logistic regression with C
    chosen by 3-fold CV; or ridge with alpha chosen by leave-one-out (regression; RidgeCV is already fast
    when N << D)."""
    from sklearn.linear_model import LogisticRegressionCV, RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    grid = np.logspace(-4, 4, 9)
    if kind == "classification":
        # L2 (l1_ratios=(0,)), C chosen by accuracy, scikit-learn >= 1.8's attribute layout: the arguments its
        # FutureWarnings ask for, given explicitly (the same model as the defaults of scikit-learn < 1.10)
        clf = LogisticRegressionCV(Cs=grid, cv=3, max_iter=2000, random_state=seed, l1_ratios=(0.0,),
                                   scoring="accuracy", use_legacy_attributes=False)
        return make_pipeline(StandardScaler(), RowSpace(), clf) if reduce else make_pipeline(StandardScaler(), clf)
    return make_pipeline(StandardScaler(), RidgeCV(alphas=grid))


#: multiply-adds of one ``(N, D') x (D', classes)`` product (D' after :class:`RowSpace`) up to which a classifier is
#: fit with one BLAS thread. L-BFGS on a probe this small calls BLAS on short vectors and small matrices, where
#: threads synchronise more than they compute; on cores shared with other work (torch's own thread pool in the
#: same process, other jobs) that turns into waiting: the demo's FC probe (273 x 4,371, 7 subjects) took 42-47 s
#: with numpy's default 2 BLAS threads on 2 loaded cores, 1.1-1.9 s with one (0.22-0.28 s after RowSpace).
_ONE_THREAD_MAX = 2**26


def _blas_threads(n: int, d: int, n_classes: int):
    """One BLAS thread (threadpoolctl, scikit-learn's own dependency) for a small classification fit,
    else the library's default."""
    from threadpoolctl import threadpool_limits

    reduced = n if n <= RowSpace().max_fraction * d else d
    small = n * reduced * max(n_classes, 1) <= _ONE_THREAD_MAX
    return threadpool_limits(1, user_api="blas") if small else nullcontext()


def fit_predict_sklearn(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                        kind: str = "classification", seed: int = 0) -> dict[str, float]:
    """Fit the probe on one partition, score it on the other.

    Raises:
        ValueError: bad shapes, NaN features or an unknown ``kind``.
    """
    _check(train_x, train_y, None, kind)
    _check(test_x, test_y, None, kind)
    if kind != "classification":
        model = _model(kind, seed).fit(train_x, train_y)
        return metrics(kind, test_y, model.predict(test_x))
    with _blas_threads(*train_x.shape, len(np.unique(train_y))):
        model = _model(kind, seed).fit(train_x, train_y)
        proba = model.predict_proba(test_x)
        pred = model.predict(test_x)
    return metrics(kind, test_y, pred, proba)


def sklearn_probe(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, kind: str = "classification",
                  n_splits: int = 5, seed: int = 0) -> dict[str, float]:
    """Subject-grouped K-fold cross-validated linear probe; metrics pooled over the test folds.

    Raises:
        ValueError: fewer subjects than folds, bad shapes or NaN features.
    """
    from sklearn.model_selection import GroupKFold

    _check(features, labels, groups, kind)
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise ValueError(f"{n_groups} subjects cannot make {n_splits} subject-grouped folds; lower n_splits")
    pred = np.empty(len(labels), dtype=np.asarray(labels).dtype if kind == "classification" else float)
    classes = np.unique(labels) if kind == "classification" else None
    proba = np.zeros((len(labels), len(classes))) if classes is not None else None
    for train, test in GroupKFold(n_splits=n_splits).split(features, labels, groups):
        threads = (_blas_threads(len(train), features.shape[1], len(classes)) if kind == "classification"
                   else nullcontext())
        with threads:
            model = _model(kind, seed).fit(features[train], labels[train])
            pred[test] = model.predict(features[test])
            if proba is not None:
                cols = np.searchsorted(classes, model.classes_)
                proba[np.ix_(test, cols)] = model.predict_proba(features[test])
    return metrics(kind, labels, pred, proba)


def torch_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                kind: str = "classification", epochs: int = 200, lr: float = 1e-2, weight_decay: float = 1e-4,
                seed: int = 0) -> dict[str, float]:
    """BatchNorm1d(affine=False) + Linear, full-batch AdamW for ``epochs`` steps (cross-entropy or
    MSE on standardised targets); scored on the test partition."""
    import torch
    from torch import nn

    _check(train_x, train_y, None, kind)
    _check(test_x, test_y, None, kind)
    g = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(train_x, dtype=torch.float32)
    if kind == "classification":
        classes, y_idx = np.unique(train_y, return_inverse=True)
        y = torch.as_tensor(y_idx)
        out = len(classes)
    else:
        mu, sd = float(np.mean(train_y)), float(np.std(train_y) or 1.0)
        y = torch.as_tensor((np.asarray(train_y, dtype=float) - mu) / sd, dtype=torch.float32)
        out = 1
    head = nn.Sequential(nn.BatchNorm1d(x.shape[1], affine=False), nn.Linear(x.shape[1], out))
    with torch.no_grad():
        head[1].weight.normal_(0, 0.01, generator=g)
        head[1].bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(int(epochs)):
        opt.zero_grad()
        z = head(x)
        loss = nn.functional.cross_entropy(z, y) if kind == "classification" else nn.functional.mse_loss(z.squeeze(-1), y)
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        z = head(torch.as_tensor(test_x, dtype=torch.float32))
    if kind == "classification":
        proba = z.softmax(-1).numpy()
        return metrics(kind, test_y, classes[proba.argmax(1)], proba)
    return metrics(kind, test_y, z.squeeze(-1).numpy() * sd + mu)


def few_subject_curve(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, n_train_subjects: Sequence[int],
                      kind: str = "classification", repeats: int = 5, test_fraction: float = 0.3, seed: int = 0,
                      metric: str | None = None) -> list[dict]:
    """Probe metric vs the number of training subjects.

    A fixed ``test_fraction`` of the subjects is held out (seeded); for each ``n`` in
    ``n_train_subjects`` and each repeat, ``n`` subjects are drawn from the rest, the probe is fit
    on their windows and scored on the held-out subjects. Draws with a single class are redrawn
    (up to 20 times) and skipped if that fails.

    Returns:
        one dict per ``n``: ``{"n_subjects", "mean", "std", "values", "metric"}`` (of ``metric``), plus
        ``"metrics"``: ``{name: {"mean", "std", "values"}}`` of every probe metric (:func:`metrics`), and
        ``"n_test_subjects"``. The held-out subjects depend on ``groups`` and ``seed`` only, so two feature
        sets of the same windows (a pretrained model and its random initialisation) share them.

    Raises:
        ValueError: ``n`` larger than the available training subjects.
    """
    _check(features, labels, groups, kind)
    metric = metric or ("balanced_acc" if kind == "classification" else "r2")
    rng = np.random.default_rng(seed)
    subjects = np.unique(groups)
    rng.shuffle(subjects)
    n_test = max(1, int(round(test_fraction * len(subjects))))
    test_subj, pool = subjects[:n_test], subjects[n_test:]
    test = np.isin(groups, test_subj)
    out = []
    for n in n_train_subjects:
        if n > len(pool):
            raise ValueError(f"n_train_subjects={n} but only {len(pool)} subjects are left after holding out {n_test}")
        scores = []
        for _ in range(int(repeats)):
            for _attempt in range(20):
                chosen = rng.choice(pool, size=int(n), replace=False)
                train = np.isin(groups, chosen)
                if kind == "regression" or len(np.unique(labels[train])) > 1:
                    break
            else:
                continue
            scores.append(fit_predict_sklearn(features[train], labels[train], features[test], labels[test], kind, seed))
        summary = {name: {"values": [s[name] for s in scores if name in s]} for name in (scores[0] if scores else {})}
        for v in summary.values():
            v["mean"], v["std"] = float(np.mean(v["values"])), float(np.std(v["values"]))
        values = summary.get(metric, {}).get("values", [])
        out.append({"n_subjects": int(n), "metric": metric, "values": values,
                    "mean": float(np.mean(values)) if values else float("nan"),
                    "std": float(np.std(values)) if values else float("nan"),
                    "metrics": summary, "n_test_subjects": int(n_test)})
    return out
