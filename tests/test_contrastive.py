"""The options of run-level contrastive learning (brainfm.tasks.contrastive.ContrastiveSequenceModeling):
``projection=none`` puts NT-Xent on the pooled embedding, the SimCLR head's width is capped, the FC target is 0 at
the identity initialisation and refused where the embedding is not the window's FC, tube-masked reconstruction
trains the backbone, TR jitter is refused for fixed-TR backbones and applies in training only, and
``task.optimizer.backbone_lr_scale`` slows the backbone below its readout and the heads."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from brainfm.errors import ConfigError
from brainfm.eval.fingerprinting import fc_features
from brainfm.tasks.contrastive import ContrastiveSequenceModeling
from brainfm.tasks.losses import nt_xent

R = 12
FC = {"_target_": "brainfm.models.fc.FunctionalConnectivity", "n_rois": R}
SEQ = {"_target_": "brainfm.models.sequence.SequenceTransformer", "n_rois": R, "d_model": 16, "depth": 1,
       "n_heads": 2, "dropout": 0.0, "attn_dropout": 0.0}
SEQ_CORR = {**SEQ, "pooling": "correlation"}
SEMANTOKS = {"_target_": "brainfm.models.semantoks.SemantoksEncoder", "n_rois": 94, "network_map": "aal2_94_lobes",
             "patch_size": 5, "conv_channels": 8, "long_conv_channels": 8, "depth": 1, "n_heads": 2}


def _batch(b=8, t=40, r=R, seed=0) -> dict:
    """Pairs of windows with their times (TR 0.72 s), one run per pair."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(r, r, generator=g)
    times = (torch.arange(t) * 0.72).expand(b, t).contiguous()
    return {"bold": torch.randn(b, t, r, generator=g) @ mix, "t": times,
            "bold2": torch.randn(b, t, r, generator=g) @ mix, "t2": times.clone(), "run": torch.arange(b)}


# -- projection ---------------------------------------------------------------------------------------------
def test_projection_none_puts_nt_xent_on_the_pooled_embedding():
    task = ContrastiveSequenceModeling(FC, projection="none", temperature=0.2).eval()
    assert isinstance(task.projection, torch.nn.Identity)
    batch = _batch()
    with torch.no_grad():
        pooled1, pooled2 = task.model.pooled(batch["bold"]), task.model.pooled(batch["bold2"])
        losses = task.compute_losses(batch)
        torch.testing.assert_close(task.embed(batch), pooled1)
    assert pooled1.shape == (8, R * (R - 1) // 2)
    expected = nt_xent(pooled1, pooled2, 0.2, groups=batch["run"], global_negatives=False)
    torch.testing.assert_close(losses["nt_xent"], expected)
    assert losses["loss"] == losses["nt_xent"]  # no auxiliary term is on


@pytest.mark.parametrize("proj_hidden,hidden", [(32, 32), (1024, 66)])
def test_mlp_projection_caps_its_hidden_width(proj_hidden, hidden):
    task = ContrastiveSequenceModeling(FC, projection="mlp", proj_hidden=proj_hidden, proj_dim=24)
    first, last = task.projection[0], task.projection[-1]
    assert (first.in_features, first.out_features) == (66, hidden)  # 66 = 12 x 11 / 2 edges
    assert (last.in_features, last.out_features) == (hidden, 24)
    task.eval()
    batch = _batch()
    with torch.no_grad():
        assert task.embed(batch).shape == (8, 66)  # embed is before the head
        z = task.projection(task.model.pooled(batch["bold"]))
    assert z.shape == (8, 24)


def test_unknown_projection_is_refused():
    with pytest.raises(ConfigError, match=r"task.projection='linear' must be mlp or none"):
        ContrastiveSequenceModeling(FC, projection="linear")


# -- FC target ----------------------------------------------------------------------------------------------
def _fc_target_by_hand(embedding: torch.Tensor, bold: torch.Tensor) -> float:
    fc = fc_features(bold.double().numpy())
    fc = fc - fc.mean(axis=1, keepdims=True)  # the readout centres its edges (model.readout.center)
    e = embedding.double().numpy()
    return float(np.mean(((e - fc) ** 2).sum(1) / (fc ** 2).sum(1)))


def test_fc_target_is_zero_at_the_identity_init_and_positive_once_the_projection_moves():
    task = ContrastiveSequenceModeling(FC, projection="none", fc_target_weight=0.5).eval()
    batch = _batch(seed=1)
    with torch.no_grad():
        losses = task.compute_losses(batch)
    assert abs(float(losses["fc_target"])) < 1e-6
    torch.testing.assert_close(losses["loss"], losses["nt_xent"] + 0.5 * losses["fc_target"])
    with torch.no_grad():
        task.model.readout.proj.weight.add_(0.2 * torch.randn(R, R, generator=torch.Generator().manual_seed(0)))
        losses = task.compute_losses(batch)
        embedding = task.model.pooled(batch["bold"])
    assert float(losses["fc_target"]) > 0.01
    assert float(losses["fc_target"]) == pytest.approx(_fc_target_by_hand(embedding, batch["bold"]), rel=1e-4)
    torch.testing.assert_close(losses["loss"], losses["nt_xent"] + 0.5 * losses["fc_target"])


@pytest.mark.parametrize("model", [SEQ_CORR, {"_target_": "brainfm.models.baselines.MeanMLP", "n_rois": R,
                                             "pooling": "correlation"}], ids=["transformer", "mean_mlp"])
def test_fc_target_starts_at_zero_under_a_deep_backbone_with_a_correlation_readout(model):
    task = ContrastiveSequenceModeling(model, projection="none", fc_target_weight=1.0).eval()
    with torch.no_grad():
        assert abs(float(task.compute_losses(_batch())["fc_target"])) < 1e-6


@pytest.mark.parametrize("model", [SEQ, {**FC, "hidden_dims": [16]}, {**FC, "hidden_dims": [66]}],
                         ids=["mean-pooled-transformer", "fc-mlp", "fc-mlp-as-wide-as-the-edges"])
def test_fc_target_is_refused_where_the_embedding_is_not_the_readout_of_the_input(model):
    """A mean-pooled transformer has no FC to compare with; an MLP on the FC edges (model=fc model.hidden_dims,
    experiment=baseline_fc_mlp) embeds something else than the edges, even when as wide."""
    with pytest.raises(ConfigError, match="model.pooling=correlation"):
        ContrastiveSequenceModeling(model, fc_target_weight=1.0)


# -- tube-masked reconstruction -----------------------------------------------------------------------------
def test_masked_reconstruction_trains_the_transformer():
    task = ContrastiveSequenceModeling(SEQ_CORR, projection="none", mask_weight=2.0, mask_ratio=0.5).train()
    torch.manual_seed(0)
    losses = task.compute_losses(_batch())
    rec = losses["masked_l1"]
    assert rec.ndim == 0 and torch.isfinite(rec) and float(rec.detach()) > 0
    torch.testing.assert_close(losses["loss"], losses["nt_xent"] + 2.0 * rec)
    blocks = [(n, p) for n, p in task.model.named_parameters() if p.requires_grad and not n.startswith("readout.")]
    grads = torch.autograd.grad(rec, [p for _, p in blocks], allow_unused=True, retain_graph=True)
    reached = [n for (n, _), g in zip(blocks, grads) if g is not None and g.abs().sum() > 0]
    assert "encoder.blocks.0.attn.qkv.weight" in reached and "embedding.proj.weight" in reached, reached
    head = torch.autograd.grad(rec, list(task.mask_head.parameters()))
    assert all(g.abs().sum() > 0 for g in head)


def test_masked_reconstruction_is_refused_without_per_tr_features():
    with pytest.raises(ConfigError, match="task.mask_weight > 0 reconstructs hidden ROIs from per-TR features, "
                                          "which FunctionalConnectivity has not"):
        ContrastiveSequenceModeling(FC, mask_weight=1.0)
    with pytest.raises(ConfigError, match=r"task.mask_ratio=1.0 must lie in \(0, 1\)"):
        ContrastiveSequenceModeling(SEQ, mask_weight=1.0, mask_ratio=1.0)


# -- TR jitter ----------------------------------------------------------------------------------------------
def test_tr_jitter_is_refused_for_a_backbone_that_assumes_one_tr():
    with pytest.raises(ConfigError, match="task.tr_jitter=0.2 changes the TR of the views, but SemantoksEncoder "
                                          "assumes one TR: set task.tr_jitter=0"):
        ContrastiveSequenceModeling(SEMANTOKS, tr_jitter=0.2)
    assert not ContrastiveSequenceModeling(SEMANTOKS, tr_jitter=0.0).model.any_tr  # without jitter it is taken
    with pytest.raises(ConfigError, match=r"must lie in \[0, 1\)"):
        ContrastiveSequenceModeling(FC, tr_jitter=1.0)


def test_tr_jitter_changes_the_view_lengths_in_training_only():
    task = ContrastiveSequenceModeling(FC, projection="none", tr_jitter=0.3)
    seen: list[int] = []
    pooled = task.model.pooled

    def recording(bold):
        seen.append(bold.shape[1])
        return pooled(bold)

    task.model.pooled = recording
    batch = _batch(t=40)
    task.train()
    for seed in range(4):
        torch.manual_seed(seed)
        losses = task.compute_losses(batch)
        assert torch.isfinite(losses["loss"])
    assert len(seen) == 8 and any(n != 40 for n in seen)
    assert all(28 <= n <= 56 for n in seen)  # floor(39 / s) + 1 for s in [0.7, 1.3]
    seen.clear()
    task.eval()
    with torch.no_grad():
        task.compute_losses(batch)
        task.embed(batch)
    assert seen == [40, 40, 40]


# -- backbone_lr_scale --------------------------------------------------------------------------------------
def _optimizer(scale: float):
    task = ContrastiveSequenceModeling(SEQ_CORR, projection="mlp", proj_hidden=32,
                                       optimizer={"lr": 1e-3, "weight_decay": 0.1, "backbone_lr_scale": scale})
    # configure_optimizers needs a trainer for the schedule's length (max_epochs=-1: max_steps, no data)
    task.trainer = L.Trainer(max_epochs=-1, max_steps=20, accelerator="cpu", logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    out = task.configure_optimizers()
    return task, out["optimizer"], out["lr_scheduler"]["scheduler"]


def test_backbone_lr_scale_slows_the_backbone_but_not_its_readout_or_the_heads():
    task, opt, sched = _optimizer(0.1)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    trainable = [(n, p) for n, p in task.named_parameters() if p.requires_grad]
    assert len(group_of) == sum(len(g["params"]) for g in opt.param_groups) == len(trainable)
    slow = [n for n, _ in trainable if n.startswith("model.") and not n.startswith("model.readout.")]
    assert slow and "model.readout.proj.weight" in dict(trainable)
    assert any(n.startswith("projection.") for n, _ in trainable)
    for name, p in trainable:
        expected = 1e-4 if name in slow else 1e-3
        assert group_of[id(p)]["initial_lr"] == pytest.approx(expected), name
    # weight decay stays on weight matrices only, scaled or not (embeddings and norms never decay)
    decay = {n: group_of[id(p)]["weight_decay"] for n, p in trainable}
    assert decay["model.encoder.blocks.0.attn.qkv.weight"] == decay["model.embedding.proj.weight"] == 0.1
    assert decay["model.encoder.blocks.0.attn.qkv.bias"] == decay["model.embedding.time.weight"] == 0.0
    assert decay["projection.0.weight"] == decay["model.readout.proj.weight"] == 0.1
    assert decay["projection.0.bias"] == decay["projection.1.weight"] == 0.0
    # the schedule scales every group alike: the backbone stays at 0.1 x the head's learning rate
    head = group_of[id(task.projection[0].weight)]
    body = group_of[id(dict(trainable)[slow[0]])]
    for _ in range(5):
        opt.step()
        sched.step()
        assert body["lr"] == pytest.approx(0.1 * head["lr"])


def test_backbone_lr_scale_1_keeps_one_learning_rate():
    _, opt, _ = _optimizer(1.0)
    assert {g["initial_lr"] for g in opt.param_groups} == {1e-3}
    assert len(opt.param_groups) == 2  # decay / no decay


@pytest.mark.parametrize("scale", [0.0, -0.5])
def test_backbone_lr_scale_must_be_positive(scale):
    with pytest.raises(ConfigError, match=rf"task.optimizer.backbone_lr_scale={scale} must be positive"):
        _optimizer(scale)


# -- validation over fixed groups of the validation set ------------------------------------------------------------
def test_validation_groups_follow_the_window_order_not_the_batches():
    """Validation NT-Xent is taken over consecutive val_group_size windows of the validation set, in window order,
    however the windows arrive (here as two ranks' interleaved batches would: even windows, then odd ones); a last
    group of one window joins the one before."""
    from brainfm.tasks.contrastive import grouped_nt_xent

    task = ContrastiveSequenceModeling(FC, projection="none", val_group_size=4).eval()
    full = _batch(b=9)
    full["run"] = torch.tensor([0, 0, 1, 1, 2, 3, 4, 5, 6])
    full["window"] = torch.arange(9)
    with torch.no_grad():
        for part in (torch.arange(0, 9, 2), torch.arange(1, 9, 2)):  # rank 0's windows, then rank 1's
            task.validation_step({k: v[part] for k, v in full.items()}, 0)
        rows = task._val_views.gathered(torch.device("cpu"))
        z1, z2 = task.projection(task.embed(full)), task.projection(task.embed({"bold": full["bold2"], "t": full["t2"]}))
    keys, r = rows
    assert keys.tolist() == list(range(9)) and r["run"].tolist() == full["run"].tolist()
    torch.testing.assert_close(r["z1"], z1)
    loss, _ = grouped_nt_xent(r["z1"], r["z2"], r["run"], 4, task.temperature)
    groups = [(0, 4), (4, 9)]  # 4 + 5: the ninth window joins the second group
    expected = sum(nt_xent(z1[a:b], z2[a:b], task.temperature, groups=full["run"][a:b]) * (b - a) for a, b in groups) / 9
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ConfigError, match="val_group_size"):
        ContrastiveSequenceModeling(FC, projection="none", val_group_size=1)


def test_one_projection_head_for_simclr_and_simdino():
    """SimCLR's head (task=contrastive) and SimDINO's (task=simdino) are one class, models.heads.ProjectionHead,
    with the state-dict keys of the heads they replace; SimDINO's older ``mlp.<i>`` keys still load."""
    from brainfm.models.heads import ProjectionHead
    from brainfm.tasks.distributed import GlobalBatchNorm1d
    from brainfm.tasks.self_distillation import simdino_head

    simclr = ProjectionHead(16, 8, 12, norm=GlobalBatchNorm1d)
    assert list(simclr.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                                         "1.num_batches_tracked", "3.weight", "3.bias"]
    dino = simdino_head(16, 32, 8, 2).eval()
    assert list(dino.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    x = torch.randn(4, 16)
    torch.testing.assert_close(dino(x).norm(dim=-1), torch.ones(4))
    legacy = {f"head.mlp.{k}": v + 1 for k, v in dino.state_dict().items()}
    holder = torch.nn.Module()
    holder.head = dino
    holder.load_state_dict(legacy)  # strict: every old key found
    assert all(torch.equal(dino.state_dict()[k[len("head.mlp."):]], v) for k, v in legacy.items())
