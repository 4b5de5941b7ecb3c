"""moe-compress: prune and merge the experts of MoE language models."""
__version__ = "0.1.0"
