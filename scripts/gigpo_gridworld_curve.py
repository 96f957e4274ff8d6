"""The GiGPO learning curve recorded in docs/gigpo.md (a longer version of the test in
tests/test_multiturn.py): a tiny model taught to answer random valid moves, then 60 GiGPO
steps on layer 3 of 4 on a 3x3 gridworld (tasks 0 and 3), sampled success every 5 steps.

    PYTHONPATH=tests OMP_NUM_THREADS=2 python scripts/gigpo_gridworld_curve.py
"""
from test_multiturn import mover_gigpo_run

from onelayer.agentic import gigpo_step, success_rate

STEPS, EVERY, TASKS = 60, 5, [0, 3]

cfg, policy, objective, optimizer = mover_gigpo_run("runs/gridworld-mover")
print("| step | sampled success (128 episodes) |\n|---|---|")
for step in range(STEPS + 1):
    if step % EVERY == 0:
        print(f"| {step} | {success_rate(policy, cfg, TASKS * 64, greedy=False):.1%} |", flush=True)
    if step < STEPS:
        gigpo_step(policy, optimizer, cfg, objective, TASKS * 2)
