"""A task's rows as a sequence over a table: len(), rows[i], slices, iteration.

A row becomes a dict only when it is read, so a million-row dataset costs an index array
(8 bytes a row) and the memory-mapped table behind it. Slices and `take` are views too.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import numpy as np

from .datasets import Table


class Rows(Sequence):
    """Rows `index` of `table`, each turned into a task row by make(raw_row, number)."""

    def __init__(self, table: Table, index: np.ndarray, make: Callable[[dict, int], dict]):
        self.table, self.index, self.make = table, np.asarray(index, dtype=np.int64), make

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Rows(self.table, self.index[i], self.make)
        j = int(self.index[i])  # IndexError past the end, negative positions from the end
        return self.make(self.table.row(j), self.table.number(j))

    def __iter__(self):
        for j in self.index:
            yield self.make(self.table.row(int(j)), self.table.number(int(j)))

    def take(self, positions) -> "Rows":
        """The rows at `positions` (into this sequence), as a view."""
        return Rows(self.table, self.index[np.asarray(positions, dtype=np.int64)], self.make)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # mutable-looking and compared by value, like a list

    def __add__(self, other) -> list:
        return list(self) + list(other)

    def __radd__(self, other) -> list:
        return list(other) + list(self)

    def __repr__(self) -> str:
        return f"Rows({len(self)} of {len(self.table)})"
