"""The one exception type for mistakes a user can fix, how SIGINT / SIGTERM interrupt work
(`Interrupted`), and one-line descriptions of system errors. The command-line side (argparse,
turning these into one line and an exit code) is `kvae.cli`."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading


class KVAEError(Exception):
    """A mistake a user can fix (bad input, missing file, no network): reported in one line."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (see `signals_interrupt`); `message` is the line to print."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.signum, self.message = signum, message

    def with_message(self, message: str) -> "Interrupted":
        return Interrupted(self.signum, message)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; docker stop, Kubernetes, schedulers


@contextlib.contextmanager
def signals_interrupt():
    """While the block runs, SIGINT and SIGTERM raise `Interrupted` in the main thread (Python's
    default: SIGTERM ends the process with no clean-up at all). `finally` blocks and context
    managers then run, as for Ctrl-C: temporary files go, locks are released."""
    def interrupt(signum, frame):
        raise Interrupted(signum)

    with _handlers(interrupt):
        yield


@contextlib.contextmanager
def signals_deferred():
    """A block that SIGINT and SIGTERM do not cut (an epoch's commit): a signal that arrives
    inside it is delivered, to the handler in place before, when the block ends."""
    pending: list[int] = []
    with _handlers(lambda signum, frame: pending.append(signum)):
        yield
    for signum in dict.fromkeys(pending):
        signal.raise_signal(signum)  # runs a Python handler before it returns


@contextlib.contextmanager
def _handlers(handler):
    if threading.current_thread() is not threading.main_thread():  # only it may set handlers
        yield
        return
    # None: a handler not set from Python; SIG_DFL is the closest we can put back
    before = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, old in before.items():
            signal.signal(s, signal.SIG_DFL if old is None else old)


# What to do about an OSError, by errno: the disk, the permissions or the path.
_OS_HINTS = {
    errno.ENOSPC: "free some disk space and run it again",
    errno.EDQUOT: "free some space (disk quota exceeded) and run it again",
    errno.EFBIG: "the file size limit (ulimit -f) or the disk's free space was reached: raise "
                 "the limit, free space or write elsewhere",
    errno.EACCES: "choose a path you may read/write, or fix its permissions",
    errno.EPERM: "choose a path you may read/write, or fix its permissions",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EEXIST: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "the path is a folder: give a file name",
    errno.ENOENT: "check the path",
}


def describe_os_error(e: OSError) -> str:
    """One line: what the system refused, on which file, and what to do."""
    if isinstance(e.errno, int) and e.errno > 0:  # h5py puts its own long text in strerror
        what = os.strerror(e.errno)
    else:
        what = e.strerror or (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    where = f": {e.filename}" if e.filename else ""
    hint = _OS_HINTS.get(e.errno, "check the path, the free disk space and the permissions")
    return f"{what}{where} ({hint})"


def kvae_error_inside(e: BaseException) -> str | None:
    """The message of a KVAEError that TensorFlow wrapped in its own error, else None."""
    text = str(e)
    return text.split("KVAEError: ", 1)[1].splitlines()[0] if "KVAEError: " in text else None
