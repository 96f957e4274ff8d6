from .generate import (Rollout, SamplingParams, concat_rollouts, generate_completions,
                       select_rollout)

__all__ = ["Rollout", "SamplingParams", "concat_rollouts", "generate_completions",
           "select_rollout"]
