"""The sizing model (interp_assets/scale.py, scripts/plan_scale.py) against the benchmarks it reads."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from interp_assets.scale import (
    PRESET_SAES,
    PRESETS,
    RESULTS_DIR,
    Assumptions,
    Corpus,
    Fleet,
    Reader,
    Sae,
    bytes_per_nonzero,
    distinct_per_doc,
    flops_per_token,
    load_rates,
    plan,
)

ROOT = Path(__file__).resolve().parents[1]
ACTS = json.loads((RESULTS_DIR / "activations.json").read_text())
MINILM = PRESETS["minilm"]


@pytest.fixture(scope="module")
def rates():
    return load_rates()


def _case(name: str) -> dict:
    return next(c for c in ACTS["cases"] if c["case"] == name)


def _speed_case() -> dict:
    """The default SAE's case the speed is read from: its own run when there is one, else the full run's."""
    quiet = RESULTS_DIR / "activations_default.json"
    cases = json.loads(quiet.read_text())["cases"] if quiet.exists() else ACTS["cases"]
    return next(c for c in cases if c["case"] == "default")


def test_rates_come_from_the_benchmark_files(rates):
    default = _speed_case()
    assert rates.cpu_flops_per_s == pytest.approx(
        default["floor"]["total_flops"] / default["ours"]["encode_s"]
    )
    assert rates.engine_efficiency == default["floor_fraction"]
    assert rates.tokens_bytes_per_token == _case("default")["bytes_per_token_tokens"]
    diff = json.loads((RESULTS_DIR / "diff.json").read_text())
    parquet = next(r for r in diff["results"] if r["case"] == "diff_parquet")
    assert rates.diff_rows_per_s == pytest.approx(2 * diff["rows_per_side"] / parquet["seconds"])
    assert all(0 < d <= n for n, d in rates.distinct_per_doc)


def test_flops_per_token_match_the_benchmark_count():
    """The reader's FLOPs from (parameters, layers, hook, d_model) equal activations.py's count from the
    model's shape: blocks exactly (to the bias terms), attention to its mean-length approximation."""
    case = _case("random w=4096 k=32")
    tokens, pooled, docs = case["tokens"], case["ours"]["pooled_tokens"], ACTS["docs"]
    fpt = flops_per_token(MINILM, Sae(case["d_sae"], case["k"]), tokens / docs, pooled / tokens)
    counted = case["floor"]["flops"]
    assert fpt["blocks"] * tokens == pytest.approx(counted["projections"] + counted["mlp"], rel=0.005)
    assert fpt["sae_encoder"] * tokens == pytest.approx(counted["sae_encoder"], rel=1e-9)
    assert sum(fpt.values()) * tokens == pytest.approx(case["floor"]["total_flops"], rel=0.02)


def test_encode_time_reproduces_the_measured_cpu_run(rates):
    default = _speed_case()
    corpus = Corpus(ACTS["docs"], default["tokens"] / ACTS["docs"], 2.0)
    result = plan(corpus, MINILM, Sae(default["d_sae"], default["k"]), Fleet(cpu_workers=1), rates)
    encode = result["seconds"]["encode"] - rates.reader_load_s
    assert encode == pytest.approx(default["ours"]["encode_s"], rel=0.03)


def test_storage_matches_a_real_runs_stored_bytes(rates):
    """60,000 SST-2 sentences encoded with the default SAE of the time (width 2,048, k 32): the model's
    nonzeros are exact and its token_activations bytes within 2% of what the run stored."""
    run = next(m for m in ACTS["memory"] if m["docs"] == 60_000)
    default = _case("default")
    corpus = Corpus(run["docs"], run["tokens"] / run["docs"], 2.0)
    result = plan(corpus, MINILM, Sae(default["d_sae"], default["k"]), Fleet(cpu_workers=1), rates)
    stored = result["storage"]["token_activations"]
    assert stored["rows"] == pytest.approx(run["nonzeros"], rel=1e-9)
    assert stored["bytes"] == pytest.approx(run["token_activations_bytes"], rel=0.02)


def test_pooled_rows_and_bytes_match_the_measured_lengths(rates):
    """pooled_rows.json: each document length's pooled rows and both tables' stored bytes, predicted from
    its documents, pooled tokens and the default SAE, within 3% (the rows exactly at the measured points)."""
    pooled = json.loads((RESULTS_DIR / "pooled_rows.json").read_text())
    for run in pooled["lengths"]:
        docs = run["documents"]
        corpus = Corpus(docs, run["tokens"] / docs, (run["tokens"] - run["pooled_tokens"]) / docs)
        result = plan(corpus, MINILM, Sae(pooled["d_sae"], run["k"]), Fleet(cpu_workers=1), rates)
        stored = result["storage"]
        assert stored["token_activations"]["rows"] == pytest.approx(run["nonzeros"], rel=1e-9)
        assert stored["token_activations"]["bytes"] == pytest.approx(run["token_activations_bytes"], rel=0.03)
        assert stored["pooled_embeddings"]["rows"] == pytest.approx(run["pooled_rows"], rel=1e-6)
        assert stored["pooled_embeddings"]["bytes"] == pytest.approx(run["pooled_embeddings_bytes"], rel=0.03)


def test_distinct_features_grow_slower_than_nonzeros(rates):
    (n0, d0), (n1, d1) = rates.distinct_per_doc[0], rates.distinct_per_doc[-1]
    mid, outside = distinct_per_doc(rates, (n0 * n1) ** 0.5)
    assert d0 < mid < d1 and not outside
    far, outside = distinct_per_doc(rates, 10 * n1)
    assert outside and d1 < far < 10 * d1  # extrapolated with the last segment's slope (below 1)
    tiny, _ = distinct_per_doc(rates, 1.0)
    assert tiny <= 1.0


def test_bytes_per_nonzero_interpolates_between_measured_widths(rates):
    measured: dict[tuple[int, float], list[float]] = {}
    for width, k, value in rates.bytes_per_nonzero:
        measured.setdefault((width, k), []).append(value)
    for (width, k), values in measured.items():  # at a measured (width, k): the mean of its runs
        got, extrapolated = bytes_per_nonzero(rates, width, k)
        assert not extrapolated
        assert got == pytest.approx(sum(values) / len(values))
    low, _ = bytes_per_nonzero(rates, 4096, 32)
    high, _ = bytes_per_nonzero(rates, 65536, 32)
    mid, extrapolated = bytes_per_nonzero(rates, 16384, 32)
    assert min(low, high) < mid < max(low, high) and not extrapolated
    beyond, extrapolated = bytes_per_nonzero(rates, 1 << 20, 32)
    assert extrapolated and beyond == pytest.approx(high)


def test_linear_in_documents_and_devices(rates):
    reader, sae = PRESETS["llama-8b"], PRESET_SAES["llama-8b"]
    one = plan(Corpus(100_000, 256, 1), reader, sae, Fleet(gpus=4, cpu_workers=4), rates)
    two = plan(Corpus(200_000, 256, 1), reader, sae, Fleet(gpus=4, cpu_workers=4), rates)
    load = rates.reader_load_s
    assert two["seconds"]["encode"] - load == pytest.approx(2 * (one["seconds"]["encode"] - load))
    for stage in ("pool", "diff", "associations"):
        assert two["seconds"][stage] == pytest.approx(2 * one["seconds"][stage])
    assert two["seconds"]["label_score"] == one["seconds"]["label_score"]  # per feature, not per document
    for table, t in one["storage"].items():
        assert two["storage"][table]["bytes"] == pytest.approx(2 * t["bytes"]), table
    held = 4 * load / 3600  # each GPU holds the reader's load time once
    assert two["gpu_hours"] - held == pytest.approx(2 * (one["gpu_hours"] - held))
    eight = plan(Corpus(100_000, 256, 1), reader, sae, Fleet(gpus=8, cpu_workers=4), rates)
    assert eight["seconds"]["encode"] - load == pytest.approx((one["seconds"]["encode"] - load) / 2)
    one_shard = plan(Corpus(100_000, 256, 1), reader, sae, Fleet(gpus=8, cpu_workers=4, shards=1), rates)
    assert one_shard["encode_parallel"] == 1 and any("1 of 8" in n for n in one_shard["notes"])


def test_cost_is_hours_times_prices(rates):
    a = Assumptions(gpu_price_per_hour=2.0, cpu_price_per_hour=0.5)
    r = plan(
        Corpus(10_000, 128), PRESETS["gpt2"], PRESET_SAES["gpt2"], Fleet(gpus=2, cpu_workers=3), rates, a
    )
    assert r["gpu_hours"] == pytest.approx(2 * r["seconds"]["encode"] / 3600)
    assert r["cpu_worker_hours"] == pytest.approx(3 * r["wall_s"] / 3600)
    assert r["cost_usd"] == pytest.approx(2.0 * r["gpu_hours"] + 0.5 * r["cpu_worker_hours"])


def test_truncation_caps_tokens(rates):
    r = plan(Corpus(10, 2000, 2), MINILM, Sae(4096, 16), Fleet(), rates)
    assert r["tokens_read"] == 10 * MINILM.max_length
    assert any("truncated" in n for n in r["notes"])


@pytest.mark.parametrize(
    ("corpus", "reader", "sae", "fleet", "message"),
    [
        (Corpus(0, 10), MINILM, Sae(4096, 16), Fleet(), "documents must be a positive"),
        (Corpus(10, -1), MINILM, Sae(4096, 16), Fleet(), "tokens_per_doc must be a positive"),
        (Corpus(10, 2, 2), MINILM, Sae(4096, 16), Fleet(), "special_tokens_per_doc"),
        (Corpus(10, 10), dataclasses.replace(MINILM, hook_blocks=7), Sae(4096, 16), Fleet(), "hook_blocks"),
        (
            Corpus(10, 10),
            dataclasses.replace(MINILM, non_block_params=10**9),
            Sae(4096, 16),
            Fleet(),
            "non_block",
        ),
        (Corpus(10, 10), MINILM, Sae(16, 32), Fleet(), "cannot exceed the SAE width"),
        (Corpus(10, 10), MINILM, Sae(4096, 16), Fleet(gpus=1, cpu_workers=0), "at least one CPU worker"),
        (Corpus(10, 10), MINILM, Sae(4096, 16), Fleet(gpus=-1), "negative"),
        (Corpus(10, 10), MINILM, Sae(4096, 16), Fleet(shards=0), "shards"),
    ],
)
def test_bad_input_errors(rates, corpus, reader, sae, fleet, message):
    with pytest.raises(ValueError, match=message):
        plan(corpus, reader, sae, fleet, rates)


def test_bad_assumptions_and_missing_results(rates, tmp_path):
    with pytest.raises(ValueError, match="gpu_matmul_flops"):
        plan(Corpus(10, 10), MINILM, Sae(4096, 16), Fleet(), rates, Assumptions(gpu_matmul_flops=0))
    with pytest.raises(ValueError, match="distinct_fraction"):
        plan(Corpus(10, 10), MINILM, Sae(4096, 16), Fleet(), rates, Assumptions(distinct_fraction=1.5))
    for name in (
        "activations.json",
        "incremental.json",
        "score_scale.json",
        "diff.json",
        "associations.json",
        "pooled_rows.json",
    ):
        shutil.copy(RESULTS_DIR / name, tmp_path / name)
    (tmp_path / "diff.json").unlink()
    with pytest.raises(FileNotFoundError, match="diff.json is missing: run benchmarks/diff.py"):
        load_rates(tmp_path)
    assert isinstance(Reader, type)


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "plan_scale.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_script_json_and_errors():
    done = _script("--preset", "llama-8b", "--tokens", "1e8", "--gpus", "8", "--cpu-workers", "8", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["plan"]["encode_device"] == "gpu" and out["plan"]["tokens_read"] == pytest.approx(
        1e8, rel=1e-3
    )
    assert "activations.json" in " ".join(out["rates"]["sources"].values())
    bad = _script("--k", "99999")
    assert bad.returncode == 2 and "cannot exceed the SAE width" in bad.stderr


def test_readme_table_is_the_scripts_output():
    done = _script("--readme")
    assert done.returncode == 0, done.stderr
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- plan_scale --readme.*?-->\n(.*?)\n<!-- end of plan_scale -->", readme, re.S)
    assert block, "README lacks the plan_scale table markers"
    assert block.group(1).strip() == done.stdout.strip(), "run: python scripts/plan_scale.py --readme"
