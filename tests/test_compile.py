"""``trainer.compile=true`` (torch.compile of the backbone's regions) trains the same loss curve as
eager and resumes from ``last.ckpt``; ``model.use_checkpoint=true`` (activation checkpointing) gives
the same loss and gradients in every family; the fused AdamW brainfm picks trains under Lightning's
mixed precision with gradient clipping.

Tolerance of compiled vs eager: 1e-4 relative per step. Inductor's CPU kernels fuse and reorder
fp32 reductions (LayerNorm, softmax, the matmul epilogues), which changes the last bits of a step's
loss (~1e-7 relative) and lets them grow over 20 AdamW steps; the runs here stay within 1e-5, 1e-4
leaves head room for other CPUs' vector widths. Dropout is 0 in these runs: a compiled graph draws
its dropout masks from Inductor's own random stream, not from the eager generator, so curves with
dropout agree in distribution only.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from helpers import SimulatedCrash, train_losses

from brainfm import training as train
from brainfm.errors import ConfigError

REL = 1e-4
#: 20 steps, last.ckpt every 10, no validation (no eval-mode compile), no best-checkpoint callback
STEPS = ("trainer.max_steps=20", "trainer.val_check_interval=10", "trainer.limit_val_batches=0",
         "callbacks.model_checkpoint=null", "callbacks.progress_bar=null", "trainer.log_every_n_steps=1")
WINDOWS = ("data.window.length=24", "data.window.min_length=null", "data.batch_size=16")
SMALL = {
    "gpt": ("experiment=gpt", "model.d_model=32", "model.depth=2", "model.dropout=0", "model.attn_dropout=0", *WINDOWS),
    "lstm_ae": ("experiment=lstm_ae", "model.d_model=32", "model.dropout=0", *WINDOWS),
}


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _crash_and_resume(cfg_for, common: tuple, name: str) -> tuple[dict, dict]:
    """20 steps crashed before step 13 (last.ckpt at 10), then resumed from last.ckpt: the losses the
    crashed part logged and those of the resumed run, per step."""
    part = cfg_for(*common, f"run_name={name}", "+callbacks.crash._target_=helpers.CrashAtStep",
                   "+callbacks.crash.step=13")
    with pytest.raises(SimulatedCrash):
        train.run(part)
    partial = train_losses(Path(part.paths.run_dir))
    resumed = cfg_for(*common, f"run_name={name}", "ckpt_path=last")
    train.run(resumed)
    return partial, train_losses(Path(resumed.paths.run_dir))


def _eager_compiled_resumed(cfg_for, family_overrides, name: str, eager_resumes: bool = False) -> tuple[dict, dict, dict]:
    """The eager reference (20 steps; with ``eager_resumes`` crashed and resumed as the compiled run),
    and the compiled run crashed before step 13 and resumed (compiled) from last.ckpt. Returns the
    reference's, the crashed part's and the resumed run's losses per step and prints the times."""
    common = (*family_overrides, *STEPS)
    times = {}
    start = time.perf_counter()
    if eager_resumes:
        eager = _crash_and_resume(cfg_for, common, f"{name}_eager")[1]
    else:
        cfg = cfg_for(*common, f"run_name={name}_eager")
        train.run(cfg)
        eager = train_losses(Path(cfg.paths.run_dir))
    times["eager"] = time.perf_counter() - start
    graphs = _compiled_graphs()
    start = time.perf_counter()
    partial, resumed = _crash_and_resume(cfg_for, (*common, "trainer.compile=true"), f"{name}_compiled")
    times["compiled, crashed and resumed (incl. compile)"] = time.perf_counter() - start
    assert _compiled_graphs() > graphs  # something was compiled
    print(f"{name}: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    return eager, partial, resumed


def _assert_same_curve(eager: dict, compiled: dict, rel: float = REL) -> None:
    assert sorted(compiled) == sorted(eager) == list(range(1, 21))  # step = optimizer steps completed
    for step in range(1, 21):
        assert compiled[step] == pytest.approx(eager[step], rel=rel), (step, compiled[step], eager[step])


@pytest.mark.parametrize("family", ["gpt", "lstm_ae"])
def test_compiled_training_matches_eager_and_resumes_from_last(family, cfg_for):
    eager, partial, resumed = _eager_compiled_resumed(cfg_for, SMALL[family], family)
    assert max(partial) == 13
    _assert_same_curve(eager, resumed)  # steps 1-10 from the first part, 11-20 after the resume
    for step in range(11, 14):  # the steps the crashed part had logged past the checkpoint: repeated exactly
        assert resumed[step] == pytest.approx(partial[step], rel=1e-6)


def test_compile_keys_are_checked(cfg_for):
    with pytest.raises(ConfigError, match="compile_mode"):
        train.build(cfg_for("trainer.compile=true", "trainer.compile_mode=fastest", "trainer.max_steps=1"))


def test_compiled_regions_keep_state_dict_keys():
    from brainfm.models.sequence import SequenceTransformer
    from brainfm.tasks.base import compile_backbone, compile_regions

    model = SequenceTransformer(10, 16, 2, 2)
    keys = list(model.state_dict())
    regions = compile_backbone(model)
    assert regions == list(model.encoder.blocks) == compile_regions(model)
    assert list(model.state_dict()) == keys  # no _orig_mod. prefix: checkpoints load eagerly


# -- activation checkpointing ------------------------------------------------------------------------------
def _tiny(family: str):
    from brainfm.models.lstm import LSTMAutoencoder
    from brainfm.models.r2t_encoders import TemporalMLPEncoder
    from brainfm.models.semantoks import SemantoksEncoder
    from brainfm.models.sequence import SequenceTransformer
    from brainfm.models.swin4d import SwinTransformer4D
    from brainfm.models.tff import TFF

    bold, t = torch.randn(2, 20, 94), (torch.arange(20) * 0.72).expand(2, 20).contiguous()
    make = {
        "gpt": (lambda ck: SequenceTransformer(94, 16, 2, 2, causal=True, use_checkpoint=ck), (bold, t)),
        "bert": (lambda ck: SequenceTransformer(94, 16, 2, 2, n_segments=2, use_checkpoint=ck), (bold, t)),
        "lstm_ae": (lambda ck: LSTMAutoencoder(94, 16, 2, use_checkpoint=ck), (bold, t)),
        "tff": (lambda ck: TFF(img_size=(8, 8, 8), encoder_blocks=(1, 1), hidden_size=32, num_heads=2,
                               intermediate_size=32, max_positions=8, use_checkpoint=ck),
                (torch.randn(2, 2, 8, 8, 8, 3),)),
        "semantoks": (lambda ck: SemantoksEncoder(94, network_map="aal2_94_lobes", patch_size=5, conv_channels=8,
                                                  long_conv_channels=8, depth=2, n_heads=2, dropout=0.1,
                                                  use_checkpoint=ck), (bold,)),
        "temporal_mlp": (lambda ck: TemporalMLPEncoder(94, 16, use_checkpoint=ck), (bold, t)),
        "swin4d": (lambda ck: SwinTransformer4D(img_size=(12, 12, 12, 4), embed_dim=6, depths=(2, 2), num_heads=(1, 2),
                                                window_size=(2, 2, 2, 2), first_window_size=(2, 2, 2, 2),
                                                patch_size=(3, 3, 3, 1), drop_rate=0.1, use_checkpoint=ck),
                   (torch.randn(2, 1, 12, 12, 12, 4),)),
    }
    return make[family]


@pytest.mark.parametrize("family", ["gpt", "bert", "lstm_ae", "tff", "semantoks", "temporal_mlp", "swin4d"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(family):
    """Dropout on (0.1 in every family's default or set here): the recompute replays the masks."""
    make, inputs = _tiny(family)
    torch.manual_seed(0)
    plain = make(False)
    ckpt = make(True)
    ckpt.load_state_dict(plain.state_dict())
    results = []
    for model in (plain, ckpt):
        model.train()
        torch.manual_seed(1)
        out = model(*inputs)
        loss = (out[0] if isinstance(out, tuple) else out).float().square().mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    assert g0 and sorted(g0) == sorted(g1)
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)


# -- fused AdamW -------------------------------------------------------------------------------------------
def test_fused_adamw_is_picked_and_clips_under_mixed_precision(cfg_for):
    """On this CPU ``auto`` builds the fused AdamW; Lightning's bf16-mixed plugin would refuse gradient
    clipping for an optimizer that unscales inside its step, which brainfm's does not claim to do."""
    cfg = cfg_for(*SMALL["gpt"], *STEPS, "trainer.max_steps=3", "trainer.precision=bf16-mixed",
                  "trainer.gradient_clip_val=1.0", "run_name=fused")
    datamodule, task, trainer = train.build(cfg)
    trainer.fit(task, datamodule=datamodule)
    (optimizer,) = trainer.optimizers
    assert optimizer.defaults["fused"] is True and trainer.global_step == 3
    assert torch.isfinite(torch.tensor(list(train_losses(Path(cfg.paths.run_dir)).values()))).all()


# -- every family (slow) -----------------------------------------------------------------------------------
def _every_family(tmp: Path) -> dict[str, tuple[str, ...]]:
    """Small, dropout-free training configs of every backbone family with its objective."""
    from fixtures_r2t import write_roi_pairs
    from test_tff import _nitime_store

    from brainfm.config import repo_root
    from brainfm.data.embedded import build_nifti_toy_store, fetch

    fetch("nifti_toy", data_dir=repo_root() / "data")
    volumes = build_nifti_toy_store(repo_root() / "data")
    rest, task = write_roi_pairs(tmp / "rest.h5", n_subjects=8, task_path=tmp / "task.h5")
    simmim = ("experiment=simmim_toy", f"data.path={volumes}", "data.batch_size=2")
    return {
        **SMALL,
        "seq_bert": ("experiment=seq_bert", "model.d_model=32", "model.dropout=0", "model.attn_dropout=0", *WINDOWS),
        # fixed window lengths: with data.window.min_length every new length is a recompile (until dynamic)
        "semantoks": ("experiment=semantoks", "model.conv_channels=16", "model.long_conv_channels=16", "model.depth=2",
                      "model.n_heads=2", "task.head.hidden_dim=64", "task.head.bottleneck_dim=16",
                      "data.window.length=60", "data.window.min_length=null"),
        "r2t_temporal_mlp": ("data=r2t_roi", "task=r2t", "model=temporal_mlp", "model.dropout=0", "model.d_model=32",
                             "task.embed_dim=32", "data.n_rois=12", "data.atlas=toy", "data.pairs_per_subject=8",
                             f"data.path={rest}", f"data.task_path={task}", "data.window.length=40"),
        "tff": ("experiment=tff_hcp", "trainer=cpu", f"data.path={_nitime_store(tmp)}", "data.tr=1.35",
                "data.shape=[10,10,18]", "data.split.kind=time", "data.window.length=4", "data.batch_size=2",
                "data.num_workers=0", "data.pin_memory=false", "data.pool_mb=16", "model.hidden_size=32",
                "model.num_heads=4", "model.intermediate_size=64", "model.encoder_blocks=[1,1,1,1]",
                "model.input_dropout=0", "model.encoder_dropout=0", "model.decoder_dropout=0", "model.hidden_dropout=0",
                "task.optimizer.lr=3e-3"),
        "swin4d_v9": simmim,
        "swin4d_v7": (*simmim, "model.patch_size=[6,6,6,1]", "model.ape=separable", "model.rope=false",
                      "model.patch_norm=false", "model.window_size=[2,2,2,4]", "model.first_window_size=[2,2,2,4]"),
        "swin4d_v11": (*simmim, "model.attention=factorized", "model.ape=none", "model.rope=true",
                       "model.layer_scale=[0.9,0.1,1.0]", "model.patch_norm=true", "model.last_layer_full_MSA=true"),
    }


FAMILIES = ["gpt", "seq_bert", "lstm_ae", "semantoks", "r2t_temporal_mlp", "tff", "swin4d_v7", "swin4d_v9", "swin4d_v11"]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_compiled_matches_eager_and_resumes(family, cfg_for, tmp_path):
    """The eager reference crashes and resumes too: SimDINO does not repeat an uninterrupted run after a
    resume even eagerly (its teacher's EMA update of the checkpoint's step runs after the checkpoint is
    written, and is lost: ~2.5e-4 relative at the first step after it), which is not compile's doing."""
    overrides = _every_family(tmp_path)[family]
    eager, _, resumed = _eager_compiled_resumed(cfg_for, overrides, family, eager_resumes=True)
    _assert_same_curve(eager, resumed)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp_cpu", "fsdp"])
def test_compiled_training_under_ddp_and_fsdp2_matches_eager_and_resumes(strategy, hcp_h5, tmp_path):
    """2 gloo ranks (``brainfm-train`` subprocesses, as users run it): DDP (the compiled blocks inside
    DDP's wrapper) and FSDP2 (compiled after ``fully_shard``) train the compiled backbone to the eager
    run's losses, and a compiled run crashed after its step-10 checkpoint resumes from it."""
    import subprocess
    import sys

    import helpers

    from brainfm.config import repo_root

    cpu = [] if strategy == "ddp_cpu" else helpers.CPU
    common = [*helpers.MODEL, f"trainer={strategy}", *cpu, "trainer.devices=2", "data.batch_size=8",
              "trainer.max_steps=20", f"data.path={hcp_h5}", f"paths.output_dir={tmp_path}",
              f"paths.split_dir={tmp_path}/splits"]

    def run(name: str, *extra: str, crash: bool = False) -> dict[int, float]:
        out = subprocess.run([sys.executable, "-m", "brainfm.cli.train", *common, f"run_name={name}", *extra],
                             env=helpers.subprocess_env(), capture_output=True, text=True, timeout=1800,
                             cwd=repo_root())
        assert (out.returncode != 0 and "simulated crash" in out.stderr) if crash else out.returncode == 0, \
            out.stderr[-5000:]
        return train_losses(tmp_path / "gpt" / name)

    eager = run("eager")
    run("compiled", "trainer.compile=true", "+callbacks.crash._target_=helpers.CrashAtStep",
        "+callbacks.crash.step=13", crash=True)
    compiled = run("compiled", "trainer.compile=true", "ckpt_path=last")
    _assert_same_curve(eager, compiled)


# -- graph breaks ----------------------------------------------------------------------------------------------
#: graph breaks per compile region in training (docs/speed.md): none, except the LSTM autoencoder's
#: deliberate ones: each nn.LSTM layer call (TorchDynamo cannot trace nn.LSTM; 2 encoder + 2 decoder layers
#: with teacher forcing) and the TR embedding's range check (encoder input and decoder targets)
GRAPH_BREAKS = {"gpt": 0, "bert": 0, "tff": 0, "semantoks": 0, "temporal_mlp": 0, "swin4d": 0, "lstm_ae": 6}


@pytest.mark.parametrize("family", sorted(GRAPH_BREAKS))
def test_graph_breaks_of_every_family(family):
    """``torch._dynamo.explain`` of each compile region's forward on the inputs the model gives it."""
    import torch._dynamo as dynamo

    from brainfm.tasks.base import compile_regions

    make, inputs = _tiny(family)
    model = make(False).train()
    calls: dict[str, tuple] = {}
    def record(module, args, kwargs) -> None:
        calls.setdefault(type(module).__name__, (module, args, kwargs))

    hooks = [region.register_forward_pre_hook(record, with_kwargs=True) for region in compile_regions(model)]
    model(*inputs)
    for hook in hooks:
        hook.remove()
    if family == "lstm_ae":  # the teacher-forcing decision is a host draw per batch: fix it
        calls = {name: (module, args, {**kwargs, "teacher_forcing": True}) for name, (module, args, kwargs) in calls.items()}
    found = {name: dynamo.explain(module.forward)(*args, **kwargs).graph_break_count
             for name, (module, args, kwargs) in calls.items()}
    assert found and all(n == GRAPH_BREAKS[family] for n in found.values()), found
