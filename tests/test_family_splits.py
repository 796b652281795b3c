"""Family-aware subject splits (``data.split.groups=family``): on a synthetic HCP-like table (60 subjects in 26
families: twins, siblings, singletons) no family crosses a split, the sizes and the class balance follow the
fractions, split files are refused when relatives cross them, the written file reads the same in SwiFT, and a
training run uses the family split end to end."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from helpers import QUIET, labelled_roi_store, supervised_on, train_in

from brainfm.data.datamodules.roi import ROIDataModule
from brainfm.data.phenotypes import read_families
from brainfm.data.splits import (
    SPLITS,
    Families,
    families_path,
    family_subject_split,
    read_split_file,
    stratified_subject_split,
    write_split_file,
)
from brainfm.errors import ConfigError, DataError

#: family sizes of the synthetic table: 6 singletons, 10 pairs (twins), 6 trios and 4 quartets (twins and siblings)
SIZES = [1] * 6 + [2] * 10 + [3] * 6 + [4] * 4


def hcp_like(subjects: list[str] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """``(subject -> Family_ID, subject -> sex)`` of 60 subjects in 26 families (:data:`SIZES`), ids as HCP writes
    them (six digits; family ids ``<mother>_<father>``). The first two members of a family are same-sex twins."""
    subjects = subjects or [str(100206 + 101 * i) for i in range(sum(SIZES))]
    family, sex, i = {}, {}, 0
    for f, size in enumerate(SIZES):
        for j in range(size):
            s = subjects[i]
            family[s] = f"{51000 + 7 * f}_{81000 + 13 * f}"
            sex[s] = "FM"[f % 2] if j < 2 else "FM"[(i // 3) % 2]
            i += 1
    return family, sex


def sides(split: dict[str, list[str]], family: dict[str, str]) -> dict[str, set[str]]:
    """family -> the splits its members are in."""
    out: dict[str, set[str]] = {}
    for name in SPLITS:
        for s in split[name]:
            out.setdefault(family[s], set()).add(name)
    return out


def swift_lists(path: Path) -> dict[str, list[str]]:
    """The subject lists SwiFT takes from a split file (Transconnectome/SwiFT ``project/module/utils/data_module.py``,
    ``load_split``, restated): every line loses its last character (the newline); the train, val and test sections
    start after the first line *containing* ``train``, ``val`` and ``test``; the test list runs to the end of the
    file."""
    lines = [line[:-1] for line in path.open().readlines()]
    heads = [next(i for i, line in enumerate(lines) if key in line) for key in ("train", "val", "test")]
    return {"train": lines[heads[0] + 1:heads[1]], "val": lines[heads[1] + 1:heads[2]], "test": lines[heads[2] + 1:]}


# -- the draw ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fractions, sizes", [((0.6, 0.2, 0.2), [36, 12, 12]), ((0.7, 0.15, 0.15), [42, 9, 9]),
                                              ((0.8, 0.1, 0.1), [48, 6, 6])])
def test_no_family_crosses_a_split_and_sizes_follow_the_fractions(fractions, sizes):
    family, _ = hcp_like()
    draws = [family_subject_split(list(family), Families(family), None, fractions, seed) for seed in range(6)]
    for split in draws:
        assert all(len(v) == 1 for v in sides(split, family).values())
        assert sorted(sum(split.values(), [])) == sorted(family)
        assert [len(split[k]) for k in SPLITS] == sizes  # singletons fill the last places: exactly the fractions
    assert len({tuple(d["test"]) for d in draws}) == 6  # seeded: another seed, another split
    assert draws[2] == family_subject_split(list(family), Families(family), None, fractions, 2)


def test_stratified_family_split_keeps_the_class_balance():
    family, sex = hcp_like()
    males = sum(v == "M" for v in sex.values())
    for seed in range(6):
        split = family_subject_split(list(family), Families(family), sex, (0.6, 0.2, 0.2), seed)
        assert all(len(v) == 1 for v in sides(split, family).values())
        assert [len(split[k]) for k in SPLITS] == [36, 12, 12]
        got = [sum(sex[s] == "M" for s in split[k]) for k in SPLITS]
        assert all(abs(g - males * f) <= 1.0 for g, f in zip(got, (0.6, 0.2, 0.2))), (seed, got, males)


def test_whole_families_bound_the_sizes_and_no_requested_split_is_empty():
    family = {f"s{i}": f"f{i // 2}" for i in range(20)}  # ten twin pairs: even sizes only
    split = family_subject_split(list(family), Families(family), None, (0.7, 0.15, 0.15), 0)
    assert sorted(len(split[k]) for k in ("val", "test")) == [2, 4] and len(split["train"]) == 14
    three = {"a": "x", "b": "x", "c": "x", "d": "y", "e": "y", "f": "y", "g": "z"}  # 7 subjects, 3 families
    split = family_subject_split(list(three), Families(three), None, (0.8, 0.1, 0.1), 0)
    assert all(split[k] for k in SPLITS) and all(len(v) == 1 for v in sides(split, three).values())
    with pytest.raises(DataError, match=r"1 subject\(s\) have no family id in the family table \(e.g. \['h'\]\)"):
        family_subject_split([*three, "h"], Families(three), None, (0.8, 0.1, 0.1), 0)


# -- the family table ---------------------------------------------------------------------------------------------
def write_table(path: Path, family: dict[str, str], sex: dict[str, str], column: str = "Family_ID",
                drop: tuple[str, ...] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Subject", "Gender", column])
        w.writerows([s, sex[s], "" if s in drop else family[s]] for s in family)
    return path


def test_family_column_is_found_in_order_and_missing_ids_are_refused(tmp_path):
    family, sex = hcp_like()
    table = {"file": str(write_table(tmp_path / "restricted.csv", family, sex)), "id_column": "Subject"}
    of, source = read_families({"labels": table}, list(family))
    assert of == family and source == f"{tmp_path / 'restricted.csv'}:Family_ID"
    abcd = {"file": str(write_table(tmp_path / "acspsw03.csv", family, sex, column="rel_family_id")),
            "id_column": "Subject"}
    assert read_families({"main": abcd}, list(family))[1].endswith("acspsw03.csv:rel_family_id")
    both = tmp_path / "both.tsv"  # the first of the columns looked for wins, wherever it stands in the table
    both.write_text("Subject\tfamily_id\tFamily_ID\n" + "".join(f"{s}\tother\t{family[s]}\n" for s in family))
    assert read_families({"main": abcd, "x": {"file": str(both), "id_column": "Subject"}}, list(family)) == (
        family, f"{both}:Family_ID")
    with pytest.raises(ConfigError, match=r"no phenotype table has a family column 'family': .*restricted.csv "
                                          r"\(data.labels: \['Subject', 'Gender', 'Family_ID'\]\)\. Fix: "
                                          r"data.split.family_column=<one of the columns above>"):
        read_families({"labels": table}, list(family), column="family")
    plain = {"file": str(write_table(tmp_path / "other.csv", family, sex, column="kin")), "id_column": "Subject"}
    with pytest.raises(ConfigError, match=r"'Family_ID' or 'rel_family_id' or 'family_id': .*other.csv "
                                          r"\(data.phenotypes.main: .*Fix: data.split.family_column=<column>"):
        read_families({"main": plain}, list(family))
    assert read_families({"main": plain}, list(family), column="kin")[0] == family
    twin = next(s for s in family if sum(v == family[s] for v in family.values()) == 2)
    holes = {"file": str(write_table(tmp_path / "holes.csv", family, sex, drop=(twin,))), "id_column": "Subject"}
    with pytest.raises(DataError, match=rf"1 subject\(s\) of the data have no family id in .*holes.csv:Family_ID "
                                        rf"\(e.g. \['{twin}'\]\).*may be the twin.*data.split.groups=null"):
        read_families({"labels": holes}, list(family))
    with pytest.raises(ConfigError, match=r"none is configured. Fix: data.labels=\{file: <table.csv>"):
        ROIDataModule(name="toy", path="x.h5", split={"kind": "subject", "groups": "family"}).families(["a"])


def test_groups_need_a_subject_split():
    with pytest.raises(ConfigError, match=r"data.split.groups=family keeps families together in a split by subject, "
                                          r"and data.split.kind='time'. Fix: data.split.kind=subject"):
        ROIDataModule(name="toy", path="x.h5", split={"kind": "time", "groups": "family"})
    with pytest.raises(ConfigError, match=r"data.split.groups='twins' must be null \(a split by subject\) or family"):
        ROIDataModule(name="toy", path="x.h5", split={"kind": "subject", "groups": "twins"})


# -- a datamodule: the file, its key, its record, the refusal -----------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, Path, dict[str, str], dict[str, str]]:
    """60 one-run subjects (s000..s059) and their family table ``families.csv`` (Subject, Gender, Family_ID)."""
    root = tmp_path_factory.mktemp("families")
    h5 = labelled_roi_store(root, n_subjects=60, n_trs=48)
    family, sex = hcp_like([f"s{i:03d}" for i in range(60)])
    return h5, write_table(root / "families.csv", family, sex), family, sex


def family_dm(h5: Path, table: Path, split_dir: Path, **split) -> ROIDataModule:
    dm = ROIDataModule(name="toy", path=str(h5), n_rois=12, tr=0.72, window={"length": 24, "min_length": None},
                       split={"kind": "subject", "fractions": [0.6, 0.2, 0.2], "groups": "family", **split},
                       split_dir=str(split_dir), labels={"file": str(table), "id_column": "Subject"})
    dm.setup()
    return dm


def test_family_split_file_is_keyed_apart_recorded_and_read_by_swift(store, tmp_path):
    h5, table, family, _ = store
    by_subject = ROIDataModule(name="toy", path=str(h5), n_rois=12, tr=0.72, window={"length": 24},
                               split={"kind": "subject", "fractions": [0.6, 0.2, 0.2]}, split_dir=str(tmp_path))
    by_subject.setup()
    dm = family_dm(h5, table, tmp_path)
    assert by_subject.split_file.name.startswith("seed0_60subjects_")
    assert dm.split_file.name.startswith("seed0_family_60subjects_")  # the grouping is in the key: a new draw
    assert dm.split_file.name.endswith(by_subject.split_file.name[len("seed0_60subjects_"):])  # same subjects
    assert all(len(v) == 1 for v in sides(dm.subject_split, family).values())
    assert [len(dm.subject_split[k]) for k in SPLITS] == [36, 12, 12]
    assert read_split_file(dm.split_file) == dm.subject_split
    assert swift_lists(dm.split_file) == dm.subject_split  # SwiFT reads the same three lists
    record = families_path(dm.split_file)
    assert record.name == dm.split_file.stem + ".families.tsv"
    rows = [line.split("\t") for line in record.read_text().splitlines()]
    assert rows[0] == ["subject", "family", "split"]
    assert {s: (f, side) for s, f, side in rows[1:]} == {s: (family[s], k) for k in SPLITS for s in dm.subject_split[k]}
    mtime = dm.split_file.stat().st_mtime_ns
    again = family_dm(h5, table, tmp_path)  # read back, not drawn again
    assert again.subject_split == dm.subject_split and dm.split_file.stat().st_mtime_ns == mtime


def test_a_split_with_relatives_apart_is_refused_with_fixes_that_work(store, tmp_path):
    h5, table, family, sex = store
    subjects = sorted(family)
    given = write_split_file(tmp_path / "given.txt", stratified_subject_split(subjects, None, (0.6, 0.2, 0.2), 0))
    split = read_split_file(given)
    crossing = [f for f, v in sides(split, family).items() if len(v) > 1]
    assert crossing  # a split by subject puts relatives apart
    f = crossing[0]
    members = ", ".join(f"{s} \\({k}\\)" for k in SPLITS for s in split[k] if family[s] == f)
    members = ", ".join(sorted(members.split(", ")))
    with pytest.raises(ConfigError, match=rf"the split file {given} puts relatives on different sides: "
                                          rf"{len(crossing)} families of {table}:Family_ID cross it \(family {f}: "
                                          rf"{members}.*Fix: draw a family split into a new file, "
                                          rf"data.split.file={tmp_path / 'given_family.txt'}.*data.split.groups=null"):
        family_dm(h5, table, tmp_path, file=str(given))
    assert not (tmp_path / "given_family.txt").exists()
    fixed = family_dm(h5, table, tmp_path, file=str(tmp_path / "given_family.txt"))  # the first fix, as typed
    assert all(len(v) == 1 for v in sides(fixed.subject_split, family).values())
    assert (tmp_path / "given_family.txt").is_file() and (tmp_path / "given_family.families.tsv").is_file()
    knowingly = family_dm(h5, table, tmp_path, file=str(given), groups=None)  # the second, as typed
    assert knowingly.subject_split == split
    # a cached family split whose families changed since (two families of different sides merged)
    drawn = family_dm(h5, table, tmp_path / "cache").subject_split
    a, b = drawn["train"][0], drawn["test"][0]
    merged = {**family, **{s: family[a] for s in family if family[s] == family[b]}}
    write_table(table.with_name("merged.csv"), merged, sex)
    with pytest.raises(ConfigError, match=r"puts relatives on different sides: 1 family of .*merged.csv:Family_ID "
                                          r"crosses it .*Fix: delete .*seed0_family_60subjects_[0-9a-f]{8}.txt and "
                                          r"a family split is drawn into .*data.split.file=.*_redrawn.txt; or "
                                          r"data.split.groups=null"):
        family_dm(h5, table.with_name("merged.csv"), tmp_path / "cache")
    next((tmp_path / "cache").glob("seed0_family_*.txt")).unlink()
    redrawn = family_dm(h5, table.with_name("merged.csv"), tmp_path / "cache")
    assert all(len(v) == 1 for v in sides(redrawn.subject_split, merged).values())


def test_training_run_uses_the_family_split(store, tmp_path):
    h5, table, family, _ = store
    labels = table.with_name("labels_families.csv")
    with labels.open("w", newline="") as f:  # the label and the family ids in one table, as data.labels reads it
        gender = dict(line.strip().split(",") for line in (h5.parent / "gender.csv").read_text().splitlines()[1:])
        csv.writer(f).writerows([["subject", "gender", "Family_ID"], *([s, gender[s], family[s]] for s in family)])
    over = [o.replace(str(h5.parent / "gender.csv"), str(labels)) for o in supervised_on(h5, "model=fc")]
    run_dir, metrics = train_in(tmp_path, *over, *QUIET, "data.split.kind=subject", "data.split.groups=family",
                                "data.split.fractions=[0.6,0.2,0.2]")
    assert np.isfinite(metrics["train/loss"])
    (split_file,) = (tmp_path / "splits" / "hcp_rest_roi").glob("seed0_family_60subjects_*.txt")
    split = read_split_file(split_file)
    assert all(len(v) == 1 for v in sides(split, family).values()) and [len(split[k]) for k in SPLITS] == [36, 12, 12]
    assert (run_dir / "config.yaml").read_text().count("groups: family") == 1
