"""Serving: many LoRA adapters on one base model behind an OpenAI-compatible API on Ray Serve."""
