"""Partitions: one per dataset, and one per comparison of two datasets (keys: `interp_assets.comparisons`)."""

from dagster import DynamicPartitionsDefinition

datasets_partitions = DynamicPartitionsDefinition(name="datasets")
comparisons_partitions = DynamicPartitionsDefinition(name="comparisons")
