"""Sampling completions from the current policy: onelayer's own decode loop over the HF model.

What is sampled is what the loss's log-probs describe. Each token is drawn from
softmax(logits / T), restricted to the top-k and then the top-p (nucleus) tokens when the user
asks for them, and from nothing else: no Hugging Face logits processor runs, so a checkpoint's
generation_config.json (repetition_penalty, no_repeat_ngram_size, min_p, suppress_tokens, ...)
cannot change the distribution. Only its EOS ids are read, as stop tokens.

The loss takes log-probs of the unfiltered softmax(logits / T). With top-k or top-p on, tokens
come from the renormalised filtered distribution, and the importance ratio treats them as drawn
from the full one; old log-probs are recomputed from h_L, so the ratio is still exactly 1 at the
first update. With top_p = 1 and top_k = 0, `Rollout.logprobs` (the sampler's own) equal the
engine's old log-probs up to float rounding; each training step reports how far apart they
are (`sampler_logprob_gap`, `sampler_kl`: onelayer.update).

Positions follow the engine (`SplitModel.context`): a token's position is the number of real
tokens before it, so left padding shifts nothing.

Two decoders compute this, token for token the same: the static-shape decoder of decoder.py
(preallocated cache, device-side sampling and stops, the decode step a CUDA graph on CUDA; the
same code eager on CPU), used wherever it is exact, and the dynamic-cache loop below
(`sample_dynamic`: Hugging Face DynamicCache, a host sync per token), kept for what the static
one cannot run (flash-attention-2, attention types other than full and sliding; `decoder.
unsupported` says why, logged once per model class) and as its reference in the tests. On CUDA
with NF4 frozen blocks, both run inside `nf4_kernels`: the small-batch NF4 matmuls replace
bitsandbytes' for the decode steps.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass

import jinja2
import torch
from torch import Tensor
from transformers import DynamicCache

from . import decoder
from .decoder import Samples, _cache_kwarg, pick_tokens, restrict  # noqa: F401  (re-exported)

log = logging.getLogger("onelayer")


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0            # 0: off
    greedy: bool = False
    stop: tuple[str, ...] = ()  # a completion ends once its text contains one of these


@dataclass
class Rollout:
    """A batch of prompt + completion sequences, prompts left-padded, completions right-padded.

    sequences / attention_mask: [B, P + C]; completion_mask: [B, C], 1 on every generated token
    up to and including its stop (a stop token, or the token that completed a stop string).
    Row b's completion starts at column `prompt_len`. texts: the completions decoded, each
    ending at its stop string. logprobs [B, C] (0 off the mask): each token's log-prob under the
    distribution it was drawn from (multi-turn: of every action token, None when the actor gave
    ids alone). truncated [B]: no stop within max_new_tokens (None for multi-turn episodes,
    whose actions end at a budget of their own).
    """
    sequences: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    prompt_len: int
    texts: list[str]
    logprobs: Tensor | None = None
    truncated: Tensor | None = None

    @property
    def completion_ids(self) -> Tensor:
        return self.sequences[:, self.prompt_len:]


def encode_prompts(tokenizer, prompts: list[str], device) -> tuple[Tensor, Tensor]:
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc.input_ids.to(device), enc.attention_mask.to(device)


# ---------------------------------------------------------------------------------------------
# Stopping
# ---------------------------------------------------------------------------------------------

_SENTINEL = "<<onelayer-end-of-turn-probe>>"


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template closes an assistant turn with (<|im_end|>,
    <|eot_id|>, <end_of_turn>), or None without a template. Base models that ship a template
    have an EOS of their own (<|endoftext|>), which a templated reply never reaches."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except jinja2.TemplateError:  # a template that cannot render a plain exchange
        return None
    if _SENTINEL not in text:
        return None
    after = text[text.index(_SENTINEL) + len(_SENTINEL):].lstrip()
    ids = tokenizer(after, add_special_tokens=False).input_ids
    if not ids:
        return None
    special = (ids[0] in tokenizer.all_special_ids
               or tokenizer.convert_ids_to_tokens(ids[0]) in tokenizer.get_added_vocab())
    return ids[0] if special else None


def stop_token_ids(tokenizer, lm) -> list[int]:
    """The EOS ids of the model's generation config and tokenizer, and the end-of-turn token."""
    ids = lm.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    for extra in (tokenizer.eos_token_id, end_of_turn_id(tokenizer)):
        if extra is not None and extra not in ids:
            ids.append(extra)
    return ids


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """`text` up to and including the stop string that ends first (all of it if none does)."""
    ends = [text.find(s) + len(s) for s in stops if s in text]
    return text[:min(ends)] if ends else text


class StopStrings:
    """Which rows' text holds a stop string, from the decoded tail of each row. Called after
    every token, its first hit for a row is at the token that completed the stop.

    A stop string of n UTF-8 bytes lies within the last n tokens when every token decodes to
    at least one byte, so decoding the last n + 1 tokens finds it (the extra token keeps a
    tokenizer's dropped leading space, at the start of a decode, away from the stop). A tail
    that decodes to fewer bytes than it has tokens holds ids that decode to nothing (outside
    the tokenizer's vocabulary); such a row is decoded whole.
    """

    def __init__(self, tokenizer, strings: tuple[str, ...]):
        self.tokenizer, self.strings = tokenizer, strings
        self.window = max((len(s.encode()) for s in strings), default=0) + 1

    def __call__(self, tokens: Tensor, live: Tensor) -> Tensor:
        """tokens [B, t] so far, live [B] bool -> [B] bool (only live rows are decoded)."""
        hit = torch.zeros_like(live)
        if not self.strings:
            return hit
        rows = live.nonzero().squeeze(1).tolist()              # host sync, once per token
        tails = tokens[rows, -self.window:].tolist()
        texts = self.tokenizer.batch_decode(tails)
        if tokens.shape[1] > self.window:
            short = [i for i, text in enumerate(texts) if len(text.encode()) < self.window]
            whole = self.tokenizer.batch_decode(tokens[[rows[i] for i in short]].tolist())
            for i, text in zip(short, whole):
                texts[i] = text
        for row, text in zip(rows, texts):
            hit[row] = any(s in text for s in self.strings)
        return hit


# ---------------------------------------------------------------------------------------------
# The dynamic-cache loop (the fallback, and the reference in the tests)
# ---------------------------------------------------------------------------------------------

def prefill(lm, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, DynamicCache]:
    """The prompts [B, P] through the model: (logits of their last position [B, V], KV cache)."""
    cache = DynamicCache(config=lm.config)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
             use_cache=True, logits_to_keep=1, **{_cache_kwarg(type(lm)): cache})
    return out.logits[:, -1], cache


def decode_step(lm, tokens: Tensor, cache: DynamicCache, attention_mask: Tensor,
                positions: Tensor) -> Tensor:
    """One new token per row (tokens [B] at positions [B]; attention_mask [B, S + 1] covers the
    cache and the new column) -> the next logits [B, V]."""
    out = lm(input_ids=tokens[:, None], attention_mask=attention_mask,
             position_ids=positions[:, None], use_cache=True, logits_to_keep=1,
             **{_cache_kwarg(type(lm)): cache})
    return out.logits[:, -1]


@torch.no_grad()
def sample_dynamic(lm, input_ids: Tensor, attention_mask: Tensor, params: SamplingParams, *,
                   stop_ids: list[int], stop_strings: StopStrings, pad_id: int,
                   generator: torch.Generator | None = None) -> Samples:
    """`sample` over a DynamicCache, one forward and a host sync per token."""
    B, P = input_ids.shape
    N, device = params.max_new_tokens, input_ids.device
    tokens = torch.full((B, N), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((B, N), dtype=torch.float32, device=device)
    mask = torch.zeros((B, N), dtype=torch.long, device=device)
    context = torch.ones((B, P + N), dtype=attention_mask.dtype, device=device)
    context[:, :P] = attention_mask
    positions = attention_mask.long().sum(-1)                      # [B] of the next token
    stops = torch.tensor(stop_ids, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)

    logits, cache = prefill(lm, input_ids, attention_mask)
    for t in range(N):
        token, logprob = pick_tokens(logits, params, generator)
        live = ~done
        tokens[:, t] = torch.where(live, token, pad_id)
        logprobs[:, t] = torch.where(live, logprob, 0.0)
        mask[:, t] = live
        done = done | (live & torch.isin(token, stops))
        done = done | stop_strings(tokens[:, :t + 1], live & ~done)
        if t == N - 1 or bool(done.all()):                         # host sync
            break
        logits = decode_step(lm, tokens[:, t], cache, context[:, :P + t + 1], positions + t)
    steps = t + 1
    return Samples(tokens[:, :steps], logprobs[:, :steps], mask[:, :steps], ~done)


@functools.cache
def _log_dynamic(model_type: str, why: str) -> None:
    log.info("%s: sampling with the dynamic-cache loop: %s", model_type, why)


def rollout_kernels(lm):
    """`nf4_kernels(lm)` where the model is on CUDA with NF4 (bitsandbytes Linear4bit) frozen
    blocks; nothing elsewhere."""
    if next(lm.parameters()).device.type != "cuda":
        return contextlib.nullcontext()
    if not any(type(m).__name__ == "Linear4bit" for m in lm.modules()):
        return contextlib.nullcontext()
    from ..nf4_dispatch import nf4_kernels
    return nf4_kernels(lm)


@torch.no_grad()
def sample(lm, input_ids: Tensor, attention_mask: Tensor, params: SamplingParams, *,
           stop_ids: list[int], stop_strings: StopStrings, pad_id: int,
           generator: torch.Generator | None = None, group: int = 1) -> Samples:
    """Complete B left-padded prompts [B, P]; each row stops at its first stop token or string.

    generator: the random stream (None: torch's global one). group: the rows come in runs of
    `group` copies of one prompt, whose prefill the static decoder runs once. The static decoder
    where it is exact (`decoder.unsupported`), else the dynamic-cache loop; both stop once every
    row has."""
    why = decoder.unsupported(lm)
    kwargs = dict(stop_ids=stop_ids, stop_strings=stop_strings, pad_id=pad_id, generator=generator)
    with rollout_kernels(lm):
        if why is None:
            return decoder.decode(lm, input_ids, attention_mask, params, group=group, **kwargs)
        _log_dynamic(lm.config.model_type, why)
        return sample_dynamic(lm, input_ids, attention_mask, params, **kwargs)


@torch.no_grad()
def generate_completions(lm, tokenizer, prompts: list[str], params: SamplingParams, *,
                         repeat: int = 1, generator: torch.Generator | None = None) -> Rollout:
    """Each prompt repeated `repeat` times (consecutively: one group per prompt)."""
    device = next(lm.parameters()).device
    input_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
    input_ids = input_ids.repeat_interleave(repeat, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(repeat, dim=0)
    out = sample(lm, input_ids, prompt_mask, params, stop_ids=stop_token_ids(tokenizer, lm),
                 stop_strings=StopStrings(tokenizer, params.stop), pad_id=tokenizer.pad_token_id,
                 generator=generator, group=repeat)
    kept = [row[:n] for row, n in zip(out.tokens.tolist(), out.mask.sum(1).tolist())]
    texts = [cut_at_stop(text, params.stop)
             for text in tokenizer.batch_decode(kept, skip_special_tokens=True)]
    return Rollout(torch.cat([input_ids, out.tokens], 1), torch.cat([prompt_mask, out.mask], 1),
                   out.mask, input_ids.shape[1], texts, out.logprobs, out.truncated)


def select_rollout(rollout: Rollout, rows: Tensor) -> Rollout:
    """The rows `rows` of a rollout (widths unchanged)."""
    keep = rows.tolist()
    pick = lambda t: None if t is None else t[rows]  # noqa: E731
    return Rollout(rollout.sequences[rows], rollout.attention_mask[rows],
                   rollout.completion_mask[rows], rollout.prompt_len,
                   [rollout.texts[i] for i in keep], pick(rollout.logprobs),
                   pick(rollout.truncated))


def concat_rollouts(rollouts: list[Rollout], pad_id: int) -> Rollout:
    """Rows of several rollouts in one: prompts re-padded on the left, completions on the right."""
    P = max(r.prompt_len for r in rollouts)
    C = max(r.completion_mask.shape[1] for r in rollouts)

    def pad(t: Tensor, left: int, right: int, value) -> Tensor:
        return torch.nn.functional.pad(t, (left, right), value=value)

    sequences, attention, completion, logprobs, texts = [], [], [], [], []
    for r in rollouts:
        left, right = P - r.prompt_len, C - r.completion_mask.shape[1]
        sequences.append(pad(pad(r.sequences, 0, right, pad_id), left, 0, pad_id))
        attention.append(pad(r.attention_mask, left, right, 0))
        completion.append(pad(r.completion_mask, 0, right, 0))
        if r.logprobs is not None:
            logprobs.append(pad(r.logprobs, 0, right, 0.0))
        texts += r.texts
    whole = len(logprobs) == len(rollouts) and all(r.truncated is not None for r in rollouts)
    return Rollout(torch.cat(sequences), torch.cat(attention), torch.cat(completion), P, texts,
                   torch.cat(logprobs) if whole else None,
                   torch.cat([r.truncated for r in rollouts]) if whole else None)
