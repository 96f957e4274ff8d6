"""The attention function the static decoder swaps in for grouped-query models (sdpa only).

Why: with H_q query heads sharing H_kv key/value heads (g = H_q / H_kv query heads per group)
and a dense mask, Hugging Face's sdpa path before transformers 5.23, and in later ones too while
dynamo traces the step (the decoder's GRAPH_MODE "compile"), expands the keys and values to H_q
heads (`repeat_kv`, a real copy) before it calls torch SDPA. It passes torch's `enable_gqa`
only without a mask: torch documents GQA on CUDA for the flash kernel (which takes no mask) and
the math one (which repeats the keys itself and builds the whole score matrix). Worked out in
the decoder's module docstring: at 8 rows x 1,024 cache columns of Qwen3-8B, copying moves
~10.9 GB a step where reading the cache once moves 1.2 GB.

The fold, for one query token (the decode step): the g query heads of a group are laid out as g
query rows of one head, so a single SDPA call reads each key/value head once.

    query  [B, H_q, 1, D]    -> [B, H_kv, g, D]     head h = k * g + i -> (head k, row i), the
                                                    order `repeat_kv` pairs heads with groups
    mask   [B, 1, 1, L]         broadcasts over (H_kv, g) as it is; a per-head [B, H_q, 1, L]
                                mask is regrouped like the query
    keys   [B, H_kv, L, D]      the cache buffers themselves, not copied
    out    [B, H_kv, g, D_v] -> [B, 1, H_q, D_v]    what an attention function returns: query
                                                    positions before heads (a view: the query
                                                    axis has length 1)

Everything else goes to transformers' own `sdpa_attention_forward` unchanged: the prefill (more
than one query token: `enable_gqa` with a mask would run SDPA's math kernel on CUDA, which builds
the [B, H_q, P, P] scores, so the one copy per layer of the prompt's keys stays) and calls with
features this function does not implement (logit soft-capping, attention sinks, position bias).

Shapes only (no values) decide every branch: no host sync and no data-dependent shape, so the
step can be captured as a CUDA graph or traced by dynamo with fullgraph=True.
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

log = logging.getLogger("onelayer")

# fold (default): the decode step attends each key/value head once (above); repeat: it copies the
# keys and values to every query head first, as transformers did before 5.23. `repeat` is there to
# be timed against `fold` (benchmarks/bench_train_step.py --decode-gqa).
GQA_MODE = os.environ.get("ONELAYER_DECODE_GQA", "fold")

# Arguments the fold does not implement; a call that carries one goes to transformers' function.
_NOT_FOLDED = ("softcap", "s_aux", "position_bias")


def _unfolded(query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> bool:
    return (query.shape[2] != 1 or query.shape[1] % key.shape[1] != 0
            or any(kwargs.get(name) is not None for name in _NOT_FOLDED))


def fold_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                   scaling: float | None = None, **kwargs):
    """Attention of one query token per row against un-repeated keys and values (module
    docstring); anything else as transformers' sdpa computes it. Returns ([B, Q, H_q, D_v], None)."""
    if _unfolded(query, key, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    B, H_q, _, D = query.shape
    H_kv = key.shape[1]
    g = H_q // H_kv
    query = query.reshape(B, H_kv, g, D)
    mask = attention_mask
    if mask is not None and mask.shape[1] == H_q and g > 1:
        mask = mask.reshape(mask.shape[0], H_kv, g, mask.shape[-1])
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)   # [B, H_kv, g, D_v]
    return out.reshape(B, 1, H_q, out.shape[-1]), None


def repeat_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs):
    """The decode step as transformers < 5.23 computes it: keys and values copied to H_q heads,
    then one SDPA call; anything else as transformers' sdpa computes it."""
    if _unfolded(query, key, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    g = query.shape[1] // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, g), repeat_kv(value, g), attn_mask=attention_mask, dropout_p=dropout,
        scale=scaling)                                                          # [B, H_q, 1, D_v]
    return out.transpose(1, 2).contiguous(), None


NAMES = {"fold": "onelayer_sdpa_fold", "repeat": "onelayer_sdpa_repeat"}
for _name, _function in ((NAMES["fold"], fold_attention), (NAMES["repeat"], repeat_attention)):
    AttentionInterface.register(_name, _function)
    # Masks are built as for sdpa should a forward build one under our name (ours are prepared).
    AttentionMaskInterface.register(_name, sdpa_mask)


_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.info(message)


def decode_attention(lm) -> str | None:
    """The attention implementation the decoder runs `lm` with (its name in transformers'
    AttentionInterface), or None to keep the model's own: only sdpa models with grouped-query
    heads change, and not those whose attention needs what the fold does not implement."""
    if GQA_MODE not in NAMES:
        raise ValueError(f"ONELAYER_DECODE_GQA={GQA_MODE!r}: expected one of {sorted(NAMES)}")
    config = lm.config
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if config._attn_implementation != "sdpa" or not heads or heads == kv_heads:
        return None   # eager repeats in its own function; flash and flex never repeat
    if getattr(config, "attn_logit_softcapping", None):
        why = "attention logit soft-capping"
    elif any(getattr(m, "sinks", None) is not None for m in lm.modules()):
        why = "attention sinks"
    else:
        return NAMES[GQA_MODE]
    _log_once(f"decode: {type(lm).__name__} keeps transformers' sdpa (keys and values repeated "
              f"to every query head each step): {why}")
    return None


@contextlib.contextmanager
def attention_implementation(config, name: str | None):
    """config._attn_implementation (and its sub-configs') set to `name` inside the block and
    restored after it, on an error too; nothing when name is None. Attention modules read it
    at every forward, so the training forward outside the block never sees `name`."""
    if name is None:
        yield
        return
    subs = {key: sub for key in (getattr(config, "sub_configs", None) or {})
            if (sub := getattr(config, key, None)) is not None}
    saved, saved_subs = config._attn_implementation, {k: s._attn_implementation for k, s in subs.items()}
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = saved
        for key, sub in subs.items():
            sub._attn_implementation = saved_subs[key]
