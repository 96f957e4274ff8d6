#!/usr/bin/env bash
# onelayer next to TRL GRPOTrainer on ONE card, in ONE command (issue 11, "The benchmark that
# proves it"; targets: ../shared/BENCHMARKS.md). Qwen3-8B config with random weights, 1 prompt
# (48 tokens) x G = 8 completions, every completion at full length (random weights never emit EOS):
#   ol_beta0           onelayer, NF4 frozen blocks, layer 16, 8 x 512 new tokens, beta 0, 3 steps:
#                      peak reserved, median s/step of the steps after the first, decode tokens/s
#                      against the weight-read bandwidth limit (benchmarks/bench_train_step.py)
#   trl_qlora          TRL 1.16 GRPOTrainer, NF4 + LoRA r16 all-linear, 8 x 512, beta 0, 2 steps
#   trl_onelayer_bf16  TRL, bf16, every layer frozen but layer 16, 8 x 512, beta 0, 2 steps
#                      (both: .anchors/trl_grpo_memory.py, the anchor of BENCHMARKS.md, copied
#                      from ../shared/anchors by benchmarks/prepare_side_by_side.sh)
#   fit                the longest completion at G = 8 under 24 GiB reserved: predicted by the
#                      planner (onelayer.memory.largest_fit; micro-batch 1, all 8 rows generated
#                      together), then ONE step at that length (FIT_TOKENS overrides it) under
#                      torch.cuda.set_per_process_memory_fraction(24 GiB / card)
#                      (benchmarks/side_by_side_fit.py); the PLAN line comes before any weight loads
#   ol_beta004         onelayer as ol_beta0 with beta 0.04 (a reference layer kept), 2 steps; last,
#                      since no target depends on it
# then one table, last (benchmarks/side_by_side_summary.py): onelayer vs TRL QLoRA vs TRL one-layer
# bf16, each target PASS / FAIL, the card.
#
# Here, on the CPU machine, first (wheels into .whl/, the anchor into .anchors/, size check):
#     bash benchmarks/prepare_side_by_side.sh
# then with the device tool (about 9 minutes on an H100; every section has its own timeout and
# the whole script stops within BUDGET seconds, default 550):
#     run(command="OUT=$OUT bash benchmarks/side_by_side.sh 2>&1 | tee $OUT/side.log",
#         carry=[".whl", ".anchors"], timeout_s=590)
# Logs (one per section) and summary.md go to $OUT (or /tmp/onelayer-side-by-side).
# Env: SECTIONS (names above, in order; default all), BUDGET (s), STEPS (ol_beta0's steps).
# DRY=1: the tiny config on CPU, 16 new tokens, no wheels installed: checks the plumbing (about
# 4 minutes on the 2-core dev machine, TRL's tiny steps being slow there; SECTIONS="ol_beta0 fit"
# about 1). TRL sections are skipped, with the reason, where trl or peft does not import or
# .anchors/ is missing.
set -u
cd "$(dirname "$0")/.."
START=$(date +%s)
LOGS=${OUT:-/tmp/onelayer-side-by-side}
mkdir -p "$LOGS"
BUDGET=${BUDGET:-550}
SECTIONS=${SECTIONS:-ol_beta0 trl_qlora trl_onelayer_bf16 fit ol_beta004}
DRY=${DRY:-0}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$DRY" = 1 ]; then
  CONFIG=tiny LAYER=1 NEW=16 ROOT=${ROOT:-/tmp/onelayer-side-dry} STEPS=${STEPS:-2}
  FIT_ARGS="--budget-gib 0.02 --max-new-tokens 16"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  CONFIG=8b LAYER=16 NEW=512 ROOT=${ROOT:-/tmp/onelayer-bench} STEPS=${STEPS:-3}
  FIT_ARGS="--budget-gib 24${FIT_TOKENS:+ --new-tokens $FIT_TOKENS}"
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/onelayer-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/onelayer-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "no .whl/: run benchmarks/prepare_side_by_side.sh on the CPU machine first"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
fi

{
  echo "DATE: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "COMMIT: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  if [ "$DRY" = 1 ]; then echo "GPU: none (DRY=1: tiny config on CPU)"; else
    echo "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"; fi
  python3 - <<'EOF'
import importlib
for name in ("torch", "triton", "transformers", "bitsandbytes", "trl", "peft", "datasets", "accelerate"):
    try:
        print(f"VERSION: {name} {importlib.import_module(name).__version__}")
    except Exception as exc:  # a missing wheel shows here, before any section runs
        print(f"VERSION: {name} MISSING ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
EOF
} 2>&1 | grep -v -i warn | tee "$LOGS/env.log"

# Seconds left of BUDGET, keeping 15 for the summary.
left() { echo $(( START + BUDGET - 15 - $(date +%s) )); }
# Progress bars (loading, saving, TRL's steps) are noise in a log: each redraw (a carriage
# return) becomes its own line and is dropped, so a RESULT line printed after a bar survives.
strip_bars() { tr '\r' '\n' | grep -av -e 'it/s]' -e 's/it]' -e '%|' -e '^[[:space:]]*$' ; }
# run NAME CAP MIN CMD...: CMD under `timeout min(CAP, left)`, skipped when less than MIN is left.
run() {
  local name=$1 cap=$2 min=$3; shift 3
  local t; t=$(left); [ "$t" -gt "$cap" ] && t=$cap
  echo "== $name (timeout ${t} s; $(( $(date +%s) - START )) s so far)"
  if [ "$t" -lt "$min" ]; then
    echo "SKIPPED: ${t} s left of BUDGET=${BUDGET}, the section needs >= ${min} s" | tee "$LOGS/$name.log"
    return
  fi
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$t" "$@" 2>&1 | strip_bars > "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "TIMEOUT: killed after ${t} s" >> "$LOGS/$name.log"
  echo "EXIT: rc=$rc wall=$(( $(date +%s) - t0 ))s" >> "$LOGS/$name.log"
  grep -a -e '^RESULT' -e '^PLAN' -e '^FIT' -e '^TIMEOUT' -e '^EXIT' "$LOGS/$name.log" \
    || tail -5 "$LOGS/$name.log"
}

ol=(python3 benchmarks/bench_train_step.py --config "$CONFIG" --layer "$LAYER" --new-tokens "$NEW"
    --root "$ROOT" --decode-modes=)
trl=(python3 .anchors/trl_grpo_memory.py --config "$CONFIG" --gen 8 --completion "$NEW" --steps 2
     --root "$ROOT" --layer "$LAYER")
trl_missing=""
if [ ! -f .anchors/trl_grpo_memory.py ]; then
  trl_missing="no .anchors/trl_grpo_memory.py: run benchmarks/prepare_side_by_side.sh on the CPU machine"
elif grep -q -E "VERSION: (trl|peft|datasets) MISSING" "$LOGS/env.log"; then  # imported above
  trl_missing=$(grep -E "VERSION: (trl|peft|datasets) MISSING" "$LOGS/env.log" | tr '\n' ' ')
fi
for section in $SECTIONS; do
  case $section in trl_*) if [ -n "$trl_missing" ]; then
    echo "== $section"; echo "SKIPPED: $trl_missing" | tee "$LOGS/$section.log"; continue; fi ;; esac
  case $section in
    ol_beta0)          run ol_beta0 240 60 "${ol[@]}" --beta 0 --steps "$STEPS" ;;
    trl_qlora)         run trl_qlora 220 60 "${trl[@]:0:2}" qlora "${trl[@]:2}" ;;
    trl_onelayer_bf16) run trl_onelayer_bf16 150 45 "${trl[@]:0:2}" onelayer-bf16 "${trl[@]:2}" ;;
    ol_beta004)        run ol_beta004 150 45 "${ol[@]}" --beta 0.04 --steps 2 ;;
    fit)               run fit 420 45 python3 benchmarks/side_by_side_fit.py --config "$CONFIG" \
                         --layer "$LAYER" --group-size 8 --micro-batch 1 --root "$ROOT" $FIT_ARGS ;;
    *) echo "unknown section $section" ;;
  esac
done

echo "== summary ($(( $(date +%s) - START )) s so far)"
python3 benchmarks/side_by_side_summary.py "$LOGS" | tee "$LOGS/summary.md"
echo "total $(( $(date +%s) - START )) s"
