"""The backbone contract (:mod:`brainfm.models.backbone`): every family gives ``features`` and
``pooled`` of the shapes it states, reads its inputs from a batch by ``input_keys``, and the token
hook composes to ``pooled``; objectives refuse a backbone by capability, naming the fix."""

from __future__ import annotations

import pytest
import torch

from brainfm.errors import ConfigError
from brainfm.models.backbone import Backbone, require


def _families():
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
        "semantoks": (SemantoksEncoder(94, network_map="aal2_94_lobes", patch_size=5, conv_channels=8,
                                       long_conv_channels=8, depth=1, n_heads=2), {"bold": bold}, False),
        "tff": (TFF(img_size=(8, 8, 8), encoder_blocks=(1, 1), hidden_size=32, num_heads=2, intermediate_size=32,
                    max_positions=8), {"volume": torch.randn(2, 2, 8, 8, 8, 3)}, False),
        "swin4d": (SwinTransformer4D(img_size=(12, 12, 12, 4), embed_dim=6, depths=(1, 1), num_heads=(1, 2),
                                     window_size=(2, 2, 2, 2), first_window_size=(2, 2, 2, 2), patch_size=(3, 3, 3, 1)),
                   {"volume": torch.randn(2, 1, 12, 12, 12, 4)}, False),
    }


@pytest.mark.parametrize("family", ["gpt", "lstm_ae", "temporal_mlp", "semantoks", "tff", "swin4d"])
def test_every_backbone_keeps_the_contract(family):
    model, batch, any_tr = _families()[family]
    model.eval()
    assert isinstance(model, Backbone) and model.time_in_seconds is any_tr
    inputs = model.inputs({**batch, "subject": torch.zeros(2)})
    assert len(inputs) == len(model.input_keys)
    with torch.no_grad():
        pooled = model.pooled(*inputs)
        features = model.features(*inputs)
        assert pooled.shape == (2, model.out_dim)
        assert features.ndim == 3 and features.shape[0] == 2
        torch.testing.assert_close(model.pooled_batch(batch), pooled)
        if model.token_dim is not None:
            tokens = model.embed_inputs(*inputs)
            assert tokens.shape[-1] == model.token_dim
            torch.testing.assert_close(model.pool_tokens(tokens), pooled)
        else:
            with pytest.raises(ConfigError, match="no token-level hook"):
                model.embed_inputs(*inputs)
    with pytest.raises(ConfigError, match=str(list(model.input_keys)).replace("[", r"\[").replace("]", r"\]")):
        model.inputs({"other": torch.zeros(1)})


def test_require_names_what_is_missing_and_the_fix():
    model, _, _ = _families()["gpt"]
    require(model, "task=csm", "a causal sequence transformer", "model=gpt", "embed_trs", causal=True)
    with pytest.raises(ConfigError, match=r"bidirectional.*causal=False \(it has True\).*Fix: model=bert"):
        require(model, "task=seq_bert", "a bidirectional sequence transformer", "model=bert", causal=False)
    lstm, _, _ = _families()["lstm_ae"]
    with pytest.raises(ConfigError, match=r"embed_patches\(\)"):
        require(lstm, "task=simmim", "a Swin4D backbone", "model=swin4d_v9", "embed_patches")
