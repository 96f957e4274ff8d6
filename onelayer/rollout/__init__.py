from .generate import (Rollout, SamplingParams, completion_mask, concat_rollouts,
                       generate_completions, select_rollout)

__all__ = ["Rollout", "SamplingParams", "completion_mask", "concat_rollouts",
           "generate_completions", "select_rollout"]
