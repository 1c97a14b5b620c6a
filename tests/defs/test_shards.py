"""Sharded encoding (`encode_shards_job`): a dataset's missing documents split into shards at the activation
cache's chunk boundaries, each shard a step of its own; token_activations then writes the tables from the
cache, equal row for row to a run that encoded the whole dataset in its one step. (Shards on two celery
workers at once: benchmarks/sharded_encoding.py.)"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from dagster import instance_for_test, materialize

import interp_assets.engine.activation_cache as activation_cache
from interp_assets.defs.assets import ALL_ASSETS
from interp_assets.defs.shard_jobs import encode_shards_job
from interp_assets.storage.parquet import read_table
from resources.local import local_resources

ROOT = Path(__file__).resolve().parents[2]
DATASET = "support_assistant_a"
N_DOCS = 160
CHUNK = 40  # documents per cache chunk in this test (2,048 by default): 4 chunks, 2 shards of 2 chunks
SORT = {
    "activation_status": ["doc_id"],
    "token_activations": ["doc_id", "token_index", "feature"],
    "pooled_embeddings": ["doc_id", "feature"],
}


def _drop(data: Path) -> None:
    landing = data / "landing"
    landing.mkdir(parents=True)
    lines = (ROOT / "demo/landing/support_assistant_a.jsonl").read_text().splitlines()[:N_DOCS]
    (landing / "support_assistant_a.jsonl").write_text("\n".join(lines) + "\n")


def _assets(*names: str) -> list:
    by_name = {k.to_user_string(): a for a in ALL_ASSETS for k in a.keys}
    return [by_name[n] for n in names]


def _tables(data: Path) -> dict[str, pl.DataFrame]:
    return {
        table: read_table(str(data / "parquet"), table, DATASET).collect().sort(columns)
        for table, columns in SORT.items()
    }


def test_shards_encode_what_one_step_encodes(tmp_path, monkeypatch):
    monkeypatch.setattr(activation_cache, "CHUNK_DOCS", CHUNK)
    chain = _assets("raw_documents", "token_activations", "pooled_embeddings")
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("datasets", [DATASET])
        # sharded: raw_documents, then the shards (two steps), then the tables from the cache
        sharded = tmp_path / "sharded"
        _drop(sharded)
        resources = local_resources(sharded)
        assert materialize(chain[:1], partition_key=DATASET, instance=instance, resources=resources).success
        config = {"ops": {"plan_shards": {"config": {"dataset": DATASET, "shard_documents": N_DOCS // 2}}}}
        result = encode_shards_job.execute_in_process(config, instance=instance, resources=resources)
        assert result.success
        shard_steps = [e.step_key for e in result.get_step_success_events() if "shard[" in e.step_key]
        assert sorted(shard_steps) == ["encode_shard[shard_0]", "encode_shard[shard_1]"]
        summary = result.output_for_node("shards_done")
        assert [s["encoded_now"] for s in summary["shards"]] == [N_DOCS // 2, N_DOCS // 2]
        assert summary["reused_from_cache"] == 0
        run = materialize(chain, partition_key=DATASET, instance=instance, resources=resources)
        assert run.success
        meta = next(
            e
            for e in run.asset_materializations_for_node("token_activations")
            if e.asset_key.path == ["token_activations"]
        ).metadata
        assert meta["encoded_now"].value == 0 and meta["reused_from_cache"].value == N_DOCS
        assert meta["reader_loaded"].value is False  # the tables came from the cache alone

        # again: nothing left to encode, one empty shard
        again = encode_shards_job.execute_in_process(config, instance=instance, resources=resources)
        assert again.success and again.output_for_node("shards_done")["encoded_now"] == 0

        # one step: token_activations encodes the whole dataset itself
        whole = tmp_path / "whole"
        _drop(whole)
        run = materialize(chain, partition_key=DATASET, instance=instance, resources=local_resources(whole))
        assert run.success
        meta = next(
            e
            for e in run.asset_materializations_for_node("token_activations")
            if e.asset_key.path == ["token_activations"]
        ).metadata
        assert meta["encoded_now"].value == N_DOCS

    on_shards, in_one_step = _tables(sharded), _tables(whole)
    for table, frame in on_shards.items():
        assert frame.height > 0, table
        assert frame.equals(in_one_step[table]), f"{table} differs between the sharded and the one-step run"


def test_shards_need_the_stored_documents(tmp_path):
    config = {"ops": {"plan_shards": {"config": {"dataset": "never_ingested"}}}}
    with instance_for_test() as instance:
        result = encode_shards_job.execute_in_process(
            run_config=config, instance=instance, resources=local_resources(tmp_path), raise_on_error=False
        )
    assert not result.success
    error = result.failure_data_for_node("plan_shards").error.cause.message
    assert "no raw_documents stored for dataset 'never_ingested'" in error
    assert "materialize raw_documents for that partition first" in error


@pytest.mark.parametrize(
    "n, shard, sizes",
    [(160, 80, [80, 80]), (160, 1000, [160]), (100, 30, [20, 40, 20, 20]), (5000, 2500, [2048, 2952])],
)
def test_shard_plan_cuts_at_chunk_boundaries(tmp_path, n, shard, sizes):
    cache = activation_cache.ActivationCache(tmp_path, "fingerprint")
    docs = pl.DataFrame({"doc_hash": [f"h{i}" for i in range(n)], "text": ["some text"] * n})
    plan = cache.shard_plan(docs, shard, max_docs=2048 if n == 5000 else 20)
    assert [len(s) for s in plan] == sizes
    assert [h for s in plan for h in s] == docs["doc_hash"].to_list()
