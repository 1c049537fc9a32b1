"""What a person sees while distillery runs, and where everything else goes.

`say` lines (a stage starting, a stage's key figure, where the results are) reach the
console. `detail` lines (every epoch, every variant built and timed, every load-test phase)
go to the run's log file, `logs/run.log`, and to the console only with --verbose; so do
Python's warnings and the driver's Ray and Serve log lines (`quiet_library_loggers`). A long
phase shows its progress (`progress`): on a terminal a live bar with the time spent and an
estimate of the time left; elsewhere (CI, `ray job submit`) a plain line at most every
`PLAIN_EVERY_S` seconds, so a log stays short.

Module state, like `logging`'s: the console belongs to the process. Without `configure`
(a library user, a test) say lines still print and nothing else changes.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger("distillery")
LOGGER.setLevel(logging.DEBUG)  # each handler filters: the console's by --verbose, the file takes all
LOGGER.propagate = False
PLAIN_EVERY_S = 30.0
# Loggers of the libraries the driver runs; their lines go to the log file unless --verbose.
LIBRARY_LOGGERS = ("ray", "ray.serve", "ray.data", "ray.train", "ray.tune", "py.warnings", "torch", "torchao")


@dataclass
class _State:
    configured: bool = False
    verbose: bool = False
    live: bool = False
    log_file: Path | None = None
    bars: Any = None  # rich.progress.Progress while a live bar shows
    screen: Any = None  # the rich Console it draws on
    open_bars: int = 0
    file_handler: logging.Handler | None = None
    # Each library logger's own (handlers, propagate), kept the first time it is quieted and
    # given back by the next `configure` (a second command in one process, a test).
    saved: dict[str, tuple[list[logging.Handler], bool]] = field(default_factory=dict)


_state = _State()


class _Stdout(logging.Handler):
    """Prints to whatever sys.stdout is at the time (a test may have redirected it); through
    rich above the live bars while they show."""

    def emit(self, record: logging.LogRecord) -> None:
        msg = self.format(record)
        if _state.live and _state.bars is not None:
            _state.bars.console.print(msg, markup=False, highlight=False, soft_wrap=True)
        else:
            print(msg, file=sys.stdout, flush=True)


def configure(*, verbose: bool = False, live: bool | None = None, screen: Any = None) -> None:
    """This process's console: say lines (and detail lines when `verbose`) to stdout, as a live
    display when `live` (default: stdout is a terminal), drawn on `screen` (a rich Console;
    default: rich's, on stdout)."""
    _state.configured, _state.verbose, _state.screen = True, verbose, screen
    _state.live = sys.stdout.isatty() if live is None else live
    _release_library_loggers()  # a previous command's, in this process
    if _state.file_handler is not None:
        _state.file_handler.close()
        _state.file_handler = _state.log_file = None
    _replace_handlers(LOGGER, [_stdout_handler(logging.DEBUG if verbose else logging.INFO)])
    logging.captureWarnings(True)  # a library's warning is a detail line, not a line on stderr
    quiet_library_loggers()


def log_to(path: Path) -> Path:
    """Append every line, detail included, to `path` (the run's log) from now on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if _state.file_handler is not None:
        LOGGER.removeHandler(_state.file_handler)
        _state.file_handler.close()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    _state.file_handler, _state.log_file = handler, path
    LOGGER.addHandler(handler)
    quiet_library_loggers()
    return path


def log_file() -> Path | None:
    return _state.log_file


def quiet() -> bool:
    """True when a command configured the console without --verbose: library and Ray output
    belongs in the run's log. A library user who never called `configure` keeps it all."""
    return _state.configured and not _state.verbose


def say(msg: str) -> None:
    """A line the person running distillery should see."""
    _ensure_handler()
    LOGGER.info(msg)


def detail(msg: str) -> None:
    """A line for the log file (and the console with --verbose)."""
    _ensure_handler()
    LOGGER.debug(msg)


def quiet_library_loggers() -> None:
    """The driver's library loggers write to the run's log file, not the console (unless
    --verbose): Ray's token notice, Serve's "application is ready", Python warnings."""
    if not quiet():
        return
    targets: list[logging.Handler] = [_state.file_handler] if _state.file_handler else [logging.NullHandler()]
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if name not in _state.saved:
            _state.saved[name] = (list(logger.handlers), logger.propagate)
        _replace_handlers(logger, targets)
        logger.propagate = False


def _release_library_loggers() -> None:
    for name, (handlers, propagate) in _state.saved.items():
        logger = logging.getLogger(name)
        _replace_handlers(logger, handlers)
        logger.propagate = propagate
    _state.saved.clear()


@contextlib.contextmanager
def progress(label: str, total: float, unit: str) -> Iterator[Callable[..., None]]:
    """Yield `advance(amount=1, note="")` for a phase of `total` `unit`s (epochs, variants,
    seconds of load): a live bar on a terminal, else a plain line at most every PLAIN_EVERY_S."""
    tracker = _LiveBar(label, total, unit) if _state.live else _PlainLines(label, total, unit)
    try:
        yield tracker.advance
    finally:
        tracker.close()


def eta_text(done: float, total: float, elapsed: float,
             since_first: tuple[float, float] | None = None) -> str:
    """'0:42 spent, about 1:10 left'. The rate is taken from the steps after the first when
    `since_first` = (seconds since the first step ended, steps done since) is given: a first
    epoch carries the start of Ray's workers, and would make the estimate minutes too long."""
    seconds, steps = since_first if since_first is not None else (elapsed, done)
    left = f", about {_clock(seconds / steps * (total - done))} left" if steps > 0 and done < total else ""
    return f"{_clock(elapsed)} spent{left}"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}"


class _PlainLines:
    def __init__(self, label: str, total: float, unit: str):
        self.label, self.total, self.unit = label, total, unit
        self.done, self.start = 0.0, time.monotonic()
        self.last_line = self.start
        self.first: tuple[float, float] | None = None  # (when, done) at the end of the first step

    def advance(self, amount: float = 1, note: str = "") -> None:
        self.done += amount
        now = time.monotonic()
        self.first = self.first or (now, self.done)
        if now - self.last_line >= PLAIN_EVERY_S and self.done < self.total:
            self.last_line = now
            since = (now - self.first[0], self.done - self.first[1])
            say(f"{self.label} {self.done:g}/{self.total:g} {self.unit}{f' ({note})' if note else ''}, "
                f"{eta_text(self.done, self.total, now - self.start, since)}")

    def close(self) -> None:
        pass


class _LiveBar:
    def __init__(self, label: str, total: float, unit: str):
        from rich.markup import escape
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        if _state.bars is None:
            _state.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                   TextColumn("{task.fields[unit]}"), TimeElapsedColumn(),
                                   TextColumn("spent, about"), TimeRemainingColumn(),
                                   TextColumn("left {task.fields[note]}"), transient=True,
                                   console=_state.screen)
            _state.bars.start()
        _state.open_bars += 1
        self.escape = escape  # "[teacher]" is not rich markup
        self.task = _state.bars.add_task(escape(label), total=total, unit=unit, note="")

    def advance(self, amount: float = 1, note: str = "") -> None:
        _state.bars.update(self.task, advance=amount, note=self.escape(note))

    def close(self) -> None:
        _state.bars.remove_task(self.task)
        _state.open_bars -= 1
        if _state.open_bars == 0:
            _state.bars.stop()
            _state.bars = None


def _ensure_handler() -> None:
    """Without `configure` (the library used directly), say lines still print."""
    if not LOGGER.handlers:
        _replace_handlers(LOGGER, [_stdout_handler(logging.INFO)])


def _stdout_handler(level: int) -> logging.Handler:
    handler = _Stdout(level)
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def _replace_handlers(logger: logging.Logger, handlers: list[logging.Handler]) -> None:
    for old in list(logger.handlers):
        logger.removeHandler(old)
    for new in handlers:
        logger.addHandler(new)
