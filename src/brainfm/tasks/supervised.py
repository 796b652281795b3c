"""Supervised fine-tuning and probing on labels: classification (BCE / cross-entropy) or regression
(MSE / L1 on standardised labels), with clip -> subject aggregation of the predictions.

SwiFT v1 (Kim et al. 2023) fine-tunes Swin4D with a mean-pooled linear head and averages the clip
logits of a subject before computing the metrics; this task does the same for any backbone.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from brainfm.checkpoints import load_backbone
from brainfm.errors import ConfigError
from brainfm.tasks.base import BrainfmTask
from brainfm.tasks.distributed import GlobalBatchNorm1d
from brainfm.tasks.metrics import SubjectOutputs, per_subject_means, subject_metrics

KINDS = ("binary", "multiclass", "regression")


def pooled_embedding(model: nn.Module, batch: dict) -> torch.Tensor:
    """Backbone embedding ``(B, D)`` of a batch (:meth:`brainfm.models.backbone.Backbone.pooled`:
    mean over Swin4D tokens / TR states, the LSTM code, TFF's pooled state, Semantoks' CLS).

    Raises:
        ConfigError: the batch lacks the model's inputs.
    """
    return model.pooled_batch(batch)


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Initialise ``model`` from ``task.init_from`` (:func:`brainfm.checkpoints.load_backbone`; a
    final norm or BERT pooler the pretraining did not train may be missing).

    Raises:
        CheckpointError: the file does not load. ConfigError: keys that do not fit the model.
    """
    load_backbone(model, path, may_be_missing=("norm.", "transformer.pooler."))


def build_head(head: str, d: int, n_out: int, dropout: float = 0.0) -> nn.Module:
    """The head on a pooled embedding ``(B, d) -> (B, n_out)``: ``linear`` (dropout + Linear, SwiFT),
    ``bn_linear`` (BatchNorm without affine, gathered over ranks, + Linear: Brain-JEPA's probe) or ``mlp``
    (Linear -> GELU -> dropout -> Linear).

    Raises:
        ConfigError: another ``head``.
    """
    if head == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(d, n_out))
    if head == "bn_linear":  # BatchNorm (no affine) + linear, the probe of Brain-JEPA
        return nn.Sequential(GlobalBatchNorm1d(d, affine=False), nn.Dropout(dropout), nn.Linear(d, n_out))
    if head == "mlp":
        return nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Dropout(dropout), nn.Linear(d, n_out))
    raise ConfigError(f"task.head={head!r} must be 'linear', 'bn_linear' or 'mlp'")


class PooledHeadTask(BrainfmTask):
    """A head on the pooled backbone embedding (:func:`pooled_embedding`): the shared part of
    fine-tuning tasks (:class:`SupervisedTask`, :class:`~brainfm.tasks.decoding.DecodingTask`).
    Subclasses call :meth:`attach_head` after ``super().__init__``; :meth:`logits` is
    ``head(pooled(batch))``, and a frozen backbone stays in eval mode (no dropout, no batch-norm
    updates)."""

    def attach_head(self, head: str, n_out: int, dropout: float, freeze_backbone: bool,
                    init_from: str | None) -> None:
        """Load ``init_from`` into the backbone, build the head (:func:`build_head`), keep no special
        tokens trainable (plain windows), and freeze the backbone if asked.

        Raises:
            CheckpointError / ConfigError: from :func:`load_backbone_weights` and :func:`build_head`.
        """
        if init_from:
            load_backbone_weights(self.model, init_from)
        self.head = build_head(head, self.model.out_dim, int(n_out), dropout)
        self.model.use_special_tokens()  # plain windows: no MASK/CLS/SEP/segment
        self._frozen_backbone = bool(freeze_backbone)
        if freeze_backbone:
            self.model.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "_frozen_backbone", False):
            self.model.eval()  # frozen: no dropout / batch-norm updates in the backbone
        return self

    #: the level of the labels the head predicts (:attr:`BrainfmTask.predicts`)
    label_level = "subject"

    @property
    def predicts(self) -> str | None:
        """:attr:`label_level` (``"subject"``; DecodingTask: ``"window"``); None where the head is not reachable
        through :meth:`logits`."""
        return self.label_level if callable(getattr(self, "logits", None)) else None

    def logits(self, batch: dict) -> torch.Tensor:
        """``(B, n_out)``: the head on :func:`pooled_embedding`."""
        return self.head(pooled_embedding(self.model, batch))

    def head_output(self, batch: dict) -> torch.Tensor:
        """:meth:`logits` (:meth:`BrainfmTask.head_output`).

        Raises:
            ConfigError: no head reachable through :meth:`logits` (:attr:`predicts` is None).
        """
        if not self.has_prediction_head:
            return super().head_output(batch)
        return self.logits(batch)

    @torch.no_grad()
    def embed(self, batch: dict) -> torch.Tensor:
        """``(B, D)``: :func:`pooled_embedding` (extraction, probes, re-identification)."""
        return pooled_embedding(self.model, batch)


class SupervisedTask(PooledHeadTask):
    """Predict ``batch[target]`` from the pooled backbone embedding.

    Args:
        kind: ``binary`` (one logit, BCE), ``multiclass`` (``num_classes`` logits, CE) or
            ``regression`` (MSE, or L1 with ``loss=l1``, on labels standardised with
            ``label_mean``/``label_std``, which are saved in the checkpoint).
        head: ``linear`` (SwiFT), ``bn_linear`` (BatchNorm without affine, then Linear: Brain-JEPA's
            probe; robust to the small spread of mean-pooled features) or ``mlp``
            (Linear -> GELU -> dropout -> Linear).
        freeze_backbone: train only the head (a linear probe when ``head=linear``).
        init_from: pretrained weights for the backbone.

    Validation metrics are computed per subject from the mean of its clips' logits (or
    predictions): accuracy, balanced accuracy and AUROC (classification), MSE, MAE, Pearson r and R^2
    (regression, in the label's own units).
    """

    def __init__(self, model: dict, target: str = "label", kind: str = "binary", num_classes: int = 2,
                 head: str = "linear", dropout: float = 0.0, freeze_backbone: bool = False,
                 init_from: str | None = None, loss: str = "mse", label_mean: float = 0.0, label_std: float = 1.0,
                 **kwargs) -> None:
        self._objective = {"target": target, "kind": kind, "num_classes": int(num_classes), "head": head,
                           "dropout": float(dropout), "freeze_backbone": bool(freeze_backbone), "init_from": None,
                           "loss": loss, "label_mean": float(label_mean), "label_std": float(label_std)}
        super().__init__(model, **kwargs)
        if kind not in KINDS:
            raise ConfigError(f"task.kind={kind!r} must be one of {KINDS}")
        if loss not in ("mse", "l1"):
            raise ConfigError(f"task.loss={loss!r} must be 'mse' or 'l1'")
        self.target, self.kind, self.loss_name = target, kind, loss
        self.label_mean, self.label_std = float(label_mean), float(label_std)
        self.attach_head(head, int(num_classes) if kind == "multiclass" else 1, dropout, freeze_backbone, init_from)
        self._val = SubjectOutputs()

    def objective_hparams(self) -> dict:
        return dict(self._objective)

    def head_output(self, batch: dict) -> torch.Tensor:
        """:meth:`PooledHeadTask.head_output`; regression: ``logits * label_std + label_mean``, the label's units.

        Raises:
            ConfigError: no head reachable through :meth:`logits` (:attr:`predicts` is None).
        """
        z = super().head_output(batch)
        return z * self.label_std + self.label_mean if self.kind == "regression" else z

    def _labels(self, batch: dict) -> torch.Tensor:
        if self.target not in batch:
            raise ConfigError(f"batches have no '{self.target}' labels (keys: {sorted(batch)}); set task.target "
                              "or the data recipe's label columns")
        return batch[self.target]

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.logits(batch)
        self._last_outputs = out.detach()
        y = self._labels(batch)
        if self.kind == "binary":
            loss = F.binary_cross_entropy_with_logits(out.squeeze(-1), y.float())
        elif self.kind == "multiclass":
            loss = F.cross_entropy(out, y.long())
        else:
            z = (y.float() - self.label_mean) / self.label_std
            loss = (F.mse_loss if self.loss_name == "mse" else F.l1_loss)(out.squeeze(-1), z)
        return {"loss": loss}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self._val.add(batch["subject"], self._last_outputs, self._labels(batch))

    def on_validation_epoch_end(self) -> None:
        """``val/<loss>`` and the subject-level metrics, over the windows of every rank (gathered: the
        same numbers with 1 or N ranks); ``val/n_windows``: how many windows they come from."""
        super().on_validation_epoch_end()
        rows = self._val.gathered(self.device)
        self._val.clear()
        if rows is None:
            return
        subjects, outputs, labels = rows
        self.log("val/n_windows", float(len(subjects)), sync_dist=True)
        for name, value in self.subject_metrics(*per_subject_means(subjects, outputs, labels)[1:]).items():
            self.log(f"val/{name}", value, sync_dist=True)

    def subject_metrics(self, outputs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Metrics of each subject's mean clip output ``(S, k)`` (SwiFT's clip -> subject averaging)
        against its label ``(S, 1)``: logits become probabilities, standardised regression outputs
        return to label units, then :func:`brainfm.tasks.metrics.subject_metrics`."""
        outputs = outputs.float().cpu()
        if self.kind == "regression":
            outputs = outputs * self.label_std + self.label_mean
        elif self.kind == "binary":
            outputs = torch.sigmoid(outputs)
        else:
            outputs = outputs.softmax(-1)
        return subject_metrics(outputs, labels, self.kind, self._objective.get("num_classes", 2))

