"""Data parallelism on CPU: gloo, 2 processes launched by torchrun, the demo model.

The equivalence runs sample each step's GLOBAL batch on every rank from one seed and keep the
rank's share (a test hook, `worker` below): rollouts then do not depend on the world size, so
the layer after K steps on 2 ranks must equal the layer of 1 rank on the same global batches,
up to the order of the floating-point sums. Everything after sampling (sharding, advantages
with batch-scaled rewards, global normalisers, the gradient all-reduce or reduce-scatter
during the last backward, AdamW whole or sharded, rank-0-only checkpoints, resume on another
world size) is the production path.

Run as a script, this file is that worker: `python tests/test_distributed.py OUT_LOG ARGS...`.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
# Seed 1: every step's batch has groups with different rewards. The gradient's norm is 0.3-0.7
# in most optimizer steps: the clip at 0.2 is active, and a wrong global norm would show.
TRAIN = ["--steps", "3", "--prompts-per-step", "4", "--group-size", "4", "--eval-samples", "4",
         "--epochs", "2", "--micro-batch", "3", "--scale-rewards", "batch", "--save-every", "1",
         "--seed", "1", "--max-grad-norm", "0.2"]


def worker(log: str, argv: list[str]) -> None:
    """`onelayer train` with the global-batch sampler; logs each checkpoint write's rank, and
    each rank's groups and data position after every step (LOG.steps, JSON lines).
    ONELAYER_TEST_DIE=N: rank 1 dies (os._exit) when it samples its N-th batch;
    ONELAYER_TEST_HANG=N: rank 1 sleeps there instead;
    ONELAYER_TEST_OWN_SAMPLING=1: the trainer's own sampler (each rank samples its shard);
    ONELAYER_TEST_FLAT_FIRST_ROUND=1: rank 1's first sampling round of every step scores 0 for
    every completion (no group of it is kept: rank 1 needs more rounds than rank 0);
    ONELAYER_TEST_FLAT_STEP=N: so does every round of rank 1's N-th step (it finds no group);
    ONELAYER_TEST_TRACE=1: each rank writes LOG.trace.RANK, its updates' backward calls and
    collectives in order (`trace` below), with each gradient tensor in a bucket of its own."""
    import hashlib
    import signal

    import torch
    import torch.distributed as dist

    from onelayer import cli, single_turn, train
    from onelayer.rollout import select_rollout

    real_sample, real_save = single_turn.sample_and_score, train.save_checkpoint
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
        return single_turn.ScoredBatch(select_rollout(batch.rollout, mine), batch.rewards[mine],
                                 batch.group_ids[mine], len(rows))

    def logged_save(output, *args, state, **kwargs):
        with open(log, "a") as f:
            f.write(f"{rank()} {state.step}\n")
        return real_save(output, *args, state=state, **kwargs)

    real_rl_step, real_task_job, real_load_task = single_turn.rl_step, train.task_job, train.load_training_task
    rounds, steps = [], []
    flat_step = int(os.environ.get("ONELAYER_TEST_FLAT_STEP", 0))

    def flat_first_round(*args, **kwargs):
        task = real_load_task(*args, **kwargs)
        real_rewards = task.rewards

        def rewards(completions, rows, *more):
            rounds.append(1)
            scores = real_rewards(completions, rows, *more)
            flat = rank() == 1 and (len(rounds) == 1 or len(steps) == flat_step)
            return [0.0] * len(scores) if flat else scores
        object.__setattr__(task, "rewards", rewards)   # a frozen dataclass
        return task

    def counted_rl_step(*args, **kwargs):
        rounds.clear()
        steps.append(1)
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
        single_turn.sample_and_score = sample_globally
    if os.environ.get("ONELAYER_TEST_FLAT_FIRST_ROUND"):
        train.load_training_task, single_turn.rl_step = flat_first_round, counted_rl_step
    train.save_checkpoint, train.task_job = logged_save, logged_task_job
    events = trace() if os.environ.get("ONELAYER_TEST_TRACE") else None
    try:
        cli.main(["train", "--quiet", *argv])
    finally:
        if events is not None:
            Path(f"{log}.trace.{rank()}").write_text("\n".join(events) + "\n")


def trace() -> list[str]:
    """Record, in order: U / u at the start / end of each optimizer step (update.update), B / b
    at the start / end of each backward, and each collective of the layer's tensors as
    "OP DTYPE NUMEL" (all_reduce, reduce_scatter, all_gather). Buckets of one tensor each."""
    import torch
    import torch.distributed as dist

    from onelayer import data_parallel, distributed, update

    events = []
    data_parallel.BUCKET_BYTES = 1

    def wrap(owner, name, before, after=None):
        real = getattr(owner, name)

        def traced(*args, **kwargs):
            events.append(before(*args) if callable(before) else before)
            try:
                return real(*args, **kwargs)
            finally:
                if after:
                    events.append(after)
        setattr(owner, name, traced)

    def collective(op):
        return lambda out, *rest: f"{op} {str(out.dtype)[6:]} {out.numel()}"

    wrap(update, "update", "U", "u")
    wrap(torch.Tensor, "backward", "B", "b")
    wrap(dist, "all_reduce", collective("all_reduce"))
    wrap(distributed, "reduce_scatter_flat", lambda out, sent, *rest:
         f"reduce_scatter {str(sent.dtype)[6:]} {sent.numel()}")
    wrap(distributed, "all_gather_flat", collective("all_gather"))
    return events


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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """run(name, *args, ranks=1) -> (completed process, checkpoint-write log, output directory),
    each run launched once for the tests of this module that share it; the 2-rank runs are
    traced (ONELAYER_TEST_TRACE)."""
    root, done = tmp_path_factory.mktemp("runs"), {}

    def run(name, *args, ranks=1):
        if name not in done:
            env = {"ONELAYER_TEST_TRACE": "1"} if ranks > 1 else None
            done[name] = (*launch(root, name, *args, ranks=ranks, env=env), root / name)
        proc = done[name][0]
        assert proc.returncode == 0, proc.stderr[-3000:]
        return done[name]
    return run


REPLICATED = ("two", "--optimizer-sharding", "none")
SHARDED = ("zero1", "--optimizer-sharding", "zero1")


def test_two_ranks_equal_one_and_resume_on_one(runs):
    _, _, one = runs("one")
    two, saves, out = runs(*REPLICATED, ranks=2)
    assert_close(layer(out), layer(one))
    # Rank 0 alone wrote each checkpoint and the metrics, once.
    assert saves.read_text().split("\n")[:-1] == ["0 1", "0 2", "0 3"]
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # The ranks' sampler mismatch, averaged like every mean: float rounding on each (fp32, CPU).
    assert all(0 <= r["sampler_logprob_gap"] < 1e-4 and 0 <= r["sampler_kl"] < 1e-4 for r in rows)
    assert two.stdout.count("saved layer") == 1
    # Resumed on one rank from the 2-rank run's step 2: the same step 3.
    ckpt = out / "checkpoints" / "step-000002"
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    resumed, _, again = runs("resumed", "--resume", str(ckpt))
    assert "resume: 2 -> 1 ranks" in resumed.stdout
    assert_close(layer(again), layer(out))


def updates(saves, rank):
    """A traced rank's optimizer steps: the events between each U and its u."""
    steps, current = [], None
    for event in Path(f"{saves}.trace.{rank}").read_text().splitlines():
        if event == "U":
            current = []
        elif event == "u":
            steps.append(current)
            current = None
        elif current is not None:
            current.append(event)
    return steps


def check_overlap(saves, gradient_op):
    """Every gradient collective of each optimizer step is issued during its last backward
    (after the last B, before its b): none in an earlier micro-batch, none after."""
    for rank in (0, 1):
        steps = updates(saves, rank)
        assert len(steps) == 3 * 2   # 3 RL steps x 2 epochs, one minibatch each
        for events in steps:
            text = " / ".join(events)
            sent = [i for i, e in enumerate(events) if e.startswith(gradient_op)]
            starts = [i for i, e in enumerate(events) if e == "B"]
            assert len(starts) == 3, text      # 8 rows per rank, micro-batches of 3: 3 + 3 + 2
            end = events.index("b", starts[-1])
            assert len(sent) == 11, text        # one bucket per tensor of the layer
            assert starts[-1] < min(sent) and max(sent) < end, text


def test_the_gradient_all_reduce_overlaps_the_last_backward(runs):
    _, saves, _ = runs(*REPLICATED, ranks=2)
    check_overlap(saves, "all_reduce float32")


def test_zero1_equals_replicated_and_resumes_on_one(runs):
    """ZeRO-1 (each rank holds half of AdamW's state) trains the same layer as the replicated
    optimizer, its checkpoint holds the same whole state in the same format, and it resumes
    on one rank (unsharded)."""
    import torch
    _, _, replicated = runs(*REPLICATED, ranks=2)
    sharded, saves, out = runs(*SHARDED, ranks=2)
    assert sharded.stdout.count("saved layer") == 1
    assert saves.read_text().split("\n")[:-1] == ["0 1", "0 2", "0 3"]
    for a, b in zip(layer(out).values(), layer(replicated).values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    check_overlap(saves, "reduce_scatter float32")
    for rank in (0, 1):   # and after each step, the updated halves gathered
        for events in updates(saves, rank):
            assert events[-1].startswith("all_gather float32"), events
    state = torch.load(out / "checkpoints" / "step-000003" / "optimizer.pt")
    want = torch.load(replicated / "checkpoints" / "step-000003" / "optimizer.pt")
    assert state["param_groups"] == want["param_groups"]
    assert state["state"].keys() == want["state"].keys()
    for i, entry in want["state"].items():
        assert list(state["state"][i]) == list(entry)
        for key, value in entry.items():   # step, exp_avg, exp_avg_sq
            got = state["state"][i][key]
            assert (got.shape, got.dtype) == (value.shape, value.dtype)
            # Equal to a few 1e-6 of the tensor's scale: the clip's global norm is summed in
            # another order, and 6 optimizer steps carry the difference along.
            assert (got - value).abs().max() <= 2e-5 * value.abs().max(), (i, key)
    ckpt = out / "checkpoints" / "step-000002"
    resumed, _, again = runs("zero1-resumed", "--resume", str(ckpt))
    assert "resume: 2 -> 1 ranks" in resumed.stdout
    assert_close(layer(again), layer(out))
    # And the other way: a replicated checkpoint continued with the state sharded.
    ckpt = replicated / "checkpoints" / "step-000002"
    _, _, again = runs("resumed-zero1", "--resume", str(ckpt), *SHARDED[1:], ranks=2)
    assert_close(layer(again), layer(replicated))


def steps_by_rank(log, ranks=2):
    """Per rank, what it logged after each step (rank r's list in step order)."""
    rows = [json.loads(line) for line in Path(f"{log}.steps").read_text().splitlines()]
    return [[row for row in rows if row["rank"] == r] for r in range(ranks)]


def test_dynamic_sampling_on_two_ranks(tmp_path):
    """Each rank refills its own share: every step trains on --prompts-per-step groups in all,
    half on each rank, though rank 1 always needs more sampling rounds than rank 0 (its first
    round is forced to score 0); the data position is the same on both ranks after a step. In
    step 3 rank 1 finds no group in its 4 rounds: neither rank trains (the same number of
    optimizer steps on both), and the run goes on."""
    # A collective inside the sampling rounds would pair up differently on the two ranks: a
    # hang, stopped after 60 s.
    proc, saves = launch(tmp_path, "dynamic", "--dynamic-sampling", "--dist-timeout", "60",
                         "--steps", "4", ranks=2,
                         env={"ONELAYER_TEST_OWN_SAMPLING": "1",
                              "ONELAYER_TEST_FLAT_FIRST_ROUND": "1", "ONELAYER_TEST_FLAT_STEP": "3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert saves.read_text().split("\n")[:-1] == ["0 1", "0 2", "0 3", "0 4"]
    assert proc.stdout.count("saved layer") == 1
    first, second = steps_by_rank(saves)
    assert len(first) == len(second) == 4
    # Step 4 depends on what the policy samples by then: whatever each rank found, they agree.
    kept = [2, 2, 0, first[3]["groups_kept"]]   # 4 prompts a step: 2 groups per rank when full
    for step, (a, b) in enumerate(zip(first, second), 1):
        assert a["groups_kept"] == b["groups_kept"] == kept[step - 1], (a, b)
        assert (a["drawn"], a["dropped"]) == (b["drawn"], b["dropped"]), (a, b)
        assert b["groups_sampled"] > 2 and a["drawn"] > 4 * step    # rank 1 refilled
    assert second[2]["groups_sampled"] > first[2]["groups_sampled"] >= 2
    assert any(a["groups_sampled"] < b["groups_sampled"] for a, b in zip(first, second))
    metrics = [json.loads(row) for row in
               (tmp_path / "dynamic" / "metrics.jsonl").read_text().splitlines()]
    assert [row["groups_kept"] for row in metrics] == [2 * k for k in kept]
    assert [row["loss"] == 0 for row in metrics] == [False, False, True, kept[3] == 0]


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
    from conftest import run_cli
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


def _shard_rollout(rank: int):
    """Rank 0: 2 rows x 6 tokens, 9 of them carrying loss; rank 1: 1 row, 2 tokens: (rollout,
    old log-probs). Both ranks' tokens together are `_shard_rollout(0)` and `(1)` stacked."""
    import torch

    from onelayer.rollout import Rollout

    g = torch.Generator().manual_seed(rank)
    rows, lengths = (2, [6, 3]) if rank == 0 else (1, [2])
    mask = (torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]).float()
    sampler = (-2 + torch.randn(rows, 6, generator=g)) * mask
    old = sampler + (0.5 if rank else 0.05) * torch.randn(rows, 6, generator=g)
    rollout = Rollout(torch.zeros(rows, 8, dtype=torch.long), torch.ones(rows, 8), mask, 2, [""] * rows,
                      logprobs=sampler)
    return rollout, old


def _mismatch_worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from onelayer import update

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    rollout, old = _shard_rollout(rank)
    metrics = {**update.sampler_mismatch(rollout, old),
               **update.tis_metrics(rollout, update.tis_weights(rollout, old, 1.2), 1.2)}
    Path(f"{out}.{rank}").write_text(json.dumps(metrics))
    dist.destroy_process_group()


def test_mismatch_metrics_are_means_over_every_ranks_tokens(tmp_path):
    """Two ranks with 9 and 2 loss tokens report the mean over the 11, not the mean of the
    ranks' means (rank 1's few tokens differ far more from the sampler's)."""
    import torch
    import torch.multiprocessing as mp

    from onelayer import update
    from onelayer.rollout import Rollout

    mp.spawn(_mismatch_worker, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2)
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in (0, 1)]
    (a, old_a), (b, old_b) = _shard_rollout(0), _shard_rollout(1)
    both = Rollout(torch.cat([a.sequences, b.sequences]), torch.cat([a.attention_mask, b.attention_mask]),
                   torch.cat([a.completion_mask, b.completion_mask]), 2, [""] * 3,
                   logprobs=torch.cat([a.logprobs, b.logprobs]))
    old = torch.cat([old_a, old_b])
    want = {**update.sampler_mismatch(both, old),
            **update.tis_metrics(both, update.tis_weights(both, old, 1.2), 1.2)}
    assert ranks[0] == ranks[1]
    assert ranks[0].keys() == want.keys()
    for key in want:
        assert ranks[0][key] == pytest.approx(want[key], rel=1e-6), key
    each = [{**update.sampler_mismatch(r, o)} for r, o in ((a, old_a), (b, old_b))]
    unweighted = (each[0]["sampler_logprob_gap"] + each[1]["sampler_logprob_gap"]) / 2
    assert abs(unweighted - want["sampler_logprob_gap"]) > 0.05


def test_what_ranks_cannot_split_evenly_is_refused(monkeypatch):
    import pytest

    from onelayer import distributed
    from onelayer.config import build_config
    from onelayer.errors import UserError

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    agent = {"model": "x", "algo": "gigpo", "env": "gridworld", "history_turns": 0}
    for values, message in [({"prompts_per_step": 3}, "multiple of the 2 ranks"),
                            ({"minibatch": 3}, "must be a multiple of 2"),
                            ({**agent, "prompts_per_step": 4, "minibatch": 4}, "--minibatch 0")]:
        with pytest.raises(UserError, match=message):
            distributed.check_run(build_config(values))
    distributed.check_run(build_config({**agent, "prompts_per_step": 4}))   # accepted
