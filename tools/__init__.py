"""Repository tooling that is not part of the installed `moe_compress` package (run from a checkout).

`tools.testbed`: training the project's small MoE testbeds (``python -m tools.testbed --help`` from the
repository root). Tools import the package; the package never imports tools (tests/test_layering.py).
"""
