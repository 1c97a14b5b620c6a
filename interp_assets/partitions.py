"""Partitions: one per dataset, and one per comparison of two datasets."""

from dagster import DynamicPartitionsDefinition

from interp_assets.paths import check_storage_key

datasets_partitions = DynamicPartitionsDefinition(name="datasets")
comparisons_partitions = DynamicPartitionsDefinition(name="comparisons")

COMPARISON_SEPARATOR = "__vs__"


def comparison_key(dataset_a: str, dataset_b: str) -> str:
    """Partition key of the comparison of dataset A with dataset B: `A__vs__B`."""
    check_storage_key(dataset_a, "dataset name")
    check_storage_key(dataset_b, "dataset name")
    if dataset_a == dataset_b:
        raise ValueError(f"A comparison needs two different datasets; both are {dataset_a!r}.")
    return check_storage_key(f"{dataset_a}{COMPARISON_SEPARATOR}{dataset_b}", "comparison key")


def parse_comparison_key(key: str) -> tuple[str, str]:
    """Inverse of `comparison_key`."""
    a, sep, b = key.partition(COMPARISON_SEPARATOR)
    if not sep or not a or not b or COMPARISON_SEPARATOR in b:
        raise ValueError(
            f"Comparison key {key!r} is not of the form '<dataset_a>{COMPARISON_SEPARATOR}<dataset_b>'."
        )
    return a, b
