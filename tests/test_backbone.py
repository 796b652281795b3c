"""The backbone contract (:mod:`brainfm.models.backbone`): every family gives ``features`` and
``pooled`` of the shapes it states, reads its inputs from a batch by ``input_keys``, and the token
hook composes to ``pooled``; objectives refuse a backbone by capability, naming the fix."""

from __future__ import annotations

import pytest
import torch

from brainfm.errors import ConfigError
from brainfm.models.backbone import require
from helpers import check_backbone_contract


def _families():
    from brainfm.models.fc import FunctionalConnectivity
    from brainfm.models.lstm import LSTMAutoencoder
    from brainfm.models.r2t_encoders import TemporalMLPEncoder
    from brainfm.models.semantoks import SemantoksEncoder
    from brainfm.models.sequence import SequenceTransformer
    from brainfm.models.swin4d import SwinTransformer4D
    from brainfm.models.tff import TFF

    bold, t = torch.randn(2, 20, 94), (torch.arange(20) * 0.72).expand(2, 20).contiguous()
    return {
        "gpt": (SequenceTransformer(94, 16, 1, 2, causal=True), {"bold": bold, "t": t}, True),
        "lstm_ae": (LSTMAutoencoder(94, 16, 1), {"bold": bold, "t": t}, True),
        "temporal_mlp": (TemporalMLPEncoder(94, 16), {"bold": bold, "t": t}, True),
        "fc": (FunctionalConnectivity(94), {"bold": bold}, True),
        "semantoks": (SemantoksEncoder(94, network_map="aal2_94_lobes", patch_size=5, conv_channels=8,
                                       long_conv_channels=8, depth=1, n_heads=2), {"bold": bold}, False),
        "tff": (TFF(img_size=(8, 8, 8), encoder_blocks=(1, 1), hidden_size=32, num_heads=2, intermediate_size=32,
                    max_positions=8), {"volume": torch.randn(2, 2, 8, 8, 8, 3)}, False),
        "swin4d": (SwinTransformer4D(img_size=(12, 12, 12, 4), embed_dim=6, depths=(1, 1), num_heads=(1, 2),
                                     window_size=(2, 2, 2, 2), first_window_size=(2, 2, 2, 2), patch_size=(3, 3, 3, 1)),
                   {"volume": torch.randn(2, 1, 12, 12, 12, 4)}, False),
    }


FAMILIES = ["gpt", "lstm_ae", "temporal_mlp", "fc", "semantoks", "tff", "swin4d"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_backbone_keeps_the_contract(family):
    check_backbone_contract(*_families()[family])


def _roi_backbone(family: str, **kwargs):
    from brainfm.models.fc import FunctionalConnectivity
    from brainfm.models.lstm import LSTMAutoencoder
    from brainfm.models.r2t_encoders import TemporalMLPEncoder
    from brainfm.models.semantoks import SemantoksEncoder
    from brainfm.models.sequence import SequenceTransformer

    if family == "gpt":
        return SequenceTransformer(94, 16, 1, 2, **kwargs)
    if family == "lstm_ae":
        return LSTMAutoencoder(94, 16, 1, **kwargs)
    if family == "temporal_mlp":
        return TemporalMLPEncoder(94, 16, **kwargs)
    if family == "semantoks":
        return SemantoksEncoder(94, network_map="aal2_94_lobes", patch_size=5, conv_channels=8, long_conv_channels=8,
                                depth=1, n_heads=2, **kwargs)
    return FunctionalConnectivity(94, **kwargs)


ROI_FAMILIES = ["gpt", "lstm_ae", "temporal_mlp", "semantoks", "fc"]
_READOUTS = {"mean": None, "cls": None, "code": None,
             "correlation": {"rank": 8, "include_input": False, "init": "random"},
             "correlation_input": {"rank": 12, "include_input": True},
             "covariance": {"rank": 6, "include_input": True, "matrix_norm": "log"},
             "covariance_sqrt": {"rank": 6, "include_input": False, "matrix_norm": "sqrt", "init": "random"}}


@pytest.mark.parametrize("family", ROI_FAMILIES)
@pytest.mark.parametrize("choice", sorted(_READOUTS))
def test_every_roi_backbone_keeps_the_contract_with_each_pooling(family, choice):
    """Each pooling a backbone offers keeps the contract (shapes, token hook composing to ``pooled``);
    the others are refused with the choices named."""
    pooling = choice.split("_")[0]
    readout = _READOUTS[choice]
    kwargs = {"pooling": pooling, **({"readout": readout} if readout else {})}
    if pooling not in _roi_backbone(family).poolings:
        with pytest.raises(ConfigError, match=r"model.pooling=.* choose one of"):
            _roi_backbone(family, **kwargs)
        return
    if family == "fc" and readout and not readout.get("include_input", True):
        with pytest.raises(ConfigError, match="include_input must stay true"):
            _roi_backbone(family, **kwargs)
        return
    model = _roi_backbone(family, **kwargs)
    torch.manual_seed(0)
    bold, t = torch.randn(2, 20, 94), (torch.arange(20) * 0.72).expand(2, 20).contiguous()
    batch = {"bold": bold, "t": t} if "t" in model.input_keys else {"bold": bold}
    check_backbone_contract(model, batch, True if family != "semantoks" else False)
    if pooling in ("correlation", "covariance"):
        from brainfm.models.pooling import n_edges

        assert model.out_dim == n_edges(model.pooling_readout.rank, pooling)
        if readout.get("include_input", True):
            assert model.token_dim is None  # a token hook does not carry the input BOLD
        # the features are learned: a gradient reaches their readout weights (zero at the identity init,
        # where the backbone itself gets none yet) or, with a random projection, the backbone
        r = model.pooling_readout
        if r.feature_dim:
            model.train()
            model.pooled(*model.inputs(batch)).square().sum().backward()
            assert r.proj.weight.grad[:, r.in_dim - r.feature_dim:].abs().sum() > 0
            if not r.include_input:
                grads = [p.grad for n, p in model.named_parameters() if not n.startswith("readout.") and p.requires_grad]
                assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_require_names_what_is_missing_and_the_fix():
    model, _, _ = _families()["gpt"]
    require(model, "task=csm", "a causal sequence transformer", "model=gpt", "embed_trs", causal=True)
    with pytest.raises(ConfigError, match=r"bidirectional.*causal=False \(it has True\).*Fix: model=bert"):
        require(model, "task=seq_bert", "a bidirectional sequence transformer", "model=bert", causal=False)
    lstm, _, _ = _families()["lstm_ae"]
    with pytest.raises(ConfigError, match=r"embed_patches\(\)"):
        require(lstm, "task=simmim", "a Swin4D backbone", "model=swin4d_v9", "embed_patches")


# -- FSDP2's sharding units, declared by each backbone ----------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_every_backbone_declares_its_fsdp_units(family):
    """``fsdp_units()``: the repeated transformer blocks (brainfm's TransformerBlock, Swin4D's joint or factorised
    window blocks), in module order; [] for a backbone without any (only the whole task is then sharded)."""
    from brainfm.models.swin4d import FactorizedSwinBlock4D, SwinBlock4D, SwinTransformer4D
    from brainfm.models.transformer import TransformerBlock

    model = _families()[family][0]
    blocks = [m for m in model.modules() if isinstance(m, (TransformerBlock, SwinBlock4D, FactorizedSwinBlock4D))]
    assert model.fsdp_units() == blocks and (bool(blocks) == (family in ("gpt", "semantoks", "swin4d")))
    if family == "swin4d":
        factorized = SwinTransformer4D(img_size=(12, 12, 12, 4), embed_dim=6, depths=(1, 1), num_heads=(1, 2),
                                       window_size=(2, 2, 2, 2), first_window_size=(2, 2, 2, 2),
                                       patch_size=(3, 3, 3, 1), attention="factorized")
        units = factorized.fsdp_units()
        assert len(units) == 2 and all(isinstance(u, FactorizedSwinBlock4D) for u in units)


def test_a_task_shards_what_its_backbones_declare_teacher_included():
    from brainfm.tasks.self_distillation import SimDINO

    task = SimDINO({"_target_": "brainfm.models.semantoks.SemantoksEncoder", "n_rois": 94,
                    "network_map": "aal2_94_lobes", "patch_size": 5, "conv_channels": 8, "long_conv_channels": 8,
                    "depth": 2, "n_heads": 2})
    assert task.fsdp_units() == [*task.model.fsdp_units(), *task.teacher.fsdp_units()]
    assert len(task.fsdp_units()) == 4
