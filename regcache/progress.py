"""Progress for people and for log files: a tqdm bar on a terminal, a summary line every ``interval`` seconds
elsewhere (CI, nohup, SLURM), where tqdm would write a line (or a carriage return) per update."""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Iterable, Iterator, TextIO

#: seconds between summary lines outside a terminal
LOG_INTERVAL = 30.0


class LogProgress:
    """tqdm's ``update``/``close``/iteration, writing ``desc: n/total unit (p%), rate, elapsed`` lines instead."""

    def __init__(self, iterable: Iterable | None = None, total: float | None = None, desc: str = "",
                 unit: str = "it", stream: TextIO | None = None, interval: float = LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic):
        self.iterable, self.desc, self.unit, self.interval, self.clock = iterable, desc, unit, interval, clock
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.stream = stream if stream is not None else sys.stderr
        self.n, self.start = 0, clock()
        self.last, self.closed = self.start, False

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.clock() - self.last >= self.interval:
            self._line()

    def close(self) -> None:
        if not self.closed and self.n:
            self._line(final=True)
        self.closed = True

    def _line(self, final: bool = False) -> None:
        now = self.clock()
        self.last = now
        elapsed = now - self.start
        done = f"{self.n:g}/{self.total:g}" if self.total else f"{self.n:g}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = f", {self.n / elapsed:.1f} {self.unit}/s" if elapsed > 0 else ""
        left = (f", about {_duration((self.total - self.n) * elapsed / self.n)} left"
                if self.total and self.n and not final and elapsed > 0 else "")
        self.stream.write(f"{self.desc}: {done} {self.unit}{pct}{rate}, {_duration(elapsed)}{left}"
                          f"{' (done)' if final else ''}\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    """``42 s``, ``3 min 20 s``, ``2 h 05 min``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class _Off:
    """A disabled bar: every call does nothing."""

    def __init__(self, iterable: Iterable | None = None):
        self.iterable = iterable

    def __iter__(self) -> Iterator:
        return iter(self.iterable)

    def update(self, n: float = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "", unit: str = "it",
             disable: bool = False, stream: TextIO | None = None, interval: float = LOG_INTERVAL) -> Any:
    """A tqdm bar when ``stream`` (default stderr) is a terminal, else a `LogProgress`; nothing when disabled."""
    if disable:
        return _Off(iterable)
    stream = stream if stream is not None else sys.stderr
    if stream.isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True, smoothing=0.1)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, stream=stream, interval=interval)
