"""Ingest: raw_documents (a dataset's drop read into documents) and, from the same step, document_rejects
(its bad rows)."""

import hashlib

import pyarrow as pa
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    DataVersion,
    MetadataValue,
    Output,
    multi_asset,
)

from interp_assets import ingest
from interp_assets.defs.partitions import datasets_partitions
from interp_assets.defs.shared import dataset_settings, side_table_output, table_out
from interp_assets.storage.parquet import write_table
from resources.storage import StorageResource

DOCUMENT_REJECTS_SCHEMA = pa.schema(
    [
        ("dataset", pa.string()),
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        ("problem", pa.string()),
    ]
)


class RawDocumentsConfig(Config):
    """How to read a drop. Per-dataset settings in `<data_dir>/config/datasets.json` take precedence."""

    text_column: str = "text"
    id_column: str | None = None


@multi_asset(
    name="raw_documents",
    partitions_def=datasets_partitions,
    outs={
        "raw_documents": table_out(
            "raw_documents",
            group="ingest",
            kinds={"polars", "parquet"},
            code_version="1",
            description="Documents of one dataset, read from its drop in the landing folder; bad rows go to "
            "document_rejects with file, row and problem.",
        ),
        "document_rejects": table_out(
            "document_rejects",
            group="ingest",
            kinds={"polars", "parquet"},
            code_version="1",
            description="Rows of a dataset's drop that could not be read (file, row, problem); the good rows "
            "are in raw_documents. Written by the same step, empty when every row was read.",
        ),
    },
    check_specs=[AssetCheckSpec("documents_have_text", asset="raw_documents")],
)
def raw_documents(context: AssetExecutionContext, config: RawDocumentsConfig, storage: StorageResource):
    dataset = context.partition_key
    bad_names: dict[str, ingest.DropError] = {}
    found, clashes = ingest.scan_drops(storage.landing_dir, bad_names=bad_names)
    if dataset in clashes:
        raise ingest.clash_error(dataset, clashes[dataset])
    if dataset in bad_names:
        raise bad_names[dataset]
    drops = {d.dataset: d for d in found}
    if dataset not in drops:
        raise FileNotFoundError(
            f"No drop for dataset {dataset!r} in {storage.landing_dir}: put a CSV/TSV/JSONL/Parquet file "
            f"'{dataset}.<ext>' (or a folder '{dataset}/') there, or delete the partition."
        )
    drop = drops[dataset]
    settings = dataset_settings(storage, dataset)
    text_column = settings.get("text_column", config.text_column)
    id_column = settings.get("id_column", config.id_column)
    result = ingest.read_drop(drop, dataset, text_column=text_column, id_column=id_column)
    rejects = (
        result.rejects.cast(DOCUMENT_REJECTS_SCHEMA)
        if result.rejects.num_rows
        else DOCUMENT_REJECTS_SCHEMA.empty_table()
    )
    version = DataVersion(
        hashlib.sha256(f"{drop.fingerprint}:{text_column}:{id_column}".encode()).hexdigest()[:24]
    )
    written = write_table(storage.parquet_base, "document_rejects", dataset, rejects)
    docs = result.documents
    if rejects.num_rows:
        context.log.warning(
            f"{rejects.num_rows} row(s) of {dataset} rejected, e.g. "
            + "; ".join(
                f"{r['source_file']} row {r['source_row']}: {r['problem']}"
                for r in rejects.slice(0, 3).to_pylist()
            )
        )
    texts = docs.column("text")
    empty = sum(1 for t in texts.to_pylist() if not t or not t.strip())
    yield Output(
        docs,
        output_name="raw_documents",
        data_version=version,
        metadata={
            "documents": docs.num_rows,
            "rejected_rows": rejects.num_rows,
            "drop_fingerprint": drop.fingerprint[:16],
            "files": MetadataValue.json(
                list(result.summary.get("per_file", {})) or [str(p) for p in drop.paths]
            ),
            "text_column": text_column,
        },
    )
    yield side_table_output("document_rejects", written, version)  # same inputs, same data version
    yield AssetCheckResult(
        check_name="documents_have_text",
        passed=empty == 0 and docs.num_rows > 0,
        metadata={"empty_texts": empty, "documents": docs.num_rows},
    )
