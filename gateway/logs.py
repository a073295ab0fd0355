"""structlog: JSON lines under systemd or a pipe, readable console output on a terminal.

The libraries below the gateway (asyncua, pymodbus, aiomqtt and paho, asyncio itself) log through
the standard ``logging`` module. ``configure`` sends their records through the same structlog
pipeline, so a JSON log holds only JSON lines, with ``logger`` naming the library; and it limits
them: a library repeats the same complaint on every retry of a failing device, so each message
(by logger and text pattern) is logged at most once per ``LIBRARY_WINDOW`` seconds, the next line
saying how many were left out. The gateway's own lines already say what failed, once per outage.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

import structlog

LIBRARY_WINDOW = 60.0  # seconds: one line per library message pattern
LIBRARY_LEVELS = {  # what each library may say; below that is its own debugging
    "asyncua": logging.ERROR,  # warns on every closed session; its errors name protocol faults
    "pymodbus": logging.ERROR,
    "mqtt": logging.WARNING,  # aiomqtt / paho
    "asyncio": logging.WARNING,
}


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Log to ``stream`` (standard error): JSON when ``fmt`` is json, or auto and not on a terminal."""
    out = stream or sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and (not out.isatty() or "JOURNAL_STREAM" in os.environ))
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    threshold = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    route_libraries(threshold)


def route_libraries(threshold: int = logging.INFO) -> LibraryHandler:
    """Every ``logging`` record, of any library, through structlog (replacing other root handlers,
    and logging's last-resort handler that prints raw lines)."""
    root = logging.getLogger()
    handler = LibraryHandler()
    for old in list(root.handlers):
        if isinstance(old, LibraryHandler):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(threshold)
    for name, floor in LIBRARY_LEVELS.items():
        logging.getLogger(name).setLevel(max(floor, threshold))
    logging.captureWarnings(True)  # warnings.warn of a library: a record of logger "py.warnings"
    return handler


class LibraryHandler(logging.Handler):
    """A ``logging`` record -> one structlog line, at most one per message pattern and window."""

    def __init__(self, window: float = LIBRARY_WINDOW, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window = window
        self.clock = clock
        self._seen: dict[tuple[str, str], list[float | int]] = {}  # pattern -> [last logged, left out since]

    def emit(self, record: logging.LogRecord) -> None:
        try:
            pattern = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
            key = (record.name, pattern[:200])
            now = self.clock()
            seen = self._seen.get(key)
            if seen is not None and now - seen[0] < self.window:
                seen[1] += 1
                return
            if len(self._seen) > 1000:  # patterns are few; a library formatting values into msg is not
                self._seen.clear()
            left_out = int(seen[1]) if seen is not None else 0
            self._seen[key] = [now, 0]
            fields: dict[str, object] = {"logger": record.name}
            if left_out:
                fields["similar_left_out"] = left_out
            if record.exc_info and record.exc_info[0] is not None:
                fields["exc_info"] = record.exc_info
            get().log(record.levelno, record.getMessage(), **fields)
        except Exception:  # logging must never raise into the code that logs
            self.handleError(record)


def get(**bound: object) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(**bound)  # type: ignore[no-any-return]


class Contained:
    """Unexpected exceptions of one part of the gateway (a poller, the pipeline, an output), caught so
    that the rest goes on: each one counted, and its traceback logged once until ``reset`` (a poller
    resets when its device recovers) for each distinct error text (at most ``LIMIT`` of them)."""

    LIMIT = 64

    def __init__(self, log: structlog.typing.FilteringBoundLogger, count: Callable[[], None]) -> None:
        self.log = log
        self.count = count
        self._traced: set[str] = set()

    def __call__(self, exc: BaseException, event: str = "internal error", **fields: object) -> str:
        """Count ``exc``, log it (with its traceback the first time); the text a reason shows."""
        self.count()
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if text not in self._traced:
            if len(self._traced) < self.LIMIT:
                self._traced.add(text)
            self.log.error(event, kind="internal", error=text, exc_info=exc, **fields)
        return text

    def reset(self) -> None:
        self._traced.clear()
