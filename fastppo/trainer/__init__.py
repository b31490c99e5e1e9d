"""The training loops of ``fastppo train``: thin, readable top to bottom, on transformers models."""
