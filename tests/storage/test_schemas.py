"""One schema source (`interp_assets/storage/schemas.py`): the README's table section is its rendering, and
its columns and types are the ones the code writes."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa

from interp_assets.storage import schemas
from interp_assets.storage.schemas import TABLES, render_markdown, schema_mismatches

ROOT = Path(__file__).resolve().parents[2]


def test_readme_table_section_is_the_rendering() -> None:
    section = schemas.readme_section((ROOT / "README.md").read_text())
    assert section == render_markdown(), "run: python -m interp_assets.storage.schemas --write"
    assert schemas.main(["--check"]) == 0


def test_check_mode_fails_on_a_stale_readme(tmp_path: Path, capsys) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("intro\n\n" + render_markdown().replace("SAE width", "width") + "\n\nmore\n")
    assert schemas.main(["--check", "--readme", str(readme)]) == 1
    assert "--write" in capsys.readouterr().err
    assert schemas.main(["--write", "--readme", str(readme)]) == 0
    assert readme.read_text() == "intro\n\n" + render_markdown() + "\n\nmore\n"


def test_every_column_has_a_type_and_a_meaning() -> None:
    for table in TABLES.values():
        names = [name for name, *_ in table.columns]
        assert len(names) == len(set(names)), table.name
        for name, type_, meaning, _ in table.columns:
            assert type_ and len(meaning) > 5, (table.name, name)


def _arrow(schema: dict) -> pa.Schema:
    return pl.DataFrame(schema=schema).to_arrow().schema


def test_documented_columns_are_the_ones_the_code_writes() -> None:
    from interp_assets.analysis.associations import CRITERIA_SCHEMA
    from interp_assets.analysis.diffing import DIFF_SCHEMA, EXTRA_COLUMNS
    from interp_assets.defs.document_assets import DOCUMENT_EMBEDDINGS_SCHEMA, DOCUMENT_FEATURES_SCHEMA
    from interp_assets.engine.activation_cache import ACTIVATION_STATUS_SCHEMA, token_activations_schema
    from interp_assets.engine.pooling import POOLED_SCHEMA
    from interp_assets.ingest import REJECTS_SCHEMA, RESERVED_COLUMNS
    from interp_assets.labels.labeling import FEATURE_LABELS_SCHEMA
    from interp_assets.labels.scoring import FEATURE_SCORES_SCHEMA

    written = {
        "token_activations": token_activations_schema("float16"),
        "pooled_embeddings": POOLED_SCHEMA,
        "activation_status": ACTIVATION_STATUS_SCHEMA,
        "document_rejects": REJECTS_SCHEMA,
        "feature_labels": _arrow(FEATURE_LABELS_SCHEMA),
        "feature_scores": _arrow(FEATURE_SCORES_SCHEMA),
        "feature_associations": _arrow(CRITERIA_SCHEMA),
        "document_embeddings": _arrow(DOCUMENT_EMBEDDINGS_SCHEMA),
        "document_features": _arrow(DOCUMENT_FEATURES_SCHEMA),
    }
    for table, schema in written.items():
        assert not schema_mismatches(table, schema), schema_mismatches(table, schema)
        assert schema.names == [n for n, *_ in TABLES[table].columns], table  # and in the stored order
    # diff_features: the statistics' columns (the identity and family columns are added by the asset)
    diff = _arrow(DIFF_SCHEMA | EXTRA_COLUMNS)
    problems = [p for p in schema_mismatches("diff_features", diff) if "is missing" not in p]
    assert not problems, problems
    assert [n for n, *_ in TABLES["raw_documents"].columns] == list(RESERVED_COLUMNS)


def test_mismatches_are_named() -> None:
    wrong = pa.schema([("dataset", pa.string()), ("doc_id", pa.int64()), ("extra", pa.string())])
    problems = schema_mismatches("pooled_embeddings", wrong)
    assert "pooled_embeddings.doc_id: stored as int64, documented as int32" in problems
    assert "pooled_embeddings: column 'extra' is not documented" in problems
    assert "pooled_embeddings: documented column 'feature' is missing" in problems
    # raw_documents keeps the drop's other columns: they are not "undocumented"
    docs = pa.schema([(n, pa.string()) for n in ("dataset", "doc_hash", "text", "source_file")])
    docs = docs.append(pa.field("doc_id", pa.int32())).append(pa.field("source_row", pa.int64()))
    assert schema_mismatches("raw_documents", docs.append(pa.field("csat", pa.int64()))) == []
