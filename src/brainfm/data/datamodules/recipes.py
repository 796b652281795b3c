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

from brainfm.data.datamodules.volume import VolumeDataModule
from brainfm.data.phenotypes import TABLE_KEYS, LabelTable, read_phenotype_tables
from brainfm.data.preprocess.volumes import resolve_crop_pad
from brainfm.data.splits import SubjectSplit, resolve_subject_split
from brainfm.data.stores import open_store
from brainfm.data.stores.frames import FrameStore
from brainfm.data.stores.view import StoreView
from brainfm.data.stores.volume import CropPad
from brainfm.errors import ConfigError, DataError

log = logging.getLogger(__name__)

LAYOUTS = ("volumes", "frames")


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
            frames hold is ``normalization.stored`` (``global``: SwiFT's z-norm; ``minmax``: ABCD task).
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
            unknown = set(labels) - TABLE_KEYS
            if unknown:
                raise ConfigError(f"data.labels has unknown key(s) {sorted(unknown)}; allowed: {sorted(TABLE_KEYS)}")
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
        # frames record nothing about their normalization: data.normalization.stored says what they hold
        # (SwiFT: global z-norm; ABCD task: minmax), and there is nothing to check it against
        self.frames_normalization = self.normalization.get("stored") or "global"
        if layout == "frames":
            self.normalization["stored"] = self.normalization["fill"] = None
        self.runs_filter = {"include": None, "exclude": None, **dict(runs or {})}
        self.bad_config = dict(bad_subjects or {})
        self.phenotype_tables = {k: dict(v) for k, v in (phenotypes or {}).items()}
        self.targets = [targets] if isinstance(targets, str) else list(targets or [])
        self.missing_labels = missing_labels
        self.excluded: dict[str, list[str]] = {}
        self.phenotype_frame = None
        self.categories: dict[str, list[str]] = {}
        self._sources: dict[str, str] = {}
        self._view: StoreView | None = None

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

    def open_store(self):
        """The recipe's view of the data (its subjects, canonical ids, crop/pad); see the class docstring."""
        if self._view is not None:
            return self._view
        bad = read_bad_subjects(self.bad_config, self.ids)
        excluded: dict[str, list[str]] = {"ignored": [], "bad": [], "runs_filter": [], "duplicate": [], "no_label": []}
        if self.layout == "frames":
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
            base = FrameStore(img, tr=float(self.expected_tr), subjects=keep, normalization=self.frames_normalization,
                              cache=self.cache)
        else:
            base = open_store("volume", self.path, cache=self.cache)
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
        self._view = StoreView(base, runs, canon, crop_pad)
        return self._view

    @staticmethod
    def _summary(excluded: Mapping[str, list]) -> str:
        parts = [f"{len(v)} {k.replace('_', ' ')} (e.g. {v[:3]})" for k, v in excluded.items() if v]
        return "; ".join(parts) or "none excluded"

    def _crop_pad(self, base) -> CropPad | None:
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
    def split_stem(self) -> str:
        """``<variant>_seed<seed>[_<stratify keys>]``: the stem of the recipe's split files."""
        keys = self.stratify_keys()
        suffix = f"_{'-'.join(keys)}" if keys else ""
        return f"{self.variant}_seed{int(self.split['seed'])}{suffix}"

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

    def _subject_split(self, subject_ids: Sequence[str]) -> SubjectSplit:
        """The recipe's split (``data.split.file``, else ``<split_dir>/<variant>_seed<N>[_<keys>]_<n>subjects_<fingerprint>.txt``,
        else a stratified draw written after the checks; :func:`~brainfm.data.splits.resolve_subject_split`)."""
        return resolve_subject_split(self.split_dir, self.split_stem(), subject_ids, self.split["fractions"],
                                     int(self.split["seed"]), file=self.split.get("file"), strata=self.strata,
                                     canonical=self.ids.canonical_id, unlisted=self.split["unlisted"], what=self.name,
                                     families=self.families if self.family_split else None)

    def family_tables(self) -> tuple[dict[str, dict], SubjectIds, str]:
        """The recipe's phenotype tables (``data.phenotypes``, ``data.labels``), its subject ids, and how to add the
        table that holds the family ids (HCP's restricted table, ABCD's acspsw03)."""
        add = "add the table that holds it: +data.phenotypes.family='{file: <table.csv>, id_column: <subject column>}'"
        return self.phenotype_tables, self.ids, add

    def _label_table(self, subjects: Sequence[str]):
        if not self.targets:
            return None
        return LabelTable.from_frame(
            self.phenotype_frame, {k: k for k in self.targets}, list(subjects),
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
            "excluded": {k: len(v) for k, v in self.excluded.items()},
        }
        return meta

    def _fills(self) -> list:
        if self.layout == "frames":  # padded with each clip's first voxel at read time; nothing to read here
            return ["first voxel of each clip (SwiFT)"]
        return super()._fills()
