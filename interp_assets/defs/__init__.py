"""Dagster definitions: the only interp_assets package that imports Dagster.

Assets by domain (`ingest_assets`, `feature_assets`, `label_assets`, `analysis_assets`,
`document_assets`, `cluster_assets`; `assets` lists them all), what they share (`shared`: model pool,
data versions, stored-table reads), `sensors`, `jobs` and `partitions`. Assets are thin wiring around the
pure packages; they may import anything in interp_assets, `resources/` and `io_managers/`.
"""
