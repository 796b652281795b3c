"""LightningModules, one per objective family (sequence modelling, masked modelling, ...)."""

from brainfm.tasks.base import BrainfmTask
from brainfm.tasks.contrastive import ContrastiveSequenceModeling
from brainfm.tasks.masked_modeling import MaskedSequenceModeling
from brainfm.tasks.r2t import R2TTask
from brainfm.tasks.self_distillation import SimDINO
from brainfm.tasks.sequence_modeling import CausalSequenceModeling, SequenceAutoencoding
from brainfm.tasks.supervised import SupervisedTask
from brainfm.tasks.tff import TFFAutoencoder
from brainfm.tasks.volume_modeling import SimMIM

__all__ = ["BrainfmTask", "ContrastiveSequenceModeling", "CausalSequenceModeling", "MaskedSequenceModeling", "R2TTask", "SequenceAutoencoding", "SimDINO", "SimMIM", "SupervisedTask", "TFFAutoencoder"]
