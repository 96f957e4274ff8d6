#!/usr/bin/env bash
# Run HERE (the CPU machine, registries reachable), in the checkout that the device tool sends,
# before benchmarks/side_by_side.sh runs on the lent GPU machine (which reaches nothing):
#   1. copies the TRL anchor (../shared/anchors, or $ANCHORS) into .anchors/ (git-ignored),
#   2. downloads into .whl/ (git-ignored) the wheels that the GPU image lacks: bitsandbytes and
#      transformers (onelayer: NF4; the image's transformers 5.17 is below our floor 5.20), trl,
#      datasets, dill and multiprocess (TRL; the image has peft 0.21, pandas, pyarrow, xxhash,
#      fsspec, jinja2, psutil, accelerate: see /work/.library/device/KINDS.md),
#   3. checks what travels against the device tool's 64 MiB: tracked and untracked files that git
#      does not ignore + .whl + .anchors.
#     bash benchmarks/prepare_side_by_side.sh
set -eu
cd "$(dirname "$0")/.."
ANCHORS=${ANCHORS:-../shared/anchors}
WHEELS="bitsandbytes==0.50.2 transformers==5.24.0 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19"
LIMIT=$((64 * 1024 * 1024))

git check-ignore -q .whl/x.whl || { echo ".whl/ is not git-ignored: it would travel as part of the tree"; exit 1; }
git check-ignore -q .anchors/x.py || { echo ".anchors/ is not git-ignored"; exit 1; }

mkdir -p .anchors .whl
cp "$ANCHORS"/trl_grpo_memory.py "$ANCHORS"/run_trl_anchor.sh .anchors/
chmod u+w .anchors/*

for spec in $WHEELS; do
  name=${spec%%==*}; version=${spec#*==}
  # One version of each package: pip refuses two of one name in one install.
  for f in .whl/${name}-*.whl; do
    [ -e "$f" ] || continue
    case "$f" in .whl/${name}-${version}-*) ;; *) echo "removing $f (want $version)"; rm -f "$f";; esac
  done
  if ! compgen -G ".whl/${name}-${version}-*.whl" >/dev/null; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl "$spec"
  fi
done

# What travels: every file git does not ignore (tracked or not), and the carried folders.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
whl=$(du -sb .whl | cut -f1)
anchors=$(du -sb .anchors | cut -f1)
total=$((tree + whl + anchors))
ls -l .whl
mib() { awk -v b="$1" 'BEGIN {printf "%.2f MiB", b / 1048576}'; }
echo "travels: tree $(mib $tree) + .whl $(mib $whl) + .anchors $(mib $anchors) = $(mib $total) of $(mib $LIMIT)"
if [ "$total" -gt "$LIMIT" ]; then
  echo "OVER the device tool's limit by $(mib $((total - LIMIT)))"; exit 1
fi
echo 'device command: run(command="OUT=$OUT bash benchmarks/side_by_side.sh 2>&1 | tee $OUT/side.log", carry=[".whl", ".anchors"], timeout_s=590)'
