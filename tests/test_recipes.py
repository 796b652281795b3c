"""Data set recipes (UKB, ABCD, HCP, ABIDE, EMBARC, OASIS-3) and the multi-data-set mix, on fake subjects
written in each data set's exact layout (tests/fixtures_recipes.py): composition, SwiFT's crop/pad,
subject ids, phenotype columns, bad subjects, stratified splits, SwiFT split files, errors, and one
pretraining and one downstream training step through every recipe."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent))
import fixtures_recipes as fx  # noqa: E402

from brainfm import training as train  # noqa: E402
from brainfm.config import compose, repo_root  # noqa: E402
from brainfm.data.datamodules.recipes import RecipeDataModule, SubjectIds  # noqa: E402
from brainfm.data.splits import keyed_split_path, read_split_file, stratified_subject_split  # noqa: E402
from brainfm.errors import ConfigError, DataError  # noqa: E402

RECIPES = ["ukb", "ukb_task", "abcd", "abcd_task", "hcp", "hcp_task", "abide", "embarc", "oasis3"]
# facts each recipe must carry: TR (s), frames crop/pad in axis order, canonical id of a folder
FACTS = {
    "ukb": (0.735, [[3, 2], [-7, -6], [3, 2]], ("1234567_20227_2_0", "1234567")),
    "ukb_task": (0.735, [[3, 2], [-7, -6], [3, 2]], ("1234567_20249_2_0", "1234567")),
    "abcd": (0.8, [[9, 8], [0, -1], [6, 5]], ("sub-NDARINV0A4P0LWM", "NDARINV0A4P0LWM")),
    "abcd_task": (0.8, [[0, 0], [0, 0], [0, 1]], ("sub-NDARINV0A4P0LWM", "NDARINV0A4P0LWM")),
    "hcp": (0.72, [[11, 10], [2, 1], [8, 7]], ("100307", "100307")),
    "hcp_task": (0.72, [[11, 10], [2, 1], [8, 7]], ("100307", "100307")),
    "abide": ("mixed", [[-1, 0], [-10, -9], [0, -1]], ("Pitt_0050002_func_preproc", "50002")),
    "embarc": (2.0, [[-1, 0], [-10, -9], [0, -1]], ("sub-CU0009", "CU0009")),
    "oasis3": (2.2, [[-1, 0], [-10, -9], [0, -1]], ("sub-OAS30001", "OAS30001")),
}
# the data sets' input grids (SwiFT's datasets.py comments; fMRIPrep MNI152NLin2009cAsym 2 mm otherwise)
IN_SHAPES = {"ukb": (91, 109, 91), "ukb_task": (91, 109, 91), "abcd": (79, 97, 85), "abcd_task": (96, 96, 95),
             "hcp": (75, 93, 81), "hcp_task": (75, 93, 81)}
TINY = ["model=swin4d_v7", "model.img_size=[24,24,24,4]", "model.embed_dim=12", "model.depths=[1,1,1]",
        "model.num_heads=[2,2,2]", "model.window_size=[4,4,4,4]", "model.first_window_size=[2,2,2,2]"]
LOADER = ["window.length=4", "batch_size=2", "eval_batch_size=2", "num_workers=0", "pool_mb=0", "pin_memory=false"]


def _quiet(tmp_path) -> list[str]:
    return [f"paths.output_dir={tmp_path}/outputs", f"paths.split_dir={tmp_path}/splits", "logger=none",
            "callbacks=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def _data(info: dict, layout: str, prefix: str = "data") -> list[str]:
    """Overrides pointing a recipe at a fixture, on a 24^3 grid (centred crop of the fixture's frames)."""
    out = [f"{prefix}.root={info['root']}", f"{prefix}.layout={layout}", f"{prefix}.shape=[24,24,24]",
           f"{prefix}.crop_pad=null", *(f"{prefix}.{o}" for o in LOADER)]
    if "store" in info:
        out.append(f"{prefix}.store={info['store']}")
    return out


def _dm(tmp_path, recipe: str, *extra: str) -> RecipeDataModule:
    cfg = compose("train", [*_quiet(tmp_path), f"data={recipe}", *extra])
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup()
    return dm


# -- composition --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_with_its_facts(recipe):
    cfg = compose("train", [f"data={recipe}"])
    data = OmegaConf.to_container(cfg.data, resolve=True)
    tr, crop, (folder, canonical) = FACTS[recipe]
    assert data["tr"] == tr and data["shape"] == [96, 96, 96] and data["name"] == recipe.split("_")[0]
    dm = instantiate(cfg.data, _convert_="all")  # constructing reads no file
    from brainfm.data.preprocess.volumes import resolve_crop_pad

    cp = resolve_crop_pad(dm.crop_pad_config, (96, 96, 96), IN_SHAPES.get(recipe, (97, 115, 97)))
    assert cp.as_list() == crop
    assert dm.ids.from_folder(folder, "test") == canonical
    assert dm.variant == ("task" if recipe.endswith("_task") else "rest")
    for table in data["phenotypes"].values():
        files = table["file"] if isinstance(table["file"], list) else [table["file"]]
        assert all(Path(f).is_absolute() for f in files)


def test_multi_composes_three_recipes_and_takes_more():
    cfg = compose("train", ["data=multi"])
    assert list(cfg.data.datasets) == ["ukb", "hcp", "abcd"] and cfg.data.weights is None
    dm = instantiate(cfg.data, _convert_="all")
    assert [type(c).__name__ for c in dm.children.values()] == ["RecipeDataModule"] * 3
    assert dm.children["hcp"].split_dir == Path(cfg.paths.split_dir) / "hcp"
    cfg = compose("train", ["data=multi", "+data@data.datasets.abide=abide", "~data.datasets.hcp",
                            "+data.weights={ukb: 2, abcd: 1, abide: 1}"])
    assert list(cfg.data.datasets) == ["ukb", "abcd", "abide"]
    from brainfm.data.datamodules.multi import MultiDataModule

    with pytest.raises(ConfigError, match=r"data.weights names \['hcp'\], which are not in data.datasets \['ukb'\]"):
        MultiDataModule({"ukb": dm.children["ukb"]}, weights={"hcp": 1.0})
    with pytest.raises(ConfigError, match="non-negative with a positive sum"):
        MultiDataModule({"ukb": dm.children["ukb"]}, weights={"ukb": 0.0})


# -- SwiFT's crop/pad at load -----------------------------------------------------------------------------------
SWIFT_PADS = {  # Transconnectome/SwiFT datasets.py (torch pad over (X, Y, Z), last axis first); ABCD rest crops Y
    "ukb": ((3, 2, -7, -6, 3, 2), None), "abcd": ((6, 5, 0, 0, 9, 8), 96), "hcp": ((8, 7, 2, 1, 11, 10), None),
    "abcd_task": ((0, 1, 0, 0, 0, 0), None), "abide": ((0, -1, -10, -9, -1, 0), None),  # SwiFT v2 lab code
}


@pytest.mark.parametrize("recipe", list(SWIFT_PADS))
def test_frames_are_padded_to_96_exactly_as_swift(tmp_path, recipe):
    maker = {"abcd_task": lambda r, **k: fx.make_abcd(r, task=True, **k)}.get(recipe, fx.MAKERS.get(recipe))
    info = maker(tmp_path / recipe, n=2, n_frames=4, shape="real")
    extra = ["data.layout=frames", f"data.root={info['root']}", "data.split.kind=time", "data.window.length=2",
             "data.num_workers=0", "data.pool_mb=0", "data.tr=2.0"]
    dm = _dm(tmp_path, recipe, *extra)
    assert dm.store.shape == (96, 96, 96)
    pad, crop_y = SWIFT_PADS[recipe]
    for i in range(len(dm.store)):
        folder = dm.store.base.path(dm.store.index[i])
        # SwiFT: frames (X, Y, Z, 1) concatenated over time, permuted to (1, T, X, Y, Z), padded with y.flatten()[0]
        y = torch.cat([torch.load(folder / f"frame_{t}.pt").unsqueeze(0) for t in range(4)], dim=4)
        bg = y.flatten()[0]
        y = torch.nn.functional.pad(y.permute(0, 4, 1, 2, 3), pad, value=bg)
        if crop_y:
            y = y[:, :, :, :crop_y, :]
        ours = torch.from_numpy(dm.store.read_clip(i, 0, 4))
        assert torch.equal(ours, y[0]), recipe
    assert dm.meta["recipe"]["crop_pad"] == FACTS[recipe][1] and dm.meta["shape"] == [96, 96, 96]


# -- subject ids, phenotypes, bad subjects -------------------------------------------------------------------------
def test_subject_ids_canonicalise_folders_tables_and_split_files():
    ids = SubjectIds(["sub-NDAR_?INV(?P<key>[A-Z0-9]{8})"], ["NDAR_?INV(?P<key>[A-Z0-9]{8})"], "NDARINV{key}",
                     name="abcd")
    assert ids.from_folder("sub-NDARINV0A4P0LWM", "x") == ids.canonical_id("NDAR_INV0A4P0LWM", "y") == "NDARINV0A4P0LWM"
    with pytest.raises(DataError, match=r"img/sub-ndar1: subject 'sub-ndar1' matches none of the abcd subject-id patterns"):
        ids.from_folder("sub-ndar1", "img/sub-ndar1")
    with pytest.raises(ConfigError, match="no named group"):
        SubjectIds(["sub-(?P<id>.+)"], canonical="{key}")


def test_ukb_layout_labels_and_ignored_repeat_visit(tmp_path):
    info = fx.make_ukb(tmp_path / "ukb")
    dm = _dm(tmp_path, "ukb", *_data(info, "frames"), "data.targets=[sex,depression]")
    assert sorted(set(dm.store.subject_ids)) == sorted(info["subjects"])
    assert dm.excluded["ignored"] == [f"{info['subjects'][0]}_20227_3_0"]
    batch = dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    subjects = sorted(info["subjects"])
    for s, sex, dep in zip(batch["subject"].tolist(), batch["sex"].tolist(), batch["depression"].tolist()):
        i = info["subjects"].index(subjects[s])
        assert sex == info["sex"][subjects[s]] and dep == i % 2
    assert dm.meta["recipe"]["categories"] == {"sex": ["0", "1"], "depression": ["0", "1"]}


def test_abide_keeps_the_abide2_copy_and_row(tmp_path):
    info = fx.make_abide(tmp_path / "abide")
    dm = _dm(tmp_path, "abide", *_data(info, "frames"), "data.tr=2.0", "data.targets=[asd,age]")
    both = info["both"]
    runs = [dm.store.source_subject_ids[i] for i, s in enumerate(dm.store.subject_ids) if s == both]
    assert runs == [f"ABIDE2/{both}"] and dm.excluded["duplicate"] == [f"ABIDE1/{both}"]
    assert dm.phenotype_frame.loc[both, "age"] == "14.0"  # ABIDE2_pheno_total.csv wins
    idx = sorted(set(dm.store.subject_ids)).index(both)
    assert dm.labels.values["asd"][idx].item() == info["asd"][both]
    assert re.fullmatch(r"rest_seed0_asd-site_\d+subjects_[0-9a-f]{8}\.txt", dm.split_file.name)
    with pytest.raises(DataError, match=r"folders \['ABIDE1/50002', 'ABIDE2/50002'\] are the same abide subject"):
        _dm(tmp_path, "abide", *_data(info, "frames"), "data.tr=2.0", "data.subjects.duplicates=error")


def test_bad_subjects_and_missing_labels(tmp_path):
    info = fx.make_hcp(tmp_path / "hcp")
    bad = tmp_path / "bad.txt"
    bad.write_text(f"# SwiFT's --bad_subj_path format\n{info['subjects'][0]}\n\n")
    dm = _dm(tmp_path, "hcp", *_data(info, "frames"), f"data.bad_subjects.file={bad}",
             f"data.bad_subjects.ids=[{info['subjects'][1]}]")
    assert sorted(set(dm.store.subject_ids)) == sorted(info["subjects"][2:])
    age = info["root"] / "metadata" / "HCP_1200_precise_age.csv"
    lines = age.read_text().splitlines()
    age.write_text("\n".join(lines[:-1]) + "\n")  # the last subject has no age
    dm = _dm(tmp_path, "hcp", *_data(info, "frames"), "data.targets=[age]", "data.split.file=" + str(tmp_path / "a.txt"))
    assert dm.excluded["no_label"] == [info["subjects"][-1]] and len(set(dm.store.subject_ids)) == 5
    with pytest.raises(DataError, match=r"1 hcp subject\(s\) have no value for \['age'\]"):
        _dm(tmp_path, "hcp", *_data(info, "frames"), "data.targets=[age]", "data.missing_labels=error",
            "data.split.file=" + str(tmp_path / "b.txt"))


# -- errors --------------------------------------------------------------------------------------------------------
def test_unknown_subject_folder_is_named(tmp_path):
    info = fx.make_hcp(tmp_path / "hcp")
    fx.swift_frames(info["root"] / "img" / "sub-100307", 0, fx.SMALL, 2)
    with pytest.raises(DataError, match=r"img/sub-100307: subject 'sub-100307' matches none of the hcp "
                                        r"subject-id patterns \[\(\?P<id>\\d\{6\}\)\]"):
        _dm(tmp_path, "hcp", *_data(info, "frames"))


def test_missing_phenotype_column_is_named(tmp_path):
    info = fx.make_hcp(tmp_path / "hcp")
    table = info["root"] / "metadata" / "HCP_1200_gender.csv"
    table.write_text(table.read_text().replace("Gender", "Sex"))
    with pytest.raises(DataError, match=r"HCP_1200_gender.csv has no column\(s\) \['Gender'\] \(data.phenotypes.unrestricted\)"):
        _dm(tmp_path, "hcp", *_data(info, "frames"), "data.targets=[sex]")
    with pytest.raises(ConfigError, match=r"label 'handedness' is in no phenotype table"):
        _dm(tmp_path, "hcp", *_data(info, "frames"), "data.targets=[handedness]")


def test_subject_in_two_splits_is_named(tmp_path):
    info = fx.make_hcp(tmp_path / "hcp")
    s = info["subjects"]
    split = tmp_path / "split_fixed_1.txt"  # SwiFT's format, as its data_module.py writes it
    split.write_text("train_subjects\n" + "\n".join(s[:4]) + f"\nval_subjects\n{s[4]}\n{s[0]}\ntest_subjects\n{s[5]}\n")
    with pytest.raises(DataError, match=rf"split_fixed_1.txt: subject '{s[0]}' is listed in both 'train' and 'val'"):
        _dm(tmp_path, "hcp", *_data(info, "frames"), f"data.split.file={split}")


def test_swift_split_files_are_read_and_unlisted_subjects_refused_or_dropped(tmp_path):
    info = fx.make_abcd(tmp_path / "abcd")
    s = info["subjects"]
    split = tmp_path / "split_fixed_1.txt"  # NDA keys (NDAR_INV...) as SwiFT's ABCD split files may hold them
    nda = [x.replace("NDARINV", "NDAR_INV") for x in s]
    split.write_text("train_subjects\n" + "\n".join(nda[:3]) + f"\nval_subjects\n{nda[3]}\ntest_subjects\n{nda[4]}\n")
    with pytest.raises(DataError, match=rf"does not list 1 abcd subject\(s\) of the data \(e.g. \['{s[5]}'\]\).*unlisted=drop"):
        _dm(tmp_path, "abcd", *_data(info, "frames"), f"data.split.file={split}")
    dm = _dm(tmp_path, "abcd", *_data(info, "frames"), f"data.split.file={split}", "data.split.unlisted=drop")
    assert dm.subject_split == {"train": s[:3], "val": [s[3]], "test": [s[4]]}


def test_swift_released_hcp_split_is_read_by_the_hcp_recipe():
    path = repo_root() / "data_splits" / "hcp" / "swift_v1_split_hcp.txt"
    split = read_split_file(path)
    assert [len(split[k]) for k in ("train", "val", "test")] == [758, 162, 164]
    ids = RecipeDataModule(name="hcp", root="x", layout="frames", subjects={"patterns": [r"(?P<id>\d{6})"]}).ids
    assert all(ids.canonical_id(x, str(path)) == x for v in split.values() for x in v)


# -- stratified splits ------------------------------------------------------------------------------------------
def test_stratified_split_keeps_class_proportions_and_is_seeded():
    subjects = [f"s{i:02d}" for i in range(40)]
    strata = {s: ("M" if i % 4 == 0 else "F") for i, s in enumerate(subjects)}  # 10 M, 30 F
    split = stratified_subject_split(subjects, strata, [0.6, 0.2, 0.2], seed=3)
    assert [len(split[k]) for k in ("train", "val", "test")] == [24, 8, 8]
    assert [sum(strata[s] == "M" for s in split[k]) for k in ("train", "val", "test")] == [6, 2, 2]
    assert sorted(sum(split.values(), [])) == subjects
    assert split == stratified_subject_split(subjects, strata, [0.6, 0.2, 0.2], seed=3)
    assert split != stratified_subject_split(subjects, strata, [0.6, 0.2, 0.2], seed=4)
    rare = {**strata, "s01": "site-with-one-subject"}
    assert sorted(sum(stratified_subject_split(subjects, rare, [0.7, 0.15, 0.15], 0).values(), [])) == subjects
    with pytest.raises(ConfigError, match="must be three non-negative numbers"):
        stratified_subject_split(subjects, strata, [0.5, 0.5], 0)


def test_recipe_split_is_written_once_stratified_and_read_back(tmp_path):
    info = fx.make_hcp(tmp_path / "hcp", n=12)
    dm = _dm(tmp_path, "hcp", *_data(info, "frames"), "data.targets=[sex]", "data.split.fractions=[0.5,0.25,0.25]")
    path = keyed_split_path(tmp_path / "splits" / "hcp", "rest_seed0_sex", info["subjects"])
    assert path.name.startswith("rest_seed0_sex_12subjects_")
    assert dm.split_file == path and read_split_file(path) == dm.subject_split
    males = [sum(info["sex"][s] for s in dm.subject_split[k]) for k in ("train", "val", "test")]
    assert [len(dm.subject_split[k]) for k in ("train", "val", "test")] == [6, 3, 3]
    assert males[0] == 3 and sorted(males[1:]) == [1, 2]  # 6 of 12 male: half of train, 1.5 of val/test
    mtime = path.stat().st_mtime_ns
    again = _dm(tmp_path, "hcp", *_data(info, "frames"), "data.targets=[sex]", "data.split.seed=0")
    assert again.subject_split == dm.subject_split and path.stat().st_mtime_ns == mtime
    strata = dm.strata(sorted(info["subjects"]))
    assert set(strata.values()) == {"F", "M"}
    dm_age = _dm(tmp_path, "hcp", *_data(info, "frames"), "data.targets=[age]", "data.split.bins=3")
    assert len(set(dm_age.strata(sorted(info["subjects"])).values())) == 3


def test_recipe_family_split_reads_an_added_table_and_stays_stratified(tmp_path):
    info = fx.make_hcp(tmp_path / "hcp", n=12)
    s = info["subjects"]
    family = dict(zip(s, ["A", "A", "A", "B", "B", "C", "C", "D", "D", "E", "F", "G"]))  # twins, siblings, singletons
    table = tmp_path / "RESTRICTED_user.csv"  # HCP's restricted table: Subject, Family_ID, ...
    table.write_text("Subject,Family_ID,ZygositySR\n" + "".join(f"{x},{family[x]},NotTwin\n" for x in s))
    args = [*_data(info, "frames"), "data.targets=[sex]", "data.split.fractions=[0.5,0.25,0.25]",
            "data.split.groups=family"]
    with pytest.raises(ConfigError, match=r"no phenotype table has a family column 'Family_ID' or 'rel_family_id' or "
                                          r"'family_id': .*HCP_1200_gender.csv \(data.phenotypes.unrestricted.*\+data."
                                          r"phenotypes.family='\{file: <table.csv>, id_column: <subject column>\}'"):
        _dm(tmp_path, "hcp", *args)
    dm = _dm(tmp_path, "hcp", *args, f"+data.phenotypes.family={{file: {table}, id_column: Subject}}")
    assert dm.split_file.name.startswith("rest_seed0_sex_family_12subjects_")
    where = {x: k for k, v in dm.subject_split.items() for x in v}
    assert all(len({where[x] for x in s if family[x] == f}) == 1 for f in set(family.values()))
    assert [len(dm.subject_split[k]) for k in ("train", "val", "test")] == [6, 3, 3]
    males = [sum(info["sex"][x] for x in dm.subject_split[k]) for k in ("train", "val", "test")]
    assert males[0] == 3 and sorted(males[1:]) == [1, 2]  # 6 of 12 male, as the split by subject


# -- one pretraining and one downstream step through every recipe ----------------------------------------------
def _fixture(recipe: str, root: Path) -> tuple[dict, str]:
    info = fx.MAKERS[recipe](root)
    if recipe == "hcp":  # the store (default layout), written from SwiFT's frames as brainfm-preprocess frames does
        from brainfm.data.preprocess.frames import convert_frames

        convert_frames(info["root"], info["root"] / "store", tr=info["tr"], target_shape=(24, 24, 24), progress=False)
        info["store"] = info["root"] / "store"
        return info, "volumes"
    return info, "volumes" if recipe in ("embarc", "oasis3") else "frames"


TARGETS = {"ukb": "sex", "abcd": "sex", "hcp": "sex", "abide": "asd", "embarc": "depression", "oasis3": "sex"}


@pytest.mark.parametrize("recipe", list(TARGETS))
def test_pretrain_and_downstream_step_through_each_recipe(tmp_path, recipe):
    info, layout = _fixture(recipe, tmp_path / recipe)
    data = [f"data={recipe}", *_data(info, layout)] + (["data.tr=2.0"] if recipe == "abide" else [])
    steps = ["trainer.max_steps=1", "trainer.val_check_interval=1", "trainer.limit_val_batches=1"]
    pre = train.run(compose("train", [*_quiet(tmp_path), *data, *TINY, *steps, "task=simmim",
                                      "experiment_name=pre"]))
    assert np.isfinite(pre["train/loss"]) and np.isfinite(pre["val/loss"])
    target = TARGETS[recipe]
    down_cfg = compose("train", [*_quiet(tmp_path), *data, *TINY, *steps, "task=supervised", f"task.target={target}",
                                 f"data.targets=[{target}]", "experiment_name=down"])
    down = train.run(down_cfg)
    assert np.isfinite(down["train/loss"]) and 0.0 <= down["val/acc"] <= 1.0
    # what the recipe chose, checked on the same config
    dm = instantiate(down_cfg.data, _convert_="all")
    dm.setup()
    subjects = sorted(set(dm.store.subject_ids))
    assert subjects == sorted(info["subjects"])
    split_files = sorted(p.name for p in (tmp_path / "splits" / dm.name).iterdir())
    strat = {"abide": "asd-site"}.get(recipe, target)
    assert [re.sub(r"_\d+subjects_[0-9a-f]{8}", "", f) for f in split_files] == sorted(
        {"rest_seed0.txt" if recipe != "abide" else "rest_seed0_asd-site.txt", f"rest_seed0_{strat}.txt"})
    listed = sum(dm.subject_split.values(), [])
    assert sorted(listed) == subjects and len(listed) == len(set(listed))
    assert json.loads(json.dumps(dm.meta))["recipe"]["targets"] == [target]
    if recipe == "embarc":  # the ERT task run is left out, the second rest run kept
        assert dm.excluded["runs_filter"] == [f"sub-{info['subjects'][0]}/ses-1_task-ert_run-1"]
        assert dm.store.subject_ids.count(info["subjects"][0]) == 2
    if recipe == "oasis3":  # both sessions of a subject in one split
        first = info["subjects"][0]
        assert dm.store.subject_ids.count(first) == 2 and sum(first in v for v in dm.subject_split.values()) == 1
    if recipe == "abcd":  # NDA keys in the table, BIDS keys in the folders: one id
        assert all(s.startswith("NDARINV") for s in subjects) and dm.labels.values["sex"].tolist() == [
            info["sex"][s] for s in subjects]


# -- the multi-data-set mix ------------------------------------------------------------------------------------
def _multi(tmp_path, *extra: str):
    infos = {"ukb": fx.make_ukb(tmp_path / "ukb", n=4), "hcp": fx.make_hcp(tmp_path / "hcp", n=4),
             "abcd": fx.make_abcd(tmp_path / "abcd", n=4, n_frames=12)}
    over = [o for name, info in infos.items() for o in _data(info, "frames", f"data.datasets.{name}")]
    over = [o for o in over if "batch_size" not in o and "num_workers" not in o]
    cfg = compose("train", [*_quiet(tmp_path), "data=multi", "data.batch_size=2", "data.num_workers=0", *over, *extra])
    return cfg, infos


def test_multi_sampling_weights_offsets_and_resume(tmp_path):
    cfg, infos = _multi(tmp_path, "data.weights={ukb: 3, hcp: 1, abcd: 0}")
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup()
    assert dm.weights == {"ukb": 0.75, "hcp": 0.25, "abcd": 0.0}
    loader = dm.train_dataloader()
    assert len(loader) == sum(len(dm.children[n].train_dataloader()) for n in ("ukb", "hcp"))
    seen = [(int(b["dataset"][0]), tuple(b["subject"].tolist()), tuple(b["onset"].tolist())) for b in loader]
    ds = [d for d, _, _ in seen]
    assert set(ds) <= {0, 1} and ds == loader.choices(0, len(loader)).tolist()
    many = loader.choices(5, 400)
    assert abs((many == 0).mean() - 0.75) < 0.07 and not (many == 2).any()
    offsets = dict(zip(dm.children, dm.offsets))
    for d, subj, _ in seen:  # subject indices are unique across data sets
        n = len(set(dm.children[list(dm.children)[d]].store.subject_ids))
        assert all(offsets[list(dm.children)[d]] <= s < offsets[list(dm.children)[d]] + n for s in subj)
    assert seen == [(int(b["dataset"][0]), tuple(b["subject"].tolist()), tuple(b["onset"].tolist()))
                    for b in dm.train_dataloader()]
    dm.load_state_dict({"train_epoch": 0, "train_batches_done": 3})
    resumed = [(int(b["dataset"][0]), tuple(b["subject"].tolist()), tuple(b["onset"].tolist()))
               for b in dm.train_dataloader()]
    assert resumed == seen[3:]
    proportional = instantiate(_multi(tmp_path / "p")[0].data, _convert_="all")
    proportional.setup()
    clips = {n: len(c.dataset("train")) for n, c in proportional.children.items()}
    assert proportional.weights == pytest.approx({n: c / sum(clips.values()) for n, c in clips.items()})
    assert clips["abcd"] > clips["ukb"]  # 12-TR runs: more clips, a larger share (SwiFT v2's concatenation)


def test_multi_pretraining_step(tmp_path):
    cfg, _ = _multi(tmp_path, *TINY, "task=simmim", "trainer.max_steps=2", "trainer.val_check_interval=2",
                    "trainer.limit_val_batches=3", "experiment_name=multi")
    metrics = train.run(cfg)
    assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["val/loss"])
    saved = OmegaConf.load(Path(cfg.paths.run_dir) / "config.yaml")
    assert list(saved.data.datasets) == ["ukb", "hcp", "abcd"]


def test_multi_refuses_different_grids(tmp_path):
    cfg, _ = _multi(tmp_path, "data.datasets.hcp.window.length=6")
    with pytest.raises(ConfigError, match="data sets of data=multi differ in window_length"):
        instantiate(cfg.data, _convert_="all").setup()


def test_generic_labels_of_an_experiment_preset_become_the_targets(tmp_path):
    info = fx.make_hcp(tmp_path / "hcp")
    table = info["root"] / "metadata" / "HCP_1200_gender.csv"
    cfg = compose("train", [*_quiet(tmp_path), "experiment=swift_v1_sex", "data=hcp", *_data(info, "frames"),
                            f"data.labels.file={table}", "data.labels.id_column=Subject", "data.labels.columns={sex: Gender}"])
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup()
    assert dm.targets == ["sex"] and dm.split_file.name.startswith("rest_seed0_sex_")
    assert dm.labels.values["sex"].tolist() == [info["sex"][s] for s in sorted(info["subjects"])]
    cfg = compose("train", [*_quiet(tmp_path), "experiment=swift_v1_sex", "data=hcp", *_data(info, "frames")])
    with pytest.raises(DataError, match=r"phenotypes.csv does not exist \(data.labels.file\)"):
        instantiate(cfg.data, _convert_="all").setup()
