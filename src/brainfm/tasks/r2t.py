"""R2T-Net: rest <-> task contrastive learning of a subject's activity signature, with a supervised
head that predicts subject traits from resting state alone (rest2task/R2T-Net).

What the reference does (checked in rest2task/R2T-Net: the Lightning release ``module/r2tnet.py``
and README of Dec 2025, and the plain-PyTorch ``r2tnet/model.py`` of 2026), and how it is done here:

- **Pairs**: a rest window and a task window of the *same subject* are the positives; the other
  subjects' windows in the batch are negatives (HCP ``REST1_LR`` 1200 TRs with ``WM_LR`` 405 TRs;
  pairs come from :class:`brainfm.data.datamodules.r2t.R2TDataModule`). Inputs: volumes (Swin4D), grayordinates
  ``[91282, T]`` or ROI series ``[V, T]`` (sequence transformer or
  :class:`brainfm.models.r2t_encoders.TemporalMLPEncoder`).
- **Encoder**: any zoo backbone; a learned *modality embedding* (rest = 0, task = 1) is added to
  the backbone's input tokens (the reference's ``modality_emb``); the pooled backbone state goes
  through LayerNorm + Linear to the ``embed_dim``-wide embedding (1024, the reference's
  ``signature_dim``/``latent_dim``) and is L2-normalized (as the reference's encoders).
- **NT-Xent** (:func:`brainfm.tasks.losses.nt_xent`, SimCLR) between rest and task embeddings,
  temperature 0.07; windows of the same subject other than the positive are not counted as
  negatives (the reference has one pair per subject per batch, so nothing changes there).
- **Supervised target**: R2T-Net predicts *subject-level behavioural/cognitive scores* (HCP:
  working-memory 0-back/2-back accuracy, their difference, relational-task accuracy; ADNI: a
  diagnosis class), not activation or contrast maps, from the fused signature
  ``normalize((z_rest + z_task) / 2)`` in training (``supervised_view``) and from the rest
  embedding alone at evaluation and inference. Labels come by subject from the data recipe
  (:mod:`brainfm.data.phenotypes`). Loss: ``supervised + lambda * NT-Xent`` with lambda 0.5.
  Regression targets are standardised with the training subjects' mean/std (the reference's
  ``StandardScaler``) and fitted with Huber (the reference's 2026 default ``reg_loss``; MSE and L1
  too) through an MLP head (Linear-ReLU-Dropout-Linear, hidden 512, dropout 0.1, as its
  classification head). The reference's binned "two-tier"/"YOLO" regression head is not
  implemented. Classification: BCE (one logit) or cross-entropy.
- **Modes** (README, "Training Paradigms"): ``self_supervised`` (NT-Xent only, the prediction head
  frozen: ``--contrastive --pretraining --freeze_head``) and ``fine_tune`` (NT-Xent + supervised,
  the default). ``freeze_encoder`` trains the head only (the 2026 "frozen-signature fine-tuning").
- **Augmentations** (training only, per view): a temporal crop to a random length in
  ``[int(min_ratio * T), T]`` TRs (min ratio 0.8) at a random start (per window here, per batch in
  the reference); the reference zero-pads the crop back to ``T`` TRs, which brainfm does for volumes
  (Swin4D needs its fixed ``img_size``) while sequence models take the shorter window with its own
  times in seconds (no fake zero TRs). Gaussian noise std 0.01 on a random 10 % of the
  voxels/ROIs/grayordinates (the same ones at every TR). Modality dropout with probability 0.2 per
  batch: one view (rest or task, 50/50) is replaced by the other, modality id included (the
  Lightning release; the 2026 code only shares the modality id and defaults to 0).
- **Gradient clipping** at norm 1.0 is the trainer's ``gradient_clip_val`` (conf/trainer).
- **Signature**: the concatenation of the rest and task embeddings, ``2 * embed_dim`` = 2048
  (:meth:`R2TTask.signature`; the reference's ``extract.py`` averages them instead, and falls back to
  the rest embedding alone with ``--rest_only``: :meth:`R2TTask.embed`).
- **Rest-only inference** (``inference.py`` / README "predict"): the head on the rest embedding,
  standardisation undone (:meth:`R2TTask.predict`, :func:`predict_subjects`,
  :func:`write_prediction_csv` -> ``subject_id,prediction``).
- **Metrics**: per subject from the mean of its rest windows' predictions: Pearson r / MSE / MAE
  (regression), balanced accuracy / AUROC (classification); and ``rest_to_task_top1``: how often
  the nearest task embedding of a rest embedding belongs to the same subject.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from brainfm.checkpoints import read_state_dict
from brainfm.errors import ConfigError
from brainfm.io import atomic_path
from brainfm.tasks.base import BrainfmTask
from brainfm.tasks.distributed import gather
from brainfm.tasks.losses import nt_xent
from brainfm.tasks.metrics import SubjectOutputs, per_subject_means, subject_metrics
from brainfm.tasks.supervised import load_backbone_weights

MODES = ("fine_tune", "self_supervised")
KINDS = ("regression", "binary", "multiclass")
LOSSES = ("huber", "mse", "l1")
VIEWS = ("average", "rest", "task")
REST, TASK = 0, 1


class R2TTask(BrainfmTask):
    """R2T-Net on any zoo backbone (see the module docstring for the method and its sources).

    Args:
        model: backbone config (Swin4D for ``volume`` batches; SequenceTransformer,
            TemporalMLPEncoder or LSTMAutoencoder for ``bold`` batches of ROIs or grayordinates).
        embed_dim: width of each modality's embedding (1024); the signature is twice that.
        temperature: NT-Xent temperature (0.07). lambda_contrast: weight of NT-Xent in ``fine_tune``
            (0.5); ``self_supervised`` minimises NT-Xent alone.
        mode: ``fine_tune`` or ``self_supervised`` (head frozen, no labels needed).
        target: label key(s) in the batch (``data.labels.columns``); a list for several regression
            targets. Required in ``fine_tune``.
        kind: ``regression``, ``binary`` or ``multiclass`` (``num_classes``).
        head: ``mlp`` (Linear -> ReLU -> Dropout -> Linear, ``head_hidden``, ``head_dropout``) or
            ``linear``. loss: regression loss on standardised targets (``huber``, ``mse``, ``l1``).
        supervised_view: head input in training: ``average`` (normalized mean of the two
            embeddings), ``rest`` or ``task``. Evaluation and inference always use rest.
        label_mean, label_std: standardisation of regression targets (one value or one per
            target); None: the training subjects' statistics, taken from the datamodule when fitting
            and saved in the checkpoint.
        modality_embedding: add the learned rest/task embedding to the backbone's input tokens.
        modality_dropout: probability per training batch that one view replaces the other (0.2).
        temporal_crop_min_ratio: shortest temporal crop as a fraction of the window (0.8; 1: off).
        noise_std, noise_prob: Gaussian noise (0.01) on a random fraction (0.1) of the
            voxels/ROIs/grayordinates of each training window.
        freeze_encoder: train only the head (backbone, modality embedding and projection frozen).
        init_from: weights to start from: an R2T checkpoint (everything but the head) or any file
            :func:`brainfm.tasks.supervised.load_backbone_weights` reads (the backbone).

    Batches: paired batches of :class:`brainfm.data.datamodules.r2t.R2TDataModule` (rest view ``bold``/``volume``
    + ``t``, task view ``task_bold``/``task_volume`` + ``task_t``, ``subject``, labels); rest-only
    batches (``bold``/``volume``, ``t``) for :meth:`embed` and :meth:`predict`.

    Raises:
        ConfigError: unknown option values, ``fine_tune`` without a target, a backbone that does not
            fit the batches, batches without the task view where one is needed.
    """

    def __init__(self, model: dict, embed_dim: int = 1024, temperature: float = 0.07, lambda_contrast: float = 0.5,
                 mode: str = "fine_tune", target: str | Sequence[str] | None = None, kind: str = "regression",
                 num_classes: int = 2, head: str = "mlp", head_hidden: int = 512, head_dropout: float = 0.1,
                 loss: str = "huber", supervised_view: str = "average",
                 label_mean: float | Sequence[float] | None = None, label_std: float | Sequence[float] | None = None,
                 modality_embedding: bool = True, modality_dropout: float = 0.2, temporal_crop_min_ratio: float = 0.8,
                 noise_std: float = 0.01, noise_prob: float = 0.1, freeze_encoder: bool = False,
                 init_from: str | None = None, **kwargs) -> None:
        targets = [] if target is None else [str(target)] if isinstance(target, str) else [str(t) for t in target]
        for name, value, allowed in (("mode", mode, MODES), ("kind", kind, KINDS), ("loss", loss, LOSSES),
                                     ("supervised_view", supervised_view, VIEWS), ("head", head, ("mlp", "linear"))):
            if value not in allowed:
                raise ConfigError(f"task.{name}={value!r} must be one of {allowed}")
        if mode == "fine_tune" and not targets:
            raise ConfigError("task.mode=fine_tune needs task.target (the label key(s) of data.labels.columns); "
                              "use task.mode=self_supervised to train without labels")
        if kind != "regression" and len(targets) > 1:
            raise ConfigError(f"task.kind={kind} takes one target, got {targets}")
        if not 0.0 < float(temperature):
            raise ConfigError(f"task.temperature={temperature} must be positive")
        if not 0.0 < float(temporal_crop_min_ratio) <= 1.0:
            raise ConfigError(f"task.temporal_crop_min_ratio={temporal_crop_min_ratio} must lie in (0, 1]")
        self._objective = {
            "embed_dim": int(embed_dim), "temperature": float(temperature), "lambda_contrast": float(lambda_contrast),
            "mode": mode, "target": targets or None, "kind": kind, "num_classes": int(num_classes), "head": head,
            "head_hidden": int(head_hidden), "head_dropout": float(head_dropout), "loss": loss,
            "supervised_view": supervised_view, "label_mean": _as_list(label_mean), "label_std": _as_list(label_std),
            "modality_embedding": bool(modality_embedding), "modality_dropout": float(modality_dropout),
            "temporal_crop_min_ratio": float(temporal_crop_min_ratio), "noise_std": float(noise_std),
            "noise_prob": float(noise_prob), "freeze_encoder": bool(freeze_encoder), "init_from": None,
        }
        super().__init__(model, **kwargs)
        m = self.model
        if m.input_keys not in (("volume",), ("bold", "t")):
            raise ConfigError(f"task=r2t has no encoder path for {type(m).__name__} (it reads {list(m.input_keys)}); use "
                              "a Swin4D (volumes), a SequenceTransformer, TemporalMLPEncoder or LSTMAutoencoder (ROIs, "
                              "grayordinates)")
        # the modality embedding is added to the input tokens where the backbone has a token hook, else to
        # its pooled embedding (the LSTM)
        token_dim = m.token_dim if m.token_dim is not None else m.out_dim
        m.use_special_tokens()  # plain windows: no MASK/CLS/SEP/segment
        self.targets, self.mode, self.kind = targets, mode, kind
        self.embed_dim = int(embed_dim)
        self.modality = nn.Embedding(2, token_dim) if modality_embedding else None
        if self.modality is not None:
            nn.init.normal_(self.modality.weight, std=0.02)
        self.projection = nn.Sequential(nn.LayerNorm(m.out_dim), nn.Linear(m.out_dim, self.embed_dim))
        n_out = len(targets) if kind == "regression" else (int(num_classes) if kind == "multiclass" else 1)
        n_out = max(n_out, 1)
        if head == "mlp":
            self.head = nn.Sequential(nn.Linear(self.embed_dim, int(head_hidden)), nn.ReLU(), nn.Dropout(head_dropout),
                                      nn.Linear(int(head_hidden), n_out))
        else:
            self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(self.embed_dim, n_out))
        if init_from:
            self._init_from(init_from)
        if mode == "self_supervised":
            self.head.requires_grad_(False)
        if freeze_encoder:
            for part in (self.model, self.modality, self.projection):
                if part is not None:
                    part.requires_grad_(False)
        self._val = SubjectOutputs()
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def objective_hparams(self) -> dict:
        return dict(self._objective)

    @property
    def predicts(self) -> str | None:
        """``"subject"`` when fine-tuned (:meth:`predict`: the subject's targets from each rest window), None
        when trained ``task.mode=self_supervised`` (an untrained head); :attr:`BrainfmTask.predicts`."""
        return "subject" if self.mode == "fine_tune" else None

    @property
    def signature_dim(self) -> int:
        """Width of :meth:`signature`: rest and task embeddings concatenated."""
        return 2 * self.embed_dim

    def train(self, mode: bool = True):
        super().train(mode)
        if self._objective["mode"] == "self_supervised":
            self.head.eval()
        if self._objective["freeze_encoder"]:
            for part in (self.model, self.modality, self.projection):
                if part is not None:
                    part.eval()
        return self

    def _init_from(self, path: str) -> None:
        path_ = Path(path)
        if path_.suffix == ".ckpt" and path_.is_file():
            state = read_state_dict(path_)
            if any(k.startswith("projection.") for k in state):  # an R2T checkpoint: all but the head
                keep = {k: v for k, v in state.items() if not k.startswith("head.")}
                missing, unexpected = self.load_state_dict(keep, strict=False)
                missing = [k for k in missing if not k.startswith("head.") and not k.startswith("model.norm.")]
                if missing or unexpected:
                    raise ConfigError(f"task.init_from={path} does not fit this model: missing {missing[:5]}, unexpected "
                                      f"{unexpected[:5]}; the model config (sizes, embed_dim) must match")
                return
        load_backbone_weights(self.model, path)

    # -- label scaling -----------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Standardisation of regression targets from the training subjects when not configured."""
        if self.mode != "fine_tune" or self.kind != "regression" or self._objective["label_mean"] is not None:
            return
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        stats = dm.label_stats("train") if hasattr(dm, "label_stats") else {}
        if not stats:
            return
        missing = [k for k in self.targets if k not in stats or "mean" not in stats[k]]
        if missing:
            raise ConfigError(f"task.target {missing} are not numeric labels of the data (data.labels.columns: "
                              f"{sorted(stats)})")
        mean = [stats[k]["mean"] for k in self.targets]
        std = [stats[k]["std"] if stats[k]["std"] > 1e-12 else 1.0 for k in self.targets]
        for key, value in (("label_mean", mean), ("label_std", std)):
            self._objective[key] = value
            self.hparams[key] = value

    def _scaling(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        k = len(self.targets)
        mean = self._objective["label_mean"] or [0.0]
        std = self._objective["label_std"] or [1.0]
        mean = mean * k if len(mean) == 1 else mean
        std = std * k if len(std) == 1 else std
        if len(mean) != k or len(std) != k:
            raise ConfigError(f"task.label_mean/label_std need 1 or {k} values (targets {self.targets})")
        return torch.tensor(mean, device=device), torch.tensor(std, device=device)

    # -- encoder -----------------------------------------------------------------------------------------------
    @staticmethod
    def _data_key(batch: dict) -> str:
        if "volume" in batch:
            return "volume"
        if "bold" in batch:
            return "bold"
        raise ConfigError(f"task=r2t needs 'bold' (ROI/grayordinate windows) or 'volume' (clips) in the batch; got "
                          f"{sorted(batch)}")

    def _view(self, batch: dict, role: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = self._data_key(batch)
        prefix = "task_" if role == TASK else ""
        if prefix + key not in batch:
            raise ConfigError(f"task=r2t needs rest/task pairs ('{key}' and 'task_{key}'): use a data=r2t_* recipe "
                              f"(brainfm.data.datamodules.r2t.R2TDataModule); this batch has {sorted(batch)}")
        return batch[prefix + key], batch.get(prefix + "t")

    def _check_input(self, x: torch.Tensor) -> None:
        m = self.model
        if m.input_keys == ("volume",):
            if x.ndim != 6:
                raise ConfigError(f"model {type(m).__name__} takes volume clips (B, C, X, Y, Z, T); got {tuple(x.shape)}. "
                                  "Use data=r2t_volume, or a sequence model for ROI/grayordinate data")
            want = (m.in_chans, *m.img_size)
            if tuple(x.shape[1:]) != want:
                raise ConfigError(f"clips {tuple(x.shape[1:])} (C, X, Y, Z, T) do not fit model.img_size={list(m.img_size)} "
                                  f"with in_chans={m.in_chans}: set model.img_size=[{', '.join(map(str, x.shape[2:]))}] "
                                  "(the last entry is data.window.length)")
        elif x.ndim != 3:
            raise ConfigError(f"model {type(m).__name__} takes windows (B, T, V) of ROIs/grayordinates; got "
                              f"{tuple(x.shape)}. Use model=swin4d_* for volumes")

    def encode(self, x: torch.Tensor, t: torch.Tensor | None, modality: torch.Tensor) -> torch.Tensor:
        """Pooled backbone state ``(B, D)`` of one view (``modality`` ``(B,)``: 0 rest, 1 task).

        ``x``: volume clips ``(B, C, X, Y, Z, T)`` or windows ``(B, T, V)`` with times ``t``
        ``(B, T)`` in seconds from the window onset.
        """
        self._check_input(x)
        m = self.model
        mod = self.modality(modality) if self.modality is not None else None
        if m.input_keys == ("volume",):
            inputs = (x,)
        elif t is None:
            raise ConfigError("ROI/grayordinate windows need their times 't' (seconds) in the batch")
        else:
            inputs = (x, t)
        if m.token_dim is None:  # no token hook (the LSTM): the modality shifts the pooled embedding
            h = m.pooled(*inputs)
            return h + mod.to(h.dtype) if mod is not None else h
        tokens = m.embed_inputs(*inputs)  # (B, ..., token_dim): Swin4D (B, d, h, w, t, E), sequences (B, T, d)
        if mod is not None:
            tokens = tokens + mod.view(mod.shape[0], *([1] * (tokens.ndim - 2)), -1).to(tokens.dtype)
        return m.pool_tokens(tokens)

    def embedding(self, x: torch.Tensor, t: torch.Tensor | None, modality: int | torch.Tensor) -> torch.Tensor:
        """L2-normalized embedding ``(B, embed_dim)`` of one view."""
        if not torch.is_tensor(modality):
            modality = torch.full((x.shape[0],), int(modality), dtype=torch.long, device=x.device)
        return F.normalize(self.projection(self.encode(x, t, modality)), dim=-1)

    # -- augmentation (R2T-Net's temporal crop, Gaussian noise, modality dropout) --------------------------------
    def temporal_crop(self, x: torch.Tensor, t: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Crop every window to one random length in ``[int(ratio * T), T]`` at its own random start.

        Volumes ``(B, C, X, Y, Z, T)`` are zero-padded back to ``T`` TRs at the end (as the
        reference); windows ``(B, T, V)`` stay shorter and their times restart at the crop onset.
        """
        ratio = self._objective["temporal_crop_min_ratio"]
        volume = x.ndim == 6
        n = x.shape[-1] if volume else x.shape[1]
        low = max(int(n * ratio), 1)
        if ratio >= 1.0 or low >= n:
            return x, t
        length = int(torch.randint(low, n + 1, ()).item())
        if length == n:
            return x, t
        starts = torch.randint(0, n - length + 1, (x.shape[0],)).tolist()
        if volume:
            x = torch.stack([x[b, ..., s:s + length] for b, s in enumerate(starts)])
            return F.pad(x, (0, n - length)), t
        x = torch.stack([x[b, s:s + length] for b, s in enumerate(starts)])
        if t is not None:
            t = torch.stack([t[b, s:s + length] - t[b, s] for b, s in enumerate(starts)])
        return x, t

    def gaussian_noise(self, x: torch.Tensor) -> torch.Tensor:
        """Add ``N(0, noise_std^2)`` to a random ``noise_prob`` of the voxels/ROIs/grayordinates (all TRs)."""
        std, p = self._objective["noise_std"], self._objective["noise_prob"]
        if std <= 0 or p <= 0:
            return x
        shape = (*x.shape[:-1], 1) if x.ndim == 6 else (x.shape[0], 1, x.shape[2])
        mask = (torch.rand(shape, device=x.device) < p).to(x.dtype)
        return x + torch.randn_like(x) * std * mask

    def _views(self, batch: dict) -> list[list]:
        views = []
        for role in (REST, TASK):
            x, t = self._view(batch, role)
            if x.ndim == 6:
                x = x.float()
            if self.training:
                x, t = self.temporal_crop(x, t)
                x = self.gaussian_noise(x)
            views.append([x, t, role])
        p = self._objective["modality_dropout"]
        if self.training and p > 0 and float(torch.rand(())) < p:
            keep = REST if float(torch.rand(())) < 0.5 else TASK
            views = [list(views[keep]), list(views[keep])]
        return views

    # -- objective ---------------------------------------------------------------------------------------------
    def _labels(self, batch: dict) -> torch.Tensor:
        missing = [k for k in self.targets if k not in batch]
        if missing:
            raise ConfigError(f"batches have no {missing} labels (keys: {sorted(batch)}): set data.labels (file, id "
                              "column, columns) or task.target, or train with task.mode=self_supervised")
        if self.kind == "regression":
            return torch.stack([batch[k].float() for k in self.targets], dim=1)
        return batch[self.targets[0]]

    def supervised_loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Head output ``(B, n_out)`` vs labels: standardised regression loss, BCE or cross-entropy."""
        if self.kind == "binary":
            return F.binary_cross_entropy_with_logits(out.squeeze(-1), y.float())
        if self.kind == "multiclass":
            return F.cross_entropy(out, y.long())
        mean, std = self._scaling(out.device)
        z = (y.float() - mean) / std
        fn = {"huber": F.huber_loss, "mse": F.mse_loss, "l1": F.l1_loss}[self._objective["loss"]]
        return fn(out, z)

    def fuse(self, z_rest: torch.Tensor, z_task: torch.Tensor) -> torch.Tensor:
        """Head input in training (``supervised_view``)."""
        view = self._objective["supervised_view"]
        if view == "rest":
            return z_rest
        if view == "task":
            return z_task
        return F.normalize(0.5 * (z_rest + z_task), dim=-1)

    def contrastive_loss(self, z_rest: torch.Tensor, z_task: torch.Tensor, subjects: torch.Tensor) -> torch.Tensor:
        """NT-Xent between rest and task embeddings ``(B, D)``; other windows of a subject are not
        negatives. In training the negatives are those of the global batch (every rank's). A (global)
        batch of one subject has no negatives: 0."""
        every = gather(subjects, grad=False) if self.training else subjects  # the same decision on every rank
        if every.shape[0] < 2 or bool((every == every[0]).all()):
            return (z_rest * 0.0).sum() + (z_task * 0.0).sum()
        return nt_xent(z_rest, z_task, self._objective["temperature"], groups=subjects, global_negatives=self.training)

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        (xr, tr_, mr), (xt, tt, mt) = self._views(batch)
        z_rest, z_task = self.embedding(xr, tr_, mr), self.embedding(xt, tt, mt)
        subjects = batch["subject"]
        con = self.contrastive_loss(z_rest, z_task, subjects)
        out = {"nt_xent": con}
        if self.mode == "self_supervised":
            out["loss"] = con
        else:
            sup = self.supervised_loss(self.head(self.fuse(z_rest, z_task)), self._labels(batch))
            out["supervised"] = sup
            out["loss"] = sup + self._objective["lambda_contrast"] * con
        with torch.no_grad():
            nearest = (z_rest @ z_task.T).argmax(dim=1)
            out["rest_to_task_top1"] = (subjects[nearest] == subjects).float().mean()
        self._last = (z_rest.detach(), subjects)
        return out

    # -- validation: rest-only predictions per subject (R2T-Net's eval_role=rest) ----------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if self.mode != "fine_tune" or self._last is None or not all(k in batch for k in self.targets):
            return
        z_rest, subjects = self._last
        self._val.add(subjects, self._probabilities(self._in_label_units(self.head(z_rest))), self._labels(batch))

    def on_validation_epoch_end(self) -> None:
        """``val/<loss>`` and the rest-only subject metrics over the windows of every rank (gathered)."""
        super().on_validation_epoch_end()
        if self.mode != "fine_tune":
            return
        rows = self._val.gathered(self.device)
        self._val.clear()
        if rows is None:
            return
        _, outputs, labels = per_subject_means(*rows)
        for name, value in subject_metrics(outputs, labels, self.kind, self._objective["num_classes"]).items():
            self.log(f"val/{name}", value, sync_dist=True)

    # -- inference ----------------------------------------------------------------------------------------------
    def _in_label_units(self, out: torch.Tensor) -> torch.Tensor:
        """Head outputs ``(B, n_out)``: regression targets in their own units (de-standardised), logits as they are."""
        if self.kind != "regression":
            return out
        mean, std = self._scaling(out.device)
        return out * std + mean

    def _probabilities(self, out: torch.Tensor) -> torch.Tensor:
        """:meth:`head_output` -> :meth:`predict`: the positive-class probability (binary), class probabilities
        (multiclass); regression unchanged."""
        if self.kind == "binary":
            return torch.sigmoid(out)
        if self.kind == "multiclass":
            return out.softmax(dim=-1)
        return out

    def head_output(self, batch: dict) -> torch.Tensor:
        """R2T-Net's head on the rest embedding of each window, with its gradient (:meth:`BrainfmTask.head_output`):
        targets in their own units ``(B, n_targets)`` (regression), the positive-class logit ``(B, 1)``
        (binary), class logits ``(B, C)`` (multiclass).

        Raises:
            ConfigError: a task trained ``self_supervised`` (its head was never trained).
        """
        if self.mode != "fine_tune":
            raise ConfigError("this R2T model was trained with task.mode=self_supervised: its prediction head is "
                              "untrained. Fine-tune it with labels first (task.mode=fine_tune task.init_from=<ckpt>)")
        return self._in_label_units(self.head(self._rest_embedding(batch)))

    def _rest_embedding(self, batch: dict) -> torch.Tensor:
        x, t = self._view(batch, REST)
        return self.embedding(x.float() if x.ndim == 6 else x, t, REST)

    @torch.no_grad()
    def embed(self, batch: dict) -> torch.Tensor:
        """Rest embedding ``(B, embed_dim)`` of the batch's ``bold``/``volume`` windows (R2T-Net's
        rest-only signature)."""
        return self._rest_embedding(batch)

    @torch.no_grad()
    def tokens(self, batch: dict) -> None:
        """None: R2T-Net's embedding is the projection of pooled tokens that carry a modality embedding; the
        backbone's own features would not be what :meth:`embed` reads."""
        return None

    @torch.no_grad()
    def signature(self, batch: dict) -> torch.Tensor:
        """Signature ``(B, 2 * embed_dim)``: rest and task embeddings of a paired batch, concatenated.

        Raises:
            ConfigError: a batch without the task view (use :meth:`embed` for rest only).
        """
        (xr, tr_), (xt, tt) = self._view(batch, REST), self._view(batch, TASK)
        to = (lambda v: v.float()) if xr.ndim == 6 else (lambda v: v)
        return torch.cat([self.embedding(to(xr), tr_, REST), self.embedding(to(xt), tt, TASK)], dim=-1)

    @torch.no_grad()
    def predict(self, batch: dict) -> torch.Tensor:
        """Rest-only prediction per window: targets in their own units ``(B, n_targets)``
        (regression), the positive-class probability ``(B, 1)`` (binary) or class probabilities
        ``(B, C)`` (multiclass).

        Raises:
            ConfigError: a task trained ``self_supervised`` (its head was never trained).
        """
        return self._probabilities(self.head_output(batch))

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        return {"subject": batch["subject"], "prediction": self.predict(batch)}


def _as_list(value) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return [float(value)]
    return [float(v) for v in value]


@torch.no_grad()
def predict_subjects(task: R2TTask, batches: Iterable[dict], subject_ids: Sequence[str]) -> dict[str, torch.Tensor]:
    """Rest-only prediction of every subject: the mean of its windows' predictions.

    Args:
        task: a fine-tuned R2T task (put in eval mode here).
        batches: rest-only batches (e.g. ``R2TDataModule.predict_dataloader()``).
        subject_ids: subject id of each subject index (``R2TDataModule.subjects``).

    Returns:
        subject id -> prediction ``(n_out,)`` (see :meth:`R2TTask.predict`), in subject order.
    """
    task.eval()
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = defaultdict(int)
    for batch in batches:
        pred = task.predict(batch).float().cpu()
        for s, p in zip(batch["subject"].tolist(), pred):
            sums[s] = sums.get(s, 0) + p
            counts[s] += 1
    return {subject_ids[s]: sums[s] / counts[s] for s in sorted(sums)}


def write_prediction_csv(path: str | os.PathLike, predictions: dict[str, torch.Tensor],
                         columns: Sequence[str] | None = None) -> Path:
    """Write ``subject_id,prediction`` rows (R2T-Net's rest-only inference CSV) atomically.

    One prediction column is named ``prediction``; several are named ``prediction_<column>``
    (``columns``: e.g. the target names, default ``0, 1, ...``).
    """
    path = Path(path)
    width = len(next(iter(predictions.values())).reshape(-1)) if predictions else 1
    names = ["prediction"] if width == 1 else [f"prediction_{c}" for c in (columns or range(width))]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["subject_id", *names])
        for subject, pred in predictions.items():
            writer.writerow([subject, *(f"{float(v):.6g}" for v in pred.reshape(-1))])
    return path
