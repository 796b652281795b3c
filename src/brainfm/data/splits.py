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

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from brainfm.data.stores.index import temp_name
from brainfm.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
Segment = tuple[int, int, int]  # (run row in the store, first TR, stop TR (exclusive))


def time_split(lengths: Sequence[int], train_fraction: float = 0.5,
               val_fraction: float | None = None) -> dict[str, list[Segment]]:
    """Split every run in time: the first ``train_fraction`` of its TRs for training, the next
    ``val_fraction`` for validation (None: all the rest) and what follows for testing. Used by the demo
    (pretrain on the first half, evaluate on the second); ``train_fraction=0.4 val_fraction=0.1`` keeps
    the validation (early stopping, best checkpoints) inside a first half whose second is the test.

    Raises:
        ConfigError: ``train_fraction`` outside (0, 1), or a ``val_fraction`` that is not positive or runs
            past the end of the run.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ConfigError(f"data.split.train_fraction={train_fraction} must lie strictly between 0 and 1")
    if val_fraction is not None and not (0.0 < val_fraction and train_fraction + val_fraction <= 1.0 + 1e-9):
        raise ConfigError(f"data.split.val_fraction={val_fraction} must be positive and at most 1 - "
                          f"data.split.train_fraction ({1 - train_fraction:g}); null: the rest of each run")
    out: dict[str, list[Segment]] = {"train": [], "val": [], "test": []}
    for run, n in enumerate(lengths):
        cut = int(round(n * train_fraction))
        stop = int(n) if val_fraction is None else min(int(n), int(round(n * (train_fraction + val_fraction))))
        out["train"].append((run, 0, cut))
        out["val"].append((run, cut, stop))
        if stop < n:
            out["test"].append((run, stop, int(n)))
    return out


def draw_subject_split(subjects: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, list[str]]:
    """Seeded random partition of the unique subjects into train/val/test (an unstratified
    :func:`stratified_subject_split`). Every split with a positive fraction receives at least one
    subject when there are enough.

    Raises:
        ConfigError: fractions that are not three non-negative numbers summing to 1.
    """
    return stratified_subject_split(subjects, None, fractions, seed)


def _apportion(n: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder counts of ``n`` items over ``fractions``; a positive fraction gets >= 1 when possible."""
    counts = [int(np.floor(f * n)) for f in fractions]
    for i in np.argsort([-(f * n - c) for f, c in zip(fractions, counts)], kind="stable"):
        if sum(counts) < n:
            counts[i] += 1
    for i, f in enumerate(fractions):
        if f > 0 and counts[i] == 0 and n >= sum(1 for g in fractions if g > 0):
            donor = int(np.argmax(counts))
            counts[donor] -= 1
            counts[i] += 1
    return counts


def stratified_subject_split(subjects: Sequence[str], strata: Mapping[str, str] | None,
                             fractions: Sequence[float], seed: int) -> dict[str, list[str]]:
    """Seeded, subject-level train/val/test split that keeps every stratum's proportions.

    The split sizes are those of an unstratified draw (largest remainders; a requested split is
    never empty when there are enough subjects). Each stratum's share of every split is its
    proportional quota, rounded by largest remainders under those totals, so the class balance of
    the three splits matches the data's up to one subject per stratum. Subjects are drawn within
    each stratum from ``numpy.random.default_rng(seed)``.

    Written here rather than with scikit-learn's ``StratifiedShuffleSplit`` because that needs >= 2
    subjects per class and a test set at least as large as the number of classes (it fails on rare
    sites or small downstream sets) and splits two ways per call.

    Args:
        subjects: subject ids (unique). strata: subject -> stratum label (None: one stratum, an
            unstratified draw). fractions: train/val/test. seed: seed.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, each sorted.

    Raises:
        ConfigError: fractions that are not three non-negative numbers summing to 1; a subject
            without a stratum.
    """
    fractions = [float(f) for f in fractions]
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ConfigError(f"data.split.fractions={fractions} must be three non-negative numbers summing to 1")
    subjects = sorted(set(subjects))
    if not strata:
        strata = {s: "all" for s in subjects}
    absent = [s for s in subjects if s not in strata]
    if absent:
        raise ConfigError(f"subjects {absent[:5]} have no stratum")
    rng = np.random.default_rng(seed)
    groups: dict[str, list[str]] = {}
    for s in subjects:
        groups.setdefault(str(strata[s]), []).append(s)
    names = sorted(groups)
    for g in names:
        groups[g] = [groups[g][i] for i in rng.permutation(len(groups[g]))]
    totals = _apportion(len(subjects), fractions)
    quota = np.array([[fractions[k] * len(groups[g]) for k in range(3)] for g in names])
    cells = np.floor(quota).astype(int)
    need = np.array(totals) - cells.sum(axis=0)  # per split
    left = np.array([len(groups[g]) for g in names]) - cells.sum(axis=1)  # per stratum
    order = sorted(((quota[i, k] - cells[i, k], -i, -k) for i in range(len(names)) for k in range(3)), reverse=True)
    for _, mi, mk in order:
        i, k = -mi, -mk
        if need[k] > 0 and left[i] > 0:
            cells[i, k] += 1
            need[k] -= 1
            left[i] -= 1
    for i in range(len(names)):  # whatever the remainders could not place (totals and strata always agree)
        for k in range(3):
            take = min(left[i], need[k])
            cells[i, k] += take
            left[i] -= take
            need[k] -= take
    out = {name: [] for name in SPLITS}
    for i, g in enumerate(names):
        bounds = np.cumsum([0, *cells[i]])
        for k, name in enumerate(SPLITS):
            out[name].extend(groups[g][bounds[k]:bounds[k + 1]])
    return {name: sorted(v) for name, v in out.items()}


def write_split_file(path: str | os.PathLike, split: dict[str, Sequence[str]]) -> Path:
    """Write a split in the SwiFT format, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for name in SPLITS:
        lines.append(f"{name}_subjects")
        lines.extend(str(s) for s in split.get(name, []))
    tmp = temp_name(path)  # host, pid and a random part: ranks on two nodes never share a temporary name
    try:
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
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
    *,
    strata: Mapping[str, str] | Callable[[list[str]], Mapping[str, str] | None] | None = None,
    canonical: Callable[[str, str], str] | None = None,
    unlisted: str = "error",
    what: str = "",
) -> dict[str, list[str]]:
    """Read the split file if it exists, else draw a seeded (optionally stratified) split and write it.

    Args:
        split_file: the SwiFT-format file. subjects: the data's subject ids (repeats allowed).
        fractions, seed: of a new draw (:func:`stratified_subject_split`).
        strata: subject -> stratum of a new draw, or a function of the sorted subjects giving it (called
            only when drawing).
        canonical: ``(id in the file, where) -> subject id``, for files that write ids differently.
        unlisted: data subjects an existing file does not list: ``error`` (brainfm never regenerates a
            split silently) or ``drop`` (left out, as SwiFT).
        what: the data set's name, for messages.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` of subjects present in the data.

    Raises:
        DataError: the existing file does not cover the data's subjects (``unlisted=error``), or a
            subject is in two splits.
    """
    split_file = Path(split_file)
    present = sorted(set(subjects))
    if split_file.is_file():
        split = read_split_file(split_file)
        if canonical is not None:
            split = {k: [canonical(s, str(split_file)) for s in v] for k, v in split.items()}
            check_disjoint(split, source=str(split_file))
        listed = {s for name in SPLITS for s in split[name]}
        uncovered = sorted(set(present) - listed)
        if uncovered and unlisted == "error":
            raise DataError(
                f"{split_file} does not list {len(uncovered)} {what + ' ' if what else ''}subject(s) of the data "
                f"(e.g. {uncovered[:5]}). brainfm never regenerates a split silently. Fix: add them to one split "
                "by hand, delete the file to draw a new split (which changes which subjects are held out), or "
                "data.split.unlisted=drop to leave them out (SwiFT's behaviour)."
            )
        if uncovered:
            log.warning("%s: %d subject(s) not in %s are left out (data.split.unlisted=drop)", what or "data",
                        len(uncovered), split_file)
        keep = set(present)  # subjects listed but absent from the data (e.g. excluded as bad) are not used
        return {name: [s for s in split[name] if s in keep] for name in SPLITS}
    if callable(strata):
        strata = strata(present)
    split = stratified_subject_split(present, strata, fractions, seed)
    write_split_file(split_file, split)
    log.info("%s: wrote a new split to %s (%s)", what or "data", split_file,
             ", ".join(f"{k} {len(v)}" for k, v in split.items()))
    return split


def segments_for_subjects(
    subject_ids: Sequence[str], lengths: Sequence[int], subjects: Sequence[str]
) -> list[Segment]:
    """All whole runs whose subject is in ``subjects``."""
    keep = set(subjects)
    return [(run, 0, int(n)) for run, (s, n) in enumerate(zip(subject_ids, lengths)) if s in keep]
