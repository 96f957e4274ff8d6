"""The memory planner: the peak memory of one training step, part by part, from config.json alone.

A step is a sequence of moments (phases); at each, a known set of tensors is alive:

    prefill, decode            frozen weights + layer state + KV cache (onelayer's static decoder holds
                               it whole from the prefill on; TRL's HF generate grows it by torch.cat)
    log-probs                  + h_L cache [B, S, H]; a micro-batch through layer L, the suffix, the head
    update: forward / loss bwd + checkpointed block inputs (layer L and the suffix), loss buffers
    update: suffix bwd         + one suffix block recomputed (checkpointing) and its backward
    update: layer bwd, MLP     + layer L recomputed, its MLP's backward (of the fp32 gradients,
                               the down projection's alone in a minibatch's first micro-batch)
    update: layer bwd, attention
                               + the rest of its backward, beside every fp32 gradient
    update: ..., rows sharing  the same moments for a micro-batch of one group's rows, whose
                               prompt runs once as a row that keeps its activations
    optimizer                  + AdamW temporaries

Each phase's bytes are the sum of its parts; the peak is the largest phase. The counts of saved
activations per token follow what autograd keeps for a transformers Qwen3/Llama block with
torch SDPA (derived in `saved_per_token`; benchmarks/validate_memory.py checks them against a
tensor-by-tensor tracker of real steps). Reserved memory adds allocator slack: a fraction of the
bytes allocated within the step (calibrated on the H100 measurement in benchmarks/RESULTS.md).

The same model describes QLoRA (PEFT r16 on every linear, NF4 base) and full-parameter RL as
TRL 1.16's GRPOTrainer runs them (HF generate, gradient checkpointing, its fused tiled LM head,
fused AdamW), the setups of the anchors in BENCHMARKS.md.

    parts.py     the model's shape, the workload, parts / phases / plans, per-token counts
    methods.py   the plans of onelayer, QLoRA and full-parameter RL; what fits
    report.py    the `plan` command: config.json, the Markdown report, JSON
"""
from .methods import BatchChoice, choose_batches, largest_fit, plan_all, plan_full, plan_onelayer, plan_qlora
from .parts import GiB, ModelDims, Part, Phase, Plan, Workload, nf4_bytes, saved_per_token
from .report import (CUDA_CONTEXT, Report, batches_for_run, build_report, format_plan, parse_size, plan_command,
                     read_model_config, report_json, workload_from_config)

__all__ = ["BatchChoice", "CUDA_CONTEXT", "GiB", "ModelDims", "Part", "Phase", "Plan", "Report", "Workload",
           "batches_for_run", "build_report", "choose_batches", "format_plan", "largest_fit", "nf4_bytes", "parse_size", "plan_all",
           "plan_command", "plan_full", "plan_onelayer", "plan_qlora", "read_model_config", "report_json",
           "saved_per_token", "workload_from_config"]
