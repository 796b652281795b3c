"""Subject re-identification at scale: blockwise vs dense Rank-1/mAP, time and peak memory.

Synthetic embeddings (``make bench-eval``): ``n_windows`` windows of D = 288 features,
``windows_per_subject`` (10) windows per subject around a subject centre (centre ~ N(0, I), window =
centre + ``noise`` x N(0, I), float32); the first half of each subject's windows is the gallery, the
second half the queries (so 300,000 windows are 150,000 queries against 150,000 gallery items, five
relevant per query). Cosine similarity. The blockwise time depends on how many relevant items fall
outside the 128 best-scoring items of their row (those are counted over the whole row, see
:func:`brainfm.eval.reidentification.reidentification`); with ``noise`` 1.5, Rank-1 is ~0.99 and mAP
~0.90 at 300,000 windows; a larger ``noise`` is slower.

Each case runs in a fresh interpreter; its peak memory is the child's ``ru_maxrss`` (the whole
process: interpreter, numpy/torch, the embeddings, the computation), with the resident memory just
before the call beside it. Time is the wall time of the call alone. The dense reference
(:func:`brainfm.eval.reidentification.reidentification_dense`: float64 matrix, stable argsort,
cumulative sums) runs only where it fits; elsewhere its memory is predicted, at least
``16 x n_queries x n_gallery`` bytes (the float64 similarity matrix and the int64 argsort), and at the
bytes per pair it took where it was measured.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import subprocess
import sys
import time

import numpy as np

from brainfm.eval.reidentification import auto_block_size, reidentification, reidentification_dense

TARGET_BYTES = 2 * 10**9  # blockwise peak memory target (2 GB)
DENSE_BYTES_PER_PAIR = 41  # dense peak: float64 sim, int64 order, bool, int64 cumsum, two float64 temporaries


def embeddings(n_windows: int, windows_per_subject: int = 10, dim: int = 288, noise: float = 1.5,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic ``(gallery, gallery_ids, queries, query_ids)``: float32 ``(n_windows / 2, dim)``
    halves, int64 subject ids; the first half of each subject's windows is the gallery.

    Raises:
        ValueError: ``n_windows`` is not a multiple of ``windows_per_subject``, or that is odd.
    """
    if n_windows % windows_per_subject or windows_per_subject % 2:
        raise ValueError(f"n_windows={n_windows} must be a multiple of windows_per_subject={windows_per_subject}, "
                         "which must be even (half gallery, half queries)")
    rng = np.random.default_rng(seed)
    n_subjects, half = n_windows // windows_per_subject, windows_per_subject // 2
    centres = rng.standard_normal((n_subjects, 1, dim), dtype=np.float32)
    out = []
    for _ in range(2):  # gallery, then queries; built in place (no (n_windows, dim) temporary)
        x = rng.standard_normal((n_subjects, half, dim), dtype=np.float32)
        x *= noise
        x += centres
        out.append(x.reshape(-1, dim))
    ids = np.repeat(np.arange(n_subjects), half)
    return out[0], ids, out[1], ids.copy()


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(spec: str) -> None:
    """In a fresh interpreter: one case; prints its measurements as JSON on the last line."""
    args = json.loads(spec)
    g, gid, q, qid = embeddings(args["n_windows"], args["windows_per_subject"], args["dim"], args["noise"],
                                args["seed"])
    before = _rss_bytes()
    t0 = time.perf_counter()
    if args["method"] == "dense":
        r = reidentification_dense(g, gid, q, qid)
    else:
        r = reidentification(g, gid, q, qid, block_size=args["block_size"], device=args["device"])
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({**args, **r, "seconds": seconds, "rss_before": before, "peak_rss": peak}))


def run_case(method: str, n_windows: int, **kwargs) -> dict:
    """Run one case in a subprocess; returns its measurements.

    Raises:
        RuntimeError: the subprocess failed (its stderr is included).
    """
    spec = json.dumps({"method": method, "n_windows": n_windows, **kwargs})
    code = f"from brainfm.bench.eval import _child; _child({spec!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} at {n_windows} windows failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def main(sizes=(100_000, 300_000), dense_sizes=(10_000, 30_000), windows_per_subject: int = 10, dim: int = 288,
         noise: float = 1.5, block_size: int | None = None, device: str = "cpu", seed: int = 0) -> int:
    """Run every case, print the Markdown table; returns 0, or 1 when blockwise misses the 2 GB target."""
    import torch

    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"device {device}, {_gb(_available_bytes())} GB available")
    print(f"data: synthetic, D = {dim}, {windows_per_subject} windows per subject (half gallery, half queries), "
          f"noise {noise}, cosine", flush=True)
    common = {"windows_per_subject": windows_per_subject, "dim": dim, "noise": noise, "seed": seed,
              "block_size": block_size, "device": device}
    all_sizes = sorted(set(sizes) | set(dense_sizes))
    rows, measured_dense = [], []
    for n in sorted(dense_sizes):
        pairs = (n // 2) ** 2
        if DENSE_BYTES_PER_PAIR * pairs > 0.7 * _available_bytes():
            rows.append({"method": "dense", "n_windows": n, "skipped": "not run: does not fit in the memory available now"})
            continue
        rows.append(run_case("dense", n, **common))
        measured_dense.append(rows[-1])
        print(f"  dense      {n:>8,} windows: {rows[-1]['seconds']:.1f} s", flush=True)
    for n in all_sizes:
        rows.append(run_case("blockwise", n, **common))
        print(f"  blockwise  {n:>8,} windows: {rows[-1]['seconds']:.1f} s", flush=True)
    for n in sorted(set(sizes) - set(dense_sizes)):
        rows.append({"method": "dense", "n_windows": n, "skipped": "not run"})

    per_pair = max(((r["peak_rss"] - r["rss_before"]) / (r["n_queries"] * r["n_gallery"]) for r in measured_dense),
                   default=None)
    sec_per_pair = max((r["seconds"] / (r["n_queries"] * r["n_gallery"]) for r in measured_dense), default=None)
    lines = ["", "| method | windows | queries x gallery | block | time (s) | peak RSS (GB) | RSS before call (GB) "
             "| Rank-1 | mAP | note |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    rows.sort(key=lambda r: (r["n_windows"], r["method"] != "dense"))
    for r in rows:
        n_q = n_g = r["n_windows"] // 2
        if "skipped" in r:
            note = f"{r['skipped']}; predicted ≥ {_gb(16 * n_q * n_g)} GB (16·N·M: float64 matrix + int64 argsort)"
            if per_pair is not None:
                note += f", ~{_gb(per_pair * n_q * n_g)} GB at the {per_pair:.0f} B/pair measured"
            if sec_per_pair is not None:
                note += f"; ≥ ~{sec_per_pair * n_q * n_g:.0f} s at the time per pair measured"
            lines.append(f"| dense | {r['n_windows']:,} | {n_q:,} x {n_g:,} | - | - | - | - | - | - | {note} |")
            continue
        block = "-" if r["method"] == "dense" else f"{min(r['block_size'] or auto_block_size(n_g), n_q):,}"
        note = ""
        if r["method"] == "blockwise":
            note = "under 2 GB" if r["peak_rss"] < TARGET_BYTES else "**over the 2 GB target**"
        lines.append(f"| {r['method']} | {r['n_windows']:,} | {r['n_queries']:,} x {r['n_gallery']:,} | {block} "
                     f"| {r['seconds']:.1f} | {_gb(r['peak_rss'])} | {_gb(r['rss_before'])} | {r['rank1']:.4f} "
                     f"| {r['mAP']:.6f} | {note} |")
    print("\n".join(lines))
    for d in measured_dense:
        b = next(r for r in rows if r["method"] == "blockwise" and r["n_windows"] == d["n_windows"])
        same = "equal" if b["rank1"] == d["rank1"] else f"differ ({b['rank1']} vs {d['rank1']})"
        print(f"\n{d['n_windows']:,} windows: blockwise vs dense Rank-1 {same}, |ΔmAP| = {abs(b['mAP'] - d['mAP']):.1e}")
    over = [r for r in rows if r["method"] == "blockwise" and r["peak_rss"] >= TARGET_BYTES]
    print(f"\nblockwise peak RSS under 2 GB at every size: {'no' if over else 'yes'}")
    return 1 if over else 0
