"""interp_assets: SAE features over text datasets, as pure functions with thin Dagster wiring around them.

Where things live (each package's docstring says what it owns and what it may import):

- `engine/`: reading documents through the model: reader loading, activations, the fused BERT forward,
  allocator and workspace, the activation cache, pooling.
- `labels/`: evidence splits, labelers (offline, LLM, published), scorers, sentence embeddings,
  which features to label.
- `analysis/`: dataset diffs, associations with metadata columns, report rendering.
- `storage/`: the Parquet table format (atomic and segmented writes, reads), storage paths and every
  table's documented columns.
- `defs/`: everything that imports Dagster: assets, asset checks, sensors, jobs, partitions.
- `ingest.py` (drops -> documents), `comparisons.py` (declared comparisons, dataset settings),
  `warehouse.py` (DuckDB views), `notebook.py` (the notebook API), `scale.py` (the sizing model),
  `threads.py` (waiting on other threads without going deaf to Ctrl-C).

Only `defs/` imports Dagster, `resources/` or `io_managers/`; `tests/test_layout.py` checks it.
"""
