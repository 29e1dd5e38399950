"""The bundled model built and certified: its recipe, training, model card and regime checks (above
the mitigations, which the card measures; :mod:`dori.toy` holds what sits below them)."""
