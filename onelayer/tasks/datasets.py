"""Rows from a dataset: a Hugging Face hub name (with config and split) or a local file.

Local files: .jsonl (one JSON object a line; rows are numbered by file line), .json (a list of
objects, or an object holding one such list; numbered by position) and .parquet (numbered by
position). A directory is handed to `datasets.load_dataset` like a hub name, which is how the
hub code path is tested without a network.

Every row keeps its number so that rows with missing fields can be reported as "line 7".
"""
from __future__ import annotations

import json
import re
import warnings
from functools import lru_cache
from pathlib import Path

from ..errors import UserError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
_HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")

Numbered = list[tuple[int, dict]]  # (line or row number from 1, row)


def looks_like_hub_name(source: str) -> bool:
    return "/" in source and bool(_HUB_NAME.match(source))


def is_local(source: str) -> bool:
    return source.endswith(LOCAL_SUFFIXES) or Path(source).exists()


def read_rows(source: str, *, config: str | None = None, split: str = "train") -> Numbered:
    """All rows of `source`; a UserError for a missing, empty or malformed dataset.

    The last few results are kept (callers must not modify them): building a task may look at
    the same split twice, and a hub split can hold hundreds of thousands of rows.
    """
    return _read_rows_cached(source, config, split, _stamp(source))


def _stamp(source: str):
    """Changes when a local file changes, so the cache never serves stale rows."""
    try:
        st = Path(source).stat()
        return (st.st_mtime_ns, st.st_size)
    except OSError:
        return None


@lru_cache(maxsize=4)
def _read_rows_cached(source: str, config: str | None, split: str, stamp) -> Numbered:
    if Path(source).is_dir() or (not is_local(source) and _HUB_NAME.match(source)):
        return _read_hub(source, config, split)
    if not is_local(source):
        raise UserError(f"dataset {source!r} is neither a file nor a hub name (owner/name)")
    path = Path(source)
    if not path.is_file():
        raise UserError(f"dataset file {source} does not exist")
    if path.suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif path.suffix == ".json":
        rows = _read_json(path)
    elif path.suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        raise UserError(f"dataset file {source}: use .jsonl, .json or .parquet")
    if not rows:
        raise UserError(f"dataset file {source} holds no rows")
    return rows


def _read_jsonl(path: Path) -> Numbered:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}, line {number}: expected a JSON object per line")
            rows.append((number, row))
    return rows


def _read_json(path: Path) -> Numbered:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}: the one list inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(f"{path}: expected a list of objects (or an object with one list)")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"{path}: expected a list of objects")
    return list(enumerate(data, 1))


def _read_parquet(path: Path) -> Numbered:
    import pyarrow.parquet as pq
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several kinds for a bad file
        raise UserError(f"{path}: not a readable parquet file ({_one_line(e)})") from None
    return list(enumerate(table.to_pylist(), 1))


def _read_hub(name: str, config: str | None, split: str) -> Numbered:
    import datasets
    where = name + (f" (config {config})" if config else "") + f", split {split}"
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # not found, no network, bad config or split: all the user's to fix
        raise UserError(f"could not load dataset {where}: {_one_line(e)}") from None
    rows = list(enumerate(ds, 1))
    if not rows:
        raise UserError(f"dataset {where} holds no rows")
    return rows


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:300]


def _missing(value) -> bool:
    return value is None or (isinstance(value, (str, list, tuple, dict)) and len(value) == 0)


def select_rows(rows: Numbered, fields: dict[str, str], source: str,
                unit: str = "row") -> Numbered:
    """Rows holding every field in `fields` (canonical name -> the dataset's field name).

    Rows missing one are dropped with a warning that lists their numbers; a dataset with no
    usable row is a UserError.
    """
    kept, skipped = [], []
    for number, row in rows:
        absent = [f for f in fields.values() if _missing(row.get(f))]
        if absent:
            skipped.append(f"{unit} {number} ({', '.join(absent)})")
        else:
            kept.append((number, row))
    wanted = ", ".join(fields.values())
    if not kept:
        found = ", ".join(sorted(rows[0][1])) if rows else "nothing"
        raise UserError(f"{source}: no row has all of the fields {wanted} (the first row has "
                        f"{found}); map them with --prompt-field / --answer-field / --tests-field")
    if skipped:
        more = f"; and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        shown = "; ".join(skipped[:20]) + more
        warnings.warn(f"{source}: skipped {len(skipped)} of {len(rows)} rows with missing "
                      f"fields: {shown}", stacklevel=2)
    return kept


def number_unit(source: str) -> str:
    return "line" if source.endswith(".jsonl") else "row"
