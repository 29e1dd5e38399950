"""The pruning mitigations that the DoRI attack defeats: NeMo (neurons) and Wanda (weights)."""
