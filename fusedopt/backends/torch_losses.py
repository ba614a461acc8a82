"""Pure-PyTorch loss entry points of the `torch` backend (contracts: docs/architecture.md)."""

__all__: list[str] = []
