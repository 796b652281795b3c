"""Labels of subjects (sex, age, intelligence, diagnosis, ...) from a phenotype table, joined to
batches by subject.

A data recipe's ``labels`` entry::

    labels:
      file: ${paths.data_dir}/hcp/phenotypes.csv   # CSV or TSV
      id_column: Subject
      columns: {sex: Gender, age: Age_in_Yrs}        # batch key -> column
      categories: {sex: [F, M]}                      # class order of categorical labels (else numeric)

Every subject of the data must have a value for every label, or setup fails naming the
subjects, the column and the fix. Batches then carry one tensor per label (``batch["sex"]``:
class index, ``batch["age"]``: float), added on the way to the device from the batch's subject
index, so datasets and loaders stay label-free.

The same tables give the family ids of family-aware splits (:func:`read_families`, ``data.split.groups=family``);
a table read only for them needs no ``columns``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from brainfm.errors import ConfigError, DataError


class LabelTable:
    """Per-subject label values, indexed like the datasets' subject index (sorted subject ids).

    Args:
        file: CSV/TSV path. id_column: column holding the subject ids (compared as strings).
        columns: batch key -> column name. categories: batch key -> ordered class values.
        subjects: the data's subject ids in subject-index order.

    Raises:
        DataError: missing file, missing column, subjects without a value, unparsable values.
    """

    def __init__(self, file: str | Path, id_column: str, columns: dict[str, str], subjects: Sequence[str],
                 categories: dict[str, Sequence] | None = None) -> None:
        table = {"file": str(file), "id_column": id_column, "columns": dict(columns),
                 "categories": dict(categories or {})}
        frame, cats, sources = read_phenotype_tables({"labels": table}, list(columns))
        self._encode(frame, {k: k for k in columns}, subjects, cats, str(file))

    @classmethod
    def from_frame(cls, df, columns: dict[str, str], subjects: Sequence[str],
                   categories: dict[str, Sequence] | None = None, source: str = "phenotype table",
                   config_key: str = "data.labels") -> "LabelTable":
        """A table from a ``pandas.DataFrame`` already indexed by subject id (string values), e.g.
        the merged phenotype tables of a data set recipe (:mod:`brainfm.data.datamodules.recipes`). ``source``
        names the data and ``config_key`` the configuration in error messages. Raises as the
        constructor."""
        self = cls.__new__(cls)
        self._encode(df, columns, subjects, categories, source, config_key)
        return self

    def _encode(self, df, columns: dict[str, str], subjects: Sequence[str],
                categories: dict[str, Sequence] | None, source: str, config_key: str = "data.labels") -> None:
        """Class indices / floats per subject from ``df`` (index: subject id)."""
        categories = {k: [str(c) for c in v] for k, v in (categories or {}).items()}
        self.values: dict[str, torch.Tensor] = {}
        for key, column in columns.items():
            raw = df[column].reindex(list(subjects))
            absent = [s for s, v in zip(subjects, raw) if v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() == ""]
            if absent:
                raise DataError(
                    f"{source}: {len(absent)} subject(s) of the data have no {column!r} value (e.g. {absent[:5]}). "
                    "Fix: add them, or exclude them from the data (the recipe's bad-subject list)."
                )
            if key in categories:
                classes = categories[key]
                bad = sorted({str(v).strip() for v in raw} - set(classes))
                if bad:
                    raise DataError(f"{source}: column {column!r} has values {bad[:5]} outside {config_key}.categories.{key}={classes}")
                self.values[key] = torch.tensor([classes.index(str(v).strip()) for v in raw], dtype=torch.long)
            else:
                try:
                    self.values[key] = torch.tensor([float(v) for v in raw], dtype=torch.float32)
                except ValueError as exc:
                    raise DataError(f"{source}: column {column!r} is not numeric ({exc}); give "
                                    f"{config_key}.categories.{key}=[...] for a categorical label") from exc
        self.file = source

    def add_to(self, batch: dict) -> dict:
        idx = batch["subject"].cpu()
        for key, values in self.values.items():
            batch[key] = values[idx]
        return batch

    def stats(self, index: torch.Tensor | None = None) -> dict[str, dict]:
        """Mean/std of numeric labels and class counts of categorical ones (for standardisation), over
        the subjects ``index`` (subject indices; default: all)."""
        out = {}
        for key, v in self.values.items():
            v = v if index is None else v[index]
            if v.dtype == torch.long:
                out[key] = {"counts": torch.bincount(v).tolist()}
            else:
                out[key] = {"mean": float(v.mean()), "std": float(v.std(unbiased=False))}
        return out


# -- phenotype tables: the one reader ---------------------------------------------------------------------
TABLE_KEYS = {"file", "id_column", "columns", "categories"}


def _read_table_file(path: Path, table: str, nrows: int | None = None):
    """The table at ``path`` as strings (``nrows=0``: its header only)."""
    import pandas as pd

    if not path.is_file():
        raise DataError(f"phenotype file {path} does not exist ({_key(table)}.file). Fix: put the "
                        f"data set's table there or point {_key(table)}.file at it")
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    # some public tables (ABIDE II) are not valid UTF-8: undecodable bytes become U+FFFD, ids are ASCII
    return pd.read_csv(path, sep=sep, dtype=str, encoding_errors="replace", keep_default_na=True, nrows=nrows)


def _key(table: str) -> str:
    return "data.labels" if table == "labels" else f"data.phenotypes.{table}"


def _check_table(name: str, table: Mapping) -> None:
    """Raise ConfigError on unknown fields or a table without ``file`` and ``id_column``."""
    unknown = set(table) - TABLE_KEYS
    if unknown:
        raise ConfigError(f"{_key(name)} has unknown field(s) {sorted(unknown)}; allowed: {sorted(TABLE_KEYS)}")
    if not table.get("file") or not table.get("id_column"):
        raise ConfigError(f"{_key(name)} needs 'file' and 'id_column'")


def _table_files(table: Mapping) -> list[Path]:
    return [Path(f) for f in (table["file"] if isinstance(table["file"], (list, tuple)) else [table["file"]])]


def _read_columns(name: str, table: Mapping, mine: Mapping[str, str], canonical):
    """Columns ``mine`` (key -> column) of every file of table ``name``, stacked and indexed by canonical subject id
    (for an id in several files the later file wins): ``(frame, files read)``.

    Raises:
        DataError: a missing file or column, an id matching no id pattern, an id twice in one file.
    """
    import pandas as pd

    parts, paths = [], _table_files(table)
    for path in paths:
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
        df.index = [canonical(v, f"{path} (row {r + 2}, column {table['id_column']!r})")
                    for r, v in zip(np.flatnonzero(keep.to_numpy()), df[table["id_column"]])]
        dup = df.index[df.index.duplicated()].unique().tolist()
        if dup:
            raise DataError(f"{path}: subject id(s) {dup[:5]} appear more than once (column "
                            f"{table['id_column']!r}); keep one row per subject")
        parts.append(df.drop(columns=[table["id_column"]]).rename(columns={c: k for k, c in mine.items()}))
    stacked = pd.concat(parts)
    return stacked[~stacked.index.duplicated(keep="last")], paths


def read_phenotype_tables(tables: Mapping[str, Mapping], keys: Sequence[str], ids=None):
    """Read the label columns ``keys`` from a recipe's phenotype tables.

    Args:
        tables: ``{table name: {"file": path or [paths], "id_column": str, "columns": {key: column},
            "categories": {key: [class values]}}}``. Several files of one table are stacked (e.g.
            ABIDE I and ABIDE II); for an id present in more than one, the later file wins (SwiFT v2
            keeps the ABIDE II row). Tables are joined on the subject id.
        keys: label keys to read (each must be in the ``columns`` of some table; the first wins).
        ids: the data set's :class:`~brainfm.data.datamodules.recipes.SubjectIds` (table ids are
            canonicalised with its ``canonical_id``), or None: ids are compared as stripped strings.

    Returns:
        ``(frame, categories, sources)``: a ``pandas.DataFrame`` indexed by canonical subject id with
        one string column per key (NaN where a subject has no value), ``{key: class values}`` of the
        categorical keys, and ``{key: "file:column"}`` for messages.

    Raises:
        ConfigError: a key in no table, unknown table fields.
        DataError: a missing file, a missing column (file and column named), an id matching no id
            pattern, an id listed twice in one file.
    """
    canonical = _canonical(ids)
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
        _check_table(name, table)
        mine = {k: table["columns"][k] for k in keys if where[k] == name}
        stacked, paths = _read_columns(name, table, mine, canonical)
        for path in paths:
            for k, c in mine.items():
                sources[k] = f"{path}:{c}" if k not in sources else f"{sources[k]} + {path}:{c}"
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


def _canonical(ids):
    """``(value, where) -> subject id``: the data set's :meth:`SubjectIds.canonical_id`, else the stripped string."""
    return ids.canonical_id if ids is not None else (lambda v, where: str(v).strip())


#: family-id columns looked for, in this order, when ``data.split.family_column`` is not set: the HCP restricted
#: table's ``Family_ID``, ABCD's ``rel_family_id`` (NDA table acspsw03), a generic ``family_id``
FAMILY_COLUMNS = ("Family_ID", "rel_family_id", "family_id")


def read_families(tables: Mapping[str, Mapping], subjects: Sequence[str], column: str | None = None, ids=None,
                  add_table: str = "") -> tuple[dict[str, str], str]:
    """The family id of every subject, from a phenotype table, for family-aware splits
    (``data.split.groups=family``, :func:`brainfm.data.splits.family_subject_split`).

    The column is ``column`` (``data.split.family_column``), else the first of :data:`FAMILY_COLUMNS` that some
    table has (tables in their configured order; HCP restricted ``Family_ID``, ABCD ``rel_family_id``, generic
    ``family_id``). Ids are compared as strings (``"51488_81352"``, ``"7821"``).

    A subject of the data without a family id (absent from the table, or an empty cell) is refused rather than
    given a family of its own: its relatives are unknown, and two twins both missing from the table would become
    two one-subject families and could land on both sides of the split, the leak family splits exist to prevent.
    An unrelated subject needs a family id of its own in the table (HCP and ABCD give every subject one).

    Args:
        tables: ``{name: {"file": path or [paths], "id_column": str, ...}}`` (:func:`read_phenotype_tables`);
            ``labels`` is ``data.labels``, any other name ``data.phenotypes.<name>``; tables need no ``columns``.
        subjects: the data's subject ids. column: the family column, or None (looked for).
        ids: :class:`~brainfm.data.datamodules.recipes.SubjectIds` of a data set recipe, or None.
        add_table: how to add a table to this datamodule's configuration (for the message when none has the column).

    Returns:
        ``({subject: family id}, "file:column")``.

    Raises:
        ConfigError: no table configured, or no table with the column (the columns looked for, the table files and
            the key to set are named); unknown table fields.
        DataError: a missing file, a subject without a family id (named, with the fixes), an id matching no id pattern
            or listed twice in one file.
    """
    tables = {name: dict(t) for name, t in (tables or {}).items() if t}
    for name, table in tables.items():
        _check_table(name, table)
    wanted = [column] if column else list(FAMILY_COLUMNS)
    looked = " or ".join(repr(c) for c in wanted)
    if not tables:
        raise ConfigError(f"data.split.groups=family reads family ids from a phenotype table, and none is configured. "
                          f"Fix: {add_table or 'add the table that holds the family column'} (a column {looked}, or "
                          "name yours with data.split.family_column=<column>), or data.split.groups=null to split by "
                          "subject")
    headers = {name: [list(_read_table_file(path, name, nrows=0).columns) for path in _table_files(table)]
               for name, table in tables.items()}
    found = next(((c, name) for c in wanted for name in tables if any(c in cols for cols in headers[name])), None)
    if found is None:
        files = "; ".join(f"{path} ({_key(name)}: {cols[:12]}{' ...' if len(cols) > 12 else ''})"
                          for name, table in tables.items() for path, cols in zip(_table_files(table), headers[name]))
        fix = ("data.split.family_column=<column> naming the family column of one of these tables"
               if not column else "data.split.family_column=<one of the columns above>")
        raise ConfigError(f"data.split.groups=family: no phenotype table has a family column {looked}: {files}. Fix: "
                          f"{fix}, or {add_table or 'add the table that holds it'}; or data.split.groups=null to split "
                          "by subject")
    col, name = found
    frame, paths = _read_columns(name, tables[name], {"family": col}, _canonical(ids))
    values = frame["family"].reindex(sorted({str(s) for s in subjects}))
    values = values.map(lambda v: v.strip() if isinstance(v, str) else v).replace("", np.nan)
    source = " + ".join(f"{path}:{col}" for path in paths)
    absent = values.index[values.isna()].tolist()
    if absent:
        raise DataError(
            f"{len(absent)} subject(s) of the data have no family id in {source} (e.g. {absent[:5]}). brainfm does not "
            "guess: a subject missing from the family table may be the twin or sibling of another and would be split "
            "apart from them. Fix: add their rows (an unrelated subject gets a family id of its own), leave them out "
            "of the data (data set recipes: data.bad_subjects.ids=[...]), or data.split.groups=null to split by subject"
        )
    return {s: str(v) for s, v in values.items()}, source


def build_label_table(config: dict | None, subjects: Sequence[str]) -> LabelTable | None:
    """The ``data.labels`` table of ``subjects``, or None: no table, or one without label ``columns`` (a table read
    only for its family ids, :func:`read_families`).

    Raises:
        ConfigError: unknown keys. DataError: as :class:`LabelTable`.
    """
    if not config:
        return None
    unknown = set(config) - TABLE_KEYS
    if unknown:
        raise ConfigError(f"data.labels has unknown key(s) {sorted(unknown)}; allowed: file, id_column, columns, categories")
    if not config.get("columns"):
        return None
    return LabelTable(config["file"], config["id_column"], dict(config["columns"]), subjects, config.get("categories"))
