"""Sokoban: push every box onto a target in a small walled room.

Levels are made by playing backwards from the solved state: boxes start on their targets and a
random walk of the player either steps or pulls the box behind it. Every pull undone is a push,
so the reversed walk solves the level: every generated level is solvable in at most
``walk`` moves. Levels that a short search solves in fewer than ``min_moves`` moves are
rejected, so a task is never a single push. A move that changes nothing (into a wall, or pushing a box into a wall or
another box) is invalid. Reward 1 when all boxes are on targets; a deadlocked room simply runs
out of turns.
"""
from __future__ import annotations

import random

from ...errors import UserError
from .base import TextEnv
from .gridworld import MOVES, Cell, bfs_distances, render, shift

Boxes = frozenset[Cell]
MAX_TRIES = 2000  # level attempts before giving up on an impossible configuration


def push(pos: Cell, boxes: Boxes, move: str, free: frozenset[Cell]) -> tuple[Cell, Boxes] | None:
    """The state after ``move`` (player position, boxes), or None if the move changes nothing.

    ``free`` is the set of floor cells (not walls); the grid border is implicit.
    """
    nxt = shift(pos, move)
    if nxt not in free:
        return None
    if nxt not in boxes:
        return nxt, boxes
    beyond = shift(nxt, move)
    if beyond not in free or beyond in boxes:
        return None
    return nxt, (boxes - {nxt}) | {beyond}


def solvable_within(pos: Cell, boxes: Boxes, targets: Boxes, free: frozenset[Cell],
                    moves: int) -> bool:
    """Whether some sequence of at most ``moves`` moves puts every box on a target (BFS)."""
    frontier, seen = [(pos, boxes)], {(pos, boxes)}
    for _ in range(moves + 1):
        if any(b == targets for _, b in frontier):
            return True
        nxt = [s for p, b in frontier for m in MOVES if (s := push(p, b, m, free)) is not None]
        frontier = [s for s in nxt if s not in seen]
        seen.update(frontier)
    return False


class Sokoban(TextEnv):
    name = "sokoban"
    max_turns = 30
    instructions = (
        "You are the player P in a Sokoban room. Push every box B onto a target T. '#' is a wall, "
        "'.' is floor, '*' is a box on a target, '+' is you standing on a target. You push a box "
        "by walking into it; you cannot pull boxes, and a box cannot be pushed into a wall or "
        "another box. Rows are numbered from the top and columns from the left, starting at 1. "
        "Each turn, reply with exactly one action: up, down, left or right. The observation "
        "lists the valid actions.")

    def __init__(self, *, height: int = 5, width: int = 5, boxes: int | None = None,
                 walk: int = 24, min_moves: int = 4, max_turns: int | None = None,
                 invalid_action_penalty: float | None = None):
        super().__init__(max_turns=max_turns, invalid_action_penalty=invalid_action_penalty)
        if not (3 <= int(height) <= 8 and 3 <= int(width) <= 8):
            raise UserError(f"sokoban: height and width must be between 3 and 8, "
                            f"got {height}x{width}")
        if boxes is not None and not 1 <= int(boxes) <= 3:
            raise UserError(f"sokoban: boxes must be 1, 2 or 3, got {boxes}")
        if not 1 <= int(min_moves) <= int(walk) // 2:
            raise UserError(f"sokoban: need 1 <= min_moves <= walk / 2, got min_moves="
                            f"{min_moves}, walk={walk}")
        self.height, self.width, self.walk = int(height), int(width), int(walk)
        self.min_moves = int(min_moves)
        self.n_boxes = None if boxes is None else int(boxes)  # None: the seed picks 1 or 2
        self.free: frozenset[Cell] = frozenset()
        self.targets: frozenset[Cell] = frozenset()
        self.boxes: Boxes = frozenset()
        self.pos: Cell = (0, 0)

    def _task_key(self) -> str:
        return (f"{self.height}x{self.width},boxes={self.n_boxes or '1-2'},walk={self.walk},"
                f"min_moves={self.min_moves}")

    def _new_task(self, seed: int) -> None:
        rng = random.Random(f"sokoban:{self._task_key()}:{seed}")
        cells = [(r, c) for r in range(self.height) for c in range(self.width)]
        n_boxes = self.n_boxes or rng.randint(1, 2)
        for _ in range(MAX_TRIES):
            # A few inner walls, keeping the floor connected.
            walls = set(rng.sample(cells, rng.randint(0, len(cells) // 6)))
            free = frozenset(c for c in cells if c not in walls)
            if len(bfs_distances(min(free), set(free))) != len(free):
                continue
            targets = frozenset(rng.sample(sorted(free), n_boxes))
            pos = rng.choice(sorted(free - targets))
            boxes = set(targets)
            for _ in range(self.walk):  # backwards play: step, or pull the box behind us
                move = rng.choice(list(MOVES))
                nxt = shift(pos, move)
                if nxt not in free or nxt in boxes:
                    continue
                behind = (2 * pos[0] - nxt[0], 2 * pos[1] - nxt[1])
                if behind in boxes and rng.random() < 0.8:
                    boxes.remove(behind)
                    boxes.add(pos)
                pos = nxt
            boxes = frozenset(boxes)
            if not solvable_within(pos, boxes, targets, free, self.min_moves - 1):
                break
        else:
            raise UserError(f"sokoban: no level found for {self._task_key()} and seed {seed}; "
                            "lower min_moves or use a bigger room")
        self.free, self.targets, self.boxes, self.pos = free, targets, boxes, pos

    def valid_actions(self) -> list[str]:
        return [m for m in MOVES if push(self.pos, self.boxes, m, self.free) is not None]

    def _apply(self, action: str) -> tuple[float, bool]:
        self.pos, self.boxes = push(self.pos, self.boxes, action, self.free)
        success = self.boxes == self.targets
        return (1.0 if success else 0.0), success

    def _describe(self) -> str:
        def glyph(cell: Cell) -> str:
            if cell not in self.free:
                return "#"
            if cell == self.pos:
                return "+" if cell in self.targets else "P"
            if cell in self.boxes:
                return "*" if cell in self.targets else "B"
            return "T" if cell in self.targets else "."

        def where(cells) -> str:
            return ", ".join(f"(row {r + 1}, column {c + 1})" for r, c in sorted(cells))

        placed = len(self.boxes & self.targets)
        return (f"{render(self.height, self.width, glyph)}\n"
                f"You are at row {self.pos[0] + 1}, column {self.pos[1] + 1}. "
                f"Boxes: {where(self.boxes)}. Targets: {where(self.targets)}. "
                f"Boxes on targets: {placed} of {len(self.targets)}.")
