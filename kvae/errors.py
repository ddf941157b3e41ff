"""The one exception type that the command-line tools turn into a one-line message."""

from __future__ import annotations

import contextlib
import sys


class KVAEError(Exception):
    """A mistake a user can fix (bad input, missing file, no network): reported in one line."""


@contextlib.contextmanager
def cli_errors(prog: str):
    """Turns KVAEError (and Ctrl-C) into one line on stderr and a non-zero exit, no traceback."""
    try:
        yield
    except KVAEError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
