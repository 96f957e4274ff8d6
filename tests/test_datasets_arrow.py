"""Datasets kept in Arrow tables: rows by index, lazy rows, CSV, rows with missing fields."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from onelayer.tasks import load_task
from onelayer.tasks.datasets import ArrowTable
from onelayer.tasks.rows import Rows


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))


def big_parquet(path, n, holes=()):
    prompts = [f"Problem {i}: what is {i} * 3? " + "x" * (i % 50) for i in range(n)]
    answers = [str(3 * i) for i in range(n)]
    for i, kind in holes:
        if kind == "null":
            answers[i] = None
        else:
            prompts[i] = ""
    pq.write_table(pa.table({"question": prompts, "answer": answers,
                             "level": [i % 5 for i in range(n)]}), path, row_group_size=2048)
    return str(path)


def test_rows_by_index_equal_the_file(tmp_path, monkeypatch):
    path = big_parquet(tmp_path / "big.parquet", 10_000)
    built = []
    original = ArrowTable.row
    monkeypatch.setattr(ArrowTable, "row", lambda self, i: built.append(i) or original(self, i))
    task = load_task(path, test_size=500, seed=1)
    assert not built  # loading and checking fields built no row
    assert isinstance(task.train, Rows) and isinstance(task.train.table, ArrowTable)
    assert task.train.table.ds.cache_files  # memory-mapped from datasets' cache
    assert len(task.train) == 9_500 and len(task.test) == 500
    expected = pq.read_table(path).to_pylist()
    for rows in (task.train, task.test):
        for i in (0, 1, 137, len(rows) // 2, -1):
            row = rows[i]
            source = expected[row["line"] - 1]
            assert row["prompt"] == source["question"] and row["answer"] == source["answer"]
            assert row["level"] == source["level"]  # the other fields come along
    assert len(built) == 10
    lines = [r["line"] for r in task.train[:50]] + [r["line"] for r in task.test]
    assert len(set(lines)) == len(lines)
    assert not {r["line"] for r in task.test} & {r["line"] for r in task.train}
    head = task.test[:3]  # what evaluation and the trainer do with the rows
    assert isinstance(head, Rows) and len(head) == 3 and list(head) == [task.test[i] for i in range(3)]
    assert head == list(head) and head + [] == list(head)
    with pytest.raises(IndexError):
        task.test[500]
    limited = load_task(path, test_size=10, limit=7)
    assert len(limited.train) == 7


def test_missing_fields_reported_by_row_number(tmp_path):
    holes = [(4, "null"), (9, "empty")] + [(100 + i, "null") for i in range(30)]
    path = big_parquet(tmp_path / "holes.parquet", 10_000, holes)
    with pytest.warns(UserWarning) as caught:
        task = load_task(path, test_size=10)
    message = str(caught[0].message)
    assert "skipped 32 of 10000 rows" in message
    assert "row 5 (answer)" in message and "row 10 (question)" in message
    assert "row 101 (answer)" in message and "and 12 more" in message
    assert len(task.train) + len(task.test) == 10_000 - 32
    assert {r["line"] for r in task.test}.isdisjoint({5, 10, 101})


def test_csv_task(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text('question,answer,note\n'
                    '"What is 1+1, in digits?",2,a\n'
                    'no answer here,,b\n'
                    '"A question over\ntwo lines: 2+1?",3,c\n'
                    'What is 2+2?,4,\n'
                    'What is 3+3?,6,d\n')
    with pytest.warns(UserWarning, match=r"skipped 1 of 5 rows.*row 2 \(answer\)"):
        task = load_task(str(path), test_size=1, seed=0)
    rows = {r["line"]: r for r in list(task.train) + list(task.test)}
    assert sorted(rows) == [1, 3, 4, 5]
    assert rows[1]["prompt"] == "What is 1+1, in digits?" and rows[1]["answer"] == "2"  # not 2.0
    assert rows[3]["prompt"] == "A question over\ntwo lines: 2+1?"
    assert rows[4]["note"] is None and rows[5]["note"] == "d"
    assert task.reward("\\boxed{3}", rows[3]) == 1.0


def test_jsonl_in_arrow_keeps_line_numbers_and_mixed_types_fall_back(tmp_path):
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(6)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n\n  \n" +
                    "\n".join(json.dumps(r) for r in rows[3:]) + "\n")
    task = load_task(str(path), test_size=1)
    assert isinstance(task.train.table, ArrowTable)
    lines = {r["line"]: r["prompt"] for r in list(task.train) + list(task.test)}
    assert lines == {1: "q0", 2: "q1", 3: "q2", 6: "q3", 7: "q4", 8: "q5"}
    mixed = tmp_path / "mixed.jsonl"  # a number here, a string there (datasets 5: a Json
    mixed.write_text('{"question": "a", "answer": 1}\n{"question": "b", "answer": "x"}\n'
                     '{"question": "c", "answer": 3}\n{"question": "d", "answer": ""}\n'
                     '{"question": "e", "answer": null}\n{"question": "f", "answer": []}\n')
    with pytest.warns(UserWarning, match=r"skipped 3 of 6 rows.*: line 4 \(answer\); line 5 "
                                         r"\(answer\); line 6 \(answer\)"):
        task = load_task(str(mixed), test_size=1)  # column; datasets 4: Python rows)
    assert sorted(r["answer"] for r in list(task.train) + list(task.test)) == ["1", "3", "x"]
