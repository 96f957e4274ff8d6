"""benchmarks/gpu_check.sh's parts that run without a GPU: the train-step benchmark on the tiny
config and the summary table, whole or from a run that did not finish. A GPU draw is rare; a
script that fails on its last line would waste it."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def summary(folder: Path) -> dict[str, str]:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_summary.py"), str(folder)],
                         capture_output=True, text=True, check=True, env=ENV).stdout
    lines = out.splitlines()
    assert lines[0].startswith("| what") and lines[1].startswith("|--")
    return {cells[0]: cells[1] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def test_a_run_that_wrote_nothing_says_so(tmp_path):
    rows = summary(tmp_path)
    assert rows["Triton kernels vs torch reference (GPU tiles)"] == "did not finish"
    assert rows["NF4 matmuls vs torch reference"] == "did not finish"
    assert rows["train step (Qwen3-8B config)"] == "did not finish: see train_step.log"
    assert rows["fused loss T = 8 x 4096, V = 151,936"] == "did not finish: see policy_loss.log"


def test_train_step_benchmark_on_cpu_feeds_the_table(tmp_path):
    """The tiny config on CPU: no CUDA-only figures (decode modes, GQA timing), which the table
    must do without; the sampler's log-probs match the engine's (fp32); the decoder's graph
    status of the training step is recorded before the step releases the decoder."""
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train_step.py"),
                          "--config", "tiny", "--layer", "1", "--steps", "1", "--new-tokens", "8",
                          "--root", str(tmp_path / "models")],
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result_lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(result_lines) == 1
    result = json.loads(result_lines[0][len("RESULT "):])
    assert result["config"] == "tiny" and result["new_tokens"] == 8 and len(result["step_s"]) == 1
    assert 0 <= result["sampler_logprob_gap"] < 1e-4
    # Recorded before rl_step released the decoder (after it, there is none: "manual: none").
    assert result["decode_graph"] == "off: eager"
    # The prefix pass is timed inside the update it is part of.
    assert 0 < result["prefix_s"] < result["update_s"]
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "train_step.log").write_text(run.stdout)
    rows = summary(logs)
    assert rows["workload"].startswith("Qwen3 tiny config, random weights, fp32 frozen, layer 1")
    assert rows["last step: generation + update"].endswith(f"(prefix pass {result['prefix_s']:.2f} s)")
    assert rows["sampler vs engine log-probs (last step)"].startswith(
        f"mean abs gap {result['sampler_logprob_gap']}")
    assert rows["decoder graph (training steps)"] == "off: eager"
    assert rows["last step: decode graph captures"] == "0 in 0.00 s"    # CPU decodes eagerly
    assert rows["NF4 matmul routes measured by the decoder"] == "none"   # CPU: no NF4 kernels
    assert "decode modes and GQA timings" not in rows      # on CPU the one RESULT is the full one


# What bench_train_step.py prints on CUDA right after the training steps (made-up figures).
EARLY = dict(config="8b", layer=16, frozen="nf4", group=8, new_tokens=512, beta=0.0, completion_len=512.0,
             checkpoint_s=80.1, load_s=20.3, step_s=[30.5, 12.25], gen_s=10.5, update_s=1.75,
             decode_tokens_per_s=390.1, decode_ms_per_step=20.51, device="NVIDIA H100 80GB HBM3",
             torch="2.11.0+cu130", peak_mem_gib=9.5, peak_alloc_gib=8.25, decode_weight_gib=4.8,
             copy_bandwidth_tb_s=2.9, decode_limit_ms=3.56, decode_share_of_limit=0.174,
             sampler_logprob_gap=0.002, sampler_kl=1e-05, decode_graph="manual: graph", partial=True,
             captures=3, capture_s=0.4213,
             nf4_routes=["NVIDIA H100 80GB HBM3, bfloat16: rows 1-2 bnb, 3-16 cuda mma, more bnb"],
             nf4_route_timings=["NVIDIA H100 80GB HBM3, bfloat16: 1: bnb 61, triton 120 us; 2: bnb 70, triton 121 us"])
FULL = {**{k: v for k, v in EARLY.items() if k != "partial"}, "mode_tokens": 128,
        "decode_ms_by_mode": {"manual": dict(ms=19.5, status="manual: graph", same_as_eager=True),
                              "off": dict(ms=60.25, status="off: eager", same_as_eager=True)}}


def test_a_train_step_cut_short_after_its_steps_keeps_them(tmp_path):
    """The timeout hit during the decode-mode timings: the early RESULT fills the table, and
    the timings it lacks say that they did not finish."""
    (tmp_path / "train_step.log").write_text(
        f"Loading weights: 100%|███| 36/36 [00:09<00:00, 3.9it/s]\nRESULT {json.dumps(EARLY)}\n")
    rows = summary(tmp_path)
    assert rows["workload"] == "Qwen3 8b config, random weights, nf4 frozen, layer 16, G = 8 x 512 new tokens, beta 0.0"
    assert rows["s/step (each step)"] == "30.5, 12.2"
    assert rows["decoder graph (training steps)"] == "manual: graph"
    assert rows["last step: decode graph captures"] == "3 in 0.42 s"
    assert rows["NF4 matmul routes measured by the decoder"] == EARLY["nf4_routes"][0]
    assert rows["NF4 route timings (us a pass over the first linears, by rows)"] == EARLY["nf4_route_timings"][0]
    assert rows["decode weight-read limit"].endswith("17.4% of the limit")
    assert rows["decode modes and GQA timings"] == "did not finish: see train_step.log"
    assert not any(key.startswith("decode, mode") for key in rows)


def test_a_failed_nf4_check_shows_with_the_fallback_it_caused(tmp_path):
    (tmp_path / "nf4.log").write_text(
        "NVIDIA H100 80GB HBM3  torch 2.11.0\nCUDA C++ kernel ready in 31.0 s (build or load)\n"
        "MISMATCH cuda mma M=5 N=1000 K=1024 torch.bfloat16 bias=True nested=True bs=64: rel err 9.1e-01\n"
        "CHECKS 43/44 ok (triton, cuda, cuda mma vs the fp32 reference)\n"
        "the NF4 kernel check failed: the train step routes by the H100 table (ONELAYER_NF4_ROUTES=table)\n")
    row = summary(tmp_path)["NF4 matmuls vs torch reference"]
    assert row.startswith("MISMATCH cuda mma M=5") and "CHECKS 43/44 ok" in row and row.endswith("=table)")


def test_the_full_result_line_after_the_early_one_wins(tmp_path):
    (tmp_path / "train_step.log").write_text(f"RESULT {json.dumps(EARLY)}\nRESULT {json.dumps(FULL)}\n")
    rows = summary(tmp_path)
    assert rows["decode, mode manual, 128 greedy tokens"] == "19.50 ms a step (manual: graph; tokens == eager: True)"
    assert rows["decode, mode off, 128 greedy tokens"].startswith("60.25 ms a step")
    assert "decode modes and GQA timings" not in rows


def test_kernel_check_reports_the_kernels_when_the_decoder_check_fails(monkeypatch, capsys):
    """An exception in check_decoder outside its per-mode checks (building a model, HF generate)
    is one failed check: the DECODER and KERNELS lines still print."""
    spec = importlib.util.spec_from_file_location("check_kernels_gpu", ROOT / "benchmarks" / "check_kernels_gpu.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)

    def no_model():
        raise RuntimeError("no model")

    monkeypatch.setattr(check, "SMOKE_CASES", [])
    monkeypatch.setattr(check, "check_advantages", lambda: [True])
    monkeypatch.setattr(check, "check_decode_ops", lambda: [True])
    monkeypatch.setattr(check, "check_decoder", no_model)
    monkeypatch.setattr(sys, "argv", ["check_kernels_gpu.py", "--smoke"])
    assert check.main() == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3:] == ["FAIL decoder: RuntimeError: no model", "DECODER 0/1 ok", "KERNELS 2/3 ok"]


def test_train_step_benchmark_times_the_decoders_captures(tmp_path, monkeypatch, capsys):
    """The CUDA-graph path on CPU, with a capture that takes 0.2 s and replays the step: the
    step's captures are counted and timed (one here: 48 + 8 columns stay in one attended
    length), so a GPU run says what releasing the graphs before each update costs."""
    import time

    from onelayer.rollout import decoder
    spec = importlib.util.spec_from_file_location("bench_train_step", ROOT / "benchmarks" / "bench_train_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def slow_capture(run, device, pool):
        time.sleep(0.2)
        return run, pool

    monkeypatch.setattr(decoder, "graph_mode", lambda device: "manual")
    monkeypatch.setattr(decoder, "capture", slow_capture)
    monkeypatch.setattr(decoder, "run_on_side_stream", lambda run, device: run())
    monkeypatch.setattr(sys, "argv", ["bench_train_step.py", "--config", "tiny", "--layer", "1", "--steps", "1",
                                      "--new-tokens", "8", "--root", str(tmp_path / "models")])
    bench.main()
    result = json.loads(next(line for line in capsys.readouterr().out.splitlines()
                             if line.startswith("RESULT "))[len("RESULT "):])
    assert result["decode_graph"] == "manual: graph"
    assert result["captures"] == 1
    assert 0.2 <= result["capture_s"] < result["gen_s"]
    assert decoder.capture is slow_capture      # the benchmark put back what it timed


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_check_writes_its_table_when_its_budget_is_spent(tmp_path):
    """BUDGET too short for any part: each is skipped, none runs past the budget, and the
    table still comes, saying what did not finish. (A copy of the two scripts it needs, away
    from a checkout's .whl/, which it would install.)"""
    copy = tmp_path / "repo" / "benchmarks"
    copy.mkdir(parents=True)
    for name in ("gpu_check.sh", "gpu_summary.py"):
        shutil.copy(ROOT / "benchmarks" / name, copy / name)
    run = subprocess.run(["bash", str(copy / "gpu_check.sh")], capture_output=True, text=True,
                         env={**ENV, "OUT": str(tmp_path), "BUDGET": "14"}, timeout=120)
    assert run.stdout.count("SKIPPED: no time left of BUDGET=14 s") == 4, run.stdout + run.stderr
    assert (tmp_path / "summary.md").is_file()
    rows = summary(tmp_path)
    assert rows["train step (Qwen3-8B config)"] == "did not finish: see train_step.log"
    assert (tmp_path / "nf4.log").read_text().endswith("(ONELAYER_NF4_ROUTES=table)\n")
