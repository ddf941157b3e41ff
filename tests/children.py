"""Child processes of the crash-safety and run-folder tests: `python ARGS` run under WRAPPER's
test hooks, their output lines collected as they come, so that a test waits for an event (a line,
a pause at a known point), never for a time."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WAIT = 600  # seconds: a safety net for a child that hangs, never a speed goal
TF_LOG = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] |WARNING: All log messages "
                    r"before absl::InitializeLog\(\) is called are written to STDERR$|To enable the "
                    r"following instructions)")

# `python -c WRAPPER ARGS` runs ARGS as `python ARGS` does, with two test hooks:
# - KVAE_TEST_PAUSE_EPOCH=E (kvae.fit): after the first step of epoch E it prints "kvae test:
#   paused in epoch E" and waits for a line on stdin. KVAE_TEST_SNAPSHOTS=DIR: when epoch e+1
#   begins (epoch e committed), every file of the run folder but logs/ and the lock is hashed into
#   DIR/after-e.json.
# - KVAE_TEST_PAUSE_AT="<glob>:<n>" (kvae.fit, the export scripts): the n-th atomic write of a
#   matching file keeps half its bytes under its temporary name, prints "PAUSED <file>" and waits
#   on stdin (for go_on, or the kill), so that a kill lands half-way through that write on any
#   machine, fast or slow.
WRAPPER = r"""
import contextlib, fnmatch, hashlib, json, os, runpy, sys
from pathlib import Path

def snapshot(run):
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*"))
            if p.is_file() and p.relative_to(run).parts[0] != "logs" and p.name != ".kvae-lock"}

if "KVAE_TEST_PAUSE_AT" in os.environ:
    import kvae.files
    pattern, nth = os.environ["KVAE_TEST_PAUSE_AT"].rsplit(":", 1)
    real_atomic_path, seen = kvae.files.atomic_path, []

    @contextlib.contextmanager
    def atomic_path(path):
        with real_atomic_path(path) as tmp:
            yield tmp
            if fnmatch.fnmatch(Path(path).name, pattern):
                seen.append(path)
                if len(seen) == int(nth):
                    tmp.write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2])
                    print(f"PAUSED {tmp}", flush=True)
                    sys.stdin.readline()

    kvae.files.atomic_path = atomic_path  # before kvae.fit / kvae.export import it by name

if sys.argv[1:3] == ["-m", "kvae.fit"]:
    import keras
    import kvae.fit

    pause = int(os.environ.get("KVAE_TEST_PAUSE_EPOCH", "0"))
    snapshots = os.environ.get("KVAE_TEST_SNAPSHOTS")

    class Hooks(keras.callbacks.Callback):
        def __init__(self, out):
            super().__init__()
            self.out, self.paused = Path(out), False

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
            if snapshots:
                Path(snapshots, f"after-{epoch}.json").write_text(json.dumps(snapshot(self.out)))

        def on_train_batch_end(self, batch, logs=None):
            if self.epoch + 1 == pause and not self.paused:
                self.paused = True
                print(f"kvae test: paused in epoch {pause}", flush=True)
                sys.stdin.readline()

    fit = kvae.fit.fit
    kvae.fit.fit = lambda config, resume=False, callbacks=(): fit(
        config, resume, [*callbacks, Hooks(config.out)])
    sys.argv = ["kvae.fit", *sys.argv[3:]]
    kvae.fit.main()
elif sys.argv[1] == "-m":
    sys.argv = sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


class Child:
    """`python -c WRAPPER args...`, its stdout and stderr lines collected as they come."""

    def __init__(self, args: list[str], **env: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRAPPER, *map(str, args)], cwd=ROOT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.pid = self.proc.pid
        self.out: list[str] = []
        self.err: list[str] = []
        self.open = 2
        self.changed = threading.Condition()
        self.readers = [threading.Thread(target=self._read, args=(s, lines), daemon=True)
                        for s, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    def _read(self, stream, lines):
        for line in stream:
            with self.changed:
                lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.open -= 1
            self.changed.notify_all()

    def wait_for(self, text: str) -> str | None:
        """Blocks until a line (stdout or stderr) contains `text`: that line, or None if the
        child's output ended first."""
        def found():
            return next((line for line in self.out + self.err if text in line), None)

        with self.changed:
            self.changed.wait_for(lambda: found() is not None or self.open == 0, timeout=WAIT)
            return found()

    def go_on(self) -> None:
        """Lets a paused child continue."""
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def signal(self, signum: int) -> None:
        assert self.proc.poll() is None, f"the child ended before the signal:\n{self.output()}"
        os.kill(self.pid, signum)

    def wait_for_line(self, text: str, count: int = 1) -> str | None:
        """Blocks until `count` lines (stdout and stderr) contain `text`: the last of them, or
        None if the child's output ended first."""
        def found():
            return [line for line in self.out + self.err if text in line]

        with self.changed:
            self.changed.wait_for(lambda: len(found()) >= count or self.open == 0, timeout=WAIT)
            lines = found()
            return lines[count - 1] if len(lines) >= count else None

    def running(self) -> bool:
        return self.proc.poll() is None

    def finish(self) -> int:
        try:
            code = self.proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        for reader in self.readers:
            reader.join(timeout=30)
        self.proc.stdin.close()
        return code

    def kill(self) -> bool:
        """SIGKILL now; True if it was still running (the kill happened)."""
        alive = self.running()
        if alive:
            os.kill(self.pid, signal.SIGKILL)
        self.finish()
        return alive

    def errors(self) -> list[str]:
        """stderr without TensorFlow's C++ start-up lines; never a traceback."""
        text = "\n".join(self.err)
        assert "Traceback" not in text, text[-4000:]
        return [line for line in self.err if line.strip() and not TF_LOG.match(line)]

    def output(self) -> str:
        return "\n".join(self.out[-30:] + ["-- stderr --"] + self.err[-30:])


def snapshot(run: Path) -> dict[str, str]:
    """Every file of the run folder but logs/ and the lock file -> sha256 (as WRAPPER hashes)."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*"))
            if p.is_file() and p.relative_to(run).parts[0] != "logs" and p.name != ".kvae-lock"}
