"""Progress of long loops: one home for it. `bar(...)` is a tqdm bar when stderr is a terminal,
and otherwise (`clipdistill fit-prompts ... > log 2>&1`, a pipe, a test's capture) an object
with the same small surface that writes a few plain lines through this module's logger: tqdm's
carriage-return frames would make one log line of hundreds of kilobytes.

In a log, a loop says where it is at most every `every` of its total *and* at most every
`min_seconds` (whichever is rarer: every 10% or every 30 s by default), then one line at its
end. The lines go through logging, so the CLI's `-q` hides them and `-v` names this module, as
for every other message (core/logs.py). `enabled=False` (`--no-progress`, a rank other than
the first) shows nothing, on a terminal or not."""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, Optional

log = logging.getLogger(__name__)
_clock = time.monotonic  # tests replace it


def on_terminal() -> bool:
    """Whether stderr, where bars and log lines go, is a terminal now."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # no stream, or a closed one
        return False


def bar(iterable: Optional[Iterable] = None, *, desc: str, total: Optional[float] = None, initial: int = 0,
        unit: str = "it", enabled: bool = True, leave: bool = True, every: float = 0.1,
        min_seconds: float = 30.0, end_line: bool = True):
    """A progress bar over `iterable` (or one advanced with `update(n)`): tqdm on a terminal,
    else a `LogBar`. Both support iteration, `update`, `set_postfix`, `close` and `with`.
    `leave` is tqdm's (keep the finished bar on screen); `every`, `min_seconds` and `end_line`
    shape the plain lines (`end_line=False` where the caller logs its own summary next)."""
    if total is None and iterable is not None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            pass
    if enabled and on_terminal():
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, initial=initial, unit=unit, leave=leave, file=sys.stderr,
                    dynamic_ncols=True)
    return LogBar(iterable, desc=desc, total=total, initial=initial, unit=unit, enabled=enabled, every=every,
                  min_seconds=min_seconds, end_line=end_line)


def duration(seconds: float) -> str:
    """`45 s`, `3 min 20 s`, `2 h 05 min`: a time for a person to read."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


class LogBar:
    """tqdm's surface for a log: plain lines, never a '\\r'. `n` counts as tqdm's does (from
    `initial`; an iterated item counts once the next one is asked for, or the loop ends)."""

    def __init__(self, iterable: Optional[Iterable] = None, *, desc: str, total: Optional[float] = None,
                 initial: int = 0, unit: str = "it", enabled: bool = True, every: float = 0.1,
                 min_seconds: float = 30.0, end_line: bool = True):
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
        self.n = self.initial = initial
        self.enabled, self.every, self.min_seconds, self.end_line = enabled, every, min_seconds, end_line
        self.postfix: dict[str, str] = {}
        self.closed = False
        self.lines = 0  # plain lines written so far
        self.t0 = self._last = _clock()
        self._mark = self._next_mark()

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("this bar has no iterable: advance it with update(n)")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> "LogBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        if not self.enabled or self.closed or (self.total and self.n >= self.total):
            return  # the end has its own line
        now = _clock()
        if now - self._last >= self.min_seconds and (not self.total or self.n >= self._mark):
            self._write(self._line(now))
            self._last, self._mark = now, self._next_mark()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        self.postfix = {k: str(v) for k, v in {**(ordered_dict or {}), **kwargs}.items()}

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.enabled and self.end_line and self.n > self.initial:
            elapsed = _clock() - self.t0
            self._write(f"{self.desc}: {self._count()} in {duration(elapsed)} ({self._rate(elapsed)})"
                        f"{self._postfix()}")

    # ------------------------------------------------------------------ lines
    def _next_mark(self) -> float:
        """The count at the next whole `every` of the total (10%, 20%, ...)."""
        if not self.total or self.every <= 0:
            return 0.0
        step = self.every * self.total
        return (self.n // step + 1) * step

    def _line(self, now: float) -> str:
        elapsed = now - self.t0
        text = f"{self.desc}: {self._count()}"
        if self.total:
            text += f" ({100 * self.n / self.total:.0f}%)"
        text += f", {self._rate(elapsed)}, {duration(elapsed)} elapsed"
        done = self.n - self.initial
        if self.total and done > 0:
            text += f", about {duration(elapsed * (self.total - self.n) / done)} left"
        return text + self._postfix()

    def _count(self) -> str:
        return f"{_num(self.n)}/{_num(self.total)} {self.unit}" if self.total else f"{_num(self.n)} {self.unit}"

    def _rate(self, elapsed: float) -> str:
        rate = (self.n - self.initial) / max(elapsed, 1e-9)
        return f"{rate:.0f} {self.unit}/s" if rate >= 10 else f"{rate:.1f} {self.unit}/s"

    def _postfix(self) -> str:
        return "".join(f", {k} {v}" for k, v in self.postfix.items())

    def _write(self, line: str) -> None:
        self.lines += 1
        log.info("%s", line)
