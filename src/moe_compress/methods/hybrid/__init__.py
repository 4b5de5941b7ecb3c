"""Hybrid methods (selection plus re-fitting of what is kept): the method modules register themselves on import
(`moe_compress.methods` imports them)."""
