"""Loading a large local dataset: peak memory and time until training can draw rows.

    python benchmarks/bench_data_load.py                          # this checkout, 1M rows
    python benchmarks/bench_data_load.py --baseline /work/main    # and another checkout
    python benchmarks/bench_data_load.py --rows 100000 --keep /tmp/bench-data

Writes a parquet file of --rows rows (a "question" of ~200 characters, an "answer") into a
temporary directory, then, for each checkout, runs a fresh Python process that imports it
(PYTHONPATH=<checkout>), calls load_task(file, test_size=1000) and draws the first 16 rows the
way the trainer does (a seeded shuffle of all row positions, then rows[i]). The new code is
run twice: with an empty datasets cache (the file is converted to Arrow once) and again with
that cache. Reported per run: seconds from load_task to the 16th row, peak RSS of the process
(ru_maxrss) and that peak minus the RSS before load_task. math-verify (which building a math
task imports) and pyarrow are imported before the clock starts, so the figures are the data
path's. Prints a markdown table for benchmarks/RESULTS.md. CPU only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, os, random, resource, sys, time, warnings
import math_verify, pyarrow, pyarrow.parquet  # imported before the clock: not the data path
warnings.simplefilter("ignore")
def rss_mib():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmRSS")) / 1024
from onelayer.tasks import load_task
before = rss_mib()
t0 = time.perf_counter()
task = load_task(sys.argv[1], test_size=1000)
t_loaded = time.perf_counter()
rows = task.train
order = random.Random(0).sample(range(len(rows)), len(rows))  # as tasks.stream.TrainingRows
drawn = [rows[i] for i in order[:16]]
t_drawn = time.perf_counter()
assert len(drawn) == 16 and all(r["prompt"] and r["answer"] for r in drawn)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"load_s": t_loaded - t0, "total_s": t_drawn - t0, "peak_mib": peak,
                  "before_mib": before, "train_rows": len(rows),
                  "row_type": type(rows).__name__}))
"""

WORDS = ("the of a to in is that for on with as by triangle integer sum product prime number "
         "find compute how many what value if then let be real positive area circle square "
         "probability digits remainder divided equation solve").split()


def write_parquet(path: Path, n: int, seed: int = 0) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(seed)
    writer = None
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        lengths = rng.integers(26, 40, size=m)  # words: ~160-250 characters
        picks = rng.integers(0, len(WORDS), size=int(lengths.sum()))
        questions, at = [], 0
        for i, k in enumerate(lengths):
            words = [WORDS[j] for j in picks[at:at + k]]
            at += k
            questions.append(f"Problem {start + i}: " + " ".join(words) + "?")
        answers = [str(int(v)) for v in rng.integers(0, 10_000, size=m)]
        table = pa.table({"question": questions, "answer": answers})
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def run(code: str, data: Path, cache: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": code, "HF_DATASETS_CACHE": str(cache),
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(data)], env=env, text=True,
                         capture_output=True, cwd=tempfile.gettempdir())
    if out.returncode:
        sys.exit(f"run with PYTHONPATH={code} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--baseline", help="another checkout to measure (e.g. /work/main)")
    parser.add_argument("--keep", help="write the data and cache here and keep them")
    args = parser.parse_args()
    here = str(Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        data = root / "train.parquet"
        t0 = time.perf_counter()
        write_parquet(data, args.rows)
        print(f"wrote {args.rows} rows, {data.stat().st_size / 2**20:.0f} MiB parquet, in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
        runs = []
        if args.baseline:
            runs.append((f"{args.baseline} (rows as Python dicts)",
                         run(args.baseline, data, root / "cache-baseline")))
        runs.append(("this checkout, empty datasets cache", run(here, data, root / "cache")))
        runs.append(("this checkout, cache from the run above", run(here, data, root / "cache")))
    print("| code | rows | train rows type | load + 16 rows (s) | peak RSS (MiB) | "
          "peak - RSS before load (MiB) |")
    print("|---|---:|---|---:|---:|---:|")
    for label, r in runs:
        print(f"| {label} | {args.rows:,} | {r['row_type']} | {r['total_s']:.1f} | "
              f"{r['peak_mib']:.0f} | {r['peak_mib'] - r['before_mib']:.0f} |")


if __name__ == "__main__":
    main()
