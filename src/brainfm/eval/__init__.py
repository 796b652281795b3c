"""Downstream protocols: subject re-identification, functional-connectivity fingerprinting."""

from brainfm.eval.fingerprinting import fc_features
from brainfm.eval.reidentification import reidentification

__all__ = ["fc_features", "reidentification"]
