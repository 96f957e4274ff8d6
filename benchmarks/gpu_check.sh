#!/usr/bin/env bash
# Where onelayer stands on this GPU, in one command (under 8 minutes on an H100):
#   1. the Triton kernels against their torch references with the GPU tiles (fp32 and bf16), and
#      the rollout decoder's greedy tokens against Hugging Face generate in each graph mode,
#   2. the fused policy loss at T = 8 x 4096, V = 151,936 against chunked and eager torch,
#   3. the NF4 matmuls (bitsandbytes, Triton, CUDA C++, tensor cores) against their reference,
#   4. GRPO on the Qwen3-8B config with random weights in NF4, G = 8 x 512 new tokens, beta 0,
#      two steps: peak memory, s/step split into generation and update, decode vs its limit,
#      the NF4 routes the decoder measured, decode ms/step with the CUDA graph, eager and
#      torch.compile (the compile last), and the grouped-query fold against repeated keys and
#      values at 8 rows x 1,024 cache columns,
# then one table. Run from the repository root:
#     bash benchmarks/gpu_check.sh
# Wheels the machine lacks (bitsandbytes; transformers when older than our floor) are installed
# from .whl/ when it exists (benchmarks/README.md: prepare_side_by_side.sh). Logs go to $OUT (or
# /tmp/onelayer-gpu-check). Copy the table into benchmarks/RESULTS.md with the command.
# Each part has its own timeout, cut to what is left of BUDGET seconds (default 560, under the
# device tool's 600 s a command), so that the table is always written.
set -u
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${BUDGET:-560}
LOGS=${OUT:-/tmp/onelayer-gpu-check}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/onelayer-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/onelayer-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# Without bitsandbytes (or a new enough transformers) nothing below can run: stop at once.
python3 -c "import torch, triton, transformers, bitsandbytes as b; print('torch', torch.__version__, \
'triton', triton.__version__, 'transformers', transformers.__version__, 'bitsandbytes', b.__version__)" \
  || { echo "the wheels in .whl/ are missing: run benchmarks/prepare_side_by_side.sh here, carry .whl (benchmarks/README.md)"; exit 1; }

# Progress bars of loading and saving are noise in a log.
strip_bars() { grep -av -e 'it/s]' -e 's/it]' ; }
# part NAME LOG CAP CMD...: CMD's output into $LOGS/LOG under `timeout min(CAP, seconds left of
# BUDGET but 10 for the table)`; returns CMD's exit status.
part() {
  local name=$1 log=$2 cap=$3; shift 3
  local t=$(( START + BUDGET - 10 - $(date +%s) ))
  [ "$t" -gt "$cap" ] && t=$cap
  echo "== $name (timeout ${t} s; $(( $(date +%s) - START )) s so far)"
  if [ "$t" -lt 5 ]; then echo "SKIPPED: no time left of BUDGET=${BUDGET} s" | tee "$LOGS/$log"; return 1; fi
  timeout --kill-after=10 "$t" "$@" 2>&1 | strip_bars | tee "$LOGS/$log"
  return "${PIPESTATUS[0]}"
}
part kernels kernels.log 120 python3 benchmarks/check_kernels_gpu.py
part "fused policy loss" policy_loss.log 100 \
  python3 benchmarks/bench_policy_loss.py --shapes 32768x4096x151936 --reps 5 --warmup 1
# The NF4 matmuls against their reference, in a process of their own: the decoder measures and
# routes between them at its start, so a kernel that faults must not reach the train step.
if ! part "NF4 matmul kernels" nf4.log 150 python3 benchmarks/bench_nf4_matmul.py --check-only; then
  export ONELAYER_NF4_ROUTES=table
  echo "the NF4 kernel check failed: the train step routes by the H100 table (ONELAYER_NF4_ROUTES=table)" \
    | tee -a "$LOGS/nf4.log"
fi
# Last, being the longest: its figures come as soon as its steps end (a first RESULT line), the
# decode-mode timings after, the torch.compile one last; a timeout loses only what was left.
part "train step (Qwen3-8B config, random weights)" train_step.log 300 \
  python3 benchmarks/bench_train_step.py --config 8b --layer 16 --decode-compile --gqa-context 1024
echo "== summary ($(( $(date +%s) - START )) s so far)"
python3 benchmarks/gpu_summary.py "$LOGS" | tee "$LOGS/summary.md"
