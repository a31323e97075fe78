"""Errors the command line turns into one line: what background threads print is held back,
and a full disk names the file it could not write."""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import re
import sys
import threading
import traceback

_NO_SPACE = re.compile(r"No space left on device|os_error_code='28'|ENOSPC")
_PATHS = (re.compile(r'Failed writing: "([^"]+)"'), re.compile(r'local file "([^"]+)"'))


class _Hold(logging.Filter):
    """Holds back error records (orbax's background threads log their failures with a
    traceback) into ``held``."""

    def __init__(self, held: list[str]):
        super().__init__()
        self.held = held

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info))
        self.held.append(text)
        return False


@contextlib.contextmanager
def held_background_errors():
    """Within, tracebacks from other threads, unraisable exceptions and error logs are kept
    in the yielded list instead of reaching stderr (the command reports its own error as one
    line); the hooks are restored on exit."""
    held: list[str] = []
    hooks = (sys.excepthook, sys.unraisablehook, threading.excepthook)
    logger = logging.getLogger()
    absl = logging.getLogger("absl")
    filt = _Hold(held)

    def keep(*exc):
        held.append("".join(traceback.format_exception(*exc)))

    sys.excepthook = keep
    sys.unraisablehook = lambda u: held.append(
        "".join(traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback)))
    threading.excepthook = lambda a: held.append(
        "".join(traceback.format_exception(a.exc_type, a.exc_value, a.exc_traceback)))
    for log in (logger, absl):
        log.addFilter(filt)
        for handler in log.handlers:
            handler.addFilter(filt)
    try:
        yield held
    finally:
        gc.collect()  # what a failed write left pending reports here, not at exit
        sys.excepthook, sys.unraisablehook, threading.excepthook = hooks
        for log in (logger, absl):
            log.removeFilter(filt)
            for handler in log.handlers:
                handler.removeFilter(filt)


def quiet_until_exit() -> None:
    """From now on, what other threads raise is dropped: for a process that has reported its
    error and is exiting, while a failed write's callbacks still fire during shutdown."""
    sys.excepthook = sys.unraisablehook = threading.excepthook = lambda *_: None
    logging.getLogger().addFilter(_Hold([]))
    logging.getLogger("absl").addFilter(_Hold([]))


def _chain(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def no_space_path(error: BaseException) -> str | None:
    """The file a full disk refused, if ``error`` (or its cause) is one; "" if unnamed."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return str(e.filename or "")
        text = str(e)
        if _NO_SPACE.search(text):
            for pattern in _PATHS:
                if match := pattern.search(text):
                    return match.group(1)
            return ""
    return None


def one_line(error: BaseException) -> str:
    """The error as one line; a full disk says where and that the run can be rerun as it is."""
    path = no_space_path(error)
    if path is not None:
        where = f" writing {path}" if path else ""
        return (f"no space left on device{where}; free some space and rerun the same command "
                f"(it resumes from the last finished epoch; nothing saved before is lost)")
    return " ".join(str(error).split())


def keep_details(held: list[str]) -> str | None:
    """Writes what was held back to a temporary file (for a bug report); its path, or None."""
    if not held:
        return None
    import tempfile

    try:
        with tempfile.NamedTemporaryFile("w", prefix="baim-jax-details-", suffix=".log",
                                         delete=False) as f:
            f.write("\n".join(held))
        return f.name
    except OSError:
        return None
