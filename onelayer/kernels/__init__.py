"""Triton kernels: fused group-relative advantages and the fused linear clipped policy loss.

The sources live in the repository's top-level kernels/ folder (no __init__.py there, so it is
never a top-level `kernels` package: transformers and bitsandbytes probe for the PyPI package
of that name); this package links them in as onelayer.kernels. Torch references: onelayer.algos.
"""
from onelayer.kernels.advantages import gigpo_advantages, group_advantages
from onelayer.kernels.policy_loss import fused_linear_logprobs, fused_linear_policy_loss

__all__ = ["fused_linear_logprobs", "fused_linear_policy_loss", "gigpo_advantages", "group_advantages"]
