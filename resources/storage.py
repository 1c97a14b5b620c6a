"""The storage resource: where landing drops, Parquet tables, caches, reports and DuckDB live."""

from pathlib import Path

from dagster import ConfigurableResource

from interp_assets.storage.paths import DATA_DIR_ENV, require_utf8_path


class StorageResource(ConfigurableResource):
    """All platform state under one `data_dir` (default `$INTERP_DATA_DIR` or `./var`).

    `parquet_base` may be an object-store URL (s3://...) when the IO manager is pointed there too, and so
    may `activation_cache_root` (`activation_cache_url`); landing, config, the other caches and reports
    are local folders.
    """

    data_dir: str
    parquet_base_url: str | None = None
    activation_cache_url: str | None = None

    @property
    def root(self) -> Path:
        fix = f"Rename the folder (or a folder above it) or choose another, and set {DATA_DIR_ENV} to it."
        return Path(require_utf8_path(self.data_dir, "data folder", fix))

    @property
    def parquet_base(self) -> str:
        return self.parquet_base_url or str(self.root / "parquet")

    @property
    def landing_dir(self) -> Path:
        return self.root / "landing"

    @property
    def config_dir(self) -> Path:
        return self.root / "config"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def activation_cache_root(self) -> str | Path:
        """Root of the activation cache (`interp_assets.engine.activation_cache`): `activation_cache_url`
        (an fsspec URL such as s3://bucket/prefix) or `<cache_dir>/activations`."""
        return self.activation_cache_url or self.cache_dir / "activations"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def duckdb_path(self) -> Path:
        return self.root / "warehouse.duckdb"
