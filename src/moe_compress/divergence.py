"""Per-token divergences between two next-token distributions.

A leaf module: `evaluation.metrics` reports KL(reference ‖ model) with it and `methods.hybrid.distill` trains
on it, so the two measure exactly the same quantity without the methods importing the evaluation package.
"""

from __future__ import annotations

import torch


def token_kl(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """[N, V] log-probabilities of the reference and of the model -> [N] KL(reference || model) in nats."""
    return (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1)
