"""Thomas, Ré & Poldrack's released GPT (CSM) and Sequence-BERT weights (athms/learning-from-brains)
load into brainfm's SequenceTransformer and reproduce the reference's outputs and gradients.

Fixtures: ``<shared>/fixtures/lfb_parity`` (README there): the reference ``Model.state_dict()``
at a small configuration, the batch after the reference's own ``prep_batch`` (stored, since its
masking draws from the global RNG), its eval outputs and its gradients; plus the key list of the
released 4 x 768 x 12 models. Tolerances from that README: outputs atol 1e-5 / rtol 1e-4,
gradients atol 1e-6 / rtol 1e-4, losses 1e-6.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import parity_fixture, shared_fixtures
from hydra.utils import instantiate
from omegaconf import OmegaConf

from brainfm.checkpoints import load_backbone
from brainfm.config import compose
from brainfm.models.convert import convert
from brainfm.errors import CheckpointError
from brainfm.models.heads import BinaryHead, ReconstructionHead
from brainfm.models.sequence import (
    LFB_DROPPED,
    SequenceTransformer,
    lfb_checkpoint_filter,
    lfb_model_config,
    lfb_special_token,
)

FIXTURES = shared_fixtures("lfb_parity")
FAMILIES = ["GPT_CSM", "BERT_BERT"]
OUT_TOL = {"atol": 1e-5, "rtol": 1e-4}
GRAD_TOL = {"atol": 1e-6, "rtol": 1e-4}


# The fixture was written at one thread (bitwise there)
pytestmark = pytest.mark.usefixtures("one_thread")


class Converted:
    """The fixture's reference weights through the adapter, in a brainfm model and the task heads."""

    def __init__(self, name: str) -> None:
        self.info, self.load = parity_fixture(FIXTURES / name)
        self.ref = self.load("state_dict.safetensors")
        self.state, self.left_out = lfb_checkpoint_filter(self.ref)
        mc = self.info["model_config"]
        cfg = lfb_model_config(self.state, n_heads=mc["num_attention_heads"])["model"]
        cfg.pop("_target_")
        cfg.update(dropout=mc["dropout"], attn_dropout=mc["dropout"])
        self.model = SequenceTransformer(**cfg)
        self.model.load_state_dict({k[len("model."):]: v for k, v in self.state.items() if k.startswith("model.")},
                                   strict=True)
        self.head = ReconstructionHead(self.model.d_model, self.model.n_rois)
        self.head.load_state_dict({"weight": self.state["head.weight"], "bias": self.state["head.bias"]})
        self.bert = name.startswith("BERT")
        self.nsp = None
        if self.bert:
            self.nsp = BinaryHead(self.model.d_model)
            self.nsp.load_state_dict({k[len("nsp_head."):]: v for k, v in self.state.items()
                                      if k.startswith("nsp_head.")})
        self.prep = self.load("prepped.safetensors")

    def rows_equal(self, ref_key: str) -> torch.Tensor:
        """``(B, S)``: where the prepped inputs hold the reference's special embedding ``ref_key``."""
        return (self.prep["prep_inputs_embeds"] == self.ref[ref_key].reshape(-1)).all(dim=-1)

    def forward(self) -> dict[str, torch.Tensor]:
        """brainfm's forward on the reference's prepped batch (its token layout: A [SEP] B [SEP] [CLS]
        pad for BERT), special tokens from brainfm's own (converted) parameters."""
        p, m = self.prep, self.model
        x, t = p["prep_inputs_embeds"], p["prep_t_rs"]
        assert torch.equal(m.embedding.time_index(t), p["prep_t_r_position_ids"])  # round(t / 0.2), dummy 1500
        tokens = m.embed_trs(x, t, self.rows_equal("embedder.msk_embed"))
        segments = None
        if self.bert:
            b = x.shape[0]
            tokens = torch.where(self.rows_equal("embedder.cls_embed")[..., None], m.special("cls", b), tokens)
            tokens = torch.where(self.rows_equal("embedder.sep_embed")[..., None], m.special("sep", b), tokens)
            segments = p["prep_token_type_ids"]
        hidden = m.encode(tokens, segments, key_padding_mask=p["prep_attention_mask"] == 0)
        out = {"embedder_out": tokens, "decoder_hidden": hidden, "outputs": self.head(hidden)}
        if self.bert:  # the reference pools position 0 (in its layout the first TR, not CLS)
            out["pooler_outputs"] = self.nsp[1](self.nsp[0](hidden[:, 0]))
            out["is_next_logits"] = self.nsp(hidden[:, 0])
        return out

    def reference_losses(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The reference's training loss on its stored masks (L1 on ``prep_modelling_mask``; + is-next BCE)."""
        mask = self.prep["prep_modelling_mask"].bool()
        losses = {"masking_loss": torch.nn.functional.l1_loss(out["outputs"][mask], self.prep["prep_masked_inputs"])}
        if self.bert:
            losses["is_next_loss"] = torch.nn.functional.binary_cross_entropy_with_logits(
                out["is_next_logits"].ravel(), self.prep["prep_is_next"].float())
        losses["loss"] = sum(losses.values())
        return losses

    def reference_grad(self, ref_key: str) -> torch.Tensor:
        """brainfm's gradient of the parameter that ``ref_key`` became, in the reference's layout."""
        m, d = self.model, self.model.d_model
        specials = {"embedder.msk_embed": m.mask_token, "embedder.cls_embed": m.cls_token,
                    "embedder.sep_embed": m.sep_token}
        if ref_key in specials:  # brainfm's token = LN(Linear(ref embed)): carry the gradient back through it
            ref = self.ref[ref_key].clone().requires_grad_(True)
            e = m.embedding
            token = lfb_special_token(ref, e.proj.weight.detach(), e.proj.bias.detach(), e.norm.weight.detach(),
                                      e.norm.bias.detach())
            (grad,) = torch.autograd.grad(token, ref, grad_outputs=specials[ref_key].grad)
            return grad
        blocks = m.encoder.blocks
        direct = {
            "embedder.wt_re.weight": lambda: m.embedding.time.weight.grad,
            "decoder.transformer.wpe.weight": lambda: m.position.weight.grad,
            "decoder.transformer.h.0.attn.c_attn.weight": lambda: blocks[0].attn.qkv.weight.grad.t(),
            "decoder.transformer.embeddings.token_type_embeddings.weight": lambda: m.segment.weight.grad,
            "decoder.transformer.encoder.layer.0.attention.self.query.weight":
                lambda: blocks[0].attn.qkv.weight.grad[:d],
            "decoder.pooler_layer.0.weight": lambda: self.nsp[0].weight.grad,
        }
        return direct[ref_key]()


@pytest.mark.parametrize("name", FAMILIES)
def test_released_weights_reproduce_the_reference_outputs(name):
    c = Converted(name)
    # parameter accounting: the reference's (buffers aside) and brainfm's, every one from the converted file
    assert sum(v.numel() for k, v in c.ref.items() if k not in c.info["buffers"]) == c.info["n_params_total"]
    modules = [c.model, c.head] + ([c.nsp] if c.nsp is not None else [])
    assert sum(p.numel() for mod in modules for p in mod.parameters()) == sum(v.numel() for v in c.state.values())
    c.model.eval()
    with torch.no_grad():
        out = c.forward()
    ref = c.load("output.safetensors")
    keys = ["embedder_out", "decoder_hidden", "outputs"] + (["pooler_outputs", "is_next_logits"] if c.bert else [])
    for key in keys:
        assert out[key].shape == ref[key].shape, key
        torch.testing.assert_close(out[key], ref[key], **OUT_TOL, msg=lambda m, key=key: f"{key}: {m}")
    losses = c.reference_losses(out)
    for key, value in c.info["losses"].items():
        assert losses[key].item() == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("loss", ["ref", "mse"])
def test_released_weights_reproduce_the_reference_gradients(name, loss):
    c = Converted(name)
    c.model.train()  # dropout 0 in the fixture: train mode equals eval
    out = c.forward()
    if loss == "ref":
        value = c.reference_losses(out)["loss"]
        expected = c.info["train_loss_ref"]
    else:  # mean(outputs ** 2): the stored loss is the mean over all (B, S, 1024) outputs, padding included
        value = out["outputs"].pow(2).mean()
        expected = c.info["train_loss_mse"]
    assert value.item() == pytest.approx(expected, abs=1e-6)
    value.backward()
    grads = c.load(f"grads_{loss}.safetensors")
    assert grads
    for key, ref in grads.items():
        got = c.reference_grad(key)
        assert got.shape == ref.shape, key
        torch.testing.assert_close(got, ref, **GRAD_TOL, msg=lambda m, key=key: f"{key}: {m}")


def test_reference_bert_quirks_are_facts_of_the_fixture():
    """What brainfm does differently, read from the reference's own prepped batch: its CLS sits after
    the sequence (brainfm: first), its pooled position 0 is a TR, and its loss mask is one position
    after the MASK token it scores (CLS appended, masks padded on the left)."""
    c = Converted("BERT_BERT")
    cls = c.rows_equal("embedder.cls_embed")
    lengths = c.prep["prep_attention_mask"].sum(dim=1)
    assert torch.equal(cls.float().argmax(dim=1), lengths - 1)  # CLS is the last attended token
    assert not cls[:, 0].any()  # position 0, which the reference pools, is a TR
    msk = c.rows_equal("embedder.msk_embed")
    loss_rows = c.prep["prep_modelling_mask"].bool().any(dim=-1)
    assert torch.equal(loss_rows[:, 1:], msk[:, :-1])
    gpt = Converted("GPT_CSM")  # the GPT's (CSM's) mask and loss positions agree
    assert torch.equal(gpt.prep["prep_modelling_mask"].bool().any(dim=-1), gpt.rows_equal("embedder.msk_embed"))


def _released_shapes(name: str) -> dict[str, torch.Tensor]:
    path = FIXTURES / "released_shapes" / f"{name}_released_shapes.txt"
    if not path.is_file():
        pytest.skip(f"learning-from-brains released shapes not found at {path} (set BRAINFM_SHARED)")
    state = {}
    for line in path.read_text().splitlines():
        if line.strip():
            key, shape, dtype, _ = line.split("\t")
            state[key] = torch.empty(json.loads(shape), dtype=getattr(torch, dtype), device="meta")
    return state


@pytest.mark.parametrize("name", FAMILIES)
def test_released_key_list_maps_completely(name):
    ref = _released_shapes(name)
    state, left_out = lfb_checkpoint_filter(ref)
    # every reference key is converted or dropped for a stated reason
    assert set(left_out) <= set(ref)
    for key in left_out:
        template = key.split(".")
        reason = [r for k, r in LFB_DROPPED.items()
                  if k.split(":")[-1] == key or k.split(".") == [p if not p.isdigit() else "{n}" for p in template]]
        assert reason, key
    cfg = lfb_model_config(state)
    assert cfg["task"] == ("csm" if name == "GPT_CSM" else "seq_bert")
    m = cfg["model"]
    assert (m["n_rois"], m["d_model"], m["depth"], m["n_heads"], m["mlp_ratio"]) == (1024, 768, 4, 12, 4.0)
    assert m["norm_layout"] == ("pre" if name == "GPT_CSM" else "post") and m["activation"] == "gelu_tanh"
    with torch.device("meta"):
        model = instantiate(m, _convert_="all")
    own = {f"model.{k}": tuple(v.shape) for k, v in model.state_dict().items()}
    own["head.weight"], own["head.bias"] = (1024, 768), (1024,)
    if name == "BERT_BERT":
        own.update({"nsp_head.0.weight": (768, 768), "nsp_head.0.bias": (768,), "nsp_head.2.weight": (1, 768),
                    "nsp_head.2.bias": (1,)})
    assert {k: tuple(v.shape) for k, v in state.items()} == own
    n = sum(p.numel() for p in model.parameters())
    assert 29e6 < n < 33e6, n  # ~31M, as the paper says
    # the same architecture as the experiment presets (1024 DiFuMo inputs)
    preset = compose("train", [f"experiment={'lfb_gpt' if name == 'GPT_CSM' else 'lfb_seq_bert'}"]).model
    for key, value in m.items():
        if key not in ("_target_",):
            assert preset[key] == pytest.approx(value) if isinstance(value, float) else preset[key] == value, key


def test_unknown_keys_are_refused():
    _, load = parity_fixture(FIXTURES / "GPT_CSM")
    ref = load("state_dict.safetensors")
    with pytest.raises(CheckpointError, match="does not know.*embed_model.model.4"):
        lfb_checkpoint_filter({**ref, "embedder.embed_model.model.4.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="not a learning-from-brains GPT or BERT"):
        lfb_checkpoint_filter({"encoder.lstm.weight": torch.zeros(1)})


@pytest.mark.parametrize("name", FAMILIES)
def test_converter_cli_round_trip(name, tmp_path):
    from brainfm.cli.convert import main as convert_main

    info, load = parity_fixture(FIXTURES / name)
    src, dst = tmp_path / "pytorch_model.bin", tmp_path / "converted.safetensors"
    torch.save(dict(load("state_dict.safetensors")), src)  # as released: a torch pickle of the state dict
    convert_main(["lfb", str(src), str(dst), "--n-heads", str(info["model_config"]["num_attention_heads"])])
    state, left_out = convert("lfb", src)
    assert left_out and all(k in state for k in ("model.mask_token", "head.weight"))
    cfg = OmegaConf.load(dst.with_suffix(".yaml"))
    model = instantiate(cfg.model, _convert_="all")
    assert load_backbone(model, dst) == []  # every backbone key comes from the file
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[f"model.{key}"], rtol=0, atol=0)
    # the experiment preset, at the fixture's small size, starts from the converted weights
    experiment = "lfb_gpt" if name == "GPT_CSM" else "lfb_seq_bert"
    c = compose("train", [f"experiment={experiment}", f"model.d_model={cfg.model.d_model}",
                          f"model.depth={cfg.model.depth}", f"model.n_heads={cfg.model.n_heads}",
                          f"task.init_from={dst}"])
    task = instantiate(c.task, model=OmegaConf.to_container(c.model, resolve=True), data_meta={"tr": 0.72}, seed=0,
                       _recursive_=False)
    torch.testing.assert_close(task.head.weight, state["head.weight"], rtol=0, atol=0)
    torch.testing.assert_close(task.model.position.weight, state["model.position.weight"], rtol=0, atol=0)
    if name == "BERT_BERT":
        torch.testing.assert_close(task.nsp_head[2].weight, state["nsp_head.2.weight"], rtol=0, atol=0)
    assert "init_from" not in task.hparams  # a checkpoint of the run does not read the file again


def test_defaults_are_unchanged():
    """brainfm's own layout (existing checkpoints): exact GELU, pre-LN, final norm, eps 1e-5."""
    m = SequenceTransformer(n_rois=6, d_model=16, depth=1, n_heads=2, n_segments=2)
    keys = set(m.state_dict())
    assert "encoder.norm.weight" in keys and not any(k.startswith("embed_norm.") for k in keys)
    gelu = m.encoder.blocks[0].mlp[1]
    assert gelu.approximate == "none" and m.encoder.blocks[0].norm1.eps == 1e-5 and m.encoder.blocks[0].norm_first
    post = SequenceTransformer(n_rois=6, d_model=16, depth=1, n_heads=2, n_segments=2, norm_layout="post",
                               activation="gelu_tanh", norm_eps=1e-12)
    assert "embed_norm.weight" in post.state_dict() and "encoder.norm.weight" not in post.state_dict()
    y = post(torch.randn(2, 5, 6), torch.arange(5.0).expand(2, 5))
    assert y.shape == (2, 5, 16) and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="model.norm_layout"):
        SequenceTransformer(n_rois=6, d_model=16, depth=1, n_heads=2, norm_layout="sandwich")
    with pytest.raises(ValueError, match="model.activation"):
        SequenceTransformer(n_rois=6, d_model=16, depth=1, n_heads=2, activation="relu")
