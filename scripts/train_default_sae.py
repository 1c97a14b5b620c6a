"""Train the embedded default SAE: a TopK SAE on layer-3 residual activations of all-MiniLM-L6-v2 over SST-2.

Re-runnable and deterministic for a given --seed. Reads `sentence\\tlabel` TSV files, runs the embedded
reader model in length-sorted batches, keeps the hidden state of every real token (no [CLS], [SEP] or
padding), and trains with SAELens's own `SAETrainer` + `TopKTrainingSAE` fed from an in-memory
activation iterator (`interp_assets/engine/sae_training.py`, which also trains the document SAEs).
Writes SAELens's on-disk format (`cfg.json` + `sae_weights.safetensors`, loadable with
`sae_lens.SAE.load_from_disk`) and `training_report.json` with held-out (dev) metrics.

    python scripts/train_default_sae.py            # defaults: layer 3, d_sae 2048, k 32
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

DEFAULT_DATA = "../shared/data/sst2/train.tsv"
DATASET_LABEL = "sst2/train.tsv"


def read_sentences(path: Path, limit: int | None = None) -> list[str]:
    """Read the `sentence` column of a tab-separated file with header `sentence\\tlabel`."""
    with path.open(encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        if not header or header[0] != "sentence":
            raise ValueError(f"{path}: expected a header starting with 'sentence', got {header!r}.")
        sentences: list[str] = []
        for line_no, line in enumerate(handle, start=2):
            line = line.rstrip("\n")
            if not line:
                continue
            text = line.split("\t", 1)[0].strip() if len(header) > 1 else line.strip()
            if not text:
                raise ValueError(f"{path}, line {line_no}: empty sentence.")
            sentences.append(text)
            if limit is not None and len(sentences) >= limit:
                break
    return sentences


@torch.inference_mode()
def extract_activations(
    tokenizer: Any,
    model: Any,
    sentences: Sequence[str],
    layer: int,
    batch_size: int = 256,
    max_length: int = 512,
) -> torch.Tensor:
    """Return `[n_tokens, d_model]` float32 outputs of `model.encoder.layer[layer]` for every real token.

    Sentences are batched in length order so padding stays small; [CLS], [SEP] and padding are dropped.
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
    parser.add_argument("--d-sae", type=int, default=2048, help="number of SAE features (default 2048)")
    parser.add_argument("--k", type=int, default=32, help="active features per token (default 32)")
    parser.add_argument("--epochs", type=float, default=5.0, help="passes over the training tokens")
    parser.add_argument("--batch-size", type=int, default=1024, help="tokens per SAE step (default 1024)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate (cosine to lr/10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=DEFAULT_DATA, help="training TSV, relative to the repo root")
    parser.add_argument("--dev", default=None, help="held-out TSV (default: dev.tsv next to --data)")
    parser.add_argument("--out", default="resources/default_sae", help="output folder, repo-relative")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N sentences (smoke runs)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Extract activations, train, save in SAELens format, evaluate on dev; returns the report."""
    args = parse_args(argv)
    import sae_lens
    from sae_lens import SAE

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    data_path = _resolve(args.data)
    dev_path = _resolve(args.dev) if args.dev else data_path.with_name("dev.tsv")
    out_dir = _resolve(args.out)

    tokenizer, model = load_reader_model(EMBEDDED_READER)
    n_layers = len(model.encoder.layer)
    if not 0 <= args.layer < n_layers:
        raise SystemExit(f"--layer must be in 0..{n_layers - 1}; got {args.layer}.")

    t0 = time.perf_counter()
    train_sentences = read_sentences(data_path, args.limit)
    train_acts = extract_activations(tokenizer, model, train_sentences, args.layer)
    dev_sentences = read_sentences(dev_path, args.limit)
    dev_acts = extract_activations(tokenizer, model, dev_sentences, args.layer)
    extract_s = time.perf_counter() - t0
    print(
        f"extracted {train_acts.shape[0]:,} train tokens ({len(train_sentences):,} sentences) and "
        f"{dev_acts.shape[0]:,} dev tokens in {extract_s:.0f}s",
        flush=True,
    )

    hook_name = f"blocks.{args.layer}.hook_resid_post"
    metadata = {
        "model_name": EMBEDDED_READER,
        "hook_name": hook_name,
        "hook_module": f"encoder.layer.{args.layer}",
        "hook_head_index": None,
        "dataset_path": DATASET_LABEL if args.data == DEFAULT_DATA else data_path.name,
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
    dev_metrics = evaluate(sae, dev_acts)
    train_metrics = evaluate(sae, train_acts)

    report: dict[str, Any] = {
        "reader_model": EMBEDDED_READER,
        "hook_name": hook_name,
        "layer": args.layer,
        "d_in": int(sae.cfg.d_in),
        "d_sae": args.d_sae,
        "k": args.k,
        "architecture": sae.cfg.architecture(),
        "train_data": metadata["dataset_path"],
        "train_sentences": len(train_sentences),
        "train_tokens": int(train_acts.shape[0]),
        "training_samples_seen": int(n_samples),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "extraction_seconds": round(extract_s, 1),
        "training_seconds": round(train_s, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "dev": {"data": dev_path.name, "sentences": len(dev_sentences), **dev_metrics},
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
        ("dev tokens", f"{int(report['dev']['n_tokens']):,}"),
        ("dev FVE", f"{report['dev']['fraction_variance_explained']:.4f}"),
        ("dev mean L0", f"{report['dev']['mean_l0']:.2f}"),
        ("dev dead features", f"{report['dev']['dead_feature_fraction']:.4f}"),
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
