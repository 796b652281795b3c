"""Train/validation/test splits: by time within each run (the demo) or by subject (everything else).

Subject splits are seeded, written once to ``data_splits/<dataset>/`` in the SwiFT split-file
format and read back on every later run; they are never regenerated silently. The format (from
Transconnectome/SwiFT ``data_module.py``) is plain text::

    train_subjects
    <id>
    ...
    val_subjects
    <id>
    ...
    test_subjects
    <id>
    ...

Unlike SwiFT, the permutation is drawn from a generator seeded *before* drawing (SwiFT draws its
split before seeding, so its splits are not reproducible).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from brainfm.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
Segment = tuple[int, int, int]  # (run row in the store, first TR, stop TR (exclusive))


def time_split(lengths: Sequence[int], train_fraction: float = 0.5) -> dict[str, list[Segment]]:
    """Split every run in time: the first ``train_fraction`` of its TRs for training, the rest
    for validation. Used by the demo (pretrain on the first half, evaluate on the second).

    Raises:
        ConfigError: ``train_fraction`` outside (0, 1).
    """
    if not 0.0 < train_fraction < 1.0:
        raise ConfigError(f"data.split.train_fraction={train_fraction} must lie strictly between 0 and 1")
    out: dict[str, list[Segment]] = {"train": [], "val": [], "test": []}
    for run, n in enumerate(lengths):
        cut = int(round(n * train_fraction))
        out["train"].append((run, 0, cut))
        out["val"].append((run, cut, int(n)))
    return out


def draw_subject_split(subjects: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, list[str]]:
    """Seeded random partition of the unique subjects into train/val/test.

    Every split with a positive fraction receives at least one subject when there are enough.

    Raises:
        ConfigError: fractions that are not three non-negative numbers summing to 1.
    """
    fractions = [float(f) for f in fractions]
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ConfigError(f"data.split.fractions={fractions} must be three non-negative numbers summing to 1")
    unique = sorted(set(subjects))
    rng = np.random.default_rng(seed)
    order = [unique[i] for i in rng.permutation(len(unique))]
    n = len(order)
    counts = [int(np.floor(f * n)) for f in fractions]
    for i in np.argsort([-(f * n - c) for f, c in zip(fractions, counts)]):  # largest remainders
        if sum(counts) < n:
            counts[i] += 1
    for i, f in enumerate(fractions):  # a requested split is never empty
        if f > 0 and counts[i] == 0 and n >= sum(1 for g in fractions if g > 0):
            donor = int(np.argmax(counts))
            counts[donor] -= 1
            counts[i] += 1
    bounds = np.cumsum([0] + counts)
    return {name: sorted(order[bounds[i] : bounds[i + 1]]) for i, name in enumerate(SPLITS)}


def write_split_file(path: str | os.PathLike, split: dict[str, Sequence[str]]) -> Path:
    """Write a split in the SwiFT format, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for name in SPLITS:
        lines.append(f"{name}_subjects")
        lines.extend(str(s) for s in split.get(name, []))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def read_split_file(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a SwiFT-format split file.

    Raises:
        DataError: missing file, missing headers, or a subject listed in two splits.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file {path} does not exist")
    out: dict[str, list[str]] = {}
    current = None
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        header = line[: -len("_subjects")] if line.endswith("_subjects") else None
        if header in SPLITS:
            current = header
            out[current] = []
        elif current is None:
            raise DataError(f"{path}:{lineno}: subject id {line!r} before a 'train_subjects' header")
        else:
            out[current].append(line)
    missing = [s for s in SPLITS if s not in out]
    if missing:
        raise DataError(f"{path}: missing header(s) {[m + '_subjects' for m in missing]}")
    check_disjoint(out, source=str(path))
    return out


def check_disjoint(split: dict[str, Sequence[str]], source: str = "split") -> None:
    """Raise DataError if a subject appears in two splits (or twice in one)."""
    seen: dict[str, str] = {}
    for name in SPLITS:
        for s in split.get(name, []):
            if s in seen:
                where = f"both '{seen[s]}' and '{name}'" if seen[s] != name else f"'{name}' twice"
                raise DataError(
                    f"{source}: subject {s!r} is listed in {where}; a subject must be in exactly "
                    "one split (otherwise the evaluation leaks training subjects). Fix the file."
                )
            seen[s] = name


def load_or_create_subject_split(
    split_file: str | os.PathLike,
    subjects: Sequence[str],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> dict[str, list[str]]:
    """Read the split file if it exists, else draw a seeded split and write it.

    Raises:
        DataError: the existing file does not cover the data's subjects (new subjects would
            otherwise be dropped silently), or a subject is in two splits.
    """
    split_file = Path(split_file)
    present = set(subjects)
    if split_file.is_file():
        split = read_split_file(split_file)
        listed = {s for name in SPLITS for s in split[name]}
        uncovered = sorted(present - listed)
        if uncovered:
            raise DataError(
                f"{split_file} does not list {len(uncovered)} subject(s) of the data "
                f"(e.g. {uncovered[:5]}). brainfm never regenerates a split silently. Fix: add "
                "them to one split by hand, or delete the file to draw a new split (which changes "
                "which subjects are held out)."
            )
        # subjects listed but absent from the data (e.g. excluded as bad) are simply not used
        return {name: [s for s in split[name] if s in present] for name in SPLITS}
    split = draw_subject_split(sorted(present), fractions, seed)
    write_split_file(split_file, split)
    return split


def segments_for_subjects(
    subject_ids: Sequence[str], lengths: Sequence[int], subjects: Sequence[str]
) -> list[Segment]:
    """All whole runs whose subject is in ``subjects``."""
    keep = set(subjects)
    return [(run, 0, int(n)) for run, (s, n) in enumerate(zip(subject_ids, lengths)) if s in keep]
