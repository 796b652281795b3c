"""Windows/s of the ROI data path (store -> z-scoring -> windows -> batches)."""

from __future__ import annotations

import time
from pathlib import Path

from torch.utils.data import DataLoader

from brainfm.data.datamodules.roi import ROIDataModule
from brainfm.data.windows import WindowBatchSampler, collate_windows


def measure(path: Path, preload: bool, num_workers: int, batch_size: int = 64, length: int = 120,
            min_length: int | None = None, batches: int = 100) -> dict:
    dm = ROIDataModule(name="bench", path=str(path), preload=preload, window={"length": length, "min_length": min_length})
    dm.setup()
    ds = dm.dataset("train", stride=1)
    sampler = WindowBatchSampler(len(ds), batch_size, length, min_length, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_windows,
                        persistent_workers=False)
    it = iter(loader)
    next(it)  # worker start-up and first batch are not counted
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        n += batch["bold"].shape[0]
    dt = time.perf_counter() - t0
    return {"preload": preload, "workers": num_workers, "batch": batch_size, "length": length,
            "windows_per_s": n / dt, "trs_per_s": n * length / dt if min_length is None else None}


def main(path: Path) -> list[dict]:
    from rich.console import Console
    from rich.table import Table

    rows = [measure(path, preload, workers) for preload in (True, False) for workers in (0, 2)]
    table = Table(title=f"ROI loader: {path.name}, windows of 120 TRs, batch 64 (z-scored, collated)")
    for col in ("store", "DataLoader workers", "windows/s", "TRs/s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row("in memory" if r["preload"] else "lazy HDF5", str(r["workers"]),
                      f"{r['windows_per_s']:,.0f}", f"{r['trs_per_s']:,.0f}")
    Console().print(table)
    return rows
