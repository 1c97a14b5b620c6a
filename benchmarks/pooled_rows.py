"""Pooled rows and stored bytes by document length: what the sizing model (interp_assets/scale.py) reads for
pooled_embeddings. SST-2 train sentences (shuffled with the seed) are joined into documents of about 16, 64
and 256 words; each length is one `datasets` partition of about `--tokens` tokens, materialized through
raw_documents -> token_activations -> pooled_embeddings with the embedded default on CPU. Per length: tokens,
nonzeros, pooled rows (distinct (document, feature) pairs), their ratio, and the stored bytes of
token_activations, tokens and pooled_embeddings from their manifests.

Usage: python benchmarks/pooled_rows.py [--tokens 40000] [--lengths 16 64 256] [--seed 0]"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dagster import DagsterInstance, materialize  # noqa: E402

from benchmarks._common import SHARED_DATA, git_state, load_average, write_results  # noqa: E402
from benchmarks.incremental import load_sentences  # noqa: E402
from interp_assets.defs.assets import ALL_ASSETS  # noqa: E402
from interp_assets.storage.parquet import read_manifest, read_table  # noqa: E402
from resources.local import local_resources  # noqa: E402

SST2 = SHARED_DATA / "sst2" / "train.tsv"
RESULTS = ROOT / "benchmarks" / "results" / "pooled_rows.json"
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def documents(sentences: list[dict], words: int, n_docs: int) -> tuple[list[dict], int]:
    """`n_docs` documents of consecutive sentences joined until each has at least `words` words, and the
    number of sentences used."""
    docs, parts, count, used = [], [], 0, 0
    while len(docs) < n_docs:
        text = sentences[used]["sentence"]
        used += 1
        parts.append(text)
        count += len(text.split())
        if count >= words:
            docs.append({"text": " ".join(parts)})
            parts, count = [], 0
    return docs, used


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=40_000, help="tokens per length (about)")
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256], help="words per document")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    need = sum(args.tokens // max(1, length // 4) for length in args.lengths) * 2
    sentences = load_sentences(SST2, min(need, 60_000), args.seed)
    by_name = {k.to_user_string(): a for a in ALL_ASSETS for k in a.keys}
    embed = [by_name[n] for n in ("raw_documents", "token_activations", "pooled_embeddings")]
    results, offset = [], 0
    with tempfile.TemporaryDirectory(prefix="pooled-rows-") as tmp:
        data = Path(tmp)
        instance = DagsterInstance.ephemeral()
        resources = local_resources(data)
        for length in args.lengths:
            n_docs = max(20, round(args.tokens / (length * 1.25)))  # about 1.25 tokens per word
            docs, used = documents(sentences[offset:], length, n_docs)
            offset += used  # each length reads its own stretch of sentences
            name = f"len{length}"
            (data / "landing").mkdir(exist_ok=True)
            with open(data / "landing" / f"{name}.jsonl", "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(d) + "\n" for d in docs)
            instance.add_dynamic_partitions("datasets", [name])
            started = time.monotonic()
            run = materialize(
                embed, partition_key=name, instance=instance, resources=resources, run_config=QUIET
            )
            assert run.success, name
            seconds = time.monotonic() - started
            base = str(data / "parquet")
            status = read_table(base, "activation_status", name).collect()
            meta = {
                t: read_manifest(str(data / "parquet" / t / name))
                for t in ("token_activations", "tokens", "pooled_embeddings")
            }
            stored = {t: sum(s["bytes"] for s in m["segments"]) for t, m in meta.items()}
            rows = {t: m["rows"] for t, m in meta.items()}
            k = rows["token_activations"] / int(status["pooled_tokens"].sum())
            results.append(
                {
                    "words_per_doc": length,
                    "documents": status.height,
                    "tokens": int(status["n_tokens"].sum()),
                    "pooled_tokens": int(status["pooled_tokens"].sum()),
                    "pooled_tokens_per_doc": float(status["pooled_tokens"].mean()),
                    "nonzeros": rows["token_activations"],
                    "nonzeros_per_doc": rows["token_activations"] / status.height,
                    "k": k,
                    "pooled_rows": rows["pooled_embeddings"],
                    "distinct_fraction": rows["pooled_embeddings"] / rows["token_activations"],
                    "token_activations_bytes": stored["token_activations"],
                    "pooled_embeddings_bytes": stored["pooled_embeddings"],
                    "bytes_per_nonzero": stored["token_activations"] / rows["token_activations"],
                    "tokens_rows": rows["tokens"],
                    "tokens_bytes": stored["tokens"],
                    "bytes_per_token_tokens": stored["tokens"] / max(1, rows["tokens"]),
                    "bytes_per_pooled_row": stored["pooled_embeddings"] / rows["pooled_embeddings"],
                    "seconds": round(seconds, 1),
                }
            )
            r = results[-1]
            print(
                f"{length:>5} words: {r['documents']:>5} docs, "
                f"{r['pooled_tokens_per_doc']:7.1f} pooled tokens/doc, "
                f"distinct {r['distinct_fraction']:.3f}, {r['bytes_per_nonzero']:.2f} B/nonzero, "
                f"tokens {r['bytes_per_token_tokens']:.2f} B/token, "
                f"{r['bytes_per_pooled_row']:.2f} B/pooled row, {seconds:.1f} s"
            )
    cfg = json.loads((ROOT / "resources" / "default_sae" / "cfg.json").read_text())
    write_results(
        {
            "params": vars(args),
            "data": "SST-2 train sentences (shared/data/sst2/train.tsv) joined into documents",
            "reader": "embedded default (all-MiniLM-L6-v2 + resources/default_sae), device cpu",
            "d_sae": cfg.get("d_sae"),
            "lengths": results,
            "load_avg": load_average(),
            "git": git_state(),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
