"""Merging methods and their shared pieces (grouping, merge, router, oracle, ...): the method modules register
themselves on import (`moe_compress.methods` imports them)."""
