#!/usr/bin/env bash
# Run HERE (the CPU machine, registries reachable), in the checkout that the device tool sends,
# before benchmarks/side_by_side.sh runs on the lent GPU machine (which reaches nothing):
#   1. copies the TRL anchor (../shared/anchors, or $ANCHORS) into .anchors/ (git-ignored),
#   2. downloads into .whl/ (git-ignored) the wheels that the GPU image lacks: bitsandbytes and
#      transformers (onelayer: NF4; the image's transformers 5.17 is below our floor 5.20), trl,
#      datasets, dill and multiprocess (TRL; the image has peft 0.21, pandas, pyarrow, xxhash,
#      fsspec, jinja2, psutil, accelerate: see /work/.library/device/KINDS.md),
#   3. trims the bitsandbytes wheel: it ships a library for every CUDA (11.8 to 13.2), ROCm and
#      XPU version, 41 MiB of it, and bitsandbytes loads only the one of torch's CUDA (the GPU
#      image has torch 2.11.0+cu130). Kept: libbitsandbytes_cuda$BNB_CUDA.so (default 130) and
#      libbitsandbytes_cpu.so; the wheel is repacked with its RECORD rewritten, so pip installs it,
#   4. checks what travels against the device tool's 64 MiB: tracked and untracked files that git
#      does not ignore + .whl + .anchors.
#     bash benchmarks/prepare_side_by_side.sh        (BNB_CUDA=132 bash ...: another torch CUDA)
set -eu
cd "$(dirname "$0")/.."
ANCHORS=${ANCHORS:-../shared/anchors}
WHEELS="bitsandbytes==0.50.2 transformers==5.24.0 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19"
LIMIT=$((64 * 1024 * 1024))
BNB_CUDA=${BNB_CUDA:-130}

git check-ignore -q .whl/x.whl || { echo ".whl/ is not git-ignored: it would travel as part of the tree"; exit 1; }
git check-ignore -q .anchors/x.py || { echo ".anchors/ is not git-ignored"; exit 1; }

mkdir -p .anchors .whl
cp "$ANCHORS"/trl_grpo_memory.py "$ANCHORS"/run_trl_anchor.sh .anchors/
chmod u+w .anchors/*

# A bitsandbytes wheel trimmed for another CUDA lacks the library wanted now: download it again.
has_bnb_cuda() {
  python3 -c 'import sys, zipfile
sys.exit(f"bitsandbytes/libbitsandbytes_cuda{sys.argv[2]}.so" not in zipfile.ZipFile(sys.argv[1]).namelist())' "$1" "$BNB_CUDA"
}
for f in .whl/bitsandbytes-*.whl; do
  [ -e "$f" ] || continue
  has_bnb_cuda "$f" || { echo "removing $f (no libbitsandbytes_cuda$BNB_CUDA.so)"; rm -f "$f"; }
done

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

# Every libbitsandbytes_*.so but the CPU one and CUDA $BNB_CUDA's out of the wheel, and out of its
# RECORD (pip reads it); the rest copied as it is (same names, attributes and compression).
trim_bnb() {
  python3 - "$1" "$BNB_CUDA" <<'PY'
import csv, io, os, re, sys, zipfile
path, cuda = sys.argv[1], sys.argv[2]
keep = {"bitsandbytes/libbitsandbytes_cpu.so", f"bitsandbytes/libbitsandbytes_cuda{cuda}.so"}
with zipfile.ZipFile(path) as z:
    infos = z.infolist()
    libraries = {i.filename for i in infos if re.fullmatch(r"bitsandbytes/libbitsandbytes_\w+\.so", i.filename)}
    drop = libraries - keep
    if not keep <= set(z.namelist()):
        sys.exit(f"{path} has no {sorted(keep - set(z.namelist()))}")
    if not drop:
        sys.exit(0)
    with zipfile.ZipFile(path + ".tmp", "w") as out:
        for info in infos:
            if info.filename in drop:
                continue
            data = z.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                rows = [r for r in csv.reader(io.StringIO(data.decode())) if r and r[0] not in drop]
                text = io.StringIO()
                csv.writer(text, lineterminator="\n").writerows(rows)
                data = text.getvalue().encode()
            out.writestr(info, data)
os.replace(path + ".tmp", path)
print(f"{path}: kept {', '.join(sorted(os.path.basename(k) for k in keep))}, removed {len(drop)} libraries")
PY
}
for f in .whl/bitsandbytes-*.whl; do
  [ -e "$f" ] || continue
  trim_bnb "$f"
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
