"""Masked modelling of fMRI volumes: SimMIM on any Swin4D version (SwiFT v2 pretraining)."""

from __future__ import annotations

import torch
from torch import nn

from brainfm.errors import ConfigError
from brainfm.models.backbone import require
from brainfm.models.simmim import SimMIMDecoder, patch_mask
from brainfm.tasks.base import BrainfmTask


class SimMIM(BrainfmTask):
    """SimMIM for 4-D fMRI (Xie et al. 2022; SwiFT v2).

    A learned mask token replaces the embedding of masked patches (before the position
    embeddings); a light decoder reconstructs the voxels from the last stage; L1 on the masked
    voxels only (and inside the brain mask when the batch carries ``brain_mask``).

    Args:
        mask_ratio: fraction of masked patches, 0.2-0.8 (v9: 0.6, v11: 0.8).
        mask_kind: ``random`` or ``tube`` (the same spatial mask at every TR).
        decoder: ``linear`` or ``pixel_shuffle``; decoder_hidden: width of the latter.

    Batches: ``volume`` ``(B, C, H, W, D, T)`` (float16 or float32). ``embed`` returns the pooled
    last-stage features ``(B, C_last)`` of the unmasked volume.

    Raises:
        ConfigError: a backbone other than Swin4D, or a ratio outside [0.05, 0.95].
    """

    def __init__(self, model: dict, mask_ratio: float = 0.6, mask_kind: str = "random", decoder: str = "linear",
                 decoder_hidden: int = 64, **kwargs) -> None:
        self._objective = {"mask_ratio": float(mask_ratio), "mask_kind": mask_kind, "decoder": decoder,
                           "decoder_hidden": int(decoder_hidden)}
        super().__init__(model, **kwargs)
        require(self.model, "task=simmim", "a Swin4D backbone (patch embeddings of volume clips)",
                "model=swin4d_v7 ... swin4d_v11", "embed_patches", "forward_tokens",
                input_keys=("volume",))
        if not 0.05 <= mask_ratio <= 0.95:
            raise ConfigError(f"task.mask_ratio={mask_ratio} must lie in [0.05, 0.95] (SwiFT v2 uses 0.6-0.8)")
        if mask_kind not in ("random", "tube"):
            raise ConfigError(f"task.mask_kind={mask_kind!r} must be 'random' or 'tube'")
        m = self.model
        self.mask_token = nn.Parameter(torch.zeros(m.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        merges = 2 ** (m.num_layers - 1)
        stride = (m.patch_size[0] * merges, m.patch_size[1] * merges, m.patch_size[2] * merges, m.patch_size[3])
        self.decoder = SimMIMDecoder(m.num_features, stride, m.in_chans, decoder, decoder_hidden)
        self.mask_ratio, self.mask_kind = float(mask_ratio), mask_kind

    def objective_hparams(self) -> dict:
        return dict(self._objective)

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        x = batch["volume"].float()
        tokens = self.model.embed_patches(x)
        b, d, h, w, t, _ = tokens.shape
        mask = patch_mask(b, (d, h, w, t), self.mask_ratio, self.mask_kind, device=x.device)
        tokens = torch.where(mask[..., None], self.mask_token.to(tokens.dtype), tokens)
        recon = self.decoder(self.model.forward_tokens(tokens))
        ph, pw, pd, pt = self.model.patch_size
        voxels = (mask.repeat_interleave(ph, 1).repeat_interleave(pw, 2).repeat_interleave(pd, 3)
                  .repeat_interleave(pt, 4))[:, None]  # (B, 1, H, W, D, T)
        if "brain_mask" in batch:
            voxels = voxels & batch["brain_mask"].bool().view(b, 1, *x.shape[2:5], 1)
        err = (recon - x).abs() * voxels
        l1 = err.sum() / (voxels.sum().clamp_min(1) * x.shape[1])
        return {"loss": l1, "l1_masked": l1}

    @torch.no_grad()
    def embed(self, batch: dict) -> torch.Tensor:
        return self.model.embed(batch["volume"])
