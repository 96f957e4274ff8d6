from .decoder import release as release_decoder
from .generate import (Rollout, SamplingParams, concat_rollouts, generate_completions,
                       select_rollout)

__all__ = ["Rollout", "SamplingParams", "concat_rollouts", "generate_completions",
           "release_decoder", "select_rollout"]
