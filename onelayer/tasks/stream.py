"""The stream of a task's training prompts: a seeded shuffle, cycling, with the prompts too
long for --max-prompt-tokens skipped and counted; on several ranks, each rank's lane of it for
dynamic-sampling refills (onelayer.distributed)."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from .. import distributed


class TrainingRows:
    """A task's training rows in a seeded shuffle, cycling. Rows whose prompt is longer than
    --max-prompt-tokens are skipped and counted in `dropped` (each row is measured once)."""

    def __init__(self, rows, seed: int, fits: Callable[[dict], bool]):
        self.rows, self.fits = rows, fits
        self.order = random.Random(seed).sample(range(len(rows)), len(rows))
        self.drawn = 0
        self.dropped = 0
        self.fit: dict[int, bool] = {}

    def take(self, n: int) -> list[dict]:
        """The next n rows that fit (the caller has checked that at least one does)."""
        lane = Lane(self, self.drawn, rank=0, world=1)
        picks = lane.take(n)
        self.drawn += lane.used
        self.dropped += lane.dropped
        return picks

    def at(self, position: int) -> dict | None:
        """The row at `position` of the stream; None when its prompt is too long."""
        i = self.order[position % len(self.order)]
        if i not in self.fit:
            self.fit[i] = self.fits(self.rows[i])
        return self.rows[i] if self.fit[i] else None

    def lane(self) -> "Lane":
        """This rank's refills for dynamic sampling, from the current position on."""
        return Lane(self, self.drawn, distributed.rank(), distributed.world_size())

    def settle(self, lane: "Lane") -> None:
        """Move past the rows every rank's lane passed over: the next position (and the count of
        dropped rows) are then the same on every rank, as a resumed run needs. A collective
        on several ranks."""
        table = distributed.every_rank([lane.used, lane.dropped], "agreeing on the data position")
        self.drawn = lane.start + int(max(used for used, _ in table)) * lane.world
        self.dropped += int(sum(dropped for _, dropped in table))


@dataclass
class Lane:
    """One rank's further rows for dynamic-sampling refills: positions start + rank,
    start + rank + world, start + rank + 2 world, ... of the shared stream. Ranks that refill by
    different amounts draw different rows without talking to each other; `TrainingRows.settle`
    then moves every rank past the longest lane used (rows the others skipped are not seen
    again until the stream cycles). On one rank the lane is the stream itself."""
    rows: TrainingRows
    start: int
    rank: int
    world: int
    used: int = 0      # positions of the lane passed over
    dropped: int = 0   # of them, prompts too long for --max-prompt-tokens

    def take(self, n: int) -> list[dict]:
        picks = []
        while len(picks) < n:
            row = self.rows.at(self.start + self.rank + self.used * self.world)
            self.used += 1
            if row is None:
                self.dropped += 1
            else:
                picks.append(row)
        return picks
