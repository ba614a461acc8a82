"""Loss entry points of the `cpu` backend (contracts: docs/architecture.md)."""

__all__: list[str] = []

# ops implemented by this module
OPS: frozenset[str] = frozenset()
