"""The GiGPO learning curve recorded in docs/gigpo.md (a longer version of the test in
tests/test_multiturn.py): a tiny model taught to answer random valid moves, then 60 GiGPO
steps on layer 3 of 4 on a 3x3 gridworld (tasks 0 and 3), sampled success every 5 steps.

    PYTHONPATH=tests OMP_NUM_THREADS=2 python scripts/gigpo_gridworld_curve.py
"""
import torch
from test_multiturn import pretrain_random_mover

from onelayer.agentic import gigpo_step, success_rate
from onelayer.config import build_config
from onelayer.model import load_policy
from onelayer.train import build_objective

STEPS, EVERY, TASKS = 60, 5, [0, 3]

torch.manual_seed(0)
model = pretrain_random_mover("runs/gridworld-mover", steps=60, max_turns=5)
cfg = build_config(dict(model=model, layer="3", algo="gigpo", env="test_multiturn:SmallGrid",
                        max_turns=5, group_size=8, prompts_per_step=4, lr=3e-3, epochs=2,
                        minibatch=16, max_new_tokens=8, device="cpu", loss_impl="torch"))
policy = load_policy(model, layer=cfg.layer, device="cpu")
objective = build_objective(cfg, policy.device)
optimizer = torch.optim.AdamW(policy.layer.parameters(), lr=cfg.lr)
print("| step | sampled success (128 episodes) |\n|---|---|")
for step in range(STEPS + 1):
    if step % EVERY == 0:
        print(f"| {step} | {success_rate(policy, cfg, TASKS * 64, greedy=False):.1%} |", flush=True)
    if step < STEPS:
        gigpo_step(policy, optimizer, cfg, objective, TASKS * 2)
