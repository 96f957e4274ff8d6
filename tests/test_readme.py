"""The README's worked example (a local dataset and a TRL-style reward) runs as written, on a
tiny local model instead of a hub download, for one short step."""
import json
import re
import shlex
from pathlib import Path

import pytest

from onelayer.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"


def example() -> tuple[str, list[str]]:
    text = README.read_text()
    section = text[text.index("## Your own data and reward"):]
    code = re.search(r"```python\n# my_rewards.py\n(.*?)```", section, re.S).group(1)
    command = re.search(r"```bash\n(onelayer train .*?)\n```", section, re.S).group(1)
    return code, shlex.split(command)[1:]


def test_the_reward_example_runs(tmp_path, monkeypatch, tiny_models):
    code, args = example()
    monkeypatch.chdir(tmp_path)
    Path("my_rewards.py").write_text(code)
    rows = [(f"{a}+{b}=", a + b) for a in range(100, 140, 3) for b in (11, 57)]
    Path("problems.csv").write_text("question,answer\n" + "".join(f"{q},{a}\n" for q, a in rows))
    # The example as written, then what keeps it local and short (later options win).
    short = ["--model", tiny_models["qwen3"], "--steps", "1", "--prompts-per-step", "4", "--group-size", "4",
             "--max-new-tokens", "8", "--eval-samples", "4", "--output", "run", "--quiet"]
    try:
        main(args + short)
    except SystemExit as exc:
        pytest.fail(f"exit {exc.code}")
    row = json.loads(Path("run/metrics.jsonl").read_text().splitlines()[0])
    assert {"reward/math", "reward/concise", "reward_errors"} <= set(row)
    assert row["reward_errors"] == 0
    # Every row has an answer, so each sample's reward is 1.0 x math + 0.2 x concise.
    assert row["reward_mean"] == pytest.approx(row["reward/math"] + 0.2 * row["reward/concise"])
