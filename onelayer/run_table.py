"""`onelayer runs`: the runs under some directories, a row each: what was trained, how far it
got and how it scored. Read from the files every run writes (run_config.json, manifest.json,
the newest checkpoint of a run that has not finished); nothing is loaded."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .checkpoint import (CHECKPOINTS, CONFIG_FILE, LAYER_FILE, MANIFEST_FILE, SCORES_FILE,
                         checkpoints)
from .errors import UserError

SKIPPED = {CHECKPOINTS, "tensorboard", "wandb"}   # never a run of its own


@dataclass
class RunRow:
    run: str                    # its directory, as found under the roots given
    model: str
    layers: str
    task: str
    algo: str
    lr: float
    steps: str                  # "200", or "120/200" for a run that has not finished
    metric: str
    before: float | None        # None: not scored before (a contribution run: the sweep's base)
    after: float | None         # None: not finished


def find_runs(roots: list[Path]) -> list[Path]:
    """Every directory under `roots` holding a finished run (its layer) or an unfinished one
    (checkpoints only), in path order."""
    found = []
    for root in roots:
        if not root.is_dir():
            raise UserError(f"{root}: no such directory")
        for here, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in SKIPPED)
            if LAYER_FILE in files or checkpoints(Path(here)):
                found.append(Path(here))
    return sorted(found)


def run_row(path: Path) -> RunRow:
    finished = (path / LAYER_FILE).is_file()
    newest = None if finished else checkpoints(path)[-1]
    config = json.loads(((path if finished else newest) / CONFIG_FILE).read_text())
    manifest = _read(path / MANIFEST_FILE)
    # A patch keeps its scores in its manifest; a full-parameter run and a contribution run
    # in scores.json (a contribution run has no before: the sweep's base score is that).
    scores = (manifest.get("scores") or _read(path / SCORES_FILE)) if finished else {}
    layers = manifest.get("layers")
    steps = str(config["steps"])
    if newest is not None:
        steps = f"{int(newest.name.split('-')[1])}/{steps}"
    return RunRow(str(path), config["model"],
                  ",".join(map(str, layers)) if layers else str(config["layer"]),
                  f"env {config['env']}" if config.get("env") else config["task"], config["algo"],
                  config["lr"], steps, scores.get("metric", ""), scores.get("before"),
                  scores.get("after"))


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def run_table(roots: list[Path]) -> list[RunRow]:
    return [run_row(path) for path in find_runs(roots)]


def format_rows(rows: list[RunRow]) -> str:
    def share(x: float | None) -> str:
        return "-" if x is None else f"{x:.1%}"

    header = ("run", "model", "layer", "task", "algo", "lr", "steps", "metric", "before", "after",
              "change")
    body = [(r.run, r.model, r.layers, r.task, r.algo, f"{r.lr:g}", r.steps, r.metric or "-",
             share(r.before), share(r.after),
             "-" if r.before is None or r.after is None else f"{r.after - r.before:+.1%}")
            for r in rows]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in [header, *body])


def as_json(rows: list[RunRow]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=1)
