"""Testbed training: the project's small MoE checkpoints (docs/TESTBEDS.md), trained from scratch or
sparse-upcycled, with their held-out perplexity, routing balance and expert similarity.

Research tooling, kept out of the installed package: run it from the repository root as
``python -m tools.testbed train|similarity|sample ...`` with moe_compress importable (``make install``, or
``PYTHONPATH=src``). It reads text with the package's readers (`moe_compress.calibration.data`) and scores
perplexity with the package's evaluator (`moe_compress.evaluation.metrics.evaluate_lm`).
"""
