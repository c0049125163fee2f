"""Progress of long loops: a tqdm bar with an ETA on a terminal, plain log lines elsewhere.

    for batch in progress(batches, desc="[evaluate] decode", unit="batch"):
        ...
    with Progress(total=num_steps, desc="[train] training", unit="step") as bar:
        while ...:
            ...
            bar.update()

On a terminal (stderr is a TTY) tqdm draws a bar with rate and ETA, nested loops included
(pass `leave=False` to an inner loop). Anywhere else (a pipe, a log file, CI, `nohup`) a bar
would write a carriage-return frame per update, so a plain line
    "[evaluate] decode: batch 12/40 (30%), 1m02s elapsed, ETA 2m25s"
is logged instead when the count crosses another `every` fraction of the total, when
`interval_s` seconds have passed since the last line, and once at the end if the last count was
not logged yet: at most 1/every + elapsed/interval_s + 1 lines per loop.

`log` writes a message to stderr above any bar that is being drawn, so messages and bars do not
garble each other; the tools' `log` is this one.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

__all__ = ["Progress", "progress", "log", "format_seconds", "stderr_is_tty"]

T = TypeVar("T")


def log(message: str, file=None) -> None:
    """Write one line to `file` (default: stderr) above any progress bar being drawn, and flush it."""
    file = sys.stderr if file is None else file
    tqdm.write(message, file=file)
    file.flush()


def format_seconds(seconds: float) -> str:
    """A duration as `45s`, `3m05s` or `2h07m` (no fractions: progress lines are for people)."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def stderr_is_tty() -> bool:
    """Whether stderr is a terminal (then bars are drawn, else plain lines are logged)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class Progress:
    """Counts finished units of work and reports them (see the module docstring).

    Args:
        total: the number of units, or None when unknown (then no percentage and no ETA).
        desc: what is being done, e.g. "[calibrate] cosine"; starts every line.
        initial: units already done before this run (a resumed job); the ETA uses only the rate
            of this run.
        unit: the singular noun of what is counted ("layer", "step", "token"): plain lines read
            "desc: unit k/N", the bar shows "units/s".
        sink: where plain lines go (default: `log` above, i.e. stderr).
        every: plain mode, fraction of `total` between two lines, in (0, 1].
        interval_s: plain mode, seconds after which a line is written even without a new fraction.
        leave: terminal mode, keep the finished bar on screen (False for inner loops).
        enabled: False reports nothing (e.g. every rank but 0 of a distributed job).
        tty: force terminal (True) or plain (False) mode; default: whether stderr is a TTY.
    """

    def __init__(
        self,
        total: int | None = None,
        desc: str = "",
        *,
        initial: int = 0,
        unit: str = "item",
        sink: Callable[[str], None] | None = None,
        every: float = 0.1,
        interval_s: float = 30.0,
        leave: bool = True,
        enabled: bool = True,
        tty: bool | None = None,
    ) -> None:
        if total is not None and total < 0:
            raise ValueError(f"total must be >= 0 or None, got {total}")
        if not 0.0 < every <= 1.0:
            raise ValueError(f"every must be in (0, 1], got {every}")
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.total, self.desc, self.count = total, desc, initial
        self._initial, self._unit, self._every, self._interval_s = initial, unit, every, interval_s
        self._sink = sink or log
        self._enabled, self._closed = enabled, False
        self._bar = None
        if enabled and (stderr_is_tty() if tty is None else tty):
            self._bar = tqdm(total=total, desc=desc, initial=initial, unit=unit, leave=leave,
                             file=sys.stderr, dynamic_ncols=True)
        self._start = self._last_line_at = time.monotonic()
        self._last_logged_count = initial
        self._last_mark = self._mark(initial)

    def _mark(self, count: int) -> int:
        """How many whole `every` fractions of `total` `count` has reached (0 when total is unknown)."""
        if not self.total:
            return 0
        return int(count / self.total / self._every + 1e-9)

    def update(self, n: int = 1) -> None:
        """Record `n` more finished units."""
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
            return
        if not self._enabled or self._closed:
            return
        now = time.monotonic()
        mark = self._mark(self.count)
        if mark > self._last_mark or now - self._last_line_at >= self._interval_s:
            self._last_mark = mark
            self._write_line(now)

    def line(self, now: float) -> str:
        """The plain progress line at time `now` (a `time.monotonic()` value)."""
        elapsed = now - self._start
        if not self.total:
            return f"{self.desc}: {self._unit} {self.count}, {format_seconds(elapsed)} elapsed"
        text = f"{self.desc}: {self._unit} {self.count}/{self.total} ({100 * self.count / self.total:.0f}%), " \
               f"{format_seconds(elapsed)} elapsed"
        done_here = self.count - self._initial
        if 0 < done_here and self.count < self.total:
            text += f", ETA {format_seconds(elapsed / done_here * (self.total - self.count))}"
        return text

    def _write_line(self, now: float) -> None:
        self._sink(self.line(now))
        self._last_line_at, self._last_logged_count = now, self.count

    def close(self) -> None:
        """Finish: close the bar, or log the final count if it was not logged yet."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._enabled and self.count != self._last_logged_count:
            self._write_line(time.monotonic())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", **kwargs) -> Iterator[T]:
    """Yield the items of `iterable`, reporting each finished one (after the loop body ran).

    `total` defaults to `len(iterable)` when it has one; `kwargs` are `Progress`'s.
    """
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with Progress(total, desc, **kwargs) as bar:
        for item in iterable:
            yield item
            bar.update()
