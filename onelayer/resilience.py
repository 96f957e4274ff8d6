"""What keeps a long run alive: halving a batch size when the GPU runs out of memory, and
turning SIGINT / SIGTERM into a clean stop between steps."""
from __future__ import annotations

import contextlib
import gc
import signal
import threading
from typing import Callable, TypeVar

import torch

from .errors import UserError

T = TypeVar("T")


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class HalveOnOOM:
    """A batch size (`knob`, 0 = everything at once) that halves, in steps of `unit` rows, each
    time the device runs out of memory, and keeps its smaller value for the rest of the run.

    `needs(size)` says what the memory plan expects at a size, for the message given when even
    one unit does not fit."""

    def __init__(self, knob: str, size: int, *, unit: int = 1,
                 needs: Callable[[int], str] = lambda size: "",
                 echo: Callable[[str], None] = print):
        self.knob, self.size, self.unit, self.needs, self.echo = knob, size, unit, needs, echo

    def run(self, work: Callable[[int], T], rows: int) -> T:
        """work(size) with size = the current size capped at `rows` (all rows when 0); on
        torch.OutOfMemoryError the memory is freed and work is retried at half the size."""
        while True:
            size = min(self.size or rows, rows)
            try:
                return work(size)
            except torch.OutOfMemoryError:
                free_device_memory()
                smaller = (size // 2) // self.unit * self.unit
                if smaller < self.unit:
                    plan = self.needs(size)
                    raise UserError(f"out of memory even with {self.knob} {size}"
                                    f"{f' ({plan})' if plan else ''}: lower --max-new-tokens or "
                                    "--group-size, or use a card with more memory") from None
                self.echo(f"out of memory: {self.knob} {size} -> {smaller}, retrying")
                self.size = smaller


class StopRequest:
    """Set by the first SIGINT or SIGTERM; a second one abandons the step (KeyboardInterrupt)."""

    def __init__(self):
        self.signal: int | None = None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signal or signal.SIGINT)


@contextlib.contextmanager
def stop_between_steps(echo: Callable[[str], None] = print):
    """Within the block, SIGINT and SIGTERM ask the run to stop after its current step (the
    caller checks `request.signal`); the previous handlers come back afterwards."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request  # signal handlers can only be installed from the main thread
        return

    def handle(signum, frame):
        if request.signal is not None:
            raise KeyboardInterrupt
        request.signal = signum
        echo(f"\n{signal.Signals(signum).name}: stopping after this step to save a checkpoint "
             "(send it again to abandon the step)")

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
