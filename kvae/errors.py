"""The one exception type that the command-line tools turn into a one-line message."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import sys


class KVAEError(Exception):
    """A mistake a user can fix (bad input, missing file, no network): reported in one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag ends with one line (no usage dump) and exit code 2."""

    def error(self, message):
        name = self.prog.removeprefix("python -m ").removeprefix("python ")  # as cli_errors says it
        self.exit(2, f"{name}: error: {message} (see {self.prog} --help)\n")


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


@contextlib.contextmanager
def cli_errors(prog: str):
    """Turns KVAEError, failed reads/writes (a full disk), running out of memory and Ctrl-C into
    one line on stderr and a non-zero exit, no traceback."""
    try:
        yield
    except KVAEError as e:
        _fail(prog, str(e))
    except OSError as e:  # disk full, quota, permissions, read-only file system, bad path
        _fail(prog, describe_os_error(e))
    except MemoryError as e:
        _fail(prog, f"out of memory{': ' + str(e) if str(e) else ''}; try smaller sizes")
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        inside = kvae_error_inside(e)
        if inside is not None:  # raised in a tf.data function (a broken image found mid-training)
            _fail(prog, inside)
        if type(e).__name__ != "ResourceExhaustedError":  # TensorFlow's out-of-memory error
            raise
        text = re.sub(r"\{\{.*?\}\}\s*", "", _first_line(e))  # TF's function-node prefix
        text = text.split(" on /job:")[0].split(" [Op:")[0]
        _fail(prog, f"out of memory: {text} (use a smaller --batch-size, --hidden or --latent-dim)")


def kvae_error_inside(e: BaseException) -> str | None:
    """The message of a KVAEError that TensorFlow wrapped in its own error, else None."""
    text = str(e)
    return text.split("KVAEError: ", 1)[1].splitlines()[0] if "KVAEError: " in text else None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:300]


def _fail(prog: str, message: str) -> None:
    message = " ".join(message.split("\n"))  # one line, whatever the message holds
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)
