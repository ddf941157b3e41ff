"""Atomic file writes: write to a temporary name in the same folder, then rename.

A crash (even SIGKILL) leaves either the old file or the new one under the final name, never
half of one. What a killed writer leaves is a hidden `.tmp-<pid>-*` file, which
`remove_stale_temps` deletes once that process is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary path next to `path`; renames it over `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # .tmp-<pid>-<random>-<name>: keeps the extension; the pid tells a killed writer's leftovers
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.getpid()}-", suffix="-" + path.name, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk: say which file could not be written
        if e.filename is None:
            e.filename = str(path)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def read_json_object(path: str | Path) -> dict:
    """A JSON file holding an object, as a dict; {} where the file does not exist.

    Raises:
      ValueError: it cannot be read, is not JSON, or is not an object (one line naming the file).
    """
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} is not a JSON object")
    return values


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, value, indent: int | None = 2) -> None:
    """`value` as JSON (indented unless `indent` is None) with a final newline, written atomically."""
    atomic_write_text(path, json.dumps(value, indent=indent) + "\n")


def remove_stale_temps(*folders: str | Path) -> list[Path]:
    """Deletes the `.tmp-<pid>-*` files that killed writers left in `folders` (not recursive).

    A temporary file whose process is still running (another export writing into the same
    folder) is left alone. Returns the files removed.
    """
    removed = []
    for folder in folders:
        for path in sorted(Path(folder).glob(".tmp-*")):
            pid = path.name.split("-")[1]
            if (pid.isdigit() and _running(int(pid))) or not path.is_file():
                continue
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # Windows: os.kill would terminate it; keep the file
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
