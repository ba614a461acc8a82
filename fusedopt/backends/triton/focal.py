"""Triton focal kernels (contracts: docs/architecture.md)."""

__all__: list[str] = []

# ops implemented by this module
OPS: frozenset[str] = frozenset()
