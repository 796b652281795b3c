"""Downstream protocols: subject re-identification, functional-connectivity fingerprinting, linear
probes (scikit-learn with subject-grouped CV, or BatchNorm + linear in torch) and few-subject curves."""

from brainfm.eval.fingerprinting import fc_features
from brainfm.eval.probe import few_subject_curve, fit_predict_sklearn, sklearn_probe, torch_probe
from brainfm.eval.reidentification import reidentification, split_by_session

__all__ = ["fc_features", "few_subject_curve", "fit_predict_sklearn", "reidentification", "sklearn_probe", "split_by_session",
           "torch_probe"]
