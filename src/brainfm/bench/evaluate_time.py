"""Wall time of ``brainfm-evaluate`` on a trained run, two versions interleaved on the same machine, and
whether they give the same numbers.

``before`` and ``after`` are two ``brainfm-evaluate`` executables (e.g. ``.venv/bin/brainfm-evaluate`` of an
older checkout: ``git worktree add /tmp/before <commit> && make -C /tmp/before install``, and this one). For
each repeat and each setting (command-line overrides, e.g. the defaults and ``window_lengths=[30]``) the
two run one after the other, before then after, each in a fresh process with its own ``out_dir``, so that
the load of a shared machine falls on both alike; the table gives every wall time, the median, the
children's CPU time (user + system: less sensitive to other jobs than the wall time) and the load average
around the runs. Then the numbers: Rank-1 and mAP of every method and window length must be bit-identical
between the two versions (re-identification does not change with the probe), and the subject probe's
accuracies are listed where they differ.

Nothing is imported from brainfm: the two versions are whatever the executables run.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def _run(executable: str, ckpt: Path, overrides: list[str], out_dir: Path, timeout: float) -> dict:
    """One ``brainfm-evaluate`` run: wall and CPU seconds, its metrics.json, and its progress lines."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([executable, f"ckpt={ckpt}", f"out_dir={out_dir}", *overrides], capture_output=True,
                          text=True, timeout=timeout)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{executable} {' '.join(overrides)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = proc.stdout.splitlines()
    table = next((i for i, line in enumerate(lines) if line.startswith("Subject re-identification")), len(lines))
    return {"wall": wall, "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "metrics": json.loads((out_dir / "metrics.json").read_text()), "progress": lines[:table]}


def _differences(before: dict, after: dict) -> tuple[list[str], list[str]]:
    """(Rank-1 / mAP values that are not bit-identical, probe accuracies that differ), as lines."""
    reid, probe = [], []
    for method, lengths in before["results"].items():
        for length, r in lengths.items():
            a = after["results"].get(method, {}).get(length, {})
            reid += [f"{method} {length} TRs {k}: {r[k]!r} -> {a.get(k)!r}" for k in ("rank1", "mAP") if a.get(k) != r[k]]
    for method, lengths in before.get("probe", {}).items():
        for length, r in lengths.items():
            a = after.get("probe", {}).get(method, {}).get(length, {})
            probe += [f"{method} {length} TRs {k}: {r[k]:.4f} -> {a.get(k, float('nan')):.4f}"
                      for k in ("acc", "balanced_acc") if a.get(k) != r[k]]
    return reid, probe


def main(before: str, after: str, ckpt: str, settings: list[str], repeats: int = 2, timeout: float = 1800) -> int:
    """Run the benchmark and print its table; 1 if Rank-1 / mAP differ between the versions, else 0."""
    ckpt_path = Path(ckpt).resolve()
    versions = {"before": before, "after": after}
    times: dict[tuple[str, str], list[dict]] = {}
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        for rep in range(int(repeats)):
            for setting in settings:
                for name, executable in versions.items():
                    out = Path(tmp) / f"{name}-{rep}-{len(times)}"
                    r = _run(executable, ckpt_path, setting.split(), out, timeout)
                    times.setdefault((setting, name), []).append(r)
                    print(f"  {setting or 'defaults'} | {name} | run {rep + 1}: {r['wall']:.1f} s "
                          f"(load {os.getloadavg()[0]:.1f})", flush=True)
    load_end = os.getloadavg()

    print(f"\nbrainfm-evaluate ckpt={ckpt}, {repeats} interleaved runs per version (before, after, before, after);"
          f" load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end, {os.cpu_count()} CPUs")
    print(f"  before: {before}\n  after:  {after}\n")
    header = f"| {'settings':<22} | {'version':<7} | {'wall time per run (s)':<24} | {'median (s)':>10} | " \
             f"{'CPU (s)':>8} | {'after / before':>14} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    status = 0
    notes = []
    for setting in settings:
        medians = {n: statistics.median(r["wall"] for r in times[(setting, n)]) for n in versions}
        for name in versions:
            runs = times[(setting, name)]
            walls = ", ".join(f"{r['wall']:.1f}" for r in runs)
            cpu = statistics.median(r["cpu"] for r in runs)
            ratio = f"{medians['after'] / medians['before']:.2f}" if name == "after" else ""
            print(f"| {setting or 'defaults':<22} | {name:<7} | {walls:<24} | {medians[name]:>10.1f} | {cpu:>8.1f} | "
                  f"{ratio:>14} |")
        reid, probe = _differences(times[(setting, "before")][0]["metrics"], times[(setting, "after")][0]["metrics"])
        n_reid = sum(2 * len(v) for v in times[(setting, "before")][0]["metrics"]["results"].values())
        n_probe = sum(len(v) for v in times[(setting, "before")][0]["metrics"].get("probe", {}).values())
        notes.append(f"{setting or 'defaults'}: Rank-1 / mAP {'bit-identical' if not reid else 'DIFFER'} "
                     f"({n_reid} values); subject probe accuracy "
                     f"{'identical' if not probe else 'differs'} ({n_probe} probes)")
        notes += [f"    {line}" for line in reid + probe]
        status |= bool(reid)
    print("\n" + "\n".join(notes))
    progress = times[(settings[0], "after")][0]["progress"]
    print(f"\nprogress printed by 'after' ({settings[0] or 'defaults'}), before its tables:")
    print("\n".join(f"    {line}" for line in progress) or "    (none)")
    return int(status)
