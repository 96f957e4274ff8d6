"""The layer probe: which single layer would one optimizer step improve the RL objective most?

From a few rollout batches b = 1..n of the base model (the trainer's own sampler, rewards and
group advantages), the loss gradient g_b = dL_b/dW of every weight matrix W of every block,
and per block k the first-order gain of one Adam-like step on that block alone:

    score(k) = sum over W in block k, over elements:  mean_b(g)^2 / sqrt(mean_b(g^2) + eps)

(g . the Adam direction m / sqrt(v), with m and v the batch mean of g and g^2: a noisy single
batch gradient counts less than one that points the same way in every batch.) The loss is the
policy loss at ratio 1 (old = current log-probs), whose gradient is the policy gradient.

How it stays within single-layer training's memory:
- dL/dW is never a parameter gradient: forward hooks on the block's linear modules (plain or
  bitsandbytes 4-bit, never un-quantised) keep their input x [T, in], and a hook on the output
  gets dL/dy [T, out]; dL/dW = dy^T x is reduced on the spot into three fp32 buffers per
  matrix (this batch's g, the sums of g and g^2).
- One block's statistics at a time: 12 bytes per weight of one block, where training that
  block holds 16 (fp32 master, gradient, AdamW m and v). Each block is a pass over the n
  batches: the blocks below it run without grad, the blocks from it upwards are recomputed one
  at a time from their cached inputs and backpropagated (activation checkpointing by hand),
  exactly the activations of single-layer training at that layer.
Cost: for block k, n forwards plus n backwards through blocks k..N-1: about N/2 times the
update work of a single-layer step per batch (seconds on the demo, minutes at 8B).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import TrainConfig
from .errors import UserError
from .model.load import AUTO_DEPTH
from .model.shared import FrozenModel, load_frozen
from .tasks.stream import TrainingRows

ADAM_EPS = 1e-16        # inside the sqrt: 1e-8 on the gradient's scale, as AdamW's eps
DEFAULT_BAND = (0.4, 0.6)
PROBE_BATCHES = 4       # rollout batches `--layer auto` and top-k average over


@dataclass
class ProbeResult:
    model: str
    task: str
    scores: list[float]          # per block, in block order
    batches: int
    rollouts: int                # sequences in all batches
    mean_reward: float
    seconds: float
    stats_peak_bytes: int        # the most bytes of gradient statistics held at once
    num_layers: int = field(init=False)

    def __post_init__(self):
        self.num_layers = len(self.scores)

    def ranking(self) -> list[int]:
        """Block indices, best first."""
        return sorted(range(self.num_layers), key=lambda i: -self.scores[i])

    def top(self, k: int) -> list[int]:
        return sorted(self.ranking()[:k])

    def band(self, band: tuple[float, float]) -> list[int]:
        """Blocks whose depth i / (N - 1) lies in the band; the nearest block when none does."""
        depth = max(self.num_layers - 1, 1)
        inside = [i for i in range(self.num_layers) if band[0] <= i / depth <= band[1]]
        return inside or [round((band[0] + band[1]) / 2 * depth)]

    def best_in_band(self, band: tuple[float, float] = DEFAULT_BAND) -> int:
        return max(self.band(band), key=lambda i: self.scores[i])

    def as_json(self) -> dict:
        return {**dataclasses.asdict(self), "ranking": self.ranking()}


def parse_band(text: str) -> tuple[float, float]:
    """'0.4-0.6' -> (0.4, 0.6): fractions of depth."""
    try:
        lo, hi = (float(x) for x in text.split("-"))
    except ValueError:
        raise UserError(f"--auto-band must be LOW-HIGH in fractions of depth (e.g. 0.3-0.7), not {text!r}")
    if not 0 <= lo <= hi <= 1:
        raise UserError(f"--auto-band {text}: need 0 <= LOW <= HIGH <= 1")
    return lo, hi


# ---------------------------------------------------------------------------------------------
# Gradient statistics from module hooks
# ---------------------------------------------------------------------------------------------

class BlockGradientStats:
    """Hooks on every linear module of one block that reduce dL/dW = dy^T x to fp32 sums of g
    and g^2 over batches, g being one batch's whole gradient (its micro-batches added first)."""

    def __init__(self, block: nn.Module):
        self.linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
        self.batch = [None] * len(self.linears)     # this batch's g, [out, in] fp32
        self.sum = [None] * len(self.linears)
        self.sum_sq = [None] * len(self.linears)
        self.batches = 0
        self.handles = [m.register_forward_hook(self._forward(j)) for j, m in enumerate(self.linears)]

    def _forward(self, j: int) -> Callable:
        def hook(module, args, out):
            if out.requires_grad:   # the pass with grad; no-grad passes keep nothing
                x = args[0].detach()
                out.register_hook(lambda dy: self._accumulate(j, x, dy))
        return hook

    def _accumulate(self, j: int, x: Tensor, dy: Tensor) -> None:
        # x [..., in], dy [..., out] -> dW [out, in] = sum over tokens of dy x^T, in fp32
        g = dy.reshape(-1, dy.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
        if self.batch[j] is None:
            self.batch[j] = g
        else:
            self.batch[j] += g

    def end_batch(self) -> None:
        for j, g in enumerate(self.batch):
            if g is None:
                continue
            self.sum[j] = g.clone() if self.sum[j] is None else self.sum[j].add_(g)
            self.sum_sq[j] = g.square() if self.sum_sq[j] is None else self.sum_sq[j].add_(g.square())
        self.batches += 1

    def held_bytes(self) -> int:
        return sum(t.numel() * 4 for ts in (self.batch, self.sum, self.sum_sq) for t in ts if t is not None)

    def reset_batch(self) -> None:
        self.batch = [None] * len(self.linears)

    def score(self) -> float:
        """sum over the block's matrices of mean(g)^2 / sqrt(mean(g^2) + eps)."""
        n = max(self.batches, 1)
        total = 0.0
        for s, s2 in zip(self.sum, self.sum_sq):
            if s is not None:
                total += ((s / n).square() / (s2 / n + ADAM_EPS).sqrt()).sum().item()
        return total

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# One backward pass from the loss down to a block
# ---------------------------------------------------------------------------------------------

@dataclass
class ProbeBatch:
    rollout: object              # onelayer.rollout.Rollout
    token_advantages: Tensor     # [B, C]
    rewards: Tensor              # [B]


def backward_to(split, batch: ProbeBatch, objective, lowest: int, micro_batch: int,
                compute_dtype: torch.dtype) -> None:
    """The policy loss of `batch` at ratio 1, backpropagated from the final hidden states down
    to the input of block `lowest`, block by block from cached inputs (the module hooks see
    every block's forward with grad from `lowest` up)."""
    from .update import completion_tokens, micro_batches

    rollout = batch.rollout
    num_seqs = rollout.sequences.shape[0]
    num_tokens = rollout.completion_mask.sum()
    weight, bias = split.head()
    for rows in micro_batches(torch.arange(num_seqs, device=rollout.sequences.device), micro_batch):
        ctx = split.context(rollout.attention_mask[rows], compute_dtype)
        inputs = []                                  # inputs of blocks lowest.., [b, S, H] each
        with torch.no_grad():
            h = split._embed(rollout.sequences[rows])
            for i in range(split.num_layers):
                if i >= lowest:
                    inputs.append(h)
                h = split._block(i, h, ctx)
        top = h.detach().requires_grad_()
        mask, targets, seq_ids = completion_tokens(rollout, rows)
        hidden = split.norm(top)[:, rollout.prompt_len - 1:-1][mask.bool()]
        transform = dict(temperature=objective.temperature, logit_scale=split.logits.scale,
                         softcap=split.logits.softcap)
        old = objective.logprobs_fn(hidden.detach(), weight, targets, bias, **transform)
        loss, _ = objective.loss_fn(
            hidden, weight, targets, old, batch.token_advantages[rows][mask],
            torch.ones_like(targets, dtype=torch.float32), seq_ids, None, bias, **transform,
            eps_low=objective.eps_low, eps_high=objective.eps_high, beta=0.0,
            aggregation=objective.aggregation, max_len=objective.max_len, num_seqs=num_seqs,
            num_tokens=num_tokens)
        loss.backward()
        grad = top.grad
        for i in reversed(range(lowest, split.num_layers)):
            x = inputs.pop().detach().requires_grad_()
            with torch.enable_grad():
                y = split._block(i, x, ctx)
            y.backward(grad)
            grad = x.grad
            del x, y


# ---------------------------------------------------------------------------------------------
# The probe
# ---------------------------------------------------------------------------------------------

def sample_batches(base: FrozenModel, task, cfg: TrainConfig, batches: int, objective) -> list[ProbeBatch]:
    """`batches` rollout batches of the base model, drawn as `onelayer train` draws its first."""
    from .prompting import prompt_fits
    from .single_turn import prompt_style, sample_and_score

    fits = prompt_fits(base.tokenizer, task, prompt_style(cfg), cfg.max_prompt_tokens)
    rows = TrainingRows(task.train, cfg.seed, fits)
    generator = torch.Generator(base.device).manual_seed(cfg.seed)
    policy = base.policy()
    out = []
    for _ in range(batches):
        scored = sample_and_score(policy, task, rows.take(cfg.prompts_per_step), cfg, rows.take,
                                  generator=generator)
        advantages = objective.advantages_fn(scored.rewards.to(base.device), scored.group_ids.to(base.device),
                                             mode=objective.advantage_mode)
        out.append(ProbeBatch(scored.rollout, advantages[:, None].expand_as(scored.rollout.completion_mask),
                              scored.rewards))
    return out


def run_probe(cfg: TrainConfig, *, batches: int | None = None, base: FrozenModel | None = None,
              progress: bool = True) -> ProbeResult:
    """Score every block of cfg.model on cfg.task (see the module docstring)."""
    from .single_turn import load_training_task
    from .train import fit_batches
    from .update import build_objective

    batches = PROBE_BATCHES if batches is None else batches
    if batches < 1:
        raise UserError("--batches must be >= 1")
    if cfg.env:
        raise UserError("the probe scores single-turn tasks; multi-turn --env runs are not supported")
    t0 = time.perf_counter()
    # The probe needs what training layer 0 needs (every block's input cached): its micro-batch
    # is the memory plan's for that run where the plan chooses batch sizes (CUDA, --max-memory).
    cfg = fit_batches(dataclasses.replace(cfg, layer="0"), lambda line: None)
    torch.manual_seed(cfg.seed)
    task = load_training_task(cfg)
    base = base or load_frozen(cfg.model, frozen_dtype=cfg.frozen_dtype, device=cfg.device, attn=cfg.attn)
    # The single-layer objective: its loss gives the hidden states (not lm_head) a gradient.
    objective = build_objective(dataclasses.replace(cfg, layer="0"), base.device)
    data = sample_batches(base, task, cfg, batches, objective)
    split = base.split()
    scores, peak = [], 0
    for i in tqdm(range(split.num_layers), desc="probe", disable=not progress, leave=False):
        stats = BlockGradientStats(split.blocks[i])
        try:
            for batch in data:
                backward_to(split, batch, objective, i, cfg.micro_batch, base.compute_dtype)
                stats.end_batch()
                peak = max(peak, stats.held_bytes())
                stats.reset_batch()
            scores.append(stats.score())
        finally:
            stats.remove()
    rewards = torch.cat([b.rewards for b in data])
    return ProbeResult(cfg.model, cfg.task, scores, batches, len(rewards), rewards.mean().item(),
                       time.perf_counter() - t0, peak)


def format_ranking(result: ProbeResult, band: tuple[float, float] = DEFAULT_BAND) -> str:
    """The ranking as a table, and what `auto` picks."""
    top = max(result.scores) or 1.0
    inside = set(result.band(band))
    lines = [f"probe of {result.model} on {result.task}: {result.batches} rollout batches "
             f"({result.rollouts} completions, mean reward {result.mean_reward:.3f}), "
             f"{result.seconds:.1f} s", "rank  layer  depth  score (relative)"]
    for rank, i in enumerate(result.ranking(), 1):
        depth = i / max(result.num_layers - 1, 1)
        lines.append(f"{rank:>4}  {i:>5}  {depth:>5.0%}  {result.scores[i] / top:.3f}"
                     f"{'  <- band' if i in inside else ''}")
    lines.append(f"auto (best in depth band {band[0]:.0%}-{band[1]:.0%}): layer {result.best_in_band(band)}")
    return "\n".join(lines)


def probe_choice(cfg: TrainConfig, echo: Callable[[str], None] = print) -> TrainConfig:
    """`--layer auto` (or `auto:LOW-HIGH`, a wider depth band) and `--layer top-k`: run the
    probe and return cfg with the chosen block indices. Where the probe cannot run (a multi-turn
    --env), `auto` keeps the depth prior (AUTO_DEPTH) and top-k is refused. Any other --layer is
    returned unchanged."""
    spec = str(cfg.layer).strip().lower()
    if not (spec == "auto" or spec.startswith(("auto:", "top-"))):
        return cfg
    if cfg.env:
        if spec.startswith("top-"):
            raise UserError(f"--layer {cfg.layer}: the probe scores single-turn tasks only; "
                            "name the layers for a multi-turn --env")
        echo(f"--layer auto: the probe cannot score a multi-turn --env; using the depth prior "
             f"({AUTO_DEPTH:.0%} of depth)")
        return dataclasses.replace(cfg, layer="auto")
    band = parse_band(spec.partition(":")[2]) if spec.startswith("auto:") else DEFAULT_BAND
    k = 0
    if spec.startswith("top-"):
        try:
            k = int(spec[4:])
        except ValueError:
            raise UserError(f"--layer {cfg.layer}: top-k needs a whole number k")
    result = run_probe(cfg, progress=False)
    if not 1 <= k <= result.num_layers and spec.startswith("top-"):
        raise UserError(f"--layer {cfg.layer}: k must be 1..{result.num_layers}")
    echo(format_ranking(result, band))
    layers = result.top(k) if k else [result.best_in_band(band)]
    echo(f"--layer {cfg.layer}: the probe chose {', '.join(map(str, layers))} in {result.seconds:.1f} s")
    return dataclasses.replace(cfg, layer=",".join(map(str, layers)))
