"""Gridworld maze: walk from A to the goal G around walls with up/down/left/right.

The seed picks the walls, the start and the goal; generation retries until the goal is
reachable and the shortest path is between ``size - 1`` and ``2 * size + 2`` moves (so a
5x5 maze needs 4 to 12 moves, well inside the default 20 turns). Moving into a wall or off
the grid is an invalid action. Reward 1 on reaching the goal, 0 for other valid moves.
"""
from __future__ import annotations

import random
from collections import deque

from ...errors import UserError
from .base import TextEnv

Cell = tuple[int, int]  # (row, column), 0-based inside the border

# Fixed order: valid actions are always listed up, down, left, right.
MOVES: dict[str, Cell] = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}


def shift(cell: Cell, move: str) -> Cell:
    dr, dc = MOVES[move]
    return cell[0] + dr, cell[1] + dc


def bfs_distances(start: Cell, free: set[Cell]) -> dict[Cell, int]:
    """Moves from ``start`` to every reachable cell of ``free``."""
    dist, queue = {start: 0}, deque([start])
    while queue:
        cell = queue.popleft()
        for move in MOVES:
            nxt = shift(cell, move)
            if nxt in free and nxt not in dist:
                dist[nxt] = dist[cell] + 1
                queue.append(nxt)
    return dist


def render(height: int, width: int, glyph) -> str:
    """The grid with a '#' border; ``glyph(cell)`` gives the character of each inner cell."""
    border = "#" * (width + 2)
    rows = ["#" + "".join(glyph((r, c)) for c in range(width)) + "#" for r in range(height)]
    return "\n".join([border, *rows, border])


class GridWorld(TextEnv):
    name = "gridworld"
    max_turns = 20
    instructions = (
        "You are the agent A in a maze drawn as a grid. Reach the goal G. '#' is a wall and '.' "
        "is open floor; rows are numbered from the top and columns from the left, starting at 1. "
        "Each turn, reply with exactly one action: up, down, left or right. Moving into a wall "
        "is invalid. The observation lists the valid actions.")

    def __init__(self, *, size: int = 5, wall_prob: float = 0.25, max_turns: int | None = None,
                 invalid_action_penalty: float | None = None):
        super().__init__(max_turns=max_turns, invalid_action_penalty=invalid_action_penalty)
        if not 3 <= int(size) <= 9:
            raise UserError(f"gridworld: size must be between 3 and 9, got {size}")
        if not 0.0 <= float(wall_prob) <= 0.5:
            raise UserError(f"gridworld: wall_prob must be between 0 and 0.5, got {wall_prob}")
        self.size, self.wall_prob = int(size), float(wall_prob)
        self.walls: frozenset[Cell] = frozenset()
        self.goal: Cell = (0, 0)
        self.pos: Cell = (0, 0)

    def _task_key(self) -> str:
        return f"{self.size}x{self.size},walls={self.wall_prob:g}"

    def _new_task(self, seed: int) -> None:
        n = self.size
        rng = random.Random(f"gridworld:{self._task_key()}:{seed}")
        cells = [(r, c) for r in range(n) for c in range(n)]
        for _ in range(2000):  # a 3x3 maze with half walls still succeeds within a few dozen
            walls = {cell for cell in cells if rng.random() < self.wall_prob}
            free = [cell for cell in cells if cell not in walls]
            if len(free) < 2:
                continue
            start, goal = rng.sample(free, 2)
            steps = bfs_distances(start, set(free)).get(goal)
            if steps is not None and n - 1 <= steps <= 2 * n + 2:
                break
        else:  # not reached for the allowed sizes and wall densities
            raise RuntimeError(f"gridworld: no maze found for seed {seed}")
        self.walls, self.goal, self.pos = frozenset(walls), goal, start

    def _inside_free(self, cell: Cell) -> bool:
        return 0 <= cell[0] < self.size and 0 <= cell[1] < self.size and cell not in self.walls

    def valid_actions(self) -> list[str]:
        return [m for m in MOVES if self._inside_free(shift(self.pos, m))]

    def _apply(self, action: str) -> tuple[float, bool]:
        self.pos = shift(self.pos, action)
        success = self.pos == self.goal
        return (1.0 if success else 0.0), success

    def _describe(self) -> str:
        def glyph(cell: Cell) -> str:
            if cell == self.pos:
                return "A"
            return "G" if cell == self.goal else "#" if cell in self.walls else "."

        (r, c), (gr, gc) = self.pos, self.goal
        return (f"{render(self.size, self.size, glyph)}\n"
                f"You are at row {r + 1}, column {c + 1}. The goal is at row {gr + 1}, "
                f"column {gc + 1}.")
