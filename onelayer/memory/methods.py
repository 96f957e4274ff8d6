"""Plans of a step: onelayer, and QLoRA and full-parameter RL as TRL runs them; what fits."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import UserError
from .parts import (GiB, LORA_RANK, ModelDims, Part, Phase, Plan, Workload, block_backward_per_token, context_part,
                    decoder_phases, dequant_part, forward_per_token, frozen_block_bytes, hf_generate_phases, largest_weight,
                    loss_parts, norm_per_token, rollout_part, saved_per_token)

# ---------------------------------------------------------------------------------------------
# onelayer
# ---------------------------------------------------------------------------------------------

def _onelayer_state(dims: ModelDims, w: Workload) -> tuple[list[Part], list[Part], Part, int]:
    """(steady parts without the gradient, those of them that a rollout does not read, the fp32
    gradient, trainable params). A rollout reads the frozen blocks, the embeddings and the
    trained layer's compute copy (the fp32 master itself in fp32)."""
    c, n, shards = w.c, dims.block_params, w.optimizer_shards
    embeddings = dims.vocab * dims.hidden * (1 if dims.tied else 2)
    frozen = Part(f"frozen blocks, {w.frozen} ({dims.layers - 1} x {dims.block_params / 1e6:.0f} M)",
                  (dims.layers - 1) * frozen_block_bytes(dims, w.frozen, c), "weights", True)
    master = Part(f"layer {w.layer}: fp32 master weights", 4 * n, "state", True)
    adamw = Part(f"layer {w.layer}: AdamW m + v (fp32" + (f", 1/{shards}: zero1" if shards > 1 else "") + ")",
                 -(-8 * n // shards), "state", True)
    parts = [frozen,
             Part("embeddings + lm_head" + (" (tied)" if dims.tied else "") + f" ({w.compute})",
                  (embeddings + dims.hidden) * c, "weights", True),
             master, adamw]
    update_only = [adamw] if c == 4 else [master, adamw]
    if c != 4:
        parts.append(Part(f"layer {w.layer}: {w.compute} compute copy", c * n, "state", True))
    if w.beta > 0:
        parts.append(Part(f"reference layer ({w.compute})", c * n, "state", True))
        update_only.append(parts[-1])
    return parts, update_only, Part(f"layer {w.layer}: gradient (fp32)", 4 * n, "state", True), n


def _logprob_phase(dims: ModelDims, w: Workload, steady: list[Part], cache: Part) -> Phase:
    """Prefix pass (inference mode, into the h_L cache) and the old / reference log-prob passes,
    a micro-batch at a time. The largest of three moments: a block's forward (the micro-batch's
    copy of h_L rows is the first block's input, and the callee's alone: it goes when the next
    block's output replaces it); the final norm's output beside the completion states [T, H]
    it selects; those states beside the log-prob buffers. The masks and rotary tables live
    through the first two, not the third (the pass that made them has returned); an NF4 weight
    is dequantised in the first alone."""
    tok, tokens, c, h = w.mb * w.seq, w.mb * w.new_tokens, w.c, dims.hidden
    context = context_part(dims, w, w.mb, w.seq, "micro-batch")
    moments = {"blocks": ([context, *dequant_part(dims, w)],
                          tok * max(forward_per_token(dims, c, w.seq, w.padded), norm_per_token(dims, c))),
               "head": ([context], tok * h * c + tokens * h * c),
               "log-probs": ([], tokens * h * c + loss_parts(dims, w, tokens, "logprobs")[0].bytes)}
    label = max(moments, key=lambda k: sum(p.bytes for p in moments[k][0]) + moments[k][1])
    beside, working_set = moments[label]
    return Phase("log-probs", (*steady, cache, rollout_part(w), *beside,
                               Part(f"pass working set (largest moment: {label})", working_set, "activations")))


def plan_onelayer(dims: ModelDims, w: Workload) -> Plan:
    w.check(dims)
    c = w.c
    state, update_only, grad, n = _onelayer_state(dims, w)
    # --offload-optimizer: what only the update reads waits in host memory during rollouts (on
    # CUDA; on a CPU run nothing moves).
    offloaded = w.offload_optimizer and w.device == "cuda"
    rollout_state = [p for p in state if p not in update_only] if offloaded else state
    cache = Part(f"h_L cache ({w.rows} x {w.seq} x {dims.hidden}, {w.compute})",
                 w.rows * w.seq * dims.hidden * c, "activations")
    # h_L and the rollout stay to the optimizer step.
    kept = [cache, rollout_part(w)]
    # zero1: the reduce-scatter delivers this process's slice of the summed gradient during the
    # last backward; it lives beside the whole local gradient until the optimizer step ends.
    slices = ([Part(f"zero1: 1/{w.optimizer_shards} of the summed gradient (fp32)",
                    -(-4 * n // w.optimizer_shards), "state")] if w.optimizer_shards > 1 else [])
    phases = [*decoder_phases(dims, w, rollout_state), _logprob_phase(dims, w, state, cache),
              *_update_phases(dims, w, state, grad, slices, kept, shared=0)]
    # Minibatch rows come in a random order, so a micro-batch of at most G rows may hold one
    # group alone: its prompt then runs once (update.common_prefix_of: all of it but the last
    # token, when it is long enough to be worth it), which needs more memory than the rows' own
    # copies when there are few rows.
    if 2 <= w.mb <= w.group_size and w.prompt_tokens > 1:
        phases += _update_phases(dims, w, state, grad, slices, kept, shared=w.prompt_tokens - 1)
    phases.append(Phase("optimizer", (*state, grad, *slices, *kept, _adamw_part(dims, w))))
    return Plan(f"onelayer (layer {w.layer}, {w.frozen} frozen)", n, tuple(phases), w.device)


def _update_phases(dims: ModelDims, w: Workload, state: list[Part], grad: Part, slices: list[Part],
                   kept: list[Part], *, shared: int) -> list[Phase]:
    """The moments of one micro-batch's forward and backward from layer L. shared: the tokens
    every row of the micro-batch begins with, run once as a row of their own whose blocks keep
    their activations (SplitModel.from_layer_shared); 0 when the rows share none.

    Every moment keeps the masks and rotary tables (checkpointing keeps its arguments), and
    until the loss's backward has run, the completion states it was given. Layer L computes with
    its compute copy (TrainableLayer.policy_params): no second copy of its weights. Every block
    from L on is checkpointed but a last one (SplitModel.recomputed): layer L's activations exist
    only during its own backward, or, when it is the last block, from its forward on."""
    c, mb, h, tokens = w.c, w.mb, dims.hidden, w.mb * w.new_tokens
    own = w.seq - shared                      # each row's own tokens
    tok = mb * own
    suffix = dims.layers - 1 - w.layer
    recomputed = suffix > 0
    # The rows' own tokens attend to the shared ones through an explicit mask, always.
    masked = w.padded or shared > 0
    sharing = f", {mb} rows sharing a {shared}-token prompt" if shared else ""
    if shared:
        # The rows' masks over every key [mb, 1, own, seq] are views of the whole [mb, 1, seq, seq];
        # the shared row's positions and rotary tables are its own.
        context = Part("positions, rotary, mask (micro-batch: the rows' own tokens, the shared ones)",
                       mb * own * (8 + 2 * dims.head_dim * c) + mb * w.seq * w.seq
                       + shared * (8 + 2 * dims.head_dim * c), "activations")
        # Each recomputed block's attention repeats the shared keys and values for every row
        # (and, with the mask, to every query head).
        shared_keys = [Part("the shared tokens' keys and values, repeated for every row", 2 * c * dims.q_dim * mb * shared,
                            "activations")]
        shared_saved = [Part(f"the shared row's saved activations (layer {w.layer} and the {suffix} after it, "
                             f"{shared} tokens)", shared * (saved_per_token(dims, c, shared, False, "trained")
                                                           + suffix * saved_per_token(dims, c, shared, False, "frozen")),
                             "activations")]
        shared_at_layer = [Part(f"the shared row's saved activations (layer {w.layer}, {shared} tokens)",
                                shared * saved_per_token(dims, c, shared, False, "trained"), "activations")]
    else:
        context = context_part(dims, w, mb, w.seq, "micro-batch")
        shared_keys, shared_saved, shared_at_layer = [], [], []
    base = [*kept, context]
    completion = Part(f"completion hidden states ({tokens} x {h})", tokens * h * c, "activations")
    layer_saved = tok * saved_per_token(dims, c, w.seq, masked, "trained")
    saved_from_forward = ([] if recomputed else
                          [Part(f"layer {w.layer}: saved activations ({tok} tokens)", layer_saved, "activations")])
    checkpointed = ([Part(f"checkpointed block inputs (layer {w.layer} and the {suffix} after it)",
                          (suffix + 1) * tok * h * c, "activations")] if recomputed else [])
    norm_saved = Part("final norm: saved fp32 input", tok * (4 * h + 4), "activations")
    block_grads = Part("block backward gradients", tok * block_backward_per_token(dims, c), "activations")
    # The forward ends with the micro-batch's h_L rows and the final norm's output beside the
    # states it selects, or with the loss's forward buffers.
    head = max(2 * tok * h * c, loss_parts(dims, w, tokens, "forward")[0].bytes)
    # The engine frees the gradient after each optimizer step; with several micro-batches per
    # minibatch, the one accumulated so far is alive while the next micro-batch runs.
    grad_in_backward = [grad] if mb < w.minibatch_rows else []
    until_loss_bwd = (*state, *grad_in_backward, *base, *saved_from_forward, *checkpointed, *shared_saved,
                      norm_saved, completion)
    phases = [Phase(f"update: forward{sharing}", (
                  *until_loss_bwd, Part("head: h_L rows + norm output, or loss buffers", head, "activations"))),
              Phase(f"update: loss bwd{sharing}", (*until_loss_bwd, *loss_parts(dims, w, tokens, "backward")))]
    if suffix:
        phases.append(Phase(f"update: suffix bwd{sharing}", (
            *state, *grad_in_backward, *base, *checkpointed, *shared_saved, block_grads, *dequant_part(dims, w),
            *shared_keys, Part("suffix block recomputed: saved activations",
                               tok * saved_per_token(dims, c, w.seq, masked, "frozen"), "activations"))))
    # Layer L's backward, at two moments. At its MLP's product, where the activation gradients
    # peak: the saved activations less the down projection's input (used and freed), and of the
    # parameters' gradients only the down projection's when this micro-batch begins the
    # minibatch (the hook of TrainableLayer.policy_params creates each as the backward reaches
    # it; its compute-dtype gradient is freed once added), else the whole accumulated one.
    # After the MLP: every gradient, beside at most the attention half's saved activations, the
    # gradients flowing in and out of the block, and one weight gradient in the compute dtype.
    # The shared row's later blocks have had their backward by then.
    labelled = f"layer {w.layer}: saved activations{', recomputed' if recomputed else ''} ({tok} tokens)"
    down_grad = Part(f"layer {w.layer}: the down projection's gradient (fp32)", 4 * h * dims.intermediate,
                     "state", True)
    checkpointed_input = ([Part(f"layer {w.layer}: checkpointed input", tok * h * c, "activations")]
                          if recomputed else [])
    at_layer = (*base, *checkpointed_input, *shared_at_layer, *shared_keys)
    phases.append(Phase(f"update: layer bwd, MLP{sharing}", (
        *state, grad if grad_in_backward else down_grad, *slices, *at_layer, block_grads,
        Part(f"{labelled}, less the down projection's input", layer_saved - tok * c * dims.intermediate,
             "activations"))))
    phases.append(Phase(f"update: layer bwd, attention{sharing}", (
        *state, grad, *slices, *at_layer,
        Part(f"{labelled}, less the MLP's", layer_saved - 4 * tok * c * dims.intermediate, "activations"),
        Part("gradients into and out of the block", 2 * tok * h * c, "activations"),
        Part(f"a weight gradient in {w.compute}", largest_weight(dims) * c, "activations"))))
    return phases


def _adamw_part(dims: ModelDims, w: Workload) -> Part:
    """torch AdamW. CUDA: the foreach path makes sqrt(v) for all the layer's parameters at once
    (fp32; with zero1, for this process's slices). CPU: the single-tensor loop makes sqrt(v) and
    the denominator per tensor and keeps the previous tensor's denominator until the next
    replaces it (3 of the largest matrix)."""
    size = (-(-4 * dims.block_params // w.optimizer_shards) if w.device == "cuda"
            else 3 * 4 * largest_weight(dims))
    return Part("AdamW temporaries", size, "activations")


# ---------------------------------------------------------------------------------------------
# TRL's QLoRA and full-parameter GRPO (the anchors of BENCHMARKS.md)
# ---------------------------------------------------------------------------------------------

def _trl_loss_parts(dims: ModelDims, w: Workload, tokens: int, weight_grad: bool) -> list[Part]:
    """TRL 1.16's fused LM head (trl.kernels.ChunkedLogProbFunction): a [min(T, 4096), 32768]
    logit tile in the compute dtype, the hidden-state gradient accumulated in fp32, and for a
    trained lm_head an fp32 [V, H] weight gradient before its cast. No [B, T, V] logits."""
    parts = [Part("fused LM head: logit tile", min(tokens, 4096) * min(dims.vocab, 32768) * w.c, "activations"),
             Part("fused LM head: hidden states + fp32 gradient", tokens * dims.hidden * (w.c + 4), "activations")]
    if weight_grad:
        parts.append(Part("fused LM head: fp32 lm_head gradient", 4 * dims.vocab * dims.hidden, "activations"))
    return parts


def _trl_plan(dims: ModelDims, w: Workload, method: str, state: list[Part], grads: Part,
              trainable: int, block_kind: str, checkpointing: bool) -> Plan:
    c, tok, tokens = w.c, w.mb * w.seq, w.mb * w.new_tokens
    saved = Part(f"saved activations, {'one block' if checkpointing else f'{dims.layers} blocks'}",
                 tok * saved_per_token(dims, c, w.seq, w.padded, block_kind) * (1 if checkpointing else dims.layers),
                 "activations")
    common = [context_part(dims, w, w.mb, w.seq, "batch"),
              Part("final norm: saved fp32 input", tok * (4 * dims.hidden + 4), "activations")]
    if checkpointing:
        common.append(Part(f"checkpointed block inputs ({dims.layers} blocks)",
                           dims.layers * tok * dims.hidden * c, "activations"))
    full = block_kind == "full"
    phases = [*hf_generate_phases(dims, w, state),
              Phase("loss bwd", (*state, *common, *([] if checkpointing else [saved]),
                                 *_trl_loss_parts(dims, w, tokens, weight_grad=full)))]
    # The last block's backward (recomputed when checkpointing); with every weight trained, the
    # gradients exist by the optimizer step, when activations are gone.
    phases.append(Phase("block bwd", (*state, *common, saved,
                                      Part("block backward gradients", tok * block_backward_per_token(dims, c),
                                           "activations"),
                                      *(dequant_part(dims, w) if block_kind == "lora" else []))))
    phases.append(Phase("optimizer", (*state, grads)))
    return Plan(method, trainable, tuple(phases), w.device)


def plan_qlora(dims: ModelDims, w: Workload) -> Plan:
    """PEFT LoRA r16 on the 7 linears of every block over an NF4 base (embeddings and lm_head in
    bf16), adapters in fp32, fused AdamW, gradient checkpointing on every block."""
    w.check(dims)
    lora = dims.layers * LORA_RANK * sum(o + i for o, i in dims.linears())
    embeddings = dims.vocab * dims.hidden * (1 if dims.tied else 2)
    state = [Part(f"NF4 blocks ({dims.layers} x {dims.block_params / 1e6:.0f} M)",
                  dims.layers * frozen_block_bytes(dims, "nf4", w.c), "weights", True),
             Part(f"embeddings + lm_head ({w.compute})", (embeddings + dims.hidden) * w.c, "weights", True),
             Part(f"LoRA adapters r{LORA_RANK} (fp32) + AdamW m + v", 12 * lora, "state", True)]
    grads = Part("LoRA gradients (fp32)", 4 * lora, "state", True)
    return _trl_plan(dims, w, f"QLoRA r{LORA_RANK} all-linear (TRL 1.16, checkpointing)", state, grads, lora,
                     "lora", checkpointing=True)


def plan_full(dims: ModelDims, w: Workload, *, checkpointing: bool) -> Plan:
    """Every parameter trained in bf16 with AdamW states in bf16 (TRL's default for a bf16 model);
    a bf16 reference model when beta > 0."""
    w.check(dims)
    n = dims.params
    state = [Part(f"weights ({w.compute})", n * w.c, "weights", True),
             Part(f"AdamW m + v ({w.compute})", 2 * n * w.c, "state", True)]
    if w.beta > 0:
        state.append(Part(f"reference model ({w.compute})", n * w.c, "weights", True))
    grads = Part(f"gradients ({w.compute})", n * w.c, "state", True)
    label = f"full-parameter {w.compute} AdamW (TRL 1.16, {'checkpointing' if checkpointing else 'no checkpointing'})"
    return _trl_plan(dims, w, label, state, grads, n, "full", checkpointing)


def plan_all(dims: ModelDims, w: Workload) -> list[Plan]:
    """onelayer as configured; QLoRA and full-parameter RL on the same workload in the compute
    dtype on CUDA (how TRL runs them)."""
    trl = dataclasses.replace(w, compute="bf16", device="cuda")
    return [plan_onelayer(dims, w), plan_qlora(dims, trl),
            plan_full(dims, trl, checkpointing=True), plan_full(dims, trl, checkpointing=False)]


# ---------------------------------------------------------------------------------------------
# What fits
# ---------------------------------------------------------------------------------------------

def largest_fit(dims: ModelDims, w: Workload, budget: int, knob: str, limit: int) -> int:
    """Largest value <= limit of `knob` (new_tokens or group_size) for which onelayer's peak
    reserved memory fits `budget`; 0 when even 1 does not. Memory grows with either knob, so an
    exponential search brackets the answer and a binary search finds it."""
    def fits(value: int) -> bool:
        return plan_onelayer(dims, dataclasses.replace(w, **{knob: value})).fits(budget)

    if limit < 1 or not fits(1):
        return 0
    good, bad = 1, 2
    while bad <= limit and fits(bad):
        good, bad = bad, bad * 2
    bad = min(bad, limit + 1)
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


@dataclass(frozen=True)
class BatchChoice:
    """Sequences per forward/backward and rows per generate call that fit a budget."""
    micro_batch: int
    generation_batch: int
    plan: Plan


def choose_batches(dims: ModelDims, w: Workload, budget: int) -> BatchChoice:
    """The largest micro-batch and generation batch (whole groups) whose step fits `budget`
    bytes (reserved).

    Generation batch sizes only the prefill and decode phases, the micro-batch only the others,
    so each is the largest that fits with the other at 1. A step that cannot fit at 1 and 1
    raises UserError naming the knob to change and by how much, before any weight is loaded."""
    def fit(knob: str, limit: int) -> int:
        trial = dataclasses.replace(w, micro_batch=1, generation_batch=1)
        return largest_fit(dims, trial, budget, knob, limit)

    micro, generation = fit("micro_batch", w.minibatch_rows), fit("generation_batch", w.rows)
    generation = generation // w.group_size * w.group_size   # whole groups: what a call generates
    if micro and generation:
        chosen = dataclasses.replace(w, micro_batch=micro, generation_batch=generation)
        return BatchChoice(micro, generation, plan_onelayer(dims, chosen))
    raise UserError(_what_to_change(dims, dataclasses.replace(w, micro_batch=1, generation_batch=1), budget))


def _what_to_change(dims: ModelDims, w: Workload, budget: int) -> str:
    """One line: the knob that makes a step fit, with the value that does."""
    plan = plan_onelayer(dims, w)
    need = f"{plan.reserved / GiB:.1f} GiB needed, {budget / GiB:.1f} GiB available"
    if (w.device == "cuda" and not w.offload_optimizer
            and plan_onelayer(dims, dataclasses.replace(w, offload_optimizer=True)).fits(budget)):
        return (f"{need} even one sequence at a time: add --offload-optimizer (the trained layer's "
                "optimizer state waits in host memory while rollouts run)")
    tokens = largest_fit(dims, w, budget, "new_tokens", w.new_tokens - 1)
    if tokens:
        return f"{need} even one sequence at a time: lower --max-new-tokens from {w.new_tokens} to {tokens}"
    steady = sum(p.bytes for p in plan.phases[0].parts if p.steady)
    if w.frozen != "nf4":
        return f"{need}: weights and layer state alone take {steady / GiB:.1f} GiB; use --frozen-dtype nf4"
    return (f"{need}: weights and layer state alone take {steady / GiB:.1f} GiB; use a smaller model or a "
            f"GPU with more memory")
