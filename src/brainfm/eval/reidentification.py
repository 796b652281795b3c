"""Subject re-identification (fingerprinting) from embeddings.

Each query (a window from one part of a run, or from another session) is matched to the gallery
(windows from another part or session) by similarity; Rank-1 is the fraction of queries whose most
similar gallery item belongs to the same subject, and mAP the mean over queries of the average
precision of the ranked gallery (relevant = same subject). Protocol as NeuroSTORM's
re-identification (L2-normalized embeddings, nearest neighbour) and Finn et al. (2015),
"Functional connectome fingerprinting", Nature Neuroscience 18:1664, whose similarity is the
Pearson correlation.

:func:`reidentification` works block by block of queries and never holds the
``(n_queries, n_gallery)`` similarity matrix, so it scales to UK Biobank-sized sets of windows
(300,000 windows: a dense float64 matrix would take 180 GB, its argsort as much again);
:func:`reidentification_dense` is the direct reference implementation it is tested against.
:func:`split_by_session` builds the gallery and the queries from per-window session labels.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

import numpy as np
import torch

# Bytes of one (block, n_gallery) float32 similarity block when ``block_size`` is not given; the
# comparison buffer beside it takes as much again.
_BLOCK_BYTES = 256 * 2**20
# Queries whose subject has more gallery items than this are ranked by sorting their row
# (O(M log M)) instead of counting (two passes over the row per relevant item, O(K M)); measured on
# 2 CPU cores, the two cost the same near K = 20 for M = 4,000 and K = 80 for M = 150,000.
_COUNT_MAX_RELEVANT = 32
# Relevant items among the T largest scores of their row are ranked from one torch.topk of the block
# (~2.7 ns per score on a CPU, any T <= 128 costing the same) instead of two passes over the row each.
_TOP = 128
_NORMALIZE_CHUNK = 65_536  # rows normalized at once (in float64) before the float32 cast


def _normalize(x: np.ndarray, center: bool) -> np.ndarray:
    """Rows L2-normalized in float64 (centred first when ``center``); zero rows stay zero."""
    x = np.asarray(x, dtype=np.float64)
    if center:
        x = x - x.mean(axis=1, keepdims=True)
    norm = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    return x / np.maximum(norm, 1e-12)


def average_precision(relevant_sorted: np.ndarray) -> np.ndarray:
    """AP per row of a boolean ``(n_queries, n_gallery)`` array ordered by decreasing score."""
    hits = np.cumsum(relevant_sorted, axis=1)
    ranks = np.arange(1, relevant_sorted.shape[1] + 1)
    precision_at_hit = np.where(relevant_sorted, hits / ranks, 0.0)
    n_rel = relevant_sorted.sum(axis=1)
    return np.divide(precision_at_hit.sum(axis=1), n_rel, out=np.zeros(len(n_rel)), where=n_rel > 0)


def _check_inputs(gallery, gallery_ids, queries, query_ids, metric: str):
    """Arrays of the inputs, or a ValueError naming what is wrong and how to fix it."""
    if metric not in ("cosine", "pearson"):
        raise ValueError(f"metric={metric!r} must be 'cosine' or 'pearson'")
    gallery, queries = np.asarray(gallery), np.asarray(queries)
    gallery_ids, query_ids = np.asarray(gallery_ids), np.asarray(query_ids)
    for name, x in (("gallery", gallery), ("queries", queries)):
        if x.ndim != 2:
            raise ValueError(f"{name} has shape {x.shape}; expected (n_windows, D) features")
        if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
            raise ValueError(f"{name} has dtype {x.dtype}; expected real-valued features")
    for name, ids in (("gallery_ids", gallery_ids), ("query_ids", query_ids)):
        if ids.ndim != 1:
            raise ValueError(f"{name} has shape {ids.shape}; expected one subject label per window")
    if gallery.shape[1] != queries.shape[1]:
        raise ValueError(f"gallery has {gallery.shape[1]} features per window, queries {queries.shape[1]}; "
                         "embed both with the same model")
    if len(gallery) != len(gallery_ids) or len(queries) != len(query_ids):
        raise ValueError(f"features and subject ids differ in length: gallery {len(gallery)} vs "
                         f"{len(gallery_ids)} ids, queries {len(queries)} vs {len(query_ids)} ids")
    if len(queries) == 0 or len(gallery) == 0:
        raise ValueError(f"nothing to match: {len(queries)} queries, {len(gallery)} gallery items")
    for name, x in (("gallery", gallery), ("queries", queries)):
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        if len(bad):
            raise ValueError(f"{name} rows {bad[:5].tolist()} ({len(bad)} in all) hold NaN or inf; "
                             "drop those windows or fix the embedding")
    missing = sorted(set(query_ids.tolist()) - set(gallery_ids.tolist()))
    if missing:
        raise ValueError(f"query subjects {missing[:5]} ({len(missing)} in all) have no gallery item; "
                         "drop their queries or build the split with split_by_session(drop_unmatched=True)")
    return gallery, gallery_ids, queries, query_ids


def reidentification_dense(
    gallery: np.ndarray,
    gallery_ids: np.ndarray,
    queries: np.ndarray,
    query_ids: np.ndarray,
    metric: str = "cosine",
) -> dict[str, float]:
    """Reference implementation: the full float64 ``(n_queries, n_gallery)`` similarity matrix and
    its stable argsort (ties ranked by gallery index). O(n_queries x n_gallery) memory, about
    40 bytes per pair at its peak; for tests and small sets. Same arguments, result and errors as
    :func:`reidentification`."""
    gallery, gallery_ids, queries, query_ids = _check_inputs(gallery, gallery_ids, queries, query_ids, metric)
    center = metric == "pearson"
    sim = _normalize(queries, center) @ _normalize(gallery, center).T
    order = np.argsort(-sim, axis=1, kind="stable")
    relevant = gallery_ids[order] == query_ids[:, None]
    frac = (gallery_ids[None, :] == query_ids[:, None]).mean(axis=1)
    return {
        "rank1": float(relevant[:, 0].mean()),
        "mAP": float(average_precision(relevant).mean()),
        "rank1_chance": float(frac.mean()),
        "mAP_chance": float(frac.mean()),
        "n_queries": int(len(queries)),
        "n_gallery": int(len(gallery)),
    }


def _device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:<index>'") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asked for CUDA, which this torch build or machine lacks; use 'cpu'")
    return dev


def _to_device(x: np.ndarray, center: bool, dev: torch.device) -> torch.Tensor:
    """``(n, D)`` rows normalized in float64, chunk by chunk, then cast to float32 on ``dev``."""
    out = torch.empty(x.shape, dtype=torch.float32, device=dev)
    for a in range(0, len(x), _NORMALIZE_CHUNK):
        chunk = _normalize(x[a:a + _NORMALIZE_CHUNK], center).astype(np.float32)
        out[a:a + len(chunk)] = torch.from_numpy(chunk).to(dev)
    return out


def auto_block_size(n_gallery: int) -> int:
    """Queries per block when ``block_size`` is not given: a 256 MiB float32 similarity block."""
    return max(1, _BLOCK_BYTES // (4 * max(1, int(n_gallery))))


def _count_ranks(S, rel_s, rel_idx, need, buf):
    """Gallery items ranked above each relevant item, counted over the whole row.

    ``S``: ``(B, M)`` similarities; ``rel_s``/``rel_idx``: ``(B, K)`` scores and gallery indices of
    the relevant items; ``need``: ``(B, K)`` bool, the items to count (others are left 0). For each
    k, the rows that need it are counted in place when they are contiguous or more than half of the
    block, else copied into the first half of ``buf`` (``(B, M)`` float32), whose second half takes
    the comparisons. Returns ``(B, K)`` int64.
    """
    B, M = S.shape
    acc = torch.float32 if M < 2**24 else torch.float64  # 0/1 sums are exact integers in float32 below 2^24
    above = torch.zeros(rel_s.shape, dtype=torch.int64, device=S.device)
    arange_m = torch.arange(M, device=S.device)
    for k in range(rel_s.shape[1]):
        rows = torch.nonzero(need[:, k]).squeeze(1)
        R = len(rows)
        if R == 0:
            continue
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        if r1 - r0 == R:  # contiguous rows (all, or those with a k-th relevant item): a view
            Sk, out = S[r0:r1], buf[:R]
        elif 2 * R > B:  # most rows: count all of them, keep those needed
            Sk, out, rows = S, buf[:B], torch.arange(B, device=S.device)
        else:
            Sk, out = torch.index_select(S, 0, rows, out=buf[:R]), buf[R:2 * R]
        sk, jk = rel_s[rows, k:k + 1], rel_idx[rows, k:k + 1]
        greater = torch.gt(Sk, sk, out=out).sum(1, dtype=acc)
        at_least = torch.ge(Sk, sk, out=out).sum(1, dtype=acc)
        count = greater.to(torch.int64)
        # ties: items with the same score and a smaller gallery index rank first (stable argsort)
        tied = torch.nonzero(at_least - greater > 1.5).squeeze(1)
        step = max(1, B // 8)  # rows of tied items scanned at once (a copy of those rows)
        for t0 in range(0, len(tied), step):
            t = tied[t0:t0 + step]
            count[t] += ((Sk[t] == sk[t]) & (arange_m[None, :] < jk[t])).sum(1)
        above[rows, k] = torch.where(need[rows, k], count, 0)
    return above


def _ranks_in_top(v, ix, rel_s, rel_idx):
    """Gallery items ranked above each relevant item, counted among the top T of its row.

    ``v``/``ix``: ``(B, T)`` values and gallery indices of each row's T largest scores. Exact for
    relevant items scoring above the T-th largest score: every item scoring at least as high is then
    among the T. Returns ``(B, K)`` int64.
    """
    B, K = rel_s.shape
    above = torch.empty((B, K), dtype=torch.int64, device=v.device)
    step = max(1, 2**22 // (K * v.shape[1]))  # rows per (rows, K, T) comparison
    for r0 in range(0, B, step):
        vv, ii = v[r0:r0 + step, None, :], ix[r0:r0 + step, None, :]
        sk, jk = rel_s[r0:r0 + step, :, None], rel_idx[r0:r0 + step, :, None]
        above[r0:r0 + step] = ((vv > sk) | ((vv == sk) & (ii < jk))).sum(2)
    return above


def _hits(rel_s, valid):
    """``(B, K)`` relevant items ranked at or above each relevant item (itself included), from the
    K scores of the row; ``k`` order is gallery-index order (rel_idx ascends along k), for ties."""
    B, K = rel_s.shape
    hits = torch.empty((B, K), dtype=torch.int64, device=rel_s.device)
    earlier = torch.arange(K, device=rel_s.device)
    earlier = earlier[None, :] < earlier[:, None]  # (j, i): i < j
    step = max(1, 2**22 // (K * K))
    for r0 in range(0, B, step):
        si, sj = rel_s[r0:r0 + step, None, :], rel_s[r0:r0 + step, :, None]
        first = ((si > sj) | ((si == sj) & earlier)) & valid[r0:r0 + step, None, :]
        hits[r0:r0 + step] = 1 + first.sum(2)
    return hits


def _count_block(S, rel_s, rel_idx, valid, buf, top):
    """Per-query AP (float64) and Rank-1 hits of a block ranked by counting.

    Relevant items scoring above the ``top``-th largest score of their row are ranked within the
    row's top ``top`` (one ``torch.topk`` pass for the block); the others are counted over the whole
    row (:func:`_count_ranks`).
    """
    M = S.shape[1]
    if top > 0:
        v, ix = torch.topk(S, min(top, M), dim=1, sorted=False)
        in_top = rel_s > v.min(1, keepdim=True).values
        above = torch.where(in_top, _ranks_in_top(v, ix, rel_s, rel_idx), 0)
        need = valid & ~in_top
    else:
        above, need = torch.zeros(rel_s.shape, dtype=torch.int64, device=S.device), valid
    rank = 1 + above + _count_ranks(S, rel_s, rel_idx, need, buf)
    hits = _hits(rel_s, valid)
    n_rel = valid.sum(1)
    ap = torch.where(valid, hits.double() / rank.double(), 0.0).sum(1) / n_rel
    rank1 = (valid & (rank == 1)).any(1)
    return ap, rank1


def _sort_block(S, q_code, g_code, n_rel):
    """Per-query AP (float64) and Rank-1 hits of a block ranked by a stable descending sort of
    each row, a few rows at a time (the sort's int64 indices take twice the block's memory)."""
    B, M = S.shape
    ap = torch.empty(B, dtype=torch.float64, device=S.device)
    rank1 = torch.empty(B, dtype=torch.bool, device=S.device)
    step = max(1, B // 8)
    for r0 in range(0, B, step):
        r1 = min(B, r0 + step)
        order = torch.sort(S[r0:r1], dim=1, descending=True, stable=True).indices
        relevant = g_code[order] == q_code[r0:r1, None]
        del order
        rows, pos = torch.nonzero(relevant, as_tuple=True)  # row-major: positions ascend in a row
        starts = torch.cumsum(n_rel[r0:r1], 0) - n_rel[r0:r1]
        hits = torch.arange(len(rows), device=S.device) - starts[rows] + 1
        prec = hits.double() / (pos + 1).double()
        ap[r0:r1] = torch.zeros(r1 - r0, dtype=torch.float64, device=S.device).index_add_(0, rows, prec) / n_rel[r0:r1]
        rank1[r0:r1] = relevant[:, 0]
    return ap, rank1


def _reidentification_blockwise(
    gallery: np.ndarray,
    gallery_ids: np.ndarray,
    queries: np.ndarray,
    query_ids: np.ndarray,
    metric: str = "cosine",
    block_size: int | None = None,
    device: str | torch.device = "cpu",
    count_max_relevant: int = _COUNT_MAX_RELEVANT,
    top: int = _TOP,
) -> dict[str, float]:
    gallery, gallery_ids, queries, query_ids = _check_inputs(gallery, gallery_ids, queries, query_ids, metric)
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer))
                                   or block_size < 1):
        raise ValueError(f"block_size={block_size!r} must be a positive number of queries, or None")
    dev = _device(device)
    center = metric == "pearson"
    n_q, M = len(queries), len(gallery)
    B = min(n_q, int(block_size) if block_size is not None else auto_block_size(M))

    # subjects as codes 0..S-1; gallery indices grouped by subject, ascending within a subject
    subjects, g_code = np.unique(gallery_ids, return_inverse=True)
    g_code = g_code.reshape(-1)
    q_code = np.searchsorted(subjects, query_ids)
    counts = np.bincount(g_code, minlength=len(subjects))
    by_subject = np.argsort(g_code, kind="stable")
    starts = np.cumsum(counts) - counts
    n_rel_all = counts[q_code]
    perm = np.argsort(n_rel_all, kind="stable")  # blocks of queries with similar numbers of relevant items

    G = _to_device(gallery, center, dev)  # (M, D) float32
    g_code_t = torch.from_numpy(g_code.astype(np.int64)).to(dev)
    S_buf = torch.empty(B, M, dtype=torch.float32, device=dev)
    cmp_buf = None
    ap_sum, hits1 = 0.0, 0
    for a in range(0, n_q, B):
        idx = perm[a:a + B]
        b = len(idx)
        S = torch.mm(_to_device(queries[idx], center, dev), G.T, out=S_buf[:b])
        n_rel = n_rel_all[idx]
        K = int(n_rel.max())
        if K <= count_max_relevant:
            if cmp_buf is None:
                cmp_buf = torch.empty(B, M, dtype=torch.float32, device=dev)
            offs = starts[q_code[idx]][:, None] + np.arange(K)[None, :]
            valid = np.arange(K)[None, :] < n_rel[:, None]
            rel_idx = torch.from_numpy(by_subject[np.where(valid, offs, offs[:, :1])]).to(dev)
            rel_s = S.gather(1, rel_idx)
            ap, rank1 = _count_block(S, rel_s, rel_idx, torch.from_numpy(valid).to(dev), cmp_buf, top)
        else:
            q_code_t = torch.from_numpy(q_code[idx].astype(np.int64)).to(dev)
            ap, rank1 = _sort_block(S, q_code_t, g_code_t, torch.from_numpy(n_rel).to(dev))
        ap_sum += float(ap.sum())
        hits1 += int(rank1.sum())
    chance = float(n_rel_all.sum() / (n_q * M))
    return {
        "rank1": hits1 / n_q,
        "mAP": ap_sum / n_q,
        "rank1_chance": chance,
        "mAP_chance": chance,
        "n_queries": int(n_q),
        "n_gallery": int(M),
    }


def reidentification(
    gallery: np.ndarray,
    gallery_ids: np.ndarray,
    queries: np.ndarray,
    query_ids: np.ndarray,
    metric: str = "cosine",
    *,
    block_size: int | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Rank-1 accuracy and mAP of matching queries to the gallery, block by block of queries.

    Design (peak memory O(block_size x n_gallery) float32, never the full N x M matrix): the gallery
    is L2-normalized once (float64, then cast to float32 on ``device``). For each block of
    ``block_size`` queries, ``S = queries_block @ gallery.T`` is one torch matmul in float32, a
    ``(block_size, M)`` block (a gallery row of 300,000 items is 1.2 MB, so the gallery is not
    split). Ranks are then exact without sorting the rows: the rank of a relevant item j of query q
    (a gallery item of q's subject; K of them) is
    ``1 + #{k: S[q, k] > S[q, j]} + #{k < j: S[q, k] == S[q, j]}``, the order of a stable argsort
    of ``-S`` (ties ranked by gallery index), and the relevant items ranked at or above j follow
    from the K x K comparisons of the relevant scores, so that
    ``AP(q) = mean_j (#relevant ranked at or above j / rank_j)`` is exactly the dense average
    precision; Rank-1 is a hit when a relevant item has rank 1 (the row's top-1). The counts come
    from, per block:

    1. one ``torch.topk`` of the 128 largest scores of each row: a relevant item scoring above the
       128th largest score is ranked within those 128 (every item scoring as high is among them);
    2. for the other relevant items (further down the ranking), one ``>`` comparison pass over the
       row, one ``>=`` pass that finds the rows where another item ties with j, and, for those rows
       only, a scan for the tied items of smaller index.

    A good embedding puts most relevant items in the top 128, so the cost is the matmul plus one
    top-k pass; at worst two passes per relevant item, O(K M) per query. Queries whose subject has
    more than 32 gallery items are ranked instead by a stable descending ``torch.sort`` of their
    row (O(M log M)), a few rows at a time. Queries are processed in order of their number of
    relevant items, so that a block is homogeneous; the means do not depend on the order.

    Memory: the normalized gallery (``M x D x 4`` bytes), the similarity block and a comparison
    buffer (``2 x block_size x M x 4`` bytes; 512 MiB with the default ``block_size``), plus
    O(block_size x (K + D + 128)), and an eighth of a block for the rows where exact ties are
    scanned. Time: O(n_queries x M x D) for the matmul, which dominates
    for D = 288, plus the counting above.

    Similarities are float32 (the dense reference is float64), so near-ties closer than ~1e-7 may
    rank differently from it; exact ties are handled identically. On CUDA, a caller who enabled
    TF32 matmuls (``torch.backends.cuda.matmul.allow_tf32`` or
    ``torch.set_float32_matmul_precision("high")``) gets TF32 similarities.

    Args:
        gallery: ``(n_gallery, D)`` features. gallery_ids: ``(n_gallery,)`` subject labels.
        queries: ``(n_queries, D)`` features. query_ids: ``(n_queries,)`` subject labels.
        metric: ``"cosine"`` (L2-normalized dot product) or ``"pearson"`` (rows centred first,
            Finn et al. 2015).
        block_size: queries per block; ``None`` picks a 256 MiB similarity block
            (``auto_block_size(n_gallery)``: 447 queries against 150,000 gallery items).
        device: where the blocks are computed: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a
            ``torch.device``; choosing CUDA when available is the caller's decision.

    Returns:
        ``rank1``, ``mAP``, their chance levels (``rank1_chance``: expected Rank-1 of a random
        ranking; ``mAP_chance`` likewise, approximated by the fraction of relevant items),
        ``n_queries``, ``n_gallery``.

    Raises:
        ValueError: unknown metric, features that are not ``(n, D)`` with the same D, mismatched
            lengths, no queries or no gallery, NaN/inf features, a query subject absent from the
            gallery, a non-positive ``block_size``, or an unknown or unavailable ``device``.
    """
    return _reidentification_blockwise(gallery, gallery_ids, queries, query_ids, metric,
                                       block_size=block_size, device=device)


def _labels(x) -> list:
    if isinstance(x, (str, bytes)) or np.ndim(x) == 0:
        return [x]
    return list(x)


def split_by_session(
    sessions: Iterable[Hashable] | np.ndarray,
    subject_ids: Iterable[Hashable] | np.ndarray,
    *,
    gallery,
    query,
    drop_unmatched: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Gallery and query windows from the session (or run) each window comes from.

    For data sets with several sessions or runs per subject: HCP ``gallery="REST1", query="REST2"``;
    UK Biobank instances ``gallery=2, query=3``; ABCD ``gallery=["rest-1", "rest-2"],
    query=["rest-3", "rest-4"]``. Matching windows of another session is the test-retest protocol of
    Finn et al. (2015), Nature Neuroscience 18:1664 (day 1 vs day 2 of HCP). Subjects with gallery
    windows but no query windows stay in the gallery (as distractors).

    Args:
        sessions: ``(N,)`` session or run label of each window (strings or integers).
        subject_ids: ``(N,)`` subject label of each window.
        gallery: a label, or a list of labels, whose windows form the gallery.
        query: a label, or a list of labels, whose windows form the queries; none may also be a
            gallery label.
        drop_unmatched: leave out the queries of subjects that have no gallery window instead of
            raising (e.g. UKB subjects scanned only at the second instance).

    Returns:
        ``(gallery_index, query_index)``: ascending int64 indices into the N windows, to pass as
        ``reidentification(emb[gallery_index], subject_ids[gallery_index], emb[query_index],
        subject_ids[query_index])``.

    Raises:
        ValueError: ``sessions`` and ``subject_ids`` differ in length; a label is both gallery and
            query; a label matches no window (the labels present are listed); query subjects have no
            gallery window (listed, unless ``drop_unmatched``); no query is left.
    """
    sessions, subject_ids = np.asarray(sessions), np.asarray(subject_ids)
    if sessions.ndim != 1 or subject_ids.ndim != 1 or len(sessions) != len(subject_ids):
        raise ValueError(f"sessions {sessions.shape} and subject_ids {subject_ids.shape} must be one label "
                         "per window, of the same length")
    g_labels, q_labels = _labels(gallery), _labels(query)
    if not g_labels or not q_labels:
        raise ValueError(f"gallery={gallery!r} and query={query!r} must each name at least one session")
    both = [x for x in q_labels if x in g_labels]
    if both:
        raise ValueError(f"sessions {both} are both gallery and query; a window may be only one of them")
    present = set(sessions.tolist())
    absent = [x for x in g_labels + q_labels if x not in present]
    if absent:
        shown = sorted(present, key=str)
        raise ValueError(f"no window has session {absent}; the sessions present are {shown[:20]}"
                         f"{' ...' if len(shown) > 20 else ''}")
    in_gallery = np.isin(sessions, np.asarray(g_labels))
    in_query = np.isin(sessions, np.asarray(q_labels))
    gallery_subjects = set(subject_ids[in_gallery].tolist())
    unmatched = sorted({s for s in subject_ids[in_query].tolist() if s not in gallery_subjects}, key=str)
    if unmatched:
        if not drop_unmatched:
            raise ValueError(f"{len(unmatched)} subject(s) with query windows in {q_labels} have no window in "
                             f"the gallery sessions {g_labels}: {unmatched[:5]}; pass drop_unmatched=True "
                             "to leave their queries out, or choose sessions every subject has")
        in_query &= ~np.isin(subject_ids, np.asarray(unmatched))
    query_index = np.flatnonzero(in_query)
    if len(query_index) == 0:
        raise ValueError(f"no query window left: no subject of sessions {q_labels} has a window in {g_labels}")
    return np.flatnonzero(in_gallery), query_index
