"""Triton kernels: fused group-relative advantages, the fused linear clipped policy loss, the
small-batch NF4 matmul and the decoder's fused element-wise ops.

The sources live in the repository's top-level kernels/ folder (no __init__.py there, so it is
never a top-level `kernels` package: transformers and bitsandbytes probe for the PyPI package
of that name); this package links them in as onelayer.kernels. Torch references: onelayer.algos,
onelayer.nf4, onelayer.rollout.fusion.
"""
from onelayer.kernels.advantages import gigpo_advantages, group_advantages
from onelayer.kernels.decode_ops import rms_norm_triton, rotary_triton, silu_mul_triton
from onelayer.kernels.nf4_matmul import nf4_matmul_triton
from onelayer.kernels.policy_loss import fused_linear_logprobs, fused_linear_policy_loss

__all__ = ["fused_linear_logprobs", "fused_linear_policy_loss", "gigpo_advantages", "group_advantages",
           "nf4_matmul_triton", "rms_norm_triton", "rotary_triton", "silu_mul_triton"]
