"""Subject re-identification (fingerprinting) from embeddings.

Each query (a window from one part of a run) is matched to the gallery (windows from another
part) by similarity; Rank-1 is the fraction of queries whose most similar gallery item belongs to
the same subject, and mAP the mean over queries of the average precision of the ranked gallery
(relevant = same subject). Protocol as NeuroSTORM's re-identification (L2-normalised
embeddings, nearest neighbour) and Finn et al. (2015), "Functional connectome fingerprinting",
Nature Neuroscience 18:1664, whose similarity is the Pearson correlation.
"""

from __future__ import annotations

import numpy as np


def _normalise(x: np.ndarray, center: bool) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if center:
        x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def average_precision(relevant_sorted: np.ndarray) -> np.ndarray:
    """AP per row of a boolean ``(n_queries, n_gallery)`` array ordered by decreasing score."""
    hits = np.cumsum(relevant_sorted, axis=1)
    ranks = np.arange(1, relevant_sorted.shape[1] + 1)
    precision_at_hit = np.where(relevant_sorted, hits / ranks, 0.0)
    n_rel = relevant_sorted.sum(axis=1)
    return np.divide(precision_at_hit.sum(axis=1), n_rel, out=np.zeros(len(n_rel)), where=n_rel > 0)


def reidentification(
    gallery: np.ndarray,
    gallery_ids: np.ndarray,
    queries: np.ndarray,
    query_ids: np.ndarray,
    metric: str = "cosine",
) -> dict[str, float]:
    """Rank-1 accuracy and mAP of matching queries to the gallery.

    Args:
        gallery: ``(n_gallery, D)`` features. gallery_ids: ``(n_gallery,)`` subject labels.
        queries: ``(n_queries, D)`` features. query_ids: ``(n_queries,)`` subject labels.
        metric: ``"cosine"`` (L2-normalised dot product) or ``"pearson"`` (rows centred first,
            Finn et al. 2015).

    Returns:
        ``rank1``, ``mAP``, their chance levels (``rank1_chance``: expected Rank-1 of a random
        ranking; ``mAP_chance`` likewise, approximated by the fraction of relevant items),
        ``n_queries``, ``n_gallery``.

    Raises:
        ValueError: unknown metric, mismatched lengths, or a query subject absent from the gallery.
    """
    if metric not in ("cosine", "pearson"):
        raise ValueError(f"metric={metric!r} must be 'cosine' or 'pearson'")
    gallery_ids, query_ids = np.asarray(gallery_ids), np.asarray(query_ids)
    if len(gallery) != len(gallery_ids) or len(queries) != len(query_ids):
        raise ValueError("features and subject ids differ in length")
    missing = sorted(set(query_ids.tolist()) - set(gallery_ids.tolist()))
    if missing:
        raise ValueError(f"query subjects {missing[:5]} have no gallery item")
    center = metric == "pearson"
    sim = _normalise(queries, center) @ _normalise(gallery, center).T
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
