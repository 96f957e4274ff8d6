"""The prefix / layer / suffix split of a decoder-only causal LM at the trained layer L.

    tokens -> embed -> [prefix 0..L-1] -> h_L -> [layer L] -> [suffix L+1..N-1] -> norm -> hidden
                       frozen, run once    cached  trainable   frozen
                                                   (both recomputed in backward: `recomputed`)

Several trained layers split at the first of them (the frozen blocks between them are part of
the "suffix": checkpointed, gradients to activations only); `--layer all` has no prefix and
trains every weight. Nothing before L is trained, so h_L is fixed for a rollout batch: it is computed once under
inference mode and reused by the old-log-prob pass, the reference pass and every PPO epoch.
The blocks are the model's own Hugging Face modules, called one by one with the masks and
rotary embeddings that the model's forward would have built. What some families do outside
their blocks (an embedding multiplier, logit scaling, final logit soft-capping) is applied
here and in the loss (`LogitTransform`); `onelayer.model.arch` chooses it and proves at load
that the split reproduces the model's own forward.
"""
from __future__ import annotations

import inspect
from typing import Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

MASK_BUILDERS = {"full_attention": create_causal_mask,
                 "sliding_attention": create_sliding_window_causal_mask}


class LogitTransform(NamedTuple):
    """What the model does to lm_head's output before the softmax: z = softcap(scale * z),
    softcap(z) = cap * tanh(z / cap) (no cap when None); the sampling temperature comes after."""
    scale: float = 1.0
    softcap: float | None = None


class Context(NamedTuple):
    """What every block needs besides its input, for one batch of padded sequences."""
    masks: dict            # attention type -> mask in the layout of the attention implementation
    position_ids: Tensor   # [B, S] (left padding shifts positions; pads get 0)
    rotary: dict           # attention type -> (cos, sin), each [B, S, head_dim]


def positions(attention_mask: Tensor) -> Tensor:
    """Position ids [B, S] of a left-padded batch, as Hugging Face `generate` (the sampler)
    computes them: the first real token of every row is at 0, pads at 0. The model's plain
    forward without position_ids would number pads too (0..S-1), which shifts a padded row's
    positions by its pad count; rotary attention depends only on position differences, so
    both give the same log-probs up to rounding, and the sampler's numbering is the one the
    trained log-probs must match."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def layer_types(config) -> list[str]:
    """Attention type of each block, as the model's own forward chooses it."""
    if getattr(config, "layer_types", None):
        return list(config.layer_types)
    kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    return [kind] * config.num_hidden_layers


class SplitModel:
    """A causal LM split before its first trained block; the blocks stay the model's own modules.

    `layer_indices` (sorted) are the trained blocks, `layer_index` the first of them: the prefix
    ends there. Between and after trained blocks the frozen ones pass gradients to activations
    only. With ``full=True`` (full-parameter training) every weight is trained: the prefix is
    empty (its "cache" is the token ids), and the embedding, the final norm and lm_head take
    their weights from ``params`` too.

    Trained weights are passed in explicitly (``params``, keyed by full checkpoint names,
    ``model.layers.<i>.<name>``) when gradients must reach the fp32 master weights, or when the
    reference weights are wanted; with ``params=None`` the modules' own (compute copy) weights
    are used.
    """

    def __init__(self, causal_lm: nn.Module, layer_indices: int | Sequence[int], *,
                 full: bool = False, embed_scale: float = 1.0,
                 logits: LogitTransform = LogitTransform()):
        base = causal_lm.model
        self.lm = causal_lm
        self.config = causal_lm.config
        indices = [layer_indices] if isinstance(layer_indices, int) else sorted(layer_indices)
        self.layer_indices = list(range(len(base.layers))) if full else indices
        self.layer_index = self.layer_indices[0]
        self.trained = frozenset(self.layer_indices)
        self.full = full
        self.embed = base.embed_tokens
        self.blocks = base.layers
        self.norm = base.norm
        self.rotary_emb = base.rotary_emb
        self.lm_head = causal_lm.lm_head
        self.types = layer_types(self.config)
        self.embed_scale = embed_scale   # Granite multiplies the embeddings in its model forward
        self.logits = logits             # applied by the loss, after lm_head
        # Gemma3 and Olmo3 keep one rotary table per attention type (local and global bases).
        self.rotary_per_type = "layer_type" in inspect.signature(self.rotary_emb.forward).parameters
        # Full checkpoint names of lm_head's tensors (a tied head is the embedding's matrix).
        first_name = {}
        for name, p in causal_lm.named_parameters():
            first_name.setdefault(id(p), name)
        self.head_names = {attr: first_name.get(id(t), f"lm_head.{attr}")
                           for attr in ("weight", "bias") if (t := getattr(self.lm_head, attr, None)) is not None}
        # A block hands its rotated keys and values to its cache argument (named `cache` from
        # transformers 5.24 on, `past_key_values` before): `from_layer_shared` passes its own.
        block_args = inspect.signature(self.blocks[0].forward).parameters
        self.cache_arg = "cache" if "cache" in block_args else "past_key_values"
        # Whether `from_layer_shared` reproduces `from_layer` (proved at load by
        # `arch.check_prefix_sharing`; off until then).
        self.shares_prefixes = False

    @property
    def layer(self) -> nn.Module:
        """The first trained block."""
        return self.blocks[self.layer_index]

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def context(self, attention_mask: Tensor, dtype: torch.dtype) -> Context:
        """Masks, positions and rotary embeddings for a [B, S] padding mask (1 = real token)."""
        position_ids = positions(attention_mask)
        probe = torch.empty(*attention_mask.shape, 1, dtype=dtype, device=attention_mask.device)
        # The 4th argument is the KV cache (its keyword name changed across transformers 5.x).
        masks = {kind: MASK_BUILDERS[kind](self.config, probe, attention_mask, None,
                                           position_ids=position_ids)
                 for kind in set(self.types)}
        if self.rotary_per_type:
            rotary = {kind: self.rotary_emb(probe, position_ids, kind) for kind in set(self.types)}
        else:
            rotary = dict.fromkeys(set(self.types), self.rotary_emb(probe, position_ids))
        return Context(masks, position_ids, rotary)

    def _block(self, i: int, h: Tensor, ctx: Context, params: Mapping[str, Tensor] | None = None,
               keys: _PrefixKeys | None = None):
        kind = self.types[i]
        kwargs = dict(attention_mask=ctx.masks[kind], position_ids=ctx.position_ids,
                      position_embeddings=ctx.rotary[kind])
        if keys is not None:
            kwargs[self.cache_arg] = keys
        if params is None:
            return self.blocks[i](h, **kwargs)
        return functional_call(self.blocks[i], dict(params), (h,), kwargs, strict=False)

    def _embed(self, input_ids: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        h = self.embed(input_ids) if params is None else functional_call(self.embed, dict(params), (input_ids,))
        return h * self.embed_scale if self.embed_scale != 1.0 else h

    def prefix(self, input_ids: Tensor, ctx: Context) -> Tensor:
        """h_L: the input of the first trained layer L. Runs under inference mode: nothing is
        kept for backward. Full-parameter training has no prefix: the token ids are returned."""
        if self.full:
            return input_ids
        with torch.inference_mode():
            h = self._embed(input_ids)
            for i in range(self.layer_index):
                h = self._block(i, h, ctx)
        # Inference tensors cannot be saved for a later backward; one copy makes h_L an ordinary
        # tensor that layer L may save ([B, S, H] in the compute dtype: 64 MiB at 8 x 1024 x 4096).
        return h.clone()

    def recomputed(self, i: int) -> bool:
        """Whether block i is recomputed in backward rather than keeping its activations: every
        frozen block, and a trained one unless it is the last block, whose activations nothing
        else's backward would run beside (full-parameter training recomputes every block). A
        trained block so recomputed costs one more block forward, and its activations exist
        only during its own backward instead of through the backward of every block after it."""
        return self.full or i not in self.trained or i < self.num_layers - 1

    def from_layer(self, h: Tensor, ctx: Context, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """The trained layers (with `params` if given) and the frozen blocks between and after
        them from the cached h_L (token ids [B, S] when full); returns the final normed hidden
        states [B, S, H]. With grad enabled the blocks `recomputed` names are recomputed in
        backward (activation checkpointing per block); frozen blocks produce input gradients
        only."""
        own = _by_owner(params)
        if self.full:
            h = self._embed(h, own.get("embed"))
        checkpointed = torch.is_grad_enabled()
        for i in range(self.layer_index, self.num_layers):
            if checkpointed and self.recomputed(i):
                h = checkpoint(self._block, i, h, ctx, own.get(i), use_reentrant=False)
            else:
                h = self._block(i, h, ctx, own.get(i))
        norm = own.get("norm")
        return self.norm(h) if norm is None else functional_call(self.norm, norm, (h,))

    def prefix_shared(self, prefix_ids: Tensor, rest_ids: Tensor, rest_mask: Tensor,
                      dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """`prefix` of rows that all begin with the same s tokens (`common_prefix`): h_L of the
        common tokens prefix_ids [1, s] and of each row's own, rest_ids [B, R] (right-padded,
        rest_mask [B, R]), the common ones run once (see `from_layer_shared`)."""
        with torch.inference_mode():
            h_prefix, h_rest = self._embed(prefix_ids), self._embed(rest_ids)
            h_prefix, h_rest = self._shared_blocks(range(self.layer_index), h_prefix, h_rest, rest_mask,
                                                   dtype, {})
        return h_prefix.clone(), h_rest.clone()   # ordinary tensors, as `prefix` returns

    def from_layer_shared(self, h_prefix: Tensor, h_rest: Tensor, rest_mask: Tensor,
                          params: Mapping[str, Tensor] | None = None) -> Tensor:
        """`from_layer` of rows that all begin with the same s tokens (`common_prefix`): h_prefix
        [1, s, H] runs once; each block's keys and values of it are put before those of every
        row's own tokens h_rest [B, R, H] (right-padded, rest_mask [B, R]). Returns the final
        normed hidden states of the rest [B, R, H]. The prefix's blocks keep their activations
        (one short row); the rest's blocks are recomputed in backward as in `from_layer`."""
        own = _by_owner(params)
        _, h_rest = self._shared_blocks(range(self.layer_index, self.num_layers), h_prefix, h_rest, rest_mask,
                                        h_rest.dtype, own)
        norm = own.get("norm")
        return self.norm(h_rest) if norm is None else functional_call(self.norm, norm, (h_rest,))

    def _shared_blocks(self, blocks: range, h_prefix: Tensor, h_rest: Tensor, rest_mask: Tensor,
                       dtype: torch.dtype, own: dict) -> tuple[Tensor, Tensor]:
        s = h_prefix.shape[1]
        prefix_ctx = self.context(torch.ones(1, s, dtype=rest_mask.dtype, device=rest_mask.device), dtype)
        rest_ctx = self._rest_context(s, rest_mask, dtype)
        checkpointed = torch.is_grad_enabled()
        for i in blocks:
            record = _PrefixKeys()
            h_prefix = self._block(i, h_prefix, prefix_ctx, own.get(i), record)
            keys = _PrefixKeys(record.recorded)
            if checkpointed and self.recomputed(i):
                h_rest = checkpoint(self._block, i, h_rest, rest_ctx, own.get(i), keys, use_reentrant=False)
            else:
                h_rest = self._block(i, h_rest, rest_ctx, own.get(i), keys)
        return h_prefix, h_rest

    def _rest_context(self, s: int, rest_mask: Tensor, dtype: torch.dtype) -> Context:
        """The context of the rows' own tokens, queries at columns s.. of prefix + rest: the
        masks are the rows' whole [s + R] masks (built as for `context`, never the implicit
        causal shortcut, which would align queries with the first keys) cut to those queries."""
        rows = rest_mask.shape[0]
        whole = torch.cat([torch.ones(rows, s, dtype=rest_mask.dtype, device=rest_mask.device), rest_mask], 1)
        position_ids = positions(whole)
        probe = torch.empty(*whole.shape, 1, dtype=dtype, device=whole.device)
        masks = {}
        for kind in set(self.types):
            mask = MASK_BUILDERS[kind](self.config, probe, whole, None, position_ids=position_ids,
                                       allow_is_causal_skip=False)
            if not (isinstance(mask, Tensor) and mask.dim() == 4):
                raise NotImplementedError(f"a {type(mask).__name__} attention mask cannot be cut to the "
                                          "rows' own tokens")
            masks[kind] = mask[:, :, s:]
        rest_positions = position_ids[:, s:]
        rest_probe = probe[:, s:]
        if self.rotary_per_type:
            rotary = {kind: self.rotary_emb(rest_probe, rest_positions, kind) for kind in set(self.types)}
        else:
            rotary = dict.fromkeys(set(self.types), self.rotary_emb(rest_probe, rest_positions))
        return Context(masks, rest_positions, rotary)

    def head(self, params: Mapping[str, Tensor] | None = None) -> tuple[Tensor, Tensor | None]:
        """(weight [V, H], bias [V] or None) of lm_head: from `params` when they hold it."""
        weight, bias = self.lm_head.weight, getattr(self.lm_head, "bias", None)
        if params is not None and self.full:
            weight = params.get(self.head_names["weight"], weight)
            if bias is not None:
                bias = params.get(self.head_names["bias"], bias)
        return weight, bias


class _PrefixKeys:
    """Given to a block as its KV cache: Hugging Face attention hands each layer's rotated keys
    and values to `update` and attends to what it returns. Without a prefix it records them
    (the common prefix's pass); with one it returns the prefix's before the rows' own. Pure
    per call, so a checkpointed block recomputes the same."""

    def __init__(self, prefix: tuple[Tensor, Tensor] | None = None):
        self.prefix = prefix
        self.recorded: tuple[Tensor, Tensor] | None = None

    def update(self, key: Tensor, value: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if self.prefix is None:
            self.recorded = (key, value)
            return key, value
        k, v = self.prefix
        rows = key.shape[0]
        return (torch.cat([k.expand(rows, -1, -1, -1), key], 2),
                torch.cat([v.expand(rows, -1, -1, -1), value], 2))


def _by_owner(params: Mapping[str, Tensor] | None) -> dict:
    """Full checkpoint names -> {block index | "embed" | "norm": {name inside it: tensor}};
    lm_head's tensors are read by `SplitModel.head`."""
    groups: dict = {}
    for name, t in (params or {}).items():
        if name.startswith("model.layers."):
            index, _, inner = name[len("model.layers."):].partition(".")
            groups.setdefault(int(index), {})[inner] = t
        elif name.startswith("model.embed_tokens."):
            groups.setdefault("embed", {})[name[len("model.embed_tokens."):]] = t
        elif name.startswith("model.norm."):
            groups.setdefault("norm", {})[name[len("model.norm."):]] = t
    return groups
