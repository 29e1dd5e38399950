"""The bundled model's synthetic data, its training recipe, and its measuring instruments."""
