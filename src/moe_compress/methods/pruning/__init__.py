"""Pruning methods: one module per method; each registers its methods on import (`methods.base` imports
every module of this package)."""
