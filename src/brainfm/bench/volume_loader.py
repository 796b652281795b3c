"""Clips/s of the volume store against the per-frame ``.pt`` layout (SwiFT/TFF/R2T), beside the
raw ceilings of this machine: a memory copy of the same bytes and ``dd`` of the file.

Synthetic data of realistic size (96^3 float16 frames, 20-TR clips of 35.4 MB) are written to a
temporary folder in both layouts (same values) and removed afterwards. "Cold" runs drop the page
cache first (``sync; echo 3 > /proc/sys/vm/drop_caches``, root only; otherwise the table says so)
and read clips that do not overlap, so every byte comes from the disk once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from brainfm.data.datasets.volume import VolumeClipDataset, VolumeClipLoader
from brainfm.data.stores.frames import FrameStore
from brainfm.data.stores.volume import VolumeStore, write_volume_run
from brainfm.data.windows import WindowBatchSampler

SHAPE = (96, 96, 96)
CLIP = 20
CLIP_MB = CLIP * int(np.prod(SHAPE)) * 2 / 1e6


def drop_caches() -> bool:
    """Drop the page cache (needs root); False when not permitted."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def make_data(root: Path, n_runs: int = 2, n_frames: int = 400, seed: int = 0) -> tuple[Path, Path]:
    """Write ``n_runs`` runs in both layouts: a volume store and SwiFT frame folders (fp16 (X, Y, Z, 1)
    per TR, as SwiFT's ``preprocessing.py`` saves them). Returns ``(store root, frames root)``."""
    store, frames = root / "store", root / "frames"
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) - s / 2 for s in SHAPE], indexing="ij"))
    brain = (grid**2).sum(0) < 40**2
    for r in range(n_runs):
        subject = f"sub-{r:02d}"
        data = np.zeros((n_frames, *SHAPE), dtype=np.float16)
        for t in range(n_frames):
            data[t][brain] = rng.standard_normal(int(brain.sum()), dtype=np.float32)
        write_volume_run(store, subject, "rest", data, tr=0.72, mask=brain, normalization="none", fill="min")
        bold = np.load(store / subject / "rest" / "bold.npy", mmap_mode="r")
        folder = frames / "img" / subject
        folder.mkdir(parents=True, exist_ok=True)
        for t in range(n_frames):
            torch.save(torch.from_numpy(np.array(bold[t]))[..., None].clone(), folder / f"frame_{t}.pt")
    return store, frames


def _clips(store, n: int, seed: int, overlap: bool) -> list[tuple[int, int]]:
    """Random clip starts; non-overlapping (each frame read once) when ``overlap`` is False."""
    rng = np.random.default_rng(seed)
    if overlap:
        runs = rng.integers(0, len(store.lengths), n)
        return [(int(r), int(rng.integers(0, store.lengths[r] - CLIP + 1))) for r in runs]
    grid = [(r, s) for r in range(len(store.lengths)) for s in range(0, int(store.lengths[r]) - CLIP + 1, CLIP)]
    order = rng.permutation(len(grid))[:n]
    return [grid[i] for i in order]


class SwiftFrameClips(Dataset):
    """SwiFT's ``load_sequence`` (``datasets.py``): one ``torch.load`` per frame, ``unsqueeze(0)``,
    ``torch.cat`` on the time axis -> ``(1, X, Y, Z, T)``; batched by the default collate."""

    def __init__(self, frames: Path, subjects: list[str], clips: list[tuple[int, int]]) -> None:
        self.frames, self.subjects, self.clips = frames, subjects, clips

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> torch.Tensor:
        run, start = self.clips[i]
        folder = self.frames / "img" / self.subjects[run]
        y = [torch.load(folder / f"frame_{t}.pt", weights_only=True).unsqueeze(0) for t in range(start, start + CLIP)]
        return torch.cat(y, dim=4)


def _time_batches(it, n_batches: int) -> float:
    n, t0 = 0, time.perf_counter()
    for _ in range(n_batches):
        try:
            b = next(it)
        except StopIteration:
            break
        n += (b["volume"] if isinstance(b, dict) else b).shape[0]
        del b
    return n / (time.perf_counter() - t0)


def swift_rate(frames: Path, subjects: list[str], store, workers: int, batch: int, cold: bool,
               n_batches: int = 10) -> float | None:
    """Clips/s of SwiFT's per-frame loading in a plain DataLoader (random clips; non-overlapping when cold)."""
    clips = _clips(store, (n_batches + 4) * batch, 3, overlap=not cold)
    loader = DataLoader(SwiftFrameClips(frames, subjects, clips), batch_size=batch, num_workers=workers)
    if cold and not drop_caches():
        return None
    it = iter(loader)
    if not cold:
        next(it)
    return _time_batches(it, n_batches)


def loader_rate(store, workers: int, batch: int, cold: bool, n_batches: int = 50, seed: int = 0) -> float | None:
    """Clips/s of :class:`VolumeClipLoader` in steady state (workers started and every pool
    buffer written once before timing); random clips, non-overlapping when cold.

    Pages mapped into a process survive ``drop_caches``, so a cold run closes the store's memory
    maps and uses workers that start after the drop (not persistent)."""
    segments = [(i, 0, int(n)) for i, n in enumerate(store.lengths)]
    ds = VolumeClipDataset(store, segments, CLIP, clip_stride=CLIP if cold else 1, return_mask=False)
    sampler = WindowBatchSampler(len(ds), batch, CLIP, seed=seed)
    loader = VolumeClipLoader(ds, sampler, max_batch=batch, num_workers=workers, pool_mb=4096,
                              persistent_workers=workers > 0 and not cold)
    warm = 2 * (2 * workers + 3)
    for epoch in range(-(-warm // len(sampler))):
        sampler.set_epoch(epoch)
        _time_batches(iter(loader), min(warm, len(sampler)))
    sampler.set_epoch(10_000)
    if cold:
        getattr(store, "close", lambda: None)()
        if not drop_caches():
            return None
    rate = _time_batches(iter(loader), n_batches)
    del loader
    return rate


class _PlainMemmapClips(Dataset):
    """A plain dataset (fresh tensor per clip from a contiguous memory map, default collate)."""

    def __init__(self, store: VolumeStore, clips) -> None:
        self.store, self.clips = store, clips

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> torch.Tensor:
        run, start = self.clips[i]
        return torch.from_numpy(np.array(self.store.memmap(run)[start : start + CLIP]))


def plain_rate(store: VolumeStore, workers: int, n_clips: int, batch: int) -> float:
    ds = _PlainMemmapClips(store, _clips(store, n_clips + batch, 1, True))
    it = iter(DataLoader(ds, batch_size=batch, num_workers=workers))
    next(it)
    n, t0 = 0, time.perf_counter()
    for b in it:
        n += b.shape[0]
    return n / (time.perf_counter() - t0)


def memcpy_rate(repeats: int = 40) -> float:
    src = np.ones((CLIP, *SHAPE), dtype=np.float16)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    t0 = time.perf_counter()
    for _ in range(repeats):
        np.copyto(dst, src)
    return repeats / (time.perf_counter() - t0)


def dd_rate(path: Path, cold: bool) -> float | None:
    """Clips/s equivalent of ``dd if=<file> of=/dev/null bs=16M`` (cold: page cache dropped)."""
    if cold and not drop_caches():
        return None
    t0 = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M"], check=True, capture_output=True)
    return path.stat().st_size / 1e6 / CLIP_MB / (time.perf_counter() - t0)


def main(data_dir: Path | None = None, n_runs: int = 2, n_frames: int = 400, batch: int = 4) -> list[dict]:
    """Run every measurement and print the table; returns its rows."""
    from rich.console import Console
    from rich.table import Table

    own = data_dir is None
    root = Path(tempfile.mkdtemp(prefix="brainfm-bench-vol-")) if own else Path(data_dir)
    rows: list[dict] = []
    try:
        if not (root / "store").is_dir():
            t0 = time.perf_counter()
            make_data(root, n_runs, n_frames)
            print(f"wrote {n_runs} runs x {n_frames} TRs of 96^3 fp16 in both layouts to {root} "
                  f"({time.perf_counter() - t0:.0f} s)")
        vstore = VolumeStore(root / "store")
        fstore = FrameStore(root / "frames", tr=0.72)
        subjects = fstore.subject_ids
        can_drop = drop_caches()
        for p in sorted((root / "store").glob("*/*/bold.npy")) + sorted((root / "frames").glob("img/*/*.pt")):
            with open(p, "rb") as f:  # warm the page cache
                while f.read(16 << 20):
                    pass

        def add(layout, reader, workers, cache, rate):
            rows.append({"layout": layout, "reader": reader, "workers": workers, "cache": cache, "clips_per_s": rate})

        for w in (0, 2):
            add("per-frame .pt", "SwiFT load_sequence, DataLoader", w, "warm",
                swift_rate(root / "frames", subjects, vstore, w, batch, False))
            add("per-frame .pt", "brainfm FrameStore + VolumeClipLoader", w, "warm",
                loader_rate(fstore, w, batch, False, n_batches=10))
        add("volume store", "VolumeClipLoader", 0, "warm", loader_rate(vstore, 0, batch, False))
        add("volume store", "VolumeClipLoader", 2, "warm", loader_rate(vstore, 2, batch, False, n_batches=100))
        add("raw", "memmap copy, plain DataLoader (fresh tensors)", 0, "warm", plain_rate(vstore, 0, 100, batch))
        add("raw", "memmap copy, plain DataLoader (fresh tensors)", 2, "warm", plain_rate(vstore, 2, 100, batch))
        add("raw", "memory copy of a clip (RAM -> RAM, reused buffer)", 0, "-", memcpy_rate())
        cold = "cold" if can_drop else "cold: not permitted"
        bold = sorted((root / "store").glob("*/*/bold.npy"))[0]
        add("per-frame .pt", "SwiFT load_sequence, DataLoader", 0, cold,
            swift_rate(root / "frames", subjects, vstore, 0, batch, True, n_batches=4))
        add("per-frame .pt", "brainfm FrameStore + VolumeClipLoader", 0, cold, loader_rate(fstore, 0, batch, True))
        add("volume store", "VolumeClipLoader", 0, cold, loader_rate(vstore, 0, batch, True))
        add("volume store", "VolumeClipLoader", 2, cold, loader_rate(vstore, 2, batch, True))
        add("raw", "dd bs=16M of a run's bold.npy", 0, cold, dd_rate(bold, True))
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)

    def rate(layout, reader_prefix, workers, cache):
        for r in rows:
            if r["layout"] == layout and r["reader"].startswith(reader_prefix) and r["workers"] == workers and r["cache"] == cache:
                return r["clips_per_s"]
        return None

    table = Table(title=f"Volume loader: 20-TR clips of 96^3 float16 ({CLIP_MB:.1f} MB), batch {batch}, "
                        f"{os.cpu_count()} CPU cores")
    for col in ("layout", "reader", "workers", "page cache", "clips/s", "MB/s", "x SwiFT\nper-frame",
                "x brainfm\nper-frame"):
        table.add_column(col, justify="left" if col in ("layout", "reader", "page cache") else "right")
    for r in rows:
        v = r["clips_per_s"]
        ratios = []
        for prefix in ("SwiFT", "brainfm"):
            base = rate("per-frame .pt", prefix, r["workers"], r["cache"])
            ratios.append(f"{v / base:.1f}" if v and base and r["layout"] == "volume store" else "")
        table.add_row(r["layout"], r["reader"], str(r["workers"]), r["cache"],
                      f"{v:,.1f}" if v else "n/a", f"{v * CLIP_MB:,.0f}" if v else "n/a", *ratios)
    Console(width=max(Console().width, 150)).print(table)
    v1, v2 = rate("volume store", "Volume", 0, "warm"), rate("volume store", "Volume", 2, "warm")
    vc, dd = rate("volume store", "Volume", 0, cold), rate("raw", "dd", 0, cold)
    checks = []
    for prefix in ("SwiFT", "brainfm"):
        f1, f2 = rate("per-frame .pt", prefix, 0, "warm"), rate("per-frame .pt", prefix, 2, "warm")
        checks += [(f"one process, warm: >= 10x {prefix} per-frame", v1 / f1 if v1 and f1 else None, 10.0),
                   (f"2 workers, warm: >= 5x {prefix} per-frame", v2 / f2 if v2 and f2 else None, 5.0)]
    checks.append(("cold, one process: >= 50 % of dd", vc / dd if vc and dd else None, 0.5))
    for name, value, target in checks:
        if value is None:
            print(f"{name}: not measured")
        else:
            print(f"{name}: {value:.2f} {'PASS' if value >= target else 'FAIL'}")
    return rows
