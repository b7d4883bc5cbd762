"""Stoker: one YAML file drives terminal chat, web chat, an OpenAI-compatible API and batch prediction."""

__version__ = "0.1.0"
