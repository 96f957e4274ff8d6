"""The state of the trained layers: fp32 master weights, the compute copy, the reference."""
from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import Tensor, nn


class TrainableLayer:
    """fp32 master weights of the trained blocks (one, several, or with `full` every parameter
    of the model) -- the only tensors with requires_grad anywhere -- keyed by their full
    checkpoint names (``model.layers.<i>.<name>``, and for `full` also ``model.embed_tokens.*``,
    ``model.norm.*``, ``lm_head.*``; a tied lm_head is the embedding's one matrix, named once).

    The modules themselves hold the compute copy in the model's dtype, used for generation, the
    no-grad log-prob passes and the training forwards; it is refreshed after every optimizer
    step. When the compute dtype is fp32 the modules' parameters *are* the master weights (no
    copy). Training forwards pass ``policy_params()``, whose gradients land on the fp32 masters.
    The reference policy is the original weights of the same tensors (kept only when a KL term
    needs it): one extra copy of what is trained, never a second model.
    """

    def __init__(self, model: nn.Module, master: dict[str, Tensor], compute_dtype: torch.dtype,
                 *, layer_indices: Sequence[int], full: bool = False, keep_reference: bool):
        self.model = model
        self.layer_indices = sorted(layer_indices)
        self.full = full
        self.compute_dtype = compute_dtype
        aliases: dict[int, list[str]] = {}   # one tensor -> every name it is reachable by (tying)
        for name, p in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(name)
        owned = {names[0]: names for names in aliases.values()}
        missing = set(master) - set(owned)
        if missing:
            raise ValueError(f"not parameters of the model: {sorted(missing)[:3]}")
        trained_blocks = {f"model.layers.{i}." for i in self.layer_indices}
        lacking = [n for n in owned if (full or n.startswith(tuple(trained_blocks))) and n not in master]
        if lacking:
            raise ValueError(f"checkpoint lacks weights of the trained layers: {sorted(lacking)[:3]}")
        device = next(model.parameters()).device
        self.master = {name: nn.Parameter(t.to(device=device, dtype=torch.float32).clone())
                       for name, t in master.items()}
        self.reference = ({n: p.detach().to(compute_dtype).clone() for n, p in self.master.items()}
                          if keep_reference else None)
        self.shares_storage = compute_dtype == torch.float32
        self.compute: dict[str, nn.Parameter] = {}   # the modules' own (compute copy) tensors
        for name, p in self.master.items():
            compute = p if self.shares_storage else nn.Parameter(p.detach().to(compute_dtype),
                                                                 requires_grad=False)
            for alias in owned[name]:
                _set_parameter(model, alias, compute)
            self.compute[name] = compute

    @property
    def block(self) -> nn.Module:
        """The first trained block."""
        return self.model.model.layers[self.layer_indices[0]]

    @property
    def spec(self) -> str:
        """What is trained, as checkpoints record it: "all", or the indices ("3", "3,5")."""
        return "all" if self.full else ",".join(map(str, self.layer_indices))

    @property
    def label(self) -> str:
        """For messages: "layer 3", "layers 3, 5", "all parameters"."""
        if self.full:
            return "all parameters"
        s = "s" if len(self.layer_indices) > 1 else ""
        return f"layer{s} {', '.join(map(str, self.layer_indices))}"

    def parameters(self) -> list[nn.Parameter]:
        return list(self.master.values())

    def policy_params(self) -> dict[str, Tensor]:
        """The trained tensors for a training forward, whose gradients reach the fp32 masters.

        fp32 compute: the masters themselves. Otherwise new leaves on the compute copies' storage
        (equal to the masters cast: refreshed after every step), each with a hook that adds its
        gradient, once final, to its master's in fp32 and drops it: the sums a differentiable
        cast ``master.to(bf16)`` would make, without that cast's second bf16 copy of the layer
        (0.36 GiB at Qwen3-8B) through every forward and backward. Each leaf's gradient is final
        as soon as the backward is past its first use, which data-parallel bucketing needs."""
        if self.shares_storage:
            return dict(self.master)
        leaves = {}
        for name, master in self.master.items():
            leaf = self.compute[name].detach().requires_grad_()
            leaf.register_post_accumulate_grad_hook(functools.partial(_add_grad_to, master))
            leaves[name] = leaf
        return leaves

    @torch.no_grad()
    def refresh_compute_copy(self) -> None:
        if self.shares_storage:
            return
        for name, p in self.master.items():
            self.compute[name].copy_(p)

    def state_dict(self) -> dict[str, Tensor]:
        """fp32 tensors on the CPU under their full checkpoint names."""
        return {n: p.detach().cpu() for n, p in self.master.items()}


def _add_grad_to(master: Tensor, leaf: Tensor) -> None:
    """Post-accumulate hook of a compute-dtype leaf: its gradient added to `master`'s in fp32
    (exactly what the backward of a cast would add), then freed."""
    if master.grad is None:
        master.grad = leaf.grad.to(master.dtype)
    else:
        master.grad.add_(leaf.grad)
    leaf.grad = None


def _set_parameter(module: nn.Module, dotted: str, value: nn.Parameter) -> None:
    *path, leaf = dotted.split(".")
    for part in path:
        module = getattr(module, part)
    setattr(module, leaf, value)
