"""One frozen model loaded once, many choices of trained layers (the contribution sweep, the probe).

`load_frozen` loads the model with every block frozen in the frozen dtype (NF4 quantises all of
them). `attach(base, layer)` turns it into the `Policy` that `load_policy(layer=...)` would have
built: the trained blocks get fp32 master weights read from the checkpoint files (for NF4 their
4-bit linears are first swapped for plain ones), and on exit the frozen modules and parameters are
put back. So run after run starts from the base model's own weights without reloading it.

    base = load_frozen("demo", frozen_dtype=None, device=None, attn="sdpa")
    with attach(base, 3) as policy:    # same layer state as load_policy("demo", layer=3)
        ...train...
    # block 3 holds its original weights again
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..errors import UserError
from .arch import attention_for, check_prefix_sharing, model_class, split_scalings
from .layer import TrainableLayer, _set_parameter
from .load import (DEMO_MODEL, Policy, _check_layout, _load_frozen, compute_dtype_for, default_device,
                   full_parameter, resolve_layers, resolve_model_path, trained_tensors)
from .split import SplitModel


@dataclass
class FrozenModel:
    """The model with no trained block: every block in `frozen_dtype`, frozen, eval mode."""
    lm: nn.Module
    config: object
    tokenizer: object
    model_path: Path
    model_name: str
    device: torch.device
    compute_dtype: torch.dtype
    frozen_dtype: str

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def split(self) -> SplitModel:
        """A split with nothing trained (layer 0 nominally): the block runner and its helpers."""
        embed_scale, logits = split_scalings(self.config)
        return SplitModel(self.lm, [0], embed_scale=embed_scale, logits=logits)

    def policy(self) -> Policy:
        """The base model as a Policy whose `layer` is None: enough for sampling and scoring."""
        return Policy(self.split(), None, self.tokenizer, self.model_path, self.model_name, self.device,
                      self.compute_dtype, self.frozen_dtype, [])


def load_frozen(model: str = DEMO_MODEL, *, frozen_dtype: str | None = None,
                device: str | torch.device | None = None, attn: str = "sdpa") -> FrozenModel:
    """Load `model` with every block frozen (defaults as `load_policy`: NF4 on GPU, fp32 on CPU)."""
    from transformers import AutoConfig, AutoTokenizer

    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    frozen_dtype = frozen_dtype or ("nf4" if device.type == "cuda" else "fp32")
    path = resolve_model_path(model)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise UserError(f"{model}: cannot read the model config: {str(exc).splitlines()[0]}")
    if not getattr(config, "num_hidden_layers", None):
        raise UserError(f"{model}: not a decoder-only model with blocks at model.layers")
    cls = model_class(config)
    dtype = compute_dtype_for(frozen_dtype, device)
    lm = _load_frozen(cls, path, [], frozen_dtype, dtype, attention_for(attn, cls, config, device), device)
    _check_layout(lm, config.model_type)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return FrozenModel(lm, config, tokenizer, path, model, device, dtype, frozen_dtype)


@contextmanager
def attach(base: FrozenModel, layer: int | str, *, keep_reference: bool = False) -> Iterator[Policy]:
    """The Policy training `layer` (an index, a list, 'mid-k', 'all') on the shared model; the
    base model is restored on exit, whatever happened inside."""
    indices = resolve_layers(layer, base.num_layers)
    full = full_parameter(layer)
    if full and base.frozen_dtype == "nf4":
        raise UserError("--layer all trains every weight, which NF4 cannot hold: use --frozen-dtype "
                        "bf16 or fp32")
    swapped = _unquantize(base, indices) if base.frozen_dtype == "nf4" else []
    before = dict(base.lm.named_parameters(remove_duplicate=False))
    try:
        embed_scale, logits = split_scalings(base.config)
        split = SplitModel(base.lm, indices, full=full, embed_scale=embed_scale, logits=logits)
        master = trained_tensors(split, base.model_path, base.config.model_type)
        trainable = TrainableLayer(base.lm, master, base.compute_dtype, layer_indices=indices,
                                   full=full, keep_reference=keep_reference)
        del master
        split.shares_prefixes = check_prefix_sharing(split, base.compute_dtype)
        yield Policy(split, trainable, base.tokenizer, base.model_path, base.model_name, base.device,
                     base.compute_dtype, base.frozen_dtype, indices)
    finally:
        for name, p in before.items():
            _set_parameter(base.lm, name, p)
        for parent, name, module in reversed(swapped):
            setattr(parent, name, module)


def _unquantize(base: FrozenModel, indices: list[int]) -> list[tuple[nn.Module, str, nn.Module]]:
    """Swap the 4-bit linears of blocks `indices` for plain linears in the compute dtype (their
    weights come from the checkpoint files next, as the master's compute copy); returns what was
    swapped out, as (parent, attribute, module), for putting back."""
    import bitsandbytes as bnb

    swapped = []
    for i in indices:
        for parent in list(base.lm.model.layers[i].modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, bnb.nn.Linear4bit):
                    plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                      device=base.device, dtype=base.compute_dtype).requires_grad_(False)
                    setattr(parent, name, plain)
                    swapped.append((parent, name, child))
    return swapped
