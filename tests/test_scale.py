"""brainfm-scale: parameter counts and FLOPs on the meta device, simulated step memory against the
allocator's measured peak, model states per strategy, the Perlmutter placement, the table / plot /
notebook, and scale.sbatch's submission and array-task logic run locally."""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from brainfm.config import compose, repo_root
from brainfm.errors import ConfigError, DataError
from brainfm.scaling import driver
from brainfm.scaling.accounting import build_on_meta, count_flops, count_parameters
from brainfm.scaling.memory import (
    GiB,
    LiveTensorMemory,
    StepMemory,
    model_state_memory,
    place,
    simulate_step_memory,
)

ROOT = repo_root()
SIZES = {"5m": 5e6, "51m": 51e6, "202m": 202e6, "806m": 806e6, "3.2b": 3.2e9}
FAMILIES = [("swin4d_v9", "model/size"), ("gpt", "model/seq_size"), ("bert", "model/seq_size"),
            ("lstm_ae", "model/lstm_size")]
# a Swin4D v9 small enough for a CPU test: 48^3 x 4 volumes, patches 6^3 x 2 -> an 8^3 x 2 grid
TINY_SWIN = ["model=swin4d_v9", "sizes=[]", "model.img_size=[48,48,48,4]", "model.embed_dim=12",
             "model.depths=[1,1,1,1]", "model.num_heads=[1,2,4,8]"]


def _model_cfg(*overrides: str) -> dict:
    return OmegaConf.to_container(compose("scale", list(overrides)).model, resolve=True)


@pytest.mark.parametrize("model,group", FAMILIES)
def test_size_presets_match_their_names_on_meta(model, group):
    for size, target in SIZES.items():
        start = time.perf_counter()
        net, build_s = build_on_meta(_model_cfg(f"model={model}", f"{group}={size}"))
        counts = count_parameters(net)
        if size == "3.2b":
            assert time.perf_counter() - start < 10.0 and build_s < 10.0
        if model.startswith("swin4d") and size == "5m":
            target = 7.3e6  # the lab's loose "5M": 7,323,660 in SwiFT's ver7 code at 96^3 x 20 (ANCHORS.md)
        assert abs(counts.total - target) / target < 0.15, (model, size, counts.total)
        assert sum(counts.per_stage.values()) == counts.total
        assert 0 < counts.largest_layer < counts.total
    if model.startswith("swin4d"):  # SwiFT's unused final LayerNorm is frozen
        assert counts.trainable == counts.total - 2 * net.num_features
        assert list(counts.per_stage)[:5] == ["patch_embed", "stage1", "stage2", "stage3", "stage4"]


def test_flops_per_sample_match_a_hand_count():
    """GPT, d=32, 2 blocks, T=8 TRs of R=10 ROIs. Forward: the ROI projection 2TRd, per block
    qkv 6Td^2, attention 4T^2d, output 2Td^2, MLP 16Td^2. Backward: twice every product, except
    the ROI projection (the BOLD input needs no gradient: 2TRd)."""
    net, _ = build_on_meta(_model_cfg("model=gpt", "data.n_rois=10", "model.d_model=32", "model.depth=2",
                                      "model.n_heads=4"))
    t, r, d, blocks = 8, 10, 32, 2
    forward = 2 * t * r * d + blocks * (24 * t * d * d + 4 * t * t * d)
    backward = 2 * t * r * d + blocks * (48 * t * d * d + 8 * t * t * d)
    for batch in (1, 3):
        flops = count_flops(net, {"seq_len": t}, batch_size=batch)
        assert (flops.forward, flops.train) == (forward, forward + backward)


def test_live_tensor_memory_counts_storages_once_until_freed():
    tracker = LiveTensorMemory()
    with tracker:
        a = torch.zeros(1000)  # 4000 B
        view = a[:10]  # same storage
        b = torch.ones(500, dtype=torch.float64)  # 4000 B
        assert tracker.current == 8000
        del b
        c = torch.empty(250)  # 1000 B
    assert tracker.current == 5000 and tracker.peak == 8000
    del a, view, c
    assert tracker.current == 0


def test_model_states_follow_lightning_and_deepspeed_formulas():
    p, largest = 10**9, 10**7
    assert model_state_memory("gpu", p, largest).gpu == 16 * p  # fp32 weights, grads, two AdamW moments
    assert model_state_memory("ddp", p, largest, 2, 4).gpu == 20 * p  # + DDP's gradient buckets
    # DeepSpeed: ZeRO-2 keeps bf16 weights (2 B) and shards 18 B/param; ZeRO-3 shards all and
    # gathers the largest layer (4 B/param); offloaded ZeRO-3 keeps only that layer on the GPU
    assert model_state_memory("deepspeed_stage_2", p, largest, 2, 4).gpu == 2 * p + 18 * p // 8
    assert model_state_memory("deepspeed_stage_2_offload", p, largest, 2, 4).gpu == 2 * p
    assert model_state_memory("deepspeed_stage_3", p, largest, 2, 4).gpu == 4 * largest + 18 * p // 8
    off = model_state_memory("deepspeed_stage_3_offload", p, largest, 2, 4)
    assert off.gpu == 4 * largest and off.host_per_node == int(18 * p / 2 * 1.5)
    with pytest.raises(ConfigError, match="not one of"):
        model_state_memory("zero4", p, largest)


def test_placement_picks_the_fastest_strategy_of_the_smallest_layout():
    step = StepMemory(2, "bf16-mixed", params=0, buffers=0, grads=0, optimizer=0, inputs=0, cached=0, forward=0,
                      backward=4 * GiB, working=4 * GiB)
    p, largest = 2 * 10**9, 10**7
    strategies = ["ddp", "deepspeed_stage_2", "deepspeed_stage_3", "deepspeed_stage_3_offload"]
    host = 256 * GiB
    # 80 GB: one GPU holds 16 B x 2e9 = 29.8 GiB + 4 GiB
    assert str(place(p, largest, step, 72 * GiB, host, strategies)) == "1x1 gpu"
    # 30 GiB: one GPU fits only with ZeRO-3 offload (4 B x the largest layer + 4 GiB); without it,
    # ZeRO-2 on 1 GPU does not (2 + 18 = 20 B/param), ZeRO-3 neither (18 B/param), DDP on 2 GPUs
    # neither (20 B/param), ZeRO-2 on 2 GPUs does (2 + 9 = 11 B/param = 20.5 GiB + 4)
    assert str(place(p, largest, step, 30 * GiB, host, strategies)) == "1x1 deepspeed_stage_3_offload"
    assert str(place(p, largest, step, 30 * GiB, host, strategies[:3])) == "1x2 deepspeed_stage_2"
    # on a node of 4 GPUs the first fitting strategy is taken in the given (speed) order
    assert place(p, largest, step, 45 * GiB, host, strategies, nodes=1).strategy == "ddp"
    assert place(p, largest, step, 30 * GiB, host, strategies, nodes=1).strategy == "deepspeed_stage_2"
    # only offload fits 5 GiB; with too little host memory for it, nothing does
    assert place(p, largest, step, 5 * GiB, host, strategies).strategy == "deepspeed_stage_3_offload"
    assert place(p, largest, step, 5 * GiB, 10 * GiB, strategies, max_nodes=4) is None


def test_simulated_step_memory_counts_model_states_exactly():
    cfg = compose("scale", TINY_SWIN)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    sim = simulate_step_memory(model_cfg, 2, "32-true", gradient_clip_val=1.0)
    net = build_on_meta(model_cfg)[0]
    trainable = [p for p in net.parameters() if p.requires_grad]
    n, n_trainable = count_parameters(net).total, sum(p.numel() for p in trainable)
    # fp32 weights; gradients of the trainable ones; AdamW: two moments and a step counter each
    assert sim.params == 4 * n and sim.grads == 4 * n_trainable
    assert sim.optimizer == 8 * n_trainable + 4 * len(trainable) and sim.inputs == 2 * 48**3 * 4 * 4
    assert sim.working >= sim.backward > sim.forward > 0
    # bf16 autocast halves the activations of the linear layers; multi-tensor AdamW adds a
    # parameter-sized temporary (the square roots of the second moments) to the optimizer step
    bf16 = simulate_step_memory(model_cfg, 2, "bf16-mixed", foreach=True, gradient_clip_val=1.0)
    assert bf16.forward < 0.8 * sim.forward
    assert bf16.working - bf16.backward >= 0 and bf16.start == sim.start


@pytest.fixture(scope="module")
def scale_dir(tmp_path_factory) -> Path:
    """One measured run of a tiny Swin4D (the whole `run` path) and a plan of the sequence
    family's 5m preset, written into the same folder."""
    out = tmp_path_factory.mktemp("scale")
    ov = [*TINY_SWIN, f"out_dir={out}", "batch_size=2", "measure.batch_size=2"]
    rows, out_dir = driver.run(compose("scale", ov), ov)
    assert out_dir == out and len(rows) == 1
    plan = ["model=gpt", "mode=plan", "sizes=[5m]", f"out_dir={out}", "inputs.seq_len=20"]
    plan_rows, _ = driver.run(compose("scale", plan), plan)
    assert [r["size"] for r in plan_rows] == ["5m"] and plan_rows[0]["not_measured"] == "mode=plan"
    return out


def test_measured_tiny_size_is_predicted_within_20_percent(scale_dir):
    """The issue's criterion on the sizes that run here: predicted memory within 20 % of the
    measured peak (the simulation and the allocator see the same tensors: it is exact here)."""
    row = pd.read_csv(scale_dir / "scale.csv").set_index("model").loc["swin4d_v9"]
    assert row["step_s"] > 0 and row["samples_per_s"] == pytest.approx(2 / row["step_s"])
    assert row["measured_device"].startswith("cpu") and math.isnan(row["mfu"])  # MFU: n/a on a CPU
    assert abs(row["peak_error_pct"]) < 20 and abs(row["step_error_pct"]) < 20
    assert row["measured_step_gib"] > 0 and row["measured_peak_gib"] > row["measured_step_gib"]
    assert row["recommended"].startswith("1x4 ddp") and row["fit_a100_40g"].startswith("1x1 gpu")


def test_table_markdown_plot_plan_and_merge(scale_dir, tmp_path):
    table = pd.read_csv(scale_dir / "scale.csv")
    assert list(table["model"]) == ["gpt", "swin4d_v9"] and list(table["size"]) == ["5m", "base"]
    md = (scale_dir / "scale.md").read_text()
    assert "| gpt | 5m | 4.73 M |" in md and "| swin4d_v9 | base | cpu (" in md
    assert "Not measured: gpt 5m (mode=plan)" in md
    assert (scale_dir / "scale.png").stat().st_size > 10_000
    assert (scale_dir / "plan.csv").read_text().splitlines() == [
        "index,model,size,trainer,nodes,gpus_per_node,constraint,batch_size", "0,gpt,5m,ddp,1,4,gpu,2"]
    copy = tmp_path / "copy"
    shutil.copytree(scale_dir / "rows", copy / "rows")
    driver.run(compose("scale", ["mode=merge", f"out_dir={copy}"]), [])  # `brainfm-scale merge`
    assert pd.read_csv(copy / "scale.csv").equals(table)
    with pytest.raises(DataError, match="no scale rows"):
        driver.run(compose("scale", ["mode=merge", f"out_dir={tmp_path / 'empty'}"]), [])


def test_notebook_runs_top_to_bottom_on_the_table(scale_dir, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / "scale.ipynb", as_version=4)
    monkeypatch.setenv("BRAINFM_SCALE_TABLE", str(scale_dir / "scale.csv"))  # the kernel inherits it
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert f"{scale_dir / 'scale.csv'}: 2 rows" in text and "1 measured size(s)" in text
    assert sum(o.output_type == "display_data" for o in outputs) >= 2  # the two figures


def test_unknown_size_and_mode_are_clear_errors(tmp_path):
    cfg = compose("scale", ["model=gpt", "sizes=[7m]", f"out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"no preset model/seq_size/7m.yaml; the model/seq_size presets are 202m, 3.2b"):
        driver.run(cfg, ["model=gpt"])
    with pytest.raises(ConfigError, match="mode='fit' must be run, plan or merge"):
        driver.run(compose("scale", ["mode=fit"]), [])


def _sbatch_env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "BRAINFM_LOCAL": "1", "BRAINFM_ROOT": str(ROOT), "BRAINFM_SCRATCH": str(tmp_path / "scratch"),
            "BRAINFM_PYTHON": sys.executable, **extra}


def _sbatch(args: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(["bash", str(ROOT / "slurm/perlmutter/scale.sbatch"), *args], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


PLAN = """index,model,size,trainer,nodes,gpus_per_node,constraint,batch_size
0,swin4d_v9,5m,ddp,1,4,gpu,2
1,swin4d_v9,806m,ddp,1,4,gpu,2
2,swin4d_v9,3.2b,deepspeed_stage_3,2,4,gpu&hbm80g,2
3,swin4d_v9,12b,,,,,2
"""


def test_scale_sbatch_submits_one_array_per_node_layout_and_tasks_run_their_size(tmp_path):
    """The script's logic without SLURM or a planning run: a given plan is submitted as one array
    per (nodes, GPUs, constraint), and an array task launches its size with its trainer."""
    (tmp_path / "plan.csv").write_text(PLAN)
    out_dir = tmp_path / "scale"
    env = _sbatch_env(tmp_path, SCALE_DRY_RUN="1", SCALE_PLAN=str(tmp_path / "plan.csv"))
    res = _sbatch(["model=swin4d_v9", "batch_size=2", f"out_dir={out_dir}"], env, timeout=60)
    submitted = sorted(shlex.split(line) for line in res.stdout.splitlines() if line.startswith("sbatch "))
    script = str(ROOT / "slurm/perlmutter/scale.sbatch")
    tail = ["-o", f"{out_dir}/logs/%x-%A_%a.out", script, "model=swin4d_v9", "batch_size=2", f"out_dir={out_dir}",
            f"out_dir={out_dir}"]
    assert submitted == [
        ["sbatch", "--parsable", "-N", "1", "--ntasks-per-node=4", "--gpus-per-node=4", "-C", "gpu", "--array=0,1", *tail],
        ["sbatch", "--parsable", "-N", "2", "--ntasks-per-node=4", "--gpus-per-node=4", "-C", "gpu&hbm80g", "--array=2",
         *tail],
    ]
    assert "12b fits no configuration" in res.stderr and (out_dir / "plan.csv").read_text() == PLAN
    # array task 2: srun (here `echo`) starts brainfm-scale for 3.2b with the planned trainer and nodes
    task = _sbatch(["model=swin4d_v9", f"out_dir={out_dir}"],
                   _sbatch_env(tmp_path, SLURM_ARRAY_TASK_ID="2", SLURM_ARRAY_JOB_ID="9", BRAINFM_SRUN="echo srun"))
    assert "9_2: swin4d_v9 3.2b with trainer=deepspeed_stage_3 on 2 node(s) x 4 GPU(s)" in task.stdout
    launched = task.stdout.strip().splitlines()[-1].split()
    assert launched[:4] == ["srun", sys.executable, "-m", "brainfm.cli.scale"] and launched[4] == "run"
    assert launched[-5:] == ["sizes=[3.2b]", "trainer=deepspeed_stage_3", "cluster.nodes=2", "measure.enabled=true",
                             "measure.batch_size=2"]
    assert f"out_dir={out_dir}" in launched
    bad = subprocess.run(["bash", str(script), f"out_dir={out_dir}"], env=_sbatch_env(tmp_path, SLURM_ARRAY_TASK_ID="7"),
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "array task 7 is not in" in bad.stderr


SBATCH_ARGS = ["model=gpt", "sizes=[5m,51m]", "inputs.seq_len=16", "data.n_rois=64",
               # a 0.2 GB "GPU" and no offload: 5m fits DDP on one node, 51m needs ZeRO-3 on more
               "cluster.gpus.a100_40g.memory_gib=0.2", "cluster.strategies=[ddp,deepspeed_stage_2,deepspeed_stage_3]"]


@pytest.mark.slow
def test_scale_sbatch_plans_submits_and_an_array_task_measures_into_the_shared_table(tmp_path):
    """scale.sbatch end to end without SLURM: `brainfm-scale plan`, the dry-run submission, then
    array task 1 run by hand (trainer replaced by `cpu`, no srun) measuring into the table."""
    res = _sbatch(SBATCH_ARGS, _sbatch_env(tmp_path, SCALE_DRY_RUN="1"))
    scale_dir = tmp_path / "scratch" / "scale" / "gpt"
    plan = pd.read_csv(scale_dir / "plan.csv")
    assert list(plan["size"]) == ["5m", "51m"]
    assert list(plan["trainer"]) == ["ddp", "deepspeed_stage_3"] and plan["nodes"][0] == 1 < plan["nodes"][1]
    submitted = [line for line in res.stdout.splitlines() if line.startswith("sbatch ")]
    assert len(submitted) == 2 and any(f"-N {plan['nodes'][1]} " in s and "--array=1 " in s for s in submitted)
    env = _sbatch_env(tmp_path, SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_JOB_ID="77", SCALE_TRAINER="cpu", BRAINFM_SRUN="")
    task = _sbatch(SBATCH_ARGS, env, timeout=900)
    assert "77_1: gpt 51m with trainer=cpu" in task.stdout
    table = pd.read_csv(scale_dir / "scale.csv").set_index("size")
    assert math.isnan(table.loc["5m", "step_s"]) and table.loc["51m", "step_s"] > 0
    assert table.loc["51m", "measured_batch_size"] == 2 and abs(table.loc["51m", "peak_error_pct"]) < 20


@pytest.mark.slow
def test_swin4d_v9_5m_at_96_cubed_predicted_within_20_percent(tmp_path):
    """The 5m preset at SwiFT's 96^3 x 20, batch 1, fp32 on this CPU (about a minute)."""
    ov = ["model=swin4d_v9", "sizes=[5m]", f"out_dir={tmp_path}", "measure.enabled=true", "measure.steps=1"]
    rows, _ = driver.run(compose("scale", ov), ov)
    assert abs(rows[0]["peak_error_pct"]) < 20 and abs(rows[0]["step_error_pct"]) < 20
    assert re.match(r"1x\d", rows[0]["fit_a100_40g"])


def test_activation_checkpointing_lowers_the_prediction_and_matches_the_measured_peak(tmp_path):
    """model.use_checkpoint=true on a small GPT (activations dominate: 4 blocks, 128 TRs, batch 8): the
    simulation runs the checkpointing, so the predicted activations and step peak drop, and both
    predictions match the CPU allocator's measured peak (within the 20 % above); the recomputed forward
    is counted apart from the model FLOPs."""
    rows = {}
    for ck in (False, True):
        ov = ["model=gpt", "sizes=[]", "data.n_rois=64", "model.d_model=64", "model.depth=4", "model.n_heads=4",
              "inputs.seq_len=128", "batch_size=8", "measure.batch_size=8", "measure.enabled=true", "measure.steps=1",
              f"model.use_checkpoint={str(ck).lower()}", f"out_dir={tmp_path / str(ck)}"]
        (rows[ck],), _ = driver.run(compose("scale", ov), ov)
    plain, ckpt = rows[False], rows[True]
    assert ckpt["use_checkpoint"] and not plain["use_checkpoint"]
    assert ckpt["act_gib"] < 0.2 * plain["act_gib"] and ckpt["step_gib"] < 0.5 * plain["step_gib"]
    assert ckpt["predicted_step_gib"] < 0.5 * plain["predicted_step_gib"]
    assert ckpt["measured_step_gib"] < 0.5 * plain["measured_step_gib"]
    for row in (plain, ckpt):
        assert abs(row["peak_error_pct"]) < 20 and abs(row["step_error_pct"]) < 20, row
    assert ckpt["train_gflops"] == plain["train_gflops"] and ckpt["recompute_gflops"] > 0 == plain["recompute_gflops"]
