"""Loading tasks from local files the tests write, with the real datasets' field names."""
import json
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from onelayer.errors import UserError
from onelayer.tasks import TASK_NAMES, load_task

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def write_jsonl(path, rows, blank_after=None):
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


QA = [{"question": f"What is {i}+{i}?", "answer": f"{i}+{i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}
      for i in range(10)]


# -- file formats ----------------------------------------------------------------------------

def test_jsonl_json_parquet_give_the_same_rows(tmp_path):
    jl = write_jsonl(tmp_path / "d.jsonl", QA)
    js = tmp_path / "d.json"
    js.write_text(json.dumps({"data": QA}))
    pqf = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(QA), pqf)
    tasks = [load_task(str(p), test_size=2) for p in (jl, js, pqf)]
    for task in tasks:
        assert len(task.train) == 8 and len(task.test) == 2
        assert task.extra["kind"] == "math"
    assert tasks[0].train == tasks[1].train == tasks[2].train
    row = tasks[0].train[0]
    assert row["answer"].endswith(f"#### {row['line'] * 2 - 2}")
    assert task.reward(f"\\boxed{{{row['line'] * 2 - 2}}}", row) == 1.0


def test_field_mapping(tmp_path):
    rows = [{"q": "1+1?", "gold": "2", "id": 1}, {"q": "2+2?", "gold": "4", "id": 2},
            {"q": "3+3?", "gold": "6", "id": 3}]
    task = load_task(write_jsonl(tmp_path / "m.jsonl", rows), prompt_field="q",
                     answer_field="gold", test_size=1, seed=3)
    everything = task.train + task.test
    assert sorted(r["answer"] for r in everything) == ["2", "4", "6"]
    assert all(task.prompt(r).startswith(r["prompt"]) and "\\boxed{}" in task.prompt(r)
               for r in everything)
    with pytest.raises(UserError, match="no row has all of the fields"):
        load_task(str(tmp_path / "m.jsonl"), answer_field="nope")


def test_missing_fields_reported_by_line(tmp_path):
    rows = [QA[0], {"question": "no answer here"}, QA[1], {"answer": "#### 3"},
            {"question": "null answer", "answer": None}, QA[2], QA[3]]
    path = write_jsonl(tmp_path / "gaps.jsonl", rows, blank_after=1)  # line 2 is blank
    with pytest.warns(UserWarning) as caught:
        task = load_task(path, test_size=1)
    message = str(caught[0].message)
    assert "skipped 3 of 7 rows" in message
    assert "line 3 (answer)" in message and "line 5 (question)" in message
    assert "line 6 (answer)" in message
    assert sorted(r["line"] for r in task.train + task.test) == [1, 4, 7, 8]


@pytest.mark.parametrize("content,match", [
    ("", "holds no rows"),
    ("\n\n", "holds no rows"),
    ('{"question": "a", "answer": "1"}\n{"question": \n', "line 2: not valid JSON"),
    ('[1, 2]\n', "line 1: expected a JSON object"),
])
def test_empty_or_malformed_jsonl(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=match):
        load_task(str(path))


def test_malformed_json_parquet_and_missing_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_task(str(bad))
    bad.write_text('{"a": [], "b": []}')
    with pytest.raises(UserError, match="list of objects"):
        load_task(str(bad))
    broken = tmp_path / "bad.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(UserError, match="not a readable parquet"):
        load_task(str(broken))
    with pytest.raises(UserError, match="does not exist"):
        load_task(str(tmp_path / "absent.jsonl"))
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(UserError, match="no rows"):
        load_task(str(empty))


def test_unknown_names_and_options(tmp_path):
    with pytest.raises(UserError, match="unknown task 'gsm9k'"):
        load_task("gsm9k")
    with pytest.raises(UserError, match="option.*colour"):
        load_task(write_jsonl(tmp_path / "d.jsonl", QA), colour="blue")
    with pytest.raises(UserError, match="unknown reward"):
        load_task(str(tmp_path / "d.jsonl"), reward="poetry")
    assert set(TASK_NAMES) >= {"arithmetic", "gsm8k", "math", "numina", "deepscaler", "mbpp",
                               "humaneval"}


def test_test_split_of_a_single_file_is_refused(tmp_path):
    # A file has one split: its "test split" would be its own training rows.
    path = write_jsonl(tmp_path / "d.jsonl", QA)
    with pytest.raises(UserError, match="single file with one split"):
        load_task(path, test_split="test")
    task = load_task(path, test_size=2)
    assert not {r["prompt"] for r in task.test} & {r["prompt"] for r in task.train}


def test_unreachable_hub_name_is_a_user_error():
    start = time.monotonic()
    with pytest.raises(UserError, match="could not load dataset"):
        load_task("onelayer-tests/no-such-dataset")
    assert time.monotonic() - start < 30


def test_hub_code_path_with_splits(tmp_path, monkeypatch):
    """A dataset directory goes through datasets.load_dataset, with named splits."""
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "gsm8k_copy"
    root.mkdir()
    write_jsonl(root / "train.jsonl", QA[:6])
    write_jsonl(root / "test.jsonl", QA[6:])
    task = load_task("gsm8k", dataset=str(root), split="train", test_dataset=str(root),
                     test_split="test")
    assert [r["line"] for r in task.train] == list(range(1, 7))
    assert [r["prompt"] for r in task.test] == [r["question"] for r in QA[6:]]
    with pytest.raises(UserError, match="could not load dataset"):
        load_task("gsm8k", dataset=str(root), split="validation")


# -- built-in definitions on local copies with the real field names -------------------------

def test_gsm8k_builtin(tmp_path):
    task = load_task("gsm8k", dataset=write_jsonl(tmp_path / "g.jsonl", QA), test_size=2,
                     format_bonus=0.1, system_prompt="Be brief.")
    assert task.chat and task.system_prompt == "Be brief."
    row = task.train[0]
    value = row["answer"].rsplit("#### ", 1)[1]
    assert task.prompt(row).startswith(row["prompt"])
    assert task.reward(f"... so \\boxed{{{value}}}", row) == pytest.approx(1.1)
    assert task.reward("\\boxed{-1}", row) == pytest.approx(0.1)
    assert task.reward("I do not know", row) == 0.0
    assert task.rewards([f"#### {value}", "#### -1"], [row, row]) == [pytest.approx(1.1),
                                                                      pytest.approx(0.1)]


def test_math_builtin_with_math500_test_split(tmp_path):
    train = [{"problem": "Solve $3x = 14$.", "level": "Level 2", "type": "Algebra",
              "solution": "Divide: $x = \\boxed{\\frac{14}{3}}$."},
             {"problem": "Compute $1+1$.", "level": "Level 1", "type": "Prealgebra",
              "solution": "It is $\\boxed{2}$."}]
    test = [{"problem": "Convert $(0,3)$ to polar.", "solution": "...",
             "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus",
             "level": 2, "unique_id": "test/precalculus/807.json"}]
    pq.write_table(pa.Table.from_pylist(train), tmp_path / "math.parquet")
    pq.write_table(pa.Table.from_pylist(test), tmp_path / "math500.parquet")
    task = load_task("math", dataset=str(tmp_path / "math.parquet"),
                     test_dataset=str(tmp_path / "math500.parquet"))
    assert len(task.train) == 2 and len(task.test) == 1
    assert task.reward("\\boxed{4\\frac{2}{3}}", task.train[0]) == 1.0
    assert task.reward("\\boxed{(3, \\frac{\\pi}{2})}", task.test[0]) == 1.0
    assert task.reward("\\boxed{(3, \\pi)}", task.test[0]) == 0.0
    assert "\\boxed{}" in task.prompt(task.test[0])


def test_numina_and_deepscaler_builtins(tmp_path):
    numina = [{"source": "olympiads", "problem": f"Find $n$ with $n + {i} = {2 * i}$.",
               "solution": f"Subtracting, $n = \\boxed{{{i}}}$.",
               "messages": [{"role": "user", "content": "..."}]} for i in range(5)]
    task = load_task("numina", dataset=write_jsonl(tmp_path / "n.jsonl", numina), test_size=1)
    row = task.train[0]
    assert task.reward(f"\\boxed{{{row['line'] - 1}}}", row) == 1.0
    deep = [{"problem": f"What is ${i}/4$ in lowest terms?", "answer": f"\\frac{{{i}}}{{4}}",
             "solution": "..."} for i in (1, 3, 5, 7)]
    task = load_task("deepscaler", dataset=write_jsonl(tmp_path / "d.jsonl", deep), test_size=1)
    row = task.train[0]
    assert task.reward(f"The answer is {(2 * row['line'] - 1) / 4}", row) == 1.0


MBPP = [{"task_id": 11, "text": "Write a python function to remove first and last occurrence "
         "of a given character from the string.",
         "code": "def remove_Occ(s,ch): \r\n    i = s.find(ch)\r\n    if i >= 0: s = s[:i] + s[i+1:]\r\n"
                 "    j = s.rfind(ch)\r\n    if j >= 0: s = s[:j] + s[j+1:]\r\n    return s",
         "test_list": ['assert remove_Occ("hello","l") == "heo"',
                       'assert remove_Occ("abcda","a") == "bcd"',
                       'assert remove_Occ("PHP","P") == "H"'],
         "test_setup_code": "", "challenge_test_list": []},
        {"task_id": 12, "text": "Write a function to add two numbers.", "code": "def add(a, b): return a + b",
         "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"],
         "test_setup_code": "import math", "challenge_test_list": []},
        {"task_id": 13, "text": "Broken row without tests.", "code": "pass", "test_list": [],
         "test_setup_code": "", "challenge_test_list": []}]


def test_mbpp_builtin(tmp_path):
    with pytest.warns(UserWarning, match="line 3 \\(test_list\\)"):
        task = load_task("mbpp", dataset=write_jsonl(tmp_path / "mbpp.jsonl", MBPP),
                         test_size=1, seed=1, timeout=5)
    rows = {r["line"]: r for r in task.train + task.test}
    first = rows[1]
    assert 'assert remove_Occ("hello","l") == "heo"' in task.prompt(first)
    assert "```python" in task.prompt(first)
    right = f"```python\n{MBPP[0]['code']}\n```"
    partial = "```python\ndef remove_Occ(s, ch):\n    return s[1:-1]\n```"
    assert task.rewards([right, partial], [first, first]) == [1.0, pytest.approx(2 / 3)]
    assert task.reward("def add(a, b):\n    return math.fsum([a, b])", rows[2]) == 1.0


def test_humaneval_builtin(tmp_path):
    prompt = 'def add(a: int, b: int) -> int:\n    """Add two numbers."""\n'
    rows = [{"task_id": f"HumanEval/{i}", "prompt": prompt, "canonical_solution": "    return a + b\n",
             "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(0, 0) == 0\n",
             "entry_point": "add"} for i in range(3)]
    task = load_task("humaneval", dataset=write_jsonl(tmp_path / "he.jsonl", rows), test_size=1)
    row = task.train[0]
    assert prompt in task.prompt(row)
    whole = f"```python\n{prompt}    return a + b\n```"
    body_only = "    return a + b\n"  # a base model continuing the prompt
    wrong = f"```python\n{prompt}    return a - b\n```"
    assert task.rewards([whole, body_only, wrong], [row] * 3) == [1.0, 1.0, 0.0]


def test_generic_code_dataset(tmp_path):
    rows = [{"prompt": "Define sq(x).", "tests": ["assert sq(2) == 4", "assert sq(3) == 9"]}] * 3
    task = load_task(write_jsonl(tmp_path / "c.jsonl", rows), test_size=1)
    assert task.extra["kind"] == "code"
    assert task.reward("def sq(x):\n    return x * x", task.train[0]) == 1.0
    assert task.reward("def sq(x):\n    return 4", task.train[0]) == 0.5


# -- test sets: scored, never trained on -----------------------------------------------------

def test_test_sets_read_the_real_field_names(tmp_path):
    """Local copies with the hub datasets' fields: OlympiadBench's final_answer is a list
    (several answers for some problems), AMC23's answer a float."""
    olympiad = [{"question": "Solve 2x = 1.", "final_answer": ["$\\frac{1}{2}$"], "unit": None},
                {"question": "Find all x with x^2 = 1.", "final_answer": ["$-1$", "$1$"],
                 "unit": None}]
    table = pa.table({k: [r[k] for r in olympiad] for k in ("question", "final_answer")})
    pq.write_table(table, tmp_path / "o.parquet")
    for copy in (write_jsonl(tmp_path / "o.jsonl", olympiad), str(tmp_path / "o.parquet")):
        task = load_task("olympiadbench", dataset=copy)
        assert len(task.train) == 0
        assert [r["answer"] for r in task.test] == ["\\frac{1}{2}", "-1, 1"]
        assert task.reward("so \\boxed{0.5}", task.test[0]) == 1.0
        assert task.reward("\\boxed{1, -1}", task.test[1]) == 1.0
        assert task.reward("\\boxed{1}", task.test[1]) == 0.0
    amc = load_task("amc23", dataset=write_jsonl(tmp_path / "a.jsonl", [
        {"id": 0, "question": "How many?", "answer": 27.0, "url": "x"}]))
    (row,) = amc.test
    assert (row["prompt"], row["answer"]) == ("How many?", "27.0")
    assert amc.reward("\\boxed{27}", row) == 1.0 and amc.prompt(row).startswith("How many?")
    aime = write_jsonl(tmp_path / "aime.jsonl", [{"problem": "Find N.", "answer": "204",
                                                  "solution": "..."}])
    for name in ("aime24", "aime25"):
        (row,) = load_task(name, dataset=aime).test
        assert (row["prompt"], row["answer"]) == ("Find N.", "204")
    math500 = write_jsonl(tmp_path / "m.jsonl", [{"problem": "2+2?", "solution": "\\boxed{4}",
                                                  "answer": "4", "level": 1}])
    (row,) = load_task("math500", dataset=math500).test
    assert (row["prompt"], row["answer"], row["level"]) == ("2+2?", "4", 1)


def test_eval_task_names_expand_suites_in_order_once():
    from onelayer.tasks import BENCHMARK_NAMES, eval_task_names
    from onelayer.tasks.catalog import BENCHMARKS

    assert set(BENCHMARK_NAMES) == set(BENCHMARKS)
    assert eval_task_names(["paper-math", "gsm8k, aime24", " amc23 ,"]) == [
        "math500", "gsm8k", "olympiadbench", "amc23", "aime24"]
    assert eval_task_names([]) == []
    with pytest.raises(UserError, match="test set .*amc23"):
        load_task("amc24")
