"""Blockwise re-identification equals the dense reference (ties included); split_by_session."""

from __future__ import annotations

import numpy as np
import pytest

from brainfm.eval.reidentification import (
    _reidentification_blockwise,
    reidentification_dense,
    reidentification,
    split_by_session,
)

BLOCKS = (1, 2, 7, None, 10_000)  # one query per block, a few, the default, more than N


def _tied_embeddings(rng, metric: str, n_subjects: int = 12, dim: int = 16):
    """Embeddings whose similarities are exact in float32 and float64 (multiples of 1/16), so that
    many scores tie exactly: +-1 entries (norm 4) scaled by powers of two; for pearson, rows with
    as many +1 as -1 plus a dyadic offset, so that centring and normalizing are exact too. Unequal
    numbers of gallery items per subject, and gallery subjects without queries."""
    protos = np.array([rng.permutation([1.0, -1.0] * (dim // 2)) for _ in range(n_subjects)])
    g_ids = np.concatenate([np.arange(n_subjects), rng.integers(0, n_subjects, 40)])
    q_ids = rng.integers(0, n_subjects - 2, 30)  # the last two subjects are distractors only

    def windows(ids):
        x = protos[ids].copy()
        for row in x:
            for _ in range(rng.integers(0, 4)):
                i, j = rng.integers(0, dim, 2)
                if metric == "pearson":  # swap two entries: the row stays balanced
                    row[i], row[j] = row[j], row[i]
                else:  # flip one entry
                    row[i] *= -1
        x *= 2.0 ** rng.integers(-2, 3, size=(len(ids), 1))
        if metric == "pearson":
            x += rng.choice([-2.0, 0.0, 0.5, 3.0], size=(len(ids), 1))
        return x

    return windows(g_ids), g_ids, windows(q_ids), q_ids


def _assert_same(dense: dict, block: dict) -> None:
    assert block["rank1"] == dense["rank1"]
    assert block["mAP"] == pytest.approx(dense["mAP"], abs=1e-6)
    assert block["rank1_chance"] == pytest.approx(dense["rank1_chance"], abs=1e-12)
    assert block["mAP_chance"] == pytest.approx(dense["mAP_chance"], abs=1e-12)
    assert (block["n_queries"], block["n_gallery"]) == (dense["n_queries"], dense["n_gallery"])


@pytest.mark.parametrize("metric", ["cosine", "pearson"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blockwise_equals_dense_with_exact_ties(metric, seed):
    g, g_ids, q, q_ids = _tied_embeddings(np.random.default_rng(seed), metric)
    dense = reidentification_dense(g, g_ids, q, q_ids, metric)
    assert 0.0 < dense["mAP"] < 1.0  # neither trivial nor hopeless
    # counting the ranks (the default here: few items per subject) with the top-128 shortcut, a
    # top 3 (most relevant items counted over the whole row), none; and sorting each row
    for kwargs in ({}, {"top": 3}, {"top": 0}, {"count_max_relevant": 0}):
        for block_size in BLOCKS:
            block = _reidentification_blockwise(g, g_ids, q, q_ids, metric, block_size=block_size, **kwargs)
            _assert_same(dense, block)


def test_ties_are_ranked_by_gallery_index():
    # every gallery item scores the same: the stable order puts index 0 first, the relevant one at 3
    gallery, queries = np.ones((4, 3)), np.ones((1, 3))
    for block_size in (1, None):
        r = reidentification(gallery, [1, 1, 1, 0], queries, [0], block_size=block_size)
        assert r["rank1"] == 0.0 and r["mAP"] == pytest.approx(1 / 4)
        r = reidentification(gallery, [0, 1, 1, 0], queries, [0], block_size=block_size)
        assert r["rank1"] == 1.0 and r["mAP"] == pytest.approx((1 + 2 / 4) / 2)


@pytest.mark.parametrize("metric", ["cosine", "pearson"])
def test_blockwise_equals_dense_on_random_embeddings(metric):
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(40, 32))
    g_ids, q_ids = np.repeat(np.arange(40), 5), np.repeat(np.arange(40), 4)
    g = (centres[g_ids] + 1.5 * rng.normal(size=(len(g_ids), 32))).astype(np.float32)
    q = centres[q_ids] + 1.5 * rng.normal(size=(len(q_ids), 32)) + 2.0  # offsets: pearson removes them
    dense = reidentification_dense(g, g_ids, q, q_ids, metric)
    assert 0.05 < dense["rank1"] < 0.95
    for block_size in BLOCKS:
        _assert_same(dense, reidentification(g, g_ids, q, q_ids, metric, block_size=block_size))
        _assert_same(dense, _reidentification_blockwise(g, g_ids, q, q_ids, metric, block_size=block_size, top=8))


def test_many_relevant_items_per_subject_are_ranked_by_sorting():
    # 3 subjects x 100 gallery windows: K > 32 takes the sorting path by default
    rng = np.random.default_rng(4)
    g_ids, q_ids = np.repeat(np.arange(3), 100), np.arange(3).repeat(5)
    g, q = rng.normal(size=(300, 8)), rng.normal(size=(15, 8))
    g[:150:3] = g[0]  # exact ties (duplicated rows)
    dense = reidentification_dense(g, g_ids, q, q_ids)
    for block_size in (1, 4, None):
        _assert_same(dense, reidentification(g, g_ids, q, q_ids, block_size=block_size))


def test_string_subject_ids_and_torch_device():
    torch = pytest.importorskip("torch")
    g, g_ids, q, q_ids = _tied_embeddings(np.random.default_rng(5), "cosine")
    names = np.array([f"sub-{i:03d}" for i in range(20)])
    dense = reidentification_dense(g, g_ids, q, q_ids)
    _assert_same(dense, reidentification(g, names[g_ids], q, names[q_ids], device=torch.device("cpu")))


def test_query_subject_absent_from_gallery_is_an_error():
    g, q = np.eye(3), np.eye(3)
    for fn in (reidentification, reidentification_dense):
        with pytest.raises(ValueError, match=r"query subjects \[7\] \(1 in all\) have no gallery item"):
            fn(g, [0, 1, 2], q, [0, 1, 7])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"metric": "euclidean"}, "metric"),
    ({"block_size": 0}, "block_size"),
    ({"block_size": 2.5}, "block_size"),
    ({"device": "tpu"}, "device"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        reidentification(np.eye(3), [0, 1, 2], np.eye(3), [0, 1, 2], **kwargs)


def test_bad_features_are_named():
    g = np.eye(3)
    with pytest.raises(ValueError, match="gallery has 3 features per window, queries 4"):
        reidentification(g, [0, 1, 2], np.ones((2, 4)), [0, 1])
    with pytest.raises(ValueError, match="differ in length"):
        reidentification(g, [0, 1], g, [0, 1, 2])
    bad = g.copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"queries rows \[1\].*NaN"):
        reidentification(g, [0, 1, 2], bad, [0, 1, 2])
    with pytest.raises(ValueError, match="nothing to match"):
        reidentification(g, [0, 1, 2], np.zeros((0, 3)), [])


def test_split_by_session_hcp_rest1_vs_rest2():
    sessions = np.array(["REST1", "REST1", "REST2", "REST2", "REST1", "REST2", "REST1"])
    subjects = np.array([100, 100, 100, 100, 200, 200, 300])
    g, q = split_by_session(sessions, subjects, gallery="REST1", query="REST2")
    np.testing.assert_array_equal(g, [0, 1, 4, 6])  # subject 300 stays as a distractor
    np.testing.assert_array_equal(q, [2, 3, 5])
    assert g.dtype == np.int64 and q.dtype == np.int64
    # the indices feed reidentification directly
    emb = np.eye(7)[[0, 0, 0, 0, 1, 1, 2]] + 0.01 * np.arange(7)[:, None]
    r = reidentification(emb[g], subjects[g], emb[q], subjects[q])
    assert r["n_gallery"] == 4 and r["n_queries"] == 3 and r["rank1"] == 1.0


def test_split_by_session_several_labels_and_unmatched_subjects():
    sessions = np.array([2, 2, 3, 3, 3, 4])  # UKB instances
    subjects = np.array(["a", "b", "a", "c", "c", "b"])
    with pytest.raises(ValueError, match=r"1 subject\(s\) .* have no window in the gallery sessions \[2\]: \['c'\]"):
        split_by_session(sessions, subjects, gallery=2, query=[3, 4])
    g, q = split_by_session(sessions, subjects, gallery=2, query=[3, 4], drop_unmatched=True)
    np.testing.assert_array_equal(g, [0, 1])
    np.testing.assert_array_equal(q, [2, 5])
    g, q = split_by_session(sessions, subjects, gallery=[2, 3], query=4)
    np.testing.assert_array_equal(g, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(q, [5])


def test_split_by_session_errors():
    sessions, subjects = np.array(["REST1", "REST2"]), np.array([1, 1])
    with pytest.raises(ValueError, match="same length"):
        split_by_session(sessions, [1, 1, 1], gallery="REST1", query="REST2")
    with pytest.raises(ValueError, match="both gallery and query"):
        split_by_session(sessions, subjects, gallery=["REST1", "REST2"], query="REST2")
    with pytest.raises(ValueError, match=r"no window has session \['REST3'\]; the sessions present are \['REST1', 'REST2'\]"):
        split_by_session(sessions, subjects, gallery="REST1", query="REST3")
    with pytest.raises(ValueError, match="no query window left"):
        split_by_session(sessions, [1, 2], gallery="REST1", query="REST2", drop_unmatched=True)
