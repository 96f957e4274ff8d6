"""Data parallelism over torch.distributed: `torchrun --nproc-per-node N -m onelayer train ...`.

Every rank holds its own frozen copy of the model and its own trained layer; they start equal
and stay equal, because every rank applies the same summed gradient with the same AdamW step
(or, with ZeRO-1, steps its slice of the layer and gathers the others').

    global prompts of a step (the same list on every rank: one data position, one seed)
        -> this rank's contiguous shard of whole prompts (a group never spans ranks)
        -> its rollouts, rewards, advantages (`--scale-rewards batch`: the std of all ranks')
        -> per optimizer step: the normalisers of the GLOBAL minibatch (sequences, tokens),
           this rank's micro-batches' gradients, their sum over the ranks sent bucket by
           bucket during the last backward, clip, AdamW (onelayer.data_parallel)
    metrics: reduced across ranks; rank 0 alone writes logs, checkpoints and the layer

What crosses the wire is the layer's fp32 gradient (~0.77 GB for a Qwen3-8B layer) once per
optimizer step (with ZeRO-1, a reduce-scatter of it and an all-gather of the updated layer),
plus a few scalars. Without WORLD_SIZE > 1 in the environment nothing here starts a process
group and every helper is the identity: the single-process run is unchanged.

Sampling: each rank's run generator is reseeded every step from (seed, step, rank), so a
resumed run samples as an uninterrupted one with the same world size would, whatever world
size wrote the checkpoint; the data position is global and carries over to any world size.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
from datetime import timedelta
from typing import Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import RunStopped, UserError

T = TypeVar("T")

def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0, the one that writes logs, checkpoints and exports (and alone)."""
    return rank() == 0


# The collectives over one flat tensor: torch 2.13 names them *_single (its older names warn);
# torch 2.11 has only the older ones.
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# The process group's collective timeout (--dist-timeout), kept for the message of a stop.
_timeout_s: float | None = None


def init_from_env(device: str | None, timeout_s: float) -> bool:
    """Join the process group that torchrun / accelerate launch describe in the environment
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). NCCL on GPUs, each rank on its
    LOCAL_RANK card; gloo on CPU. A collective that waits more than `timeout_s` seconds for
    the other ranks fails (and stops the job). False (and nothing done) when WORLD_SIZE is
    unset or 1."""
    global _timeout_s
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if dist.is_initialized():
        return True
    cuda = torch.cuda.is_available() and not (device or "").startswith("cpu")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    _timeout_s = timeout_s
    atexit.register(shutdown)
    return True


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_run(cfg) -> None:
    """Refuse, before anything is loaded, what data parallelism cannot split evenly: every rank
    must run the same number of optimizer steps, or the collectives would wait forever."""
    world = world_size()
    if world == 1:
        return
    if cfg.prompts_per_step % world:
        raise UserError(f"--prompts-per-step {cfg.prompts_per_step} must be a multiple of the "
                        f"{world} ranks (whole groups per rank)")
    if cfg.minibatch % world:
        raise UserError(f"--minibatch {cfg.minibatch} counts the sequences of all {world} ranks: "
                        f"it must be a multiple of {world}")
    if cfg.minibatch and cfg.history_turns is not None:
        raise UserError(f"--history-turns trains one sequence per decision, and each rank plays a "
                        f"different number of them: with {world} ranks use --minibatch 0 (one "
                        "optimizer step per epoch)")


def device() -> torch.device:
    """Where collectives' tensors live: the current CUDA card with NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """A failed or timed-out collective becomes a clear stop instead of a stack trace (or a
    hang): another rank died, or is stuck beyond the timeout."""
    try:
        yield
    except (RuntimeError, dist.DistError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        waited = f"within {_timeout_s:g} s (--dist-timeout)" if _timeout_s else "in time"
        raise RunStopped(f"rank {rank()} of {world_size()} lost the other ranks while {what}: "
                         f"a rank died or did not answer {waited}. {first}", 1) from exc


def shard(items: list[T]) -> list[T]:
    """This rank's contiguous share of `items` (all of them on one rank)."""
    world, r, n = world_size(), rank(), len(items)
    return items if world == 1 else items[r * n // world:(r + 1) * n // world]


def step_seed(seed: int, step: int) -> int:
    """The seed of this rank's run generator at `step` (63 bits of a hash of all three)."""
    digest = hashlib.blake2b(f"{seed}:{step}:{rank()}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _sum(values: list[float], what: str, dtype=torch.float64) -> list[float]:
    t = torch.tensor(values, dtype=dtype, device=device())
    with collective(what):
        dist.all_reduce(t)
    return t.tolist()


def every_rank(values: list[float], what: str) -> list[list[float]]:
    """Each rank's `values` (the same number on every rank), in rank order, on every rank."""
    if world_size() == 1:
        return [list(values)]
    mine = torch.tensor(values, dtype=torch.float64, device=device())
    table = torch.empty(world_size() * len(values), dtype=torch.float64, device=device())
    with collective(what):
        all_gather_flat(table, mine)
    return table.view(world_size(), len(values)).tolist()


def any_rank(flag: bool, what: str = "agreeing on a stop") -> bool:
    """True on every rank when it is True on one (a stop request, work to do)."""
    return flag if world_size() == 1 else _sum([float(flag)], what)[0] > 0


def weighted_mean(value: float, weight: float) -> float:
    """The mean of every rank's `value`, each weighed by its `weight` (a score over its shard)."""
    if world_size() == 1:
        return value
    total, weights = _sum([value * weight, weight], "reducing a score")
    return total / weights if weights else 0.0


def token_means(sums: list[float], count: float, what: str) -> list[float]:
    """Means over every rank's tokens: each of `sums` summed over the ranks, divided by the
    ranks' summed `count` (0 where no rank has a token). A mean of the ranks' own means would
    weigh a rank with few tokens as much as one with many."""
    if world_size() > 1:
        *sums, count = _sum([*sums, count], what)
    return [s / count if count else 0.0 for s in sums]


def global_std(values: Tensor) -> float:
    """The unbiased std of every rank's `values` together (float64 sums)."""
    if world_size() == 1:
        return values.std().item() if len(values) > 1 else 0.0
    v = values.detach().double().cpu()
    n, s, sq = _sum([len(v), v.sum().item(), (v * v).sum().item()], "reducing reward statistics")
    return max(sq - s * s / n, 0.0) ** 0.5 / max(n - 1, 1) ** 0.5 if n > 1 else 0.0


def global_counts(num_seqs: int, num_tokens: Tensor) -> tuple[int, Tensor]:
    """The normalisers of the global minibatch: every rank's sequences and tokens, summed."""
    if world_size() == 1:
        return num_seqs, num_tokens
    seqs, tokens = _sum([num_seqs, num_tokens.item()], "counting the minibatch")
    return int(seqs), torch.tensor(tokens, dtype=num_tokens.dtype, device=num_tokens.device)


# Step metrics that add up over ranks (throughput, counts of events per rank's share) and those
# whose slowest / largest rank is the one to report (times, memory); the rest are means (equal
# shards: the mean of the ranks' means is the global mean; values equal on every rank stay).
SUMMED = {"tokens_per_s", "reward_errors", "reward_timeouts", "groups_sampled", "groups_kept"}
MAXED = {"step_s", "gen_s", "update_s", "peak_mem_gib", "rss_gib"}


def reduce_metrics(metrics: dict) -> dict:
    """One step's metrics over all ranks (the same result on every rank)."""
    world = world_size()
    if world == 1:
        return metrics
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
    sums = torch.tensor([metrics[k] for k in keys if k not in MAXED], dtype=torch.float64,
                        device=device())
    maxes = torch.tensor([metrics[k] for k in keys if k in MAXED], dtype=torch.float64,
                         device=device())
    with collective("reducing the step's metrics"):
        dist.all_reduce(sums)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
    reduced = dict(zip([k for k in keys if k not in MAXED], sums.tolist()))
    reduced.update(zip([k for k in keys if k in MAXED], maxes.tolist()))
    out = dict(metrics)
    for k in keys:
        value = reduced[k] if k in SUMMED or k in MAXED else reduced[k] / world
        out[k] = type(metrics[k])(round(value)) if isinstance(metrics[k], int) else value
    return out


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank (a run directory named after the time, ...)."""
    if world_size() == 1:
        return obj
    box = [obj]
    with collective("agreeing on the output directory"):
        dist.broadcast_object_list(box, src=0)
    return box[0]
