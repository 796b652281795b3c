"""brainfm checkpoints as Brainmarks models: the plugin ``brainfm`` of Brainmarks' model registry.

Brainmarks (MedARC, ``pip install brainmarks``; arXiv 2510.13768) finds its models as modules of the
``brainmarks.models`` namespace package: its registry imports every module of
``brainmarks.models.__path__`` (``pkgutil.iter_modules``), whichever distribution installed it. brainfm
ships this one file there (``src/brainmarks/models/brainfm.py``, no ``__init__.py`` on the way, so it
never shadows Brainmarks' own modules), and ``create_model("brainfm", ckpt_path=...)`` evaluates any brainfm
checkpoint of an ROI family (sequence transformers ``model=bert|gpt``, ``model=lstm_ae``, Brain-Semantoks
``model=semantoks``, ``model=temporal_mlp``, the baselines ``model=fc|mean_mlp|brainnetcnn``) in
``python -m brainmarks.main_logistic`` / ``main_probe`` / ``models.test_models``.

The plugin only adapts. The checkpoint is read by :func:`brainfm.runs.load_checkpoint` and rebuilt by
:func:`brainfm.runs.build_task_from_checkpoint`; embeddings are the task's own :meth:`embed` (what
``brainfm-extract`` writes) and :meth:`tokens`; the Brainmarks space is
:func:`brainfm.data.atlases.brainmarks_space` of the checkpoint's atlas; TRs are changed by
:func:`brainfm.data.stores.resample.resample_run` and z-scoring is :class:`brainfm.data.normalization.ROINormalizer`.
brainfm is imported when a model is created, not when Brainmarks imports its plugins.

Volume families (Swin4D, TFF: ``data=volumes``) are refused: Brainmarks' ``mni`` space is the 228,483
voxels of the MNI152NLin6Asym 2 mm brain mask, which a transform can put back on a grid only with that
mask from TemplateFlow (a download at run time), and brainfm's volume models read 96^3 crops of their own
preprocessing (docs/brainmarks.md).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from brainmarks.models.base import Embeddings
from brainmarks.models.registry import register_model

#: environment variable with the checkpoint (file or run directory) when ``ckpt_path`` is not given
CKPT_ENV = "BRAINFM_CKPT"


class BrainfmTransform:
    """Brainmarks' sample -> the window a brainfm checkpoint was trained on.

    Brainmarks gives ``bold`` ``(T, dim)`` z-scored over time per dimension, its ``mean`` / ``std``
    ``(1, dim)`` and ``tr`` in seconds. In turn:

    1. normalization as the checkpoint recorded it (``data.normalization.mode``): ``run`` keeps the
       z-scored series (a run's own statistics, as Brainmarks'); ``global`` un-normalizes
       (``bold * std + mean``) and applies the training data's statistics saved in the checkpoint;
       ``none`` un-normalizes;
    2. a model that assumes its training TR (``any_tr`` False: Semantoks' patches of TRs) gets the series
       resampled to it (polyphase filtering, :func:`~brainfm.data.stores.resample.resample_run`), then, in
       ``run`` mode, z-scored again over the resampled TRs; models that embed time in seconds keep the TR;
    3. the first ``length`` TRs (the checkpoint's ``data.window.length`` unless given); a shorter series is
       kept as it is, zero-padded at the end only up to ``min_length`` (one temporal patch of Semantoks).

    Returns the sample with ``bold`` ``(L, dim)`` float32, ``t`` ``(L,)`` float32 seconds from the first
    TR, and ``tr`` the TR of ``bold`` (other entries, e.g. targets, unchanged).

    Raises:
        ValueError: ``bold`` of another dimension than the checkpoint's ROI count, or non-finite values.
    """

    def __init__(self, n_rois: int, mode: str, length: int, min_length: int = 2, tr: float | None = None,
                 normalizer: Any = None, eps: float = 1e-6) -> None:
        self.n_rois, self.mode, self.length, self.min_length = int(n_rois), str(mode), int(length), int(min_length)
        self.tr = None if tr is None else float(tr)
        self.normalizer, self.eps = normalizer, float(eps)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from brainfm.data.normalization import ROINormalizer
        from brainfm.data.stores.resample import resample_run

        bold = torch.as_tensor(sample["bold"], dtype=torch.float32)
        if bold.ndim != 2 or bold.shape[1] != self.n_rois:
            raise ValueError(f"brainfm model: bold of shape {tuple(bold.shape)}, expected (T, {self.n_rois}): the "
                             "checkpoint's ROI count; evaluate it on a Brainmarks data set of its space")
        if not torch.isfinite(bold).all():
            raise ValueError("brainfm model: bold has NaN/inf values; Brainmarks samples are finite z-scored series")
        tr = float(sample["tr"])
        x = bold.numpy().astype(np.float64)
        if self.mode != "run":  # the signal before Brainmarks' z-scoring
            mean = torch.as_tensor(sample["mean"], dtype=torch.float64).reshape(1, -1).numpy()
            std = torch.as_tensor(sample["std"], dtype=torch.float64).reshape(1, -1).numpy()
            x = x * std + mean
        resampled = self.tr is not None and abs(tr - self.tr) > 1e-3
        if resampled:
            x = resample_run(x, tr, self.tr).astype(np.float64)
            tr = self.tr
        if self.mode == "global":
            x = self.normalizer.apply(0, x)
        elif self.mode == "run" and resampled:  # z-scored over the resampled run, as a ResampledStore's windows
            std = x.std(axis=0)
            x = ROINormalizer("global", self.eps, x.mean(axis=0), np.where(std < self.eps, 1.0, std)).apply(0, x)
        x = torch.from_numpy(np.ascontiguousarray(x[: self.length], dtype=np.float32))
        if len(x) < self.min_length:
            x = torch.nn.functional.pad(x, (0, 0, 0, self.min_length - len(x)))
        out = dict(sample)
        out.update(bold=x, t=torch.arange(len(x), dtype=torch.float32) * tr, tr=tr)
        return out


class BrainfmWrapper(nn.Module):
    """A brainfm task in evaluation mode, frozen, answering Brainmarks' batches.

    ``forward(batch)``: ``batch["bold"]`` ``(B, T, n_rois)`` and ``batch["t"]`` ``(B, T)`` seconds (from
    :class:`BrainfmTransform`) -> ``Embeddings(cls (B, 1, D), None, patch (B, L, D') | None)``: ``cls`` is the
    task's :meth:`embed` (the embedding ``brainfm-extract`` exports), ``patch`` its :meth:`tokens` (per-TR
    states of a sequence model, network x patch tokens of Semantoks; None with ``patch=False`` or a task
    without tokens).
    """

    __space__: str = ""

    def __init__(self, task: nn.Module, space: str, patch: bool = True) -> None:
        super().__init__()
        self.task = task.eval().requires_grad_(False)
        self.__space__ = space
        self.patch = bool(patch)

    def extra_repr(self) -> str:
        return f"space={self.__space__!r}, patch={self.patch}"

    @torch.no_grad()
    def forward(self, batch: dict[str, Tensor]) -> Embeddings:
        bold = batch["bold"].float()
        t = batch["t"].to(bold) if "t" in batch else None
        inputs = {"bold": bold, **({"t": t} if t is not None else {})}
        cls = self.task.embed(inputs).float()[:, None, :]
        patch = self.task.tokens(inputs) if self.patch else None
        return Embeddings(cls, None, None if patch is None else patch.float())


def _space(meta: dict, where: str, space: str | None) -> str:
    from brainfm.data.atlases import BRAINMARKS_SPACES, brainmarks_space
    from brainfm.errors import CheckpointError

    atlas, n = meta.get("atlas"), meta.get("n_rois")
    if n is None:
        raise CheckpointError(f"{where} records no ROI count (data_meta.n_rois): it is not a checkpoint of ROI data, "
                              "and only ROI families have a Brainmarks space here (docs/brainmarks.md)")
    if space is not None:
        if BRAINMARKS_SPACES.get(space) != int(n):
            raise CheckpointError(f"space={space!r} does not fit {where} ({n} ROIs); Brainmarks spaces: "
                                  f"{BRAINMARKS_SPACES}")
        return space
    found = brainmarks_space(atlas, int(n))
    if found is None:
        fits = [s for s, d in BRAINMARKS_SPACES.items() if d == int(n)]
        fix = (f"if its ROIs are those of {fits[0]!r} in Brainmarks' order, pass space={fits[0]}"
               if fits else "train on a Brainmarks parcellation (e.g. data.atlas=schaefer400, 400 ROIs)")
        raise CheckpointError(f"{where} was trained on atlas {atlas!r} ({n} ROIs), which is not a Brainmarks space "
                              f"(spaces and their dimensions: {BRAINMARKS_SPACES}). Fix: {fix}")
    return found


@register_model
def brainfm(ckpt_path: str | os.PathLike | None = None, space: str | None = None, window_length: int | None = None,
            patch: bool = True, **kwargs: Any) -> tuple[BrainfmTransform, BrainfmWrapper]:
    """A brainfm checkpoint as a Brainmarks model: ``(transform, wrapper)``.

    Args:
        ckpt_path: a brainfm checkpoint file or run directory (its ``checkpoints/last.ckpt``); default: the
            environment variable ``BRAINFM_CKPT`` (Brainmarks' smoke test calls ``create_model("brainfm")``
            without arguments).
        space: the Brainmarks space, when the checkpoint's atlas name is not one brainfm maps (its ROI count must
            be the space's dimension); default: from the checkpoint's ``data_meta.atlas`` and ``n_rois``.
        window_length: TRs the model sees (default: the checkpoint's ``data.window.length``).
        patch: return the tokens as ``patch`` embeddings (False: ``cls`` only, one forward pass per batch).
        kwargs: Brainmarks' other model arguments, ignored.

    Raises:
        ValueError: neither ``ckpt_path`` nor ``BRAINFM_CKPT``.
        brainfm.errors.CheckpointError: no checkpoint there (the message lists those nearby), a sharded
            checkpoint (the message names the consolidate command), a volume checkpoint, an atlas that is no
            Brainmarks space (the message lists the spaces).
    """
    from brainfm.errors import CheckpointError
    from brainfm.runs import build_task_from_checkpoint, load_checkpoint

    ckpt_path = ckpt_path or os.environ.get(CKPT_ENV) or None
    if ckpt_path is None:
        raise ValueError(f"model brainfm needs a checkpoint: create_model('brainfm', ckpt_path=<file or run dir>), "
                         f"--overrides model_kwargs.ckpt_path=<...> (brainmarks.main_logistic/main_probe), or "
                         f"{CKPT_ENV}=<file or run dir> in the environment")
    ckpt = load_checkpoint(ckpt_path)
    where = f"checkpoint {ckpt['_path']}"
    meta = ckpt["hyper_parameters"].get("data_meta") or {}
    task = build_task_from_checkpoint(ckpt)
    model = task.model
    if "volume" in getattr(model, "input_keys", ()) or meta.get("shape") is not None:
        raise CheckpointError(f"{where} is a volume model ({type(model).__name__}); the Brainmarks plugin takes ROI "
                              "checkpoints (docs/brainmarks.md says why)")
    found = _space(meta, where, space)
    from brainfm.data.normalization import ROINormalizer
    from brainfm.tasks.base import CHECKPOINT_KEY

    state = dict(ckpt[CHECKPOINT_KEY].get("normalization") or {})
    mode = state.get("mode") or (meta.get("normalization") or {}).get("mode", "run")
    if mode == "global" and state.get("mean") is None:
        raise CheckpointError(f"{where} was trained with data.normalization.mode=global but holds no statistics "
                              f"({CHECKPOINT_KEY}.normalization.mean); retrain it with brainfm >= 0.1")
    length = int(window_length or meta.get("window_length") or 0)
    if length < 2:
        raise CheckpointError(f"{where} records no window length (data_meta.window_length); pass window_length=<TRs>")
    tr = meta.get("tr")
    fixed_tr = None if model.any_tr or not isinstance(tr, (int, float)) or not math.isfinite(tr) else float(tr)
    transform = BrainfmTransform(
        n_rois=int(meta["n_rois"]), mode=mode, length=length, tr=fixed_tr,
        min_length=max(2, int(getattr(model, "patch_size", 1))),
        normalizer=ROINormalizer.from_state(state) if mode == "global" else None, eps=float(state.get("eps", 1e-6)),
    )
    return transform, BrainfmWrapper(task, found, patch=patch)
