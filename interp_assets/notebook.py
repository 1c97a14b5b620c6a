"""Notebook API over the stored tables (the interp_embed calls users know); never recomputes activations.

    from interp_assets.notebook import Dataset
    ds = Dataset.load("support_tickets")           # <data_dir>/parquet/{raw_documents,pooled_embeddings,...}
    X = ds.latents("max")                          # scipy.sparse.csr_matrix (n_docs, d_sae)
    ds.top_documents_for_feature(123)              # doc_id, value, text
    print(ds.highlight(0, 123))                    # row 0's activating tokens marked << >> (or doc_id=7)
    long = ds.filter(pl.col("text").str.len_chars() > 500).sort_by_features([123, 456])
    ds.diff(Dataset.load("other"))                 # interp_assets.analysis.diffing.diff_features
    ds.associations("resolved")                    # interp_assets.analysis.associations
    ds.cluster_documents(8, query="refund")        # interp_assets.analysis.clustering

A Dataset is a view: a shared store (documents sorted by doc_id, lazy pooled_embeddings and
token_activations) plus the ordered positions of its rows. `filter`, `sort_by_features`, slicing and
indexing return new views whose `latents()` rows, `documents` and `metadata` follow the view's order.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq
from scipy import sparse

from interp_assets.analysis.associations import (
    associations_for_column,
    criteria_associations,
    metadata_criteria,
)
from interp_assets.analysis.clustering import (
    DocumentClusters,
    criterion_features,
    document_clusters,
    feature_clusters,
    features_matching,
)
from interp_assets.analysis.diffing import (
    AGGREGATIONS,
    REPORT_FIRING,
    FrameLike,
    as_lazy,
    diff_features,
    paired_diff_features,
    pairs_from_key,
    pooled_value_columns,
    pooled_value_expr,
)
from interp_assets.analysis.feature_stats import feature_stats
from interp_assets.analysis.matching import match_features
from interp_assets.analysis.reports import highlight_text
from interp_assets.labels.evidence import HARD_NEGATIVES_MAX_DOCS
from interp_assets.labels.labeling import FEATURE_LABELS_SCHEMA
from interp_assets.storage import paths

CORE_DOCUMENT_COLUMNS = ("dataset", "doc_id", "doc_hash", "text", "source_file", "source_row")
D_SAE_METADATA_KEYS = (b"d_sae", b"interp.d_sae")

_MATERIALIZE_HINT = (
    "materialize the asset `{asset}` for partition '{name}' first (Dagster UI, or "
    "`dagster asset materialize -m definitions --select {asset} --partition {name}`)"
)


def _declared_readers_hint(data_dir: str | None, reader: str) -> str:
    """A sentence for a reader whose tables are missing: whether `config/readers.json` declares it."""
    from interp_assets.defs.readers import load_readers, readers_file

    path = readers_file(os.path.join(data_dir if data_dir is not None else paths.data_dir(), "config"))
    declared = list(load_readers(path))
    if reader in declared:
        return ""
    return (
        f" Reader {reader!r} is not declared in {path} (declared: {declared or 'none'}): declare it there, "
        "or pass one of those."
    )


def _exists(path: str) -> bool:
    if "://" not in path:
        return os.path.exists(path)
    import fsspec  # object stores: only when a URL is configured

    fs, p = fsspec.core.url_to_fs(path)
    return bool(fs.exists(p))


def _stored_d_sae(files: list[str]) -> int | None:
    """d_sae from the key-value metadata (`d_sae`) of a table's first Parquet file, if the writer set it."""
    if not files or "://" in files[0]:
        return None
    path = files[0]
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, ValueError):
        return None
    for key in D_SAE_METADATA_KEYS:
        if key in meta:
            try:
                return int(meta[key])
            except ValueError:
                return None
    return None


@dataclass
class _Store:
    """What all views of one dataset share."""

    name: str
    documents: pl.DataFrame  # sorted by doc_id
    pooled: pl.LazyFrame
    token_activations: pl.LazyFrame | None = None
    tokens: pl.LazyFrame | None = None  # each token's text and offsets (None: token_activations has them)
    labels: pl.DataFrame | None = None
    d_sae: int | None = None
    d_sae_explicit: bool = False
    where: dict[str, str] = field(default_factory=dict)  # table -> path, for error messages
    embeddings: tuple[tuple[int, ...], np.ndarray] | None = None  # (doc_ids, sentence embeddings) of a view
    doc_ids: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.doc_ids = self.documents["doc_id"].to_numpy().astype(np.int64)


class Dataset:
    """A dataset's stored documents and SAE features, or an ordered subset of them (see module doc)."""

    def __init__(self, store: _Store, rows: np.ndarray | None = None) -> None:
        self._store = store
        self._rows = None if rows is None else np.asarray(rows, dtype=np.int64)

    # ------------------------------------------------------------------ construction

    @classmethod
    def load(
        cls, name: str, data_dir: str | None = None, *, d_sae: int | None = None, reader: str | None = None
    ) -> Dataset:
        """Open dataset `name` from `<data_dir>/parquet` (default data_dir:
        `interp_assets.storage.paths.data_dir()`).

        Needs raw_documents and pooled_embeddings; token_activations with tokens (for `highlight`) and
        feature_labels are optional. `d_sae` overrides the SAE width stored with the tables. `reader`: an
        extra reader of `config/readers.json`, whose features (tables under `parquet/readers/<reader>/`)
        are read instead of the default reader's (it has no feature_labels).
        """
        from interp_assets.storage.parquet import (  # imports Dagster: only here
            read_table,
            table_exists,
            table_files,
        )

        base = os.path.join(data_dir if data_dir is not None else paths.data_dir(), "parquet")
        docs_path = paths.table_path(base, "raw_documents", name)
        if not _exists(docs_path):
            found = []
            folder = os.path.join(base, "raw_documents")
            if "://" not in folder and os.path.isdir(folder):
                found = sorted(f[: -len(".parquet")] for f in os.listdir(folder) if f.endswith(".parquet"))
            raise FileNotFoundError(
                f"Dataset {name!r} has no raw_documents at {docs_path}: "
                + _MATERIALIZE_HINT.format(asset="raw_documents", name=name)
                + f". Datasets materialized under {base}: {found or 'none'}."
            )
        docs_base, prefix = base, ""
        if reader is not None:  # an extra reader: its own feature tables, the same documents
            base, prefix = paths.reader_parquet_base(base, reader), f"{reader}/"
        pooled_path = paths.table_path(base, "pooled_embeddings", name)
        if not table_exists(base, "pooled_embeddings", name):
            raise FileNotFoundError(
                f"Dataset {name!r} has documents but no pooled_embeddings at {pooled_path}: "
                + _MATERIALIZE_HINT.format(asset=f"{prefix}pooled_embeddings", name=name)
                + " (it needs token_activations, which runs the SAE)."
                + ("" if reader is None else _declared_readers_hint(data_dir, reader))
            )
        ta_path = paths.table_path(base, "token_activations", name)
        labels_path = paths.table_path(docs_base, "feature_labels", name)
        has_activations = table_exists(base, "token_activations", name)
        stored = _stored_d_sae(table_files(base, "pooled_embeddings", name)) or (
            _stored_d_sae(table_files(base, "token_activations", name)) if has_activations else None
        )
        store = _Store(
            name=name,
            documents=_prepare_documents(pl.read_parquet(docs_path), name),
            pooled=read_table(base, "pooled_embeddings", name),
            token_activations=read_table(base, "token_activations", name) if has_activations else None,
            tokens=read_table(base, "tokens", name) if table_exists(base, "tokens", name) else None,
            labels=pl.read_parquet(labels_path) if reader is None and _exists(labels_path) else None,
            d_sae=d_sae if d_sae is not None else stored,
            d_sae_explicit=d_sae is not None or stored is not None,
            where={
                "pooled_embeddings": pooled_path,
                "token_activations": ta_path,
                "tokens": paths.table_path(base, "tokens", name),
            },
        )
        return cls(store)

    @classmethod
    def from_frame(
        cls,
        frame: Any,
        text: str = "text",
        *,
        name: str | None = None,
        data_dir: str | None = None,
        reader: Any = None,
        progress: bool = True,
    ) -> Dataset:
        """A dataset computed from a pandas or polars DataFrame, through the same assets, activation cache
        and storage as a dropped file (interp_embed's `Dataset(df, sae)`); `progress` draws a tqdm bar
        per long step (encoding, embedding).

        `text` names the text column; every other column is kept as metadata. `name` defaults to
        `frame_<content hash>`, so the same frame is the same dataset (and is not encoded again). `reader`
        is a `resources.sae_reader.SAEReaderResource` (default: the embedded reader on the best device).
        The dataset is then an ordinary partition: `Dataset.load(name)`, the UI and SQL all see it.
        """
        if not isinstance(frame, pl.DataFrame):
            try:
                frame = pl.from_pandas(frame)
            except (TypeError, ValueError, ImportError) as exc:
                raise TypeError(
                    f"from_frame needs a pandas or polars DataFrame; got {type(frame).__name__}."
                ) from exc
        if text not in frame.columns:
            raise ValueError(
                f"from_frame: no text column {text!r}; the frame's columns are {frame.columns}. "
                "Pass text='<column with the documents>'."
            )
        if frame.height == 0:
            raise ValueError("from_frame: the frame has no rows.")
        if name is None:
            import hashlib

            digest = hashlib.blake2b(digest_size=6)
            digest.update("\x1f".join(frame.columns).encode())
            for value in frame[text].cast(pl.String).fill_null("").to_list():
                digest.update(value.encode() + b"\x1e")
            name = f"frame_{digest.hexdigest()}"
        data_dir = data_dir if data_dir is not None else paths.data_dir()
        from interp_assets.defs.notebook_runs import materialize_frame  # Dagster: only on this path
        from interp_assets.progress import ProgressBars, listening

        with listening(ProgressBars()) if progress else contextlib.nullcontext():
            materialize_frame(frame, name, text_column=text, data_dir=data_dir, reader=reader)
        return cls.load(name, data_dir=data_dir)

    @classmethod
    def from_frames(
        cls,
        name: str,
        documents: FrameLike,
        pooled: FrameLike,
        *,
        token_activations: FrameLike | None = None,
        tokens: FrameLike | None = None,
        feature_labels: pl.DataFrame | None = None,
        d_sae: int | None = None,
    ) -> Dataset:
        """A Dataset over in-memory tables in the README schemas (e.g. the outputs of the pure modules).
        `token_activations` may be the wide shape (with token, char_start, char_end); else `tokens` gives
        each token's text and offsets."""
        docs = as_lazy(documents, f"documents of {name!r}", ["doc_id", "text"]).collect()
        return cls(
            _Store(
                name=name,
                documents=_prepare_documents(docs, name),
                pooled=as_lazy(pooled, f"pooled_embeddings of {name!r}", ["doc_id", "feature"]),
                token_activations=None
                if token_activations is None
                else as_lazy(token_activations, f"token_activations of {name!r}", ["doc_id", "feature"]),
                tokens=None
                if tokens is None
                else as_lazy(
                    tokens, f"tokens of {name!r}", ["doc_id", "token_index", "char_start", "char_end"]
                ),
                labels=feature_labels,
                d_sae=d_sae,
                d_sae_explicit=d_sae is not None,
            )
        )

    def _view(self, rows: np.ndarray) -> Dataset:
        return Dataset(self._store, rows)

    # ------------------------------------------------------------------ basic properties

    @property
    def name(self) -> str:
        """Dataset (partition) name."""
        return self._store.name

    @property
    def rows(self) -> np.ndarray:
        """Positions of this view's rows in the full dataset (sorted by doc_id)."""
        return np.arange(self._store.documents.height) if self._rows is None else self._rows

    @property
    def doc_ids(self) -> np.ndarray:
        """doc_id of every row of this view, in order."""
        return self._store.doc_ids if self._rows is None else self._store.doc_ids[self._rows]

    def __len__(self) -> int:
        return self._store.documents.height if self._rows is None else int(self._rows.size)

    def __repr__(self) -> str:
        total = self._store.documents.height
        return f"Dataset({self.name!r}, {len(self)} of {total} documents)"

    @property
    def documents(self) -> pl.DataFrame:
        """The view's raw_documents rows (all columns), in view order."""
        docs = self._store.documents
        return docs if self._rows is None else docs[self._rows]

    @property
    def metadata(self) -> pl.DataFrame:
        """doc_id plus the documents' metadata columns (everything but the core raw_documents columns)."""
        docs = self.documents
        return docs.select(["doc_id"] + [c for c in docs.columns if c not in CORE_DOCUMENT_COLUMNS])

    @property
    def d_sae(self) -> int:
        """SAE width: explicit / stored value, else max feature + 1 over the whole dataset."""
        st = self._store
        if st.d_sae is None:
            top = st.pooled.select(pl.col("feature").max()).collect().item()
            st.d_sae = 0 if top is None else int(top) + 1
        return st.d_sae

    # ------------------------------------------------------------------ indexing

    def __getitem__(self, key: Any) -> dict[str, Any] | Dataset:
        """int -> the row as a dict; slice / list of ints / numpy int or bool array -> a Dataset view."""
        if isinstance(key, int | np.integer) and not isinstance(key, bool):
            return self._store.documents.row(self._row_position(key), named=True)
        if isinstance(key, slice):
            return self._view(self.rows[key])
        if isinstance(key, pl.Series):
            key = key.to_numpy()
        if isinstance(key, list | tuple | np.ndarray):
            arr = np.asarray(key)
            if arr.dtype == bool:
                return self.filter(arr)
            if arr.size == 0:
                return self._view(np.empty(0, dtype=np.int64))
            if not np.issubdtype(arr.dtype, np.integer):
                raise TypeError(f"Dataset indices must be integers or booleans, got dtype {arr.dtype}.")
            n = len(self)
            if arr.min() < -n or arr.max() >= n:
                raise IndexError(f"index out of range for a Dataset of {n} documents.")
            return self._view(self.rows[arr])
        raise TypeError(
            "Dataset indices must be an int, a slice, a list/array of ints or a boolean mask; "
            f"got {type(key)!r}."
        )

    def filter(self, mask_or_expr: pl.Expr | np.ndarray | pl.Series | Sequence[bool]) -> Dataset:
        """Keep the rows where the mask is True; a polars expression is evaluated on `documents`."""
        if isinstance(mask_or_expr, pl.Expr):
            mask = self.documents.select(mask_or_expr.alias("_mask"))["_mask"]
            if mask.dtype != pl.Boolean:
                raise TypeError(f"filter expression must give booleans, got {mask.dtype}.")
            if mask.len() != len(self):
                raise ValueError(
                    f"filter expression gave {mask.len()} values for {len(self)} documents; "
                    "use a row-wise expression."
                )
            arr = mask.fill_null(False).to_numpy()
        else:
            arr = (
                mask_or_expr.fill_null(False).to_numpy()
                if isinstance(mask_or_expr, pl.Series)
                else np.asarray(mask_or_expr)
            )
            if arr.dtype != bool:
                raise TypeError(f"filter mask must be booleans, got dtype {arr.dtype}.")
            if arr.shape != (len(self),):
                raise ValueError(
                    f"filter mask has shape {arr.shape}; this Dataset has {len(self)} documents."
                )
        return self._view(self.rows[arr])

    # ------------------------------------------------------------------ features

    def _in_view(self, lf: pl.LazyFrame) -> pl.LazyFrame:
        """Rows of a per-document table (a doc_id column) whose document is in this view."""
        if self._rows is None:
            return lf
        keep = pl.Series("doc_id", np.unique(self.doc_ids).astype(np.int32))
        return lf.filter(pl.col("doc_id").is_in(keep.implode()))

    def _pooled_subset(self, columns: Sequence[str]) -> pl.LazyFrame:
        return self._in_view(
            self._store.pooled.select(pl.col("doc_id").cast(pl.Int32), *[c for c in columns if c != "doc_id"])
        )

    def _values(self, aggregation: str) -> pl.DataFrame:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"Unknown aggregation {aggregation!r}; use one of {list(AGGREGATIONS)}.")
        cols = ["feature", *pooled_value_columns(aggregation)]
        lf = self._pooled_subset(cols)
        return lf.select(
            "doc_id", "feature", pooled_value_expr(aggregation).cast(pl.Float32).alias("value")
        ).collect()

    def _positions(self, doc_id: np.ndarray) -> np.ndarray:
        """Position in the full (doc_id-sorted) documents of each doc_id; error for unknown ids."""
        ids = self._store.doc_ids
        pos = np.searchsorted(ids, doc_id)
        if ids.size == 0:
            bad = np.ones(doc_id.shape, dtype=bool)
        else:
            bad = (pos >= ids.size) | (ids[np.minimum(pos, ids.size - 1)] != doc_id)
        if np.any(bad):
            raise ValueError(
                f"pooled_embeddings of {self.name!r} has doc_id {int(doc_id[np.argmax(bad)])} that is not in "
                "raw_documents: the tables are from different materializations; re-materialize "
                "token_activations and pooled_embeddings for this partition."
            )
        return pos

    def latents(self, aggregation: str = "max", compress: bool = True) -> sparse.csr_matrix | np.ndarray:
        """Document x feature matrix (n_docs, d_sae), rows in this view's order.

        aggregation: max (max activation), mean (sum_activation / doc_tokens), sum, binarize (1.0 where
        active), count (active tokens). `compress=True` gives a float32 `scipy.sparse.csr_matrix`,
        False a dense `np.ndarray`.
        """
        vals = self._values(aggregation)
        d = self.d_sae
        feat = vals["feature"].to_numpy().astype(np.int64)
        if feat.size and (feat.min() < 0 or feat.max() >= d):
            raise ValueError(
                f"pooled_embeddings of {self.name!r} has feature {int(feat.max())} but d_sae={d}; "
                "pass the SAE width (Dataset.load(..., d_sae=...))."
            )
        pos = self._positions(vals["doc_id"].to_numpy().astype(np.int64))
        data = vals["value"].to_numpy()
        n_full = self._store.documents.height
        if pos.size > 1 and np.any(np.diff(pos) < 0):
            order = np.lexsort((feat, pos))
            pos, feat, data = pos[order], feat[order], data[order]
        indptr = np.zeros(n_full + 1, dtype=np.int64)
        np.cumsum(np.bincount(pos, minlength=n_full), out=indptr[1:])
        full = sparse.csr_matrix(
            (data.astype(np.float32, copy=False), feat.astype(np.int32), indptr), shape=(n_full, d)
        )
        mat = full if self._rows is None else full[self._rows]
        return mat if compress else mat.toarray()

    def top_documents_for_feature(self, feature: int, k: int = 10, aggregation: str = "max") -> pl.DataFrame:
        """The k documents of this view with the highest value of `feature`: doc_id, value, text."""
        vals = self._values(aggregation).filter(pl.col("feature") == self._feature(feature))
        top = vals.sort(["value", "doc_id"], descending=[True, False]).head(k)
        docs = self._store.documents.select(pl.col("doc_id").cast(pl.Int32), "text")
        return top.join(docs, on="doc_id", how="left", maintain_order="left").select(
            "doc_id", pl.col("value").cast(pl.Float64), "text"
        )

    def _feature(self, feature: int) -> int:
        """`feature` as an int, or a clear error when it is not a feature of this SAE."""
        if isinstance(feature, bool) or not isinstance(feature, int | np.integer):
            raise TypeError(f"feature must be an integer; got {feature!r}.")
        if not 0 <= int(feature) < self.d_sae:
            raise ValueError(f"feature {feature} is outside this SAE's features 0..{self.d_sae - 1}.")
        return int(feature)

    def highlight(
        self,
        row: int | None = None,
        feature: int | None = None,
        open_mark: str = "<<",
        close_mark: str = ">>",
        *,
        doc_id: int | None = None,
    ) -> str:
        """The text of one document with the tokens where `feature` is active wrapped in marks.

        The document is the `row`-th of this view (as `ds[row]`; negative counts from the end), so on a
        sorted view `highlight(0, f)` marks the top row; or pass `doc_id=` for a document by id.
        """
        if feature is None:
            raise TypeError(
                "highlight needs a feature: highlight(row, feature) or highlight(doc_id=..., feature=...)."
            )
        feature = self._feature(feature)
        doc_id = self._chosen_doc_id(row, doc_id, "highlight")
        return self.highlight_many([doc_id], feature, open_mark, close_mark)[0]

    def row(self, row: int) -> DatasetRow:
        """The `row`-th document of this view as an object (interp_embed's `dataset[i]`): `.text`,
        `.doc_id`, `.metadata` and `.token_activations(feature)` (its text with that feature's tokens
        marked << >>)."""
        return DatasetRow(self, int(self._store.doc_ids[self._row_position(row)]))

    def _row_position(self, row: int) -> int:
        """Position in the dataset's documents of the `row`-th document of this view (negative counts
        from the end); IndexError out of range."""
        n = len(self)
        i = int(row) + n if row < 0 else int(row)
        if not 0 <= i < n:
            raise IndexError(f"row {row} is out of range for a Dataset of {n} documents.")
        return int(self.rows[i])

    def _chosen_doc_id(self, row: int | None, doc_id: int | None, what: str) -> int:
        """The document a call names by a row of this view or by `doc_id=` (exactly one), checked."""
        if (row is None) == (doc_id is None):
            raise TypeError(f"{what} takes a row of this view or doc_id=..., not both and not neither.")
        if doc_id is None:
            return int(self._store.doc_ids[self._row_position(row)])
        self._doc_position(doc_id)  # KeyError for an unknown id
        return int(doc_id)

    def _doc_position(self, doc_id: int) -> int:
        """Position of `doc_id` in the dataset's documents; KeyError when it is not one of them."""
        ids = self._store.doc_ids
        pos = int(np.searchsorted(ids, doc_id))
        if pos >= ids.size or ids[pos] != doc_id:
            raise KeyError(f"doc_id {doc_id} is not in dataset {self.name!r} ({ids.size} documents).")
        return pos

    def _token_activations(self) -> pl.LazyFrame:
        """The dataset's token_activations in the wide shape (each token's text and offsets joined from
        tokens), or a clear error saying what to materialize."""
        from interp_assets.storage.parquet import TOKEN_COLUMNS, with_tokens

        ta = self._store.token_activations
        missing = "token_activations" if ta is None else None
        if ta is not None and not set(TOKEN_COLUMNS) <= set(ta.collect_schema().names()):
            if self._store.tokens is None:
                missing = "tokens"
            else:
                ta = with_tokens(ta, self._store.tokens)
        if missing is not None or ta is None:
            where = self._store.where.get(missing or "tokens", missing)
            raise FileNotFoundError(
                f"Dataset {self.name!r} has no {missing} ({where}): "
                + _MATERIALIZE_HINT.format(asset="token_activations", name=self.name)
                + " (its step writes tokens too)."
            )
        return ta

    def tokens(self, row: int | None = None, *, doc_id: int | None = None) -> pl.DataFrame:
        """The active tokens of one document (the `row`-th of this view, or `doc_id=`): one row per token
        with at least one active feature, in text order: token_index, token, char_start, char_end, and
        its features and activations (lists, strongest first)."""
        doc_id = self._chosen_doc_id(row, doc_id, "tokens")
        return (
            self._token_activations()
            .filter(pl.col("doc_id") == int(doc_id))
            .sort(["token_index", "activation"], descending=[False, True])
            .group_by("token_index", maintain_order=True)
            .agg(
                pl.col("token").cast(pl.String).first(),
                pl.col("char_start").first(),
                pl.col("char_end").first(),
                pl.col("feature").alias("features"),
                pl.col("activation").cast(pl.Float32).alias("activations"),
            )
            .collect()
        )

    def highlight_many(
        self, doc_ids: Sequence[int], feature: int, open_mark: str = "<<", close_mark: str = ">>"
    ) -> list[str]:
        """`highlight` for many documents (by doc_id) at once: one read of the activations, not one each."""
        feature = self._feature(feature)
        ta = self._token_activations()
        wanted = [int(d) for d in doc_ids]
        positions = [self._doc_position(d) for d in wanted]
        spans = (
            ta.filter((pl.col("feature") == feature) & pl.col("doc_id").is_in(wanted))
            .select("doc_id", "char_start", "char_end")
            .collect()
        )
        by_doc: dict[int, list[tuple[int, int]]] = {}
        for d, a, b in spans.iter_rows():
            by_doc.setdefault(int(d), []).append((a, b))
        texts = self._store.documents["text"]
        return [
            highlight_text(texts[int(p)] or "", by_doc.get(d, []), open_mark, close_mark)
            for d, p in zip(wanted, positions, strict=True)
        ]

    def sort_by_features(
        self, features: int | Sequence[int], aggregation: str = "max", descending: bool = True
    ) -> Dataset:
        """This view reordered by the sum of `features`' values (0 where inactive); ties keep the order."""
        feats = [features] if isinstance(features, int | np.integer) else list(features)
        feats = [self._feature(f) for f in feats]
        vals = self._values(aggregation).filter(pl.col("feature").is_in(feats))
        per_doc = vals.group_by("doc_id").agg(pl.col("value").cast(pl.Float64).sum())
        score = np.zeros(self._store.documents.height)
        score[self._positions(per_doc["doc_id"].to_numpy().astype(np.int64))] = per_doc["value"].to_numpy()
        rows = self.rows
        s = score[rows]
        order = np.argsort(-s if descending else s, kind="stable")
        return self._view(rows[order])

    # ------------------------------------------------------------------ labels, diff, associations

    def feature_labels(self) -> pl.DataFrame:
        """The dataset's feature_labels table, or an empty frame with its columns."""
        labels = self._store.labels
        if labels is None:
            return pl.DataFrame(schema=FEATURE_LABELS_SCHEMA)
        return labels

    def _label_inputs(self, feature: int) -> tuple[pl.DataFrame, pl.DataFrame, np.ndarray | None]:
        """This view's documents (doc_id order), the feature's token activations among them, and the
        documents' sentence embeddings (the hard negatives' input, as feature_labels computes them)."""
        ta = self._token_activations()
        docs = self.documents.unique(subset="doc_id", keep="first").sort("doc_id")
        ids = docs["doc_id"].cast(pl.Int32).to_list()
        acts = ta.filter((pl.col("feature") == feature) & pl.col("doc_id").is_in(ids)).collect()
        embeddings = None
        if docs.height <= HARD_NEGATIVES_MAX_DOCS:
            from interp_assets.labels.embedding import sentence_embeddings

            key = tuple(ids)
            if self._store.embeddings is None or self._store.embeddings[0] != key:
                self._store.embeddings = (key, sentence_embeddings(docs["text"].fill_null("").to_list()))
            embeddings = self._store.embeddings[1]
        return docs, acts, embeddings

    def label_feature(
        self, feature: int, *, llm: Any = None, n_evidence: int = 20, n_holdout: int = 40, seed: int = 0
    ) -> dict[str, Any]:
        """Label one feature from this view's documents the way feature_labels does (evidence split with
        hard negatives; the LLM labeler when `llm` is an enabled client, else the offline one). Returns the
        feature_labels row: label, description, source, evidence_doc_ids, evidence_hash, ..."""
        feature = self._feature(feature)
        return self._label(feature, *self._label_inputs(feature), llm, n_evidence, n_holdout, seed)

    def _label(
        self,
        feature: int,
        docs: pl.DataFrame,
        acts: pl.DataFrame,
        embeddings: np.ndarray | None,
        llm: Any,
        n_evidence: int,
        n_holdout: int,
        seed: int,
    ) -> dict[str, Any]:
        from interp_assets.labels.labeling import label_features

        labels = label_features(
            acts,
            docs,
            [feature],
            dataset=self.name,
            sae_id=self._sae_id(),
            embeddings=embeddings,
            llm=llm,
            n_evidence=n_evidence,
            n_holdout=n_holdout,
            seed=seed,
        )
        return labels.row(0, named=True)

    def score_feature(
        self,
        feature: int,
        label: str | dict[str, Any] | None = None,
        *,
        llm: Any = None,
        n_evidence: int = 20,
        n_holdout: int = 40,
        seed: int = 0,
        n_boot: int = 1000,
    ) -> pl.DataFrame:
        """Score a label of `feature` on held-out documents never shown to the labeler, with
        feature_scores's scorers (embedding offline; detection and fuzz with an enabled `llm`).

        `label`: a row from `label_feature`, a label text of your own (scored on the same held-out split),
        or None (label first). Returns feature_scores rows, one per method.
        """
        from interp_assets.labels.scoring import score_features

        feature = self._feature(feature)
        docs, acts, embeddings = self._label_inputs(feature)
        if isinstance(label, dict):
            row = label
        else:
            row = self._label(feature, docs, acts, embeddings, llm, n_evidence, n_holdout, seed)
        if isinstance(label, str):
            row = row | {"label": label, "description": label, "source": "user"}
        labels = pl.DataFrame([{k: row.get(k) for k in FEATURE_LABELS_SCHEMA}], schema=FEATURE_LABELS_SCHEMA)
        return score_features(
            labels,
            acts,
            docs,
            llm=llm,
            embeddings=embeddings,
            n_evidence=n_evidence,
            n_holdout=n_holdout,
            seed=seed,
            n_boot=n_boot,
        )

    def _sae_id(self) -> str:
        labels = self._store.labels
        if labels is not None and labels.height and "sae_id" in labels.columns:
            return str(labels["sae_id"][0])
        return f"notebook:{self.name}"

    def _diff_width(self, other: Dataset) -> int:
        a, b = self._store, other._store
        if a.d_sae_explicit and b.d_sae_explicit and self.d_sae != other.d_sae:
            raise ValueError(
                f"{self.name!r} has d_sae={self.d_sae} but {other.name!r} has d_sae={other.d_sae}: "
                "features of different SAEs cannot be compared."
            )
        return max(self.d_sae, other.d_sae)

    def diff(self, other: Dataset, *, key: str | None = None, **kwargs: Any) -> pl.DataFrame:
        """Features whose document frequency differs between this view (A) and `other` (B).

        Unpaired: `diffing.diff_features` with the report's firing rule (`REPORT_FIRING`, adaptive; pass
        `firing="fixed"` for "max activation > threshold"). With `key` (a metadata column both share,
        e.g. a prompt id): paired `diffing.paired_diff_features` over the documents matched on it. kwargs
        go to those functions (threshold, alpha, n_features; default n_features: the SAE width).
        """
        kwargs.setdefault("n_features", self._diff_width(other))
        cols = ["feature", "max_activation"]
        if key is not None:
            pairs = pairs_from_key(self.documents, other.documents, key)
            return paired_diff_features(
                self._pooled_subset(cols), other._pooled_subset(cols), pairs, **kwargs
            )
        n_a, n_b = int(np.unique(self.doc_ids).size), int(np.unique(other.doc_ids).size)
        if n_a == 0 or n_b == 0:
            raise ValueError(
                f"Cannot diff an empty Dataset ({self.name!r}: {n_a}, {other.name!r}: {n_b} docs)."
            )
        kwargs.setdefault("firing", REPORT_FIRING)  # the rule diff_reports uses, so both agree
        return diff_features(self._pooled_subset(cols), n_a, other._pooled_subset(cols), n_b, **kwargs)

    def feature_stats(self, tokens: bool = True) -> pl.DataFrame:
        """Statistics of every feature over this view's documents (`analysis.feature_stats`): document
        and token frequency, mean and max activation, entropy of the activation mass over documents and,
        with token_activations and `tokens`, over tokens. Pick features with
        `interp_assets.analysis.feature_stats.keep_features` (drops never-on and always-on ones)."""
        cols = ["feature", "max_activation", "sum_activation", "active_tokens", "doc_tokens"]
        token_activations = None
        if tokens and self._store.token_activations is not None:
            token_activations = self._in_view(
                self._store.token_activations.select("doc_id", "feature", "activation")
            )
        n_docs = int(np.unique(self.doc_ids).size)
        if n_docs == 0:
            raise ValueError(f"Dataset {self.name!r}: this view has no documents to compute statistics on.")
        return feature_stats(
            self._pooled_subset(cols), n_docs, token_activations=token_activations, n_features=self.d_sae
        )

    def match_features(self, other: Dataset, aggregation: str = "max") -> pl.DataFrame:
        """Match this reader's features with `other`'s over the documents both read (same text, found by
        `doc_hash`): `analysis.matching.match_features` on their document signatures (`aggregation` of
        `latents`). For two SAEs (seeds, widths, layers) or two models read over one corpus."""
        for ds in (self, other):
            if "doc_hash" not in ds.documents.columns:
                raise ValueError(f"Dataset {ds.name!r} has no doc_hash column: re-materialize raw_documents.")
        mine = self.documents.select("doc_hash").with_row_index("a")
        theirs = other.documents.select("doc_hash").with_row_index("b")
        common = mine.unique("doc_hash", keep="first").join(
            theirs.unique("doc_hash", keep="first"), on="doc_hash", how="inner"
        )
        if common.height < 2:
            raise ValueError(
                f"{self.name!r} and {other.name!r} share {common.height} documents (by doc_hash); matching "
                "needs the same documents read by both readers."
            )
        a = self.latents(aggregation)[common["a"].to_numpy()]
        b = other.latents(aggregation)[common["b"].to_numpy()]
        return match_features(a, b)

    def associations(self, column: str, **kwargs: Any) -> pl.DataFrame:
        """Features associated with a metadata column (`associations.associations_for_column`'s table).

        A text column with 3 or more values is one criterion per level (`topic=refund`: that level against
        the rest), as the feature_associations asset tests it; the table then has a `criterion` column and
        accepts `aggregation`, `alpha` and `max_levels`."""
        agg = kwargs.get("aggregation", "max")
        cols = ["feature", *pooled_value_columns(agg)] if agg in AGGREGATIONS else ["feature"]
        docs = self.documents.unique(subset="doc_id", keep="first", maintain_order=True)
        if column in docs.columns and docs.schema[column] in (pl.String, pl.Categorical):
            if docs[column].drop_nulls().n_unique() > 2:
                return self._level_associations(docs, column, cols, **kwargs)
        kwargs.setdefault("dataset", self.name)
        return associations_for_column(self._pooled_subset(cols), docs, column, **kwargs).table

    def _level_associations(
        self, docs: pl.DataFrame, column: str, cols: list[str], **kwargs: Any
    ) -> pl.DataFrame:
        allowed = {"aggregation", "alpha", "max_levels"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise ValueError(
                f"Column {column!r} has several text levels, tested one criterion per level; the options "
                f"{unknown} do not apply there (use {sorted(allowed)})."
            )
        criteria, skipped = metadata_criteria(docs, [column], max_levels=kwargs.get("max_levels", 20))
        if criteria.width < 2:
            raise ValueError(f"Column {column!r}: no level can be tested ({skipped}).")
        table, _ = criteria_associations(
            self._pooled_subset(cols),
            criteria,
            dataset=self.name,
            aggregation=kwargs.get("aggregation", "max"),
            alpha=kwargs.get("alpha", 0.05),
        )
        return table

    # ------------------------------------------------------------------ clustering

    def _criterion_table(self, criterion: str) -> pl.DataFrame:
        """feature_associations rows of one criterion (`column`, or `column=level` of a text column) over
        this view, as the feature_associations asset computes them."""
        column = criterion.split("=", 1)[0]
        docs = self.documents.unique(subset="doc_id", keep="first", maintain_order=True)
        criteria, skipped = metadata_criteria(docs, [column])
        if criterion not in criteria.columns:
            made = [c for c in criteria.columns if c != "doc_id"]
            raise ValueError(
                f"Dataset {self.name!r}: no criterion {criterion!r} from column {column!r} "
                f"({skipped.get(column) or 'its criteria are ' + str(made)}); pick one of those."
            )
        table, failed = criteria_associations(
            self._pooled_subset(["feature", "max_activation"]),
            criteria.select("doc_id", criterion),
            dataset=self.name,
        )
        if criterion in failed:
            raise ValueError(
                f"Dataset {self.name!r}: criterion {criterion!r} cannot be tested: {failed[criterion]}"
            )
        return table

    def feature_clusters(
        self,
        features: Sequence[int] | None = None,
        *,
        decoder: Any = None,
        by: str | Sequence[str] | None = None,
        coactivation: str = "jaccard",
        min_similarity: float = 0.5,
        n_clusters: int | None = None,
        min_documents: int = 5,
        max_doc_frequency: float = 0.5,
        max_features: int = 5000,
    ) -> pl.DataFrame:
        """Groups of features that fire in the same documents of this view (co-activation) and, with
        `decoder` (the SAE's `(d_sae, d_in)` W_dec, e.g. `sae.W_dec.detach().numpy()`), that write the same
        direction: `analysis.clustering.feature_clusters`, each group named by its members' feature_labels.
        Default features: those firing in at least `min_documents` and at most `max_doc_frequency` of the
        view's documents (as `feature_stats.keep_features`)."""
        if by is None:
            by = ["coactivation"] + (["decoder"] if decoder is not None else [])
        if decoder is not None and hasattr(decoder, "detach"):
            decoder = decoder.detach().float().cpu().numpy()
        return feature_clusters(
            self._pooled_subset(["feature", "max_activation"]),
            decoder=decoder,
            features=None if features is None else [self._feature(f) for f in features],
            labels=self.feature_labels(),
            by=by,
            coactivation=coactivation,
            n_docs=int(np.unique(self.doc_ids).size),
            min_similarity=min_similarity,
            n_clusters=n_clusters,
            min_documents=min_documents,
            max_doc_frequency=max_doc_frequency,
            max_features=max_features,
            n_features=self.d_sae if decoder is None else None,
        )

    def cluster_documents(
        self,
        n_clusters: int,
        features: Sequence[int] | None = None,
        *,
        query: str | None = None,
        criterion: str | None = None,
        n_criterion_features: int = 20,
        significant_only: bool = True,
        aggregation: str = "max",
        top_n: int = 10,
        seed: int = 0,
        n_init: int = 10,
    ) -> DocumentClusters:
        """Cluster this view's documents on a chosen set of features (`analysis.clustering.document_clusters`:
        log1p values, TF-IDF weighted, unit length, spherical k-means with a fixed seed).

        Features: the union of `features` (ids), those whose feature_labels label or description contains
        `query`, and the top `n_criterion_features` of `criterion` (a metadata column, or `column=level`,
        as feature_associations ranks them; only significant ones unless `significant_only` is False); none
        of these: every feature that fires. Returns a `DocumentClusters`: `documents` (doc_id, cluster,
        similarity) in this view's order, so `ds.filter(result.documents["cluster"] == 0)` is a cluster's
        view; `clusters` (size, name from the labels of its distinguishing features); `features` (each
        cluster's distinguishing features with their firing rates inside and outside it).
        """
        chosen: set[int] = set()
        picked = features is not None or query is not None or criterion is not None
        if features is not None:
            chosen.update(self._feature(f) for f in features)
        if query is not None:
            chosen.update(features_matching(self.feature_labels(), query))
        if criterion is not None:
            table = self._criterion_table(criterion)
            chosen.update(
                criterion_features(
                    table, criterion, n=n_criterion_features, significant_only=significant_only
                )
            )
        if picked and not chosen:
            raise ValueError(f"Dataset {self.name!r}: the feature selection is empty; pass feature ids.")
        ids = np.unique(self.doc_ids)
        if ids.size == 0:
            raise ValueError(f"Dataset {self.name!r}: this view has no documents to cluster.")
        cols = ["feature", *pooled_value_columns(aggregation)] if aggregation in AGGREGATIONS else ["feature"]
        result = document_clusters(
            self._pooled_subset(cols),
            n_clusters,
            features=sorted(chosen) if picked else None,
            doc_ids=ids,
            n_features=self.d_sae,
            aggregation=aggregation,
            labels=self.feature_labels(),
            top_n=top_n,
            seed=seed,
            n_init=n_init,
            what=f"pooled_embeddings of {self.name!r}",
        )
        in_view = pl.DataFrame({"doc_id": self.doc_ids.astype(np.int32)}).join(
            result.documents, on="doc_id", how="left", maintain_order="left"
        )
        return DocumentClusters(
            documents=in_view,
            clusters=result.clusters,
            features=result.features,
            features_used=result.features_used,
            features_silent=result.features_silent,
        )


class DatasetRow:
    """One document of a Dataset (see `Dataset.row`)."""

    def __init__(self, dataset: Dataset, doc_id: int) -> None:
        self._dataset = dataset
        self.doc_id = doc_id

    @property
    def metadata(self) -> dict[str, Any]:
        """The document's row of raw_documents (text, source, metadata columns)."""
        store = self._dataset._store
        return store.documents.row(self._dataset._doc_position(self.doc_id), named=True)

    @property
    def text(self) -> str:
        return str(self.metadata["text"])

    def token_activations(self, feature: int, open_mark: str = "<<", close_mark: str = ">>") -> str:
        """The text with the tokens where `feature` is active wrapped in marks."""
        return self._dataset.highlight(
            feature=feature, doc_id=self.doc_id, open_mark=open_mark, close_mark=close_mark
        )

    def __repr__(self) -> str:
        return f"DatasetRow(doc_id={self.doc_id}, text={self.text[:60]!r})"


def _prepare_documents(docs: pl.DataFrame, name: str) -> pl.DataFrame:
    if "doc_id" not in docs.columns or "text" not in docs.columns:
        raise ValueError(
            f"raw_documents of {name!r} must have doc_id and text columns; it has {docs.columns}. "
            "Re-materialize raw_documents."
        )
    docs = docs.sort("doc_id")
    if docs["doc_id"].n_unique() != docs.height:
        dup = docs.filter(pl.col("doc_id").is_duplicated())["doc_id"].unique().sort().head(5).to_list()
        raise ValueError(f"raw_documents of {name!r} has duplicated doc_id values {dup}; re-materialize it.")
    return docs
