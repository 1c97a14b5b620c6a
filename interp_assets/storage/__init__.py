"""Storage: where tables live and how they are written and read.

Owns storage paths and key sanitizing (`paths`), the Parquet table format (`parquet`: atomic
streaming writes, segmented partitions with a manifest, lazy Polars reads, local or fsspec URLs), content
checksums of stored files (`checksums`) and every table's documented columns (`schemas`: types and meanings
for the catalog and the README).

Imports no other interp_assets package and never Dagster; `io_managers/parquet.py` is the Dagster side.
"""
