"""Validation metrics computed once over every rank's windows.

Validation windows are partitioned over the ranks (:class:`~brainfm.data.windows.WindowBatchSampler`),
so a subject's windows may sit on several ranks. :class:`SubjectOutputs` collects ``(subject, output,
label)`` rows per rank and gathers them at the end of the epoch; :func:`subject_metrics` averages each
subject's outputs (SwiFT's and R2T-Net's clip -> subject aggregation) and computes the metrics with
torchmetrics, so 1 rank and N ranks report the same numbers. :class:`MeanOfBatches` is the exact
global mean of per-batch losses (weighted by batch size) for ``val/*`` losses. :class:`WindowRows`
gathers per-window tensors of every rank in window order, for losses that compare windows with each
other (NT-Xent's negatives): computed over fixed groups of that order, they do not depend on the
number of ranks.
"""

from __future__ import annotations

import torch

from brainfm.tasks.distributed import gather, world


class SubjectOutputs:
    """Per-window outputs of one validation epoch, gathered over the ranks.

    ``add(subjects (B,), outputs (B, k), labels (B,) or (B, m))``; :meth:`gathered` returns the rows of
    every rank (a collective: every rank calls it once per epoch, also a rank without rows).
    """

    def __init__(self) -> None:
        self.subjects: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def add(self, subjects: torch.Tensor, outputs: torch.Tensor, labels: torch.Tensor) -> None:
        self.subjects.append(subjects.detach().long().reshape(-1))
        self.outputs.append(outputs.detach().float().reshape(len(subjects), -1))
        self.labels.append(labels.detach().float().reshape(len(subjects), -1))

    def __len__(self) -> int:
        return int(sum(len(s) for s in self.subjects))

    def gathered(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(subjects (N,), outputs (N, k), labels (N, m))`` of every rank, or None when no rank has rows."""
        width = torch.tensor([self.outputs[0].shape[1] if self.outputs else 0,
                              self.labels[0].shape[1] if self.labels else 0], device=device)
        if world()[1] > 1:  # a rank without rows learns the widths from the others
            width = gather(width[None], grad=False).max(0).values
        if int(width[0]) == 0:
            return None
        k, m = int(width[0]), int(width[1])
        cat = (lambda xs, shape: torch.cat(xs).to(device) if xs else torch.zeros(shape, device=device))
        subjects = cat(self.subjects, (0,)).long()
        outputs, labels = cat(self.outputs, (0, k)), cat(self.labels, (0, m))
        return gather(subjects, grad=False), gather(outputs, grad=False), gather(labels, grad=False)

    def clear(self) -> None:
        self.subjects.clear()
        self.outputs.clear()
        self.labels.clear()


def per_subject_means(subjects: torch.Tensor, outputs: torch.Tensor, labels: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(subject ids (S,), mean output (S, k), label (S, m))`` in subject order; a subject's label is that
    of its first window."""
    ids, inverse = torch.unique(subjects, return_inverse=True)
    sums = torch.zeros(len(ids), outputs.shape[1], dtype=torch.float64, device=outputs.device)
    sums.index_add_(0, inverse, outputs.double())
    counts = torch.bincount(inverse, minlength=len(ids)).double()[:, None]
    first = torch.full((len(ids),), len(subjects), dtype=torch.long, device=subjects.device)
    first = first.scatter_reduce(0, inverse, torch.arange(len(subjects), device=subjects.device), reduce="amin")
    return ids, (sums / counts).float(), labels[first]


def subject_metrics(outputs: torch.Tensor, labels: torch.Tensor, kind: str, num_classes: int = 2) -> dict[str, float]:
    """Metrics of each subject's mean output (one row per subject).

    Args:
        outputs: ``(S, k)``: predictions in label units (regression, ``k`` targets), the
            positive-class probability (binary, ``k = 1``) or class probabilities (multiclass).
        labels: ``(S, m)`` labels (``m = k`` targets, or one class index).
        kind: ``regression`` | ``binary`` | ``multiclass``.

    Returns:
        Regression: ``mse``, ``mae`` (over every target), and with more than two subjects
        ``pearson_r`` (mean over targets) and ``r2``. Classification: ``acc``, ``balanced_acc``
        (mean recall over the classes) and, when more than one class occurs, ``auroc``.
    """
    from torchmetrics.functional import (
        accuracy,
        auroc,
        mean_absolute_error,
        mean_squared_error,
        pearson_corrcoef,
        r2_score,
    )

    outputs, labels = outputs.float().cpu(), labels.float().cpu()
    if kind == "regression":
        metrics = {"mse": mean_squared_error(outputs, labels), "mae": mean_absolute_error(outputs, labels)}
        if len(labels) > 2:
            r = [pearson_corrcoef(outputs[:, j], labels[:, j]) for j in range(labels.shape[1])]
            metrics["pearson_r"] = torch.stack(r).nanmean()
            metrics["r2"] = r2_score(outputs.squeeze(-1), labels.squeeze(-1)) if labels.shape[1] == 1 else \
                r2_score(outputs, labels, multioutput="uniform_average")
        return {k: float(v) for k, v in metrics.items()}
    y = labels.long().reshape(-1)
    if kind == "binary":
        prob, args = outputs.reshape(-1), {"task": "binary"}
    else:
        prob, args = outputs, {"task": "multiclass", "num_classes": int(num_classes)}
    metrics = {"acc": accuracy(prob, y, **args)}
    if kind == "binary":
        pred = (prob > 0.5).long()
        metrics["balanced_acc"] = torch.stack([(pred[y == c] == c).float().mean() for c in (0, 1) if (y == c).any()]).mean()
    else:  # macro-averaged recall
        metrics["balanced_acc"] = accuracy(prob, y, average="macro", **args)
    if len(torch.unique(y)) > 1:
        metrics["auroc"] = auroc(prob, y, **args)
    return {k: float(v) for k, v in metrics.items()}


class MeanOfBatches:
    """The exact mean of per-batch values over all windows of all ranks (weighted by batch size).

    ``add(name, value, n)`` per batch; :meth:`compute` (a collective) returns ``{name: mean}``.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, name: str, value: torch.Tensor, n: int) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(value) * n
        self.counts[name] = self.counts.get(name, 0.0) + n

    def compute(self, device: torch.device) -> dict[str, float]:
        names = sorted(self.sums)
        if world()[1] > 1:
            import torch.distributed as dist

            every: list = [None] * world()[1]
            dist.all_gather_object(every, names)
            names = sorted({n for part in every for n in part})
            t = torch.tensor([[self.sums.get(n, 0.0), self.counts.get(n, 0.0)] for n in names] or [[0.0, 0.0]],
                             dtype=torch.float64, device=device)
            dist.all_reduce(t)
        else:
            t = torch.tensor([[self.sums[n], self.counts[n]] for n in names] or [[0.0, 0.0]], dtype=torch.float64)
        return {n: float(t[i, 0] / t[i, 1]) for i, n in enumerate(names) if t[i, 1] > 0}

    def clear(self) -> None:
        self.sums.clear()
        self.counts.clear()


class WindowRows:
    """Per-window tensors of one validation epoch, gathered over the ranks in window order.

    ``add(keys (B,), **rows)`` per batch, each row tensor ``(B, ...)`` (the same names and trailing
    shapes on every rank); :meth:`gathered` (a collective: every rank calls it once per epoch, also a
    rank without rows) returns ``(keys (N,), {name: (N, ...)})`` of every rank, sorted by key, each key
    once (with fewer windows than ranks every rank evaluates all of them). The key is the window's index
    in the validation set (``batch["window"]``), so the order, and any grouping of it, is the same
    whatever the number of ranks.
    """

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.rows: dict[str, list[torch.Tensor]] = {}

    def add(self, keys: torch.Tensor, **rows: torch.Tensor) -> None:
        self.keys.append(keys.detach().long().reshape(-1))
        for name, value in rows.items():
            self.rows.setdefault(name, []).append(value.detach())

    def __len__(self) -> int:
        return int(sum(len(k) for k in self.keys))

    def gathered(self, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """``(keys (N,), {name: (N, ...)})`` of every rank in key order, or None when no rank has rows."""
        names = sorted(self.rows)
        local = {n: torch.cat(self.rows[n]).to(device) for n in names}
        keys = torch.cat(self.keys).to(device) if self.keys else torch.zeros(0, dtype=torch.long, device=device)
        if world()[1] > 1:
            import torch.distributed as dist

            every: list = [None] * world()[1]  # a rank without rows learns the names, shapes and dtypes
            dist.all_gather_object(every, {n: (tuple(v.shape[1:]), v.dtype) for n, v in local.items()})
            spec = {n: s for part in every for n, s in part.items()}
            names = sorted(spec)
            local = {n: local.get(n, torch.zeros((0, *spec[n][0]), dtype=spec[n][1], device=device)) for n in names}
            keys = gather(keys, grad=False)
            width = {n: int(torch.Size(spec[n][0]).numel()) for n in names}  # gather() takes (n, ...) rows
            local = {n: gather(v.reshape(len(v), width[n]), grad=False).reshape(-1, *spec[n][0])
                     for n, v in local.items()}
        if len(keys) == 0:
            return None
        unique, inverse = torch.unique(keys, sorted=True, return_inverse=True)
        first = torch.full((len(unique),), len(keys), dtype=torch.long, device=keys.device)
        first = first.scatter_reduce(0, inverse, torch.arange(len(keys), device=keys.device), reduce="amin")
        return unique, {n: v[first] for n, v in local.items()}

    def clear(self) -> None:
        self.keys.clear()
        self.rows.clear()
