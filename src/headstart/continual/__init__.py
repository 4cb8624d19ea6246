"""Continual updates: a specialist keeps learning from its owner's data, night after night, without forgetting."""
