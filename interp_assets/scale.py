"""Sizing model on paper: wall time per stage, storage per table and cost for a corpus, a reader, an SAE and
a fleet, from the rates our benchmarks measured (`benchmarks/results/*.json`, read by `load_rates`).

Measured (read from the JSON files, never copied here): the engine's FLOP count per token and its share of
the machine's FLOP floor (activations.json), bytes per stored nonzero by SAE width and k (activations.json,
and pooled_rows.json: the default SAE, k 16), the tokens table's bytes per token (activations.json),
pooling, label+score, diff and association rates (incremental.json, score_scale.json, diff.json,
associations.json), distinct (document, feature) pairs per document by its nonzeros and pooled bytes per
row (pooled_rows.json) and the reader's load time (incremental.json). Assumed (parameters of
`Assumptions`, each documented there): a GPU's sustained matmul rate, prices and raw text bytes per token.
`scripts/plan_scale.py` prints it.

Pure: the standard library only; no Dagster, no torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
TOKEN_COUNTS = (1_000_000, 100_000_000, 10_000_000_000)  # the README table's corpus sizes


@dataclass(frozen=True)
class Corpus:
    documents: int
    tokens_per_doc: float  # tokens the reader reads per document (special tokens included)
    special_tokens_per_doc: float = 0.0  # read but neither encoded by the SAE nor stored (BERT: [CLS] [SEP])


@dataclass(frozen=True)
class Reader:
    name: str
    params: int  # all parameters of the model
    non_block_params: int  # embeddings, unembedding, final norm, pooler: parameters outside the blocks
    layers: int  # blocks of the whole model
    hook_blocks: int  # blocks run up to the SAE's hook (the forward pass stops there)
    d_model: int
    max_length: int = 512  # INTERP_MAX_LENGTH: longer documents are truncated


@dataclass(frozen=True)
class Sae:
    width: int
    k: float  # active features per token (TopK's k; L0 for ReLU / JumpReLU SAEs)


@dataclass(frozen=True)
class Fleet:
    gpus: int = 0  # GPUs for the encode step (one `sae_model` pool slot each); 0: encode on CPU workers
    cpu_workers: int = (
        1  # machines like the benchmark one (2 cores) for CPU steps (and encoding without GPUs)
    )
    shards: int | None = None  # pieces that can encode at once (datasets today); None: as many as devices


@dataclass(frozen=True)
class Assumptions:
    """Figures no benchmark here measured: every one is an assumption; pass your own."""

    # Sustained dense bf16 matmul rate of one GPU, FLOP/s. Assumed: about 60% of an H100/H200's 989 TFLOP/s
    # datasheet peak (large bf16 matmuls); never measured on this project's GPU path.
    gpu_matmul_flops: float = 6.0e14
    gpu_price_per_hour: float = 3.0  # USD per GPU-hour (assumed on-demand cloud price)
    cpu_price_per_hour: float = 0.10  # USD per CPU worker-hour (a 2-core machine like the benchmark one)
    raw_bytes_per_token: float = (
        4.0  # UTF-8 bytes of text per token (English, BPE), Parquet compression ignored
    )
    # pooled_embeddings bytes per row; None: measured (pooled_rows.json, mean over document lengths)
    pooled_bytes_per_row: float | None = None
    # Distinct (document, feature) pairs per nonzero; None: measured for the default SAE by nonzeros per
    # document (pooled_rows.json, log-log interpolation, the last segment's slope beyond): another SAE's
    # features may repeat more or less within a document.
    distinct_fraction: float | None = None
    labeled_features: int = 200  # features labeled + scored per dataset
    criteria: int = 1  # metadata criteria tested by feature_associations


@dataclass(frozen=True)
class Rates:
    """What the benchmarks measured, with the file each figure came from."""

    cpu_flops_per_s: float  # the engine's achieved FLOP/s on the 2-core benchmark machine (encode only)
    engine_efficiency: float  # achieved / FLOP floor on that machine: taken to hold on a GPU too
    bytes_per_nonzero: list[tuple[int, float, float]]  # (width, k, token_activations bytes per nonzero)
    tokens_bytes_per_token: float  # the tokens table (text and offsets of each token with a nonzero)
    cache_bytes_per_nonzero: list[tuple[int, float, float]]  # (width, k, activation-cache bytes per nonzero)
    cache_docs_bytes_per_doc: float
    pool_nonzeros_per_s: float
    distinct_per_doc: list[tuple[float, float]]  # (nonzeros per document, distinct features per document)
    pooled_bytes_per_row: float
    label_score_s_per_feature: float
    diff_rows_per_s: float
    association_rows_per_s: float
    reader_load_s: float
    sources: dict[str, str] = field(default_factory=dict)


PRESETS: dict[str, Reader] = {
    # all-MiniLM-L6-v2 (the embedded default): 22,713,216 parameters; word, position and type embeddings,
    # their LayerNorm and the pooler are outside the 6 blocks; the SAE reads layer 3's output (4 blocks).
    "minilm": Reader("all-MiniLM-L6-v2 L3", 22_713_216, 12_066_432, 6, 4, 384),
    # GPT-2 small, blocks.8.hook_resid_pre (8 blocks): tied 50,257 x 768 embedding + 1,024 positions + ln_f.
    "gpt2": Reader("gpt2-small L8", 124_439_808, 39_385_344, 12, 8, 768, max_length=1024),
    # Llama-3.1-8B(-Instruct), layer 19's output (20 blocks): untied 128,256 x 4,096 embedding and head.
    "llama-8b": Reader("Llama-3.1-8B L19", 8_030_261_248, 1_050_677_248, 32, 20, 4096, max_length=8192),
}
PRESET_SAES: dict[str, Sae] = {"minilm": Sae(4096, 16), "gpt2": Sae(24576, 64), "llama-8b": Sae(65536, 64)}
PRESET_SPECIAL: dict[str, float] = {"minilm": 2.0, "gpt2": 1.0, "llama-8b": 1.0}


def _read(results_dir: Path, name: str) -> dict[str, Any]:
    path = Path(results_dir) / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"benchmark result {path} is missing: run benchmarks/{name[:-5]}.py"
        ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"benchmark result {path} is not valid JSON: {exc}") from None


def load_rates(results_dir: Path | str = RESULTS_DIR) -> Rates:
    """Rates from the committed benchmark JSON files (KeyError names the missing field's file)."""
    results_dir = Path(results_dir)
    acts = _read(results_dir, "activations.json")
    pooled = _read(results_dir, "pooled_rows.json")
    inc = _read(results_dir, "incremental.json")
    score = _read(results_dir, "score_scale.json")
    diff = _read(results_dir, "diff.json")
    assoc = _read(results_dir, "associations.json")
    cases = acts["cases"]
    # the real SAE of the run ("default"): achieved FLOP/s and its share of the machine's FLOP floor. A run
    # of the default SAE alone (activations_default.json, a minute on a quiet machine) is preferred for the
    # speed: the full run takes an hour, long enough for other jobs to slow part of it.
    default = speed = next(c for c in cases if c["case"] == "default")
    speed_source = "activations.json"
    if (results_dir / "activations_default.json").exists():
        quiet = _read(results_dir, "activations_default.json")["cases"]
        speed = next(c for c in quiet if c["case"] == "default")
        speed_source = "activations_default.json"
    cpu_flops = speed["floor"]["total_flops"] / speed["ours"]["encode_s"]
    bpn = [(c["d_sae"], float(c["k"]), c["bytes_per_nz_token_activations"]) for c in cases]
    lengths = pooled["lengths"]
    bpn += [(pooled["d_sae"], round(x["k"], 6), x["bytes_per_nonzero"]) for x in lengths]
    distinct = sorted(
        (x["nonzeros_per_doc"], x["nonzeros_per_doc"] * x["distinct_fraction"]) for x in lengths
    )
    pooled_bytes = sum(x["pooled_embeddings_bytes"] for x in lengths) / sum(x["pooled_rows"] for x in lengths)
    cache_bpn = [(c["d_sae"], float(c["k"]), c["bytes_per_nz_cache"]) for c in cases]
    docs_bytes = default["ours"]["cache_docs_bytes"] / acts["docs"]
    fulls = [s for s in inc["steps"] if s["step"] == "full" and s["success"]]
    best = min(fulls, key=lambda s: s["step_s"]["pooled_embeddings"])
    pool_rate = best["rows"]["token_activations"] / best["step_s"]["pooled_embeddings"]
    res = score["result"]
    per_feature = res["label_score_s"] / res["features"]
    d = next(r for r in diff["results"] if r["case"] == "diff_parquet")
    diff_rate = 2 * diff["rows_per_side"] / d["seconds"]
    a = next(r for r in assoc["results"] if r["case"].endswith("_parquet"))
    assoc_rate = assoc["rows"] / a["seconds"]
    return Rates(
        cpu_flops_per_s=cpu_flops,
        engine_efficiency=speed["floor_fraction"],
        bytes_per_nonzero=bpn,
        tokens_bytes_per_token=default["bytes_per_token_tokens"],
        cache_bytes_per_nonzero=cache_bpn,
        cache_docs_bytes_per_doc=docs_bytes,
        pool_nonzeros_per_s=pool_rate,
        distinct_per_doc=distinct,
        pooled_bytes_per_row=pooled_bytes,
        label_score_s_per_feature=per_feature,
        diff_rows_per_s=diff_rate,
        association_rows_per_s=assoc_rate,
        reader_load_s=inc["reader_load_s"],
        sources={
            "cpu_flops_per_s, engine_efficiency": f"{speed_source} case 'default' (total_flops / encode_s)",
            "bytes_per_nonzero": "activations.json cases (bytes_per_nz_token_activations, _cache), "
            "pooled_rows.json lengths (bytes_per_nonzero)",
            "tokens_bytes_per_token": "activations.json case 'default' (bytes_per_token_tokens)",
            "distinct_per_doc, pooled_bytes_per_row": "pooled_rows.json lengths",
            "pool_nonzeros_per_s": "incremental.json fastest 'full' step",
            "label_score_s_per_feature": "score_scale.json result (label_score_s / features, 10,000 docs)",
            "diff_rows_per_s": "diff.json case diff_parquet (both sides' pooled rows / seconds)",
            "association_rows_per_s": f"associations.json case {a['case']} (rows / seconds, one criterion)",
            "reader_load_s": "incremental.json reader_load_s",
        },
    )


def _positive(**values: float) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive number; got {value!r}")


def validate(corpus: Corpus, reader: Reader, sae: Sae, fleet: Fleet) -> None:
    _positive(documents=corpus.documents, tokens_per_doc=corpus.tokens_per_doc)
    if not 0 <= corpus.special_tokens_per_doc < corpus.tokens_per_doc:
        raise ValueError(
            f"special_tokens_per_doc must be >= 0 and below tokens_per_doc ({corpus.tokens_per_doc}); "
            f"got {corpus.special_tokens_per_doc}"
        )
    _positive(params=reader.params, layers=reader.layers, hook_blocks=reader.hook_blocks)
    _positive(d_model=reader.d_model, max_length=reader.max_length, width=sae.width, k=sae.k)
    if reader.hook_blocks > reader.layers:
        raise ValueError(f"hook_blocks ({reader.hook_blocks}) cannot exceed layers ({reader.layers})")
    if not 0 <= reader.non_block_params < reader.params:
        raise ValueError(f"non_block_params must be >= 0 and below params ({reader.params})")
    if sae.k > sae.width:
        raise ValueError(f"k ({sae.k}) cannot exceed the SAE width ({sae.width})")
    if fleet.gpus < 0 or fleet.cpu_workers < 0:
        raise ValueError("gpus and cpu_workers cannot be negative")
    if fleet.cpu_workers == 0:
        raise ValueError("at least one CPU worker is needed (pooling, labels, diffs run on CPU)")
    if fleet.shards is not None and fleet.shards < 1:
        raise ValueError(f"shards must be >= 1; got {fleet.shards}")


def flops_per_token(reader: Reader, sae: Sae, tokens_per_doc: float, pooled_share: float = 1.0) -> dict:
    """FLOPs (2 per multiply-add) per token read, as benchmarks/activations.py's `flop_counts` counts them:
    the blocks' weight matmuls (2 x block parameters), attention at the document's length (QK^T and PV),
    the SAE encoder on the pooled tokens. Norms, biases and the SAE's top-k are not counted."""
    block_params = (reader.params - reader.non_block_params) / reader.layers
    length = min(tokens_per_doc, reader.max_length)
    return {
        "blocks": 2.0 * block_params * reader.hook_blocks,
        "attention": 4.0 * length * reader.d_model * reader.hook_blocks,
        "sae_encoder": 2.0 * reader.d_model * sae.width * pooled_share,
    }


def _interpolate(points: list[tuple[int, float, float]], width: int, k: float) -> tuple[float, bool]:
    """Value at (width, k): for each measured width the case with the nearest k (log scale), then linear in
    log2(width) between the nearest measured widths; outside them the nearest one (flagged extrapolated)."""
    by_width: dict[int, list[tuple[float, float]]] = {}
    for w, kk, v in points:
        by_width.setdefault(w, []).append((kk, v))
    values = []
    for w, cases in sorted(by_width.items()):
        near = min(abs(math.log(kk / k)) for kk, _ in cases)
        vals = [v for kk, v in cases if abs(math.log(kk / k)) == near]
        values.append((math.log2(w), sum(vals) / len(vals)))
    x = math.log2(width)
    if x <= values[0][0]:
        return values[0][1], x < values[0][0]
    if x >= values[-1][0]:
        return values[-1][1], x > values[-1][0]
    for (x0, v0), (x1, v1) in zip(values, values[1:], strict=False):
        if x0 <= x <= x1:
            return v0 + (v1 - v0) * (x - x0) / (x1 - x0), False
    raise AssertionError("unreachable")


def distinct_per_doc(rates: Rates, nonzeros_per_doc: float) -> tuple[float, bool]:
    """Distinct features of a document with `nonzeros_per_doc` nonzeros (never more than its nonzeros):
    log-log interpolation between the measured lengths, their end segments' slopes beyond (flagged)."""
    points = [(math.log(n), math.log(d)) for n, d in rates.distinct_per_doc]
    x = math.log(nonzeros_per_doc)
    if len(points) == 1:
        return min(nonzeros_per_doc, math.exp(points[0][1])), True
    outside = x < points[0][0] or x > points[-1][0]
    pairs = list(zip(points, points[1:], strict=False))
    (x0, y0), (x1, y1) = next(((p0, p1) for p0, p1 in pairs if x <= p1[0]), pairs[-1])
    y = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return min(nonzeros_per_doc, math.exp(y)), outside


def bytes_per_nonzero(rates: Rates, width: int, k: float) -> tuple[float, bool]:
    """token_activations bytes per stored nonzero at (width, k), and whether that is outside the measured
    widths."""
    return _interpolate(rates.bytes_per_nonzero, width, k)


def plan(
    corpus: Corpus,
    reader: Reader,
    sae: Sae,
    fleet: Fleet,
    rates: Rates,
    assumptions: Assumptions | None = None,
) -> dict[str, Any]:
    """Wall time per stage (seconds), storage per table (rows, bytes) and cost for one corpus."""
    a = assumptions or Assumptions()
    validate(corpus, reader, sae, fleet)
    _positive(gpu_matmul_flops=a.gpu_matmul_flops, raw_bytes_per_token=a.raw_bytes_per_token)
    pooled_bytes = (
        a.pooled_bytes_per_row if a.pooled_bytes_per_row is not None else rates.pooled_bytes_per_row
    )
    _positive(pooled_bytes_per_row=pooled_bytes)
    if a.gpu_price_per_hour < 0 or a.cpu_price_per_hour < 0:
        raise ValueError("prices cannot be negative")
    read_per_doc = min(corpus.tokens_per_doc, reader.max_length)
    pooled_per_doc = read_per_doc - corpus.special_tokens_per_doc
    tokens_read = corpus.documents * read_per_doc
    pooled_tokens = corpus.documents * pooled_per_doc
    nonzeros = pooled_tokens * sae.k
    fpt = flops_per_token(reader, sae, read_per_doc, pooled_per_doc / read_per_doc)
    flops = tokens_read * sum(fpt.values())

    on_gpu = fleet.gpus > 0
    devices = fleet.gpus if on_gpu else fleet.cpu_workers
    parallel = min(devices, fleet.shards if fleet.shards is not None else devices)
    rate = a.gpu_matmul_flops * rates.engine_efficiency if on_gpu else rates.cpu_flops_per_s
    encode_s = flops / (rate * parallel) + rates.reader_load_s
    cpu_parallel = min(fleet.cpu_workers, fleet.shards if fleet.shards is not None else fleet.cpu_workers)
    pool_s = nonzeros / (rates.pool_nonzeros_per_s * cpu_parallel)
    nz_per_doc = pooled_per_doc * sae.k
    if a.distinct_fraction is not None:
        if not 0 < a.distinct_fraction <= 1:
            raise ValueError(f"distinct_fraction must be in (0, 1]; got {a.distinct_fraction}")
        per_doc, distinct_extrapolated = a.distinct_fraction * nz_per_doc, False
    else:
        per_doc, distinct_extrapolated = distinct_per_doc(rates, nz_per_doc)
    pooled_rows = corpus.documents * min(sae.width, per_doc)
    label_s = a.labeled_features * rates.label_score_s_per_feature
    diff_s = 2 * pooled_rows / rates.diff_rows_per_s  # against a corpus as large: both sides' pooled rows
    assoc_s = a.criteria * pooled_rows / rates.association_rows_per_s
    stages = {
        "encode": encode_s,
        "pool": pool_s,
        "label_score": label_s,
        "diff": diff_s,
        "associations": assoc_s,
    }

    bpn, extrapolated = bytes_per_nonzero(rates, sae.width, sae.k)
    cache_bpn, _ = _interpolate(rates.cache_bytes_per_nonzero, sae.width, sae.k)
    storage = {
        "raw_documents": {"rows": corpus.documents, "bytes": pooled_tokens * a.raw_bytes_per_token},
        "token_activations": {"rows": nonzeros, "bytes": nonzeros * bpn},
        "tokens": {"rows": pooled_tokens, "bytes": pooled_tokens * rates.tokens_bytes_per_token},
        "activation_cache": {
            "rows": nonzeros,
            "bytes": nonzeros * cache_bpn + corpus.documents * rates.cache_docs_bytes_per_doc,
        },
        "pooled_embeddings": {"rows": pooled_rows, "bytes": pooled_rows * pooled_bytes},
    }
    total_bytes = sum(t["bytes"] for t in storage.values())
    gpu_hours = fleet.gpus * encode_s / 3600 if on_gpu else 0.0
    # GPUs are held for the encode step; CPU workers for the whole run (they pool, label and diff)
    cpu_hours = fleet.cpu_workers * sum(stages.values()) / 3600
    notes = []
    if corpus.tokens_per_doc > reader.max_length:
        notes.append(f"documents are truncated to max_length {reader.max_length} tokens")
    if extrapolated:
        notes.append(f"bytes per nonzero at width {sae.width} is outside the measured widths (nearest used)")
    if distinct_extrapolated:
        notes.append(
            f"{nz_per_doc:,.0f} nonzeros per document is outside the measured range: distinct features per "
            "document extrapolated (pooled_rows.json)"
        )
    if parallel < devices:
        notes.append(f"only {parallel} of {devices} encode devices busy: {parallel} shard(s)")
    return {
        "inputs": {
            "corpus": asdict(corpus),
            "reader": asdict(reader),
            "sae": asdict(sae),
            "fleet": asdict(fleet),
            "assumptions": asdict(a),
        },
        "tokens_read": tokens_read,
        "pooled_tokens": pooled_tokens,
        "flops_per_token": fpt,
        "encode_device": "gpu" if on_gpu else "cpu",
        "encode_parallel": parallel,
        "encode_tokens_per_s_per_device": rate / sum(fpt.values()),
        "seconds": stages,
        "wall_s": sum(stages.values()),  # stages one after another (a dataset's steps are sequential)
        "storage": storage,
        "bytes_per_nonzero": bpn,
        "total_bytes": total_bytes,
        "gpu_hours": gpu_hours,
        "cpu_worker_hours": cpu_hours,
        "cost_usd": gpu_hours * a.gpu_price_per_hour + cpu_hours * a.cpu_price_per_hour,
        "notes": notes,
    }


def human_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def human_bytes(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if b < 1000 or unit == "PB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1000
    raise AssertionError("unreachable")


def human_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"
