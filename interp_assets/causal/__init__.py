"""Causal evidence: interventions on SAE features inside the reader (nnsight)."""
