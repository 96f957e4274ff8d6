"""Multi-turn text environments (see base.py for the interface and docs/envs.md for a guide).

``load_env("gridworld")`` builds a built-in environment; ``load_env("pkg.module:Class")`` an
external one with the same interface. Each call returns a fresh, independent instance; the
rollout makes one per parallel episode (or resolves the class once with ``resolve_env``).
"""
from __future__ import annotations

import importlib
import inspect

from ...errors import UserError
from .base import TextEnv, normalize_action

__all__ = ["TextEnv", "normalize_action", "ENV_NAMES", "resolve_env", "load_env"]

ENV_NAMES = ("gridworld", "sokoban", "household")


def _builtin(name: str) -> type:
    if name == "gridworld":
        from .gridworld import GridWorld
        return GridWorld
    if name == "sokoban":
        from .sokoban import Sokoban
        return Sokoban
    from .household import Household
    return Household


def resolve_env(spec: str) -> type:
    """The environment class that ``spec`` names: a built-in name or ``package.module:Class``."""
    spec = spec.strip()
    if spec in ENV_NAMES:
        return _builtin(spec)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"unknown environment {spec!r}: choose one of {', '.join(ENV_NAMES)} "
                        "or give package.module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"environment {spec!r}: cannot import {module_name!r} ({e})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"environment {spec!r}: {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    missing = [m for m in ("reset", "step") if not callable(getattr(obj, m, None))]
    if not inspect.isclass(obj) or missing:
        raise UserError(f"environment {spec!r}: {attr!r} is not an environment class "
                        "(needs reset(seed) and step(action) methods)")
    return obj


def load_env(spec: str, **kwargs) -> TextEnv:
    """A new environment instance; ``kwargs`` go to its constructor (e.g. max_turns=10)."""
    cls = resolve_env(spec)
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        raise UserError(f"environment {spec!r}: bad options {sorted(kwargs)} ({e})") from None
    except ValueError:  # no signature to check (e.g. a C extension): let the call decide
        pass
    return cls(**kwargs)
