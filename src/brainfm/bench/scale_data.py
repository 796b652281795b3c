"""The data layer at UK Biobank scale, measured on synthetic stores in the real layout.

Stores (``brainfm-data synth volumes``; 8^3 voxels so that 45,000 runs fit here, 490 TRs at 0.735 s as
UKB rest; ``--data zeros`` writes sparse ``bold.npy`` files, which read as zeros and take no disk):

- ``ukb5k`` and ``ukb45k``: 5,000 and 45,000 single-run subjects (UKB folder names ``<eid>_20227_2_0``);
- for ``data=multi``: ``ukb45k`` + ABCD (3,000 subjects x 4 runs of 380 TRs at 0.8 s) + HCP (3,000 runs
  of 1,200 TRs at 0.72 s) = 60,000 runs.

Rows:

- **open**: seconds to open the store (median of 5, in this process) and the file-system metadata
  operations of one open (``strace -f -e trace=%file,getdents64`` around a second ``VolumeStore(root)``
  in a fresh interpreter, so that imports are not counted): opens, stats, directory reads;
  the same store without its index (every ``meta.json`` and array header read) beside it;
- **first step**: seconds from starting ``brainfm-train data=volumes`` (a Swin4D sized to the grid,
  2 DataLoader workers) to the end of a run of one optimizer step, i.e. an upper bound of the time to
  the first step (it includes the teardown);
- **worker RSS**: peak resident memory (``VmHWM``) of a DataLoader worker after reading 100,000 clips
  of 4 TRs drawn uniformly over all runs (the datamodule's training loader, shuffled over every
  start), for 5,000 and 45,000 runs: it must not grow with the number of runs;
- **parcellation**: runs per minute and peak RSS of ``brainfm-preprocess parcellate`` on the embedded
  real NIfTI runs (``nifti_toy``) repeated.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from brainfm.config import compose, repo_root
from brainfm.data.datamodules.volume import VolumeDataModule
from brainfm.data.embedded import fetch
from brainfm.data.stores.synth import synth_volumes
from brainfm.data.stores.volume import VolumeStore

GRID = (8, 8, 8)
SWIN = ["model=swin4d_v7", "model.img_size=[8,8,8,4]", "model.embed_dim=12", "model.depths=[1,1]",
        "model.num_heads=[2,2]", "model.window_size=[4,4,4,4]", "model.first_window_size=[4,4,4,4]",
        "model.patch_size=[2,2,2,1]"]
STORES = {  # name: (runs, TRs, TR s, runs per subject, subject folder format, run ids)
    "ukb5k": (5_000, 490, 0.735, 1, "{i:07d}_20227_2_0", ["rest"]),
    "ukb45k": (45_000, 490, 0.735, 1, "{i:07d}_20227_2_0", ["rest"]),
    "abcd": (12_000, 380, 0.8, 4, "sub-NDARINV{i:08d}", ["rest-1", "rest-2", "rest-3", "rest-4"]),
    "hcp": (3_000, 1200, 0.72, 1, "{i:06d}", ["REST1_LR"]),
}
FILE_CALLS = ("openat", "open", "stat", "newfstatat", "statx", "lstat", "access", "faccessat", "faccessat2",
              "readlink", "readlinkat", "getdents64")


def _cli(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def make_stores(root: Path, names=tuple(STORES), data: str = "zeros", workers: int = 2) -> dict[str, float]:
    """Synthesise the stores missing under ``root``; returns seconds per store written."""
    took = {}
    for name in names:
        out = root / name
        if (out / "index.parquet").is_file():
            continue
        runs, trs, tr, per_subject, fmt, run_ids = STORES[name]
        t0 = time.perf_counter()
        synth_volumes(out, runs, trs, GRID, tr=tr, runs_per_subject=per_subject, subject_format=fmt, run_ids=run_ids,
                      data=data, workers=workers, chunk=1000)
        took[name] = time.perf_counter() - t0
    return took


def open_seconds(root: Path, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        VolumeStore(root)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def metadata_ops(root: Path, without_index: bool = False) -> dict[str, int] | None:
    """File-system calls of one ``VolumeStore(root)`` (strace), or None without strace. With
    ``without_index`` the index is hidden (renamed for the measurement) to count a scan."""
    if shutil.which("strace") is None:
        return None
    index = root / "index.parquet"
    hidden = root / ".index.parquet.bench"
    # the first open imports what opening needs (pyarrow, numpy's .npy reader); the second one is counted
    code = ("import os, brainfm.data.stores.volume as v\n"
            f"v.VolumeStore({str(root)!r})\n"
            "os.path.exists('/__brainfm_begin__')\n"
            f"v.VolumeStore({str(root)!r})\n"
            "os.path.exists('/__brainfm_end__')\n")
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as log:
        if without_index:
            os.replace(index, hidden)  # hidden for the measurement and put back below: a move, not a write
        try:
            subprocess.run(["strace", "-f", "-qq", "-e", "trace=%file,getdents64", "-o", log.name, sys.executable, "-c",
                            code], check=True, capture_output=True)
        finally:
            if without_index:
                os.replace(hidden, index)  # put back
        lines = Path(log.name).read_text().splitlines()
    begin = next(i for i, line in enumerate(lines) if "__brainfm_begin__" in line)
    end = next(i for i, line in enumerate(lines) if "__brainfm_end__" in line)
    counts = {"open": 0, "stat": 0, "getdents": 0, "other": 0}
    for line in lines[begin + 1:end]:
        m = re.match(r"^(?:\d+\s+)?(\w+)\(", line)
        if not m or m.group(1) not in FILE_CALLS:
            continue
        call = m.group(1)
        key = "open" if call.startswith("open") else "stat" if "stat" in call else "getdents" if call == "getdents64" \
            else "other"
        counts[key] += 1
    counts["total"] = sum(counts.values())
    return counts


def first_step_seconds(stores: Path, work: Path, data: list[str]) -> float:
    """Wall seconds of ``brainfm-train ... trainer.max_steps=1`` (start to exit)."""
    args = [_cli("brainfm-train"), *data, *SWIN, "task=simmim", "experiment_name=bench_scale_data",
            f"paths.output_dir={work}/outputs", f"paths.split_dir={work}/splits", "trainer.max_steps=1",
            "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "logger=csv", "callbacks=none",
            "trainer.enable_progress_bar=false"]
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"brainfm-train failed:\n{proc.stderr[-3000:]}")
    return took


def _volume_data(path: Path, tr: float) -> list[str]:
    return ["data=volumes", f"data.path={path}", f"data.tr={tr}", "data.shape=[8,8,8]", "data.window.length=4",
            "data.num_workers=2", "data.pin_memory=false", "data.pool_mb=64", "data.batch_size=8",
            "data.normalization.fill=null"]


def _multi_data(stores: Path) -> list[str]:
    out = ["data=multi", "data.num_workers=2", "data.batch_size=8"]
    for name, child in (("ukb", "ukb45k"), ("abcd", "abcd"), ("hcp", "hcp")):
        out += [f"data.datasets.{name}.store={stores / child}", f"data.datasets.{name}.shape=[8,8,8]",
                f"data.datasets.{name}.window.length=4", f"data.datasets.{name}.pin_memory=false",
                f"data.datasets.{name}.pool_mb=64", f"data.datasets.{name}.normalization.fill=null"]
    return out


def _worker_rss(root: Path, clips: int, batch: int, out: Path) -> None:
    """In a subprocess: read ``clips`` clips over every run through the training loader (1 worker) and
    write the worker's peak RSS (VmHWM, kB) sampled after every batch, and the main process's."""
    import psutil

    dm = VolumeDataModule("bench", str(root), shape=list(GRID), window={"length": 4, "train_stride": 1},
                          split={"kind": "time", "train_fraction": 0.99}, batch_size=batch, num_workers=1,
                          pool_mb=16, return_mask=True)
    dm.setup()
    loader = dm.train_dataloader()
    seen, runs, samples, mark = 0, set(), [], clips // 10
    it = iter(loader)
    worker = None
    while seen < clips:
        batch_ = next(it)
        seen += int(batch_["subject"].shape[0])
        runs.update(batch_["run"].tolist())
        if worker is None:
            worker = psutil.Process().children()[0]
        if seen >= mark:  # every 10 % of the clips
            status = Path(f"/proc/{worker.pid}/status").read_text()
            samples.append((seen, int(re.search(r"VmHWM:\s+(\d+)", status).group(1))))
            mark += clips // 10
    status = Path(f"/proc/{worker.pid}/status").read_text()
    result = {"clips": seen, "runs_touched": len(runs), "runs": len(dm.store),
              "worker_hwm_kb": int(re.search(r"VmHWM:\s+(\d+)", status).group(1)),
              "worker_rss_kb": int(re.search(r"VmRSS:\s+(\d+)", status).group(1)),
              "main_hwm_kb": int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)),
              "samples": samples}
    out.write_text(json.dumps(result))


def worker_rss(root: Path, clips: int = 100_000, batch: int = 32) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rss.json"
        code = f"from brainfm.bench.scale_data import _worker_rss; from pathlib import Path; " \
               f"_worker_rss(Path({str(root)!r}), {clips}, {batch}, Path({str(out)!r}))"
        subprocess.run([sys.executable, "-c", code], check=True)
        return json.loads(out.read_text())


def multi_open_seconds(stores: Path, work: Path) -> float:
    """Seconds to set up ``data=multi`` over the three stores (60,000 runs): open, check, split, datasets."""
    from hydra.utils import instantiate

    cfg = compose("train", [*_multi_data(stores), f"paths.split_dir={work}/splits_multi", *SWIN])
    t0 = time.perf_counter()
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    return time.perf_counter() - t0


def parcellation(work: Path, copies: int = 50) -> dict | None:
    """Runs/minute and peak RSS of ``brainfm-preprocess parcellate`` on ``copies`` copies of the embedded
    NIfTI runs, with a 2-label atlas on their grid."""
    import nibabel as nib


    src = Path(fetch("nifti_toy", data_dir=repo_root() / "data"))
    files = sorted(p for p in src.rglob("*.nii*") if len(nib.load(str(p)).shape) == 4)
    if not files:
        return None
    inp = work / "parc_in"
    inp.mkdir(parents=True, exist_ok=True)
    by_grid: dict = {}
    for f in files:  # the runs on the most common grid (nitime's two 10x10x18 runs of 40 TRs)
        by_grid.setdefault(nib.load(str(f)).shape[:3], []).append(f)
    same = max(by_grid.values(), key=len)
    first = nib.load(str(same[0]))
    n = 0
    for k in range(copies):
        for f in same:
            dst = inp / f"sub-{n:04d}_task-rest_bold.nii.gz"
            if not dst.exists():
                shutil.copy(f, dst)
            n += 1
    labels = np.zeros(first.shape[:3], dtype=np.int16)
    labels[: first.shape[0] // 2] = 1
    labels[first.shape[0] // 2:] = 2
    atlas = work / "atlas.nii.gz"
    nib.save(nib.Nifti1Image(labels, first.affine), str(atlas))
    out = work / "parc.h5"
    if out.exists():
        out.unlink()
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", _cli("brainfm-preprocess"), "parcellate", "--input", str(inp),
                           "--atlas", str(atlas), "--output", str(out), "--no-progress"], capture_output=True, text=True)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"parcellate failed:\n{proc.stderr[-3000:]}")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return {"runs": n, "seconds": took, "runs_per_minute": 60 * n / took,
            "peak_rss_mb": int(peak.group(1)) / 1024 if peak else float("nan")}


def main(work: Path | None = None, data: str = "zeros", clips: int = 100_000, skip: tuple[str, ...] = (),
         shrink: int = 1) -> None:
    """Print the table (module docstring). ``shrink`` divides every store's run count (a quick check of
    this script); ``skip``: any of ``train``, ``rss``, ``parcellation``."""
    if shrink > 1:
        for name, (runs, *rest) in list(STORES.items()):
            STORES[name] = (max(8, runs // shrink), *rest)
    keep = work is not None
    work = Path(work or tempfile.mkdtemp(prefix="brainfm-scale-data-"))
    stores = work / "stores"
    rows: list[tuple[str, str, str]] = []
    try:
        print(f"# synthetic stores under {stores} ({data} data, grid {GRID}); written in "
              f"{make_stores(stores, data=data)} s", flush=True)
        for name in ("ukb5k", "ukb45k"):
            root = stores / name
            ops = metadata_ops(root)
            rows.append((f"open {name} ({STORES[name][0]:,} runs), index", f"{open_seconds(root):.3f} s",
                         "strace unavailable" if ops is None else
                         f"{ops['open']} opens, {ops['stat']} stats, {ops['getdents']} dir reads ({ops['total']} calls)"))
            print(rows[-1], flush=True)
        scan = metadata_ops(stores / "ukb5k", without_index=True)
        if scan is not None:
            rows.append(("open ukb5k without its index (scan)", "-",
                         f"{scan['open']} opens, {scan['stat']} stats, {scan['getdents']} dir reads ({scan['total']} calls)"))
            print(rows[-1], flush=True)
        if "train" not in skip:
            t = first_step_seconds(stores, work, _volume_data(stores / "ukb45k", 0.735))
            rows.append(("brainfm-train data=volumes (45,000 runs): start to end of step 1", f"{t:.1f} s", "2 workers"))
            print(rows[-1], flush=True)
            t = multi_open_seconds(stores, work)
            rows.append(("data=multi setup (UKB 45,000 + ABCD 12,000 + HCP 3,000 runs)", f"{t:.1f} s",
                         "open, check, split, datasets"))
            print(rows[-1], flush=True)
            t = first_step_seconds(stores, work, _multi_data(stores))
            rows.append(("brainfm-train data=multi (60,000 runs): start to end of step 1", f"{t:.1f} s", "2 workers each"))
            print(rows[-1], flush=True)
        if "rss" not in skip:
            for name in ("ukb5k", "ukb45k"):
                r = worker_rss(stores / name, clips)
                rows.append((f"DataLoader worker after {r['clips']:,} clips ({name}, {r['runs_touched']:,} of "
                             f"{r['runs']:,} runs)", f"{r['worker_hwm_kb'] / 1024:.0f} MB peak",
                             f"RSS at the end {r['worker_rss_kb'] / 1024:.0f} MB; main process peak "
                             f"{r['main_hwm_kb'] / 1024:.0f} MB; worker peak after 10/50/100 % of the clips: "
                             + "/".join(f"{r['samples'][k][1] / 1024:.0f}" for k in (0, len(r['samples']) // 2 - 1, -1))
                             + " MB"))
                print(rows[-1], flush=True)
        if "parcellation" not in skip:
            p = parcellation(work)
            if p is not None:
                rows.append((f"brainfm-preprocess parcellate ({p['runs']} real NIfTI runs, nifti_toy repeated)",
                             f"{p['runs_per_minute']:.0f} runs/min", f"peak RSS {p['peak_rss_mb']:.0f} MB"))
                print(rows[-1], flush=True)
    finally:
        print()
        print("| measurement | value | detail |")
        print("|---|---|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]} |")
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
