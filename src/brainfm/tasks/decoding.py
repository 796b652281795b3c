"""Mental-state (trial) decoding: which task condition does a window of BOLD come from?

The downstream task of Thomas, Ré & Poldrack (2022, athms/learning-from-brains): a classifier on the
pooled embedding of a (pretrained) backbone predicts the trial label shared by every TR of a window
(HCP: 20 cognitive states of 7 tasks; MDTB: 26), trained with cross-entropy. Windows and their
``trial_label`` come from the ROI store's per-TR labels (``data.trial_labels``, the haemodynamic
shift in seconds: :mod:`brainfm.data.trial_labels`). Unlike :class:`~brainfm.tasks.supervised.SupervisedTask`,
whose labels belong to subjects, the metrics are per window: a subject contributes windows of every
class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from brainfm.errors import ConfigError
from brainfm.tasks.metrics import SubjectOutputs, subject_metrics
from brainfm.tasks.supervised import PooledHeadTask


def balanced_accuracy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean recall over the classes present in ``target`` (``(B,)`` class indices each)."""
    classes = torch.unique(target)
    return torch.stack([(pred[target == c] == c).float().mean() for c in classes]).mean()


class DecodingTask(PooledHeadTask):
    """Classify ``batch[target]`` (``(B,)`` int64, default ``trial_label``) from the pooled backbone
    embedding ``(B, D)`` (:func:`~brainfm.tasks.supervised.pooled_embedding`).

    Args:
        model: backbone config. target: the batch key of the labels.
        num_classes: classes; None: the number of classes of the data's trial labels
            (``data_meta["trial_labels"]["classes"]``, recorded by the datamodule; a number that
            disagrees with them is refused).
        head: ``linear`` | ``bn_linear`` | ``mlp`` (:func:`~brainfm.tasks.supervised.build_head`).
        dropout: head dropout. freeze_backbone: train the head only (a linear probe with ``head=linear``).
        init_from: pretrained backbone weights (a brainfm checkpoint or converted ``.safetensors``), as
            ``task.init_from`` of :class:`~brainfm.tasks.supervised.SupervisedTask`.
        label_smoothing: of the cross-entropy.

    Logs ``train/loss``, ``train/acc``, ``train/balanced_acc`` (per batch) and ``val/loss``, ``val/acc``,
    ``val/balanced_acc`` (mean recall over the classes), ``val/auroc`` over every validation window of
    every rank.

    Raises:
        ConfigError: no class count (neither ``num_classes`` nor trial labels in the data), batches
            without ``target``, labels outside ``[0, num_classes)``.
    """

    #: trial states belong to windows (:attr:`~brainfm.tasks.base.BrainfmTask.predicts`)
    label_level = "window"

    def __init__(self, model: dict, target: str = "trial_label", num_classes: int | None = None,
                 head: str = "linear", dropout: float = 0.0, freeze_backbone: bool = False,
                 init_from: str | None = None, label_smoothing: float = 0.0, **kwargs) -> None:
        classes = ((kwargs.get("data_meta") or {}).get("trial_labels") or {}).get("classes")
        if num_classes is None:
            if not classes:
                raise ConfigError("task.num_classes=null needs trial labels in the data (data.trial_labels); set "
                                  "task.num_classes=<classes>")
            num_classes = len(classes)
        elif classes and target == "trial_label" and int(num_classes) != len(classes):
            raise ConfigError(f"task.num_classes={num_classes} but the data's trial labels have {len(classes)} classes "
                              f"({list(classes)[:8]}...); set task.num_classes={len(classes)} or null")
        self._objective = {"target": target, "num_classes": int(num_classes), "head": head, "dropout": float(dropout),
                           "freeze_backbone": bool(freeze_backbone), "init_from": None,
                           "label_smoothing": float(label_smoothing)}
        super().__init__(model, **kwargs)
        if int(num_classes) < 2:
            raise ConfigError(f"task.num_classes={num_classes}: decoding needs at least 2 classes")
        self.target, self.num_classes = target, int(num_classes)
        self.attach_head(head, self.num_classes, dropout, freeze_backbone, init_from)
        self._val = SubjectOutputs()

    def objective_hparams(self) -> dict:
        return dict(self._objective)

    def _labels(self, batch: dict) -> torch.Tensor:
        if self.target not in batch:
            raise ConfigError(f"batches have no '{self.target}' labels (keys: {sorted(batch)}); set data.trial_labels "
                              "(per-TR labels of the store) or task.target")
        y = batch[self.target].long().reshape(-1)
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ConfigError(f"'{self.target}' labels outside [0, {self.num_classes}); set task.num_classes")
        return y

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.logits(batch)
        y = self._labels(batch)
        self._last = (out.detach(), y)
        return {"loss": F.cross_entropy(out, y, label_smoothing=self._objective["label_smoothing"])}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        out, y = self._last
        pred = out.argmax(-1)
        bs = self.batch_size(batch)
        self.log("train/acc", (pred == y).float().mean(), batch_size=bs)
        self.log("train/balanced_acc", balanced_accuracy(pred, y), batch_size=bs)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        out, y = self._last
        self._val.add(batch["subject"], out, y)

    def on_validation_epoch_end(self) -> None:
        """``val/loss`` and the window-level metrics over every rank's windows (gathered)."""
        super().on_validation_epoch_end()
        rows = self._val.gathered(self.device)
        self._val.clear()
        if rows is None:
            return
        _, outputs, labels = rows
        self.log("val/n_windows", float(len(labels)), sync_dist=True)
        scores = subject_metrics(outputs.float().softmax(-1), labels, "multiclass", self.num_classes)
        for name, value in scores.items():
            self.log(f"val/{name}", value, sync_dist=True)

