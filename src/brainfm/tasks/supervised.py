"""Supervised fine-tuning and probing on labels: classification (BCE / cross-entropy) or regression
(MSE / L1 on standardised labels), with clip -> subject aggregation of the predictions.

SwiFT v1 (Kim et al. 2023) fine-tunes Swin4D with a mean-pooled linear head and averages the clip
logits of a subject before computing the metrics; this task does the same for any backbone.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from brainfm.errors import ConfigError
from brainfm.models.lstm import LSTMAutoencoder
from brainfm.models.sequence import SequenceTransformer
from brainfm.models.swin4d import SwinTransformer4D
from brainfm.tasks.base import BrainfmTask
from brainfm.tasks.distributed import GlobalBatchNorm1d

KINDS = ("binary", "multiclass", "regression")


def pooled_embedding(model: nn.Module, batch: dict) -> torch.Tensor:
    """Backbone embedding ``(B, D)`` of a batch: mean over Swin4D tokens / TR tokens, or the LSTM code."""
    if isinstance(model, SwinTransformer4D):
        return model.embed(batch["volume"])
    if isinstance(model, SequenceTransformer):
        return model(batch["bold"], batch["t"]).mean(dim=1)
    if isinstance(model, LSTMAutoencoder):
        return model.encode(batch["bold"], batch["t"])[0]
    from brainfm.models.tff import TFF

    if isinstance(model, TFF):
        return model.embed(batch["volume"])
    raise ConfigError(f"no pooled embedding defined for {type(model).__name__}")


def read_backbone_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The backbone weights in a brainfm checkpoint (its ``model.*`` entries, prefix removed), a
    ``.safetensors`` file (e.g. SwiFT weights converted by ``brainfm.models.convert``) or a plain
    state-dict file.

    Raises:
        ConfigError: no such file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"task.init_from={path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    if any(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return state


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Initialise ``model`` from a brainfm checkpoint (its ``model.*`` weights), a SwiFT-converted
    ``.safetensors`` or a plain state dict file.

    Raises:
        ConfigError: missing file or keys that do not fit the model.
    """
    state = read_backbone_state(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith(("norm.", "transformer.pooler."))]:
        raise ConfigError(
            f"task.init_from={path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
            "the model config (sizes, version) must match the pretrained one"
        )


class SupervisedTask(BrainfmTask):
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
        if init_from:
            load_backbone_weights(self.model, init_from)
        self.target, self.kind, self.loss_name = target, kind, loss
        self.label_mean, self.label_std = float(label_mean), float(label_std)
        n_out = int(num_classes) if kind == "multiclass" else 1
        d = self.model.out_dim
        if head == "linear":
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(d, n_out))
        elif head == "bn_linear":  # BatchNorm (no affine) + linear, the probe of Brain-JEPA
            self.head = nn.Sequential(GlobalBatchNorm1d(d, affine=False), nn.Dropout(dropout), nn.Linear(d, n_out))
        elif head == "mlp":
            self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Dropout(dropout), nn.Linear(d, n_out))
        else:
            raise ConfigError(f"task.head={head!r} must be 'linear', 'bn_linear' or 'mlp'")
        if isinstance(self.model, SequenceTransformer):
            self.model.use_special_tokens()  # plain windows: no MASK/CLS/SEP/segment
        if freeze_backbone:
            self.model.requires_grad_(False)
        self._val: dict[str, list] = defaultdict(list)

    def objective_hparams(self) -> dict:
        return dict(self._objective)

    def train(self, mode: bool = True):
        super().train(mode)
        if self._objective["freeze_backbone"]:
            self.model.eval()  # frozen: no dropout / batch-norm updates in the backbone
        return self

    def logits(self, batch: dict) -> torch.Tensor:
        return self.head(pooled_embedding(self.model, batch))

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
        out = self._last_outputs.float().cpu()
        for s, o, y in zip(batch["subject"].tolist(), out, self._labels(batch).cpu()):
            self._val[s].append((o, float(y)))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        for name, value in self.subject_metrics(self._val).items():
            self.log(f"val/{name}", value)
        self._val.clear()

    def subject_metrics(self, per_subject: dict) -> dict[str, float]:
        """Metrics from each subject's mean clip output (SwiFT's clip -> subject averaging)."""
        from torchmetrics.functional import (
            accuracy,
            auroc,
            mean_absolute_error,
            mean_squared_error,
            pearson_corrcoef,
            r2_score,
        )

        outs = torch.stack([torch.stack([o for o, _ in v]).mean(0) for v in per_subject.values()])
        ys = torch.tensor([v[0][1] for v in per_subject.values()])
        if self.kind == "regression":
            pred = outs.squeeze(-1) * self.label_std + self.label_mean
            metrics = {"mse": mean_squared_error(pred, ys), "mae": mean_absolute_error(pred, ys)}
            if len(ys) > 2:
                metrics["pearson_r"] = pearson_corrcoef(pred, ys)
                metrics["r2"] = r2_score(pred, ys)
            return {k: float(v) for k, v in metrics.items()}
        if self.kind == "binary":
            prob = torch.sigmoid(outs.squeeze(-1))
            args = {"task": "binary"}
        else:
            prob = outs.softmax(-1)
            args = {"task": "multiclass", "num_classes": self._objective["num_classes"]}
        y = ys.long()
        metrics = {"acc": accuracy(prob, y, **args)}
        if self.kind == "binary":
            metrics["balanced_acc"] = _balanced_accuracy_binary(prob, y)
        else:  # macro-averaged recall
            metrics["balanced_acc"] = accuracy(prob, y, average="macro", **args)
        if len(torch.unique(y)) > 1:
            metrics["auroc"] = auroc(prob, y, **args)
        return {k: float(v) for k, v in metrics.items()}

    @torch.no_grad()
    def embed(self, batch: dict) -> torch.Tensor:
        return pooled_embedding(self.model, batch)


def _balanced_accuracy_binary(prob: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    pred = (prob > 0.5).long()
    recalls = [(pred[y == c] == c).float().mean() for c in (0, 1) if (y == c).any()]
    return torch.stack(recalls).mean()
