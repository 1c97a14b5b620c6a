"""Train the embedded default SAE: a TopK SAE on layer-3 residual activations of all-MiniLM-L6-v2 over
SST-2 and DBpedia (short movie reviews and encyclopaedic entity descriptions: more varied text than either).

Re-runnable and deterministic for a given --seed. Reads tab-separated corpora with a header: SST-2's
`sentence\tlabel` or DBpedia's `text\tcategory\tsplit` (`PATH:SPLIT` keeps the rows of one split; labels
and categories are never read, so the SAE is label-blind). Runs the embedded reader model in
length-sorted batches, keeps the hidden state of every real token (no [CLS], [SEP] or padding), and trains
with SAELens's own `SAETrainer` + `TopKTrainingSAE` fed from an in-memory activation iterator
(`interp_assets/engine/sae_training.py`, which also trains the document SAEs). Writes SAELens's on-disk
format (`cfg.json` + `sae_weights.safetensors`, loadable with `sae_lens.SAE.load_from_disk`) and
`training_report.json` with held-out metrics per corpus (SST-2 dev, DBpedia's test split) and the median
share of features a document activates once max-pooled.

    python scripts/train_default_sae.py            # defaults: layer 3, d_sae 4096, k 16
    python scripts/train_default_sae.py --limit 2000 --epochs 1 --out /tmp/sae_smoke   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Nothing here may reach the network: no wandb, no hub downloads.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from interp_assets.engine.reader_model import EMBEDDED_READER, load_reader_model  # noqa: E402
from interp_assets.engine.sae_training import evaluate_sae as evaluate  # noqa: E402
from interp_assets.engine.sae_training import train_topk_sae  # noqa: E402

DEFAULT_DATA = ("../shared/data/sst2/train.tsv", "../shared/data/dbpedia/dbpedia.tsv:val")
DEFAULT_DEV = ("../shared/data/sst2/dev.tsv", "../shared/data/dbpedia/dbpedia.tsv:test")
TEXT_COLUMNS = ("sentence", "text")


def split_spec(spec: str) -> tuple[str, str | None]:
    """`PATH[:SPLIT]` -> (path, split or None)."""
    path, sep, split = spec.rpartition(":")
    if sep and path and "/" not in split and split:
        return path, split
    return spec, None


def read_sentences(path: Path, limit: int | None = None, split: str | None = None) -> list[str]:
    """The text column (`sentence` or `text`) of a tab-separated file with a header, optionally only
    the rows whose `split` column equals `split`. Other columns (labels, categories) are not read."""
    with path.open(encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        text_col = next((header.index(c) for c in TEXT_COLUMNS if c in header), None)
        if text_col is None:
            raise ValueError(f"{path}: expected a header with a 'sentence' or 'text' column, got {header!r}.")
        split_col = None
        if split is not None:
            if "split" not in header:
                raise ValueError(f"{path}: asked for split {split!r} but the header has no 'split' column.")
            split_col = header.index("split")
        sentences: list[str] = []
        for line_no, line in enumerate(handle, start=2):
            line = line.rstrip("\n")
            if not line:
                continue
            fields = line.split("\t")
            if len(fields) != len(header):
                raise ValueError(
                    f"{path}, line {line_no}: {len(fields)} fields, the header has {len(header)}."
                )
            if split_col is not None and fields[split_col] != split:
                continue
            text = fields[text_col].strip()
            if not text:
                raise ValueError(f"{path}, line {line_no}: empty text.")
            sentences.append(text)
            if limit is not None and len(sentences) >= limit:
                break
    return sentences


def corpus_label(spec: str) -> str:
    """A machine-independent name for a corpus spec: `sst2/train.tsv`, `dbpedia/dbpedia.tsv:val`."""
    path, split = split_spec(spec)
    name = "/".join(Path(path).parts[-2:])
    return f"{name}:{split}" if split else name


@torch.inference_mode()
def extract_activations(
    tokenizer: Any,
    model: Any,
    sentences: Sequence[str],
    layer: int,
    batch_size: int = 256,
    max_length: int = 512,
    token_counts: list[int] | None = None,
) -> torch.Tensor:
    """Return `[n_tokens, d_model]` float32 outputs of `model.encoder.layer[layer]` for every real token.

    Sentences are batched in length order so padding stays small; [CLS], [SEP] and padding are dropped.
    A `token_counts` list receives each sentence's number of rows, in the order they are returned.
    """
    encoded = tokenizer(list(sentences), truncation=True, max_length=max_length)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    order = sorted(range(len(sentences)), key=lambda i: lengths[i])
    captured: list[torch.Tensor] = []

    def hook(_module: Any, _inputs: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    # Layers after the hook point do not change the activations we keep: skip them.
    full_layers = model.encoder.layer
    model.encoder.layer = full_layers[: layer + 1]
    handle = full_layers[layer].register_forward_hook(hook)
    chunks: list[torch.Tensor] = []
    try:
        for start in range(0, len(order), batch_size):
            batch = [sentences[i] for i in order[start : start + batch_size]]
            enc = tokenizer(
                batch,
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
                return_special_tokens_mask=True,
            )
            keep = enc["attention_mask"].bool() & ~enc["special_tokens_mask"].bool()
            captured.clear()
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            chunks.append(captured[0][keep].float().clone())
            if token_counts is not None:
                token_counts.extend(keep.sum(dim=1).tolist())
    finally:
        handle.remove()
        model.encoder.layer = full_layers
    return torch.cat(chunks)


def _resolve(path: str) -> Path:
    candidate = Path(path)
    return candidate if candidate.is_absolute() else (REPO_ROOT / candidate).resolve()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layer", type=int, default=3, help="encoder layer whose output is read (default 3)")
    parser.add_argument("--d-sae", type=int, default=4096, help="number of SAE features (default 4096)")
    parser.add_argument("--k", type=int, default=16, help="active features per token (default 16)")
    parser.add_argument("--epochs", type=float, default=3.0, help="passes over the training tokens")
    parser.add_argument("--batch-size", type=int, default=1024, help="tokens per SAE step (default 1024)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate (cosine to lr/10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data", action="append", help="training TSV[:SPLIT], repo-relative; repeat for several corpora"
    )
    parser.add_argument("--dev", action="append", help="held-out TSV[:SPLIT], repo-relative; repeatable")
    parser.add_argument("--out", default="resources/default_sae", help="output folder, repo-relative")
    parser.add_argument(
        "--limit", type=int, default=None, help="use only the first N texts of each corpus (smoke runs)"
    )
    args = parser.parse_args(argv)
    args.data = args.data or list(DEFAULT_DATA)
    args.dev = args.dev or list(DEFAULT_DEV)
    return args


def median_document_density(sae: Any, acts: torch.Tensor, lengths: Sequence[int]) -> float:
    """Median share of the SAE's features that a document activates once max-pooled over its tokens
    (`acts` holds the documents' tokens back to back, `lengths` tokens each)."""
    fired = torch.zeros(len(lengths))
    start = 0
    with torch.no_grad():
        for i, n in enumerate(lengths):
            fired[i] = (sae.encode(acts[start : start + n]) > 0).any(dim=0).sum()
            start += n
    return float(fired.median()) / int(sae.cfg.d_sae)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Extract activations, train, save in SAELens format, evaluate on dev; returns the report."""
    args = parse_args(argv)
    import sae_lens
    from sae_lens import SAE

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out_dir = _resolve(args.out)

    tokenizer, model = load_reader_model(EMBEDDED_READER)
    n_layers = len(model.encoder.layer)
    if not 0 <= args.layer < n_layers:
        raise SystemExit(f"--layer must be in 0..{n_layers - 1}; got {args.layer}.")

    def read(specs: Sequence[str]) -> dict[str, list[str]]:
        corpora = {}
        for spec in specs:
            path, split = split_spec(spec)
            corpora[corpus_label(spec)] = read_sentences(_resolve(path), args.limit, split)
        return corpora

    t0 = time.perf_counter()
    train_corpora = read(args.data)
    train_acts = torch.cat(
        [extract_activations(tokenizer, model, texts, args.layer) for texts in train_corpora.values()]
    )
    dev_corpora = read(args.dev)
    dev_acts: dict[str, tuple[torch.Tensor, list[int]]] = {}
    for name, texts in dev_corpora.items():
        counts: list[int] = []
        dev_acts[name] = (
            extract_activations(tokenizer, model, texts, args.layer, token_counts=counts),
            counts,
        )
    extract_s = time.perf_counter() - t0
    n_train = sum(len(t) for t in train_corpora.values())
    print(
        f"extracted {train_acts.shape[0]:,} train tokens ({n_train:,} texts) in {extract_s:.0f}s", flush=True
    )

    hook_name = f"blocks.{args.layer}.hook_resid_post"
    metadata = {
        "model_name": EMBEDDED_READER,
        "hook_name": hook_name,
        "hook_module": f"encoder.layer.{args.layer}",
        "hook_head_index": None,
        "dataset_path": "+".join(train_corpora),
        "context_size": 512,
        "prepend_bos": True,  # BERT inputs carry [CLS] ... [SEP]; those positions were not trained on
        "exclude_special_tokens": True,
        "seqpos_slice": None,
        "model_from_pretrained_kwargs": {},
    }
    t1 = time.perf_counter()
    trained, n_samples = train_topk_sae(
        train_acts,
        d_sae=args.d_sae,
        k=args.k,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        metadata=metadata,
    )
    train_s = time.perf_counter() - t1

    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path, cfg_path = trained.save_inference_model(out_dir)
    # SAELens builds the inference cfg from a set of field names, so its key order changes between
    # processes; rewrite it sorted so that a re-run with the same seed gives byte-identical files.
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()), sort_keys=True, indent=2) + "\n")
    for written in (weights_path, cfg_path):
        written.chmod(0o644)  # safetensors writes 0600; the shipped weights must be readable by everyone
    sae = SAE.load_from_disk(str(out_dir), device="cpu")  # evaluate exactly what ships
    sae.eval()
    held_out = {
        name: {
            "texts": len(dev_corpora[name]),
            **evaluate(sae, acts),
            "median_document_density": median_document_density(sae, acts, counts),
        }
        for name, (acts, counts) in dev_acts.items()
    }
    train_metrics = evaluate(sae, train_acts)

    report: dict[str, Any] = {
        "reader_model": EMBEDDED_READER,
        "hook_name": hook_name,
        "layer": args.layer,
        "d_in": int(sae.cfg.d_in),
        "d_sae": args.d_sae,
        "k": args.k,
        "architecture": sae.cfg.architecture(),
        "train_data": {name: len(texts) for name, texts in train_corpora.items()},
        "train_tokens": int(train_acts.shape[0]),
        "training_samples_seen": int(n_samples),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "extraction_seconds": round(extract_s, 1),
        "training_seconds": round(train_s, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "held_out": held_out,
        "train": train_metrics,
        "versions": {
            "torch": torch.__version__,
            "sae_lens": sae_lens.__version__,
            "transformers": __import__("transformers").__version__,
        },
    }
    (out_dir / "training_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print_report(report)
    return report


def print_report(report: dict[str, Any]) -> None:
    """Print the report as a two-column table."""
    rows = [
        ("hook", report["hook_name"]),
        ("layer / d_sae / k", f"{report['layer']} / {report['d_sae']} / {report['k']}"),
        ("train tokens", f"{report['train_tokens']:,}"),
        ("epochs (samples seen)", f"{report['epochs']} ({report['training_samples_seen']:,})"),
        (
            "wall time (extract / train)",
            f"{report['wall_seconds']}s ({report['extraction_seconds']}s / {report['training_seconds']}s)",
        ),
        *[
            row
            for name, m in report["held_out"].items()
            for row in (
                (f"{name} tokens", f"{int(m['n_tokens']):,}"),
                (f"{name} FVE", f"{m['fraction_variance_explained']:.4f}"),
                (f"{name} dead features", f"{m['dead_feature_fraction']:.4f}"),
                (f"{name} median doc density", f"{m['median_document_density']:.4f}"),
            )
        ],
        ("train FVE", f"{report['train']['fraction_variance_explained']:.4f}"),
        ("train dead features", f"{report['train']['dead_feature_fraction']:.4f}"),
        ("torch / sae-lens", f"{report['versions']['torch']} / {report['versions']['sae_lens']}"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{'metric'.ljust(width)} | value")
    print(f"{'-' * width}-+-{'-' * 30}")
    for name, value in rows:
        print(f"{name.ljust(width)} | {value}")


if __name__ == "__main__":
    main()
