"""What only a CUDA GPU can show (marker ``cuda``): FlexAttention's fused kernel, forward and backward, equals
SDPA (Swin4D v7/v9/v11 with shifted and zero-padded windows); every backbone family trains a bf16-mixed step;
compiled backbones train as eager ones; the fused AdamW kernel equals torch's multi-tensor AdamW and trains
under Lightning's bf16-mixed with gradient clipping; Swin4D v7 reproduces SwiFT's ver7 on CUDA.

Without a GPU these tests are collected and skipped with the reason (tests/conftest.py). ``make gpu-check``
(scripts/gpu_check.sh) runs them on one, offline, with brainfm installed from its wheel beside the machine's own
torch; a torch feature the machine's torch lacks (brainfm.bench.torch_features) skips its tests with the reason.
``BRAINFM_CUDA_TESTS_ON_CPU=1`` runs them on the CPU, to develop them without a GPU: bf16 autocast, the fused
AdamW and torch.compile exist there too; FlexAttention's backward does not, and its test still skips.

Models are the benchmark's small cases (brainfm.bench.gpu), built from the configs as ``make bench-gpu``
builds them. Every check draws fresh random inputs. fp32 comparisons run with TF32 off (``exact_fp32``): torch
keeps it off for matrix products by default but on for cuDNN convolutions (Swin4D's patch embedding, TFF).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from helpers import labelled_roi_store, parity_fixture, shared_fixtures, train_losses
from omegaconf import OmegaConf
from test_swin4d import FLEX_CASES, _backend_pair, _grid_of
from torch import nn

from brainfm import training as train
from brainfm.bench.gpu import family_cases, main_cases
from brainfm.bench.torch_features import missing
from brainfm.config import compose
from brainfm.models import build_model
from brainfm.models.swin4d import SwinTransformer4D
from brainfm.scaling.families import family_of
from brainfm.scaling.memory import training_step
from brainfm.tasks.base import compile_backbone
from brainfm.tasks.optim import build_optimizer

pytestmark = pytest.mark.cuda

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
CUDA_TESTS_ON_CPU = bool(os.environ.get("BRAINFM_CUDA_TESTS_ON_CPU"))


def needs(feature: str):
    """Skip when the running torch lacks ``feature`` (:mod:`brainfm.bench.torch_features`), with its reason."""
    why = missing(feature)
    return pytest.mark.skipif(why is not None, reason=why or "")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (NaN anywhere gives NaN, which fails every ``<`` check)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.fixture
def exact_fp32():
    """TF32 off for matrix products and cuDNN convolutions during the test (the legacy flags, which torch 2.9+ still
    honours and torch < 2.9 has alone), restored after."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture
def fresh_dynamo():
    """TorchDynamo's caches emptied before and after: each test compiles its own graphs, within the recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_the_device_is_what_the_run_asked_for():
    """A gpu-check that silently ran on the CPU would prove nothing: off BRAINFM_CUDA_TESTS_ON_CPU, CUDA it is."""
    assert ON_GPU or CUDA_TESTS_ON_CPU
    if ON_GPU:
        x = torch.randn(64, 64, device=DEVICE)
        torch.testing.assert_close((x @ x).cpu(), x.cpu() @ x.cpu(), atol=1e-4, rtol=1e-4)


# -- FlexAttention = SDPA ---------------------------------------------------------------------------------------
def _flex_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "without torch.compile" in str(w.message)]


@needs("flex_attention")
@needs("compile")
@pytest.mark.parametrize("version", sorted(FLEX_CASES))
def test_flex_attention_forward_and_backward_equal_sdpa(version, fresh_dynamo, exact_fp32):
    """fp32, shifted and zero-padded windows, batch 2 (the block mask spans the batch): the fused FlexAttention
    kernel (not its reference path, which warns) gives SDPA's outputs and gradients."""
    if not ON_GPU:
        pytest.skip("FlexAttention has no backward on the CPU")
    sdpa, flex = (m.to(DEVICE) for m in _backend_pair(version))
    masked = [p.mask is not None for stage in sdpa.layers for blk in stage.blocks
              for p in blk.plans(torch.zeros(2, *_grid_of(sdpa, stage), 12, device=DEVICE))]
    assert any(masked), "the case must have masked windows"
    x = torch.randn(2, 1, *sdpa.img_size, device=DEVICE)
    outputs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for m in (sdpa, flex):
            y = m(x)
            (y ** 2).mean().backward()
            outputs.append(y.detach())
    assert not _flex_warnings(caught), "FlexAttention ran its unfused reference path: " + _flex_warnings(caught)[0]
    assert rel(outputs[1], outputs[0]) < 1e-5
    n = 0
    for (name, p), q in zip(sdpa.named_parameters(), flex.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-3, msg=name)
            n += 1
    assert n > 0


@needs("flex_attention")
@needs("compile")
@pytest.mark.parametrize("version", ["swin4d_v9"])  # one version: its kernels compile again for bf16 (time-boxed check)
def test_flex_attention_equals_sdpa_under_bf16_autocast(version, fresh_dynamo):
    """Training precision (bf16-mixed): q, k, v in bf16 on both paths; outputs and gradients agree to bf16's
    precision (~4e-3 per rounding; checked against 2e-2 and 5e-2)."""
    if not ON_GPU:
        pytest.skip("FlexAttention has no backward on the CPU")
    sdpa, flex = (m.to(DEVICE) for m in _backend_pair(version))
    x = torch.randn(2, 1, *sdpa.img_size, device=DEVICE)
    outputs, grads = [], []
    for m in (sdpa, flex):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = m(x)
        y.float().square().mean().backward()
        outputs.append(y.detach().float())
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    assert outputs[0].dtype == torch.float32 and torch.isfinite(outputs[1]).all()
    assert rel(outputs[1], outputs[0]) < 2e-2
    assert rel(grads[1], grads[0]) < 5e-2


# -- one bf16-mixed training step of every backbone family ------------------------------------------------------
#: the benchmark's small cases (Swin4D v7/v9/v11, GPT, BERT, LSTM autoencoder, Semantoks, R2T's temporal MLP, TFF)
#: and the two baselines with parameters (FC with hidden_dims=[] has none: it has nothing to train)
CASES = {c.name: c.overrides for c in [*main_cases(True, ()), *family_cases(True)]}
CASES["mean_mlp"] = ["model=mean_mlp", "data.n_rois=94"]
CASES["brainnetcnn"] = ["model=brainnetcnn", "data.n_rois=94"]


def _build(name: str, *extra: str) -> tuple[nn.Module, dict]:
    cfg = compose("scale", ["sizes=[]", *CASES[name], *extra])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    with torch.device(DEVICE):
        model = build_model(model_cfg)
    return model.train(), OmegaConf.to_container(cfg.inputs, resolve=True)


def _step_and_loss(model: nn.Module, inputs_cfg: dict, batch: int = 2):
    """Inputs and a ``step(optimizer, precision) -> loss`` of brainfm's training step for ``model``: the scale
    test's family loss, or for a baseline (no scale family) the mean square of its pooled embedding."""
    try:
        family = family_of(model)
    except Exception:  # the baselines: fed through the backbone contract
        bold = torch.randn(batch, int(inputs_cfg.get("seq_len", 50)), model.n_rois, device=DEVICE)
        inputs = model.inputs({"bold": bold, "t": torch.arange(bold.shape[1], device=DEVICE).expand(batch, -1) * 0.72})

        def step(optimizer, precision):
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
                loss = model.pooled(*inputs).float().square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            return loss.detach()

        return step
    inputs = family.make_inputs(model, batch, DEVICE, inputs_cfg)
    return lambda optimizer, precision: training_step(model, family, inputs, optimizer, precision, 1.0, DEVICE.type)


@needs("fused_adamw")
@pytest.mark.parametrize("name", sorted(CASES))
def test_every_backbone_family_trains_a_bf16_mixed_step(name):
    """Forward under bf16 autocast (some layer computes in bf16), finite loss and gradients, brainfm's fused
    AdamW steps, and every parameter with a nonzero gradient moves (parameters stay fp32)."""
    torch.manual_seed(0)
    model, inputs_cfg = _build(name)
    step = _step_and_loss(model, inputs_cfg)
    dtypes = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype) if torch.is_tensor(out) else None)
             for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    assert hooks, "no linear or convolution layer to observe"
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    assert optimizer.defaults["fused"] is True
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = step(optimizer, "bf16-mixed")
    for h in hooks:
        h.remove()
    assert torch.bfloat16 in dtypes, f"autocast had no effect: layer outputs {dtypes}"
    assert loss.dtype == torch.float32 and torch.isfinite(loss), loss
    moved = 0
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.device.type == DEVICE.type, n
        if p.grad is None:
            continue
        assert torch.isfinite(p.grad).all(), n
        if p.grad.abs().max() > 0:
            assert not torch.equal(p.detach(), before[n]), f"{n} has a gradient but did not move"
            moved += 1
    assert moved >= 0.5 * sum(1 for p in model.parameters() if p.requires_grad), (moved, name)


# -- compiled = eager ---------------------------------------------------------------------------------------------
#: dropout off: a compiled graph draws its masks from Inductor's own random stream
COMPILED = {
    "gpt": ["model.dropout=0", "model.attn_dropout=0"],
    "lstm_ae": ["model.dropout=0"],  # nn.LSTM runs eagerly inside the compiled glue (models/lstm.py)
    "swin4d_v9": [],  # v7 and v11 compile 1-3x longer (README's CPU table): left to bench-gpu's compiled variant
}


def _counted_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@needs("compile")
@needs("fused_adamw")
# on a CPU only (BRAINFM_CUDA_TESTS_ON_CPU): Inductor's CPU passes import torch/utils/mkldnn.py, torch's own code,
# which uses the torch.jit.script_method that torch 2.13 deprecates
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", sorted(COMPILED))
def test_compiled_backbone_trains_as_eager(name, fresh_dynamo, exact_fp32):
    """fp32, 3 steps of brainfm's training step (fused AdamW, clipping) on the same batch from the same weights:
    the compiled regions (trainer.compile's compile_backbone) give the eager losses to 1e-4 (Inductor fuses and
    reorders fp32 reductions: last bits, grown over the steps; tests/test_compile.py does 20 steps on the CPU).
    Weights are not compared element by element: AdamW's first steps move a weight by ~lr whatever its gradient's
    size, so a gradient of ~0 whose last bits differ in sign moves it by ~lr either way."""
    torch.manual_seed(0)
    eager, inputs_cfg = _build(name, *COMPILED[name])
    compiled, _ = _build(name, *COMPILED[name])
    compiled.load_state_dict(eager.state_dict())
    graphs = _counted_graphs()
    compile_backbone(compiled)
    runs = {}
    for label, model in (("eager", eager), ("compiled", compiled)):
        torch.manual_seed(1)  # the same batches for both
        step = _step_and_loss(model, inputs_cfg)
        optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05)
        runs[label] = [float(step(optimizer, "32-true")) for _ in range(3)]
    assert _counted_graphs() > graphs, "nothing was compiled"
    assert len(set(runs["eager"])) == 3, runs  # the steps train: the loss changes
    for e, c in zip(runs["eager"], runs["compiled"]):
        assert c == pytest.approx(e, rel=1e-4), runs


# -- fused AdamW ------------------------------------------------------------------------------------------------
@needs("fused_adamw")
def test_fused_adamw_step_equals_multi_tensor_adamw():
    """The fused kernel brainfm picks (``task.optimizer.fused=auto``) updates as torch's multi-tensor AdamW does,
    over brainfm's parameter groups (weight decay on matrices only), for 3 steps of random gradients."""
    torch.manual_seed(0)
    model, _ = _build("gpt")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    fused = build_optimizer(model, lr=1e-2, weight_decay=0.05)
    assert fused.defaults["fused"] is True
    # a twin of every parameter in the same groups (weight decay on matrices only), stepped by torch's foreach AdamW
    twin = {id(p): p.detach().clone().requires_grad_(True) for p in model.parameters()}
    groups = [{**{k: v for k, v in g.items() if k not in ("params", "fused", "foreach")},
               "params": [twin[id(p)] for p in g["params"]]} for g in fused.param_groups]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    multi = torch.optim.AdamW(groups, foreach=True)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
            twin[id(p)].grad = p.grad.clone()
        fused.step()
        multi.step()
    for n, p in model.named_parameters():
        assert not torch.equal(p.detach(), start[n]), n
        torch.testing.assert_close(p.detach(), twin[id(p)].detach(), rtol=1e-5, atol=1e-6, msg=n)


@needs("fused_adamw")
# what brainfm.logs silences for brainfm-train: Lightning's hint where `srun` is on PATH outside a SLURM job (this
# machine's test cluster), and its use of a torch pytree API that torch 2.13 deprecates (Lightning's code)
@pytest.mark.filterwarnings("ignore:.*The `srun` command is available.*")
@pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*")
def test_lightning_bf16_mixed_training_with_fused_adamw_and_clipping(tmp_path):
    """``trainer=gpu`` (bf16-mixed) with gradient clipping: Lightning accepts the fused AdamW (brainfm's does not
    claim to unscale inside its step), and 3 steps of a small GPT train on a synthetic ROI store (no download)."""
    store = labelled_roi_store(tmp_path / "data")
    trainer = ["trainer=gpu"] if ON_GPU else ["trainer=cpu", "trainer.precision=bf16-mixed"]
    cfg = compose("train", [
        "experiment=gpt", f"paths.output_dir={tmp_path}/outputs", f"paths.split_dir={tmp_path}/splits",
        f"data.path={store}", "data.atlas=toy", "data.n_rois=12", "data.window.length=24", "data.window.min_length=null",
        "model.d_model=32", "model.depth=1", *trainer, "trainer.max_steps=3", "trainer.limit_val_batches=0",
        "trainer.gradient_clip_val=1.0", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "logger=csv", "callbacks.model_checkpoint=null", "run_name=fused"])
    datamodule, task, trainer_ = train.build(cfg)
    trainer_.fit(task, datamodule=datamodule)
    (optimizer,) = trainer_.optimizers
    assert optimizer.defaults["fused"] is True and trainer_.global_step == 3
    assert str(trainer_.precision) == "bf16-mixed"
    assert next(task.parameters()).device.type == DEVICE.type
    losses = train_losses(Path(cfg.paths.run_dir))
    assert sorted(losses) == [1, 2, 3] and all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses


# -- SwiFT ver7 parity -------------------------------------------------------------------------------------------
SWIFT = shared_fixtures("swift_v7_parity")
SWIFT_KEYS = ("img_size", "in_chans", "embed_dim", "depths", "num_heads", "window_size", "first_window_size",
              "patch_size", "c_multiplier", "last_layer_full_MSA")


@pytest.mark.parametrize("name", ["A_default", "B_released"])
def test_swift_ver7_parity_on_cuda(name, exact_fp32):
    """SwiFT's ver7 outputs, loss and gradients (its fixture, computed on a CPU) from brainfm's v7 on the device, in
    fp32 (CUDA's SDPA kernels, cuBLAS and cuDNN without TF32: 2e-5 relative, gradients 1e-4 per tensor), and within
    bf16's precision under bf16 autocast."""
    info, load = parity_fixture(SWIFT / name)
    a = info["constructor_args"]
    model = SwinTransformer4D(**{k: a[k] for k in SWIFT_KEYS})
    model.load_state_dict(load("state_dict.safetensors"), strict=True)
    model.to(DEVICE)
    x = load("input.safetensors")["x"].to(DEVICE)
    ref = load("output.safetensors")["y"]
    model.eval()
    with torch.no_grad():
        y = model(x).cpu()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            y16 = model(x).float().cpu()
    assert y.shape == ref.shape == tuple(info["output_shape"])
    assert rel(y, ref) < 2e-5  # ~8e-7 on a CPU
    assert rel(y16, ref) < 3e-2  # ~8e-3 under CPU bf16 autocast
    model.train()
    loss = (model(x) ** 2).mean()
    loss.backward()
    assert loss.item() == pytest.approx(info["loss"], rel=1e-4)
    params = dict(model.named_parameters())
    grads = load("grads.safetensors")
    assert grads
    for key, grad in grads.items():
        assert rel(params[key].grad.cpu(), grad) < 1e-4, key  # the worst ~1.2e-6 on a CPU
