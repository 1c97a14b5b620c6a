"""Dagster resources: the SAE reader (language model + SAE) and the LLM client."""
