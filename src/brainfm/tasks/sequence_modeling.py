"""Sequence-modelling objectives on parcellated BOLD (Thomas, Ré & Poldrack 2022):

- :class:`CausalSequenceModeling` (CSM, the GPT model): one TR per window is replaced by the MASK
  token and predicted from the TRs before it (causal attention); L1 loss.
- :class:`SequenceAutoencoding` (the LSTM autoencoder): reconstruct the whole window from one
  pooled code; L1 loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from brainfm.checkpoints import load_backbone, read_state_dict
from brainfm.errors import ConfigError
from brainfm.models.backbone import require
from brainfm.models.heads import ReconstructionHead
from brainfm.tasks.base import BrainfmTask


def load_task_weights(task: torch.nn.Module, path: str, heads: tuple[str, ...], key: str = "task.init_from") -> None:
    """``task.init_from`` of the sequence objectives: the backbone's ``model.*`` weights (every key,
    :func:`brainfm.checkpoints.load_backbone`) and, where the file has them, the task's own heads
    whose keys start with ``heads`` (``head.``, ``nsp_head.``): a brainfm checkpoint of the same
    objective, or Thomas et al.'s released weights converted by
    ``brainfm-convert lfb`` (which writes both). Not saved with the task's
    hyper-parameters: a checkpoint of the run already holds the weights.

    Raises:
        CheckpointError: the file does not load.
        ConfigError: (naming ``key`` and the file) the backbone or a head does not fit the config.
    """
    load_backbone(task.model, path, key=key)
    own = task.state_dict()
    # heads this task does not have (next_sequence=false: no nsp_head) are not used
    found = {k: v for k, v in read_state_dict(path).items() if k.startswith(heads) and k in own}
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in found.items()
             if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise ConfigError(f"{key}={path}: its heads do not fit this task: {wrong[:5]}. The model and task config "
                          "(n_rois, d_model, next_sequence) must match the weights'")
    task.load_state_dict(found, strict=False)


class CausalSequenceModeling(BrainfmTask):
    """CSM: for each window ``(B, T, R)`` draw one position ``p`` in ``[1, T)``, mask it, and
    predict its BOLD ``(B, R)`` from the causal hidden state at ``p``.

    ``embed`` returns the mean of the hidden states over the window's TRs, ``(B, d)``.
    ``init_from``: weights to start from (backbone and ``head``; :func:`load_task_weights`).

    Raises:
        ConfigError: the model is not a causal sequence transformer (``model=gpt``); ``init_from``
            does not fit it.
    """

    def __init__(self, model: dict, init_from: str | None = None, **kwargs) -> None:
        super().__init__(model, **kwargs)
        require(self.model, "task=csm", "a causal sequence transformer", "model=gpt", "embed_trs", "encode", causal=True)
        self.head = ReconstructionHead(self.model.d_model, self.model.n_rois)
        self.model.use_special_tokens("mask")
        if init_from:
            load_task_weights(self, init_from, ("head.",))

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        bold, t = batch["bold"], batch["t"]
        b, n, _ = bold.shape
        rows = torch.arange(b, device=bold.device)
        pos = torch.randint(1, n, (b,), device=bold.device)
        mask = torch.zeros(b, n, dtype=torch.bool, device=bold.device)
        mask[rows, pos] = True
        hidden = self.model.encode(self.model.embed_trs(bold, t, mask))
        pred = self.head(hidden[rows, pos])
        l1 = F.l1_loss(pred, bold[rows, pos])
        return {"loss": l1, "l1": l1}

    @torch.no_grad()
    def embed(self, batch: dict) -> torch.Tensor:
        return self.model.pooled_batch(batch)


class SequenceAutoencoding(BrainfmTask):
    """LSTM autoencoder: reconstruct ``(B, T, R)`` from the pooled code; ``embed`` returns the
    pooled code ``(B, d)``.

    Raises:
        ConfigError: the model is not an autoencoder (``model=lstm_ae``).
    """

    def __init__(self, model: dict, **kwargs) -> None:
        super().__init__(model, **kwargs)
        require(self.model, "task=autoencoder", "an autoencoder of ROI windows", "model=lstm_ae", "encode", reconstructs=True)

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        recon, _ = self.model(batch["bold"], batch["t"])
        l1 = F.l1_loss(recon, batch["bold"])
        return {"loss": l1, "l1": l1}

    @torch.no_grad()
    def embed(self, batch: dict) -> torch.Tensor:
        return self.model.pooled_batch(batch)
