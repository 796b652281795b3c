"""TFF pre-training: reconstruct every TR of a clip from the 3-D CNN + transformer autoencoder
(Malkiel et al. 2022, arXiv:2112.05761; GonyRosenman/TFF ``trainer.py``, ``losses.py``,
``loss_writer.py``).

The objective of the reference (``transformer_reconstruction``; its factors all default to 1):

- reconstruction: L1 between the output and the global z-norm channel, over all voxels;
- intensity: L1 on the "intense" voxels only: per sample and TR, the brain voxels whose absolute
  per-voxel z-score is above its 90th percentile (the top decile of the per-voxel channel);
- perceptual (optional): MSE between VGG16 features (relu2_2 and relu3_3, summed) of output and
  target, on a random 10 % of the axial (X-Y) slices, each repeated to 3 channels.

The reference needs torchvision's ImageNet VGG16 for the last term; here the few layers it uses are
built in plain torch and read from a local weights file (``task.perceptual_weights``), since a
training node may have neither torchvision nor internet.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from brainfm.checkpoints import load_backbone, read_state_dict
from brainfm.errors import CheckpointError, ConfigError
from brainfm.models.tff import TFF
from brainfm.tasks.base import BrainfmTask

#: indices of VGG16's ``features`` convolutions up to relu3_3 (torchvision layout) and their widths
VGG16_CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256), 14: (256, 256)}


def intense_voxels(reference: torch.Tensor, brain_mask: torch.Tensor | None = None, quantile: float = 0.9) -> torch.Tensor:
    """TFF's "intense" voxels: per sample and TR, the brain voxels whose ``|reference|`` is strictly
    above the ``quantile`` (linear interpolation, ``torch.quantile``) of ``|reference|`` over the
    brain voxels of that sample and TR.

    TFF (``losses.get_intense_voxels``) uses the per-voxel z-norm channel, quantile 0.9, and takes as
    brain every voxel above the value of the corner voxel ``[0, 0, 0]`` (its background is the
    minimum); here ``brain_mask`` is used when given, else the voxels that differ from the corner
    voxel (brainfm's per-voxel channel is 0 outside the brain, so "above" would drop negative z).

    Args:
        reference: ``(B, X, Y, Z, T)``, e.g. the per-voxel z-norm channel.
        brain_mask: ``(B, X, Y, Z)`` bool, or None.
        quantile: in (0, 1); TFF: 0.9 (the top decile).

    Returns: bool ``(B, X, Y, Z, T)``.

    Raises:
        ConfigError: ``quantile`` outside (0, 1).
    """
    if not 0.0 < quantile < 1.0:
        raise ConfigError(f"task.intensity_quantile={quantile} must lie in (0, 1) (TFF: 0.9)")
    ref = reference.detach().float()
    b, t = ref.shape[0], ref.shape[-1]
    mag = ref.abs().reshape(b, -1, t)  # (B, V, T)
    if brain_mask is not None:
        brain = brain_mask.bool().reshape(b, -1, 1).expand_as(mag)
    else:
        brain = (ref != ref[:, :1, :1, :1, :]).reshape(b, -1, t)
    values = torch.where(brain, mag, torch.full_like(mag, float("nan")))  # NaN: not brain
    # (B, T); NaN for an empty brain. torch.quantile's size limit (2**24) applies per row (V voxels)
    thresholds = torch.nanquantile(values.transpose(1, 2), quantile, dim=-1)
    return (brain & (mag > thresholds[:, None, :])).view(ref.shape)


class VGG16Features(nn.Module):
    """VGG16's convolutions up to relu3_3 (Simonyan & Zisserman 2015), read from a local weights file,
    frozen: ``(N, 3, H, W)`` -> ``(relu2_2 (N, 128, H/2, W/2), relu3_3 (N, 256, H/4, W/4))``.

    The weights are non-trainable buffers outside any checkpoint. The file is a state dict saved with
    ``torch.save`` (or ``.safetensors``) in torchvision's ``vgg16`` layout: keys
    ``features.{0,2,5,7,10,12,14}.{weight,bias}`` (a whole VGG16 state dict works; other keys are
    ignored; the ``features.`` prefix is optional).

    Raises:
        ConfigError: the file is missing, unreadable, or lacks a key or has a wrong shape (named).
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"task.perceptual_weights={path}: no such file. Fix: point it at a VGG16 state dict "
                              "(torchvision layout, e.g. vgg16-397923af.pth), or set task.perceptual=false")

        try:
            state = read_state_dict(path)
        except CheckpointError as exc:
            raise ConfigError(f"task.perceptual_weights: {exc}") from exc
        state = {k[len("features."):] if k.startswith("features.") else k: v for k, v in state.items()}
        self.layers = []
        for i, (c_in, c_out) in VGG16_CONVS.items():
            for part, shape in (("weight", (c_out, c_in, 3, 3)), ("bias", (c_out,))):
                value = state.get(f"{i}.{part}")
                if value is None or tuple(value.shape) != shape:
                    got = "missing" if value is None else f"shape {tuple(value.shape)}"
                    raise ConfigError(f"task.perceptual_weights={path}: features.{i}.{part} is {got}, expected "
                                      f"{shape} (a torchvision VGG16 state dict)")
                self.register_buffer(f"w{i}_{part}", value.detach().float().clone(), persistent=False)
            self.layers.append(i)

    def _conv(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return F.relu(F.conv2d(x, getattr(self, f"w{i}_weight").to(x.dtype), getattr(self, f"w{i}_bias").to(x.dtype),
                               padding=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._conv(self._conv(x, 0), 2)
        x = self._conv(self._conv(F.max_pool2d(x, 2), 5), 7)
        relu2_2 = x
        x = self._conv(self._conv(self._conv(F.max_pool2d(x, 2), 10), 12), 14)
        return relu2_2, x


def perceptual_loss(net: VGG16Features, output: torch.Tensor, target: torch.Tensor, fraction: float) -> torch.Tensor:
    """TFF's perceptual loss: a random ``fraction`` of the axial slices of ``(B, 1, X, Y, Z, T)``
    volumes (TFF: 0.1 with the transformer, 0.25 in its phase-1 autoencoder), repeated to 3
    channels; the sum over relu2_2 and relu3_3 of the MSE between the features. Slices are drawn
    with the global generator (seeded per step by :class:`~brainfm.tasks.base.BrainfmTask`)."""
    b, c, x, y, z, t = output.shape
    n = b * t * c * z

    def slices(v: torch.Tensor) -> torch.Tensor:  # (B, C, X, Y, Z, T) -> (B * T * C * Z, 1, X, Y)
        return v.permute(0, 5, 1, 4, 2, 3).reshape(n, 1, x, y)

    pick = torch.randperm(n, device=output.device)[: max(1, int(n * fraction))]
    out = slices(output)[pick].expand(-1, 3, -1, -1)
    with torch.no_grad():
        ref = net(slices(target)[pick].expand(-1, 3, -1, -1).to(out.dtype))
    return sum(F.mse_loss(a.float(), r.float()) for a, r in zip(net(out), ref))


def load_pretrained_tff(model: TFF, path: str | Path) -> list[str]:
    """Initialise ``model`` from a brainfm checkpoint (its ``model.*`` weights), ``.safetensors`` or a
    plain state dict; the transformer may be missing from the file (TFF's phase 1 -> phase 2).
    Returns the keys left at their initialisation.

    Raises:
        ConfigError: missing file, or keys that do not fit the model.
    """
    return load_backbone(model, path, may_be_missing=("transformer.",))


class TFFAutoencoder(BrainfmTask):
    """TFF pre-training on volume clips: L1 reconstruction + intensity loss (+ optional perceptual).

    Args:
        model: a :class:`~brainfm.models.tff.TFF` config.
        reconstruction_weight, intensity_weight, perceptual_weight: factors (TFF: 1, 1, 1).
        intensity_quantile: intense voxels lie above this quantile of ``|per-voxel z|`` (TFF: 0.9).
        target_channel: input channel reconstructed (0: global z-norm).
        intensity_channel: input channel that selects the intense voxels (1: per-voxel z-norm; 0 when
            the model sees only one channel).
        perceptual: add the VGG16 perceptual term (off by default: it needs ImageNet weights).
        perceptual_weights: local VGG16 state dict (torchvision layout), required when ``perceptual``.
        perceptual_fraction: fraction of axial slices per step (TFF: 0.1).
        init_from: weights to start from (e.g. a ``num_layers=0`` phase-1 checkpoint); not saved in
            the checkpoint's hyper-parameters (the weights are).

    Batches: ``volume`` ``(B, C, X, Y, Z, T)`` (float16 or float32; channel 0 global z-norm, channel 1
    per-voxel z-norm with ``data.normalization.load=stored+voxel``) and optionally ``brain_mask``
    ``(B, X, Y, Z)``. :meth:`embed` returns the model's pooled output ``(B, hidden_size)``.

    Raises:
        ConfigError: not a TFF model; channels, grid or clip length of ``data_meta`` that do not fit the
        model; ``perceptual=true`` without ``task.perceptual_weights``; invalid weights or channels.
    """

    def __init__(self, model: dict, reconstruction_weight: float = 1.0, intensity_weight: float = 1.0,
                 intensity_quantile: float = 0.9, target_channel: int = 0, intensity_channel: int = 1,
                 perceptual: bool = False, perceptual_weight: float = 1.0, perceptual_weights: str | None = None,
                 perceptual_fraction: float = 0.1, init_from: str | None = None, **kwargs) -> None:
        self._objective = {
            "reconstruction_weight": float(reconstruction_weight), "intensity_weight": float(intensity_weight),
            "intensity_quantile": float(intensity_quantile), "target_channel": int(target_channel),
            "intensity_channel": int(intensity_channel), "perceptual": bool(perceptual),
            "perceptual_weight": float(perceptual_weight),
            "perceptual_weights": None if perceptual_weights is None else str(perceptual_weights),
            "perceptual_fraction": float(perceptual_fraction), "init_from": None,
        }
        super().__init__(model, **kwargs)
        m = self.model
        if not isinstance(m, TFF):
            raise ConfigError(f"task=tff_autoencoder needs model=tff; got {type(m).__name__}")
        for key in ("target_channel", "intensity_channel"):
            if not 0 <= self._objective[key] < m.in_chans:
                raise ConfigError(f"task.{key}={self._objective[key]} is not a channel of the input "
                                  f"(model.in_chans={m.in_chans})")
        if not 0.0 < intensity_quantile < 1.0:
            raise ConfigError(f"task.intensity_quantile={intensity_quantile} must lie in (0, 1) (TFF: 0.9)")
        if not 0.0 < perceptual_fraction <= 1.0:
            raise ConfigError(f"task.perceptual_fraction={perceptual_fraction} must lie in (0, 1] (TFF: 0.1)")
        if perceptual and not perceptual_weights:
            raise ConfigError(
                "task.perceptual=true needs VGG16 ImageNet weights, and brainfm downloads nothing: set "
                "task.perceptual_weights=<path to a VGG16 state dict> (torchvision layout, e.g. vgg16-397923af.pth "
                "copied from a machine with internet), or keep task.perceptual=false"
            )
        self._check_data_meta(self.data_meta)
        if init_from:
            load_pretrained_tff(m, init_from)
        self._vgg: dict[str, VGG16Features] = {}  # a plain dict: not a submodule, so not in checkpoints or DDP

    def objective_hparams(self) -> dict:
        return dict(self._objective)

    def _check_data_meta(self, meta: dict) -> None:
        m = self.model
        chans = meta.get("in_chans")
        if chans is not None and int(chans) != m.in_chans:
            load = (meta.get("normalization") or {}).get("load")
            raise ConfigError(
                f"model.in_chans={m.in_chans} but the data give {chans} channel(s) (data.normalization.load={load!r}). "
                "Fix: TFF's two channels (global + per-voxel z-norm) come with data.normalization.load=stored+voxel; "
                "for one channel set model.in_chans=1 task.intensity_channel=0"
            )
        shape = meta.get("shape")
        if shape is not None and tuple(int(s) for s in shape) != m.img_size:
            raise ConfigError(f"model.img_size={list(m.img_size)} but the data's grid is {list(shape)}: set "
                              f"model.img_size={list(shape)}")
        length = meta.get("window_length")
        if length is not None and m.transformer is not None and int(length) + 1 > m.transformer.max_positions:
            raise ConfigError(f"data.window.length={length} TRs needs {int(length) + 1} positions (CLS included) but "
                              f"model.max_positions={m.transformer.max_positions}")

    # -- perceptual network: loaded when training starts (a checkpoint rebuilt for embeddings never reads it)
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.perceptual:
            self._perceptual_net(self.device)

    def _perceptual_net(self, device: torch.device) -> VGG16Features:
        net = self._vgg.get("net")
        if net is None:
            net = VGG16Features(self.hparams.perceptual_weights)
            self._vgg["net"] = net
        if net.w0_weight.device != device:
            net.to(device)
        return net

    def _volume(self, batch: dict) -> torch.Tensor:
        x = batch["volume"]
        if x.shape[1] != self.model.in_chans:
            raise ConfigError(
                f"the batch has {x.shape[1]} channel(s) but model.in_chans={self.model.in_chans}. Fix: "
                "data.normalization.load=stored+voxel gives TFF's two channels (global + per-voxel z-norm)"
            )
        return x.float()

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        x = self._volume(batch)
        h = self.hparams
        recon = self.model(x).float()  # (B, 1, X, Y, Z, T)
        target = x[:, h.target_channel]  # (B, X, Y, Z, T)
        l1 = (recon[:, 0] - target).abs().mean()
        intense = intense_voxels(x[:, h.intensity_channel], batch.get("brain_mask"), h.intensity_quantile)
        intensity = ((recon[:, 0] - target).abs() * intense).sum() / intense.sum().clamp_min(1)
        losses = {"l1": l1, "intensity": intensity}
        loss = h.reconstruction_weight * l1 + h.intensity_weight * intensity
        if h.perceptual:
            net = self._perceptual_net(x.device)
            losses["perceptual"] = perceptual_loss(net, recon, target[:, None], h.perceptual_fraction)
            loss = loss + h.perceptual_weight * losses["perceptual"]
        return {"loss": loss, **losses}

    @torch.no_grad()
    def embed(self, batch: dict) -> torch.Tensor:
        return self.model.embed(self._volume(batch))
