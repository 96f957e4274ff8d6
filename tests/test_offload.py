"""--offload-optimizer: the trained layer's masters, AdamW state and reference weights wait in
host memory while rollouts run. On a CPU-only run nothing moves; to test the mechanism here,
CPU storage counts as device storage (its bytes go to a host copy and the storage shrinks to
nothing, as a GPU's would)."""
import dataclasses

import pytest
import torch
import torch.distributed as dist

from onelayer import offload
from onelayer.config import build_config
from onelayer.data_parallel import ZeroAdamW
from onelayer.model import load_policy
from onelayer.offload import optimizer_offloaded, update_only_tensors
from onelayer.single_turn import rl_step
from onelayer.tasks.arithmetic import arithmetic_task
from onelayer.update import build_objective


def steps(path, offloaded: bool, optimizer_class=torch.optim.AdamW, n: int = 2):
    """A bf16 policy with a reference layer after `n` rl_steps from seed 0 (the optimizer has
    state from the first on)."""
    cfg = build_config({"model": path, "layer": "1", "group_size": 4, "prompts_per_step": 2,
                        "max_new_tokens": 5, "lr": 1e-2, "beta": 0.1, "frozen_dtype": "bf16",
                        "offload_optimizer": offloaded})
    policy = load_policy(path, layer=1, frozen_dtype="bf16", device="cpu", keep_reference=True)
    task = arithmetic_task(n_train=10, n_test=1)
    task = dataclasses.replace(task, reward=lambda completion, row: float(len(completion) % 2))
    optimizer = (optimizer_class(policy.layer, lr=cfg.lr, weight_decay=0.0) if optimizer_class is ZeroAdamW
                 else optimizer_class(policy.layer.parameters(), lr=cfg.lr))
    objective = build_objective(cfg, policy.device)
    generator = torch.Generator().manual_seed(0)
    for i in range(n):
        rl_step(policy, optimizer, task, task.train[2 * i:2 * i + 2], cfg, objective, generator=generator)
    return policy, optimizer


@pytest.fixture
def cpu_as_device(monkeypatch):
    monkeypatch.setattr(offload, "_offloadable", lambda storage: True)


def test_the_bytes_leave_during_the_block_and_come_back_in_place(tiny_models, cpu_as_device):
    policy, optimizer = steps(tiny_models["qwen3"], offloaded=False)
    tensors = update_only_tensors(policy.layer, optimizer)
    # masters, reference weights, AdamW's exp_avg and exp_avg_sq (and step) for each
    assert len(tensors) == 5 * len(policy.layer.master)
    before = [(t, t.untyped_storage(), t.detach().clone()) for t in tensors]
    compute = [t.detach().clone() for t in policy.layer.compute.values()]
    with optimizer_offloaded(policy.layer, optimizer, True):
        assert all(storage.nbytes() == 0 for _, storage, _ in before)
        # What rollouts read stays: the compute copy.
        assert all(torch.equal(a, b) for a, b in zip(policy.layer.compute.values(), compute))
    for (t, storage, value), now in zip(before, update_only_tensors(policy.layer, optimizer)):
        assert now is t and t.untyped_storage().data_ptr() == storage.data_ptr() and torch.equal(t, value)
    with pytest.raises(RuntimeError, match="in the rollout"):   # an error inside: back too
        with optimizer_offloaded(policy.layer, optimizer, True):
            raise RuntimeError("in the rollout")
    assert all(torch.equal(t, value) for t, _, value in before)


def test_training_with_offloading_is_training_without(tiny_models, cpu_as_device):
    plain, plain_opt = steps(tiny_models["qwen3"], offloaded=False)
    moved, moved_opt = steps(tiny_models["qwen3"], offloaded=True)
    for name, p in plain.layer.master.items():
        assert torch.equal(p, moved.layer.master[name]), name
    for a, b in zip(plain_opt.state.values(), moved_opt.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_zero_adamw_slices_still_update_the_masters(tiny_models, cpu_as_device):
    """ZeroAdamW steps views into the masters: they must still be views of them afterwards."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        plain, _ = steps(tiny_models["qwen3"], offloaded=False, optimizer_class=ZeroAdamW, n=3)
        moved, _ = steps(tiny_models["qwen3"], offloaded=True, optimizer_class=ZeroAdamW, n=3)
    finally:
        dist.destroy_process_group()
    for name, p in plain.layer.master.items():
        assert torch.equal(p, moved.layer.master[name]), name


def test_nothing_moves_on_a_cpu_run(tiny_models):
    policy, optimizer = steps(tiny_models["qwen3"], offloaded=True, n=1)
    sizes = [t.untyped_storage().nbytes() for t in update_only_tensors(policy.layer, optimizer)]
    with optimizer_offloaded(policy.layer, optimizer, True):
        assert [t.untyped_storage().nbytes() for t in update_only_tensors(policy.layer, optimizer)] == sizes
