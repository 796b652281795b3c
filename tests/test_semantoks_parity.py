"""Brain-Semantoks' reference weights (SamGijsen/Brain-Semantoks, ``CNN_TF``) load into brainfm's
SemantoksEncoder through the ``semantoks`` adapter and reproduce the reference's tokenizer tokens,
tokens, CLS and gradients, unmasked and masked.

Fixture: ``<shared>/fixtures/semantoks_parity`` (README there): the encoder's state dict at a small
configuration (d 192, depth 2, 3 heads, patch 20 TRs, 457 ROIs in 9 networks), an input ``x``
``(2, 457, 100)`` (ROI x time) with a slice mask, the eval outputs and the gradients of
``mean(tokens[..., :96] ** 2)``. Tolerances from that README: outputs atol 1e-5 / rtol 1e-4,
gradients atol 1e-6.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from helpers import parity_fixture, shared_fixtures

from brainfm.checkpoints import load_backbone
from brainfm.models.convert import ADAPTERS, convert
from brainfm.models.network_maps import load_network_map
from brainfm.errors import CheckpointError
from brainfm.models.semantoks import (
    SemantoksEncoder,
    semantoks_checkpoint_filter,
    semantoks_model_config,
)

FIXTURES = shared_fixtures("semantoks_parity")
OUT_TOL = {"atol": 1e-5, "rtol": 1e-4}
GRAD_TOL = {"atol": 1e-6, "rtol": 1e-4}
SMALL = {"patch_size": 20, "conv_channels": 96, "long_conv_channels": 96, "depth": 2, "n_heads": 3, "qkv_bias": False}


# The fixture was written at one thread
pytestmark = pytest.mark.usefixtures("one_thread")


def _load(name: str) -> dict[str, torch.Tensor]:
    return parity_fixture(FIXTURES)[1](name)


def _encoder(state: dict[str, torch.Tensor] | None = None) -> SemantoksEncoder:
    torch.manual_seed(0)
    enc = SemantoksEncoder(457, network_map="schaefer400_7n_tian3_buckner7", **SMALL)
    if state is not None:
        enc.load_state_dict(state)
    return enc


def _reference_layout(enc: SemantoksEncoder, key: str) -> torch.Tensor:
    """The gradient of the brainfm parameter that holds reference parameter ``key``, in the reference's
    layout (the inverse of the adapter's reshapes)."""
    named = dict(enc.named_parameters())
    parts = key.split(".")
    if key.startswith("network_tokenizers."):
        n = int(parts[2])
        if "kernel_list" in key:
            lc = enc.tokenizers[n].long_conv
            g = named[f"tokenizers.{n}.long_conv.sub_kernels.{parts[-1]}"].grad
            return g.reshape(lc.channels, lc.heads, -1).permute(1, 0, 2)
        if parts[4] == "0":
            return named[f"tokenizers.{n}.conv.{parts[-1]}"].grad
    if key == "inter_network_transformer.mask_embedding":
        return named["mask_token"].grad.reshape(1, -1)
    if ".transformer_blocks." in key:
        i = parts[2]
        rest = ".".join(parts[3:])
        return named[f"encoder.blocks.{i}.{rest}"].grad
    raise KeyError(key)


def test_fixture_files_are_the_documented_ones():
    _load("input.safetensors")
    readme = (FIXTURES / "README.md").read_text()
    for name in ("state_dict.safetensors", "input.safetensors", "output.safetensors", "grads.safetensors",
                 "grads_masked.safetensors"):
        digest = hashlib.sha256((FIXTURES / name).read_bytes()).hexdigest()
        assert f"{digest}  ./{name}" in readme, name


def test_adapter_maps_every_reference_key_and_the_network_map_matches():
    ref = _load("state_dict.safetensors")
    state, left_out = semantoks_checkpoint_filter(ref)
    enc = _encoder()
    assert set(state) == set(enc.state_dict()), set(state) ^ set(enc.state_dict())
    for k, v in state.items():
        assert v.shape == enc.state_dict()[k].shape, k
    # what is left out: the never-run tokenizer copies of tian3/buckner7, the never-run inner norm, buffers
    assert {k.split(".")[1] for k in left_out if k.startswith("network_tokenizers.")} == {"tian3", "buckner7"}
    assert "inter_network_transformer.norm.weight" in left_out and "inter_network_transformer.temporal_pos_embedding" in left_out
    assert float(left_out["long_conv_decay"]) == 2.0
    # the shipped map is the reference's network_mapping.npz grouping
    x = _load("input.safetensors")
    assert list(enc.network_assignment) == x["network_map"].tolist()
    assert list(load_network_map("schaefer400_7n_tian3_buckner7", n_rois=457).assignment) == x["network_map"].tolist()
    cfg = semantoks_model_config(state)
    assert {k: cfg[k] for k in ("conv_channels", "long_conv_channels", "depth", "n_heads", "n_rois", "qkv_bias")} == \
        {"conv_channels": 96, "long_conv_channels": 96, "depth": 2, "n_heads": 3, "n_rois": 457, "qkv_bias": False}
    assert cfg["network_sizes"] == json.loads((FIXTURES / "info.json").read_text())["network_roi_counts"]


def test_outputs_match_the_reference():
    enc = _encoder(semantoks_checkpoint_filter(_load("state_dict.safetensors"))[0]).eval()
    inp, out = _load("input.safetensors"), _load("output.safetensors")
    bold = inp["x"].transpose(1, 2)  # the reference takes (B, ROIs, TRs), brainfm (B, TRs, ROIs)
    with torch.no_grad():
        torch.testing.assert_close(enc.tokenize(bold), out["tokenizer_tokens"], **OUT_TOL)
        tokens = enc(bold)
        torch.testing.assert_close(tokens, out["tokens"], **OUT_TOL)
        torch.testing.assert_close(enc.pooled(bold), out["global_cls"], **OUT_TOL)
        torch.testing.assert_close(enc(bold, inp["mask"]), out["masked_tokens"], **OUT_TOL)
        torch.testing.assert_close(enc(bold, inp["mask"])[:, 0], out["masked_global_cls"], **OUT_TOL)
        # the per-network (two-branch) formulation gives the same tokenizer tokens
        torch.testing.assert_close(enc.tokenize_per_network(bold), out["tokenizer_tokens"], **OUT_TOL)


@pytest.mark.parametrize("variant", ["grads", "grads_masked"])
def test_gradients_match_the_reference(variant):
    info = json.loads((FIXTURES / "info.json").read_text()) if FIXTURES.is_dir() else {}
    enc = _encoder(semantoks_checkpoint_filter(_load("state_dict.safetensors"))[0]).train()
    inp, ref = _load("input.safetensors"), _load(f"{variant}.safetensors")
    mask = inp["mask"] if variant == "grads_masked" else None
    loss = (enc(inp["x"].transpose(1, 2), mask)[..., :96] ** 2).mean()
    loss.backward()
    assert loss.item() == pytest.approx(info["loss_masked" if mask is not None else "loss"], abs=1e-6)
    for key, g in ref.items():
        torch.testing.assert_close(_reference_layout(enc, key), g, **GRAD_TOL)


def _full_simdino_state(encoder: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole SimDINOModel state in the layout of keys_full_simdino.txt: teacher = the fixture's encoder,
    student = something else, heads random."""
    params = {line.split("\t")[0] for line in (FIXTURES / "keys.txt").read_text().splitlines()
              if line.endswith("\tparam")}
    state = {}
    for k, v in encoder.items():
        state[f"teacher_encoder.{k}"] = v
        state[f"student_encoder.{k}"] = v + 1 if k in params else v
    for line in (FIXTURES / "keys_full_simdino.txt").read_text().splitlines():
        key, shape, _ = line.split("\t")
        if "_encoder." not in key:
            state[key] = torch.randn(json.loads(shape))
    return state


def test_convert_cli_reads_the_released_checkpoint_layout(tmp_path):
    ref = _load("state_dict.safetensors")
    src = tmp_path / "checkpoint_epoch_100.pth"
    # main.py's torch.save(save_dict): model_state_dict + plain metadata
    torch.save({"epoch": 99, "model_state_dict": _full_simdino_state(ref), "loss": -2.5,
                "config": {"model": {"embedding_dim": 192}}, "lr": 1e-4}, src)
    assert "semantoks" in ADAPTERS
    state, left_out = convert("semantoks", src, tmp_path / "encoder.safetensors")
    expected, _ = semantoks_checkpoint_filter(ref)
    assert set(state) == set(expected)
    for k in expected:
        torch.testing.assert_close(state[k], expected[k])  # the teacher, not the student
    assert any(k.startswith("student_encoder.") for k in left_out) and "student_predictor.mlp.0.weight" in left_out
    from brainfm.cli.convert import main

    main(["semantoks", str(src), str(tmp_path / "cli.safetensors")])
    enc = _encoder()
    assert load_backbone(enc, tmp_path / "cli.safetensors") == []
    inp, out = _load("input.safetensors"), _load("output.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(enc.eval()(inp["x"].transpose(1, 2)), out["tokens"], **OUT_TOL)
    # the student on request
    student, _ = semantoks_checkpoint_filter(_full_simdino_state(ref), encoder="student")
    torch.testing.assert_close(student["tokenizers.0.conv.weight"], expected["tokenizers.0.conv.weight"] + 1)


def test_adapter_refuses_what_it_cannot_express():
    ref = _load("state_dict.safetensors")
    with pytest.raises(CheckpointError, match="no 'network_tokenizers.' keys"):
        semantoks_checkpoint_filter({"model.weight": torch.zeros(1)})
    bad = dict(ref)
    bad["inter_network_transformer.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unexpected Brain-Semantoks keys"):
        semantoks_checkpoint_filter(bad)
    bad = dict(ref)
    k = "network_tokenizers.schaefer400.0.branches.1.slconv.multiplier"
    bad[k] = torch.linspace(1.0, 2.0, bad[k].numel()).reshape(bad[k].shape)
    with pytest.raises(CheckpointError, match="per-ROI decay"):
        semantoks_checkpoint_filter(bad)
    # a model with brainfm's default qkv bias does not take the weights silently
    enc = SemantoksEncoder(457, network_map="schaefer400_7n_tian3_buckner7", **{**SMALL, "qkv_bias": True})
    with pytest.raises(RuntimeError, match="qkv.bias"):
        enc.load_state_dict(semantoks_checkpoint_filter(ref)[0])


def test_kernel_norm_is_computed_when_the_reference_never_ran_a_forward():
    ref = _load("state_dict.safetensors")
    fresh = {k: (torch.tensor(False) if k.endswith("kernel_norm_initialized") else
                 torch.ones_like(v) if k.endswith("kernel_norm") else v) for k, v in ref.items()}
    state, _ = semantoks_checkpoint_filter(fresh)
    lc = _encoder(state).tokenizers[0].long_conv
    # what the reference stores at its first forward: the norm of the decayed, stretched kernel
    torch.testing.assert_close(lc.kernel_norm, lc._raw_kernel().detach().norm(dim=-1, keepdim=True))


def test_released_shapes_convert_to_the_reference_sized_encoder():
    """The released checkpoint (d 768, depth 8, 12 heads; released_shapes/) maps key by key, shape by shape,
    onto SemantoksEncoder at the reference's sizes (tensors on the meta device: no 250 MB in memory)."""
    _load("input.safetensors")
    from brainfm.models.semantoks import sincos_embedding

    state = {}
    for line in (FIXTURES / "released_shapes" / "full_simdino_released_shapes.txt").read_text().splitlines():
        key, shape, _ = line.split("\t")
        shape = json.loads(shape)
        if key.endswith("temporal_pos_embedding"):
            state[key] = sincos_embedding(torch.arange(shape[0]), shape[1])
        elif key.endswith("multiplier"):
            state[key] = torch.full(shape, 2.0)
        elif key.endswith("kernel_norm_initialized"):
            state[key] = torch.tensor(".schaefer400." in key)
        else:
            state[key] = torch.empty(shape, device="meta")
    converted, left_out = semantoks_checkpoint_filter(state)
    cfg = semantoks_model_config(converted)
    assert {k: cfg[k] for k in ("conv_channels", "long_conv_channels", "depth", "n_heads", "mlp_ratio")} == \
        {"conv_channels": 384, "long_conv_channels": 384, "depth": 8, "n_heads": 12, "mlp_ratio": 4.0}
    with torch.device("meta"):
        enc = SemantoksEncoder(457, network_map="schaefer400_7n_tian3_buckner7", patch_size=20, qkv_bias=False)
    own = enc.state_dict()
    assert set(converted) == set(own)
    assert all(tuple(converted[k].shape) == tuple(own[k].shape) for k in own)
    assert sum(v.numel() for k, v in own.items() if k in dict(enc.named_parameters())) == pytest.approx(58.7e6, rel=0.01)
    assert {"student_predictor.mlp.0.weight", "teacher_mask_predictor.mlp.2.bias"} <= set(left_out)
