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
"""

from __future__ import annotations

from collections.abc import Sequence
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
        import pandas as pd

        path = Path(file)
        if not path.is_file():
            raise DataError(f"phenotype file {path} does not exist; fix data.labels.file")
        sep = "\t" if path.suffix in (".tsv", ".tab") else ","
        df = pd.read_csv(path, sep=sep, dtype=str)
        missing = [c for c in [id_column, *columns.values()] if c not in df.columns]
        if missing:
            raise DataError(f"{path} has no column(s) {missing}; available: {list(df.columns)[:30]}. "
                            "Fix data.labels.id_column / data.labels.columns")
        dup = df[id_column][df[id_column].duplicated()].tolist()
        if dup:
            raise DataError(f"{path}: subject id(s) {dup[:5]} appear more than once in column {id_column!r}")
        df = df.set_index(df[id_column].str.strip())
        self._encode(df, columns, subjects, categories, str(path))

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

    def stats(self) -> dict[str, dict]:
        """Mean/std of numeric labels and class counts of categorical ones (for standardisation)."""
        out = {}
        for key, v in self.values.items():
            if v.dtype == torch.long:
                out[key] = {"counts": torch.bincount(v).tolist()}
            else:
                out[key] = {"mean": float(v.mean()), "std": float(v.std(unbiased=False))}
        return out


def build_label_table(config: dict | None, subjects: Sequence[str]) -> LabelTable | None:
    if not config:
        return None
    unknown = set(config) - {"file", "id_column", "columns", "categories"}
    if unknown:
        raise ConfigError(f"data.labels has unknown key(s) {sorted(unknown)}; allowed: file, id_column, columns, categories")
    return LabelTable(config["file"], config["id_column"], dict(config["columns"]), subjects, config.get("categories"))
