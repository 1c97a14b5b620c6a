"""Analysis: what the features say about datasets.

Owns dataset diffs (`diffing`), associations of features with metadata columns (`associations`) and
report rendering (`reports`).

May import `ingest` (reserved column names) and `storage`; never Dagster, `resources/`, `io_managers/`,
`engine` or `labels`.
"""
