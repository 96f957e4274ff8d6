"""benchmarks/gpu_check.sh's parts that run without a GPU: the train-step benchmark on the tiny
config and the summary table, whole or from a run that did not finish. A GPU draw is rare; a
script that fails on its last line would waste it."""
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
    assert rows["train step (Qwen3-8B config)"] == "did not finish: see train_step.log"
    assert rows["fused loss T = 8 x 4096, V = 151,936"] == "did not finish: see policy_loss.log"


def test_train_step_benchmark_on_cpu_feeds_the_table(tmp_path):
    """The tiny config on CPU: no CUDA-only figures (decode modes, GQA timing), which the table
    must do without; the sampler's log-probs match the engine's (fp32)."""
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
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "train_step.log").write_text(run.stdout)
    rows = summary(logs)
    assert rows["workload"].startswith("Qwen3 tiny config, random weights, fp32 frozen, layer 1")
    assert rows["sampler vs engine log-probs (last step)"].startswith(
        f"mean abs gap {result['sampler_logprob_gap']}")


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)
