"""Data set recipes: which files of a data set are subjects, which labels they carry and how they
are split (UK Biobank, ABCD, HCP, ABIDE, EMBARC, OASIS-3; ``conf/data/<dataset>.yaml``).

A recipe is a :class:`~brainfm.data.datamodules.volume.VolumeDataModule` plus the rules that tie a data set's
files to its subjects. The facts (TR, crop/pad, id patterns, phenotype columns) live in the recipe
configs; this module is the machinery:

- **Layouts.** ``layout=volumes`` reads a brainfm volume store (``brainfm-preprocess``: one memory-mapped
  fp16 array per run, already on the 96^3 grid); ``layout=frames`` reads SwiFT's per-TR layout
  ``<root>/img/<subject>/frame_<t>.pt`` as is and applies the recipe's crop/pad to 96^3 at load time,
  filling with the background value (voxel [0, 0, 0] of the clip's first frame), as SwiFT's ``datasets.py``
  pads each clip with ``y.flatten()[0]``.
- **Subject ids** (:class:`SubjectIds`). Every store subject / frame folder must match one of the
  recipe's regular expressions (UKB ``<eid>_20227_2_0``, ABCD ``sub-NDARINV<8>``, HCP six digits,
  ...); the named groups build the data set's own subject id (``canonical``: the UKB eid, the ABCD
  subject key, ...), which is what split files, phenotype tables, bad-subject lists, batches and
  checkpoints use. A folder that matches no pattern is an error naming it (a mistyped or foreign
  folder would otherwise become a subject), unless it matches ``ignore`` (e.g. UKB's repeat-imaging
  instance ``_20227_3_0``, which SwiFT skips by its suffix).
- **Phenotypes** (:func:`read_phenotype_tables`): one or more CSV/TSV tables per data set, each with its
  id column and a map *label key -> column* (``sex``, ``age``, ``intelligence``, ``asd``,
  ``depression``). ``data.targets`` chooses the labels batches carry; subjects without a value for a
  target are left out (SwiFT's ``dropna``), or refused with ``missing_labels=error``.
- **Bad subjects**: a text file with one subject id per line (SwiFT's ``--bad_subj_path`` format) and/or
  a list; they are removed before splitting.
- **Splits** (:func:`stratified_subject_split`): by subject, seeded, stratified by the target's classes
  (or quantile bins of a continuous target, or any phenotype keys such as ABIDE's site), written once
  to ``data_splits/<dataset>/<variant>_seed<seed>[_<keys>].txt`` in the SwiFT split-file format and read
  back on every later run. SwiFT's own split files (``split_fixed_<n>.txt``) are read as they are; a
  subject listed in two splits is an error naming the file and the subject.

SwiFT (Transconnectome/SwiFT ``data_module.py``) draws its splits with NumPy's global generator
(``np.random.choice``), silently drops data subjects that a split file does not list and stratifies
nothing; SwiFT v2's lab code stratifies ABIDE by site with scikit-learn's
``StratifiedShuffleSplit`` after dropping sites with one subject. Here every draw is seeded, every
subject of the data must be listed (``split.unlisted=drop`` reproduces SwiFT), and rare strata are kept.
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brainfm.data.datamodules.volume import VolumeDataModule
from brainfm.data.phenotypes import LabelTable
from brainfm.data.splits import (
    SPLITS,
    check_disjoint,
    draw_subject_split,
    read_split_file,
    write_split_file,
)
from brainfm.data.stores.view import RecipeStoreView
from brainfm.data.stores.volume import CropPad, VolumeStore
from brainfm.errors import ConfigError, DataError

log = logging.getLogger(__name__)

LAYOUTS = ("volumes", "frames")
_TABLE_KEYS = {"file", "id_column", "columns", "categories"}


def _show(patterns: Sequence[re.Pattern]) -> str:
    return "[" + ", ".join(rx.pattern for rx in patterns) + "]"


# -- subject ids ---------------------------------------------------------------------------------------
class SubjectIds:
    """The subject-id rules of a data set.

    Args:
        patterns: regular expressions (full match) of the subject ids in the data: the store's
            subject folders or the frame folders under ``img/`` (relative paths with ``/`` for nested
            layouts such as ABIDE's ``ABIDE1/50002``). Their named groups fill ``canonical``.
        id_patterns: regular expressions of the bare ids found in phenotype tables, split files and
            bad-subject lists (``patterns`` are tried as well).
        canonical: ``str.format`` template over the named groups: the data set's subject id.
        ignore: regular expressions of folder names that are skipped silently.
        duplicates: two folders with the same canonical id: ``error``, or ``last`` (the last in sorted
            order wins: ABIDE II's copy of a subject replaces its ABIDE I copy, as SwiFT v2 does).
        name: data set name (for messages).

    Raises:
        ConfigError: an invalid regular expression, a pattern without a group ``canonical`` needs, or an
            unknown ``duplicates`` policy.
    """

    def __init__(self, patterns: Sequence[str], id_patterns: Sequence[str] = (), canonical: str = "{id}",
                 ignore: Sequence[str] = (), duplicates: str = "error", name: str = "data") -> None:
        self.name = name
        if isinstance(patterns, str):
            patterns = [patterns]
        if isinstance(id_patterns, str):
            id_patterns = [id_patterns]
        if not patterns:
            raise ConfigError(f"data.subjects.patterns of {name} is empty: give at least one regular expression")
        fields = {f for _, f, _, _ in string.Formatter().parse(canonical) if f}
        self.canonical = canonical
        self.patterns = [self._compile(p, "patterns", fields) for p in patterns]
        self.id_patterns = [self._compile(p, "id_patterns", fields) for p in id_patterns]
        self.ignore = [self._compile(p, "ignore", set()) for p in (ignore or [])]
        if duplicates not in ("error", "last"):
            raise ConfigError(f"data.subjects.duplicates={duplicates!r} must be 'error' or 'last'")
        self.duplicates = duplicates

    def _compile(self, pattern: str, key: str, fields: set[str]) -> re.Pattern:
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"data.subjects.{key}: {pattern!r} is not a regular expression ({exc})") from exc
        missing = fields - set(rx.groupindex)
        if missing:
            raise ConfigError(f"data.subjects.{key}: {pattern!r} has no named group(s) {sorted(missing)} that "
                              f"data.subjects.canonical={self.canonical!r} needs")
        return rx

    def _format(self, m: re.Match) -> str:
        return self.canonical.format(**{k: v for k, v in m.groupdict().items() if v is not None})

    def ignored(self, value: str) -> bool:
        return any(rx.fullmatch(value) for rx in self.ignore)

    def from_folder(self, value: str, where: str) -> str:
        """Canonical id of a store subject / frame folder ``value`` (found at ``where``).

        Raises:
            DataError: ``value`` matches no pattern (the folder, the patterns and the fix are named).
        """
        for rx in self.patterns:
            m = rx.fullmatch(value)
            if m:
                return self._format(m)
        raise DataError(
            f"{where}: subject {value!r} matches none of the {self.name} subject-id patterns "
            f"{_show(self.patterns)}. It is not a {self.name} subject folder as the recipe "
            "expects; fix: rename or remove it, list it in data.subjects.ignore, or correct data.subjects.patterns"
        )

    def canonical_id(self, value: Any, where: str) -> str:
        """Canonical id of a bare id (phenotype table, split file, bad-subject list).

        Raises:
            DataError: ``value`` matches neither ``id_patterns`` nor ``patterns``.
        """
        text = str(value).strip()
        for rx in (*self.id_patterns, *self.patterns):
            m = rx.fullmatch(text)
            if m:
                return self._format(m)
        raise DataError(
            f"{where}: subject id {text!r} matches none of the {self.name} id patterns "
            f"{_show([*self.id_patterns, *self.patterns])}; fix the file, or "
            "data.subjects.id_patterns if the data set writes its ids differently"
        )


# -- phenotype tables -------------------------------------------------------------------------------------
def _read_table_file(path: Path, table: str):
    import pandas as pd

    if not path.is_file():
        raise DataError(f"phenotype file {path} does not exist ({_key(table)}.file). Fix: put the "
                        f"data set's table there or point {_key(table)}.file at it")
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    # some public tables (ABIDE II) are not valid UTF-8: undecodable bytes become U+FFFD, ids are ASCII
    return pd.read_csv(path, sep=sep, dtype=str, encoding_errors="replace", keep_default_na=True)


def _key(table: str) -> str:
    return "data.labels" if table == "labels" else f"data.phenotypes.{table}"


def read_phenotype_tables(tables: Mapping[str, Mapping], keys: Sequence[str], ids: SubjectIds):
    """Read the label columns ``keys`` from a recipe's phenotype tables.

    Args:
        tables: ``{table name: {"file": path or [paths], "id_column": str, "columns": {key: column},
            "categories": {key: [class values]}}}``. Several files of one table are stacked (e.g.
            ABIDE I and ABIDE II); for an id present in more than one, the later file wins (SwiFT v2
            keeps the ABIDE II row). Tables are joined on the subject id.
        keys: label keys to read (each must be in the ``columns`` of some table; the first wins).
        ids: the data set's :class:`SubjectIds` (table ids are canonicalised with it).

    Returns:
        ``(frame, categories, sources)``: a ``pandas.DataFrame`` indexed by canonical subject id with
        one string column per key (NaN where a subject has no value), ``{key: class values}`` of the
        categorical keys, and ``{key: "file:column"}`` for messages.

    Raises:
        ConfigError: a key in no table, unknown table fields.
        DataError: a missing file, a missing column (file and column named), an id matching no id
            pattern, an id listed twice in one file.
    """
    import pandas as pd

    keys = list(dict.fromkeys(keys))
    where: dict[str, str] = {}
    for key in keys:
        for name, table in tables.items():
            if key in (table.get("columns") or {}):
                where[key] = name
                break
        else:
            known = sorted({k for t in tables.values() for k in (t.get("columns") or {})})
            raise ConfigError(f"label {key!r} is in no phenotype table of the recipe (labels: {known}); add it as "
                              f"data.phenotypes.<table>.columns.{key}=<column>")
    frames, categories, sources = [], {}, {}
    for name in dict.fromkeys(where.values()):
        table = tables[name]
        unknown = set(table) - _TABLE_KEYS
        if unknown:
            raise ConfigError(f"{_key(name)} has unknown field(s) {sorted(unknown)}; allowed: {sorted(_TABLE_KEYS)}")
        if not table.get("file") or not table.get("id_column"):
            raise ConfigError(f"{_key(name)} needs 'file' and 'id_column'")
        mine = {k: table["columns"][k] for k in keys if where[k] == name}
        files = table["file"] if isinstance(table["file"], (list, tuple)) else [table["file"]]
        parts = []
        for file in files:
            path = Path(file)
            df = _read_table_file(path, name)
            wanted = [table["id_column"], *mine.values()]
            missing = [c for c in wanted if c not in df.columns]
            if missing:
                raise DataError(f"{path} has no column(s) {missing} ({_key(name)}); available: "
                                f"{list(df.columns)[:40]}. Fix the table, or {_key(name)}.id_column / .columns")
            df = df[wanted].copy()
            raw_ids = df[table["id_column"]]
            keep = raw_ids.notna() & (raw_ids.astype(str).str.strip() != "")
            df = df[keep]
            df.index = [ids.canonical_id(v, f"{path} (row {r + 2}, column {table['id_column']!r})")
                        for r, v in zip(np.flatnonzero(keep.to_numpy()), df[table["id_column"]])]
            dup = df.index[df.index.duplicated()].unique().tolist()
            if dup:
                raise DataError(f"{path}: subject id(s) {dup[:5]} appear more than once (column "
                                f"{table['id_column']!r}); keep one row per subject")
            parts.append(df.drop(columns=[table["id_column"]]).rename(columns={c: k for k, c in mine.items()}))
            for k, c in mine.items():
                sources[k] = f"{path}:{c}" if k not in sources else f"{sources[k]} + {path}:{c}"
        stacked = pd.concat(parts)
        stacked = stacked[~stacked.index.duplicated(keep="last")]
        frames.append(stacked)
        for k in mine:
            cats = (table.get("categories") or {}).get(k)
            if cats is not None:
                categories[k] = [str(c) for c in cats]
    out = frames[0]
    for f in frames[1:]:
        out = out.join(f, how="outer")
    out = out.apply(lambda col: col.map(lambda v: v.strip() if isinstance(v, str) else v))
    out = out.replace("", np.nan)
    return out[keys], categories, sources


# -- splits --------------------------------------------------------------------------------------------------
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
        subjects: subject ids (unique). strata: subject -> stratum label (None: unstratified draw,
            :func:`~brainfm.data.splits.draw_subject_split`). fractions: train/val/test. seed: seed.

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
        return draw_subject_split(subjects, fractions, seed)
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


def read_bad_subjects(config: Mapping | None, ids: SubjectIds) -> set[str]:
    """Canonical ids of a recipe's bad subjects: ``{"file": path or None, "ids": [...]}``. The file has
    one id per line (SwiFT's ``--bad_subj_path``); blank lines and ``#`` comments are skipped; folder
    names (``<eid>_20227_2_0``) and bare ids are both accepted.

    Raises:
        DataError: a missing file or an id that matches no pattern (file and line named).
    """
    config = dict(config or {})
    unknown = set(config) - {"file", "ids"}
    if unknown:
        raise ConfigError(f"data.bad_subjects has unknown key(s) {sorted(unknown)}; allowed: file, ids")
    out = {ids.canonical_id(v, "data.bad_subjects.ids") for v in (config.get("ids") or [])}
    file = config.get("file")
    if file:
        path = Path(file)
        if not path.is_file():
            raise DataError(f"bad-subject list {path} does not exist (data.bad_subjects.file)")
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            line = line.split("#", 1)[0].strip()
            if line:
                out.add(ids.canonical_id(line, f"{path}:{n}"))
    return out


# -- the datamodule ----------------------------------------------------------------------------------------------
class RecipeDataModule(VolumeDataModule):
    """Clips of one data set, chosen, labelled and split by its recipe (``conf/data/<dataset>.yaml``).

    Args:
        name: data set name (split files in ``<split_dir>``). variant: ``rest`` / ``task`` (names the
            split file; the variant configs also change root, TR, crop/pad, ...).
        root: the data set folder: SwiFT's ``image_path`` (``img/``, ``metadata/``) or a BIDS root.
        store: the volume store of the data set (``layout=volumes``).
        layout: ``volumes`` (the store) or ``frames`` (``<root>/img/<subject>/frame_<t>.pt``).
        tr: repetition time in seconds (checked for every stored run; required for frames, which
            carry none), or ``mixed`` (stores only: runs keep their own TRs).
        shape: model grid ``[X, Y, Z]`` (96^3 for SwiFT).
        crop_pad: frames only: SwiFT crop/pad preset (``swift_hcp``, ``swift_ukb``, ``swift_abcd_rest``),
            six integers in axis order (``x_before x_after y_before y_after z_before z_after``, negative
            crops) or None (centred crop/pad to ``shape``). A store was cropped when it was written.
        subjects: :class:`SubjectIds` arguments (``patterns``, ``id_patterns``, ``canonical``, ``ignore``,
            ``duplicates``).
        frames: ``{"glob": subject folders under img/ (default "*"; ABIDE "ABIDE*/*")}``. What the
            frames hold is ``normalisation.stored`` (``global``: SwiFT's z-norm; ``minmax``: ABCD task).
        runs: ``{"include": regex, "exclude": regex}`` on store run ids (e.g. ``task-rest``).
        bad_subjects: ``{"file": one id per line, "ids": [...]}``, removed before splitting.
        phenotypes: tables (:func:`read_phenotype_tables`). targets: label keys batches carry
            (``task.target`` is one of them); ``[]`` for pretraining.
        missing_labels: subjects without a target value: ``exclude`` (SwiFT) or ``error``.
        labels: the generic ``data.labels`` table of :class:`~brainfm.data.datamodules.volume.VolumeDataModule` (as
            experiment presets set it): read as one more phenotype table, preferred over the recipe's,
            whose label keys become the targets when ``targets`` is empty.
        split: as :class:`~brainfm.data.datamodules.volume.VolumeDataModule`, plus ``stratify`` (``auto``: the
            first target; a list of phenotype keys; null/[]: none), ``bins`` (quantile bins of
            continuous stratification keys) and ``unlisted`` (data subjects missing from an existing
            split file: ``error``, or ``drop`` as SwiFT).
        Other keyword arguments: :class:`~brainfm.data.datamodules.volume.VolumeDataModule`.

    Raises:
        ConfigError / DataError (in :meth:`setup`): unknown layout, a folder matching no id pattern,
        a missing phenotype column, a subject in two splits, no subject left, and the checks of
        :class:`~brainfm.data.datamodules.volume.VolumeDataModule`.
    """

    def __init__(self, name: str, root: str, store: str | None = None, variant: str = "rest",
                 layout: str = "volumes", tr: float | str | None = None, shape: Sequence[int] | None = (96, 96, 96),
                 crop_pad: str | Sequence[int] | None = None, subjects: Mapping | None = None,
                 frames: Mapping | None = None, runs: Mapping | None = None, bad_subjects: Mapping | None = None,
                 phenotypes: Mapping | None = None, targets: Sequence[str] | str | None = (),
                 missing_labels: str = "exclude", split: Mapping | None = None, **kwargs) -> None:
        labels = kwargs.pop("labels", None)  # the generic form (data.labels of VolumeDataModule), e.g. from an
        if labels:                            # experiment preset: one more table, preferred, and its keys as targets
            unknown = set(labels) - _TABLE_KEYS
            if unknown:
                raise ConfigError(f"data.labels has unknown key(s) {sorted(unknown)}; allowed: {sorted(_TABLE_KEYS)}")
            phenotypes = {"labels": dict(labels), **dict(phenotypes or {})}
            targets = targets or list(labels.get("columns") or {})
        if layout not in LAYOUTS:
            raise ConfigError(f"data.layout={layout!r} must be one of {LAYOUTS}")
        if missing_labels not in ("exclude", "error"):
            raise ConfigError(f"data.missing_labels={missing_labels!r} must be 'exclude' or 'error'")
        if layout == "volumes" and not store:
            raise ConfigError(f"data.store is not set for {name}: point it at the volume store "
                              "(or use data.layout=frames)")
        split = {"kind": "subject", "fractions": [0.7, 0.15, 0.15], "seed": 0, "file": None, "stratify": "auto",
                 "bins": 4, "unlisted": "error", **dict(split or {})}
        if split["unlisted"] not in ("error", "drop"):
            raise ConfigError(f"data.split.unlisted={split['unlisted']!r} must be 'error' or 'drop'")
        path = store if layout == "volumes" else root
        super().__init__(name=name, path=str(path), layout=layout, tr=tr, shape=shape, split=split, labels=None,
                         **kwargs)
        self.variant, self.root = str(variant), Path(root)
        self.crop_pad_config = list(crop_pad) if isinstance(crop_pad, (list, tuple)) else crop_pad
        self.ids = SubjectIds(name=name, **dict(subjects or {"patterns": [r"(?P<id>.+)"]}))
        self.frames = {"glob": "*", **dict(frames or {})}
        unknown = set(self.frames) - {"glob"}
        if unknown:
            raise ConfigError(f"data.frames has unknown key(s) {sorted(unknown)}; allowed: glob")
        # frames record nothing about their normalisation: data.normalisation.stored says what they hold
        # (SwiFT: global z-norm; ABCD task: minmax), and there is nothing to check it against
        self.frames_normalisation = self.normalisation.get("stored") or "global"
        if layout == "frames":
            self.normalisation["stored"] = self.normalisation["fill"] = None
        self.runs_filter = {"include": None, "exclude": None, **dict(runs or {})}
        self.bad_config = dict(bad_subjects or {})
        self.phenotype_tables = {k: dict(v) for k, v in (phenotypes or {}).items()}
        self.targets = [targets] if isinstance(targets, str) else list(targets or [])
        self.missing_labels = missing_labels
        self.excluded: dict[str, list[str]] = {}
        self.phenotype_frame = None
        self.categories: dict[str, list[str]] = {}
        self._sources: dict[str, str] = {}
        self._view: RecipeStoreView | None = None

    # -- which keys the phenotype tables must provide ------------------------------------------------------------
    def stratify_keys(self) -> list[str]:
        s = self.split.get("stratify")
        if s == "auto":
            return self.targets[:1]
        if not s:
            return []
        return [s] if isinstance(s, str) else list(s)

    def _frames_subjects(self) -> tuple[Path, list[str]]:
        root = self.root / "img" if (self.root / "img").is_dir() else self.root
        if not root.is_dir():
            raise DataError(f"frame folder {root} does not exist (data.root={self.root}; expected "
                            "<root>/img/<subject>/frame_<t>.pt, SwiFT's image_path)")
        found = sorted(p.relative_to(root).as_posix() for p in root.glob(self.frames["glob"])
                       if p.is_dir() and not any(part.startswith(".") for part in p.relative_to(root).parts))
        return root, found

    def _open_store(self):
        """The recipe's view of the data (its subjects, canonical ids, crop/pad); see the class docstring."""
        if self._view is not None:
            return self._view
        bad = read_bad_subjects(self.bad_config, self.ids)
        excluded: dict[str, list[str]] = {"ignored": [], "bad": [], "runs_filter": [], "duplicate": [], "no_label": []}
        if self.layout == "frames":
            from brainfm.data.stores.frames import FrameStore

            if not isinstance(self.expected_tr, (int, float)):
                raise ConfigError(f"frame folders ({self.root}) carry no TR and data.tr={self.expected_tr!r}: set "
                                  "data.tr=<seconds> (a data set with several TRs needs the volume store, which "
                                  "records each run's TR)")
            img, folders = self._frames_subjects()
            keep = []
            for f in folders:
                if self.ids.ignored(f):
                    excluded["ignored"].append(f)
                elif self.ids.from_folder(f, str(img / f)) in bad:
                    excluded["bad"].append(f)
                else:
                    keep.append(f)
            if not keep:
                raise DataError(f"{img}: no subject folder left (found {len(folders)}; {self._summary(excluded)})")
            base = FrameStore(img, tr=float(self.expected_tr), subjects=keep, normalisation=self.frames_normalisation)
        else:
            base = VolumeStore(self.path)
        include = re.compile(self.runs_filter["include"]) if self.runs_filter.get("include") else None
        exclude = re.compile(self.runs_filter["exclude"]) if self.runs_filter.get("exclude") else None
        runs, canon = [], []
        for i, (folder, run) in enumerate(zip(base.subject_ids, base.run_ids)):
            if self.ids.ignored(folder):
                excluded["ignored"].append(folder)
                continue
            c = self.ids.from_folder(folder, base.describe_run(i))
            if c in bad:
                excluded["bad"].append(folder)
            elif self.layout == "volumes" and ((include and not include.search(run))
                                               or (exclude and exclude.search(run))):
                excluded["runs_filter"].append(f"{folder}/{run}")
            else:
                runs.append(i)
                canon.append(c)
        # two folders, one subject (ABIDE I and II): error, or keep the last folder
        folders_of: dict[str, list[str]] = {}
        for i, c in zip(runs, canon):
            if base.subject_ids[i] not in folders_of.setdefault(c, []):
                folders_of[c].append(base.subject_ids[i])
        clash = {c: sorted(f) for c, f in folders_of.items() if len(f) > 1}
        if clash:
            if self.ids.duplicates == "error":
                c, f = next(iter(clash.items()))
                raise DataError(f"{self.path}: folders {f} are the same {self.name} subject {c!r} ({len(clash)} such "
                                "subject(s)). Fix: remove one, or data.subjects.duplicates=last to keep the last")
            kept = [(i, c) for i, c in zip(runs, canon) if c not in clash or base.subject_ids[i] == clash[c][-1]]
            excluded["duplicate"] = [f for fs in clash.values() for f in fs[:-1]]
            runs, canon = [i for i, _ in kept], [c for _, c in kept]
        # labels: subjects without a target value are left out (SwiFT's dropna) or refused
        wanted = list(dict.fromkeys([*self.targets, *self.stratify_keys()]))
        if wanted:
            frame, self.categories, self._sources = read_phenotype_tables(self.phenotype_tables, wanted, self.ids)
            self.phenotype_frame = frame
            if self.targets:
                subjects = sorted(set(canon))
                values = frame.reindex(subjects)[self.targets]
                lacking = [s for s, ok in zip(subjects, values.notna().all(axis=1)) if not ok]
                if lacking and self.missing_labels == "error":
                    raise DataError(f"{len(lacking)} {self.name} subject(s) have no value for {self.targets} in "
                                    f"{sorted(set(self._sources[k] for k in self.targets))} (e.g. {lacking[:5]}). "
                                    "Fix the table, or data.missing_labels=exclude")
                if lacking:
                    drop = set(lacking)
                    excluded["no_label"] = lacking
                    kept = [(i, c) for i, c in zip(runs, canon) if c not in drop]
                    runs, canon = [i for i, _ in kept], [c for _, c in kept]
        self.excluded = excluded
        if not runs:
            raise DataError(f"no {self.name} run left in {self.path} ({self._summary(excluded)})")
        if any(v for k, v in excluded.items() if k != "ignored"):
            log.warning("%s: left out %s", self.name, self._summary(excluded))
        elif excluded["ignored"]:
            log.info("%s: ignored %s", self.name, self._summary(excluded))
        crop_pad = self._crop_pad(base) if self.layout == "frames" else None
        self._view = RecipeStoreView(base, runs, canon, crop_pad)
        return self._view

    @staticmethod
    def _summary(excluded: Mapping[str, list]) -> str:
        parts = [f"{len(v)} {k.replace('_', ' ')} (e.g. {v[:3]})" for k, v in excluded.items() if v]
        return "; ".join(parts) or "none excluded"

    def _crop_pad(self, base) -> CropPad | None:
        from brainfm.data.preprocess.volumes import resolve_crop_pad

        in_shape = tuple(int(s) for s in base.shape)
        target = None if self.expected_shape is None else tuple(self.expected_shape)
        if target is None:
            return None if self.crop_pad_config is None else resolve_crop_pad(self.crop_pad_config, None, in_shape)
        try:
            return resolve_crop_pad(self.crop_pad_config, target, in_shape)
        except ConfigError as exc:
            raise ConfigError(f"data.crop_pad={self.crop_pad_config!r} does not fit the frames of {self.root} "
                              f"({in_shape} -> data.shape={list(target)}): {exc}. Fix: data.crop_pad=null for a "
                              "centred crop/pad, or the crop/pad of this preprocessing") from exc

    # -- splits -------------------------------------------------------------------------------------------
    def split_file_path(self) -> Path:
        if self.split.get("file"):
            return Path(self.split["file"])
        keys = self.stratify_keys()
        suffix = f"_{'-'.join(keys)}" if keys else ""
        return self.split_dir / f"{self.variant}_seed{int(self.split['seed'])}{suffix}.txt"

    def strata(self, subjects: Sequence[str]) -> dict[str, str] | None:
        """Stratum label per subject: the stratification keys' values (classes, or quantile bins of
        numeric keys), ``NA`` where a key has no value."""
        import pandas as pd

        keys = self.stratify_keys()
        if not keys:
            return None
        frame = self.phenotype_frame.reindex(list(subjects))
        labels = []
        for k in keys:
            col = frame[k]
            if k not in self.categories:
                num = pd.to_numeric(col, errors="coerce")
                if num.notna().sum() and num.nunique() > int(self.split["bins"]):
                    col = pd.qcut(num, q=int(self.split["bins"]), labels=False, duplicates="drop")
                    col = col.astype("Int64").astype(str)
            labels.append(col.fillna("NA").astype(str).replace({"<NA>": "NA"}))
        return {s: "|".join(parts) for s, *parts in zip(subjects, *labels)}

    def _subject_split(self, store) -> tuple[dict[str, list[str]], Path]:
        path = self.split_file_path()
        present = sorted(set(store.subject_ids))
        if path.is_file():
            raw = read_split_file(path)  # headers; a subject in two splits is named
            split = {k: [self.ids.canonical_id(s, str(path)) for s in v] for k, v in raw.items()}
            check_disjoint(split, source=str(path))
            listed = {s for v in split.values() for s in v}
            unlisted = sorted(set(present) - listed)
            if unlisted and self.split["unlisted"] == "error":
                raise DataError(
                    f"{path} does not list {len(unlisted)} {self.name} subject(s) of the data (e.g. {unlisted[:5]}). "
                    "brainfm never regenerates a split silently. Fix: add them to one split, delete the file to "
                    "draw a new split, or data.split.unlisted=drop to leave them out (SwiFT's behaviour)"
                )
            if unlisted:
                log.warning("%s: %d subject(s) not in %s are left out (data.split.unlisted=drop)", self.name,
                            len(unlisted), path)
            keep = set(present)
            return {k: [s for s in v if s in keep] for k, v in split.items()}, path
        split = stratified_subject_split(present, self.strata(present), self.split["fractions"],
                                         int(self.split["seed"]))
        write_split_file(path, split)
        log.info("%s: wrote a new split to %s (%s)", self.name, path,
                 ", ".join(f"{k} {len(v)}" for k, v in split.items()))
        return split, path

    def _label_table(self, store):
        if not self.targets:
            return None
        return LabelTable.from_frame(
            self.phenotype_frame, {k: k for k in self.targets}, sorted(set(store.subject_ids)),
            {k: v for k, v in self.categories.items() if k in self.targets},
            source=", ".join(self._sources[k] for k in self.targets), config_key="data.phenotypes.<table>",
        )

    @property
    def meta(self) -> dict[str, Any]:
        meta = super().meta
        meta["recipe"] = {
            "name": self.name,
            "variant": self.variant,
            "layout": self.layout,
            "crop_pad": None if self.store.crop_pad is None else self.store.crop_pad.as_list(),
            "subject_patterns": [rx.pattern for rx in self.ids.patterns],
            "targets": list(self.targets),
            "categories": {k: list(v) for k, v in self.categories.items() if k in self.targets},
            "split_file": str(getattr(self, "split_file", "")) or None,
            "excluded": {k: len(v) for k, v in self.excluded.items()},
        }
        return meta
