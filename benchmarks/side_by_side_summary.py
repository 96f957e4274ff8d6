"""The one table of benchmarks/side_by_side.sh, from the logs it wrote into a folder.

    python benchmarks/side_by_side_summary.py LOG_DIR

Reads env.log (DATE / COMMIT / GPU / VERSION lines), ol_beta0.log and ol_beta004.log
(bench_train_step.py's RESULT), trl_qlora.log and trl_onelayer_bf16.log (the TRL anchor's
RESULT), fit.log (side_by_side_fit.py's PLAN and FIT). A missing, skipped, timed-out or failed
section shows as such, and a target it decides shows n/a, never PASS. Seconds per step: the
median of the steps after the first (the first includes warm-up: Triton JIT, graph capture).
Targets: ../shared/BENCHMARKS.md.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

# BENCHMARKS.md, "Targets for onelayer" (G = 8 x 512 new tokens, Qwen3-8B config, one card).
MAX_RESERVED_GIB = 12.0
MIN_SPEEDUP_QLORA = 10.0
MIN_SPEEDUP_BF16 = 4.0
MIN_DECODE_SHARE = 0.5
MIN_FIT_TOKENS = 8192
FIT_BUDGET_GIB = 24.0

SECTIONS = ("ol_beta0", "trl_qlora", "trl_onelayer_bf16", "ol_beta004", "fit")


def read(folder: Path, name: str) -> str:
    path = folder / name
    return path.read_text(errors="replace") if path.is_file() else ""


def tagged(text: str, tag: str) -> list[dict]:
    """The JSON objects of lines `TAG {...}` (a tag may follow other text on the line)."""
    out = []
    for line in text.replace("\r", "\n").splitlines():
        at = line.find(tag + " {")
        if at >= 0:
            try:
                out.append(json.loads(line[at + len(tag) + 1:]))
            except ValueError:
                pass
    return out


def section_state(text: str) -> str:
    """How a section ended, in words: '' when its log is not there."""
    if not text:
        return "not run"
    lines = text.splitlines()
    for line in lines:
        if line.startswith("SKIPPED"):
            return line.strip()
    state = next((l.strip() for l in lines if l.startswith("TIMEOUT")), "")
    exit_line = next((l.strip() for l in reversed(lines) if l.startswith("EXIT")), "")
    return ", ".join(s for s in (state, exit_line) if s) or "no EXIT line"


def step_median(step_s: list[float] | None) -> tuple[float | None, str]:
    """(median s/step of the steps after the first, how it was taken)."""
    if not step_s:
        return None, "no step finished"
    if len(step_s) == 1:
        return step_s[0], "one step, warm-up included"
    later = step_s[1:]
    return statistics.median(later), (f"median of steps 2-{len(step_s)}" if len(later) > 1 else "step 2")


def parse(folder: Path) -> dict:
    env = read(folder, "env.log").splitlines()
    def env_value(key: str) -> str:
        return next((l[len(key) + 1:].strip() for l in env if l.startswith(key + ":")), "")
    data = {"date": env_value("DATE"), "commit": env_value("COMMIT"), "gpu": env_value("GPU"),
            "versions": [l[len("VERSION:"):].strip() for l in env if l.startswith("VERSION:")],
            "state": {}}
    for name in SECTIONS:
        text = read(folder, f"{name}.log")
        data["state"][name] = section_state(text)
        results = tagged(text, "RESULT")
        data[name] = results[-1] if results else None
    fit_text = read(folder, "fit.log")
    plans, fits = tagged(fit_text, "PLAN"), tagged(fit_text, "FIT")
    data["plan"] = plans[-1] if plans else None
    data["fit"] = fits[-1] if fits else None
    return data


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else "PASS" if ok else "FAIL"


def fmt(x: float | None, digits: int = 1, unit: str = "") -> str:
    return "?" if x is None else f"{x:.{digits}f}{unit}"


def onelayer_memory(r: dict | None) -> tuple[float | None, float | None]:
    """(peak reserved, peak allocated) GiB of a bench_train_step RESULT (CUDA only)."""
    if not r:
        return None, None
    return r.get("peak_mem_gib"), r.get("peak_alloc_gib")


def trl_cell(r: dict | None, state: str) -> tuple[str, str, float | None]:
    """(memory cell, time cell, median s/step) of a TRL anchor RESULT."""
    if not r:
        return f"did not finish ({state})", "", None
    if r.get("status") != "ok":
        return f"status {r.get('status')} ({state})", "", None
    median, how = step_median(r.get("step_s"))
    mem = f"{fmt(r.get('peak_reserved_gib'), 2)} / {fmt(r.get('peak_alloc_gib'), 2)}"
    steps = ", ".join(f"{s:.1f}" for s in r.get("step_s") or [])
    return mem, f"{fmt(median, 2)} ({how}; steps {steps})", median


def rows(d: dict) -> list[tuple[str, str, str, str, str, str]]:
    """(what, onelayer, TRL QLoRA, TRL one-layer bf16, target, result) rows of the table."""
    st = d["state"]
    out = []
    b0, b4 = d["ol_beta0"], d["ol_beta004"]
    # The workload as run (8 x 512 on the GPU; DRY=1 runs fewer tokens).
    wl = f"{b0.get('group', 8)} x {b0.get('new_tokens', 512)}" if b0 else "8 x 512"
    q_mem, q_time, q_s = trl_cell(d["trl_qlora"], st["trl_qlora"])
    f_mem, f_time, f_s = trl_cell(d["trl_onelayer_bf16"], st["trl_onelayer_bf16"])

    # Memory at 8 x 512, beta 0.
    reserved, allocated = onelayer_memory(b0)
    if b0 is None:
        ol_mem = f"did not finish ({st['ol_beta0']})"
    elif reserved is None:
        ol_mem = f"no GPU (RSS {fmt(b0.get('rss_gib'), 2)} GiB)"
    else:
        ol_mem = f"{reserved:.2f} / {fmt(allocated, 2)}"
    out.append((f"peak reserved / allocated GiB, {wl}, beta 0", ol_mem, q_mem, f_mem,
                f"onelayer <= {MAX_RESERVED_GIB:g} GiB reserved",
                verdict(None if reserved is None else reserved <= MAX_RESERVED_GIB)))

    # Time per step and the speed-ups.
    ol_s, how = step_median(b0.get("step_s") if b0 else None)
    ol_time = "" if b0 is None else (f"{fmt(ol_s, 2)} ({how}; steps {', '.join(f'{s:.1f}' for s in b0['step_s'])}; "
                                     f"last: generation {fmt(b0.get('gen_s'))} + update {fmt(b0.get('update_s'))})")
    out.append((f"s/step, {wl}, beta 0", ol_time or f"did not finish ({st['ol_beta0']})", q_time, f_time, "", ""))
    for label, trl_s, target in (("TRL QLoRA", q_s, MIN_SPEEDUP_QLORA), ("TRL one-layer bf16", f_s, MIN_SPEEDUP_BF16)):
        ratio = trl_s / ol_s if trl_s and ol_s else None
        out.append((f"speed-up per step over {label}", fmt(ratio, 1, "x"), "", "", f">= {target:g}x",
                    verdict(None if ratio is None else ratio >= target)))

    # Decode against the weight-read limit.
    share = b0.get("decode_share_of_limit") if b0 else None
    if b0 is None:
        decode = "did not finish"
    else:
        decode = f"{fmt(b0.get('decode_tokens_per_s'), 0)} tokens/s, {fmt(b0.get('decode_ms_per_step'), 2)} ms a step"
        if share is not None:
            decode += (f" vs limit {fmt(b0.get('decode_limit_ms'), 2)} ms ({fmt(b0.get('decode_weight_gib'), 2)} GiB "
                       f"at {fmt(b0.get('copy_bandwidth_tb_s'), 2)} TB/s): {100 * share:.1f}% of the limit")
    out.append(("decode, 8 rows (training step's generation)", decode, "", "",
                f">= {100 * MIN_DECODE_SHARE:.0f}% of the bandwidth limit",
                verdict(None if share is None else share >= MIN_DECODE_SHARE)))

    # beta 0.04: no target of its own.
    if b4 is None:
        beta = f"did not finish ({st['ol_beta004']})"
    else:
        r4, a4 = onelayer_memory(b4)
        s4, how4 = step_median(b4.get("step_s"))
        beta = (f"{fmt(r4, 2)} / {fmt(a4, 2)} GiB reserved / allocated; {fmt(s4, 2)} s/step ({how4})"
                if r4 is not None else f"{fmt(s4, 2)} s/step ({how4}), no GPU")
    out.append((f"onelayer, {wl}, beta 0.04", beta, "", "", "(no target)", ""))

    # The longest completion at G = 8 under 24 GiB reserved.
    plan, fit = d["plan"], d["fit"]
    fit_ok = None
    if plan is None and fit is None:
        fit_cell = f"did not finish ({st['fit']})"
    else:
        p = plan or {}
        predicted = (fit or {}).get("predicted_new_tokens", p.get("predicted_new_tokens"))
        fit_cell = (f"predicted {predicted} new tokens (planner; micro-batch {p.get('micro_batch', '?')}, "
                    f"whole batch {p.get('predicted_whole_batch_new_tokens', '?')})")
        if fit is None:
            fit_cell += f"; not verified ({st['fit']})"
        else:
            n = fit.get("new_tokens")
            full = fit.get("completion_len") is not None and fit["completion_len"] >= n - 0.5
            budget = fit.get("budget_gib", FIT_BUDGET_GIB)
            peak = fit.get("peak_reserved_gib")
            if fit.get("status") == "ok":
                fit_cell += (f"; one step at {n}: ok, peak reserved {fmt(peak, 2)} GiB (cap {budget:g} GiB by "
                             f"{fit.get('cap') or 'none: no GPU'}), {fmt(fit.get('step_s'))} s")
                if not full:  # a shorter completion holds less: proves nothing about n
                    fit_cell += f", completions {fit.get('completion_len')} tokens on average (not all full length)"
                elif peak is not None:
                    fit_ok = peak <= budget and n >= MIN_FIT_TOKENS
            else:
                fit_cell += f"; one step at {n}: {fit.get('status')} (cap {budget:g} GiB)"
                # Out of memory below the target length: the longest fit is shorter still.
                if fit.get("status") == "oom" and n < MIN_FIT_TOKENS:
                    fit_ok = False
    out.append((f"longest completion, G = 8, under {FIT_BUDGET_GIB:g} GiB reserved", fit_cell,
                "~3,000 (extrapolated, BENCHMARKS.md)", "", f">= {MIN_FIT_TOKENS:,} new tokens", verdict(fit_ok)))
    return out


def card(d: dict) -> str:
    if d["gpu"]:
        return d["gpu"]
    for name in SECTIONS[:4]:
        if d[name] and d[name].get("device"):
            return d[name]["device"]
    return "?"


def render(d: dict) -> str:
    config = (d["ol_beta0"] or {}).get("config", "8b")
    lines = [f"## Side by side: onelayer vs TRL GRPOTrainer, {card(d)}", "",
             f"date {d['date'] or '?'}, commit {d['commit'] or '?'}; " + "; ".join(d["versions"]), "",
             f"Qwen3 {config} config, random weights, 1 prompt (48 tokens) x G = 8, every completion at full length; "
             "onelayer: NF4 frozen blocks, layer 16; TRL 1.16 GRPOTrainer (HF generate, gradient checkpointing), "
             "layer 16 for one-layer bf16.", "",
             "sections: " + "; ".join(f"{k} {v}" for k, v in d["state"].items()), ""]
    table = rows(d)
    head = ("what", "onelayer", "TRL QLoRA", "TRL one-layer bf16", "target", "result")
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    lines += ["| " + " | ".join(r) + " |" for r in table]
    lines.append(f"| card | {card(d)} | | | | |")
    return "\n".join(lines)


def main(folder: Path) -> None:
    print(render(parse(folder)))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
