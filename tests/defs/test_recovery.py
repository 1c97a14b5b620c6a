"""Issue #6: incremental recompute, crash recovery and hostile input.

Real model (the embedded default reader + SAE), real Parquet, real Dagster runs, real DuckDB; nothing of
ours is mocked. Where a failure has to be injected, the *model* is wrapped (as a CUDA error would hit
it) or a process is SIGKILLed. Subprocesses run `tests/_encode_worker.py`.

- kill and resume: an encode killed after some chunks were committed resumes from them and ends with
  exactly the rows of an uninterrupted run, at the cache level and at the Dagster level;
- concurrency: two dataset runs at once on one storage folder and one DuckDB warehouse, each
  refreshing the views like `warehouse_views_sensor`, while a reader queries the warehouse;
- one bad document in a good batch is rejected with its reason, the others are encoded unchanged;
- hostile drop names, partition keys and document content; no pickle anywhere; the LLM key never
  lands in stored files, metadata, the event log or logs.
"""

from __future__ import annotations

import ast
import copy
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from html.parser import HTMLParser
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
import torch
from dagster import AssetKey, DagsterInstance, EnvVar, materialize
from polars.testing import assert_frame_equal

from interp_assets.comparisons import comparison_key
from interp_assets.defs.assets import ALL_ASSETS, WAREHOUSE_TABLES
from interp_assets.engine.activation_cache import ActivationCache
from interp_assets.engine.activations import encode_texts, plan_batches
from interp_assets.engine.reader import find_layer_module
from interp_assets.ingest import dataset_name_from_path, doc_hash, list_drops
from interp_assets.labels.labeling import LABEL_SYSTEM_PROMPT
from interp_assets.storage.parquet import read_table, table_exists
from interp_assets.storage.paths import check_storage_key
from interp_assets.warehouse import connect_read_only, query, refresh_views
from resources.llm import LLMResource
from resources.local import local_resources
from resources.sae_reader import SAEReaderResource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _faults import KILL_POINTS  # noqa: E402
from llm_server import FakeLLMServer, ServerError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "_encode_worker.py"
SST2 = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"
BY_NAME = {k.to_user_string(): a for a in ALL_ASSETS for k in a.keys}
EMBED = [BY_NAME[n] for n in ("raw_documents", "token_activations", "pooled_embeddings")]
LABEL = [BY_NAME[n] for n in ("feature_labels", "feature_scores")]
SORT_KEY = ["doc_id", "token_index", "feature"]


# ------------------------------------------------------------------------------------------ helpers


def _sentences(start: int, n: int) -> list[str]:
    """`n` real sentences of SST-2 train, read in place (never copied into the project)."""
    if not SST2.is_file():
        pytest.skip(f"shared SST-2 data not found at {SST2} (expected beside the repository clone)")
    lines = SST2.read_text(encoding="utf-8").splitlines()[1:]
    out = [t for t in (line.split("\t")[0].strip() for line in lines[start:]) if t][:n]
    assert len(out) == n, f"only {len(out)} sentences available from {start}"
    return out


def _documents(texts: list[str]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "doc_id": pl.Series(range(len(texts)), dtype=pl.Int32),
            "doc_hash": [doc_hash(t) for t in texts],
            "text": texts,
        }
    )


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread per process (the workers get OMP_NUM_THREADS=1): on a small shared machine
    two threads per process oversubscribe the cores, and every process then computes alike."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reader():
    """The embedded default reader, loaded once for this module (the same object the assets use)."""
    return SAEReaderResource(device="cpu").get_reader()


def _token_rows(table: pa.Table) -> pl.DataFrame:
    """token_activations rows in a canonical order, dictionary columns as plain strings."""
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame.with_columns(pl.col(pl.Categorical).cast(pl.String)).sort(SORT_KEY)


def _cache_tables(cache: ActivationCache, docs: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(token_activations rows, activation_status) of `docs` as the token_activations asset stores them."""
    ids = docs.select("doc_id", "doc_hash")
    batches = list(cache.iter_token_activations(ids, "ds"))
    assert batches, "no activations stored"
    rows = _token_rows(pa.Table.from_batches(batches))
    status = pl.from_arrow(cache.activation_status(ids, "ds"))
    assert isinstance(status, pl.DataFrame)
    return rows, status.sort("doc_id")


def _worker(log_dir: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    """Start tests/_encode_worker.py; its output goes to a file (a full pipe would stall it)."""
    log = log_dir / f"worker-{time.monotonic_ns()}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), *args], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT
        )
    return proc, log


def _kill_after_first_commit(proc: subprocess.Popen, folder: Path, log: Path, timeout_s: float = 240) -> None:
    """SIGKILL `proc` as soon as one chunk is committed in `folder` (its `.docs.parquet` exists)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(folder.glob("*.docs.parquet")):
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
            return
        if proc.poll() is not None:
            pytest.fail(
                f"worker exited with {proc.returncode} before committing a chunk:\n{log.read_text()[-3000:]}"
            )
        time.sleep(0.003)
    proc.kill()
    pytest.fail(f"no chunk committed within {timeout_s}s:\n{log.read_text()[-3000:]}")


def _last_json(log: Path) -> dict:
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    assert lines, log.read_text()[-4000:]
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------- 1. kill and resume

MAX_DOCS = 8  # small chunks: a 200-document encode commits 25 of them


def test_killed_encode_resumes_from_committed_chunks_and_equals_an_uninterrupted_run(tmp_path, request):
    texts = _sentences(0, 200)
    docs = _documents(texts)
    docs.write_parquet(tmp_path / "documents.parquet")
    n_unique = docs["doc_hash"].n_unique()
    root = tmp_path / "cache"
    proc, log = _worker(tmp_path, "cache", str(root), str(tmp_path / "documents.parquet"), str(MAX_DOCS))
    reader = request.getfixturevalue("reader")  # loads in this process while the worker loads its own
    folder = root / reader.fingerprint
    _kill_after_first_commit(proc, folder, log)

    cache = ActivationCache(root, reader.fingerprint)
    committed = cache.document_index().height
    assert 0 < committed < n_unique, "the kill must land after a commit and before the end"
    assert committed % MAX_DOCS == 0, "only whole chunks count as committed"
    # Debris of a crash, on top of whatever the kill left: a torn temp file of the next chunk's marker,
    # and an orphan `.acts` file (a crash between the two renames) holding absurd values for the next
    # document. Its name sorts before every real chunk, so it would win if it were ever read.
    missing = docs.join(cache.document_index().select("doc_hash"), on="doc_hash", how="anti")
    first_committed = cache.committed_chunks()[0]
    orphan = pl.read_parquet(folder / f"{first_committed}.acts.parquet").with_columns(
        pl.lit(missing["doc_hash"][0]).alias("doc_hash"), pl.lit(999.0, pl.Float32).alias("activation")
    )
    orphan.write_parquet(folder / f"{'0' * 32}.acts.parquet")
    good_marker = (folder / f"{first_committed}.docs.parquet").read_bytes()
    (folder / f".{'0' * 32}.docs.parquet.{'f' * 32}.tmp").write_bytes(good_marker[: len(good_marker) // 2])
    leftovers = sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))
    assert leftovers  # at least our torn temp file

    def encode(batch: list[str]):
        return encode_texts(reader, batch)

    resumed = cache.encode_missing(encode, docs, max_docs=MAX_DOCS)
    assert resumed.documents == n_unique
    assert resumed.reused == committed  # everything committed before the kill is reused
    assert resumed.encoded == n_unique - committed  # only the rest (the chunk in flight included)
    assert resumed.rejected == 0
    assert resumed.chunks_written == -(-(n_unique - committed) // MAX_DOCS)

    fresh = ActivationCache(tmp_path / "fresh", reader.fingerprint)
    uninterrupted = fresh.encode_missing(encode, docs, max_docs=MAX_DOCS)
    assert uninterrupted.encoded == n_unique and uninterrupted.reused == 0

    rows, status = _cache_tables(cache, docs)
    ref_rows, ref_status = _cache_tables(fresh, docs)
    assert_frame_equal(status, ref_status)
    assert status["status"].to_list() == ["encoded"] * docs.height
    assert_frame_equal(rows, ref_rows)  # bit for bit: same chunks, same batches
    assert rows.select(SORT_KEY).is_duplicated().sum() == 0  # no document twice
    assert set(rows["doc_id"].unique()) == set(range(docs.height))  # no gaps
    assert float(rows["activation"].max()) < 999.0  # the orphan was never read
    # a third call has nothing left to do
    again = cache.encode_missing(encode, docs, max_docs=MAX_DOCS)
    assert (again.encoded, again.reused, again.chunks_written) == (0, n_unique, 0)


KILL_DOCS, KILL_CHUNK_DOCS = 64, 8  # 8 chunks


@pytest.fixture(scope="module")
def uninterrupted_kill_run(tmp_path_factory, reader):
    """The kill cases' documents and the tables of an encode nobody interrupted."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    docs = _documents(_sentences(300, KILL_DOCS))
    docs.write_parquet(folder / "documents.parquet")
    cache = ActivationCache(folder / "cache", reader.fingerprint)
    stats = cache.encode_missing(lambda b: encode_texts(reader, b), docs, max_docs=KILL_CHUNK_DOCS)
    assert stats.chunks_written == KILL_DOCS // KILL_CHUNK_DOCS
    return folder / "documents.parquet", docs, _cache_tables(cache, docs)


# Each point of a chunk's commit, at a chunk drawn at random (seeded, so a failure can be replayed).
_RNG = __import__("random").Random(13)
KILL_CASES = [(point, _RNG.randint(1, KILL_DOCS // KILL_CHUNK_DOCS - 1)) for point in KILL_POINTS]


@pytest.mark.parametrize(("point", "chunk"), KILL_CASES, ids=[f"{p}-chunk{c}" for p, c in KILL_CASES])
def test_a_process_killed_at_any_point_of_a_commit_resumes_to_the_uninterrupted_tables(
    tmp_path, reader, uninterrupted_kill_run, point, chunk
):
    documents, docs, (ref_rows, ref_status) = uninterrupted_kill_run
    root = tmp_path / "cache"
    proc, log = _worker(
        tmp_path, "cache", str(root), str(documents), str(KILL_CHUNK_DOCS), "--die-at", f"{point}:{chunk}"
    )
    assert proc.wait(timeout=300) == 137, log.read_text()[-3000:]
    cache = ActivationCache(root, reader.fingerprint)
    committed = chunk if point == "commit" else chunk - 1
    assert len(cache.committed_chunks()) == committed
    debris = sorted(p.name for p in cache.dir.iterdir() if not p.name.endswith((".docs.parquet",)))
    assert len(debris) > 2 * committed or point == "commit", debris  # the kill left files behind
    resumed = cache.encode_missing(lambda b: encode_texts(reader, b), docs, max_docs=KILL_CHUNK_DOCS)
    assert resumed.reused == committed * KILL_CHUNK_DOCS and resumed.rejected == 0
    assert resumed.encoded == KILL_DOCS - committed * KILL_CHUNK_DOCS
    rows, status = _cache_tables(cache, docs)
    assert_frame_equal(status, ref_status)
    assert_frame_equal(rows, ref_rows)
    assert cache.sweep_orphans(min_age_s=0) or point == "commit"  # the debris goes, committed chunks stay
    assert_frame_equal(_cache_tables(ActivationCache(root, reader.fingerprint), docs)[0], ref_rows)


PAD = 30_000  # characters of blank space inside each long document


def _long_documents(n: int) -> list[str]:
    # Chunks are cut at 400,000 characters (token_activations uses the default limits). Documents made
    # long by blank space (a paged transcript, a form) are long in characters but short in tokens, so
    # the asset commits many chunks while the model does little work.
    sentences = _sentences(1000, 2 * n)
    return [f"{sentences[2 * i]}{' ' * PAD}{sentences[2 * i + 1]}" for i in range(n)]


def _landing_with(data: Path, name: str, texts: list[str]) -> None:
    (data / "landing").mkdir(parents=True)
    with (data / "landing" / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
        for i, text in enumerate(texts):
            fh.write(json.dumps({"text": text, "row": i}) + "\n")


def test_killed_token_activations_run_resumes_at_dagster_level(tmp_path, request):
    n, per_chunk = 112, 14  # 14 documents of ~30k characters per 400k-character chunk: 8 chunks
    texts = _long_documents(n)
    data, ref = tmp_path / "data", tmp_path / "reference"
    for folder in (data, ref):
        _landing_with(folder, "long_docs", texts)
    proc, log = _worker(
        tmp_path, "dagster", str(data), "long_docs", "--assets", "raw_documents,token_activations"
    )
    reader = request.getfixturevalue("reader")
    _kill_after_first_commit(proc, data / "cache" / "activations" / reader.fingerprint, log)
    assert not table_exists(str(data / "parquet"), "token_activations", "long_docs")
    committed = ActivationCache(data / "cache" / "activations", reader.fingerprint).document_index().height
    assert 0 < committed < n and committed % per_chunk == 0

    def run(folder: Path):
        instance = DagsterInstance.ephemeral()
        instance.add_dynamic_partitions("datasets", ["long_docs"])
        result = materialize(
            EMBED[:2], partition_key="long_docs", instance=instance, resources=local_resources(folder)
        )
        assert result.success
        checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
        assert all(checks.values()) and {
            "documents_have_text",
            "every_document_accounted_for",
            "activations_finite_and_positive",
        } <= set(checks), checks
        meta = next(
            e
            for e in result.asset_materializations_for_node("token_activations")
            if e.asset_key.path == ["token_activations"]
        ).metadata
        return {k: meta[k].value for k in ("reused_from_cache", "encoded_now", "chunks_written", "rejected")}

    assert run(data) == {
        "reused_from_cache": committed,
        "encoded_now": n - committed,
        "chunks_written": (n - committed) // per_chunk,
        "rejected": 0,
    }
    assert run(ref) == {
        "reused_from_cache": 0,
        "encoded_now": n,
        "chunks_written": n // per_chunk,
        "rejected": 0,
    }
    for table, key in (("token_activations", SORT_KEY), ("activation_status", ["doc_id"])):
        ours = read_table(str(data / "parquet"), table, "long_docs").collect()
        theirs = read_table(str(ref / "parquet"), table, "long_docs").collect()
        cast = [pl.col(pl.Categorical).cast(pl.String)]
        assert_frame_equal(ours.with_columns(cast).sort(key), theirs.with_columns(cast).sort(key))
    # temp files the kill may have left are invisible to the warehouse
    counts = refresh_views(str(data / "warehouse.duckdb"), str(data / "parquet"), WAREHOUSE_TABLES)
    assert counts["raw_documents"] == n and counts["activation_status"] == n
    assert (
        counts["token_activations"]
        == read_table(str(ref / "parquet"), "token_activations", "long_docs").collect().height
    )


# ---------------------------------------------------------------------------------- 2. concurrency


def test_two_dataset_runs_at_once_with_a_warehouse_reader(tmp_path):
    data = tmp_path / "data"
    (data / "landing").mkdir(parents=True)
    alpha, beta = _sentences(2000, 100), _sentences(2070, 100)  # 30 documents in both
    pl.DataFrame({"text": alpha}).write_csv(data / "landing" / "alpha.csv")
    pl.DataFrame({"text": beta}).write_csv(data / "landing" / "beta.csv")
    db = data / "warehouse.duckdb"
    workers = [
        _worker(tmp_path, "dagster", str(data), ds, "--refresh-seconds", "4") for ds in ("alpha", "beta")
    ]
    reads: list[tuple[float, float]] = []  # (start, end) of each answered read
    errors: list[str] = []
    stop = threading.Event()

    def read_loop() -> None:
        # How README tells SQL users to read: interp_assets.warehouse.query (read-only, short-lived).
        sql = "select dataset, count(*) as n from raw_documents group by dataset"
        while not stop.is_set():
            if not db.exists():
                time.sleep(0.01)
                continue
            started = time.monotonic()
            try:
                query(str(db), sql)
                query(str(db), "select count(*) as n from token_activations where feature >= ?", [0])
                reads.append((started, time.monotonic()))
            except Exception as exc:  # noqa: BLE001 - any error is a failure, reported below
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
            time.sleep(0.005)

    thread = threading.Thread(target=read_loop, daemon=True)
    thread.start()
    try:
        for proc, _ in workers:
            proc.wait(timeout=400)
    finally:
        stop.set()
        thread.join(timeout=60)
        for proc, _ in workers:
            if proc.poll() is None:
                proc.kill()
    summaries = []
    for proc, log in workers:
        assert proc.returncode == 0, log.read_text()[-4000:]
        summary = _last_json(log)
        assert summary["success"] and all(summary["checks"].values()), summary
        assert summary["n_errors"] == 0 and summary["refreshes"] >= 1, summary
        summaries.append(summary)
    assert not errors, errors[:5]
    assert len(reads) >= 5, f"the reader got only {len(reads)} answers"
    windows = [s["refresh_window"] for s in summaries]
    # a read that was under way while a refresh ran (under load one read can outlast a whole window)
    overlapping = any(start <= hi and lo <= end for start, end in reads for lo, hi in windows)
    assert overlapping, "no read while the views were refreshed"

    final = {
        r["dataset"]: r["n"]
        for r in query(str(db), "select dataset, count(*) as n from raw_documents group by 1").to_dicts()
    }
    assert final == {"alpha": 100, "beta": 100}
    status = query(str(db), "select dataset, status, count(*) as n from activation_status group by all")
    assert sorted(status.rows()) == [("alpha", "encoded", 100), ("beta", "encoded", 100)]
    for ds in ("alpha", "beta"):
        stored = read_table(str(data / "parquet"), "token_activations", ds).collect().height
        n = query(str(db), "select count(*) as n from token_activations where dataset = ?", [ds])["n"][0]
        assert n == stored > 0
    dupes = query(
        str(db),
        "select count(*) - count(distinct (dataset, doc_id, token_index, feature)) as d "
        "from token_activations",
    )["d"][0]
    assert dupes == 0
    # The 30 shared documents read the same in both datasets, whichever run encoded them first.
    shared = query(
        str(db),
        """
        with t as (select r.dataset, r.doc_hash, t.token_index, t.feature, t.activation
                   from token_activations t join raw_documents r using (dataset, doc_id)),
             s as (select doc_hash from raw_documents where dataset = 'alpha'
                   intersect select doc_hash from raw_documents where dataset = 'beta'),
             a as (select * from t where dataset = 'alpha' and doc_hash in (select doc_hash from s)),
             b as (select * from t where dataset = 'beta' and doc_hash in (select doc_hash from s))
        select count(distinct doc_hash) as docs,
               count(*) filter (where a.activation is null or b.activation is null) as unmatched,
               coalesce(max(abs(a.activation - b.activation) / b.activation), 0) as max_rel_diff
        from a full join b using (doc_hash, token_index, feature)
        """,
    ).to_dicts()[0]
    assert shared["docs"] == 30 and shared["unmatched"] == 0 and shared["max_rel_diff"] < 5e-3, shared


def test_two_threads_encoding_with_one_shared_reader_get_their_own_results(reader):
    texts = [_sentences(3000, 60), _sentences(3060, 60)]

    def encode_all(batch_texts: list[str]) -> list[tuple[pa.Table, dict]]:
        out = []
        for i in range(0, len(batch_texts), 2):  # many small forward passes: many chances to interleave
            result = encode_texts(reader, batch_texts[i : i + 2])
            out.append((result.activations, dict(result.errors)))
        return out

    expected = [encode_all(t) for t in texts]
    got: list = [None, None]
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, encode_all(texts[i]))) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for exp, res in zip(expected, got, strict=True):
        assert [e for _, e in res] == [{}] * len(res)
        assert all(a.equals(b) for (a, _), (b, _) in zip(exp, res, strict=True))


# ------------------------------------------------------------------------ 3. one bad document


FAILURE = "CUDA error: an illegal memory access was encountered (simulated)"


class _FailOn(torch.nn.Module):
    """A model's input embedding, except that a batch holding the document `bad_ids` raises.

    Every forward path of the engine (the hooked one, the fused BERT one) starts with this lookup.
    """

    def __init__(self, embedding: torch.nn.Module, bad_ids: list[int], pad_id: int):
        super().__init__()
        self.embedding, self.bad_ids, self.pad_id = embedding, bad_ids, pad_id

    def forward(self, input_ids):
        n = len(self.bad_ids)
        for row in input_ids.tolist():
            if row[:n] == self.bad_ids and all(t == self.pad_id for t in row[n:]):
                raise ValueError(FAILURE)
        return self.embedding(input_ids)


def _faulty(reader, bad_text: str):
    """A copy of `reader` whose model (a copy sharing nothing) fails on the document `bad_text`."""
    faulty = copy.copy(reader)
    faulty.model = copy.deepcopy(reader.model)
    bad_ids = reader.tokenizer(bad_text)["input_ids"]
    faulty.model.set_input_embeddings(
        _FailOn(faulty.model.get_input_embeddings(), bad_ids, reader.tokenizer.pad_token_id)
    )
    faulty.layer_module = find_layer_module(faulty.model, reader.hook.layer)
    return faulty


class _ModelFailsOnOneDocument(SAEReaderResource):
    """The default reader resource whose model fails on one document (shares the loaded model)."""

    fail_on: str

    def get_reader(self):
        return _faulty(SAEReaderResource(device=self.device).get_reader(), self.fail_on)


def _without(table: pa.Table, bad: int) -> pl.DataFrame:
    """Activation rows with doc_index renumbered as if document `bad` had never been in the batch."""
    frame = pl.from_arrow(table.drop_columns(["token"]))
    assert isinstance(frame, pl.DataFrame)
    assert frame.filter(pl.col("doc_index") == bad).height == 0
    shifted = pl.when(pl.col("doc_index") > bad).then(pl.col("doc_index") - 1).otherwise(pl.col("doc_index"))
    return frame.with_columns(shifted.cast(pl.Int32).alias("doc_index")).sort(
        "doc_index", "token_index", "feature"
    )


def _plain(table: pa.Table) -> pl.DataFrame:
    frame = pl.from_arrow(table.drop_columns(["token"]))
    assert isinstance(frame, pl.DataFrame)
    return frame.sort("doc_index", "token_index", "feature")


def test_one_document_failing_in_the_model_is_rejected_alone(reader, tmp_path):
    good, bad = _sentences(500, 12), _sentences(520, 1)[0]
    texts = good[:6] + [bad] + good[6:]
    encoded = encode_texts(_faulty(reader, bad), texts)
    assert encoded.errors == {6: f"model error: ValueError: {FAILURE}"}
    ours = _without(encoded.activations, 6)
    # The batch holding it failed, so each of its good documents was encoded on its own: bit for bit what
    # it gives alone ...
    lengths = [len(reader.tokenizer(t)["input_ids"]) for t in texts]
    failed_batch = next(b for b in plan_batches(lengths, reader.token_budget) if 6 in b)
    shared = [i if i < 6 else i - 1 for i in failed_batch if i != 6]  # their doc_index in `ours`
    assert len(shared) >= 3
    alone = pl.concat(
        [
            _plain(encode_texts(reader, [good[i]]).activations).with_columns(
                pl.lit(i, pl.Int32).alias("doc_index")
            )
            for i in sorted(shared)
        ]
    ).sort("doc_index", "token_index", "feature")
    assert_frame_equal(ours.filter(pl.col("doc_index").is_in(shared)), alone)
    # ... and what a batch without the bad document gives, up to padding noise.
    clean = _plain(encode_texts(reader, good).activations)
    assert_frame_equal(ours, clean, check_exact=False, rtol=1e-2, atol=1e-3)

    # Through the cache (what token_activations runs): the bad one is recorded with its reason.
    docs = _documents(texts)
    cache = ActivationCache(tmp_path, reader.fingerprint)
    stats = cache.encode_missing(lambda b: encode_texts(_faulty(reader, bad), b), docs)
    assert (stats.encoded, stats.rejected) == (12, 1)
    rows, status = _cache_tables(cache, docs)
    (row,) = status.filter(pl.col("status") == "rejected").to_dicts()
    assert row["doc_id"] == 6 and row["reason"] == f"model error: ValueError: {FAILURE}"
    assert status.filter(pl.col("status") == "encoded").height == 12
    assert set(rows["doc_id"].unique()) == set(range(13)) - {6}


def test_document_that_cannot_be_tokenized_leaves_its_batch_bit_identical(reader):
    good = _sentences(600, 12)
    bad = "a lone surrogate \ud800 is not text a tokenizer can read"
    encoded = encode_texts(reader, good[:6] + [bad] + good[6:])
    assert list(encoded.errors) == [6]
    assert encoded.errors[6].startswith("tokenization failed: ")
    assert_frame_equal(_without(encoded.activations, 6), _plain(encode_texts(reader, good).activations))


def test_retrying_a_rejected_document_replaces_its_status(reader, tmp_path):
    texts = _sentences(700, 8)
    docs = _documents(texts)
    cache = ActivationCache(tmp_path, reader.fingerprint)
    cache.encode_missing(lambda b: encode_texts(_faulty(reader, texts[3]), b), docs)
    retried = cache.encode_missing(lambda b: encode_texts(reader, b), docs, retry_rejected=True)
    assert (retried.encoded, retried.reused) == (1, 7)
    rows, status = _cache_tables(cache, docs)
    assert status["status"].to_list() == ["encoded"] * 8
    assert 3 in set(rows["doc_id"])
    again = cache.encode_missing(lambda b: encode_texts(reader, b), docs, retry_rejected=True)
    assert again.encoded == 0


def test_one_bad_document_at_asset_level(tmp_path):
    good, bad = _sentences(800, 20), _sentences(830, 1)[0]
    texts = good[:10] + [bad] + good[10:]
    data = tmp_path / "data"
    _landing_with(data, "batch", texts)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("datasets", ["batch"])
    resources = local_resources(data, sae_reader=_ModelFailsOnOneDocument(device="cpu", fail_on=bad))
    result = materialize(EMBED, partition_key="batch", instance=instance, resources=resources)
    assert result.success  # one bad document never fails the run
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert all(checks.values()) and "every_document_accounted_for" in checks, checks
    meta = next(
        e
        for e in result.asset_materializations_for_node("token_activations")
        if e.asset_key.path == ["token_activations"]
    ).metadata
    assert (meta["encoded_now"].value, meta["rejected"].value) == (20, 1)
    status = pl.read_parquet(data / "parquet/activation_status/batch.parquet").sort("doc_id")
    (row,) = status.filter(pl.col("status") != "encoded").to_dicts()
    assert (row["doc_id"], row["status"], row["reason"]) == (
        10,
        "rejected",
        f"model error: ValueError: {FAILURE}",
    )
    warnings = [
        e.message for e in instance.all_logs(result.run_id) if e.level == logging.WARNING and e.message
    ]
    assert any("could not be encoded" in m and "doc_id 10" in m and FAILURE in m for m in warnings), warnings
    acts = read_table(str(data / "parquet"), "token_activations", "batch").collect()
    assert set(acts["doc_id"].unique()) == set(range(21)) - {10}
    pooled = read_table(str(data / "parquet"), "pooled_embeddings", "batch").collect()
    assert set(pooled["doc_id"].unique()) == set(range(21)) - {10}


# ---------------------------------------------------------------- 4. hostile names and content

KEY = "sk-test-SECRET-recovery-0123456789abcdef"
A_FILE = 'Support "A"; DROP TABLE raw_documents;--.jsonl'
B_FILE = "Données été 🚀 ünïcode.csv"
SCRIPT_A = "<script>alert('a')</script>"
IMG_B = '<img src=x onerror="alert(1)">'
LABEL_HTML = "<b>sorry</b> <script>alert('label')</script>"
MATERIALIZED_DROPS = [  # two rows each, run through raw_documents -> pooled_embeddings
    "Reviews.csv",  # differs from the next one by case only
    "reviews.csv",
    "x" * 250 + ".csv",  # as long as a file name can be (255 bytes)
    "quoted 'folder'; rm -rf $HOME",  # a folder drop
]
LISTED_DROPS = [  # two rows each, only listed: names that sanitize alike must still differ
    "x" * 249 + "y.csv",  # same first 60 characters as the long one above
    "my data.csv",
    "my_data.csv",
    "my;data.csv",
    "ÀB.csv",
    "àb.csv",
]


def _llm_answer(messages: list[dict]) -> str:
    system, user = messages[0]["content"], messages[-1]["content"]
    if system == LABEL_SYSTEM_PROMPT:
        return json.dumps({"label": LABEL_HTML, "description": f"Mentions {IMG_B} apologies."})
    n = int(re.search(r"exactly (\d+) integers", user).group(1))
    return json.dumps([i % 2 for i in range(n)])


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    """One full run on hostile drops: names with quotes, semicolons, spaces, unicode, case twins, 250-char
    names and a folder; A/B documents carrying HTML/script; an LLM (local fake) with a key from EnvVar."""
    top = tmp_path_factory.mktemp("hostile")
    data = top / "data"
    landing = data / "landing"
    landing.mkdir(parents=True)
    demo_a = [json.loads(x) for x in (ROOT / "demo/landing/support_assistant_a.jsonl").open()][:40]
    with (landing / A_FILE).open("w", encoding="utf-8") as fh:
        for row in demo_a:
            fh.write(json.dumps(row | {"text": f"{SCRIPT_A} {row['text'][:160]}"}) + "\n")
    demo_b = pl.read_csv(ROOT / "demo/landing/support_assistant_b.csv").head(40)
    demo_b.with_columns((pl.lit(IMG_B + " ") + pl.col("text").str.slice(0, 160)).alias("text")).write_csv(
        landing / B_FILE
    )
    for i, name in enumerate(MATERIALIZED_DROPS + LISTED_DROPS):
        target = landing / name / "part.csv" if not name.endswith(".csv") else landing / name
        target.parent.mkdir(exist_ok=True)
        target.write_text(f'text\nfirst row of drop {i}\n"second; row\' of ""drop"" {i}"\n', encoding="utf-8")
    drops = {p.name: dataset_name_from_path(p) for p in landing.iterdir()}  # landing entry -> dataset
    assert sorted(drops.values()) == sorted(d.dataset for d in list_drops(landing))
    name_a, name_b = drops[A_FILE], drops[B_FILE]
    (data / "config").mkdir()
    (data / "config" / "comparisons.json").write_text(
        json.dumps([{"a": name_a, "b": name_b, "paired_on": "ticket_id"}])
    )
    comparison = comparison_key(name_a, name_b)

    capture = _Capture()
    root_logger = logging.getLogger()
    levels = {n: logging.getLogger(n).level for n in ("", "openai", "httpx", "httpcore", "resources.llm")}
    root_logger.addHandler(capture)
    for name in levels:
        logging.getLogger(name).setLevel(logging.DEBUG)
    os.environ["INTERP_LLM_API_KEY"] = KEY
    server = FakeLLMServer(answer=_llm_answer).start()
    server.enqueue(ServerError(401, f"Incorrect API key provided: {KEY}."))  # the key echoed back
    try:
        llm = LLMResource(
            base_url=server.base_url,
            model="fake-model",
            api_key=EnvVar("INTERP_LLM_API_KEY"),
            max_calls=40,
            backoff_base_s=0.01,
            timeout_s=10.0,
        )
        resources = local_resources(data, llm=llm)
        instance = DagsterInstance.ephemeral()
        materialized = sorted(drops[n] for n in [A_FILE, B_FILE, *MATERIALIZED_DROPS])
        instance.add_dynamic_partitions("datasets", materialized)
        results = []
        for dataset in materialized:
            results.append(materialize(EMBED, partition_key=dataset, instance=instance, resources=resources))
        label_config = {"n_frequent": 3, "n_distinctive": 3, "n_evidence": 10, "n_holdout": 20}
        for dataset in (name_a, name_b):
            results.append(
                materialize(
                    EMBED + LABEL,
                    selection=LABEL,
                    partition_key=dataset,
                    instance=instance,
                    resources=resources,
                    run_config={"ops": {"feature_labels": {"config": label_config}}},
                )
            )
        instance.add_dynamic_partitions("comparisons", [comparison])
        results.append(
            materialize(
                [BY_NAME["diff_reports"]], partition_key=comparison, instance=instance, resources=resources
            )
        )
        assert all(r.success for r in results)
        db = data / "warehouse.duckdb"
        counts = refresh_views(str(db), str(data / "parquet"), WAREHOUSE_TABLES)
        yield {
            "top": top,
            "data": data,
            "instance": instance,
            "results": results,
            "drops": drops,
            "materialized": materialized,
            "a": name_a,
            "b": name_b,
            "comparison": comparison,
            "db": db,
            "counts": counts,
            "logs": capture.lines,
            "requests": list(server.requests),
        }
    finally:
        server.stop()
        os.environ.pop("INTERP_LLM_API_KEY", None)
        root_logger.removeHandler(capture)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def test_hostile_drop_names_map_to_distinct_safe_datasets(hostile_run):
    drops = hostile_run["drops"]
    names = list(drops.values())
    assert len(names) == len(MATERIALIZED_DROPS) + len(LISTED_DROPS) + 2
    assert len({n.lower() for n in names}) == len(names), drops  # distinct even case-insensitively
    for original, name in drops.items():
        assert check_storage_key(name) == name and len(name) <= 60, (original, name)
        assert not set(name) & set("'\";/\\ \t"), (original, name)
    # readable where possible, hashed where the name had to change
    assert drops["reviews.csv"] == "reviews"
    assert re.fullmatch(r"reviews-[0-9a-f]{8}", drops["Reviews.csv"])
    assert drops["my_data.csv"] == "my_data"
    assert drops["my data.csv"].startswith("my_data-") and drops["my;data.csv"].startswith("my_data-")
    assert drops["ÀB.csv"].startswith("ab-") and drops["àb.csv"].startswith("ab-")
    assert drops[B_FILE].startswith("donnees_ete_")
    long_names = [drops["x" * 250 + ".csv"], drops["x" * 249 + "y.csv"]]
    assert long_names[0] != long_names[1]
    # every partition of every table is its own file inside <data>/parquet; nothing else was written
    parquet = hostile_run["data"] / "parquet"
    for table in (
        "raw_documents",
        "document_rejects",
        "token_activations",
        "tokens",
        "activation_status",
        "pooled_embeddings",
    ):
        stems = sorted(p.name.removesuffix(".parquet") for p in (parquet / table).iterdir())
        assert stems == hostile_run["materialized"], table
    for ds in hostile_run["materialized"]:
        docs = pl.read_parquet(parquet / "raw_documents" / f"{ds}.parquet")
        assert docs["dataset"].unique().to_list() == [ds]
    top = hostile_run["top"].resolve()
    for path in top.rglob("*"):
        resolved = path.resolve()
        assert resolved.is_relative_to(top / "data"), path
    assert sorted(p.name for p in top.iterdir()) == ["data"]


def test_warehouse_views_work_and_no_name_reaches_sql(hostile_run):
    db, names = str(hostile_run["db"]), hostile_run["materialized"]
    con = connect_read_only(db)
    try:
        objects = con.execute(
            "select table_name, table_type from information_schema.tables order by table_name"
        ).fetchall()
    finally:
        con.close()
    # one view per table that has Parquet files, plus the joined token_activations_wide: nothing extra,
    # nothing dropped
    assert set(hostile_run["counts"]) >= {
        "raw_documents",
        "token_activations",
        "feature_labels",
        "diff_reports",
    }
    views = [*hostile_run["counts"], "token_activations_wide"]
    assert objects == sorted((t, "VIEW") for t in views), objects
    datasets = query(db, "select distinct dataset from raw_documents order by 1")["dataset"].to_list()
    assert datasets == names
    for ds in names:
        assert query(db, "select count(*) as n from raw_documents where dataset = ?", [ds])["n"][0] == (
            40 if ds in (hostile_run["a"], hostile_run["b"]) else 2
        )
    texts = query(db, "select text from raw_documents where dataset = ? order by doc_id", [hostile_run["a"]])
    assert texts["text"][0].startswith(SCRIPT_A)  # stored verbatim: escaping is the renderers' job
    report = query(db, "select * from diff_reports")
    assert report["comparison"].to_list() == [hostile_run["comparison"]]


@pytest.mark.parametrize(
    "key", ["../../outside", "a'; DROP TABLE raw_documents; --", "/tmp/absolute", "..", "x" * 300, "Réseau"]
)
def test_hostile_partition_keys_are_refused_before_anything_is_written(tmp_path, key):
    data = tmp_path / "data"
    _landing_with(data, "fine", ["hello there"])
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("datasets", [key])
    for selection in (EMBED[:1], EMBED[1:2]):  # raw_documents, then token_activations reading it
        result = materialize(
            EMBED[:2],
            selection=selection,
            partition_key=key,
            instance=instance,
            resources=local_resources(data),
            raise_on_error=False,
        )
        assert not result.success
    diff_key = f"{key}__vs__fine"
    instance.add_dynamic_partitions("comparisons", [diff_key])
    diff = materialize(
        [BY_NAME["diff_reports"]],
        partition_key=diff_key,
        instance=instance,
        resources=local_resources(data),
        raise_on_error=False,
    )
    assert not diff.success
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["data/landing/fine.jsonl"]


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.add(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_reports_escape_html_from_documents_and_labels(hostile_run):
    report = query(str(hostile_run["db"]), "select * from diff_reports").to_dicts()[0]
    md = Path(report["report_markdown_path"]).read_text(encoding="utf-8")
    html = Path(report["report_html_path"]).read_text(encoding="utf-8")
    assert Path(report["report_html_path"]).resolve().is_relative_to(hostile_run["data"].resolve())
    for raw in ("<script", "<img", "<b>"):
        assert raw not in md.lower(), raw
    assert "&lt;script&gt;" in md and "&lt;img" in md  # the documents and labels are there, escaped
    parsed = _Tags()
    parsed.feed(html)
    assert not {"script", "img", "iframe", "object", "embed"} & parsed.tags, parsed.tags  # <b> is ours
    text = "".join(parsed.text)
    assert SCRIPT_A.removesuffix("</script>") in text or "alert('a')" in text
    assert IMG_B in text and "<b>sorry</b>" in text  # shown as text, not markup
    # the Markdown shown in the Dagster UI is the same escaped report
    diff_result = hostile_run["results"][-1]
    materialized = diff_result.asset_materializations_for_node("diff_reports")  # and diff_features
    (report,) = [m for m in materialized if m.asset_key == AssetKey("diff_reports")]
    shown = report.metadata["report"].value
    assert "<script" not in shown.lower() and "<img" not in shown.lower()


def test_api_key_is_used_but_never_stored_or_logged(hostile_run):
    requests = hostile_run["requests"]
    assert requests and all(r.headers["authorization"] == f"Bearer {KEY}" for r in requests)
    labels = pl.read_parquet(hostile_run["data"] / "parquet/feature_labels" / f"{hostile_run['a']}.parquet")
    assert any(s.startswith("llm:") for s in labels["source"])  # the LLM path really ran
    secret = KEY.encode()
    files = [p for p in hostile_run["top"].rglob("*") if p.is_file()]
    leaked = [str(p) for p in files if secret in p.read_bytes()]
    assert not leaked
    instance = hostile_run["instance"]
    runs = instance.get_runs()
    assert len(runs) == len(hostile_run["results"])
    for run in runs:  # run config, tags, asset selection: what the run storage keeps
        assert KEY not in str(run), run.run_id
    for key in (k for asset in ALL_ASSETS for k in asset.keys):
        for record in instance.fetch_materializations(key, limit=100).records:
            assert KEY not in str(record), key
    for result in hostile_run["results"]:
        for entry in instance.all_logs(result.run_id):
            assert KEY not in str(entry), entry
        for mat in result.get_asset_materialization_events():
            assert KEY not in str(mat.materialization.metadata)
    assert hostile_run["logs"] and all(KEY not in line for line in hostile_run["logs"])
    # the 401 that echoed the key was logged as a labeling error, redacted
    warnings = [
        e.message
        for r in hostile_run["results"]
        for e in instance.all_logs(r.run_id)
        if e.level == logging.WARNING and e.message and "LLM" in e.message
    ]
    assert any("401" in w and "***" in w for w in warnings), warnings


PICKLE_SUFFIXES = {".pkl", ".pickle", ".joblib", ".pt", ".pth", ".ckpt", ".bin", ".npy", ".npz", ".dill"}


def _looks_like_pickle(path: Path) -> bool:
    head = path.read_bytes()[:2]
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle protocol 2-5 header
        return True
    if zipfile.is_zipfile(path):  # torch.save archives hold data.pkl
        with zipfile.ZipFile(path) as z:
            return any(n.endswith((".pkl", ".pickle")) for n in z.namelist())
    return path.suffix.lower() in PICKLE_SUFFIXES


def test_no_stored_file_is_a_pickle(hostile_run):
    data = hostile_run["data"]
    kinds: dict[str, int] = {}
    for path in data.rglob("*"):
        if not path.is_file():
            continue
        rel = path.relative_to(data)
        assert not _looks_like_pickle(path), rel
        raw = path.read_bytes()
        if rel.parts[0] == "landing":
            kind = "drop"
        elif path.suffix == ".parquet":
            assert raw[:4] == b"PAR1" and raw[-4:] == b"PAR1", rel
            kind = "parquet"
        elif path.suffix == ".duckdb":
            assert raw[8:12] == b"DUCK", rel
            kind = "duckdb"
        elif path.suffix == ".json":
            json.loads(raw)
            kind = "json"
        elif path.suffix in (".md", ".html"):
            assert b"\x00" not in raw
            raw.decode("utf-8")
            kind = "report"
        else:
            pytest.fail(f"unexpected stored file {rel}")
        kinds[kind] = kinds.get(kind, 0) + 1
    assert kinds.get("parquet", 0) > 20 and kinds.get("report") == 2 and kinds.get("duckdb") == 1, kinds
    # and no output goes through Dagster's default IO manager (which pickles)
    keys = {a.get_io_manager_key_for_asset_key(k) for a in ALL_ASSETS for k in a.keys}
    assert keys == {"parquet_io_manager"}, keys


SOURCE_DIRS = ("interp_assets", "resources", "io_managers", "scripts")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}


def _python_sources() -> list[Path]:
    files = [ROOT / "definitions.py"]
    for folder in SOURCE_DIRS:
        files += sorted((ROOT / folder).rglob("*.py"))
    return files


def test_no_pickle_in_the_source():
    problems = []
    files = _python_sources()
    assert len(files) > 20
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                mods = {(node.module or "").split(".")[0]}
            else:
                mods = set()
            if mods & PICKLE_MODULES:
                problems.append(f"{where}:{node.lineno} imports {sorted(mods & PICKLE_MODULES)}")
            if isinstance(node, ast.Attribute) and node.attr in ("read_pickle", "to_pickle"):
                problems.append(f"{where}:{node.lineno} uses .{node.attr}")
            if isinstance(node, ast.Call):
                func = node.func
                name = ast.unparse(func)
                kwargs = {k.arg: k.value for k in node.keywords}
                if name.endswith("torch.load"):
                    value = kwargs.get("weights_only")
                    if not (isinstance(value, ast.Constant) and value.value is True):
                        problems.append(f"{where}:{node.lineno} calls {name} without weights_only=True")
                allow = kwargs.get("allow_pickle")
                if isinstance(allow, ast.Constant) and allow.value is True:
                    problems.append(f"{where}:{node.lineno} passes allow_pickle=True")
                trust = kwargs.get("trust_remote_code")
                if isinstance(trust, ast.Constant) and trust.value is True:
                    problems.append(f"{where}:{node.lineno} passes trust_remote_code=True")
    assert not problems, problems
    # shipped weights are safetensors, not pickles
    shipped = [p for p in (ROOT / "resources").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert any(p.suffix == ".safetensors" for p in shipped)
    assert not [p for p in shipped if _looks_like_pickle(p)]
