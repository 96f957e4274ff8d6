"""The `plan` command: the model's config.json (local or hub), the workload of a train config,
a Markdown report (or JSON)."""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .methods import BatchChoice, choose_batches, largest_fit, plan_all
from .parts import GiB, ModelDims, Plan, Workload

# A CUDA context (driver, kernels) takes memory that torch does not count: ~0.5 GiB with
# torch 2.11 on an H100. `--gpu-memory` is the card's size; tensors get the rest.
CUDA_CONTEXT = GiB // 2
SIZE_UNITS = {"": GiB, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": GiB, "tib": 2**40}


def parse_size(text: str) -> int:
    """'24GiB', '22.5 GB', '24000MiB', '24' (GiB) -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match and SIZE_UNITS.get(match.group(2).lower())
    if not unit:
        raise UserError(f"memory size {text!r}: expected a number with a unit such as 24GiB, 22.5GB or 24000MiB")
    return int(float(match.group(1)) * unit)


def read_model_config(model: str) -> dict:
    """config.json of the demo, a local model directory, a config.json file, or a hub id (only
    config.json is downloaded)."""
    from ..model.load import DEMO_MODEL, DEMO_PATH

    path = Path(model).expanduser()
    if model == DEMO_MODEL:
        path = DEMO_PATH / "config.json"
    elif path.is_dir():
        path = path / "config.json"
    elif not path.is_file():
        if model.count("/") != 1 or model.startswith((".", "/")):
            raise UserError(f"model {model!r} is neither a model directory, a config.json nor a hub id")
        from huggingface_hub import hf_hub_download
        try:
            path = Path(hf_hub_download(model, "config.json"))
        except Exception as exc:  # hub errors have many types; all mean "cannot get this config"
            raise UserError(f"cannot get config.json of {model!r} from the hub: {str(exc).splitlines()[0]}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read a JSON model config ({exc})")


# Without --max-prompt-tokens a plan assumes prompts this long (chat-templated math prompts are
# 100-300 tokens; GSM8K's longest ~400).
DEFAULT_PROMPT_TOKENS = 512


def planned_prompt_tokens(cfg, dims: ModelDims) -> int:
    """The prompt length a plan assumes: --max-prompt-tokens, else DEFAULT_PROMPT_TOKENS, or
    what the model's positions leave beside the completions when that is less (a model of 64
    positions, such as the demo's, is never planned with 512-token prompts)."""
    if cfg.max_prompt_tokens:
        return cfg.max_prompt_tokens
    return max(1, min(DEFAULT_PROMPT_TOKENS, dims.max_positions - cfg.max_new_tokens))


def workload_from_config(cfg, dims: ModelDims, *, prompt_tokens: int | None = None, micro_batch: int = 0,
                         generation_batch: int = 0, processes: int = 1) -> Workload:
    """The Workload of a `onelayer train` run configuration (onelayer.config.TrainConfig) on
    each of `processes` data-parallel GPUs: its share of the prompts and of each minibatch
    (--micro-batch and --generation-batch are per GPU already), with prompts of
    `prompt_tokens` (None: `planned_prompt_tokens`). The planner models one trained layer:
    several (`3,5`, `mid-k`, `all`) are refused."""
    from ..model.load import resolve_layer, resolve_layers

    if len(resolve_layers(cfg.layer, dims.layers)) > 1:
        raise UserError(f"--layer {cfg.layer}: the memory plan models one trained layer (its "
                        "'full-parameter' rows are TRL's bf16 AdamW, less than onelayer's fp32 "
                        "--layer all)")
    if processes < 1:
        raise UserError("--gpus must be >= 1")
    if cfg.prompts_per_step % processes or cfg.minibatch % processes:
        raise UserError(f"--prompts-per-step {cfg.prompts_per_step} and --minibatch "
                        f"{cfg.minibatch} must be multiples of the {processes} GPUs")

    device = "cpu" if str(cfg.device or "cuda").startswith("cpu") else "cuda"
    frozen = cfg.frozen_dtype or ("nf4" if device == "cuda" else "fp32")
    # As onelayer.model.load.compute_dtype_for: NF4 computes in bf16 on GPU, fp32 on CPU.
    compute = "bf16" if frozen == "bf16" or (frozen == "nf4" and device == "cuda") else "fp32"
    loss = "triton" if cfg.loss_impl == "triton" or (cfg.loss_impl == "auto" and device == "cuda") else "torch"
    return Workload(prompts=cfg.prompts_per_step // processes, group_size=cfg.group_size,
                    prompt_tokens=prompt_tokens or planned_prompt_tokens(cfg, dims),
                    new_tokens=cfg.max_new_tokens, layer=resolve_layer(cfg.layer, dims.layers),
                    micro_batch=micro_batch or cfg.micro_batch,
                    generation_batch=generation_batch or cfg.generation_batch,
                    minibatch=cfg.minibatch // processes, beta=cfg.beta, frozen=frozen, compute=compute,
                    device=device,
                    loss_impl=loss, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                    optimizer_shards=processes if cfg.optimizer_sharding == "zero1" else 1,
                    offload_optimizer=cfg.offload_optimizer)


def batches_for_run(cfg, budget: int) -> tuple[BatchChoice, int]:
    """For `onelayer train --max-memory`, before any weight is loaded: the largest micro-batch and
    generation batch whose step fits `budget` bytes (reserved), and the prompt length the plan
    assumed; or a UserError that names the knob to change and by how much."""
    from .. import distributed

    dims = ModelDims.from_config(read_model_config(cfg.model), cfg.model)
    work = workload_from_config(cfg, dims, processes=distributed.world_size())
    return choose_batches(dims, work, budget), work.prompt_tokens


@dataclass(frozen=True)
class Report:
    """Everything `onelayer plan` prints, for the table and for --json."""
    model: ModelDims
    workload: Workload
    card_bytes: int
    budget_bytes: int
    plans: tuple[Plan, ...]
    largest_new_tokens: int
    largest_group_size: int
    gpus: int = 1                 # data-parallel processes; the workload is each one's share
    largest_new_tokens_offloaded: int = 0   # with --offload-optimizer on CUDA, when it is not on already


def build_report(dims: ModelDims, w: Workload, card_bytes: int, gpus: int = 1) -> Report:
    budget = card_bytes - (CUDA_CONTEXT if w.device == "cuda" else 0)
    if budget <= 0:
        raise UserError(f"--gpu-memory {card_bytes / GiB:.2f} GiB leaves nothing beside the CUDA context")
    most_tokens = dims.max_positions - w.prompt_tokens
    offloaded = (0 if w.offload_optimizer or w.device != "cuda" else
                 largest_fit(dims, dataclasses.replace(w, offload_optimizer=True), budget, "new_tokens", most_tokens))
    return Report(dims, w, card_bytes, budget, tuple(plan_all(dims, w)),
                  largest_fit(dims, w, budget, "new_tokens", most_tokens),
                  largest_fit(dims, w, budget, "group_size", 1 << 16), gpus, offloaded)


def _per_gpu(gpus: int, w: Workload) -> str:
    if gpus == 1:
        return ""
    state = "1/N of AdamW's state (zero1)" if w.optimizer_shards > 1 else "all of AdamW's state"
    return f"; on each of {gpus} GPUs: its share of the prompts, {state}"


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _parts_table(plan: Plan) -> list[str]:
    """Every part once, with its largest size, the stages it is alive in, and its bytes at the peak."""
    peak = plan.peak
    at_peak = {p.name: p.bytes for p in peak.parts}
    sizes: dict[str, int] = {}
    stages: dict[str, list[str]] = {}
    for phase in plan.phases:
        for part in phase.parts:
            sizes[part.name] = max(sizes.get(part.name, 0), part.bytes)
            if phase.stage not in stages.setdefault(part.name, []):
                stages[part.name].append(phase.stage)
    every = {ph.stage for ph in plan.phases}
    rows = [f"| {plan.method}: part | GiB | alive in | at peak ({peak.name}) |", "|---|---:|---|---:|"]
    for name, size in sizes.items():
        alive = "every phase" if set(stages[name]) == every else ", ".join(stages[name])
        rows.append(f"| {name} | {_gib(size)} | {alive} | {_gib(at_peak[name]) if name in at_peak else ''} |")
    rows += [f"| **peak allocated** | | | **{_gib(plan.allocated)}** |",
             f"| allocator slack (estimate) | | | {_gib(plan.slack)} |",
             f"| **peak reserved** | | | **{_gib(plan.reserved)}** |"]
    return rows


def _methods_table(plans: tuple[Plan, ...], budget: int) -> list[str]:
    """Per method: steady weights and trained state, then the peaks of generation and training."""
    rows = [f"| method | trainable | weights | trained state | generation peak | training peak | peak allocated | "
            f"peak reserved | fits {budget / GiB:.1f} GiB |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for plan in plans:
        def steady(kind: str) -> int:
            return max(sum(p.bytes for p in ph.parts if p.kind == kind and p.steady) for ph in plan.phases)

        def peak(generation: bool) -> int:
            return max(ph.allocated for ph in plan.phases if (ph.stage == "generate") == generation)

        cells = [steady("weights"), steady("state"), peak(True), peak(False), plan.allocated, plan.reserved]
        rows.append(f"| {plan.method} | {_count(plan.trainable_params)} | " + " | ".join(_gib(v) for v in cells)
                    + f" | {'yes' if plan.fits(budget) else 'no'} |")
    return rows


def _fit_lines(report: Report) -> list[str]:
    w, budget = report.workload, report.budget_bytes
    positions = report.model.max_positions
    bound = (f"; the model's {positions:,} positions allow no more"
             if report.largest_new_tokens == positions - w.prompt_tokens else "")

    def largest(knob: str, value: int) -> str:
        return f"{knob} {value}" if value else f"no {knob} fits"

    lines = [f"Largest onelayer steps that fit {budget / GiB:.1f} GiB at micro-batch {w.mb} and generation batch "
             f"{w.gen_rows}: {largest('--max-new-tokens', report.largest_new_tokens)} (at {w.rows} sequences "
             f"of {w.prompt_tokens} prompt tokens{bound}), {largest('--group-size', report.largest_group_size)} "
             f"(at {w.prompts} prompts x {w.new_tokens} new tokens)."]
    if report.largest_new_tokens_offloaded > report.largest_new_tokens:
        lines.append(f"With --offload-optimizer (the trained layer's optimizer state in host memory while "
                     f"rollouts run): --max-new-tokens {report.largest_new_tokens_offloaded}.")
    try:
        choice = choose_batches(report.model, w, budget)
    except UserError as exc:
        return lines + [f"This step does not fit at any batch size: {exc}."]
    return lines + [f"Largest batches that fit this step: --micro-batch {choice.micro_batch} --generation-batch "
                    f"{choice.generation_batch} (peak {choice.plan.reserved / GiB:.2f} GiB reserved)."]


def format_plan(report: Report) -> str:
    """Markdown: the workload, onelayer part by part, the methods side by side, what fits."""
    d, w, onelayer = report.model, report.workload, report.plans[0]
    card = (f"{report.card_bytes / GiB:.1f} GiB card - {CUDA_CONTEXT / GiB:.1f} GiB CUDA context = "
            if w.device == "cuda" else "")
    return "\n".join([
        f"## onelayer plan: {d.name}, layer {w.layer} of {d.layers}", "",
        f"{w.prompts} prompts x {w.group_size} completions = {w.rows} sequences of {w.prompt_tokens} prompt + "
        f"{w.new_tokens} new tokens (all full length); micro-batch {w.mb}, generation batch {w.gen_rows}; "
        f"beta {w.beta:g}; {w.frozen} frozen blocks, {w.compute} compute, {w.loss_impl} loss, {w.device}"
        f"{'; optimizer state on the host during rollouts' if w.offload_optimizer and w.device == 'cuda' else ''}"
        f"{_per_gpu(report.gpus, w)}. Budget: {card}{report.budget_bytes / GiB:.1f} GiB for tensors.", "",
        *_parts_table(onelayer), "",
        "Phases (allocated / reserved GiB): " + ", ".join(
            f"{p.name} {_gib(p.allocated)} / {_gib(onelayer.reserved_at(p))}" for p in onelayer.phases), "",
        *_methods_table(report.plans, report.budget_bytes), "", *_fit_lines(report)])


def report_json(report: Report) -> str:
    def plan(p: Plan) -> dict:
        return {"method": p.method, "trainable_params": p.trainable_params, "peak_phase": p.peak.name,
                "allocated_bytes": p.allocated, "reserved_bytes": p.reserved,
                "fits": p.fits(report.budget_bytes),
                "phases": [{"name": ph.name, "allocated_bytes": ph.allocated, "reserved_bytes": p.reserved_at(ph),
                            "parts": [dataclasses.asdict(part) for part in ph.parts]} for ph in p.phases]}

    return json.dumps({"model": dataclasses.asdict(report.model), "workload": dataclasses.asdict(report.workload),
                       "gpus": report.gpus, "card_bytes": report.card_bytes,
                       "budget_bytes": report.budget_bytes,
                       "largest_fit": {"max_new_tokens": report.largest_new_tokens,
                                       "group_size": report.largest_group_size,
                                       "max_new_tokens_offloaded": report.largest_new_tokens_offloaded},
                       "plans": [plan(p) for p in report.plans]}, indent=2)


def plan_command(options: dict, *, config_file: str | None = None, gpu_memory: str = "24GiB",
                 as_json: bool = False, gpus: int = 1) -> str:
    """`onelayer plan`: `options` are train options (model, layer, group_size, prompts_per_step,
    max_new_tokens, max_prompt_tokens, micro_batch, generation_batch, beta, frozen_dtype, ...;
    None = unset) over the config file's; returns the text to print."""
    from ..config import build_config

    cfg = build_config({k: v for k, v in options.items() if v is not None}, config_file)
    dims = ModelDims.from_config(read_model_config(cfg.model), cfg.model)
    w = workload_from_config(cfg, dims, processes=gpus)
    w.check(dims)
    report = build_report(dims, w, parse_size(gpu_memory), gpus)
    return report_json(report) if as_json else format_plan(report)
