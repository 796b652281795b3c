"""The task contract's capabilities (:mod:`brainfm.tasks.base`): ``predicts`` / ``has_prediction_head`` answer
"has this checkpoint a prediction head?" for every task, so consumers never test a task's class."""

from __future__ import annotations

import pytest
import torch

from brainfm.errors import ConfigError
from brainfm.tasks.contrastive import ContrastiveSequenceModeling
from brainfm.tasks.decoding import DecodingTask
from brainfm.tasks.r2t import R2TTask
from brainfm.tasks.supervised import SupervisedTask

FC = {"_target_": "brainfm.models.fc.FunctionalConnectivity", "n_rois": 6}
TMLP = {"_target_": "brainfm.models.r2t_encoders.TemporalMLPEncoder", "n_rois": 6, "d_model": 8}


def test_every_task_says_whether_and_what_its_head_predicts():
    cases = [
        (ContrastiveSequenceModeling(FC), None),
        (SupervisedTask(FC), "subject"),
        (DecodingTask(FC, num_classes=4), "window"),
        (R2TTask(TMLP, embed_dim=8, mode="fine_tune", target="age"), "subject"),
        (R2TTask(TMLP, embed_dim=8, mode="self_supervised"), None),
    ]
    for task, level in cases:
        assert task.predicts == level and task.has_prediction_head == (level is not None), type(task).__name__
    bare = SupervisedTask(FC)
    bare.logits = None  # a head that cannot be reached is no head
    assert bare.predicts is None and not bare.has_prediction_head


def test_head_output_is_the_head_before_any_probability_and_refused_without_a_head():
    """``head_output``: what brainfm-interpret attributes, with its gradient; the units brainfm-predict reports
    before its probabilities."""
    torch.manual_seed(0)
    batch = {"bold": torch.randn(3, 10, 6), "t": torch.arange(10.0).repeat(3, 1) * 0.72}
    bare = SupervisedTask(FC)
    bare.logits = None
    for task in (ContrastiveSequenceModeling(FC), R2TTask(TMLP, embed_dim=8, mode="self_supervised"), bare):
        with pytest.raises(ConfigError, match="no trained prediction head|its prediction head is untrained"):
            task.head_output(batch)
    reg = SupervisedTask(FC, kind="regression", label_mean=30.0, label_std=5.0).eval()
    torch.testing.assert_close(reg.head_output(batch), reg.logits(batch) * 5 + 30)  # the label's units
    dec = DecodingTask(FC, num_classes=4).eval()
    torch.testing.assert_close(dec.head_output(batch), dec.logits(batch))  # class logits, one row per window
    binary = R2TTask(TMLP, embed_dim=8, target="sex", kind="binary").eval()  # a head, and no logits()
    z = binary.head_output(batch)
    assert z.shape == (3, 1) and z.requires_grad
    torch.testing.assert_close(torch.sigmoid(z).detach(), binary.predict(batch))  # predict: its probability
    two = R2TTask(TMLP, embed_dim=8, target=["wm", "gambling"], label_mean=[10.0, 20.0], label_std=[2.0, 3.0]).eval()
    torch.testing.assert_close(two.head_output(batch).detach(), two.predict(batch))  # regression: the targets' units
    standardised = two.head(two.embed(batch))
    torch.testing.assert_close(two.predict(batch), standardised * torch.tensor([2.0, 3.0]) + torch.tensor([10.0, 20.0]))
