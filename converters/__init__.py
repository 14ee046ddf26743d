"""Offline tools: the HF -> EasyQuant converter, its CLI, and local model builders for tests/demos."""
