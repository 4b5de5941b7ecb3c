"""Hybrid methods (selection plus re-fitting of what is kept): every module of this package is imported by
`methods.base`, and the method modules register themselves."""
