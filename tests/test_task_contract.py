"""The task contract's capabilities (:mod:`brainfm.tasks.base`): ``predicts`` / ``has_prediction_head`` answer
"has this checkpoint a prediction head?" for every task, so consumers never test a task's class."""

from __future__ import annotations

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
