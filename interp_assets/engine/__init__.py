"""The engine: reading documents through a language model and an SAE, and what that produces.

Owns reader loading (`reader`, `reader_model`: model, SAE, hook-to-layer mapping), the activation engine
(`activations`, the fused BERT forward `bert_forward`, allocator settings and workspace buffers
`allocator`), the content-addressed activation cache (`activation_cache`), pooling (`pooling`),
document embeddings and document SAEs (`documents`) and SAELens TopK training (`sae_training`).

May import `interp_assets.storage` (the Parquet format) and third-party libraries; never Dagster,
`resources/`, `io_managers/` or the other interp_assets packages.
"""
