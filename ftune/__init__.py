"""ftune: distributed LoRA tuning, search and serving on Ray."""

__version__ = "0.1.0"
