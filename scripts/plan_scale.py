"""Sizing on paper: wall time per stage, storage per table and cost for a corpus, a reader, an SAE and a
fleet, from the rates in benchmarks/results/*.json (interp_assets/scale.py says which figure comes from
where and which are assumptions: GPU FLOP/s, prices, raw bytes per token, pooled bytes per row).

Usage:
  python scripts/plan_scale.py --preset llama-8b --tokens 1e9 --gpus 8 --cpu-workers 8 [--json]
  python scripts/plan_scale.py --documents 200000 --tokens-per-doc 64 --cpu-workers 2   # embedded default
  python scripts/plan_scale.py --readme      # the README's table (1M, 100M, 10B tokens)"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from interp_assets.scale import (  # noqa: E402
    PRESET_SAES,
    PRESET_SPECIAL,
    PRESETS,
    RESULTS_DIR,
    TOKEN_COUNTS,
    Assumptions,
    Corpus,
    Fleet,
    Sae,
    human_bytes,
    human_count,
    human_seconds,
    load_rates,
    plan,
)

README_TOKENS_PER_DOC = 256
README_SCENARIOS = (
    # (preset, gpus, cpu workers)
    ("minilm", 0, 8),
    ("llama-8b", 8, 8),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--preset", choices=sorted(PRESETS), default="minilm", help="reader + SAE (default minilm)"
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--tokens", type=float, help="corpus tokens in all (documents = tokens / tokens-per-doc)"
    )
    size.add_argument("--documents", type=float, help="corpus documents")
    p.add_argument("--tokens-per-doc", type=float, default=256.0)
    p.add_argument("--special-per-doc", type=float, help="tokens read but not stored (default: the preset's)")
    r = p.add_argument_group("reader (overrides the preset)")
    for name in ("params", "non-block-params", "layers", "hook-blocks", "d-model", "max-length"):
        r.add_argument(f"--{name}", type=int)
    s = p.add_argument_group("SAE (overrides the preset)")
    s.add_argument("--width", type=int)
    s.add_argument("--k", type=float, help="active features per token (TopK k or L0)")
    f = p.add_argument_group("fleet")
    f.add_argument("--gpus", type=int, default=0, help="GPUs for encoding (0: encode on the CPU workers)")
    f.add_argument("--cpu-workers", type=int, default=1, help="2-core machines like the benchmark one")
    f.add_argument("--shards", type=int, help="pieces that encode at once (default: as many as devices)")
    a = p.add_argument_group("assumptions (not measured here; see interp_assets/scale.py Assumptions)")
    defaults = Assumptions()
    a.add_argument("--gpu-flops", type=float, default=defaults.gpu_matmul_flops, help="sustained FLOP/s")
    a.add_argument("--gpu-price", type=float, default=defaults.gpu_price_per_hour, help="USD per GPU-hour")
    a.add_argument("--cpu-price", type=float, default=defaults.cpu_price_per_hour, help="USD per worker-hour")
    a.add_argument("--raw-bytes-per-token", type=float, default=defaults.raw_bytes_per_token)
    a.add_argument("--pooled-bytes-per-row", type=float, default=defaults.pooled_bytes_per_row)
    a.add_argument("--distinct-fraction", type=float, help="pooled rows per nonzero (default: measured)")
    a.add_argument("--labeled-features", type=int, default=defaults.labeled_features)
    a.add_argument("--criteria", type=int, default=defaults.criteria)
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="benchmark JSON files")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--readme", action="store_true", help="print the README's Markdown table")
    return p.parse_args(argv)


def build(args: argparse.Namespace, preset: str, tokens: float | None, gpus: int, workers: int):
    reader = PRESETS[preset]
    overrides = {
        name: getattr(args, name)
        for name in ("params", "non_block_params", "layers", "hook_blocks", "d_model", "max_length")
        if getattr(args, name) is not None
    }
    if overrides:
        reader = dataclasses.replace(reader, name=f"{reader.name} (modified)", **overrides)
    sae = PRESET_SAES[preset]
    sae = Sae(args.width or sae.width, args.k or sae.k)
    special = args.special_per_doc if args.special_per_doc is not None else PRESET_SPECIAL[preset]
    if args.documents is not None:
        documents = args.documents
    else:
        documents = (tokens if tokens is not None else 1e6) / args.tokens_per_doc
    corpus = Corpus(max(1, round(documents)), args.tokens_per_doc, special)
    fleet = Fleet(gpus=gpus, cpu_workers=workers, shards=args.shards)
    assumptions = Assumptions(
        gpu_matmul_flops=args.gpu_flops,
        gpu_price_per_hour=args.gpu_price,
        cpu_price_per_hour=args.cpu_price,
        raw_bytes_per_token=args.raw_bytes_per_token,
        pooled_bytes_per_row=args.pooled_bytes_per_row,
        distinct_fraction=args.distinct_fraction,
        labeled_features=args.labeled_features,
        criteria=args.criteria,
    )
    return corpus, reader, sae, fleet, assumptions


def print_plan(result: dict) -> None:
    i = result["inputs"]
    c, r, s, f = i["corpus"], i["reader"], i["sae"], i["fleet"]
    print(
        f"corpus {human_count(c['documents'])} documents x {c['tokens_per_doc']:g} tokens "
        f"({human_count(result['tokens_read'])} read, {human_count(result['pooled_tokens'])} stored); "
        f"reader {r['name']} ({r['hook_blocks']} of {r['layers']} blocks, d_model {r['d_model']}); "
        f"SAE width {s['width']:,}, k {s['k']:g}"
    )
    print(
        f"fleet: {f['gpus']} GPU(s), {f['cpu_workers']} CPU worker(s); encode on {result['encode_device']} x "
        f"{result['encode_parallel']} at {result['encode_tokens_per_s_per_device']:,.0f} tokens/s each "
        f"({sum(result['flops_per_token'].values()) / 1e9:.3g} GFLOP/token)"
    )
    print(f"\n{'stage':<16}{'wall':>12}")
    for stage, secs in result["seconds"].items():
        print(f"{stage:<16}{human_seconds(secs):>12}")
    print(f"{'total':<16}{human_seconds(result['wall_s']):>12}")
    print(f"\n{'table':<20}{'rows':>10}{'bytes':>12}")
    for table, t in result["storage"].items():
        print(f"{table:<20}{human_count(t['rows']):>10}{human_bytes(t['bytes']):>12}")
    print(f"{'total':<20}{'':>10}{human_bytes(result['total_bytes']):>12}")
    a = i["assumptions"]
    print(
        f"\nGPU-hours {result['gpu_hours']:.2f} x ${a['gpu_price_per_hour']:g} + CPU worker-hours "
        f"{result['cpu_worker_hours']:.2f} x ${a['cpu_price_per_hour']:g} = ${result['cost_usd']:,.2f}"
    )
    for note in result["notes"]:
        print(f"note: {note}")


def readme_table(args: argparse.Namespace, rates) -> str:
    lines = [
        "| tokens | reader + SAE | fleet | encode | pool | label + score | diff | token_activations "
        "| tokens table | activation cache | pooled_embeddings | GPU-hours | cost |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for tokens in TOKEN_COUNTS:
        for preset, gpus, workers in README_SCENARIOS:
            args.tokens_per_doc = README_TOKENS_PER_DOC
            corpus, reader, sae, fleet, assumptions = build(args, preset, tokens, gpus, workers)
            res = plan(corpus, reader, sae, fleet, rates, assumptions)
            sec, st = res["seconds"], res["storage"]
            fleet_text = f"{gpus} GPUs + {workers} CPU" if gpus else f"{workers} CPU"
            lines.append(
                f"| {human_count(tokens)} | {reader.name}, {sae.width:,} x k {sae.k:g} | {fleet_text} "
                f"| {human_seconds(sec['encode'])} | {human_seconds(sec['pool'])} "
                f"| {human_seconds(sec['label_score'])} | {human_seconds(sec['diff'])} "
                f"| {human_bytes(st['token_activations']['bytes'])} "
                f"| {human_bytes(st['tokens']['bytes'])} "
                f"| {human_bytes(st['activation_cache']['bytes'])} "
                f"| {human_bytes(st['pooled_embeddings']['bytes'])} | {res['gpu_hours']:.1f} "
                f"| ${res['cost_usd']:,.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rates = load_rates(args.results_dir)
        if args.readme:
            print(readme_table(args, rates))
            return 0
        corpus, reader, sae, fleet, assumptions = build(
            args, args.preset, args.tokens, args.gpus, args.cpu_workers
        )
        result = plan(corpus, reader, sae, fleet, rates, assumptions)
    except (ValueError, FileNotFoundError) as exc:
        print(f"plan_scale: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"plan": result, "rates": dataclasses.asdict(rates)}, indent=2))
    else:
        print_plan(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
