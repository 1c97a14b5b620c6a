"""Document-level features: one embedding per document, and a TopK SAE trained on the user's own documents.

The token-level SAE reads every token; a topic that makes up a few percent of a dataset then moves
"fires in the document" very little, because token features fire somewhere in most documents. A
document-level SAE (the HypotheSAEs method) is trained label-blind on one mean-pooled embedding per
document of the datasets being compared, so its features are sparse per document: a planted topic
gets a feature that fires in its documents and few others.

- `document_embeddings`: the reader model's hidden states at one layer, mean-pooled over each document's
  tokens (attention mask), L2-normalized. With the last layer of the embedded all-MiniLM-L6-v2 this is its
  sentence embedding (the sentence-transformers recipe); the document_embeddings asset's default is the
  layer the reader's SAE reads.
- `document_sae_size`: width and k by corpus size (HypotheSAEs' guidance: about 64/k=4 for 1k documents,
  256/8 for 10k, 1024/8 for 100k).
- `fit_lexical_projection` / `lexical_profiles` / `document_representation`: optionally, what the
  document SAE reads beside the embedding: a lexical profile (TF-IDF of the token-level SAE features that
  fire in the document, reduced by a truncated SVD fit on the same corpus). Sentence embeddings blur a
  rare topic into its neighbours; the concepts its documents name (a species, a village) keep it apart.
- `train_document_sae` / `encode_documents`: SAELens training (`sae_training`) and sparse encoding.
- `train_document_saes`: an ensemble of independently seeded document SAEs whose features together form
  the document family. One SAE trained on a few thousand documents gives a topic that makes up 1-3% of
  them a feature of its own only some of the time (which topics win depends on the seed); several
  members give it several chances. Member i's feature f is family feature i * d_sae + f.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from interp_assets.engine.bert_forward import mean_over_documents
from interp_assets.engine.reader_model import EMBEDDED_READER, model_lock, shared_reader_model
from interp_assets.storage.checksums import checksum_problem, file_record
from interp_assets.storage.parquet import write_bytes_atomic

# bumped when training or encoding changes what document features hold (2: the optional lexical profile;
# 3: an ensemble of seeded members; 4: the members train together in one stacked model)
DOCUMENT_SAE_VERSION = "4"
DEFAULT_MEMBERS = 3


DOCUMENT_MAX_LENGTH = 256  # tokens a document embedding reads; longer texts are truncated


def document_embeddings(
    texts: Sequence[str],
    model: str = EMBEDDED_READER,
    layer: int | None = None,
    normalize: bool = True,
    batch_size: int = 64,
    max_length: int = DOCUMENT_MAX_LENGTH,
    on_batch: Callable[[int], None] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> np.ndarray:
    """Embed `texts` as an `(n, hidden)` float32 array (row i is text i); `on_batch(done)` hears progress.
    The model runs on `device` ("cpu", "cuda", "cuda:1", "mps") in `dtype` (float32, bfloat16, float16).

    Hidden states of `layer` (an index into the model's hidden states: 0 = embeddings, None or -1 = the
    last layer) are averaged over each text's tokens and, with `normalize`, scaled to unit length.
    Texts are batched by length (less padding); longer texts are truncated to `max_length` tokens.
    """
    import torch

    tokenizer, net = shared_reader_model(model, device, dtype)
    dim = int(net.config.hidden_size)
    texts = [str(t) for t in texts]
    out = np.zeros((len(texts), dim), dtype=np.float32)
    if not texts:
        return out
    n_layers = int(getattr(net.config, "num_hidden_layers", 0) or 0)
    hidden_index = hidden_state_index(layer, n_layers)
    fused = _fused_forward(net, hidden_index, n_layers)
    order = np.argsort([len(t) for t in texts], kind="stable")
    with model_lock(net), torch.inference_mode():  # the reader may share this model (`model_lock`)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
                split_special_tokens=True,  # "[SEP]" in a text is text
            ).to(device)
            mask = enc["attention_mask"].bool()
            if fused is not None:  # hidden states of real tokens only, [n_tokens, d] in row-major order
                forward, workspace = fused
                pooled = mean_over_documents(forward(enc["input_ids"], mask, mask, workspace), mask)
            else:
                if hidden_index == n_layers:
                    hidden = net(**enc).last_hidden_state
                else:
                    hidden = net(**enc, output_hidden_states=True).hidden_states[hidden_index]
                pooled = pool_hidden_states(hidden, mask, normalize=False)
            pooled = pooled.float()
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out[idx] = pooled.cpu().numpy()
            if on_batch is not None:
                on_batch(min(start + batch_size, len(order)))
    return out


def hidden_state_index(layer: int | None, n_layers: int) -> int:
    """The index into a model's hidden states (0 = embeddings .. `n_layers` = last layer) that `layer` names
    (None or -1: the last; negative counts from the end). Raises ValueError outside them."""
    if layer is not None and n_layers and not -n_layers - 1 <= layer <= n_layers:
        raise ValueError(
            f"layer={layer} is outside the model's hidden states (0..{n_layers}, or negative from the end)."
        )
    return n_layers if layer is None else layer % (n_layers + 1)


def pool_hidden_states(hidden: Any, attention_mask: Any, normalize: bool = True) -> Any:
    """The document-embedding recipe on a batch of hidden states `[batch, tokens, d]`: the mean over each
    row's real tokens (`attention_mask`), as float32, scaled to unit length with `normalize`."""
    import torch

    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = ((hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)).float()
    return torch.nn.functional.normalize(pooled, p=2, dim=1) if normalize else pooled


def _fused_forward(net: Any, hidden_index: int, n_layers: int) -> tuple[Any, Any] | None:
    """The fused BERT forward (same numbers, less work: no padding through the projections) up to hidden
    state `hidden_index`, with its workspace; None for models it does not cover (the Hugging Face forward)."""
    from interp_assets.engine.allocator import Workspace
    from interp_assets.engine.bert_forward import BertForward, supports_bert_forward

    if not n_layers or not supports_bert_forward(net) or str(next(net.parameters()).device) != "cpu":
        return None
    if hidden_index == n_layers:
        return BertForward(net, n_layers - 1, "post"), Workspace()
    return BertForward(net, hidden_index, "pre"), Workspace()


def document_sae_size(n_docs: int) -> tuple[int, int]:
    """`(d_sae, k)` for a document SAE trained on `n_docs` documents.

    Width grows like n^0.6 (64 at 1k documents, 256 at 10k, 1,024 at 100k: HypotheSAEs' guidance), rounded
    to a power of two and kept within 16..4,096; k is 4 below 5,000 documents and 8 from there.
    """
    if n_docs <= 0:
        raise ValueError(f"A document SAE needs documents; got n_docs={n_docs}.")
    width = 64 * (n_docs / 1000) ** 0.6
    d_sae = int(min(4096, max(16, 2 ** round(math.log2(width)))))
    return d_sae, (4 if n_docs < 5000 else 8)


@dataclass(frozen=True)
class DocumentSAEConfig:
    """How a document SAE is trained (saved beside it). `d_sae`/`k` of 0 mean `document_sae_size`.

    `members`: how many SAEs `train_document_saes` trains (seeds `seed`, `seed + 1`, ...);
    `train_document_sae` trains one, with `seed`. Training runs `max_epochs` passes over the documents,
    at most `steps` batches: a small corpus needs fewer steps than a large one.
    """

    d_sae: int = 0
    k: int = 0
    steps: int = 2000
    max_epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    members: int = DEFAULT_MEMBERS


def document_sae_training_settings(n_docs: int, config: DocumentSAEConfig) -> dict[str, Any]:
    """`train_topk_saes`' settings (all but the seeds) for a document SAE on `n_docs` documents: width and
    k from `config` or by corpus size (`document_sae_size`), `config.max_epochs` passes over the documents
    but at most `config.steps` batches, and a latent counted dead after 5 passes without firing."""
    auto_d, auto_k = document_sae_size(n_docs)
    d_sae = config.d_sae or auto_d
    k = config.k or auto_k
    if not 0 < k < d_sae:
        raise ValueError(f"Document SAE needs 0 < k < d_sae; got k={k}, d_sae={d_sae}.")
    batch = min(config.batch_size, n_docs)
    return {
        "d_sae": d_sae,
        "k": k,
        "epochs": min(float(config.max_epochs), config.steps / max(1, n_docs // batch)),
        "batch_size": batch,
        "lr": config.lr,
        "metadata": {"hook_name": "document_embedding", "model_name": "document_embeddings"},
        "dead_feature_samples": max(10 * batch, 5 * n_docs),
    }


def train_document_sae(
    embeddings: np.ndarray, config: DocumentSAEConfig, stop: threading.Event | None = None
) -> tuple[Any, dict[str, Any]]:
    """Train one TopK SAE on document embeddings (`[n, d]`) with seed `config.seed`; `(sae, report)`.

    The report holds the size used, samples seen, fraction of variance explained, mean L0 and the dead
    feature fraction on the training documents. Setting `stop` ends the training early (TrainingStopped).
    """
    saes, report = train_document_saes(embeddings, replace(config, members=1), stop)
    return saes[0], report["member_reports"][0]


def train_document_saes(
    embeddings: np.ndarray, config: DocumentSAEConfig, stop: threading.Event | None = None
) -> tuple[list[Any], dict[str, Any]]:
    """`config.members` document SAEs on the same embeddings, seeds `config.seed + i`; `(saes, report)`.

    The members train together (`sae_training.train_topk_saes`), each exactly as its seed trains alone.
    The report holds the members' shared size (`d_sae` per member, `k`), `members`, `n_features` (all
    members' features), each member's report under "member_reports", and the family's quality: mean
    fraction of variance explained and the dead share of all features.
    """
    import torch

    from interp_assets.engine.sae_training import evaluate_sae, train_topk_saes

    if config.members < 1:
        raise ValueError(f"A document SAE ensemble needs members >= 1; got members={config.members}.")
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"Document embeddings must be [n_docs >= 2, dim]; got shape {x.shape}.")
    n = x.shape[0]
    settings = document_sae_training_settings(n, config)
    d_sae, k = settings["d_sae"], settings["k"]
    acts = torch.from_numpy(x)
    seeds = [config.seed + i for i in range(config.members)]
    saes, seen = train_topk_saes(acts, seeds=seeds, stop=stop, **settings)
    reports = []
    for seed, sae in zip(seeds, saes, strict=True):
        quality = evaluate_sae(sae, acts)
        reports.append(
            {
                "d_in": int(x.shape[1]),
                "d_sae": d_sae,
                "k": k,
                "n_documents": n,
                "samples_seen": int(seen),
                "fraction_variance_explained": float(quality["fraction_variance_explained"]),
                "mean_l0": float(quality["mean_l0"]),
                "dead_feature_fraction": float(quality["dead_feature_fraction"]),
                "seed": seed,
            }
        )
    report = {
        "d_in": int(x.shape[1]),
        "d_sae": d_sae,
        "k": k,
        "members": config.members,
        "n_features": d_sae * config.members,
        "n_documents": n,
        "samples_seen": int(seen) * config.members,
        "fraction_variance_explained": float(np.mean([r["fraction_variance_explained"] for r in reports])),
        "mean_l0": float(np.mean([r["mean_l0"] for r in reports])),
        "dead_feature_fraction": float(np.mean([r["dead_feature_fraction"] for r in reports])),
        "member_reports": reports,
    }
    return saes, report


def _member_activations(sae: Any, embeddings: Any) -> Iterator[tuple[int, np.ndarray]]:
    """Each member SAE's dense activations `[n, d_sae]` (float32) on `embeddings`, with the offset of its
    features in the family (member i's feature f is i * d_sae + f). `sae`: one SAE or a list of members."""
    import torch

    members = list(sae) if isinstance(sae, list | tuple) else [sae]
    x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
    offset = 0
    with torch.inference_mode():
        for member in members:
            yield offset, member.encode(x).float().numpy()
            offset += int(member.cfg.d_sae)


def encode_documents(sae: Any, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse document features: `(row, feature, activation)` of every nonzero, row = embeddings row.

    `sae` is one SAE or a list of ensemble members; member i's feature f comes out as i * d_sae + f.
    """
    rows_out, cols_out, vals_out = [], [], []
    for offset, feats in _member_activations(sae, embeddings):
        rows, cols = np.nonzero(feats > 0)
        rows_out.append(rows.astype(np.int64))
        cols_out.append((cols + offset).astype(np.int32))
        vals_out.append(feats[rows, cols].astype(np.float32))
    rows, cols, vals = np.concatenate(rows_out), np.concatenate(cols_out), np.concatenate(vals_out)
    order = np.lexsort((cols, rows))  # by document, then feature, as one SAE gives them
    return rows[order], cols[order], vals[order]


def document_feature_matrix(sae: Any, embeddings: Any) -> np.ndarray:
    """The dense form of `encode_documents`: `[n, n_features]` float32 activations (0 where a feature does
    not fire), member i's feature f in column i * d_sae + f. `embeddings` is a numpy array or a tensor."""
    return np.concatenate([feats for _, feats in _member_activations(sae, embeddings)], axis=1)


# --------------------------------------------------------------------------- lexical profiles

LEXICAL_PROJECTION_FILE = "lexical_projection.npz"


@dataclass(frozen=True)
class LexicalProjection:
    """TF-IDF weights and truncated-SVD components of the token-feature profile (fit label-blind)."""

    idf: np.ndarray  # (n_token_features,)
    components: np.ndarray  # (dims, n_token_features)


def _fired_matrix(doc_rows: np.ndarray, features: np.ndarray, n_docs: int, n_features: int) -> Any:
    """Binary document x token-feature matrix (CSR, float32): 1 where the feature fires in the document,
    however often a pair is listed; features at or beyond `n_features` are left out."""
    from scipy import sparse

    keep = features < n_features
    x = sparse.csr_matrix(
        (np.ones(int(keep.sum()), dtype=np.float32), (doc_rows[keep], features[keep])),
        shape=(n_docs, n_features),
    )
    x.sum_duplicates()
    x.data[:] = 1.0
    return x


def _tfidf_rows(fired: Any, idf: np.ndarray) -> Any:
    """`fired` weighted by `idf`, each document's row scaled to unit length."""
    from scipy import sparse

    x = fired @ sparse.diags(idf.astype(np.float32))
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    return sparse.diags((1.0 / np.maximum(norms, 1e-12)).astype(np.float32)) @ x


def _top_right_singular_vectors(x: Any, k: int, seed: int, power_iterations: int = 3) -> np.ndarray:
    """The top `k` right singular vectors of a sparse matrix (`(k, n_columns)`), by the randomized range
    finder of Halko, Martinsson and Tropp (2011) with power iterations: a few sparse products instead of
    an iterative eigensolver. Deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    omega = rng.standard_normal((x.shape[1], min(k + 10, min(x.shape)))).astype(np.float32)
    q, _ = np.linalg.qr(x @ omega)
    for _ in range(power_iterations):
        z, _ = np.linalg.qr(x.T @ q)
        q, _ = np.linalg.qr(x @ z)
    _, _, vt = np.linalg.svd((x.T @ q).T, full_matrices=False)
    return vt[:k]


def fit_lexical_projection(
    doc_rows: np.ndarray, features: np.ndarray, n_docs: int, dims: int, seed: int = 0
) -> LexicalProjection:
    """Fit the lexical profile on a corpus: which token-level SAE features fire in which documents.

    `(doc_rows[i], features[i])` says token feature `features[i]` fires somewhere in document `doc_rows[i]`
    (0 <= doc_rows < n_docs). Features are weighted by smoothed inverse document frequency (a feature in
    every document says nothing), each document's vector is scaled to unit length, and a truncated SVD keeps
    `dims` directions (fewer when the corpus is smaller). Deterministic for a given seed.
    """
    doc_rows = np.asarray(doc_rows, dtype=np.int64)
    features = np.asarray(features, dtype=np.int64)
    if dims < 1:
        raise ValueError(f"A lexical profile needs dims >= 1; got {dims}.")
    if features.size and (features.min() < 0 or doc_rows.min() < 0 or doc_rows.max() >= n_docs):
        raise ValueError("fit_lexical_projection: features must be >= 0 and doc_rows within 0..n_docs-1.")
    n_features = int(features.max()) + 1 if features.size else 1
    fired = _fired_matrix(doc_rows, features, n_docs, n_features)
    df = np.bincount(fired.indices, minlength=n_features)
    idf = np.log((1.0 + n_docs) / (1.0 + df)) + 1.0
    x = _tfidf_rows(fired, idf)
    k = min(dims, min(x.shape) - 1)
    if k < 1 or x.nnz == 0:
        return LexicalProjection(idf=idf, components=np.zeros((0, n_features), dtype=np.float32))
    components = _top_right_singular_vectors(x, k, seed)
    return LexicalProjection(idf=idf, components=components.astype(np.float32))


def lexical_profiles(
    doc_rows: np.ndarray, features: np.ndarray, n_docs: int, projection: LexicalProjection
) -> np.ndarray:
    """`(n_docs, dims)` unit-length lexical profiles of documents under a fitted projection.

    Token features the projection never saw are ignored; a document with no known feature gets zeros.
    """
    doc_rows, features = np.asarray(doc_rows, dtype=np.int64), np.asarray(features, dtype=np.int64)
    fired = _fired_matrix(doc_rows, features, n_docs, projection.idf.size)
    x = _tfidf_rows(fired, projection.idf)
    out = np.asarray(x @ projection.components.T, dtype=np.float32)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return (out / np.maximum(norms, 1e-12)).astype(np.float32)


def document_representation(embeddings: np.ndarray, profiles: np.ndarray | None) -> np.ndarray:
    """What the document SAE reads: the embedding beside the lexical profile, the pair scaled to unit length.

    Both parts are unit length, so each carries half of the squared norm: the sentence embedding brings
    what the text is about as a whole, the profile which concepts the token-level SAE saw in it (rare ones
    weigh most), so a topic that few documents share stands out in at least one of them.
    """
    x = np.asarray(embeddings, dtype=np.float32)
    if profiles is not None and profiles.shape[1]:
        if profiles.shape[0] != x.shape[0]:
            raise ValueError(f"{x.shape[0]} embeddings but {profiles.shape[0]} lexical profiles.")
        x = np.concatenate([x, profiles.astype(np.float32)], axis=1)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def save_lexical_projection(projection: LexicalProjection, folder: str) -> None:
    """Write the projection beside the document SAE that reads it."""
    from pathlib import Path

    Path(folder).mkdir(parents=True, exist_ok=True)
    np.savez(Path(folder) / LEXICAL_PROJECTION_FILE, idf=projection.idf, components=projection.components)


def load_lexical_projection(folder: str) -> LexicalProjection | None:
    """The projection saved beside a document SAE, or None (an SAE trained on embeddings alone)."""
    from pathlib import Path

    path = Path(folder) / LEXICAL_PROJECTION_FILE
    if not path.exists():
        return None
    with np.load(path) as data:
        return LexicalProjection(idf=data["idf"], components=data["components"])


MEMBER_FOLDER = "member_{:02d}"
TRAINING_REPORT = "training_report.json"  # written last: its presence marks a finished save


def save_document_sae(sae: Any, folder: str, report: dict[str, Any]) -> None:
    """Save a document SAE (or an ensemble's members, in `member_00/`, `member_01/`, ...) in SAELens's
    on-disk format, with the training report beside it, written last: its presence marks the save done."""
    import json
    from pathlib import Path

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(sae, list | tuple):
        for i, member in enumerate(sae):
            member.save_inference_model(out / MEMBER_FOLDER.format(i))
    else:
        sae.save_inference_model(out)
    files = {
        str(p.relative_to(out)): file_record(str(p))
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != TRAINING_REPORT
    }
    payload = json.dumps(report | {"files": files}, indent=2, sort_keys=True) + "\n"
    write_bytes_atomic(str(out / TRAINING_REPORT), payload.encode())


def document_sae_problem(folder: str) -> str | None:
    """Why the document SAE saved in `folder` cannot be trusted (a file missing, or not of the size and
    SHA-256 its training report recorded), or None. Folders saved before files were recorded are checked
    for their report only."""
    import json
    from pathlib import Path

    report_path = Path(folder) / TRAINING_REPORT
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{report_path}: {type(exc).__name__}: {exc}"
    for name, record in (report.get("files") or {}).items():
        path = Path(folder) / name
        try:
            problem = checksum_problem(str(path), record)
        except OSError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem:
            return f"{path}: {problem}"
    return None


def load_document_sae(folder: str) -> Any:
    """What `save_document_sae` saved (SAELens `SAE.load_from_disk`, on the CPU): the list of an
    ensemble's members, or the one SAE of a folder without members."""
    from pathlib import Path

    from sae_lens import SAE

    members = sorted(p for p in Path(folder).glob("member_*") if p.is_dir())
    if not members:
        return SAE.load_from_disk(folder, device="cpu")
    return [SAE.load_from_disk(str(p), device="cpu") for p in members]


def document_feature_spans(document_features: Any, documents: Any) -> Any:
    """Document features in the wide token_activations shape (token_activations joined with tokens: one
    whole-document span per active feature).

    Lets the labelers, scorers and report excerpts that read token activations work on document-level
    features: the feature "fires on" the whole document. Columns: doc_id, token_index, token, char_start,
    char_end, feature, activation.
    """
    import polars as pl

    lengths = documents.select(pl.col("doc_id").cast(pl.Int32), pl.col("text").str.len_chars().alias("n"))
    return (
        document_features.select(
            pl.col("doc_id").cast(pl.Int32),
            pl.col("feature").cast(pl.Int32),
            pl.col("activation").cast(pl.Float32),
        )
        .join(lengths, on="doc_id", how="inner")
        .select(
            "doc_id",
            pl.lit(0, dtype=pl.Int32).alias("token_index"),
            pl.lit("", dtype=pl.String).alias("token"),
            pl.lit(0, dtype=pl.Int32).alias("char_start"),
            pl.col("n").cast(pl.Int32).alias("char_end"),
            "feature",
            "activation",
        )
    )
