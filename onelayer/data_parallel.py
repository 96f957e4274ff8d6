"""The trained layer's gradient and AdamW on several ranks (onelayer.distributed holds the
process group): the gradient summed over the ranks once per optimizer step, starting during the
last backward, and AdamW either replicated on every rank or sharded over them (ZeRO-1).

    micro-batches 1 .. k-1: forward, backward; the gradient accumulates on the fp32 master
    micro-batch k (last):   forward; the order in which the backward will finish each tensor's
                            gradient is read off the autograd graph, the tensors are cut into
                            buckets in that order, and the backward starts; a hook on each
                            tensor sends its bucket as soon as the bucket is complete (async):
                              none:  all-reduce      -> every rank: the whole summed gradient
                              zero1: reduce-scatter  -> rank r: slice r of every summed tensor
    wait for all; the norm of the whole summed gradient; clip
                              none:  AdamW on the whole layer, the same step on every rank
                              zero1: AdamW on this rank's slices (exp_avg and exp_avg_sq of
                                     1/N of the layer), then an all-gather of the updated slices
                                     into every rank's fp32 master

Slices: a tensor of n elements is cut into N slices of c = ceil(n / N) elements; rank r owns
elements [r c, min((r + 1) c, n)), and the buffers that travel are padded with zeros to N c.
AdamW is elementwise, so stepping every slice is stepping the whole layer.

What the overlap can hide is bounded: the trained layer is the first block that the cached h_L
enters, so its gradient is finished during the last stretch of the backward (after the
suffix's recomputation and backward). The buckets' traffic overlaps the trained layer's own
backward, and what is left of it is waited for before the clip (docs/distributed.md).
"""
from __future__ import annotations

import functools
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from . import distributed
from .errors import UserError

SHARDING = ("none", "zero1")
# Gradient buckets: consecutive tensors (in the order their gradients are finished) up to this
# size travel together in one flat buffer; a larger tensor (a Qwen3-8B MLP matrix: 4096 x 12288
# fp32 = 192 MiB) travels alone, in place where it can, so at most a bucket of extra memory is
# allocated per small group.
BUCKET_BYTES = 32 * 2**20


def readiness_order(loss: Tensor, leaves: list[Tensor]) -> list[int]:
    """Indices of `leaves` in the order in which `loss.backward()` completes their gradients.

    The autograd engine runs the ready node with the highest sequence number first (the latest
    op of the forward), and a leaf's gradient is complete once the OLDEST op that used it has
    run its backward; so the leaves are sorted by their oldest consumer, newest first. A
    function of the graph's structure, not of timing or data: the same order on every rank
    (which matters: the ranks must send the same buckets in the same order). Leaves the graph
    does not reach come last, in their own order."""
    index = {id(t): i for i, t in enumerate(leaves)}
    oldest: dict[int, int] = {}
    stack = [loss.grad_fn] if loss.grad_fn is not None else []
    seen = set(stack)
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            leaf = getattr(child, "variable", None)   # an AccumulateGrad node
            if leaf is not None:
                if id(leaf) in index:
                    i, seq = index[id(leaf)], node._sequence_nr()
                    oldest[i] = min(oldest.get(i, seq), seq)
            elif child not in seen:
                seen.add(child)
                stack.append(child)
    reached = sorted(oldest, key=lambda i: (-oldest[i], i))
    return reached + [i for i in range(len(leaves)) if i not in oldest]


def buckets(order: list[int], nbytes: list[int]) -> Iterator[list[int]]:
    """Consecutive indices of `order`, in groups of at most BUCKET_BYTES (a larger one alone)."""
    bucket, size = [], 0
    for i in order:
        if bucket and size + nbytes[i] > BUCKET_BYTES:
            yield bucket
            bucket, size = [], 0
        bucket.append(i)
        size += nbytes[i]
    if bucket:
        yield bucket


def _rows(t: Tensor, chunk: int, world: int) -> Tensor:
    """t flattened and zero-padded to world x chunk elements, as [world, chunk] (a view when no
    padding is needed)."""
    flat = t.reshape(-1)
    if flat.numel() == world * chunk:
        return flat.view(world, chunk)
    return torch.cat([flat, flat.new_zeros(world * chunk - flat.numel())]).view(world, chunk)


class GradientSync:
    """The trained layer's gradient summed over the ranks, once per optimizer step, sent bucket
    by bucket during the last micro-batch's backward. shard: reduce-scatter (ZeRO-1: each rank
    keeps its slices of the sum in `slices`, and the full gradients are freed) instead of
    all-reduce (every rank keeps the whole sum in the parameters' .grad).

    Used as a context manager around one optimizer step (update.update):
        layer.policy_params() -> the last micro-batch's forward -> arm(loss, those) -> backward
        -> finish(loss, metrics) -> clip_(max_norm) -> optimizer.step()
    """

    def __init__(self, layer, *, shard: bool):
        self.layer = layer
        self.params = layer.parameters()               # the fp32 masters
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.shard = shard
        self.chunk = [-(-p.numel() // self.world) for p in self.params]   # slice length
        self.nbytes = [p.numel() * p.element_size() for p in self.params]
        self.slices: list[Tensor] = []   # zero1: this rank's slice of each summed gradient
        self.issued = False              # a bucket has been sent in this optimizer step
        self._hooks: list = []
        self._plan(list(range(len(self.params))))

    # ------------------------------------------------------------------ one optimizer step
    def __enter__(self) -> GradientSync:
        self.slices, self.issued = [], False
        self._plan(list(range(len(self.params))))
        return self

    def __exit__(self, kind, error, trace) -> None:
        self._unhook()
        if self.issued and isinstance(error, torch.OutOfMemoryError):
            # The other ranks are waiting for the rest of this step's buckets: a retry at a
            # smaller micro-batch would send the first ones twice.
            raise UserError(f"rank {self.rank} ran out of memory after it began sending its "
                            "gradient to the other ranks, so the step cannot be retried at a "
                            "smaller batch: restart with a lower --micro-batch") from error

    def arm(self, loss: Tensor, leaves: dict[str, Tensor]) -> None:
        """Before the last backward: buckets in the order the backward will finish them, and a
        hook on each leaf that sends its bucket once complete (buckets strictly in order, so
        every rank issues the same collectives in the same order)."""
        tensors = list(leaves.values())
        self._plan(readiness_order(loss, tensors))
        self._hooks = [t.register_post_accumulate_grad_hook(functools.partial(self._ready, i))
                       for i, t in enumerate(tensors)]

    def finish(self, loss, metrics: dict) -> tuple[Tensor, dict]:
        """Send what the backward did not (tensors it never reached: a zero share), sum the loss
        and the token-weighted metrics alongside, and wait for every bucket."""
        self._unhook()
        while self._next < len(self._buckets):
            self._launch(self._next)
        stats = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(distributed.device())
                             for v in (loss, *metrics.values())])
        with distributed.collective("summing the layer's gradients"):
            dist.all_reduce(stats)
            for bucket, sent, received, handle in self._work:
                handle.wait()
                self._unpack(bucket, sent, received)
        self._work = []
        values = stats.tolist()
        return torch.tensor(values[0], dtype=torch.float32), dict(zip(metrics, values[1:]))

    def clip_(self, max_norm: float) -> Tensor:
        """Clip the summed gradient to `max_norm` by its global L2 norm; returns that norm."""
        if not self.shard:   # every rank holds the whole sum
            return torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        norms = [torch.linalg.vector_norm(s) for s in self.slices]
        square = torch.stack(norms).double().square().sum().to(distributed.device())
        with distributed.collective("taking the gradient's norm"):
            dist.all_reduce(square)
        norm = square.sqrt()
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)   # as clip_grad_norm_
        for s in self.slices:
            s.mul_(scale.to(s))
        return norm.float()

    # ------------------------------------------------------------------ buckets
    def _plan(self, order: list[int]) -> None:
        self._buckets = list(buckets(order, self.nbytes))
        self._bucket_of = {i: b for b, bucket in enumerate(self._buckets) for i in bucket}
        self._missing = [len(bucket) for bucket in self._buckets]
        self._next = 0
        self._work: list = []

    def _ready(self, i: int, leaf: Tensor) -> None:
        """Post-accumulate hook of leaf i, after the layer's own (which adds a compute-dtype
        leaf's gradient to its master): master i's gradient is final for this backward."""
        b = self._bucket_of[i]
        self._missing[b] -= 1
        while self._next < len(self._buckets) and self._missing[self._next] == 0:
            self._launch(self._next)

    def _launch(self, b: int) -> None:
        bucket = self._buckets[b]
        self._next = b + 1
        self.issued = True
        grads = []
        for i in bucket:
            p = self.params[i]
            if p.grad is None:   # no token of this rank reached it: a zero share
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        with distributed.collective("summing the layer's gradients"):
            if self.shard:
                # [N, S]: row r holds slice r of every tensor of the bucket; rank r receives
                # row r summed over the ranks.
                rows = [_rows(g, self.chunk[i], self.world) for g, i in zip(grads, bucket)]
                sent = rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)
                received = sent.new_empty(sent.shape[1])
                handle = distributed.reduce_scatter_flat(received, sent.reshape(-1),
                                                         async_op=True)
            else:
                sent = grads[0] if len(grads) == 1 else torch.cat([g.reshape(-1) for g in grads])
                received, handle = None, dist.all_reduce(sent, async_op=True)
        self._work.append((bucket, sent, received, handle))

    def _unpack(self, bucket: list[int], sent: Tensor, received: Tensor | None) -> None:
        if self.shard:
            if not self.slices:
                self.slices = [None] * len(self.params)
            start = 0
            for i in bucket:
                p = self.params[i]
                own = max(0, min(self.chunk[i], p.numel() - self.rank * self.chunk[i]))
                self.slices[i] = received[start:start + own]
                start += self.chunk[i]
                p.grad = None   # the sum lives in the slice now
        elif len(bucket) > 1:
            grads = [self.params[i].grad for i in bucket]
            for g, part in zip(grads, sent.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))

    def _unhook(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


class LocalGradient:
    """One rank: the gradient is already the whole one; GradientSync's interface, doing
    nothing (the single-process update is unchanged)."""
    issued = False

    def __init__(self, layer):
        self.layer = layer

    def __enter__(self) -> LocalGradient:
        return self

    def __exit__(self, kind, error, trace) -> None:
        return None

    def arm(self, loss: Tensor, leaves: dict[str, Tensor]) -> None:
        pass

    def finish(self, loss, metrics: dict):
        return loss, metrics

    def clip_(self, max_norm: float) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(self.layer.parameters(), max_norm)


class ZeroAdamW(torch.optim.AdamW):
    """AdamW with its state sharded over the ranks (ZeRO-1): rank r holds exp_avg and
    exp_avg_sq of its slice of every tensor only (1/N of the layer's), steps that slice, and
    an all-gather gives every rank the whole updated fp32 layer.

    Its param_groups are the whole layer's (the LR schedule writes there); the slices' own
    AdamW (`local`, over views into the masters) copies their settings at each step. Its
    state travels as `full_state_dict()`, a collective: torch.optim.AdamW's state_dict over
    the whole layer, so that a checkpoint resumes on any number of ranks, sharded or not."""

    def __init__(self, layer, *, lr: float, weight_decay: float):
        super().__init__(layer.parameters(), lr=lr, weight_decay=weight_decay)
        self.sync = GradientSync(layer, shard=True)
        rank = self.sync.rank
        with torch.no_grad():   # views into the masters: AdamW updates them in place
            self.own = [p.view(-1)[min(rank * c, p.numel()):min((rank + 1) * c, p.numel())]
                        for p, c in zip(self.sync.params, self.sync.chunk)]
        self.local = torch.optim.AdamW(self.own, lr=lr, weight_decay=weight_decay)

    @torch.no_grad()
    def step(self, closure=None):
        """AdamW on this rank's slices of the summed (clipped) gradient, then the all-gather."""
        settings = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        self.local.param_groups[0].update(settings)
        for own, grad in zip(self.own, self.sync.slices):
            own.grad = grad
        self.local.step()
        for own in self.own:
            own.grad = None
        self._gather()

    def _gather(self) -> None:
        params, chunk, world, rank = (self.sync.params, self.sync.chunk, self.sync.world,
                                      self.sync.rank)
        work = []
        with distributed.collective("gathering the updated layer"):
            for bucket in buckets(list(range(len(params))), self.sync.nbytes):
                if len(bucket) == 1 and params[bucket[0]].numel() == world * chunk[bucket[0]]:
                    # In place: this rank's slice is already where the gather puts it.
                    flat, c = params[bucket[0]].view(-1), chunk[bucket[0]]
                    work.append((bucket, None, distributed.all_gather_flat(
                        flat, flat[rank * c:(rank + 1) * c], async_op=True)))
                    continue
                mine = torch.cat([_rows(p, chunk[i], world)[rank]
                                  for i, p in ((i, params[i]) for i in bucket)])
                received = mine.new_empty(world * mine.numel())
                work.append((bucket, received,
                             distributed.all_gather_flat(received, mine, async_op=True)))
            for bucket, received, handle in work:
                handle.wait()
                if received is None:
                    continue
                table, start = received.view(world, -1), 0
                for i in bucket:
                    p = params[i]
                    p.copy_(table[:, start:start + chunk[i]].reshape(-1)[:p.numel()].view_as(p))
                    start += chunk[i]

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self.sync.slices = []

    def state_dict(self):
        raise RuntimeError("ZeroAdamW's state is spread over the ranks: every rank calls "
                           "full_state_dict()")

    def full_state_dict(self) -> dict | None:
        """torch.optim.AdamW's state_dict over the whole layer on rank 0, None on the others
        (every rank must call it: one all-gather per state tensor, one tensor in flight)."""
        full = torch.optim.Optimizer.state_dict(self)   # the groups; the state is in `local`
        params, chunk, world = self.sync.params, self.sync.chunk, self.sync.world
        state = {}
        for i, (p, own) in enumerate(zip(params, self.own)):
            entry = {}
            for key, value in self.local.state.get(own, {}).items():
                if value.dim() == 0:   # the step count, the same on every rank
                    entry[key] = value.clone()
                    continue
                mine = value.new_zeros(chunk[i])
                mine[:value.numel()] = value
                table = value.new_empty(world * chunk[i])
                with distributed.collective("gathering the optimizer state"):
                    distributed.all_gather_flat(table, mine)
                entry[key] = table[:p.numel()].view_as(p).cpu()
            if entry:
                state[i] = entry
        if self.sync.rank != 0:
            return None
        full["state"] = state
        return full

    def load_state_dict(self, state_dict: dict) -> None:
        """AdamW's state over the whole layer (written by any number of ranks, sharded or not):
        this rank takes its slices (cut on the CPU: the whole state never reaches the GPU)."""
        groups = state_dict["param_groups"]
        super().load_state_dict({"state": {}, "param_groups": groups})
        mine = {}
        for i, (p, own) in enumerate(zip(self.sync.params, self.own)):
            start = own.storage_offset() - p.storage_offset()
            mine[i] = {key: value.clone() if value.dim() == 0 else
                       value.reshape(-1)[start:start + own.numel()].clone()
                       for key, value in state_dict["state"].get(i, {}).items()}
        self.local.load_state_dict({"state": {i: s for i, s in mine.items() if s},
                                    "param_groups": groups})


def build_optimizer(layer, cfg) -> torch.optim.Optimizer:
    """The trained layer's AdamW: sharded over the ranks with --optimizer-sharding zero1 on
    several; torch's own otherwise."""
    if distributed.world_size() > 1 and cfg.optimizer_sharding == "zero1":
        return ZeroAdamW(layer, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(layer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def gradient_sync(optimizer, layer) -> GradientSync | LocalGradient:
    """How one optimizer step sums the gradient: the sharded optimizer's own reduce-scatter, an
    all-reduce on several ranks, nothing on one."""
    if isinstance(optimizer, ZeroAdamW):
        return optimizer.sync
    if distributed.world_size() > 1:
        return GradientSync(layer, shard=False)
    return LocalGradient(layer)


def full_state_dict(optimizer) -> dict | None:
    """The optimizer's state as a checkpoint holds it (torch.optim.AdamW's format); None on the
    ranks other than 0 when it is sharded. Every rank calls it."""
    if isinstance(optimizer, ZeroAdamW):
        return optimizer.full_state_dict()
    return optimizer.state_dict()
