"""Clustering features and documents (pure functions; no Dagster).

Features (`feature_clusters`): groups of features that write the same direction (decoder cosine) or
fire in the same documents (co-activation: Jaccard of the sets of documents they fire in, or the phi
correlation of those firing indicators). Each similarity gets its own grouping: average-linkage
agglomerative clustering on the distance 1 - max(similarity, 0), cut where the average similarity
between two groups falls below `min_similarity` (or into `n_clusters` groups). Deterministic: the
same input gives the same groups. Each group is named by its most central members' labels.

Documents (`document_clusters`): documents clustered on a chosen set of features (a list; select them
by label with `features_matching`, by a metadata criterion with `criterion_features`, or a diff's
report features with `analysis.reports.top_features`). A document's row is its pooled value of each
chosen feature (`aggregation`, default max) through log1p, weighted by the feature's inverse document
frequency (log((1 + n) / (1 + df)): a feature in every document weighs nothing) and scaled to unit
length; rows are clustered by cosine with spherical k-means (k-means++ seeding, `n_init` seeded
restarts, the best total similarity kept). Documents where none of the chosen features fires have no
row and no cluster. Each cluster gets its distinguishing features: those whose firing rate (share of
the cluster's documents where the feature fires) exceeds the rate in the other clustered documents
most, with both rates, and a name from their labels. Everything but the feature values is label-blind.

`adjusted_rand_index` compares two clusterings of the same items (e.g. clusters against a metadata
column): 1 for identical partitions, about 0 for independent ones.

scipy is imported inside the functions that use it, so importing this module stays light.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from interp_assets.analysis.diffing import (
    AGGREGATIONS,
    FrameLike,
    as_lazy,
    pooled_value_columns,
    pooled_value_expr,
)

SIMILARITIES = ("decoder", "coactivation")
COACTIVATION_MEASURES = ("jaccard", "correlation")
NAME_LABELS = 3  # labels joined into a cluster's name

FEATURE_CLUSTERS_SCHEMA: dict[str, pl.DataType] = {
    "by": pl.String(),
    "cluster": pl.Int32(),
    "size": pl.Int32(),
    "name": pl.String(),
    "feature": pl.Int32(),
    "label": pl.String(),
    "centrality": pl.Float64(),
    "documents": pl.Int64(),
}
"""Columns of `feature_clusters`: one row per (similarity, feature)."""

DOCUMENT_CLUSTERS_SCHEMA: dict[str, pl.DataType] = {
    "doc_id": pl.Int32(),
    "cluster": pl.Int32(),
    "similarity": pl.Float64(),
}
CLUSTER_SUMMARY_SCHEMA: dict[str, pl.DataType] = {
    "cluster": pl.Int32(),
    "size": pl.Int64(),
    "share": pl.Float64(),
    "name": pl.String(),
    "mean_similarity": pl.Float64(),
    "top_features": pl.List(pl.Int32()),
}
CLUSTER_FEATURES_SCHEMA: dict[str, pl.DataType] = {
    "cluster": pl.Int32(),
    "rank": pl.Int32(),
    "feature": pl.Int32(),
    "label": pl.String(),
    "docs_in": pl.Int64(),
    "rate_in": pl.Float64(),
    "rate_out": pl.Float64(),
    "rate_diff": pl.Float64(),
    "log2_ratio": pl.Float64(),
}


# --------------------------------------------------------------------------- shared helpers


def _label_map(labels: pl.DataFrame | None) -> dict[int, str]:
    """feature -> label (the first non-empty one per feature) from a feature_labels-like frame."""
    if labels is None or labels.height == 0:
        return {}
    missing = [c for c in ("feature", "label") if c not in labels.columns]
    if missing:
        raise ValueError(
            f"labels is missing column(s) {missing}; it has {labels.columns}. Pass the feature_labels table."
        )
    rows = labels.select(pl.col("feature").cast(pl.Int64), pl.col("label").cast(pl.String)).filter(
        pl.col("label").is_not_null() & (pl.col("label").str.strip_chars() != "")
    )
    out: dict[int, str] = {}
    for feature, label in rows.iter_rows():
        out.setdefault(int(feature), label)
    return out


def _name(features: Sequence[int], labels: dict[int, str]) -> str | None:
    """The first NAME_LABELS distinct labels among `features` (in order), joined; None without labels."""
    names: list[str] = []
    for f in features:
        label = labels.get(int(f))
        if label and label not in names:
            names.append(label)
        if len(names) == NAME_LABELS:
            break
    return " / ".join(names) if names else None


def _check_feature_ids(features: Sequence[int], n_features: int | None, what: str) -> np.ndarray:
    """Feature ids as a sorted unique int64 array; errors for non-integers and ids outside the SAE."""
    arr = np.asarray(list(features))
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{what}: features must be integer feature ids; got {arr.dtype} values.")
    arr = np.unique(arr.astype(np.int64))
    if arr.size == 0:
        raise ValueError(
            f"{what}: the feature selection is empty. Pass feature ids, or a label query / criterion that "
            "matches at least one feature."
        )
    bad = arr[(arr < 0) | ((arr >= n_features) if n_features is not None else False)]
    if bad.size:
        width = f"0..{n_features - 1}" if n_features is not None else "ids >= 0"
        raise ValueError(
            f"{what}: unknown feature(s) {bad[:10].tolist()}: this SAE's features are {width}. "
            "Pick features from the SAE the table was made with."
        )
    return arr


def _unit_rows(x: Any) -> Any:
    """Rows of a dense array or scipy sparse matrix scaled to unit length (zero rows stay zero), float64."""
    from scipy import sparse

    if sparse.issparse(x):
        x = sparse.csr_matrix(x, dtype=np.float64)
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
        return sparse.diags(1.0 / np.where(norms > 0, norms, 1.0)) @ x
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


# --------------------------------------------------------------------------- feature clusters


def _binary_matrix(pooled: FrameLike, what: str) -> tuple[Any, np.ndarray]:
    """(documents x features binary CSR over the features seen, the feature id of each column)."""
    from scipy import sparse

    lf = as_lazy(pooled, what, ["doc_id", "feature", "max_activation"])
    rows = (
        lf.filter(pl.col("max_activation") > 0)
        .select(pl.col("doc_id").cast(pl.Int64), pl.col("feature").cast(pl.Int64))
        .unique()
        .collect()
    )
    docs, doc_pos = np.unique(rows["doc_id"].to_numpy(), return_inverse=True)
    feats, feat_pos = np.unique(rows["feature"].to_numpy(), return_inverse=True)
    mat = sparse.csr_matrix(
        (np.ones(rows.height, dtype=np.float64), (doc_pos, feat_pos)), shape=(docs.size, feats.size)
    )
    return mat, feats


def coactivation_similarity(fired: Any, measure: str = "jaccard", n_docs: int | None = None) -> np.ndarray:
    """Feature x feature similarity of firing: `fired` is a documents x features 0/1 matrix (dense or
    sparse). `jaccard`: shared documents / documents where either fires; `correlation`: the phi
    coefficient (Pearson of the indicators) over `n_docs` documents (default: the matrix's rows; pass the
    dataset's document count when silent documents are not rows). A feature that never fires gets 0."""
    from scipy import sparse

    if measure not in COACTIVATION_MEASURES:
        raise ValueError(
            f"Unknown co-activation measure {measure!r}; use one of {list(COACTIVATION_MEASURES)}."
        )
    b = sparse.csr_matrix(fired, dtype=np.float64)
    inter = (b.T @ b).toarray()
    counts = np.diag(inter).copy()
    if measure == "jaccard":
        union = counts[:, None] + counts[None, :] - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            sim = np.where(union > 0, inter / union, 0.0)
    else:
        n = b.shape[0] if n_docs is None else int(n_docs)
        if n < b.shape[0]:
            raise ValueError(f"n_docs={n} is smaller than the {b.shape[0]} documents of the matrix.")
        p = counts / max(n, 1)
        cov = inter / max(n, 1) - np.outer(p, p)
        sd = np.sqrt(p * (1 - p))
        with np.errstate(divide="ignore", invalid="ignore"):
            sim = np.where(np.outer(sd, sd) > 0, cov / np.outer(sd, sd), 0.0)
    return np.clip(sim, -1.0, 1.0)


def decoder_similarity(decoder: np.ndarray) -> np.ndarray:
    """Cosine of every pair of decoder rows (`(n_features, d_in)`); a zero row gets 0 with everything."""
    d = np.asarray(decoder, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"decoder must be a (d_sae, d_in) matrix (e.g. sae.W_dec); got shape {d.shape}.")
    unit = _unit_rows(d)
    return np.clip(unit @ unit.T, -1.0, 1.0)


def agglomerate(
    similarity: np.ndarray, *, min_similarity: float = 0.5, n_clusters: int | None = None
) -> np.ndarray:
    """Average-linkage agglomerative clustering of items with pairwise `similarity` (symmetric, 1 on
    the diagonal; negatives count as 0). Cut at distance 1 - `min_similarity` (two groups merge while their
    mean similarity is at least that), or into `n_clusters` groups when given. Returns a cluster per
    item: 0 is the largest group, ties by the smallest member."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    sim = np.asarray(similarity, dtype=np.float64)
    n = sim.shape[0]
    if sim.shape != (n, n):
        raise ValueError(f"similarity must be a square matrix; got shape {sim.shape}.")
    if n_clusters is not None and not 1 <= n_clusters <= max(n, 1):
        raise ValueError(f"n_clusters={n_clusters} is out of range: there are {n} features (1..{n}).")
    if not 0.0 <= min_similarity <= 1.0:
        raise ValueError(f"min_similarity must be within 0..1; got {min_similarity}.")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    dist = 1.0 - np.clip((sim + sim.T) / 2, 0.0, 1.0)
    np.fill_diagonal(dist, 0.0)
    tree = linkage(squareform(dist, checks=False), method="average")
    if n_clusters is not None:
        raw = fcluster(tree, t=n_clusters, criterion="maxclust")
    else:
        # merges at distance <= 1 - min_similarity (a hair of slack for rounding in the linkage)
        raw = fcluster(tree, t=1.0 - min_similarity + 1e-9, criterion="distance")
    return _renumber(raw)


def _renumber(raw: np.ndarray) -> np.ndarray:
    """Cluster ids 0.. by size (largest first), ties by the first item; -1 entries stay -1."""
    raw = np.asarray(raw)
    out = np.full(raw.shape, -1, dtype=np.int64)
    keep = raw >= 0
    ids, first, counts = np.unique(raw[keep], return_index=True, return_counts=True)
    order = np.lexsort((np.flatnonzero(keep)[first], -counts))
    mapping = np.empty(ids.size, dtype=np.int64)
    mapping[order] = np.arange(ids.size)
    out[keep] = mapping[np.searchsorted(ids, raw[keep])]
    return out


def feature_clusters(
    pooled: FrameLike | None = None,
    *,
    decoder: np.ndarray | None = None,
    features: Sequence[int] | None = None,
    labels: pl.DataFrame | None = None,
    by: Sequence[str] | None = None,
    coactivation: str = "jaccard",
    n_docs: int | None = None,
    min_similarity: float = 0.5,
    n_clusters: int | None = None,
    min_documents: int = 5,
    max_doc_frequency: float = 0.5,
    max_features: int = 5000,
    n_features: int | None = None,
) -> pl.DataFrame:
    """Group features by decoder cosine and/or co-activation over documents (module docstring).

    `pooled`: pooled_embeddings rows (doc_id, feature, max_activation) of the documents for the
    co-activation grouping; `decoder`: the SAE's `(d_sae, d_in)` decoder (e.g. `sae.W_dec`) for the
    decoder grouping. `by` picks among "decoder" and "coactivation" (default: each one whose input is
    given); `coactivation`: "jaccard" or "correlation" (phi over `n_docs` documents). `features`: which
    features (default: those firing in at least `min_documents` documents and in at most
    `max_doc_frequency` of the `n_docs` documents, as `feature_stats.keep_features` picks them: features
    that fire nearly everywhere would make one big group; every decoder row without `pooled`); at most
    `max_features` (the similarity matrix grows with its square). `labels`
    (feature_labels) name each group by its most central labeled members.

    Returns one row per (by, feature) (`FEATURE_CLUSTERS_SCHEMA`): cluster (0 = largest), size, name,
    label, centrality (mean similarity to the other members; null for a group of one) and documents
    (where the feature fires; null without `pooled`), largest groups first.
    """
    given = [s for s, x in (("decoder", decoder), ("coactivation", pooled)) if x is not None]
    wanted = list(given if by is None else ([by] if isinstance(by, str) else by))
    unknown = [s for s in wanted if s not in SIMILARITIES]
    if unknown:
        raise ValueError(f"Unknown similarity {unknown}; `by` takes {list(SIMILARITIES)}.")
    lacking = [s for s in wanted if s not in given]
    if lacking or not wanted:
        raise ValueError(
            f"feature_clusters by {wanted or 'nothing'}: pass `decoder` (the SAE's W_dec) for 'decoder' and "
            f"`pooled` (pooled_embeddings) for 'coactivation'; missing input for {lacking or wanted}."
        )
    if decoder is not None:
        decoder = np.asarray(decoder, dtype=np.float64)
        if decoder.ndim != 2:
            raise ValueError(f"decoder must be a (d_sae, d_in) matrix (e.g. sae.W_dec); got {decoder.shape}.")
        if n_features is None:
            n_features = decoder.shape[0]
        elif decoder.shape[0] != n_features:
            raise ValueError(f"decoder has {decoder.shape[0]} rows but n_features={n_features}.")

    fired, seen, doc_counts = None, np.zeros(0, dtype=np.int64), {}
    if pooled is not None:
        fired, seen = _binary_matrix(pooled, "pooled")
        if seen.size == 0:
            raise ValueError(
                "feature_clusters: no feature fires in pooled; nothing to group by co-activation."
            )
        counts = np.asarray(fired.sum(axis=0)).ravel().astype(np.int64)
        doc_counts = dict(zip(seen.tolist(), counts.tolist(), strict=True))
        if n_features is not None and seen.size and seen.max() >= n_features:
            raise ValueError(
                f"pooled has feature {int(seen.max())} but the SAE has {n_features} features: "
                "pass the decoder of the SAE that made pooled_embeddings."
            )
    if features is not None:
        chosen = _check_feature_ids(features, n_features, "feature_clusters")
    elif pooled is not None:
        if not 0 < max_doc_frequency <= 1:
            raise ValueError(f"max_doc_frequency must be in (0, 1]; got {max_doc_frequency}.")
        most = max_doc_frequency * (fired.shape[0] if n_docs is None else n_docs)
        chosen = np.array(
            [f for f in seen.tolist() if min_documents <= doc_counts[f] <= most], dtype=np.int64
        )
        if chosen.size == 0:
            raise ValueError(
                f"feature_clusters: no feature fires in at least min_documents={min_documents} documents and "
                f"at most max_doc_frequency={max_doc_frequency} of them ({seen.size} features fire at all); "
                "change those limits or pass features=."
            )
    else:
        chosen = np.arange(int(n_features or 0), dtype=np.int64)
    if chosen.size > max_features:
        raise ValueError(
            f"feature_clusters: {chosen.size} features to cluster, over max_features={max_features} (memory "
            "grows with its square). Pass features= (e.g. analysis.feature_stats.keep_features, a label "
            "query) or raise max_features."
        )

    label_of = _label_map(labels)
    parts = []
    for kind in wanted:
        if kind == "decoder":
            sim = decoder_similarity(decoder[chosen])
        else:
            from scipy import sparse

            cols = np.searchsorted(seen, chosen)
            present = np.flatnonzero(
                (cols < seen.size) & (seen[np.minimum(cols, max(seen.size - 1, 0))] == chosen)
            )
            pick = sparse.csr_matrix(
                (np.ones(present.size), (cols[present], present)), shape=(seen.size, chosen.size)
            )
            sub = fired @ pick  # the chosen features' columns, in the order of `chosen` (silent ones empty)
            sim = coactivation_similarity(sub, coactivation, n_docs)
            np.fill_diagonal(sim, 1.0)
        cluster = agglomerate(sim, min_similarity=min_similarity, n_clusters=n_clusters)
        parts.append(
            _feature_cluster_rows(kind, chosen, cluster, sim, label_of, doc_counts, pooled is not None)
        )
    return pl.concat(parts) if parts else pl.DataFrame(schema=FEATURE_CLUSTERS_SCHEMA)


def _feature_cluster_rows(
    kind: str,
    chosen: np.ndarray,
    cluster: np.ndarray,
    sim: np.ndarray,
    label_of: dict[int, str],
    doc_counts: dict[int, int],
    with_docs: bool,
) -> pl.DataFrame:
    """One row per feature of one grouping, members of each cluster by centrality (most central first)."""
    sizes = np.bincount(cluster, minlength=int(cluster.max()) + 1 if cluster.size else 0)
    same = cluster[:, None] == cluster[None, :]
    clipped = np.clip(sim, 0.0, 1.0)
    total = np.where(same, clipped, 0.0).sum(axis=1) - np.diag(clipped)
    others = sizes[cluster] - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        centrality = np.where(others > 0, total / np.maximum(others, 1), np.nan)
    frame = pl.DataFrame(
        {
            "cluster": cluster.astype(np.int32),
            "feature": chosen.astype(np.int32),
            "centrality": pl.Series(centrality).fill_nan(None),
        }
    ).sort(["cluster", "centrality", "feature"], descending=[False, True, False], nulls_last=True)
    names = {
        int(c): _name(group["feature"].to_list(), label_of)
        for (c,), group in frame.group_by("cluster", maintain_order=True)
    }
    feats = frame["feature"].to_list()
    return pl.DataFrame(
        {
            "by": [kind] * frame.height,
            "cluster": frame["cluster"],
            "size": sizes[frame["cluster"].to_numpy()].astype(np.int32),
            "name": [names[int(c)] for c in frame["cluster"].to_list()],
            "feature": frame["feature"],
            "label": [label_of.get(int(f)) for f in feats],
            "centrality": frame["centrality"],
            "documents": [doc_counts.get(int(f), 0) for f in feats] if with_docs else [None] * len(feats),
        },
        schema=FEATURE_CLUSTERS_SCHEMA,
    )


# --------------------------------------------------------------------------- feature selection


def features_matching(labels: pl.DataFrame | None, query: str, *, descriptions: bool = True) -> list[int]:
    """Features whose label (or, with `descriptions`, description) contains `query`, case-insensitive."""
    if not query or not query.strip():
        raise ValueError("features_matching: the label query is empty; pass a word or phrase to look for.")
    if labels is None or labels.height == 0:
        raise ValueError(
            f"No feature labels to search for {query!r}: materialize feature_labels for this dataset first "
            "(or pass the features as a list)."
        )
    if "feature" not in labels.columns or "label" not in labels.columns:
        raise ValueError(f"labels needs feature and label columns; it has {labels.columns}.")
    needle = query.strip().lower()
    hit = (
        pl.col("label").cast(pl.String).str.to_lowercase().str.contains(needle, literal=True).fill_null(False)
    )
    if descriptions and "description" in labels.columns:
        hit = hit | pl.col("description").cast(pl.String).str.to_lowercase().str.contains(
            needle, literal=True
        ).fill_null(False)
    found = sorted({int(f) for f in labels.filter(hit)["feature"].to_list()})
    if not found:
        examples = labels["label"].drop_nulls().unique(maintain_order=True).head(8).to_list()
        raise ValueError(
            f"No feature label contains {query!r} ({labels.height} labels searched, e.g. {examples}). "
            "Try another word, or pass the features as a list."
        )
    return found


def criterion_features(
    associations: pl.DataFrame, criterion: str, *, n: int = 20, significant_only: bool = True
) -> list[int]:
    """The top `n` features of one criterion of a feature_associations table (either direction): by
    q-value, then by the size of the effect (|AUC - 0.5| or |rho|), then feature id."""
    need = ["criterion", "feature", "statistic", "effect", "q_value", "significant"]
    missing = [c for c in need if c not in associations.columns]
    if missing:
        raise ValueError(
            f"criterion_features needs the feature_associations table; missing column(s) {missing}."
        )
    rows = associations.filter(pl.col("criterion") == criterion)
    if rows.height == 0:
        known = sorted(associations["criterion"].unique().to_list())
        raise ValueError(
            f"No criterion {criterion!r} in feature_associations; its criteria are {known[:20]}. Pick one "
            "of them (a level of a text column is written column=level)."
        )
    if significant_only:
        rows = rows.filter(pl.col("significant"))
        if rows.height == 0:
            raise ValueError(
                f"No feature is significantly associated with {criterion!r}; set significant_only to False "
                "for the strongest ones anyway, or list the features."
            )
    size = (
        pl.when(pl.col("statistic") == "auc")
        .then((pl.col("effect") - 0.5).abs())
        .otherwise(pl.col("effect").abs())
    )
    top = rows.with_columns(size.alias("_size")).sort(
        ["q_value", "_size", "feature"], descending=[False, True, False], nulls_last=True
    )
    return [int(f) for f in top["feature"].head(n).to_list()]


# --------------------------------------------------------------------------- spherical k-means


def _distinct_rows(x: Any) -> int:
    """Number of distinct rows of a dense array or CSR matrix (exact, by content)."""
    from scipy import sparse

    if sparse.issparse(x):
        x = sparse.csr_matrix(x)
        x.sort_indices()
        seen = set()
        for i in range(x.shape[0]):
            lo, hi = x.indptr[i], x.indptr[i + 1]
            seen.add((x.indices[lo:hi].tobytes(), x.data[lo:hi].tobytes()))
        return len(seen)
    return int(np.unique(np.asarray(x), axis=0).shape[0]) if x.shape[0] else 0


def _dot(x: Any, centers: np.ndarray) -> np.ndarray:
    """x @ centers.T as a dense (n, k) array."""
    out = x @ centers.T
    return np.asarray(out)


def _seed_centers(x: Any, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding on unit rows (squared distance 2 - 2 cos)."""
    n = x.shape[0]
    rows = [int(rng.integers(n))]
    best = _dot(x, _row(x, rows[0])[None, :]).ravel()
    for _ in range(1, k):
        d2 = np.maximum(2.0 - 2.0 * best, 0.0)
        d2[rows] = 0.0
        total = d2.sum()
        nxt = int(rng.choice(n, p=d2 / total)) if total > 0 else int(np.setdiff1d(np.arange(n), rows)[0])
        rows.append(nxt)
        best = np.maximum(best, _dot(x, _row(x, nxt)[None, :]).ravel())
    return np.vstack([_row(x, r) for r in rows])


def _row(x: Any, i: int) -> np.ndarray:
    from scipy import sparse

    return np.asarray(x[i].toarray()).ravel() if sparse.issparse(x) else np.asarray(x[i], dtype=np.float64)


def _centroids(x: Any, assign: np.ndarray, k: int) -> np.ndarray:
    """Unit-length mean direction of each cluster's rows (zero for an empty cluster)."""
    from scipy import sparse

    n = x.shape[0]
    member = sparse.csr_matrix((np.ones(n), (assign, np.arange(n))), shape=(k, n))
    sums = np.asarray((member @ x).toarray() if sparse.issparse(x) else member @ x)
    return _unit_rows(sums)


def spherical_kmeans(
    x: Any, n_clusters: int, *, seed: int = 0, n_init: int = 10, max_iter: int = 100
) -> tuple[np.ndarray, np.ndarray, float]:
    """Cluster the rows of `x` (dense or scipy sparse; no all-zero rows) by cosine: rows scaled to unit
    length, each assigned to the centroid direction it is most similar to, centroids the normalized mean of
    their rows, until no assignment changes (or `max_iter`). k-means++ seeding; of `n_init` seeded runs the
    one with the highest total similarity is kept; an emptied cluster is re-seeded with the row least
    similar to its centroid. Returns (cluster per row, 0 = largest; centroids (k, d); total similarity)."""
    x = _unit_rows(x)
    n = x.shape[0]
    zero = np.flatnonzero(np.asarray(abs(x).sum(axis=1)).ravel() == 0)
    if zero.size:
        raise ValueError(
            f"spherical_kmeans: row(s) {zero[:10].tolist()} are all zeros and have no direction; drop them."
        )
    if not 2 <= n_clusters <= n:
        raise ValueError(f"n_clusters={n_clusters} is out of range: {n} rows to cluster (2..{n}).")
    if n_init < 1 or max_iter < 1:
        raise ValueError(f"n_init and max_iter must be >= 1; got {n_init}, {max_iter}.")
    rng = np.random.default_rng(seed)
    best: tuple[np.ndarray, np.ndarray, float] | None = None
    for _ in range(n_init):
        centers = _seed_centers(x, n_clusters, rng)
        assign = np.full(n, -1, dtype=np.int64)
        for _ in range(max_iter):
            sims = _dot(x, centers)
            new = np.argmax(sims, axis=1)
            _fill_empty(new, sims, n_clusters)
            if np.array_equal(new, assign):
                break
            assign = new
            centers = _centroids(x, assign, n_clusters)
        score = float(_dot(x, centers)[np.arange(n), assign].sum())
        if best is None or score > best[2] + 1e-9:
            best = (assign.copy(), centers.copy(), score)
    assert best is not None
    assign, centers, score = best
    ranked = _renumber(assign)
    order = np.empty(n_clusters, dtype=np.int64)
    present, first = np.unique(assign, return_index=True)  # every cluster has members (_fill_empty)
    order[ranked[first]] = present
    return ranked, centers[order], score


def _fill_empty(assign: np.ndarray, sims: np.ndarray, k: int) -> None:
    """Give every empty cluster the row least similar to its own centroid (taken from a cluster that
    keeps at least one row), in place."""
    counts = np.bincount(assign, minlength=k)
    for j in np.flatnonzero(counts == 0):
        fit = sims[np.arange(assign.size), assign].copy()
        fit[counts[assign] <= 1] = np.inf
        far = int(np.argmin(fit))
        counts[assign[far]] -= 1
        assign[far] = j
        counts[j] = 1


# --------------------------------------------------------------------------- document clusters


@dataclass(frozen=True)
class DocumentClusters:
    """What `document_clusters` gives.

    documents: doc_id, cluster (null where none of the features fires), similarity (cosine to its
    cluster's centroid); clusters: cluster, size, share, name, mean_similarity, top_features; features:
    each cluster's distinguishing features (cluster, rank, feature, label, docs_in, rate_in, rate_out,
    rate_diff, log2_ratio); features_used: the selection; features_silent: chosen features that fire in
    none of the documents."""

    documents: pl.DataFrame
    clusters: pl.DataFrame
    features: pl.DataFrame
    features_used: list[int] = field(default_factory=list)
    features_silent: list[int] = field(default_factory=list)


def document_matrix(
    pooled: FrameLike,
    features: Sequence[int] | None = None,
    *,
    doc_ids: Sequence[int] | np.ndarray | None = None,
    aggregation: str = "max",
    n_features: int | None = None,
    what: str = "pooled",
) -> tuple[np.ndarray, Any, np.ndarray]:
    """(doc_ids, documents x features CSR of pooled values under `aggregation`, feature ids of the columns).

    Rows: `doc_ids` (default: every document with a row in `pooled`), in ascending doc_id order; columns:
    `features` (default: every feature that fires), ascending. Values are 0 where a feature is silent."""
    from scipy import sparse

    if aggregation not in AGGREGATIONS:
        raise ValueError(f"Unknown aggregation {aggregation!r}; use one of {list(AGGREGATIONS)}.")
    lf = as_lazy(pooled, what, ["doc_id", "feature", *pooled_value_columns(aggregation)])
    if doc_ids is None:  # every document of the table, also those where no chosen feature fires
        listed = lf.select(pl.col("doc_id").cast(pl.Int64).unique()).collect()["doc_id"].to_numpy()
        docs = np.sort(listed)
    else:
        docs = np.unique(np.asarray(doc_ids, dtype=np.int64))
    if features is not None:
        chosen = _check_feature_ids(features, n_features, what)
        lf = lf.filter(pl.col("feature").is_in(pl.Series(chosen).implode()))
    vals = (
        lf.select(
            pl.col("doc_id").cast(pl.Int64),
            pl.col("feature").cast(pl.Int64),
            pooled_value_expr(aggregation).alias("value"),
        )
        .filter(pl.col("value") > 0)
        .collect()
    )
    seen = vals["feature"].to_numpy()
    if features is None:
        chosen = np.unique(seen)
        if chosen.size == 0:
            raise ValueError(f"{what}: no feature fires in these documents; nothing to cluster on.")
        if n_features is not None:
            _check_feature_ids(chosen, n_features, what)
    if doc_ids is not None:
        vals = vals.filter(pl.col("doc_id").is_in(pl.Series(docs).implode()))
    # one value per (doc, feature), in a fixed order (the same sums whatever the input's row order)
    pairs = vals.group_by("doc_id", "feature").agg(pl.col("value").max()).sort("doc_id", "feature")
    if pairs.height != vals.height:
        raise ValueError(
            f"{what} has {vals.height - pairs.height} repeated (doc_id, feature) rows; pooled_embeddings has "
            "one row per (doc_id, feature): pass one dataset's partition (filter on `dataset` first)."
        )
    rows = np.searchsorted(docs, pairs["doc_id"].to_numpy())
    cols = np.searchsorted(chosen, pairs["feature"].to_numpy())
    mat = sparse.csr_matrix(
        (pairs["value"].to_numpy().astype(np.float64), (rows, cols)), shape=(docs.size, chosen.size)
    )
    return docs, mat, chosen


def document_clusters(
    pooled: FrameLike,
    n_clusters: int,
    *,
    features: Sequence[int] | None = None,
    doc_ids: Sequence[int] | np.ndarray | None = None,
    n_features: int | None = None,
    aggregation: str = "max",
    idf: bool = True,
    labels: pl.DataFrame | None = None,
    top_n: int = 10,
    seed: int = 0,
    n_init: int = 10,
    max_iter: int = 100,
    what: str = "pooled",
) -> DocumentClusters:
    """Cluster documents on a chosen set of features (module docstring).

    `pooled`: pooled_embeddings rows (doc_id, feature and the columns `aggregation` reads; for
    document_features, name `activation` `max_activation`) of one dataset; `features`: the feature ids to
    cluster on (default: every feature that fires); `doc_ids`: the documents (default: those with a row in
    `pooled`; documents where none of the features fires get a null cluster); `n_features`: the SAE width,
    to reject unknown features; `labels` (feature_labels) name the clusters; `top_n` distinguishing
    features per cluster; `seed`, `n_init`, `max_iter`: spherical k-means.
    """
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int | np.integer):
        raise TypeError(f"n_clusters must be an integer; got {n_clusters!r}.")
    docs, mat, chosen = document_matrix(
        pooled, features, doc_ids=doc_ids, aggregation=aggregation, n_features=n_features, what=what
    )
    fired = (mat > 0).astype(np.float64).tocsr()
    df = np.asarray(fired.sum(axis=0)).ravel()
    silent = chosen[df == 0]
    if silent.size == chosen.size:
        raise ValueError(
            f"{what}: none of the {chosen.size} chosen features fires in these {docs.size} documents "
            f"(e.g. {chosen[:10].tolist()}); choose features that fire here (see feature_stats)."
        )
    active = np.asarray(fired.sum(axis=1)).ravel() > 0
    n_active = int(active.sum())
    if not 2 <= n_clusters <= n_active:
        raise ValueError(
            f"n_clusters={n_clusters} is out of range: {n_active} of the {docs.size} documents have one of "
            f"the {chosen.size - silent.size} chosen features that fire, so ask for 2..{n_active} clusters "
            "(or choose more features)."
        )
    x = mat[active]
    x.data = np.log1p(x.data)
    if idf:
        from scipy import sparse

        x = x @ sparse.diags(np.log((1.0 + n_active) / (1.0 + df)) + 1.0)
    distinct = _distinct_rows(x)
    if distinct < n_clusters:
        raise ValueError(
            f"n_clusters={n_clusters} is out of range: the {n_active} documents have only {distinct} "
            f"distinct profiles over the chosen features; ask for at most {distinct} clusters or choose "
            "more features."
        )
    assign, centers, _ = spherical_kmeans(x, n_clusters, seed=seed, n_init=n_init, max_iter=max_iter)
    similarity = _dot(_unit_rows(x), centers)[np.arange(n_active), assign]

    cluster_col = np.full(docs.size, -1, dtype=np.int64)
    cluster_col[active] = assign
    sim_col = np.full(docs.size, np.nan)
    sim_col[active] = similarity
    documents = pl.DataFrame(
        {
            "doc_id": docs.astype(np.int32),
            "cluster": pl.Series(cluster_col).replace(-1, None),
            "similarity": pl.Series(sim_col).fill_nan(None),
        },
        schema=DOCUMENT_CLUSTERS_SCHEMA,
    )
    label_of = _label_map(labels)
    dist = distinguishing_features(fired[active], assign, chosen, label_of, top_n)
    sizes = np.bincount(assign, minlength=n_clusters)
    mean_sim = np.bincount(assign, weights=similarity, minlength=n_clusters) / np.maximum(sizes, 1)
    tops = {int(c): g["feature"].to_list() for (c,), g in dist.group_by("cluster", maintain_order=True)}
    clusters = pl.DataFrame(
        {
            "cluster": np.arange(n_clusters, dtype=np.int32),
            "size": sizes.astype(np.int64),
            "share": sizes / max(n_active, 1),
            "name": [_name(tops.get(c, []), label_of) for c in range(n_clusters)],
            "mean_similarity": mean_sim,
            "top_features": [tops.get(c, []) for c in range(n_clusters)],
        },
        schema=CLUSTER_SUMMARY_SCHEMA,
    )
    return DocumentClusters(
        documents=documents,
        clusters=clusters,
        features=dist,
        features_used=[int(f) for f in chosen],
        features_silent=[int(f) for f in silent],
    )


def distinguishing_features(
    fired: Any,
    assign: np.ndarray,
    features: np.ndarray,
    labels: dict[int, str] | None = None,
    top_n: int = 10,
) -> pl.DataFrame:
    """Per cluster, the features whose firing rate in the cluster most exceeds their rate in the other
    documents (`fired`: documents x features 0/1, rows in `assign`'s order; columns = `features`).

    Ranked by rate_diff = rate_in - rate_out, then log2_ratio (log2 of the two rates with 0.5 added to
    each count and 1 to each total), then feature id; only features with rate_diff > 0, at most `top_n`."""
    from scipy import sparse

    labels = labels or {}
    fired = sparse.csr_matrix(fired, dtype=np.float64)
    n, k = fired.shape[0], int(assign.max()) + 1 if assign.size else 0
    member = sparse.csr_matrix((np.ones(n), (assign, np.arange(n))), shape=(k, n))
    inside = np.asarray((member @ fired).toarray())  # (k, features) documents firing in each cluster
    total = inside.sum(axis=0)
    size = np.bincount(assign, minlength=k).astype(np.float64)[:, None]
    rest = n - size
    rate_in = inside / np.maximum(size, 1)
    rate_out = (total - inside) / np.maximum(rest, 1)
    diff = rate_in - rate_out
    log2 = np.log2((inside + 0.5) / (size + 1)) - np.log2((total - inside + 0.5) / (rest + 1))
    rows = []
    for c in range(k):
        keep = np.flatnonzero(diff[c] > 0)
        order = keep[np.lexsort((features[keep], -log2[c, keep], -diff[c, keep]))][:top_n]
        for rank, j in enumerate(order):
            rows.append(
                (c, rank, int(features[j]), labels.get(int(features[j])), int(inside[c, j]),
                 float(rate_in[c, j]), float(rate_out[c, j]), float(diff[c, j]), float(log2[c, j]))
            )  # fmt: skip
    return pl.DataFrame(rows, schema=CLUSTER_FEATURES_SCHEMA, orient="row")


# --------------------------------------------------------------------------- agreement


def adjusted_rand_index(a: Sequence[Any] | np.ndarray, b: Sequence[Any] | np.ndarray) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985) of two labelings of the same items: 1 when they split the
    items the same way (whatever the label names), about 0 for independent labelings (can be negative)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"adjusted_rand_index needs two labelings of the same items; got {a.shape}, {b.shape}."
        )
    n = a.size
    if n < 2:
        return 1.0
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    table = np.zeros((ia.max() + 1, ib.max() + 1), dtype=np.int64)
    np.add.at(table, (ia, ib), 1)

    def pairs(x: np.ndarray) -> float:
        return float((x * (x - 1) // 2).sum())

    index = pairs(table)
    rows, cols = pairs(table.sum(axis=1)), pairs(table.sum(axis=0))
    expected = rows * cols / math.comb(n, 2)
    best = (rows + cols) / 2
    if best == expected:  # both labelings trivial (one group, or all singletons): identical splits
        return 1.0
    return (index - expected) / (best - expected)
