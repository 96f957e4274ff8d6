"""The state of the one trained layer: fp32 master weights, the compute copy, the reference."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class TrainableLayer:
    """fp32 master weights of block L (the only tensors with requires_grad anywhere) and AdamW
    state for them alone.

    The block module itself holds the compute copy in the model's dtype, used for generation
    and the no-grad log-prob passes; it is refreshed after every optimizer step. When the
    compute dtype is fp32 the module's parameters *are* the master weights (no copy).
    Training forwards pass ``policy_params()`` (master cast to the compute dtype, so that the
    gradient lands on the fp32 master). The reference policy is the original weights of the
    same block (kept only when a KL term needs it): one extra layer, never a second model.
    """

    def __init__(self, block: nn.Module, master: dict[str, Tensor], compute_dtype: torch.dtype,
                 *, keep_reference: bool):
        self.block = block
        self.compute_dtype = compute_dtype
        device = next(block.parameters()).device
        self.master = {name: nn.Parameter(t.to(device=device, dtype=torch.float32).clone())
                       for name, t in master.items()}
        missing = set(dict(block.named_parameters())) - set(self.master)
        if missing:
            raise ValueError(f"checkpoint lacks weights of the trained layer: {sorted(missing)}")
        self.reference = ({n: p.detach().to(compute_dtype).clone() for n, p in self.master.items()}
                          if keep_reference else None)
        self.shares_storage = compute_dtype == torch.float32
        for name, p in self.master.items():
            compute = p if self.shares_storage else nn.Parameter(p.detach().to(compute_dtype),
                                                                 requires_grad=False)
            _set_parameter(block, name, compute)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.master.values())

    def policy_params(self) -> dict[str, Tensor]:
        """Differentiable compute-dtype view of the master weights."""
        return {n: p.to(self.compute_dtype) for n, p in self.master.items()}

    @torch.no_grad()
    def refresh_compute_copy(self) -> None:
        if self.shares_storage:
            return
        own = dict(self.block.named_parameters())
        for name, p in self.master.items():
            own[name].copy_(p)

    def state_dict(self) -> dict[str, Tensor]:
        return {n: p.detach().cpu() for n, p in self.master.items()}


def _set_parameter(module: nn.Module, dotted: str, value: nn.Parameter) -> None:
    *path, leaf = dotted.split(".")
    for part in path:
        module = getattr(module, part)
    setattr(module, leaf, value)
