"""The one table of benchmarks/gpu_check.sh, from the logs it wrote into a folder.

    python benchmarks/gpu_summary.py LOG_DIR

Reads kernels.log (check_kernels_gpu.py), train_step.log (bench_train_step.py's last RESULT
line: the full one, or the partial one printed after the training steps when the timings after
them did not finish) and policy_loss.log (bench_policy_loss.py's table); a missing or failed
part shows as such.
"""
from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path


def read(folder: Path, name: str) -> str:
    path = folder / name
    return path.read_text(errors="replace") if path.is_file() else ""


def main(folder: Path) -> None:
    kernels = [l for l in read(folder, "kernels.log").splitlines() if l.startswith("KERNELS")]
    decoder = [l for l in read(folder, "kernels.log").splitlines() if l.startswith("DECODER")]
    compiled = [json.loads(l[len("DECODE "):]) for l in read(folder, "train_step.log").splitlines()
                if l.startswith("DECODE ")]
    gpu = [l for l in read(folder, "kernels.log").splitlines() if l.startswith("GPU:")]
    nf4 = [l for l in read(folder, "nf4.log").splitlines() if l.startswith(("CHECKS", "MISMATCH", "the NF4"))]
    step = [json.loads(l[len("RESULT "):]) for l in read(folder, "train_step.log").splitlines()
            if l.startswith("RESULT ")]
    loss_rows = [l for l in read(folder, "policy_loss.log").splitlines() if l.startswith("| 32768x")]

    rows = [("card", gpu[0][5:].strip() if gpu else "?"), ("date", date.today().isoformat()),
            ("Triton kernels vs torch reference (GPU tiles)", kernels[0][8:] if kernels else "did not finish"),
            ("decoder greedy == HF generate (each graph mode)", decoder[0][8:] if decoder else "did not finish"),
            ("NF4 matmuls vs torch reference", "; ".join(nf4) if nf4 else "did not finish")]
    if step:
        r = step[-1]
        rows += [
            ("workload", f"Qwen3 {r['config']} config, random weights, {r['frozen']} frozen, layer {r['layer']}, "
                         f"G = {r['group']} x {r['new_tokens']} new tokens, beta {r['beta']}"),
            ("peak reserved / allocated", f"{r.get('peak_mem_gib', '?')} / {r.get('peak_alloc_gib', '?')} GiB"),
            ("s/step (each step)", ", ".join(f"{s:.1f}" for s in r["step_s"])),
            ("last step: generation + update", f"{r['gen_s']:.1f} + {r['update_s']:.1f} s"
                                               + (f" (prefix pass {r['prefix_s']:.2f} s)" if "prefix_s" in r else "")),
            ("last step: decode graph captures", f"{r['captures']} in {r['capture_s']:.2f} s"
                                                 if "captures" in r else "?"),
            ("decode", f"{r['decode_tokens_per_s']:.0f} tokens/s, {r['decode_ms_per_step']:.1f} ms a step"),
            ("decode weight-read limit", f"{r.get('decode_limit_ms', '?')} ms a step ({r.get('decode_weight_gib', '?')} GiB "
                                         f"at {r.get('copy_bandwidth_tb_s', '?')} TB/s copy bandwidth): "
                                         f"{100 * r.get('decode_share_of_limit', 0):.1f}% of the limit"),
            ("decoder graph (training steps)", r.get("decode_graph", "?")),
            ("NF4 matmul routes measured by the decoder", "; ".join(r.get("nf4_routes", [])) or "none"),
            ("NF4 route timings (us a pass over the first linears, by rows)",
             " | ".join(r.get("nf4_route_timings", [])) or "none"),
            ("sampler vs engine log-probs (last step)",
             f"mean abs gap {r.get('sampler_logprob_gap', '?')}, KL {r.get('sampler_kl', '?')}"),
            *[(f"decode, mode {m}, {r.get('mode_tokens', '?')} greedy tokens",
               f"{v['ms']:.2f} ms a step ({v['status']}; tokens == eager: {v['same_as_eager']})")
              for m, v in r.get("decode_ms_by_mode", {}).items()],
            *[(f"decode, GQA fold vs repeat, {g['rows']} rows x {g['context']} cache columns",
               f"{g['fold']['tokens_per_s']:.0f} vs {g['repeat']['tokens_per_s']:.0f} tokens/s "
               f"({g['fold']['ms']:.2f} vs {g['repeat']['ms']:.2f} ms a step; tokens equal: {g['same_tokens']})")
              for g in ([r["decode_gqa"]] if "decode_gqa" in r else [])],
            *([("decode modes and GQA timings", "did not finish: see train_step.log")] if r.get("partial") else []),
            *[("decode, mode compile", f"{c['ms']:.2f} ms a step ({c['status']}; first call {c['first_call_s']} s; "
                                       f"tokens == eager: {c['same_as_eager']})" if "ms" in c else c.get("error", "?"))
              for c in compiled],
            ("checkpoint build / load", f"{r['checkpoint_s']} s / {r['load_s']} s"),
        ]
    else:
        rows.append(("train step (Qwen3-8B config)", "did not finish: see train_step.log"))
    for line in loss_rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append((f"fused loss T x H x V = {cells[0]}, {cells[1]}",
                     f"{cells[2]} ms fwd+bwd, peak extra {cells[3]} MiB {cells[5]}".rstrip()))
    if not loss_rows:
        rows.append(("fused loss T = 8 x 4096, V = 151,936", "did not finish: see policy_loss.log"))
    width = max(len(k) for k, _ in rows)
    print(f"| {'what'.ljust(width)} | result |\n|{'-' * (width + 2)}|---|")
    for key, value in rows:
        print(f"| {key.ljust(width)} | {value} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
