"""LightningModules, one per objective family (sequence modelling, masked modelling, ...)."""

from brainfm.tasks.base import BrainfmTask
from brainfm.tasks.contrastive import ContrastiveSequenceModeling
from brainfm.tasks.masked_modeling import MaskedSequenceModeling
from brainfm.tasks.sequence_modeling import CausalSequenceModeling, SequenceAutoencoding

__all__ = ["BrainfmTask", "ContrastiveSequenceModeling", "CausalSequenceModeling", "MaskedSequenceModeling", "SequenceAutoencoding"]
