"""Triton kernels of onelayer, importable only as ``onelayer.kernels``."""
if __name__ != "onelayer.kernels":
    # Imported as a top-level `kernels` (repo root on sys.path): behave as if absent, so the
    # probes of transformers/bitsandbytes for the PyPI `kernels` package see nothing.
    raise ImportError("kernels/ is onelayer.kernels; there is no top-level `kernels` module here")

from onelayer.kernels.group_advantages import gigpo_advantages, group_advantages
from onelayer.kernels.policy_loss import fused_linear_logprobs, fused_linear_policy_loss

__all__ = ["fused_linear_logprobs", "fused_linear_policy_loss", "gigpo_advantages", "group_advantages"]
