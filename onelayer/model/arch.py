"""What the split must know of an architecture beyond its blocks, and the proof at load that it
knows enough.

The split (embed -> blocks -> norm, then lm_head inside the loss) is the model's own forward
only where that forward is exactly this. Some families do more outside their blocks; the cheap,
common cases are applied by the split and the loss:

    embedding multiplier       Granite, GraniteMoe: embeddings * embedding_multiplier
    logit scaling              Granite: logits / logits_scaling;  Cohere: logits * logit_scale
    final logit soft-capping   Gemma2, Gemma3: cap * tanh(logits / cap)

(Gemma's sqrt(hidden) embedding normaliser and Granite's residual multiplier live inside the
embedding module and the blocks: the split gets them for free.) Anything else an architecture
does is caught by `check_split`: a few tokens through the split and through the model's own
forward must give the same log-probs, or the model is refused with one line naming its
model_type. An architecture is therefore exact or refused, never trained on wrong log-probs.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from ..algos.logprobs import chunked_logprobs
from ..errors import UserError
from .split import LogitTransform, SplitModel, positions

ATTENTION = ("sdpa", "eager", "flash_attention_2")

# Both sides of the check run the same modules on the same weights and inputs, up to the final
# hidden states. After that the model rounds its logits z to its dtype (and scales or caps them
# in it), the loss keeps them in fp32: each log-prob may move by about eps |z|max (eps: the
# dtype's machine epsilon; twice that is allowed), plus a floor for the fp32 log-softmax itself.
# bf16 at |z|max = 30 (Gemma2's cap): 0.47 nats. Measured on tiny random models of the verified
# families with logits of std 8: <= 4e-6 nats in fp32, bf16 and NF4, 0.06 in bf16 with a soft-cap.
# A missed scaling costs far more on the same models: Granite's multipliers 322 nats, Cohere's
# logit scale 752, Gemma2's soft-cap 8 (0.8-2.3 even with the tiny logits of random init).
TOLERANCE_FLOOR = 1e-4


def model_class(config) -> type:
    """The transformers causal-LM class for this config."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise UserError(f"{config.model_type}: transformers has no causal LM of this architecture") from None


def attention_for(requested: str, model_cls: type, config, device: torch.device) -> str:
    """The attention implementation to load with: the requested one where the model and the
    machine support it, else the nearest one that computes the same thing."""
    if requested not in ATTENTION:
        raise UserError(f"--attn must be one of {', '.join(ATTENTION)}, not {requested!r}")
    log = logging.getLogger("onelayer")
    attn = requested
    if attn == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
            usable = device.type == "cuda" and model_cls._supports_flash_attn
        except ImportError:
            usable = False
        if not usable:
            attn = "sdpa"
            log.warning("flash-attn is not installed, not on CUDA or not supported by %s: using SDPA",
                        config.model_type)
    # SDPA has no attention-logit soft-cap (Gemma2): eager computes the model as it was trained.
    if attn == "sdpa" and (not model_cls._supports_sdpa
                           or getattr(config, "attn_logit_softcapping", None) is not None):
        attn = "eager"
        log.info("%s: SDPA cannot compute this model's attention; using eager attention", config.model_type)
    return attn


def split_scalings(config) -> tuple[float, LogitTransform]:
    """(embedding multiplier, logit transform) of the model's forward outside its blocks."""
    embed_scale = float(getattr(config, "embedding_multiplier", None) or 1.0)
    scale = 1.0
    if getattr(config, "logits_scaling", None):    # Granite divides
        scale /= float(config.logits_scaling)
    if getattr(config, "logit_scale", None):       # Cohere multiplies
        scale *= float(config.logit_scale)
    cap = getattr(config, "final_logit_softcapping", None)
    return embed_scale, LogitTransform(scale, None if cap is None else float(cap))


def check_tokens(vocab_size: int) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask) [2, 12]: random tokens, the first row left-padded by 4."""
    ids = torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    return ids, mask


def split_logprobs(split: SplitModel, ids: Tensor, mask: Tensor, compute_dtype: torch.dtype) -> Tensor:
    """log p(next token) [N] at the N real positions of a left-padded batch that have a next
    token, through prefix, layer L, suffix and the loss's lm_head (with the logit transform)."""
    ctx = split.context(mask, compute_dtype)
    final = split.from_layer(split.prefix(ids, ctx), ctx)
    predicts = mask[:, :-1].bool()
    return chunked_logprobs(final[:, :-1][predicts], split.lm_head.weight, ids[:, 1:][predicts],
                            split.lm_head.bias, logit_scale=split.logits.scale, softcap=split.logits.softcap)


def model_logits(lm, ids: Tensor, mask: Tensor) -> Tensor:
    """Next-token logits [N, V] at the same positions from the model's own forward, called as the
    sampler (HF generate) calls it: with the attention mask and the positions generate derives
    from it."""
    logits = lm(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    return logits[:, :-1][mask[:, :-1].bool()]


@torch.no_grad()
def check_split(split: SplitModel, compute_dtype: torch.dtype) -> float:
    """Refuse (UserError) a model whose split does not reproduce its own forward on the check
    tokens; returns the divergence max |log p_split - log p_model| (nats) otherwise."""
    name = split.config.model_type
    ids, mask = (t.to(split.lm_head.weight.device) for t in check_tokens(split.config.vocab_size))
    logits = _refuse_on_failure(name, "the model's own forward fails", model_logits, split.lm, ids, mask)
    ours = _refuse_on_failure(name, "its blocks cannot be run one by one", split_logprobs,
                              split, ids, mask, compute_dtype)
    theirs = torch.log_softmax(logits.float(), -1).gather(1, ids[:, 1:][mask[:, :-1].bool()][:, None])[:, 0]
    divergence = (ours - theirs).abs().max().item()
    tolerance = TOLERANCE_FLOOR + 2 * torch.finfo(logits.dtype).eps * logits.abs().max().item()
    if not divergence <= tolerance:  # NaN fails too
        raise UserError(f"{name}: this architecture is not supported: the split forward's log-probs "
                        f"differ from the model's own by {divergence:.3g} nats (tolerance {tolerance:.3g})")
    return divergence


@torch.no_grad()
def check_prefix_sharing(split: SplitModel, compute_dtype: torch.dtype) -> bool:
    """Whether rows that begin alike may run their common tokens once (`common_prefix`): on 3
    rows sharing their first 10 tokens, one left-padded, the log-probs (of random targets) at
    every later token from `prefix_shared` and `from_layer_shared` must match those of
    `prefix` and `from_layer` as `check_split` matches the model's own. Not refused when they do not: the rows then run whole, as before."""
    from . import common_prefix

    if split.full:
        return False   # no cached h_L to share from
    log = logging.getLogger("onelayer")
    device = split.lm_head.weight.device
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, split.config.vocab_size, (3, 16), generator=g)
    ids[0, 2:12] = ids[2, :10] = ids[1, :10]   # row 0's real tokens start 2 columns later
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    targets = torch.randint(0, split.config.vocab_size, (3, 16), generator=g)
    ids, mask, targets = ids.to(device), mask.to(device), targets.to(device)
    try:
        ctx = split.context(mask, compute_dtype)
        h = split.prefix(ids, ctx)
        whole = split.from_layer(h, ctx)
        shared = common_prefix.find(ids, mask, limit=10)
        h_prefix, h_rest = split.prefix_shared(*shared.gather(ids), shared.rest_mask, compute_dtype)
        rest_h = split.from_layer_shared(h_prefix, h_rest, shared.rest_mask)
    except Exception as exc:   # a family whose blocks ignore or misuse the cache argument
        log.info("%s: rows run whole (common prefixes not shared: %s: %s)", split.config.model_type,
                 type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return False
    later = (shared.real_index >= shared.length) & mask.bool()
    row, column = later.nonzero(as_tuple=True)
    ours, theirs = rest_h[row, shared.rest_column(row, column)], whole[row, column]
    weight, bias = split.lm_head.weight, split.lm_head.bias
    z = theirs @ weight.T
    options = dict(logit_scale=split.logits.scale, softcap=split.logits.softcap)
    divergence = (chunked_logprobs(ours, weight, targets[later], bias, **options)
                  - chunked_logprobs(theirs, weight, targets[later], bias, **options)).abs().max().item()
    tolerance = TOLERANCE_FLOOR + 2 * torch.finfo(z.dtype).eps * z.abs().max().item()
    if not divergence <= tolerance:
        log.info("%s: rows run whole (common prefixes not shared: log-probs differ by %.3g nats)",
                 split.config.model_type, divergence)
        return False
    return True


def _refuse_on_failure(name: str, what: str, forward, *args) -> Tensor:
    try:
        return forward(*args)
    except Exception as exc:  # whatever breaks on a 24-token batch, the model cannot be trained here
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"{name}: this architecture is not supported: {what} "
                        f"({type(exc).__name__}: {first})") from None
