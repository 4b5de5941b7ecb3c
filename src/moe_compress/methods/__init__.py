"""Compression methods (`base`: the interface and the registry; `pruning/`, `merging/`, `hybrid/`: one module
per method).

Importing this package (which Python does before any of its modules) imports every module of `pruning/`,
`merging/` and `hybrid/`, so the registry lookups of `methods.base` (`get_method`, `method_class`,
`all_methods`) always see every method, and adding a method is adding its one file. Registration is no import
cycle: the method modules import `methods.base`, which imports none of them (tests/test_layering.py checks the
static graph and that every registered method is found at runtime).
"""

import importlib
import pkgutil

for _sub in ("pruning", "merging", "hybrid"):
    _pkg = importlib.import_module(f"{__name__}.{_sub}")
    for _info in sorted(pkgutil.iter_modules(_pkg.__path__), key=lambda m: m.name):
        importlib.import_module(f"{_pkg.__name__}.{_info.name}")
