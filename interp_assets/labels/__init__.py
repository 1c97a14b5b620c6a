"""Labels: naming features and checking the names.

Owns evidence/held-out splits and excerpts (`evidence`), labelers and the label cache (`labeling`),
scorers (`scoring`), sentence embeddings (`embedding`) and which features to label
(`feature_selection`).

May import `engine` (to load the embedding model), `analysis` (diff statistics, highlighting) and
`storage`; never Dagster, `resources/` or `io_managers/` (an LLM client is passed in as a `ChatClient`).
"""
