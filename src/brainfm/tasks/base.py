"""What every brainfm LightningModule shares: building the model from its config, AdamW with
warm-up + cosine, logging, deterministic per-step randomness, the data facts a checkpoint
must carry (TR, ROI order, normalization), FSDP2 sharding and ``torch.compile`` of the backbone.

Hyper-parameters are saved as plain containers, so checkpoints load with
``torch.load(path, weights_only=True)`` and the task is rebuilt from the checkpoint alone.

Compilation (``trainer.compile=true``, ``trainer.compile_mode``): :class:`Trainer` (the
``_target_`` of every ``conf/trainer/*.yaml``) takes the two keys off before Lightning's
``Trainer`` sees them, and :meth:`BrainfmTask.configure_model` compiles the backbone's
:func:`compile_regions` with ``nn.Module.compile`` (in place: parameter names and checkpoint keys
do not change, so checkpoints load eagerly and runs resume compiled or not), after FSDP2's
``fully_shard``. Regions rather than the whole backbone because most objectives enter the
backbone through methods (``embed_trs``/``encode``, ``embed_patches``/``forward_tokens``), not
``forward``, and identical blocks share one compiled graph (PyTorch's "regional compilation").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from brainfm.errors import ConfigError
from brainfm.models import build_model
from brainfm.models.backbone import Backbone
from brainfm.strategies import apply_fully_shard
from brainfm.tasks.metrics import MeanOfBatches
from brainfm.tasks.optim import build_optimizer, build_scheduler

CHECKPOINT_KEY = "brainfm"


def plain(value: Any) -> Any:
    """OmegaConf containers -> Python dicts/lists (resolved)."""
    if isinstance(value, DictConfig) or OmegaConf.is_list(value):
        return OmegaConf.to_container(value, resolve=True)
    return value


#: ``trainer.compile_mode`` values (``torch.compile``'s modes; null: its default)
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class CompileOptions:
    """``trainer.compile`` / ``trainer.compile_mode``.

    Raises:
        ConfigError: ``compile`` is not a boolean or ``mode`` not one of :data:`COMPILE_MODES`.
    """

    enabled: bool = False
    mode: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"trainer.compile={self.enabled!r} must be true or false")
        if self.mode not in COMPILE_MODES:
            raise ConfigError(f"trainer.compile_mode={self.mode!r} must be one of "
                              f"{', '.join('null' if m is None else m for m in COMPILE_MODES)}")


class Trainer(L.Trainer):
    """Lightning's ``Trainer`` with brainfm's trainer-level keys taken off first: ``compile``
    (compile the backbone, :func:`compile_backbone`) and ``compile_mode``. Every other argument is
    Lightning's. It is the ``_target_`` of ``conf/trainer/cpu.yaml``, which every trainer config
    inherits, so ``brainfm-train``, the scale test, search trials and the inference entry points
    (which instantiate the same ``trainer`` group) all accept the keys.

    Raises:
        ConfigError: a bad ``compile`` / ``compile_mode`` (:class:`CompileOptions`).
    """

    def __init__(self, *args: Any, compile: bool = False, compile_mode: str | None = None, **kwargs: Any) -> None:
        self.compile_options = CompileOptions(compile, compile_mode)
        super().__init__(*args, **kwargs)


def compile_regions(model: nn.Module) -> list[nn.Module]:
    """The submodules of a backbone that ``trainer.compile=true`` compiles: the model's own
    ``compile_regions()`` when it has one (where its objectives' hot path goes through
    ``__call__``), else its repeated blocks (:meth:`~brainfm.models.backbone.Backbone.fsdp_units`:
    Swin4D's blocks), else the whole model."""
    own = getattr(model, "compile_regions", None)
    if callable(own):
        return list(own())
    units = getattr(model, "fsdp_units", None)
    blocks = list(units()) if callable(units) else []
    return blocks or [model]


def compile_backbone(model: nn.Module, mode: str | None = None) -> list[nn.Module]:
    """Compile :func:`compile_regions` of ``model`` in place (``nn.Module.compile``: the module's
    ``__call__`` goes through ``torch.compile``; parameters, buffers and state-dict keys are
    untouched). Graphs are built at the first call of each region (a compile of seconds to minutes,
    per train/eval mode and per input shape). Returns the compiled modules.

    Raises:
        ConfigError: ``mode`` is not one of :data:`COMPILE_MODES`.
    """
    CompileOptions(True, mode)
    regions = compile_regions(model)
    # TorchDynamo keeps at most `recompile_limit` (8) graphs per function and runs any further variant
    # eagerly (with a warning). Regions of one class share their forward's cache, and a backbone's blocks
    # differ (Swin4D: grid and window shift per stage): one graph per distinct block, times train/eval
    # and static/dynamic batch, so allow 4 per region (process-wide; torch's own cap on all graphs, 256,
    # stays)
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(int(dynamo_config.recompile_limit), 4 * len(regions))
    for region in regions:
        region.compile(mode=mode)
    return regions


class BrainfmTask(L.LightningModule):
    """Base LightningModule. Subclasses implement :meth:`compute_losses` and :meth:`embed`.

    Args:
        model: model config with ``_target_`` (plain dict).
        optimizer: ``{lr, weight_decay, betas, eps}`` for AdamW.
        scheduler: ``{warmup_fraction | warmup_steps, min_lr_ratio}``.
        data_meta: facts about the training data (TR, ROI names, normalization, ...), saved in
            the checkpoint and checked against any data the model is later applied to.
        seed: base seed of the per-step random streams.

    Randomness: before every training batch the global torch generator is re-seeded from
    ``(seed, batch index, rank)`` (and before every validation batch from ``(seed, val batch)``),
    so masks, dropout and teacher forcing are a function of the step: a run resumed from a
    checkpoint repeats the uninterrupted run exactly.
    """

    def __init__(
        self,
        model: dict,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        data_meta: dict | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        model, optimizer, scheduler, data_meta = (plain(v) for v in (model, optimizer, scheduler, data_meta))
        self.save_hyperparameters(
            {"model": model, "optimizer": optimizer or {}, "scheduler": scheduler or {},
             "data_meta": data_meta or {}, "seed": int(seed), **self.objective_hparams()}
        )
        self.model = build_model(model)
        self.data_meta = data_meta or {}
        # recorded now: FSDP2's fully_shard later swaps the instance's class for a generated one
        self._task_class = f"{type(self).__module__}.{type(self).__qualname__}"
        self._val_means = MeanOfBatches()

    def objective_hparams(self) -> dict:
        """Objective-specific hyper-parameters to save (overridden by subclasses)."""
        return {}

    # -- objective --------------------------------------------------------------------------------
    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Return a dict with the total ``loss`` and its components."""
        raise NotImplementedError

    @torch.no_grad()
    def embed(self, batch: dict) -> torch.Tensor:
        """One embedding per window, ``(B, D)``."""
        raise NotImplementedError

    # -- capabilities ----------------------------------------------------------------------------------
    @property
    def predicts(self) -> str | None:
        """What the task's trained prediction head predicts: the task contract's one answer to "has this
        checkpoint a prediction head?" (brainfm-predict, brainfm-interpret and any other consumer ask this,
        not the task's class or its methods).

        - ``None``: no trained prediction head (self-supervised objectives; R2T trained with
          ``task.mode=self_supervised``, whose head is never trained);
        - ``"subject"``: a label of the subject, from each of its windows (``task=supervised``: the head's
          ``logits(batch)``; R2T fine-tuned: ``predict(batch)``); per-subject predictions average the windows;
        - ``"window"``: a label of each window (``task=decoding``: trial states, ``logits(batch)``); a
          subject has windows of every class, so per-subject averages do not apply.
        """
        return None

    @property
    def has_prediction_head(self) -> bool:
        """Whether the task has a trained prediction head (:attr:`predicts` is not None)."""
        return self.predicts is not None

    def head_output(self, batch: dict) -> torch.Tensor:
        """The trained prediction head's output for each window of ``batch``, ``(B, K)``, with its gradient
        (what brainfm-interpret attributes): class logits ``(B, n_classes)`` (``multiclass``, ``task=decoding``),
        the logit of class 1 ``(B, 1)`` (``binary``), the prediction in the label's own units
        ``(B, n_targets)`` (``regression``). Never a probability (softmax and sigmoid saturate).

        Raises:
            ConfigError: a task without a trained prediction head (:attr:`predicts` is None).
        """
        raise ConfigError(f"this {type(self).__name__} checkpoint has no trained prediction head")

    @torch.no_grad()
    def tokens(self, batch: dict) -> torch.Tensor | None:
        """The last-layer tokens of each window that :meth:`embed` pools, ``(B, L, D)`` (per-TR states of a
        sequence model, network x patch tokens of Semantoks; Brainmarks' ``patch`` embeddings), or None for a
        task whose embedding has no such tokens. By default the backbone's
        :meth:`~brainfm.models.backbone.Backbone.features` of the batch's inputs."""
        return self.model.features(*self.model.inputs(batch))

    # -- Lightning hooks ----------------------------------------------------------------------------
    def _seed(self, *keys: int) -> int:
        return int(np.random.SeedSequence([int(self.hparams.seed), *keys]).generate_state(1)[0])

    def on_train_start(self) -> None:
        # a resumed run: drop what loggers recorded after the checkpoint it resumes from
        for logger in self.loggers:
            if hasattr(logger, "truncate"):
                logger.truncate(self.global_step)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(self._seed(0, self.trainer.fit_loop.total_batch_idx, self.global_rank))

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        torch.manual_seed(self._seed(1, batch_idx, dataloader_idx))

    @staticmethod
    def batch_size(batch: dict) -> int:
        """Samples in a batch (ROI windows ``bold`` or volume clips ``volume``)."""
        for key in ("bold", "volume"):
            if key in batch:
                return int(batch[key].shape[0])
        return int(next(v for v in batch.values() if torch.is_tensor(v)).shape[0])

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """The objective on a batch (training and validation go through ``forward`` so that FSDP2's
        hooks on the root module gather its parameters)."""
        return self.compute_losses(batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self(batch)
        bs = self.batch_size(batch)
        # the mean over ranks: with equal per-rank batches the loss of the global batch (other train/* are rank 0's)
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=bs, sync_dist=True)
        for name, value in losses.items():
            if name != "loss":
                self.log(f"train/{name}", value, batch_size=bs)
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        losses = self(batch)
        bs = self.batch_size(batch)
        for name, value in losses.items():
            self._val_means.add(name, value, bs)

    def on_validation_epoch_end(self) -> None:
        """``val/<loss>``: the mean over every validation window of every rank (the windows are
        partitioned over the ranks), weighted by batch size; the same value on every rank."""
        for name, value in self._val_means.compute(self.device).items():
            self.log(f"val/{name}", value, prog_bar=name == "loss", sync_dist=True)
        self._val_means.clear()

    def configure_optimizers(self):
        """AdamW (:func:`~brainfm.tasks.optim.build_optimizer`; ``task.optimizer.fused``: ``auto`` takes
        the fused kernel where the parameters' device has one, except under DeepSpeed, whose ZeRO
        optimizer steps its own flat partitions) and the warm-up + cosine schedule.
        ``task.optimizer.backbone_lr_scale`` (default 1) trains the backbone, except its pooling readout,
        at ``lr`` times that factor: on few subjects a slower backbone memorises them less (README,
        "Does it beat FC?")."""
        opt_cfg = {"lr": 1e-3, "weight_decay": 0.1, "betas": (0.9, 0.999), "eps": 1e-8, "fused": "auto",
                   **self.hparams.optimizer}
        if opt_cfg["fused"] == "auto" and self._trainer is not None:
            from lightning.pytorch.strategies import DeepSpeedStrategy

            if isinstance(self.trainer.strategy, DeepSpeedStrategy):
                opt_cfg["fused"] = None
        scale = float(opt_cfg.pop("backbone_lr_scale", 1.0))
        if scale <= 0:
            raise ConfigError(f"task.optimizer.backbone_lr_scale={scale} must be positive (freeze with requires_grad)")
        if scale != 1.0:  # the backbone below its pooling readout and the task's heads
            readout = self.model.pooling_readout
            keep = {id(p) for p in readout.parameters()} if readout is not None else set()
            opt_cfg["lr_scale"] = {id(p): scale for p in self.model.parameters() if id(p) not in keep}
        optimizer = build_optimizer(self, **opt_cfg)
        sched_cfg = {"warmup_fraction": 0.01, "min_lr_ratio": 0.0, **self.hparams.scheduler}
        scheduler = build_scheduler(optimizer, self.trainer.estimated_stepping_batches, **sched_cfg)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_model(self) -> None:
        """Under ``trainer=fsdp`` (Lightning's ModelParallelStrategy), shard the blocks the backbones
        declare (:meth:`fsdp_units`) and then the whole task with FSDP2; then, with ``trainer.compile=true``, compile the backbone's
        regions (:func:`compile_backbone`; after sharding, so FSDP2's hooks stay outside the graphs).
        Lightning calls this before it wraps the module (DDP) and before a checkpoint is restored."""
        mesh = self.device_mesh
        if mesh is not None and not getattr(self, "_fully_sharded", False):
            apply_fully_shard(self, mesh, self.fsdp_units())
            self._fully_sharded = True
        options = getattr(self._trainer, "compile_options", None)
        if options is not None and options.enabled and not getattr(self, "_compiled", False):
            compile_backbone(self.model, options.mode)
            self._compiled = True

    def fsdp_units(self) -> list[nn.Module]:
        """FSDP2's sharding units under ``trainer=fsdp``: what every backbone in the task declares
        (:meth:`~brainfm.models.backbone.Backbone.fsdp_units`: the model and, where an objective keeps one,
        its EMA teacher), each once, in module order. :meth:`configure_model` shards them, then the task."""
        order = {id(m): k for k, m in enumerate(self.modules())}
        units = {id(u): u for m in self.modules() if isinstance(m, Backbone) for u in m.fsdp_units()}
        return sorted(units.values(), key=lambda u: order[id(u)])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        extra: dict[str, Any] = {
            "task_class": self._task_class,
            "data_meta": self.data_meta,
        }
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and getattr(dm, "normalizer", None) is not None:
            extra["normalization"] = dm.normalizer.state()
        checkpoint[CHECKPOINT_KEY] = extra
