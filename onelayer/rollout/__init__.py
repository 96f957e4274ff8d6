from .generate import Rollout, SamplingParams, completion_mask, generate_completions

__all__ = ["Rollout", "SamplingParams", "completion_mask", "generate_completions"]
