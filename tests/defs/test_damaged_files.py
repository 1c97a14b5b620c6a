"""A damaged stored file fails nothing but itself: it is found when trusted, named, set aside and
recomputed, and the tables come out equal to an undamaged run's. Damage is truncation (size and footer
show it) or bytes flipped inside a data page (only the content checksum shows it)."""

import sys
from pathlib import Path

import polars as pl
from dagster import AssetKey, DagsterInstance, materialize

from interp_assets.defs.assets import ALL_ASSETS
from interp_assets.storage.parquet import read_table, table_segments
from resources.local import local_resources

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _faults import flip_inside_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EMBED = ("raw_documents", "token_activations", "pooled_embeddings")


def _setup(tmp_path: Path) -> tuple[Path, DagsterInstance, dict, list]:
    data = tmp_path / "data"
    landing = data / "landing"
    landing.mkdir(parents=True)
    lines = (ROOT / "demo/landing/support_assistant_a.jsonl").read_text().splitlines()
    (landing / "first.jsonl").write_text("\n".join(lines[:12]) + "\n")
    (landing / "second.jsonl").write_text("\n".join(lines[12:20]) + "\n")
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("datasets", ["first", "second"])
    by_name = {k.to_user_string(): a for a in ALL_ASSETS for k in a.keys}
    return data, instance, local_resources(data), [by_name[n] for n in EMBED]


def _content(data: Path, table: str, dataset: str) -> pl.DataFrame:
    frame = read_table(str(data / "parquet"), table, dataset).collect()
    keys = [c for c in ("doc_id", "token_index", "feature") if c in frame.columns]
    return frame.sort(keys)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(8, path.stat().st_size // 2)])


def test_a_truncated_token_activations_segment_is_written_again(tmp_path: Path) -> None:
    data, instance, resources, embed = _setup(tmp_path)
    assert materialize(embed, partition_key="first", instance=instance, resources=resources).success
    before = {t: _content(data, t, "first") for t in ("token_activations", "pooled_embeddings")}
    segment = Path(next(iter(table_segments(str(data / "parquet"), "token_activations", "first").values())))
    _truncate(segment)

    again = materialize(embed, partition_key="first", instance=instance, resources=resources)
    assert again.success
    checks = {e.check_name: e.passed for e in again.get_asset_check_evaluations()}
    assert all(checks.values()), checks
    meta = next(
        e
        for e in again.asset_materializations_for_node("token_activations")
        if e.asset_key.path == ["token_activations"]
    ).metadata
    assert meta["encoded_now"].value == 0  # the cache still holds it: rewritten, not re-encoded
    logs = " ".join(str(e) for e in instance.all_logs(again.run_id))
    assert segment.name in logs and "damaged" in logs
    for table, frame in before.items():
        assert _content(data, table, "first").equals(frame), table


def test_a_corrupt_cache_chunk_is_quarantined_and_its_documents_encoded_again(tmp_path: Path) -> None:
    data, instance, resources, embed = _setup(tmp_path)
    assert materialize(embed, partition_key="first", instance=instance, resources=resources).success
    before = _content(data, "token_activations", "first")
    chunk = next((data / "cache" / "activations").rglob("*.acts.parquet"))
    _truncate(chunk)

    # another dataset on the same reader is not blocked by it
    other = materialize(embed, partition_key="second", instance=instance, resources=resources)
    assert other.success
    logs = " ".join(str(e) for e in instance.all_logs(other.run_id))
    assert chunk.name in logs and "quarantine" in logs
    assert (chunk.parent / "quarantine" / chunk.name).exists() and not chunk.exists()

    # the damaged dataset's documents are encoded again and its table is what it was
    again = materialize(embed, partition_key="first", instance=instance, resources=resources)
    assert again.success
    meta = next(
        e
        for e in again.asset_materializations_for_node("token_activations")
        if e.asset_key.path == ["token_activations"]
    ).metadata
    assert meta["encoded_now"].value == 12
    progress = " ".join(str(e) for e in instance.all_logs(again.run_id))
    assert "first: encoding new documents: 12/12 documents" in progress  # the step says how far it is
    after = _content(data, "token_activations", "first")
    assert after.select("doc_id", "token_index", "feature").equals(
        before.select("doc_id", "token_index", "feature")
    )
    diff = (after["activation"].cast(pl.Float32) - before["activation"].cast(pl.Float32)).abs().max()
    assert diff is not None and diff <= 2e-3


def _same_activations(after: pl.DataFrame, before: pl.DataFrame) -> None:
    """Equal rows; values equal up to float16 rounding of a re-encode in other batches."""
    keys = ["doc_id", "token_index", "feature"]
    assert after.select(keys).equals(before.select(keys))
    diff = (after["activation"].cast(pl.Float32) - before["activation"].cast(pl.Float32)).abs().max()
    assert diff is not None and diff <= 2e-3


def test_flipped_bytes_in_stored_segments_are_found_and_written_again(tmp_path: Path) -> None:
    data, instance, resources, embed = _setup(tmp_path)
    assert materialize(embed, partition_key="first", instance=instance, resources=resources).success
    before = {t: _content(data, t, "first") for t in ("token_activations", "pooled_embeddings")}
    base = str(data / "parquet")
    damaged = [Path(next(iter(table_segments(base, t, "first").values()))) for t in before]
    for path in damaged:
        flip_inside_data(path)  # same size, readable footer

    again = materialize(embed, partition_key="first", instance=instance, resources=resources)
    assert again.success
    assert all(e.passed for e in again.get_asset_check_evaluations())
    meta = next(
        e
        for e in again.asset_materializations_for_node("token_activations")
        if e.asset_key.path == ["token_activations"]
    ).metadata
    assert (meta["encoded_now"].value, meta["segments_written"].value) == (0, 1)  # rewritten from the cache
    logs = " ".join(str(e) for e in instance.all_logs(again.run_id))
    for path in damaged:
        assert path.name in logs
    assert "content checksum" in logs
    for table, frame in before.items():
        assert _content(data, table, "first").equals(frame), table


def test_flipped_bytes_in_a_cache_chunk_are_found_before_its_rows_are_reused(tmp_path: Path) -> None:
    data, instance, resources, embed = _setup(tmp_path)
    assert materialize(embed, partition_key="first", instance=instance, resources=resources).success
    before = _content(data, "token_activations", "first")
    chunk = next((data / "cache" / "activations").rglob("*.acts.parquet"))
    flip_inside_data(chunk)
    # the segment made from it must be written again, so the chunk's rows would be read
    segment = Path(next(iter(table_segments(str(data / "parquet"), "token_activations", "first").values())))
    flip_inside_data(segment)

    again = materialize(embed, partition_key="first", instance=instance, resources=resources)
    assert again.success
    assert all(e.passed for e in again.get_asset_check_evaluations())
    logs = " ".join(str(e) for e in instance.all_logs(again.run_id))
    assert chunk.name in logs and "quarantine" in logs and "content checksum" in logs
    assert (chunk.parent / "quarantine" / chunk.name).exists() and not chunk.exists()
    meta = next(
        e
        for e in again.asset_materializations_for_node("token_activations")
        if e.asset_key.path == ["token_activations"]
    ).metadata
    assert meta["encoded_now"].value == 12  # encoded again in the same run, no second run needed
    _same_activations(_content(data, "token_activations", "first"), before)


def test_an_unchanged_rerun_reads_no_cache_chunk(tmp_path: Path, monkeypatch) -> None:
    """Verification of cache chunks costs nothing when every segment is kept."""
    from interp_assets.engine import activation_cache

    data, instance, resources, embed = _setup(tmp_path)
    assert materialize(embed, partition_key="first", instance=instance, resources=resources).success
    hashed: list[str] = []
    real = activation_cache.checksum_problem
    monkeypatch.setattr(activation_cache, "checksum_problem", lambda p, *a: hashed.append(p) or real(p, *a))
    again = materialize(embed, partition_key="first", instance=instance, resources=resources)
    assert again.success and hashed == []


def test_a_stored_table_with_flipped_bytes_is_computed_again_not_reused(tmp_path: Path) -> None:
    data, instance, resources, embed = _setup(tmp_path)
    assoc = next(a for a in ALL_ASSETS if AssetKey("feature_associations") in a.keys)
    assert materialize([*embed, assoc], partition_key="first", instance=instance, resources=resources).success
    path = data / "parquet" / "feature_associations" / "first.parquet"
    before = pl.read_parquet(path)

    def run() -> tuple:
        result = materialize([assoc], partition_key="first", instance=instance, resources=resources)
        assert result.success
        return result.asset_materializations_for_node("feature_associations")[0].metadata, result.run_id

    meta, _ = run()
    assert meta["reused_stored_table"].value  # inputs unchanged: kept as it is
    flip_inside_data(path)
    meta, run_id = run()
    assert "reused_stored_table" not in meta
    logs = " ".join(str(e) for e in instance.all_logs(run_id))
    assert str(path) in logs and "content checksum" in logs
    assert pl.read_parquet(path).equals(before)
    meta, _ = run()
    assert meta["reused_stored_table"].value
