"""Merging methods and their shared pieces (grouping, merge, router, oracle, ...): every module of this package
is imported by `methods.base`, and the method modules register themselves."""
