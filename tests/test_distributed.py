"""Data parallelism on CPU: gloo, 2 processes launched by torchrun, the demo model.

The equivalence runs sample each step's GLOBAL batch on every rank from one seed and keep the
rank's share (a test hook, `worker` below): rollouts then do not depend on the world size, so
the layer after K steps on 2 ranks must equal the layer of 1 rank on the same global batches,
up to the order of the floating-point sums. Everything after sampling (sharding, advantages
with batch-scaled rewards, global normalisers, the gradient all-reduce, AdamW, rank-0-only
checkpoints, resume on another world size) is the production path.

Run as a script, this file is that worker: `python tests/test_distributed.py OUT_LOG ARGS...`.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
TRAIN = ["--steps", "3", "--prompts-per-step", "4", "--group-size", "4", "--eval-samples", "4",
         "--epochs", "2", "--micro-batch", "3", "--scale-rewards", "batch", "--save-every", "1",
         "--seed", "1"]   # seed 1: every step's batch has groups with different rewards


def worker(log: str, argv: list[str]) -> None:
    """`onelayer train` with the global-batch sampler; logs each checkpoint write's rank, and
    each rank's groups and data position after every step (LOG.steps, JSON lines).
    ONELAYER_TEST_DIE=N: rank 1 dies (os._exit) when it samples its N-th batch;
    ONELAYER_TEST_HANG=N: rank 1 sleeps there instead;
    ONELAYER_TEST_OWN_SAMPLING=1: the trainer's own sampler (each rank samples its shard);
    ONELAYER_TEST_FLAT_FIRST_ROUND=1: rank 1's first sampling round of every step scores 0 for
    every completion (no group of it is kept: rank 1 needs more rounds than rank 0)."""
    import hashlib
    import signal

    import torch
    import torch.distributed as dist

    from onelayer import cli, train
    from onelayer.rollout import select_rollout

    real_sample, real_save = train.sample_and_score, train.save_checkpoint
    calls = []

    def rank() -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    def sample_globally(policy, task, rows, cfg, more_rows=None, *, generator=None, gen_batch=None):
        calls.append(1)
        world = dist.get_world_size() if dist.is_initialized() else 1
        parts = [None] * world
        dist.all_gather_object(parts, rows) if world > 1 else parts.__setitem__(0, rows)
        if rank() == 1 and len(calls) == int(os.environ.get("ONELAYER_TEST_DIE", 0)):
            os._exit(7)   # after the hook's own collective: rank 0 meets it in the trainer's
        if rank() == 1 and len(calls) == int(os.environ.get("ONELAYER_TEST_HANG", 0)):
            # Hung, but killed by the launcher's first SIGTERM (the trainer's handler would make
            # it wait for the stop after the step, and the launcher 30 s before its SIGKILL).
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(3600)
        everyone = [r for part in parts for r in part]
        # One seed per global batch, from its content: the same on every rank, in a resumed run too.
        seed = int.from_bytes(hashlib.blake2b(json.dumps(everyone, sort_keys=True, default=str)
                                              .encode(), digest_size=7).digest(), "little")
        batch = real_sample(policy, task, everyone, cfg, generator=torch.Generator().manual_seed(seed))
        n = len(rows) * cfg.group_size
        mine = torch.arange(rank() * n, (rank() + 1) * n)
        return train.ScoredBatch(select_rollout(batch.rollout, mine), batch.rewards[mine],
                                 batch.group_ids[mine], len(rows))

    def logged_save(output, *args, state, **kwargs):
        with open(log, "a") as f:
            f.write(f"{rank()} {state.step}\n")
        return real_save(output, *args, state=state, **kwargs)

    real_rl_step, real_task_job, real_load_task = train.rl_step, train.task_job, train.load_task
    rounds = []

    def flat_first_round(*args, **kwargs):
        task = real_load_task(*args, **kwargs)
        real_rewards = task.rewards

        def rewards(completions, rows, *more):
            rounds.append(1)
            scores = real_rewards(completions, rows, *more)
            return [0.0] * len(scores) if rank() == 1 and len(rounds) == 1 else scores
        object.__setattr__(task, "rewards", rewards)   # a frozen dataclass
        return task

    def counted_rl_step(*args, **kwargs):
        rounds.clear()
        return real_rl_step(*args, **kwargs)

    def logged_task_job(*args, **kwargs):
        job = real_task_job(*args, **kwargs)
        real_step = job.step

        def step():
            metrics = real_step()
            with open(f"{log}.steps", "a") as f:
                f.write(json.dumps({"rank": rank(), **job.state(),
                                    **{k: metrics[k] for k in ("groups_sampled", "groups_kept")
                                       if k in metrics}}) + "\n")
            return metrics
        job.step = step
        return job

    if not os.environ.get("ONELAYER_TEST_OWN_SAMPLING"):
        train.sample_and_score = sample_globally
    if os.environ.get("ONELAYER_TEST_FLAT_FIRST_ROUND"):
        train.load_task, train.rl_step = flat_first_round, counted_rl_step
    train.save_checkpoint, train.task_job = logged_save, logged_task_job
    cli.main(["train", "--quiet", *argv])


def launch(tmp_path, name, *args, ranks=1, env=None, timeout=240):
    """Run the worker on `ranks` processes; (completed process, its checkpoint-write log)."""
    log = tmp_path / f"{name}.saves"
    script = [str(Path(__file__).resolve()), str(log), *TRAIN, "--output", str(tmp_path / name),
              *args]
    command = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={ranks}", *script] if ranks > 1 else [sys.executable, *script])
    proc = subprocess.run(command, env={**ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)
    return proc, log


def layer(path):
    from safetensors.torch import load_file
    return load_file(Path(path) / "layer.safetensors")


def assert_close(a, b):
    import torch
    assert a.keys() == b.keys()
    for k in a:
        # AdamW moves each weight by up to lr (1e-3 in the demo) per step whatever the size of
        # its gradient; sums in another order agree to ~1e-7 relative, far below that.
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-5), (k, (a[k] - b[k]).abs().max())


def test_two_ranks_equal_one_and_resume_on_one(tmp_path):
    one, _ = launch(tmp_path, "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two, saves = launch(tmp_path, "two", ranks=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_close(layer(tmp_path / "two"), layer(tmp_path / "one"))
    # Rank 0 alone wrote each checkpoint and the metrics, once.
    assert saves.read_text().split("\n")[:-1] == ["0 1", "0 2", "0 3"]
    rows = [json.loads(r) for r in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert two.stdout.count("saved layer") == 1
    # Resumed on one rank from the 2-rank run's step 2: the same step 3.
    ckpt = tmp_path / "two" / "checkpoints" / "step-000002"
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    resumed, _ = launch(tmp_path, "resumed", "--resume", str(ckpt))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume: 2 -> 1 ranks" in resumed.stdout
    assert_close(layer(tmp_path / "resumed"), layer(tmp_path / "two"))


def steps_by_rank(log, ranks=2):
    """Per rank, what it logged after each step (rank r's list in step order)."""
    rows = [json.loads(line) for line in Path(f"{log}.steps").read_text().splitlines()]
    return [[row for row in rows if row["rank"] == r] for r in range(ranks)]


def test_dynamic_sampling_on_two_ranks(tmp_path):
    """Each rank refills its own share: every step trains on --prompts-per-step groups in all,
    half on each rank, though rank 1 always needs more sampling rounds than rank 0 (its first
    round is forced to score 0); the data position is the same on both ranks after a step."""
    proc, saves = launch(tmp_path, "dynamic", "--dynamic-sampling", ranks=2,
                         env={"ONELAYER_TEST_OWN_SAMPLING": "1",
                              "ONELAYER_TEST_FLAT_FIRST_ROUND": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert saves.read_text().split("\n")[:-1] == ["0 1", "0 2", "0 3"]
    assert proc.stdout.count("saved layer") == 1
    first, second = steps_by_rank(saves)
    assert len(first) == len(second) == 3
    for step, (a, b) in enumerate(zip(first, second), 1):
        assert a["groups_kept"] == b["groups_kept"] == 2, (a, b)     # 4 prompts / 2 ranks
        assert (a["drawn"], a["dropped"]) == (b["drawn"], b["dropped"]), (a, b)
        assert b["groups_sampled"] > 2 and a["drawn"] > 4 * step    # rank 1 refilled
    assert any(a["groups_sampled"] < b["groups_sampled"] for a, b in zip(first, second))
    rows = [json.loads(r) for r in (tmp_path / "dynamic" / "metrics.jsonl").read_text().splitlines()]
    assert [r["groups_kept"] for r in rows] == [4, 4, 4]


def test_a_hung_rank_stops_the_job_after_dist_timeout(tmp_path):
    # Rank 1 sleeps for an hour inside its 2nd step; rank 0 waits 10 s at its next collective.
    proc, saves = launch(tmp_path, "hung", "--dist-timeout", "10", ranks=2,
                         env={"ONELAYER_TEST_HANG": "2"}, timeout=180)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert ("onelayer: rank 0 of 2 lost the other ranks while" in out
            and "did not answer within 10 s (--dist-timeout)" in out), out[-3000:]
    assert saves.read_text().split("\n")[:-1] == ["0 1"]


def test_dist_timeout_must_be_positive(tmp_path, capsys):
    from test_cli import run_cli
    code, _, err = run_cli(["train", "--dist-timeout", "0", "--output", str(tmp_path / "out"),
                            "--quiet"], capsys)
    assert code == 2
    assert err.strip().splitlines() == [
        "onelayer: error: --dist-timeout must be positive seconds (got 0)"]


def test_a_dead_rank_stops_the_job(tmp_path):
    t0 = time.monotonic()
    proc, saves = launch(tmp_path, "dead", ranks=2, env={"ONELAYER_TEST_DIE": "2"}, timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 100
    out = proc.stdout + proc.stderr
    assert "onelayer: rank 0 of 2 lost the other ranks while" in out, out[-3000:]
    assert saves.read_text().split("\n")[:-1] == ["0 1"]   # the last good step is saved


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2:])
