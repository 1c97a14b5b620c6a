"""Analysis: what the features say about datasets.

Owns dataset diffs (`diffing`), associations of features with metadata columns (`associations`),
report rendering (`reports`), per-feature statistics (`feature_stats`), matching features across readers
(`matching`) and clustering features and documents (`clustering`).

May import `ingest` (reserved column names) and `storage`; never Dagster, `resources/`, `io_managers/`,
`engine` or `labels`.
"""
