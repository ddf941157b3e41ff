"""One writer per run folder: an OS file lock (`fcntl.flock`) on `RUN/.kvae-lock`.

    with run_lock(run, "kvae.fit", create=True):
        ...  # the only writer of RUN until the block ends

`python -m kvae.fit` (new and `--resume`), the export scripts and `python -m kvae.evaluate` hold
it for as long as they run. A second writer ends at once, before it writes anything, with one
line naming the folder and the pid of the holder (the holder writes `<pid> <program>` into the
lock file) and exit code 2. Readers (`kvae.runtime`, `kvae.sample`, the demo) take no lock.

The OS releases the lock when its process ends in any way, SIGKILL included, so a lock can never
be stale: a `.kvae-lock` file that a killed process left behind is only a file (the next writer
takes it). A process that ends normally removes the file. Do not delete it by hand while its
process runs: a second writer could then take a new one.

Exports: both export scripts read the same Keras files and merge one manifest, so a second export
of a run WAITS for the first (on `RUN/.kvae-export-lock`) and then runs: `to_tflite.py RUN &
to_onnx.py RUN` is safe and runs them one after the other. An export and a fit (or an evaluation)
of one run refuse each other: an export never reads a model that a resumed fit is rewriting.

Scope: on one machine the lock always holds. On a network file system it holds as far as flock
does there (flock(2)): Linux NFS clients emulate it with NFS byte-range locks, which hold across
machines when the server supports locking (a client that dies loses its lock when its lease
expires, about 90 s on NFSv4); an NFS mount with `nolock` or `local_lock=flock|all`, SMB/CIFS
before Linux 5.5, sshfs and other FUSE file systems keep it local to one machine, so two
machines can then write one run at once. Windows has no flock: no lock there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from pathlib import Path
from typing import Callable

from kvae.errors import KVAEError

LOCK = ".kvae-lock"  # the writer lock of a run folder
EXPORT_LOCK = ".kvae-export-lock"  # the export scripts queue on it (see the module docstring)

_held: dict[str, list] = {}  # lock file (resolved) -> [fd, depth]: a process may re-enter its lock


class RunInUse(KVAEError):
    """Another process holds the run folder's lock."""


@contextlib.contextmanager
def run_lock(run: str | Path, prog: str, create: bool = False):
    """Holds RUN's writer lock while the block runs (re-entrant within a process).

    Args:
      run: the run folder.
      prog: the program taking it (written into the lock file next to the pid).
      create: create the folder (and its parents) if it is missing; they are removed again at
        the end if nothing was written into them. Without it a missing folder is not locked (the
        caller reports it); a folder this process may not write into is not locked either (it
        can only read it, or fails at its first write).

    Raises:
      RunInUse: another process holds the lock (one line: the folder, the pid, what to do).
    """
    run = Path(run)
    created = []  # folders this call makes, deepest first
    if create:
        missing = run
        while not missing.exists() and missing != missing.parent:
            created.append(missing)
            missing = missing.parent
        run.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(run, LOCK, prog, wait=None):
            yield
    finally:
        for folder in created:
            try:
                folder.rmdir()  # only if empty: a run that wrote nothing leaves nothing
            except OSError:
                break


@contextlib.contextmanager
def export_lock(run: str | Path, prog: str):
    """The lock of an export script: waits for another export of RUN to end (saying so in one
    line), then holds RUN's writer lock as `run_lock` does (a fit or an evaluation of RUN
    refuses it: RunInUse)."""
    def waiting(holder: str) -> None:
        print(f"{prog}: waiting for the export that {_who(holder)} runs on {run} to end", flush=True)

    with _locked(Path(run), EXPORT_LOCK, prog, wait=waiting), run_lock(run, prog):
        yield


def holder(run: str | Path) -> str:
    """`<pid> <program>` of the process that last took RUN's lock ('' if there is no lock file)."""
    try:
        return (Path(run) / LOCK).read_text().strip()
    except OSError:
        return ""


@contextlib.contextmanager
def _locked(folder: Path, name: str, prog: str, wait: Callable[[str], None] | None):
    """Holds an exclusive flock on folder/name; `wait` None: refuse at once if it is taken,
    else call wait(holder) and block until it is free."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock
        yield
        return
    path = folder / name
    if not folder.is_dir():  # nothing to protect; the caller reports the missing run
        yield
        return
    key = str(path.resolve())
    if key in _held:  # this process holds it already (fit() inside kvae.fit's main, ...)
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    try:
        fd = _acquire(path, prog, wait, fcntl)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        fd = None  # a folder we may not write into: see run_lock
    if fd is None:
        yield
        return
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                os.unlink(path)  # while still held: the next writer makes (and locks) a new file
        os.close(fd)  # releases the lock


def _acquire(path: Path, prog: str, wait, fcntl) -> int:
    """Locks path (creating it); returns its descriptor. The file that a holder removes when it
    ends may be the one we locked: then try again on the new one."""
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # NFS: exclusive needs a file open for writing
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                current = _read_holder(fd)
                if wait is None:
                    raise RunInUse(f"{path.parent} is in use: {_who(current)} is writing it; run "
                                   "this again when it has ended") from None
                wait(current)
                fcntl.flock(fd, fcntl.LOCK_EX)  # blocks; a signal still interrupts it
            try:
                ours = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                ours = False
            if ours:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()} {prog}\n".encode(), 0)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise KVAEError(f"cannot take the lock {path}: it keeps being replaced (is another program "
                    "deleting it?)")


def _read_holder(fd: int) -> str:
    """The `<pid> <program>` line of the file's holder; it writes it right after taking the lock,
    so an empty file is read again for up to a second."""
    for _ in range(50):
        text = os.pread(fd, 500, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.02)
    return ""


def _who(holder: str) -> str:
    pid, _, prog = holder.partition(" ")
    if not pid.isdigit():
        return "another process (pid unknown)"
    return f"pid {pid}" + (f" ({prog})" if prog else "")
