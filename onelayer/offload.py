"""`--offload-optimizer`: what only the update needs, in host memory while rollouts run.

A rollout reads the frozen blocks and the trained layer's compute copy; the trained layer's fp32
master weights (where they are not that copy), its AdamW moments and the reference layer wait
for the update. At Qwen3-8B that is 12 bytes a parameter of the layer, 2.2 GiB (2.5 with a
reference layer) that the KV cache can take instead, for a copy to the host and one back a step.

The device memory is given back by shrinking each tensor's storage to nothing and grown again
afterwards (as FSDP frees parameters): every tensor, view and reference to them stays the same
object (ZeroAdamW's slices are views into the masters), only the bytes leave for a while.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def _offloadable(storage: torch.UntypedStorage) -> bool:
    """Storage on an accelerator (on a CPU-only run nothing moves)."""
    return storage.device.type != "cpu"


def _to_host(storage: torch.UntypedStorage) -> torch.UntypedStorage:
    """A copy of `storage` in host memory, page-locked where CUDA is (the fast way across)."""
    host = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    return host.untyped_storage().copy_(storage)


def update_only_tensors(layer, optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """What the update reads and a rollout does not: the fp32 masters where they are not the
    compute copy, the reference weights, the optimizer's state (ZeroAdamW keeps its slices'
    state in `local`)."""
    tensors = [] if layer.shares_storage else list(layer.master.values())
    tensors += list((layer.reference or {}).values())
    for opt in filter(None, (optimizer, getattr(optimizer, "local", None))):
        for state in opt.state.values():
            tensors += [t for t in state.values() if isinstance(t, Tensor)]
    return tensors


@contextlib.contextmanager
def optimizer_offloaded(layer, optimizer: torch.optim.Optimizer, enabled: bool):
    """While the block runs (a rollout), the device bytes of `update_only_tensors` are in host
    memory and their device memory is free; they are back in place after the block, on an error
    too. Nothing of them may be read or written inside the block."""
    if not enabled:
        yield
        return
    storages = {}
    for t in update_only_tensors(layer, optimizer):
        storage = t.untyped_storage()
        if _offloadable(storage) and storage.nbytes():
            storages.setdefault(storage.data_ptr(), storage)   # once each, views alike
    moved = []
    for storage in storages.values():
        moved.append((storage, _to_host(storage)))
        storage.resize_(0)
    try:
        yield
    finally:
        for storage, host in moved:
            storage.resize_(host.nbytes())
            storage.copy_(host)
