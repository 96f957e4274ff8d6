"""A small ALFWorld-style household: rooms with receptacles, objects, and one goal per task.

Goals are the four ALFWorld pick-and-place kinds: "put a mug in the cabinet", "put a clean mug
in the coffee machine" (clean it with the sink first), "put a hot apple on the countertop"
(heat it with the microwave), "put a cool egg on the dining table" (cool it with the fridge).
The agent carries one object at a time and acts on the receptacle it stands at; objects in a
closed fridge, microwave, cabinet or drawer are hidden until it is opened. Every task is
solvable: no object of the goal's kind starts in the target, and every receptacle is reachable.

The observation is the full state as the agent perceives it (task, rooms, where it stands, what
it sees there, what it holds) plus the admissible actions, so "look" and "inventory" are valid
but change nothing. Reward 1 when the goal holds (an object of the goal's kind, in the goal's
state, in the target), else 0.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from ...errors import UserError
from .base import TextEnv, normalize_action

# kind -> (openable, preposition for "put X _ Y")
RECEPTACLES = {
    "fridge": (True, "in"), "microwave": (True, "in"), "cabinet": (True, "in"),
    "drawer": (True, "in"), "sink": (False, "in"), "coffee machine": (False, "in"),
    "countertop": (False, "on"), "stove burner": (False, "on"), "dining table": (False, "on"),
    "shelf": (False, "on"), "coffee table": (False, "on"), "side table": (False, "on"),
}
# room -> [(kind, min count, max count)]; the agent starts in the middle of the kitchen.
KITCHEN = [("fridge", 1, 1), ("microwave", 1, 1), ("sink", 1, 1), ("coffee machine", 1, 1),
           ("countertop", 1, 2), ("cabinet", 1, 2), ("drawer", 0, 1), ("stove burner", 0, 1)]
OTHER_ROOMS = {
    "dining room": [("dining table", 1, 1), ("shelf", 0, 1)],
    "living room": [("coffee table", 1, 1), ("side table", 0, 1), ("shelf", 0, 1)],
}
# object kind -> states a goal may ask for
OBJECTS = {
    "mug": ("clean", "hot", "cool"), "cup": ("clean", "hot", "cool"),
    "apple": ("clean", "hot", "cool"), "potato": ("clean", "hot", "cool"),
    "tomato": ("clean", "hot", "cool"), "egg": ("hot", "cool"), "plate": ("clean", "hot", "cool"),
    "bowl": ("clean",), "bread": ("hot",), "lettuce": ("clean", "cool"),
    "knife": ("clean",), "spoon": ("clean",),
}
GOAL_TYPES = ("place", "clean", "heat", "cool")
STATE_OF = {"place": None, "clean": "clean", "heat": "hot", "cool": "cool"}
TOOL_OF = {"clean": "sink", "hot": "microwave", "cool": "fridge"}  # state -> receptacle kind
VERB_OF = {"sink": ("clean", "clean"), "microwave": ("heat", "hot"), "fridge": ("cool", "cool")}


@dataclass(frozen=True)
class Receptacle:
    name: str  # "cabinet 2"; a kind present once has no number
    kind: str
    room: str
    openable: bool
    prep: str


@dataclass(frozen=True)
class Goal:
    kind: str
    state: str | None  # None, "clean", "hot" or "cool"
    target: Receptacle

    def text(self) -> str:
        noun = f"{self.state} {self.kind}" if self.state else self.kind
        return f"put {article(noun)} {self.target.prep} the {self.target.name}"


def article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def numbered(kinds: list[str]) -> list[str]:
    """Names for a list of kinds: 'mug' when there is one mug, 'mug 1', 'mug 2' when two."""
    seen: dict[str, int] = {}
    names = []
    for kind in kinds:
        seen[kind] = seen.get(kind, 0) + 1
        names.append(f"{kind} {seen[kind]}" if kinds.count(kind) > 1 else kind)
    return names


class Household(TextEnv):
    name = "household"
    max_turns = 30
    instructions = (
        "You are in a house with rooms, receptacles (fridge, sink, cabinets, tables...) and "
        "objects. Complete the task given in the observation. You can carry one object at a "
        "time and act on the receptacle you are at; closed receptacles must be opened to see "
        "or put things inside. Actions: go to X, open X, close X, take X from Y, put X in/on Y, "
        "clean X with sink, heat X with microwave, cool X with fridge, look, inventory. Each "
        "turn, reply with exactly one of the valid actions listed in the observation.")

    def __init__(self, *, goals: str | tuple[str, ...] = GOAL_TYPES,
                 max_turns: int | None = None, invalid_action_penalty: float | None = None):
        super().__init__(max_turns=max_turns, invalid_action_penalty=invalid_action_penalty)
        goals = tuple(g.strip() for g in goals.split(",")) if isinstance(goals, str) else goals
        unknown = [g for g in goals if g not in GOAL_TYPES]
        if unknown or not goals:
            raise UserError(f"household: goals must be among {', '.join(GOAL_TYPES)}, "
                            f"got {', '.join(goals) or 'none'}")
        self.goal_types = tuple(goals)
        self.receptacles: list[Receptacle] = []
        self.goal: Goal | None = None
        self.location: Receptacle | None = None  # None: the middle of the kitchen
        self.holding: str | None = None
        self.kind_of: dict[str, str] = {}  # object name -> kind ("mug 2" -> "mug")
        self.where: dict[str, Receptacle] = {}  # object name -> receptacle (not held ones)
        self.states: dict[str, frozenset[str]] = {}  # object name -> {"clean", "hot"|"cool"}
        self.opened: set[str] = set()

    def _task_key(self) -> str:
        return "" if self.goal_types == GOAL_TYPES else "goals=" + "+".join(self.goal_types)

    # -- generation ----------------------------------------------------------------------------
    def _new_task(self, seed: int) -> None:
        rng = random.Random(f"household:{self._task_key()}:{seed}")
        rooms = [("kitchen", KITCHEN)]
        other = rng.choice(sorted(OTHER_ROOMS))
        rooms.append((other, OTHER_ROOMS[other]))
        placed = [(room, kind) for room, layout in rooms
                  for kind, lo, hi in layout for _ in range(rng.randint(lo, hi))]
        names = numbered([kind for _, kind in placed])
        self.receptacles = [Receptacle(name, kind, room, *RECEPTACLES[kind])
                            for name, (room, kind) in zip(names, placed)]

        state = STATE_OF[rng.choice(self.goal_types)]
        kind = rng.choice([k for k, ok in OBJECTS.items() if state is None or state in ok])
        targets = [r for r in self.receptacles
                   if r.kind != "sink" and r.kind != TOOL_OF.get(state)
                   and (r.kind != "coffee machine" or kind in ("mug", "cup"))]
        target = rng.choice(targets)
        self.goal = Goal(kind, state, target)

        others = [k for k in OBJECTS if k != kind]
        kinds = [kind] * rng.randint(1, 2) + [rng.choice(others) for _ in range(rng.randint(2, 4))]
        rng.shuffle(kinds)
        self.where, self.kind_of = {}, dict(zip(numbered(kinds), kinds))
        for obj, obj_kind in self.kind_of.items():
            spots = [r for r in self.receptacles if not (obj_kind == kind and r == target)]
            self.where[obj] = rng.choice(spots)
        self.states = {obj: frozenset() for obj in self.where}
        self.location, self.holding, self.opened = None, None, set()

    # -- state queries -------------------------------------------------------------------------
    def _accessible(self, rec: Receptacle) -> bool:
        return not rec.openable or rec.name in self.opened

    def _contents(self, rec: Receptacle) -> list[str]:
        return sorted(obj for obj, at in self.where.items() if at == rec)

    def _noun(self, obj: str) -> str:
        adjectives = [s for s in ("clean", "hot", "cool") if s in self.states[obj]]
        return article(" ".join([*adjectives, obj]))

    def goal_holds(self) -> bool:
        g = self.goal
        return any(at == g.target and self.kind_of[obj] == g.kind
                   and (g.state is None or g.state in self.states[obj])
                   for obj, at in self.where.items())

    # -- interface hooks -----------------------------------------------------------------------
    def valid_actions(self) -> list[str]:
        actions = []
        here = self.location
        if here is not None:
            if here.openable:
                actions.append(f"{'close' if here.name in self.opened else 'open'} {here.name}")
            if self._accessible(here) and self.holding is None:
                actions += [f"take {obj} from {here.name}" for obj in self._contents(here)]
            if self.holding is not None:
                if self._accessible(here):
                    actions.append(f"put {self.holding} {here.prep} {here.name}")
                if here.kind in VERB_OF:
                    actions.append(f"{VERB_OF[here.kind][0]} {self.holding} with {here.name}")
        actions += [f"go to {r.name}" for r in self.receptacles if r != here]
        return actions + ["look", "inventory"]

    def _aliases(self) -> dict[str, str]:
        """'put X on Y', 'put X in Y' and ALFWorld's literal 'put X in/on Y' all mean the put."""
        here = self.location
        if self.holding is None or here is None or not self._accessible(here):
            return {}
        canonical = f"put {self.holding} {here.prep} {here.name}"
        return {normalize_action(f"put {self.holding} {prep} {here.name}"): canonical
                for prep in ("in", "on", "in/on")}

    def _apply(self, action: str) -> tuple[float, bool]:
        by_name = {r.name: r for r in self.receptacles}
        verb, _, rest = action.partition(" ")
        if verb == "go":
            self.location = by_name[rest.removeprefix("to ")]
        elif verb == "open":
            self.opened.add(rest)
        elif verb == "close":
            self.opened.discard(rest)
        elif verb == "take":
            self.holding = rest.rsplit(" from ", 1)[0]
            del self.where[self.holding]
        elif verb == "put":
            self.where[self.holding], self.holding = self.location, None
        elif verb in ("clean", "heat", "cool"):
            state = VERB_OF[self.location.kind][1]
            old = self.states[self.holding]
            if state != "clean":  # hot and cool replace each other
                old = old - {"hot", "cool"}
            self.states[self.holding] = old | {state}
        # "look" and "inventory" change nothing: the observation already shows it all.
        success = self.goal_holds()
        return (1.0 if success else 0.0), success

    def _describe(self) -> str:
        rooms: dict[str, list[str]] = {}
        for r in self.receptacles:
            rooms.setdefault(r.room, []).append(r.name)
        lines = [f"Your task is to: {self.goal.text()}.",
                 "Rooms: " + "; ".join(f"{room}: {', '.join(names)}"
                                       for room, names in rooms.items()) + "."]
        here = self.location
        if here is None:
            lines.append("You are in the middle of the kitchen.")
        else:
            where = f"You are at the {here.name}, in the {here.room}."
            if not self._accessible(here):
                seen = f"The {here.name} is closed."
            else:
                things = ", ".join(self._noun(o) for o in self._contents(here)) or "nothing"
                opened = f"The {here.name} is open. " if here.openable else ""
                seen = f"{opened}{here.prep.capitalize()} the {here.name} you see {things}."
            lines.append(f"{where} {seen}")
        holding = self._noun(self.holding) if self.holding else "nothing"
        lines.append(f"You are holding {holding}.")
        return "\n".join(lines)
