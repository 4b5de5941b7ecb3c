"""Pruning methods: one module per method; each registers its methods on import (`moe_compress.methods`
imports every method module)."""
