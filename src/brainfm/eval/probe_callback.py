"""Linear probing during pretraining (Brain-Semantoks' ``linear_probe.probe_at_epochs``): every N
epochs, or at listed epochs, the frozen task embeds windows of the training and validation splits
(:meth:`brainfm.tasks.base.BrainfmTask.embed`: for SimDINO the teacher's mean token ∥ CLS, the
reference's ``cls_avg`` probe features), brainfm's linear probe
(:func:`brainfm.eval.probe.fit_predict_sklearn`: standardisation + logistic regression or ridge,
regularisation by inner cross-validation) is fit on the training windows' subject label and scored on
the validation windows, and ``probe/<label>/<metric>`` is logged (classification: ``balanced_acc``,
``acc``; regression: ``r`` (Pearson), ``r2``, ``mae``).

Differences from the reference, on purpose: one fit per probe (the reference repeats it over 10
random splits and a learning-rate grid of a torch probe, and averages 8 test-time crops per
subject); brainfm's windows of the datamodule's own split are the samples (a subject contributes
several windows, grouped by subject only through the split); at most ``max_windows`` evenly spaced
windows per split are embedded, so the cost does not grow with the data set (60,000 runs).

Distributed: every rank embeds its share of the windows (``rank::world``); the embeddings are gathered
(:func:`brainfm.tasks.distributed.gather`), global rank 0 fits the probe and broadcasts the metrics,
and every rank logs the same numbers (loggers write on rank 0).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from brainfm.data.phenotypes import build_label_table
from brainfm.data.windows import collate_windows
from brainfm.errors import ConfigError
from brainfm.eval.probe import fit_predict_sklearn
from brainfm.tasks.distributed import gather

_log = logging.getLogger("brainfm")


class LinearProbeCallback(Callback):
    """``probe/<label>/<metric>`` of a linear probe on frozen embeddings, at chosen epochs.

    Args:
        label: the subject label: a key of ``labels.columns`` (or of ``data.labels.columns``), or the
            name of a per-run label ``/labels/<label>`` of the ROI HDF5 store (Brain-Semantoks files).
        every_n_epochs: probe after every N-th completed training epoch (None: only ``epochs``).
        epochs: completed-epoch counts to probe at; 0 is before training (the reference's
            ``probe_at_epochs: [0]``).
        kind: ``classification``, ``regression`` or ``auto`` (categorical labels classify, numeric
            floats regress; integer per-run labels classify).
        labels: a phenotype table (the ``data.labels`` schema, :mod:`brainfm.data.phenotypes`:
            ``file``, ``id_column``, ``columns``, ``categories``) read for this probe; None: the
            datamodule's ``data.labels``, else the store's ``/labels/<label>``.
        train_split, eval_split: the datamodule splits the probe is fit on and scored on.
        max_windows: at most this many windows per split (evenly spaced over the split's grid).
        batch_size: windows per embedding batch.
        seed: the probe's seed.

    Raises:
        ConfigError: (construction) neither ``every_n_epochs`` nor ``epochs``, a bad ``kind``; (first
            probe) a datamodule without ``dataset(split)``, a label found nowhere, a classification
            label with one class in the training windows.
    """

    def __init__(self, label: str, every_n_epochs: int | None = None, epochs: Sequence[int] | None = None,
                 kind: str = "auto", labels: dict | None = None, train_split: str = "train",
                 eval_split: str = "val", max_windows: int = 2048, batch_size: int = 64, seed: int = 0) -> None:
        if kind not in ("auto", "classification", "regression"):
            raise ConfigError(f"callbacks.probe.kind={kind!r} must be auto, classification or regression")
        if not every_n_epochs and not epochs:
            raise ConfigError("callbacks.probe needs every_n_epochs (N >= 1) or epochs ([0, 10, ...]); 0 is before training")
        if every_n_epochs is not None and int(every_n_epochs) < 0:
            raise ConfigError(f"callbacks.probe.every_n_epochs={every_n_epochs} must be >= 1 (or null)")
        self.label, self.kind = str(label), kind
        self.every_n_epochs = int(every_n_epochs or 0)
        self.epochs = {int(e) for e in (epochs or [])}
        self.labels_config = dict(labels) if labels else None
        self.train_split, self.eval_split = train_split, eval_split
        self.max_windows, self.batch_size, self.seed = int(max_windows), int(batch_size), int(seed)
        #: ``[(completed epochs, global step, metrics)]`` of every probe of this process
        self.history: list[tuple[int, int, dict[str, float]]] = []

    # -- when ---------------------------------------------------------------------------------------
    def due(self, completed_epochs: int) -> bool:
        """Whether to probe after ``completed_epochs`` training epochs."""
        if completed_epochs in self.epochs:
            return True
        return completed_epochs > 0 and self.every_n_epochs > 0 and completed_epochs % self.every_n_epochs == 0

    def on_train_start(self, trainer, pl_module) -> None:
        if 0 in self.epochs and trainer.current_epoch == 0 and trainer.global_step == 0:
            self.probe(trainer, pl_module, 0)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        done = int(trainer.current_epoch) + 1
        if self.due(done):
            self.probe(trainer, pl_module, done)

    # -- what ---------------------------------------------------------------------------------------
    def _label_values(self, datamodule) -> tuple[np.ndarray, str, str]:
        """``(values, by, kind)``: one value per subject index (``by="subject"``) or per store row
        (``by="run"``), and the probe kind."""
        table = None
        if self.labels_config is not None:
            table = build_label_table(self.labels_config, datamodule.store.subjects())
        elif getattr(datamodule, "labels", None) is not None and self.label in datamodule.labels.values:
            table = datamodule.labels
        if table is not None:
            if self.label not in table.values:
                raise ConfigError(f"callbacks.probe.label={self.label!r} is not a column key of callbacks.probe.labels "
                                  f"({sorted(table.values)})")
            v = table.values[self.label]
            kind = "classification" if v.dtype == torch.long else "regression"
            return v.numpy(), "subject", kind if self.kind == "auto" else self.kind
        store = datamodule.store
        names = getattr(store, "run_label_names", None)
        if names is None or self.label not in names:
            raise ConfigError(
                f"callbacks.probe.label={self.label!r}: no such label in callbacks.probe.labels, data.labels or the "
                f"store's /labels ({names or 'none'}). Fix: name a phenotype column (callbacks.probe.labels: file, "
                "id_column, columns, categories) or a /labels/<name> of the ROI file")
        v = np.asarray(store.run_labels(self.label))
        kind = "regression" if v.dtype.kind == "f" else "classification"
        return v, "run", kind if self.kind == "auto" else self.kind

    @torch.no_grad()
    def _embed(self, trainer, pl_module, dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Embeddings ``(N, D)``, subject indices and store rows ``(N,)`` of (at most ``max_windows``)
        windows of ``dataset``, gathered from every rank."""
        n = len(dataset)
        idx = np.arange(n) if n <= self.max_windows else np.unique(np.linspace(0, n - 1, self.max_windows).round().astype(int))
        mine = idx[trainer.global_rank::trainer.world_size]
        feats, subjects, runs = [], [], []
        for k in range(0, len(mine), self.batch_size):
            batch = collate_windows([dataset[int(i)] for i in mine[k:k + self.batch_size]])
            batch = {key: v.to(pl_module.device) if torch.is_tensor(v) else v for key, v in batch.items()}
            feats.append(pl_module.embed(batch).float())
            subjects.append(batch["subject"])
            runs.append(batch["run"])
        dim = None
        if feats:
            f, s, r = torch.cat(feats), torch.cat(subjects), torch.cat(runs)
        else:  # more ranks than windows: an empty share (its width from one window)
            one = collate_windows([dataset[int(idx[0])]])
            dim = pl_module.embed({k: v.to(pl_module.device) if torch.is_tensor(v) else v for k, v in one.items()}).shape[1]
            f = torch.zeros(0, dim, device=pl_module.device)
            s = r = torch.zeros(0, dtype=torch.long, device=pl_module.device)
        if trainer.world_size > 1:
            f = gather(f.contiguous(), grad=False)
            s, r = (gather(x[:, None].contiguous(), grad=False)[:, 0] for x in (s, r))
            # back in window order (rank r held idx[r::world]): the probe sees what one process would
            order = np.argsort(np.concatenate([idx[k::trainer.world_size] for k in range(trainer.world_size)]), kind="stable")
            f, s, r = f[torch.as_tensor(order, device=f.device)], s[torch.as_tensor(order, device=s.device)], \
                r[torch.as_tensor(order, device=r.device)]
        return f.cpu().numpy(), s.cpu().numpy(), r.cpu().numpy()

    def probe(self, trainer, pl_module, completed_epochs: int) -> dict[str, float]:
        """Embed, fit, score and log once; returns the metrics (also in :attr:`history`)."""
        datamodule = trainer.datamodule
        if datamodule is None or not callable(getattr(datamodule, "dataset", None)):
            raise ConfigError("callbacks.probe needs a datamodule with dataset(split) (the ROI/grayordinate windows)")
        datamodule.setup()
        values, by, kind = self._label_values(datamodule)
        was_training = pl_module.training
        pl_module.eval()
        try:
            parts = [self._embed(trainer, pl_module, datamodule.dataset(split)) for split in (self.train_split, self.eval_split)]
        finally:
            pl_module.train(was_training)
        # every rank holds every gathered row: checks fail on all ranks alike, rank 0 fits
        (fx, fs, fr), (ex, es, er) = parts
        ty, ey = (values[fs] if by == "subject" else values[fr]), (values[es] if by == "subject" else values[er])
        if kind == "classification" and len(np.unique(ty)) < 2:
            raise ConfigError(f"callbacks.probe: label {self.label!r} has one class in the {self.train_split} windows; "
                              "a classification probe needs two")
        if kind == "regression":
            ty, ey = ty.astype(np.float64), ey.astype(np.float64)
        metrics: dict[str, float] | None = None
        if trainer.is_global_zero:
            raw = fit_predict_sklearn(fx, ty, ex, ey, kind, self.seed)
            keep = ("balanced_acc", "acc", "auroc") if kind == "classification" else ("pearson_r", "r2", "mae")
            metrics = {("r" if k == "pearson_r" else k): float(raw[k]) for k in keep if k in raw}
        if trainer.world_size > 1:
            metrics = trainer.strategy.broadcast(metrics, src=0)
        logged = {f"probe/{self.label}/{k}": v for k, v in metrics.items()}
        for logger in trainer.loggers:  # at Lightning's logging step: brainfm's loggers write global_step (tracking.py)
            logger.log_metrics(logged, step=trainer.global_step - 1)
        for k, v in logged.items():
            trainer.callback_metrics[k] = torch.tensor(v)
        self.history.append((int(completed_epochs), int(trainer.global_step), dict(metrics)))
        _log.info("linear probe after %d epoch(s): %s", completed_epochs,
                  ", ".join(f"{k}={v:.4f}" for k, v in logged.items()))
        return metrics
