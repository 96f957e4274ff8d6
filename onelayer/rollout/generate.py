"""Sampling completions from the current policy (Hugging Face generate with its KV cache).

The fast static-cache decoder will replace `generate_completions` behind the same signature.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import GenerationConfig


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0            # 0: off
    greedy: bool = False


@dataclass
class Rollout:
    """A batch of prompt + completion sequences, prompts left-padded, completions right-padded.

    sequences / attention_mask: [B, P + C]; completion_mask: [B, C], 1 on every generated token
    up to and including the first EOS. Row b's completion starts at column `prompt_len`.
    """
    sequences: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    prompt_len: int
    texts: list[str]

    @property
    def completion_ids(self) -> Tensor:
        return self.sequences[:, self.prompt_len:]


def encode_prompts(tokenizer, prompts: list[str], device) -> tuple[Tensor, Tensor]:
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def completion_mask(completions: Tensor, eos_ids: list[int]) -> Tensor:
    """1 up to and including the first EOS of each row, 0 after it (HF pads finished rows)."""
    is_eos = torch.isin(completions, torch.tensor(eos_ids, device=completions.device))
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos.long()
    return (eos_before == 0).long()


def eos_token_ids(tokenizer, lm) -> list[int]:
    ids = lm.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def generate_completions(lm, tokenizer, prompts: list[str], params: SamplingParams,
                         *, repeat: int = 1) -> Rollout:
    """Each prompt repeated `repeat` times (consecutively: one group per prompt)."""
    device = next(lm.parameters()).device
    input_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
    input_ids = input_ids.repeat_interleave(repeat, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(repeat, dim=0)
    eos = eos_token_ids(tokenizer, lm)
    # Every sampling knob is set explicitly (top_k=0 is "off"), so that a checkpoint's own
    # generation_config.json cannot change what the log-probs assume about the sampler.
    sampling = {} if params.greedy else dict(temperature=params.temperature, top_p=params.top_p,
                                              top_k=params.top_k)
    config = GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=not params.greedy,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, use_cache=True,
                              **sampling)
    sequences = lm.generate(input_ids=input_ids, attention_mask=prompt_mask,
                            generation_config=config)
    prompt_len = input_ids.shape[1]
    completions = sequences[:, prompt_len:]
    mask = completion_mask(completions, eos)
    texts = tokenizer.batch_decode(completions * mask + tokenizer.pad_token_id * (1 - mask),
                                   skip_special_tokens=True)
    return Rollout(sequences, torch.cat([prompt_mask, mask], dim=1), mask, prompt_len, texts)


def select_rollout(rollout: Rollout, rows: Tensor) -> Rollout:
    """The rows `rows` of a rollout (widths unchanged)."""
    keep = rows.tolist()
    return Rollout(rollout.sequences[rows], rollout.attention_mask[rows],
                   rollout.completion_mask[rows], rollout.prompt_len, [rollout.texts[i] for i in keep])


def concat_rollouts(rollouts: list[Rollout], pad_id: int) -> Rollout:
    """Rows of several rollouts in one: prompts re-padded on the left, completions on the right."""
    P = max(r.prompt_len for r in rollouts)
    C = max(r.completion_mask.shape[1] for r in rollouts)

    def pad(t: Tensor, left: int, right: int, value: int) -> Tensor:
        return torch.nn.functional.pad(t, (left, right), value=value)

    sequences, attention, completion, texts = [], [], [], []
    for r in rollouts:
        left, right = P - r.prompt_len, C - r.completion_mask.shape[1]
        sequences.append(pad(pad(r.sequences, 0, right, pad_id), left, 0, pad_id))
        attention.append(pad(r.attention_mask, left, right, 0))
        completion.append(pad(r.completion_mask, 0, right, 0))
        texts += r.texts
    return Rollout(torch.cat(sequences), torch.cat(attention), torch.cat(completion), P, texts)
