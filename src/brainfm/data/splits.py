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

Split files are keyed by the data they split (:func:`resolve_subject_split`): without ``data.split.file``
a data set's split lives in ``<split_dir>/<stem>_<n>subjects_<fingerprint>.txt`` (``stem`` is
``seed<N>``, or ``<variant>_seed<N>[_<keys>]`` for the data set recipes; the fingerprint is the first 8
hex digits of the SHA-1 of the sorted subject ids), so two stores used under one recipe never read
each other's split, and the same subjects on another machine find the same, versioned file. A file of
an earlier brainfm without the key (``<stem>.txt``) is still read when it lists every subject of the
data, and so is any split file of the same stem that lists them all (the same data set with subjects left
out since). A new split is written only once the datamodule has been built and checked
(:meth:`SubjectSplit.write`, atomically), and a split without a training or a validation subject is
refused (:func:`check_split_sizes`).

Family splits (``data.split.groups=family``): relatives (HCP's twins and siblings, ABCD's ``rel_family_id``) stay
in one split (:func:`family_subject_split`). Their files are keyed apart (``<stem>_family_<n>subjects_<fingerprint>
.txt``), keep SwiFT's three sections, and are written with a record of the families beside them
(:func:`families_path`, ``<split file stem>.families.tsv``); a split file read for a family split that puts
relatives on different sides is refused (:func:`check_family_split`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainfm.errors import ConfigError, DataError
from brainfm.io import atomic_write_text

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


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    """``fractions`` as three floats; ConfigError unless they are non-negative and sum to 1."""
    fractions = [float(f) for f in fractions]
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ConfigError(f"data.split.fractions={fractions} must be three non-negative numbers summing to 1")
    return fractions


def _strata_of(subjects: Sequence[str], strata: Mapping[str, str] | None) -> Mapping[str, str]:
    """``strata`` (None: one stratum); ConfigError naming subjects without one."""
    if not strata:
        return {s: "all" for s in subjects}
    absent = [s for s in subjects if s not in strata]
    if absent:
        raise ConfigError(f"subjects {absent[:5]} have no stratum")
    return strata


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
    fractions = _check_fractions(fractions)
    subjects = sorted(set(subjects))
    strata = _strata_of(subjects, strata)
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


# -- family-aware splits ----------------------------------------------------------------------------------
#: what ``data.split.groups=family`` adds to a split file's stem: a family split never reads a by-subject split file
#: of the same data (nor the reverse), so turning the grouping on draws a new split instead of reusing one
FAMILY_STEM = "family"


@dataclass(frozen=True)
class Families:
    """The family of every subject (twins, siblings and half-siblings share one id), for family-aware splits.

    Attributes:
        of: ``{subject id: family id}``. source: where the ids come from (``"<table file>:<column>"``), for messages.
    """

    of: Mapping[str, str]
    source: str = "the family table"

    def members(self, subjects: Sequence[str]) -> dict[str, list[str]]:
        """``{family id: its subjects among subjects, sorted}``, families sorted.

        Raises:
            DataError: a subject without a family id.
        """
        absent = sorted({str(s) for s in subjects if str(s) not in self.of})
        if absent:
            raise DataError(f"{len(absent)} subject(s) have no family id in {self.source} (e.g. {absent[:5]})")
        out: dict[str, list[str]] = {}
        for s in sorted({str(s) for s in subjects}):
            out.setdefault(str(self.of[s]), []).append(s)
        return dict(sorted(out.items()))


def family_subject_split(subjects: Sequence[str], families: Families, strata: Mapping[str, str] | None,
                         fractions: Sequence[float], seed: int) -> dict[str, list[str]]:
    """Seeded train/val/test split that keeps every family in one split (HCP's twins and siblings, ABCD's
    ``rel_family_id``), stratified like :func:`stratified_subject_split`.

    Relatives share genes and environment: with twins or siblings on both sides of a split, the test subjects are
    not strangers to the model and a heritable trait's result can be inflated (non-independence between training
    and test data: Rosenblatt et al., "Data leakage inflates prediction performance in connectome-based machine
    learning models", Nature Communications 2024). HCP prediction studies keep family members in one fold for this
    reason (e.g. Greene et al., "Brain-phenotype models fail for individuals who defy sample stereotypes", Nature
    2022).

    The draw works on families: they are shuffled with ``numpy.random.default_rng(seed)`` and placed one at a time,
    largest first (same-size families in the shuffled order), each into the split where it lowers most a
    chi-square-like error of the split sizes and of every stratum's count in every split against their targets
    (``fraction x n``), relative to the split's target size; moves of a family to another split and swaps of two
    same-size families between splits that lower the error are then made until none does. The split sizes come out
    as close to ``fractions`` as whole families allow (exact when enough small families remain to fill the last
    places), each stratum's share of every split close to its share of the data, and a split with a positive
    fraction is never empty when there are families enough.

    Written here because scikit-learn has no fitting splitter: ``GroupShuffleSplit`` sizes its splits in *groups*,
    not subjects, splits two ways and does not stratify; ``StratifiedGroupKFold`` makes K equal folds, not 70/15/15.

    Args:
        subjects: subject ids. families: their families (every subject must have one). strata: subject -> stratum
            label (None: unstratified). fractions: train/val/test. seed: seed.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, each sorted; every family in exactly one.

    Raises:
        ConfigError: fractions that are not three non-negative numbers summing to 1; a subject without a stratum.
        DataError: a subject without a family id.
    """
    fractions = np.asarray(_check_fractions(fractions))
    subjects = sorted({str(s) for s in subjects})
    strata = _strata_of(subjects, strata)
    members = families.members(subjects)
    names = list(members)
    labels = {label: i for i, label in enumerate(sorted({str(strata[s]) for s in subjects}))}
    counts = np.zeros((len(names), len(labels)))  # families x strata
    for f, name in enumerate(names):
        for s in members[name]:
            counts[f, labels[str(strata[s])]] += 1
    sizes = counts.sum(axis=1)
    active = fractions > 0
    target_cells = counts.sum(axis=0)[:, None] * fractions[None, :]  # strata x splits
    target_sizes = len(subjects) * fractions
    scale = np.where(active, target_sizes, 1.0)  # errors relative to the split's size: a small split counts as much
    weight = float(len(labels))  # the split sizes weigh as much as all strata cells together
    cells = np.zeros_like(target_cells)
    totals = np.zeros(3)

    def gain(c: np.ndarray, m: float, sign: float) -> np.ndarray:
        """Change of the error, per split, when a family (stratum counts c, size m) is added (+1) or removed (-1)."""
        cells_change = c @ c + 2 * sign * (c @ (cells - target_cells))
        return (cells_change + weight * (m * m + 2 * sign * m * (totals - target_sizes))) / scale

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(names))
    order = order[np.argsort(-sizes[order], kind="stable")]
    where = np.full(len(names), -1)
    for f in order:
        add = np.where(active, gain(counts[f], sizes[f], 1.0), np.inf)
        k = int(np.argmin(add))
        where[f], cells[:, k], totals[k] = k, cells[:, k] + counts[f], totals[k] + sizes[f]

    def move(f: int, b: int) -> None:
        a = where[f]
        cells[:, a] -= counts[f]
        totals[a] -= sizes[f]
        cells[:, b] += counts[f]
        totals[b] += sizes[f]
        where[f] = b

    def best_move() -> bool:
        """One pass of single moves that lower the error."""
        moved = False
        for f in order:
            a = where[f]
            delta = gain(counts[f], sizes[f], 1.0) + gain(counts[f], sizes[f], -1.0)[a]
            delta[a] = 0.0
            delta[~active] = np.inf
            b = int(np.argmin(delta))
            if delta[b] < -1e-9:
                move(f, b)
                moved = True
        return moved

    def best_swap() -> bool:
        """The swap of two same-size families of different strata between two splits that lowers the error most
        (sizes unchanged; families of one composition are interchangeable, so compositions are compared)."""
        best = (-1e-9, None)
        for a, b in ((0, 1), (0, 2), (1, 2)):
            ta = np.unique(counts[where == a], axis=0)
            tb = np.unique(counts[where == b], axis=0)
            if not len(ta) or not len(tb):
                continue
            d = tb[None, :, :] - ta[:, None, :]  # composition change of split a when a's type u and b's type v swap
            same = ta.sum(axis=1)[:, None] == tb.sum(axis=1)[None, :]
            delta = ((d * d).sum(-1) + 2 * d @ (cells[:, a] - target_cells[:, a])) / scale[a] + \
                    ((d * d).sum(-1) - 2 * d @ (cells[:, b] - target_cells[:, b])) / scale[b]
            delta = np.where(same, delta, np.inf)
            u, v = np.unravel_index(int(np.argmin(delta)), delta.shape)
            if delta[u, v] < best[0]:
                best = (float(delta[u, v]), (a, ta[u], b, tb[v]))
        if best[1] is None:
            return False
        a, tu, b, tv = best[1]
        fu = next(f for f in order if where[f] == a and np.array_equal(counts[f], tu))
        fv = next(f for f in order if where[f] == b and np.array_equal(counts[f], tv))
        move(fu, b)
        move(fv, a)
        return True

    for _ in range(10 * len(names) + 10):  # moves and swaps that lower the error, until none does (each lowers it)
        if not (best_move() | best_swap()):
            break
    rank = np.empty(len(names), dtype=int)
    rank[order] = np.arange(len(names))
    for k in np.flatnonzero(active):  # a requested split left empty (a few large families): the smallest family of
        held = [np.flatnonzero(where == j) for j in range(3)]  # the split holding most families moves there
        donor = max(range(3), key=lambda j: len(held[j]))
        if len(held[k]) == 0 and len(held[donor]) >= 2:
            move(min(held[donor], key=lambda i: (sizes[i], rank[i])), int(k))
    out = {name: [] for name in SPLITS}
    for f, name in enumerate(names):
        out[SPLITS[where[f]]].extend(members[name])
    return {name: sorted(v) for name, v in out.items()}


def check_split_groups(split: Mapping) -> bool:
    """Whether ``data.split`` asks for a family split (``groups: family``).

    ``family_column`` without ``groups: family`` is unused (a split by subject): logged as a warning, so that a user who
    set only the column learns that the split is still by subject.

    Raises:
        ConfigError: ``groups`` other than null or ``family``; ``family`` with a split that is not by subject (a split
            in time puts every subject on both sides; a given or file-pattern split is not drawn here).
    """
    groups = split.get("groups")
    if groups not in (None, FAMILY_STEM):
        raise ConfigError(f"data.split.groups={groups!r} must be null (a split by subject) or family (every family in "
                          "one split: twins and siblings never on two sides)")
    if groups and split.get("kind") != "subject":
        raise ConfigError(f"data.split.groups=family keeps families together in a split by subject, and "
                          f"data.split.kind={split.get('kind')!r}. Fix: data.split.kind=subject, or "
                          "data.split.groups=null")
    if not groups and split.get("family_column"):
        log.warning("data.split.family_column=%s is used only with data.split.groups=family; this split is by subject",
                    split["family_column"])
    return groups == FAMILY_STEM


def families_crossing(split: Mapping[str, Sequence[str]], families: Families) -> dict[str, dict[str, str]]:
    """The families with members in more than one split: ``{family id: {subject: split}}`` (subjects without a
    family id are not counted)."""
    sides: dict[str, dict[str, str]] = {}
    for name in SPLITS:
        for s in split.get(name, []):
            if s in families.of:
                sides.setdefault(str(families.of[s]), {})[s] = name
    return {f: dict(sorted(m.items())) for f, m in sorted(sides.items()) if len(set(m.values())) > 1}


def families_path(split_file: str | os.PathLike) -> Path:
    """``<split file stem>.families.tsv`` beside the split file: the families a family split was drawn with.

    The record is a sidecar file, not lines in the split file: SwiFT (Transconnectome/SwiFT ``data_module.py``,
    ``load_split``) finds its sections as the first line *containing* ``train``, ``val`` and ``test`` and reads every
    line after the ``test`` header as a test subject, so any line added to the file would become a test subject or
    move a section. SwiFT never opens the sidecar, and brainfm's split-file search (``<stem>*.txt``) skips it.
    """
    path = Path(split_file)
    return path.with_name(f"{path.stem}.families.tsv")


def write_families_file(split_file: str | os.PathLike, split: Mapping[str, Sequence[str]], families: Families) -> Path:
    """Write :func:`families_path` of ``split_file`` atomically: a TSV with a header ``subject family split`` and one
    row per subject of ``split`` (split order, then subject), for audits and for the people who read the split."""
    rows = ["subject\tfamily\tsplit"]
    rows += [f"{s}\t{families.of.get(s, '')}\t{name}" for name in SPLITS for s in split.get(name, [])]
    return atomic_write_text(families_path(split_file), "\n".join(rows) + "\n")


def write_split_file(path: str | os.PathLike, split: dict[str, Sequence[str]]) -> Path:
    """Write a split in the SwiFT format, atomically (a temporary name, then renamed: a crash never
    leaves a half-written split)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for name in SPLITS:
        lines.append(f"{name}_subjects")
        lines.extend(str(s) for s in split.get(name, []))
    # host, pid and a random part in the temporary's name: ranks on two nodes never share one
    return atomic_write_text(path, "\n".join(lines) + "\n")


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


def subjects_fingerprint(subjects: Sequence[str]) -> str:
    """8 hex digits of the SHA-1 of the sorted unique subject ids (one per line): the key of a split file."""
    text = "\n".join(sorted({str(s) for s in subjects}))
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def keyed_split_path(split_dir: str | os.PathLike, stem: str, subjects: Sequence[str]) -> Path:
    """``<split_dir>/<stem>_<n>subjects_<fingerprint>.txt``: the split file of exactly these subjects."""
    n = len({str(s) for s in subjects})
    return Path(split_dir) / f"{stem}_{n}subjects_{subjects_fingerprint(subjects)}.txt"


@dataclass
class SubjectSplit:
    """A subject split and its file.

    Attributes:
        split: ``{"train": [...], "val": [...], "test": [...]}`` of subjects present in the data.
        path: its split file. new: drawn now and not yet written (:meth:`write` writes it).
        legacy: read from a split file of an earlier brainfm without the subject key (``<stem>.txt``).
        families: the families a family split keeps together (``data.split.groups=family``), else None; a new family
            split is written with its :func:`families_path` record.
    """

    split: dict[str, list[str]]
    path: Path
    new: bool = False
    legacy: bool = False
    families: Families | None = None

    def counts(self) -> dict[str, int]:
        return {name: len(self.split.get(name, [])) for name in SPLITS}

    def write(self, what: str = "") -> Path:
        """Write a new split to :attr:`path` (atomically; a family split's :func:`families_path` record first, so a
        split file is never there without it); nothing for a split read from its file."""
        if self.new:
            if self.families is not None:
                write_families_file(self.path, self.split, self.families)
            write_split_file(self.path, self.split)
            self.new = False
            log.info("%s: wrote a new split to %s (%s)", what or "data", self.path,
                     ", ".join(f"{k} {v}" for k, v in self.counts().items()))
        return self.path


def _read_covering(split_file: Path, present: list[str], canonical, unlisted: str,
                   what: str) -> dict[str, list[str]]:
    """The split of ``present`` subjects in ``split_file`` (``unlisted`` as :func:`resolve_subject_split`)."""
    split = read_split_file(split_file)
    if canonical is not None:
        split = {k: [canonical(s, str(split_file)) for s in v] for k, v in split.items()}
        check_disjoint(split, source=str(split_file))
    listed = {s for name in SPLITS for s in split[name]}
    uncovered = sorted(set(present) - listed)
    if uncovered and unlisted == "error":
        raise DataError(
            f"{split_file} does not list {len(uncovered)} {what + ' ' if what else ''}subject(s) of the data "
            f"(e.g. {uncovered[:5]}). It lists {len(listed)} subject(s), {len(set(present) & listed)} of them in the "
            "data. brainfm never regenerates a split silently. Fix: add them to one split by hand, point "
            "data.split.file at another split file, or data.split.unlisted=drop to leave them out (SwiFT's "
            "behaviour)."
        )
    if uncovered:
        log.warning("%s: %d subject(s) not in %s are left out (data.split.unlisted=drop)", what or "data",
                    len(uncovered), split_file)
    keep = set(present)  # subjects listed but absent from the data (e.g. excluded as bad) are not used
    return {name: [s for s in split[name] if s in keep] for name in SPLITS}


def _listed(path: Path, canonical: Callable[[str, str], str] | None = None) -> set[str]:
    """The subjects ``path`` lists (canonical ids), or none when it cannot be read as a split of this data."""
    try:
        split = read_split_file(path)
        return {canonical(s, str(path)) if canonical else s for name in SPLITS for s in split[name]}
    except DataError:
        return set()


def resolve_subject_split(
    split_dir: str | os.PathLike,
    stem: str,
    subjects: Sequence[str],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    *,
    file: str | os.PathLike | None = None,
    strata: Mapping[str, str] | Callable[[list[str]], Mapping[str, str] | None] | None = None,
    canonical: Callable[[str, str], str] | None = None,
    unlisted: str = "error",
    what: str = "",
    families: Families | Callable[[list[str]], Families] | None = None,
) -> SubjectSplit:
    """The subject split of ``subjects``: read from its file, or drawn (and not yet written).

    With ``families`` (``data.split.groups=family``) the split keeps every family on one side: the stem becomes
    ``<stem>_family`` (a by-subject split file is never reused for a family split, nor the reverse), a new split is
    drawn by :func:`family_subject_split`, and a split read from a file (given, keyed or covering) is checked: a family
    with members on two sides is refused (:func:`check_family_split`).

    Which file (module docstring):

    1. ``file`` given (``data.split.file``): that file; read when it exists (``unlisted`` applies), else the
       draw is to be written there.
    2. Else the keyed file ``<split_dir>/<stem>_<n>subjects_<fingerprint>.txt`` of exactly these subjects,
       when it exists.
    3. Else another split file of ``<stem>`` in ``split_dir`` that lists every subject of the data (an earlier
       brainfm's unkeyed ``<stem>.txt``, or the keyed file of this data set before subjects were left out:
       bad subjects, missing labels), the one listing the fewest; subjects it lists that the data lack are
       not used.
    4. Else a seeded draw (:func:`stratified_subject_split`) for the keyed file. When another split file of
       ``<stem>`` shares subjects with the data (another store with the same ids, or this data set before
       subjects were added), a warning names it: a new split may put subjects that trained a model into
       the test split of the new one.

    The draw is returned with ``new=True``; :meth:`SubjectSplit.write` writes it once the datamodule has
    been built and checked (a run that fails before leaves no split behind).

    Args:
        split_dir: folder of the data set's split files. stem: file name stem (``seed0``).
        subjects: the data's subject ids (repeats allowed). fractions, seed: of a new draw.
        file: an explicit split file (``data.split.file``).
        strata: subject -> stratum of a new draw, or a function of the sorted subjects giving it (called
            only when drawing).
        canonical: ``(id in the file, where) -> subject id``, for files that write ids differently.
        unlisted: data subjects an existing file does not list: ``error`` (brainfm never regenerates a
            split silently) or ``drop`` (left out, as SwiFT).
        what: the data set's name, for messages.
        families: the subjects' families (:class:`Families`), or a function of the sorted subjects giving them;
            None: a split by subject.

    Raises:
        DataError: an existing file that does not cover the data's subjects (``unlisted=error``), or a subject
            in two splits; a subject without a family id. ConfigError: invalid fractions or ``unlisted``; a split file
            that puts relatives on different sides (with ``families``).
    """
    if unlisted not in ("error", "drop"):
        raise ConfigError(f"data.split.unlisted={unlisted!r} must be 'error' or 'drop'")
    present = sorted({str(s) for s in subjects})
    if callable(families):
        families = families(present)
    if families is not None:
        stem = f"{stem}_{FAMILY_STEM}"

    def read(split_file: Path, policy: str, given: bool = False, legacy: bool = False) -> SubjectSplit:
        split = _read_covering(split_file, present, canonical, policy, what)
        if families is not None:
            check_family_split(split, families, split_file, given=given,
                               keyed=keyed_split_path(split_dir, stem, present), what=what)
        return SubjectSplit(split, split_file, legacy=legacy, families=families)

    if file:
        path = Path(file)
        if path.is_file():
            return read(path, unlisted, given=True)
    else:
        path = keyed_split_path(split_dir, stem, present)
        if path.is_file():
            return read(path, unlisted)
        # the other split files of this stem: an earlier brainfm's <stem>.txt and the keyed files of other subjects
        pattern = re.compile(rf"{re.escape(stem)}(_\d+subjects_[0-9a-f]{{8}})?\.txt")
        others = sorted(p for p in Path(split_dir).glob(f"{stem}*.txt") if pattern.fullmatch(p.name))
        listed = {p: _listed(p, canonical) for p in others}
        covering = sorted((p for p in others if listed[p] and set(present) <= listed[p]),
                          key=lambda p: (len(listed[p]), p.name))
        if covering:  # this data set with subjects left out since (bad subjects, missing labels): its split stays
            old = covering[0]
            log.info("%s: reading the split file %s, which lists every subject of the data (%d of its %d)",
                     what or "data", old, len(present), len(listed[old]))
            return read(old, "error", legacy=pattern.fullmatch(old.name).group(1) is None)
    if callable(strata):
        strata = strata(present)
    if families is not None:
        split = family_subject_split(present, families, strata, fractions, seed)
    else:
        split = stratified_subject_split(present, strata, fractions, seed)
    if not file:
        for other in [p for p in others if set(present) & listed[p]][:3]:
            log.warning(
                "%s: %s lists %d of these %d subjects but not all of them; a new split of this data is drawn into "
                "%s. If both are the same data set (subjects added since), subjects that trained a model with the "
                "old split may now be in the new validation or test split: keep the old assignments with "
                "data.split.file=%s (and add the new subjects to it by hand, or data.split.unlisted=drop)",
                what or "data", other, len(set(present) & listed[other]), len(present), path.name, other)
    return SubjectSplit(split, path, new=True, families=families)


def check_family_split(split: Mapping[str, Sequence[str]], families: Families, path: str | os.PathLike,
                       given: bool = False, keyed: str | os.PathLike | None = None, what: str = "") -> None:
    """Refuse a split read from ``path`` that puts members of one family on different sides.

    Args:
        split: the split of the data's subjects. families: their families. path: the split file.
        given: ``path`` is ``data.split.file`` (the fix is a new file there, not deleting the user's file).
        keyed: where a new family split of these subjects is drawn without ``data.split.file``. what: the data set.

    Raises:
        ConfigError: naming every crossing family (up to 5) with its subjects and their sides, and fixes that work as
            typed: a new family split (delete the cached file, or ``data.split.file=<new file>``), or
            ``data.split.groups=null`` to use this split knowing that relatives cross it.
    """
    crossing = families_crossing(split, families)
    if not crossing:
        return
    path = Path(path)
    shown = "; ".join(f"family {f}: " + ", ".join(f"{s} ({side})" for s, side in members.items())
                      for f, members in list(crossing.items())[:5])
    new_file = path.with_name(f"{path.stem}_{FAMILY_STEM if given else 'redrawn'}.txt")
    if given:
        redo = f"draw a family split into a new file, data.split.file={new_file}"
        if keyed:
            redo += f" (or data.split.file=null: the keyed family split {keyed})"
    else:
        redo = (f"delete {path} and a family split is drawn into {keyed or path} on the next run (the family table may "
                f"have changed since this file was written), or draw one into a new file, data.split.file={new_file}")
    raise ConfigError(
        f"{what + ': ' if what else ''}the split file {path} puts relatives on different sides: {len(crossing)} "
        f"{'family' if len(crossing) == 1 else 'families'} of {families.source} "
        f"{'crosses' if len(crossing) == 1 else 'cross'} it ({shown}"
        f"{'; ...' if len(crossing) > 5 else ''}). With data.split.groups=family every family must be in one split "
        f"(otherwise a relative of a test subject trains the model). Fix: {redo}; or data.split.groups=null to use "
        "this split as it is, knowing that relatives cross it"
    )


def check_split_sizes(split: SubjectSplit, where: str, val_fraction: float = 0.1) -> None:
    """Refuse a subject split without a training or a validation subject (training needs both: the
    validation loss picks the checkpoints and stops early). A validation split left empty on purpose
    (``val_fraction`` 0: ``data.split.fractions=[1.0,0.0,0.0]``, e.g. with ``trainer.limit_val_batches=0``)
    is accepted with a warning.

    Args:
        split: the split (read, or a new draw). where: the data (store path and data set) for the message.
        val_fraction: the validation share the configuration asks for.

    Raises:
        DataError: an empty training split, or an empty validation split that was asked for, naming the
            data, the split file, the counts and the fix.
    """
    counts = split.counts()
    empty = [name for name in ("train", "val") if not counts[name]]
    if empty == ["val"] and not val_fraction > 0:
        log.warning("%s: no validation subject (data.split.fractions gives validation no share): no val/ metrics, "
                    "and checkpoints are not chosen by validation", where)
        return
    if not empty:
        return
    n = sum(counts.values())
    if n >= 3 and not split.new:
        fix = (f"{split.path} puts too few of these subjects in one split: edit it, or draw a split for this data "
               f"into a new file: data.split.file={split.path.parent}/<new name>.txt")
    elif n >= 3:
        fix = "give training and validation a positive share, e.g. data.split.fractions=[0.8,0.1,0.1]"
    elif n == 2:
        fix = ("data.split.fractions=[0.5,0.5,0.0] (one training and one validation subject), more subjects, or "
               "data.split.kind=time (every run split in time)")
    else:
        fix = ("more subjects in the store, or data.split.kind=time to split every run in time "
               "(data.split.train_fraction=0.8: the first 80% of each run trains, the rest validates)")
    source = f"a new draw for {split.path}, not written" if split.new else f"read from {split.path}"
    if split.families is not None:  # whole families: fewer units to place than subjects
        n_families = len(split.families.members([s for name in SPLITS for s in split.split.get(name, [])]))
        fix += (f". This split keeps whole families ({n_families} in these {n} subjects, data.split.groups=family); "
                "data.split.groups=null splits by subject")
    raise DataError(
        f"the subject split of {where} ({source}) has train {counts['train']}, val {counts['val']}, test "
        f"{counts['test']} subject(s): no {' and no '.join(empty)} subject. Training needs at least one "
        f"training and one validation subject. Fix: {fix}"
    )


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
    """Read ``split_file`` if it exists, else draw a seeded (optionally stratified) split and write it
    at once (:func:`resolve_subject_split` with an explicit ``file``; the datamodules use that and write
    only after their checks).

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` of subjects present in the data.

    Raises:
        DataError: the existing file does not cover the data's subjects (``unlisted=error``), or a
            subject is in two splits.
    """
    resolved = resolve_subject_split(Path(split_file).parent, Path(split_file).stem, subjects, fractions, seed,
                                     file=split_file, strata=strata, canonical=canonical, unlisted=unlisted,
                                     what=what)
    resolved.write(what)
    return resolved.split


def segments_for_subjects(
    subject_ids: Sequence[str], lengths: Sequence[int], subjects: Sequence[str]
) -> list[Segment]:
    """All whole runs whose subject is in ``subjects``."""
    keep = set(subjects)
    return [(run, 0, int(n)) for run, (s, n) in enumerate(zip(subject_ids, lengths)) if s in keep]
