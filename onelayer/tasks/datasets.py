"""Rows from a dataset: a Hugging Face hub name (with config and split) or a local file.

Local files: .jsonl (one JSON object a line; rows are numbered by file line), .json (a list of
objects, or an object holding one such list; numbered by position), .parquet and .csv
(numbered by position; a CSV's header is not a row and its cells are read as text). A
directory is handed to `datasets.load_dataset` like a hub name, which is how the hub code path
is tested without a network.

Hub splits, .parquet, .csv and .jsonl files stay in Arrow tables that `datasets` keeps
memory-mapped from its cache (HF_DATASETS_CACHE; a local file is converted once, and again
when it changes): a million-row file costs its row count in memory, not a million Python
dicts. Rows become dicts one at a time, when they are drawn (`Rows` in rows.py). A .json file
is one JSON document and is read whole; so is a .jsonl file that `datasets` cannot turn into
a table (columns that mix types, with datasets < 5).

Every row keeps its number so that rows with missing fields can be reported as "line 7"; the
check runs on Arrow columns (null or empty), without building the rows.
"""
from __future__ import annotations

import csv
import json
import re
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import UserError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
_HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
SHOWN = 20  # rows with missing fields named in the warning; the rest are counted


def looks_like_hub_name(source: str) -> bool:
    return "/" in source and bool(_HUB_NAME.match(source))


def is_local(source: str) -> bool:
    return source.endswith(LOCAL_SUFFIXES) or Path(source).exists()


def number_unit(source: str) -> str:
    return "line" if source.endswith(".jsonl") else "row"


# -- tables ----------------------------------------------------------------------------------

class Table:
    """A dataset split: its rows by position (0-based) and each row's number (from 1)."""

    columns: list[str]

    def __len__(self) -> int:
        raise NotImplementedError

    def row(self, i: int) -> dict:
        raise NotImplementedError

    def number(self, i: int) -> int:
        raise NotImplementedError

    def missing(self, field: str) -> np.ndarray:
        """[len] bool: rows where `field` is absent, null, or an empty string or list."""
        raise NotImplementedError


class ArrowTable(Table):
    """A `datasets.Dataset` (memory-mapped Arrow). `numbers[i]` is row i's number when rows
    are not simply numbered 1, 2, ... (a JSONL file with blank lines)."""

    def __init__(self, ds, numbers: np.ndarray | None = None):
        self.ds, self.numbers = ds, numbers
        self.columns = list(ds.column_names)

    def __len__(self) -> int:
        return self.ds.num_rows

    def row(self, i: int) -> dict:
        return self.ds[int(i)]

    def number(self, i: int) -> int:
        return int(self.numbers[i]) if self.numbers is not None else int(i) + 1

    def missing(self, field: str) -> np.ndarray:
        import pyarrow as pa
        import pyarrow.compute as pc
        if field not in self.columns:
            return np.ones(len(self), dtype=bool)
        col = self.ds.data.table.column(field)  # reads validity bitmaps and offsets, not text
        absent = pc.is_null(col)
        if type(self.ds.features.get(field)).__name__ == "Json":  # mixed types, as JSON text
            text = pa.chunked_array([getattr(c, "storage", c) for c in col.chunks],
                                    type=getattr(col.type, "storage_type", col.type))
            absent = pc.or_(absent, pc.is_in(text, pa.array(['""', "[]", "{}", "null"])))
        elif (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
              or pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)):
            # byte length: from the offsets alone (utf8_length would read every character)
            absent = pc.or_(absent, pc.equal(pc.binary_length(col), 0))
        elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            absent = pc.or_(absent, pc.equal(pc.list_value_length(col), 0))
        return absent.fill_null(True).to_numpy(zero_copy_only=False)


class ListTable(Table):
    """Rows already in Python (a .json document; a .jsonl file Arrow cannot hold)."""

    def __init__(self, rows: list[dict], numbers: list[int]):
        self.rows, self.numbers = rows, numbers
        self.columns = list(dict.fromkeys(k for r in rows for k in r))

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, i: int) -> dict:
        return self.rows[i]

    def number(self, i: int) -> int:
        return self.numbers[i]

    def missing(self, field: str) -> np.ndarray:
        return np.fromiter((_missing(r.get(field)) for r in self.rows), dtype=bool,
                           count=len(self.rows))


def _missing(value) -> bool:
    return value is None or (isinstance(value, (str, list, tuple, dict)) and len(value) == 0)


# -- reading ---------------------------------------------------------------------------------

def read_table(source: str, *, config: str | None = None, split: str = "train") -> Table:
    """The rows of `source`; a UserError for a missing, empty or malformed dataset.

    The last few tables are kept: building a task may look at the same split twice.
    """
    return _read_table_cached(source, config, split, _stamp(source))


def _stamp(source: str):
    """Changes when a local file changes, so the cache never serves stale rows."""
    try:
        st = Path(source).stat()
        return (st.st_mtime_ns, st.st_size)
    except OSError:
        return None


@lru_cache(maxsize=4)
def _read_table_cached(source: str, config: str | None, split: str, stamp) -> Table:
    if Path(source).is_dir() or (not is_local(source) and _HUB_NAME.match(source)):
        return _read_hub(source, config, split)
    if not is_local(source):
        raise UserError(f"dataset {source!r} is neither a file nor a hub name (owner/name)")
    path = Path(source)
    if not path.is_file():
        raise UserError(f"dataset file {source} does not exist")
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet,
               ".csv": _read_csv}
    if path.suffix not in readers:
        raise UserError(f"dataset file {source}: use .jsonl, .json, .parquet or .csv")
    table = readers[path.suffix](path)
    if not len(table):
        raise UserError(f"dataset file {source} holds no rows")
    return table


def _load(builder: str, path: Path, **kwargs):
    """The file as a memory-mapped Arrow table, quietly: a parse failure is reported by our own
    reader with its line number, one line, not by datasets' progress bars and error log."""
    import datasets
    from datasets.utils import logging as ds_logging

    bars, level = ds_logging.is_progress_bar_enabled(), ds_logging.get_verbosity()
    ds_logging.disable_progress_bar()
    ds_logging.set_verbosity(ds_logging.CRITICAL + 10)
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    finally:
        ds_logging.set_verbosity(level)
        if bars:
            ds_logging.enable_progress_bar()


def _read_jsonl(path: Path) -> Table:
    # One pass over the bytes (no parsing): every non-blank line must open an object (Arrow's
    # reader would turn `[1, 2]` lines into a "text" column), and blank lines shift the
    # numbering. Arrow then parses; where it fails, the Python reader names the bad line.
    numbers, blank = [], False
    with path.open("rb") as fh:
        for number, line in enumerate(fh, 1):
            text = line.strip()
            if not text:
                blank = True
                continue
            if not text.startswith(b"{"):
                return _read_jsonl_python(path)  # raises with the line number
            numbers.append(number)
    if not numbers:
        return ListTable([], [])
    try:
        ds = _load("json", path)
    except Exception:
        return _read_jsonl_python(path)  # invalid JSON (reported), or mixed types (kept)
    if ds.num_rows != len(numbers):
        return _read_jsonl_python(path)
    return ArrowTable(ds, np.asarray(numbers, dtype=np.int64) if blank else None)


def _read_jsonl_python(path: Path) -> ListTable:
    rows, numbers = [], []
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
            rows.append(row)
            numbers.append(number)
    return ListTable(rows, numbers)


def _read_json(path: Path) -> Table:
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
    return ListTable(data, list(range(1, len(data) + 1)))


def _read_parquet(path: Path) -> Table:
    try:
        return ArrowTable(_load("parquet", path))
    except Exception as e:  # pyarrow raises several kinds for a bad file
        raise UserError(f"{path}: not a readable parquet file ({_one_line(e)})") from None


def _read_csv(path: Path) -> Table:
    import datasets
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            header = next(csv.reader(fh), None)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a UTF-8 CSV file ({e})") from None
    if not header:
        return ListTable([], [])
    if len(set(header)) != len(header) or not all(header):
        raise UserError(f"{path}: the header must name every column once (it reads {header})")
    # Every cell as text: pandas would make an answer column of 2, 3 and one empty cell float
    # ("2.0"). Empty cells are null, so they count as missing.
    features = datasets.Features({name: datasets.Value("string") for name in header})
    try:
        return ArrowTable(_load("csv", path, features=features))
    except Exception as e:
        raise UserError(f"{path}: not a readable CSV file ({_one_line(e)})") from None


def _read_hub(name: str, config: str | None, split: str) -> Table:
    import datasets
    where = name + (f" (config {config})" if config else "") + f", split {split}"
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # not found, no network, bad config or split: all the user's to fix
        raise UserError(f"could not load dataset {where}: {_one_line(e)}") from None
    if not ds.num_rows:
        raise UserError(f"dataset {where} holds no rows")
    return ArrowTable(ds)


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:300]


# -- selecting -------------------------------------------------------------------------------

def select_rows(table: Table, fields: dict[str, str], source: str,
                unit: str = "row") -> np.ndarray:
    """Positions of the rows holding every field in `fields` (canonical name -> the
    dataset's field name), in order.

    Rows missing one are dropped with a warning that names the first few by number; a dataset
    with no usable row is a UserError.
    """
    masks = {f: table.missing(f) for f in dict.fromkeys(fields.values())}
    bad = np.zeros(len(table), dtype=bool)
    for mask in masks.values():
        bad |= mask
    kept = np.flatnonzero(~bad)
    wanted = ", ".join(fields.values())
    if not len(kept):
        found = ", ".join(sorted(table.columns)) or "nothing"
        raise UserError(f"{source}: no row has all of the fields {wanted} (its fields are "
                        f"{found}); map them with --prompt-field / --answer-field / --tests-field")
    skipped = np.flatnonzero(bad)
    if len(skipped):
        shown = [f"{unit} {table.number(i)} ({', '.join(f for f, m in masks.items() if m[i])})"
                 for i in skipped[:SHOWN]]
        more = f"; and {len(skipped) - SHOWN} more" if len(skipped) > SHOWN else ""
        warnings.warn(f"{source}: skipped {len(skipped)} of {len(table)} rows with missing "
                      f"fields: {'; '.join(shown)}{more}", stacklevel=2)
    return kept
