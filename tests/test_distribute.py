"""tf.distribute: two logical CPU devices (mirrored) and two worker processes (multi-worker)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

TWO_CPUS = """
import sys, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from kvae.fit import main
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory):
    from kvae.data import _mnist_5k

    x, _ = _mnist_5k()
    path = tmp_path_factory.mktemp("data") / "small.npz"
    np.savez(path, x=x[:1064, :, :, 0])
    return str(path)


def fit_args(npz, out, *extra, epochs=3):
    return ["--dataset", npz, "--out", str(out), "--epochs", str(epochs), "--latent-dim", "4",
            "--hidden", "32", "--batch-size", "64", "--val-size", "64", "--eval-k", "0",
            "--arch", "mlp", "--lr", "0.001", "--kl-warmup", "0", *extra]


def final_val_loss(run):
    rows = (run / "history.csv").read_text().splitlines()
    return float(rows[-1].split(",")[rows[0].split(",").index("val_loss")])


def test_mirrored_on_two_devices_matches_one_device(small_npz, tmp_path):
    one = subprocess.run([sys.executable, "-m", "kvae.fit",
                          *fit_args(small_npz, tmp_path / "one", epochs=15)],
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-c", TWO_CPUS,
                          *fit_args(small_npz, tmp_path / "two", "--strategy", "mirrored", epochs=15)],
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    assert "strategy mirrored with 2 replica(s); global batch 64" in two.stdout
    a, b = final_val_loss(tmp_path / "one"), final_val_loss(tmp_path / "two")
    # Same global batch, same data order; only eps differ (each replica draws its own), so the
    # curves agree once past the steep first epochs (15 epochs of 14 steps).
    assert abs(a - b) / a < 0.03, (a, b)


def free_ports(n: int) -> list[int]:
    """n ports free right now; another process may still take one before TF binds it."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("", 0))  # all interfaces, as TF's gRPC server binds them
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


PORT_TAKEN = "kvae.fit: error: --strategy multi-worker: could not start the gRPC server"


def worker_env(workers: list[str], index: int) -> dict:
    """The environment of worker `index` of the cluster `workers` (host:port each)."""
    return {**os.environ, "TF_CONFIG": json.dumps(
        {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})}


def read_and_close(file) -> str:
    file.seek(0)
    with file:
        return file.read()


def run_workers(args: list[str], cwd: Path, attempts: int = 5) -> list[tuple[int, str, str]]:
    """Runs `python -m kvae.fit ARGS` as the two workers of one cluster.

    Returns (returncode, stdout, stderr) per worker. A port picked free can be taken by another
    process before TF binds it: then the whole launch is retried with new ports.
    """
    for _ in range(attempts):
        workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
        logs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in workers]
        procs = [subprocess.Popen([sys.executable, "-m", "kvae.fit", *args], cwd=cwd,
                                  env=worker_env(workers, index), stdout=out, stderr=err, text=True)
                 for index, (out, err) in enumerate(logs)]
        deadline = time.monotonic() + 900  # a safety net only: a hung cluster fails, never a slow one
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]  # every worker, each time
            if None not in codes or any(codes):  # all done, or one failed: the other would wait forever
                break
            time.sleep(0.2)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        results = [(p.returncode, read_and_close(out), read_and_close(err))
                   for p, (out, err) in zip(procs, logs)]
        if not any(PORT_TAKEN in err for _, _, err in results):
            return results
        for path in cwd.iterdir():  # what the lost launch left (nothing, unless it got far)
            shutil.rmtree(path, ignore_errors=True)
    pytest.fail(f"every one of {attempts} launches lost a port to another process")


def test_multi_worker_two_processes_one_run_folder(small_npz, tmp_path):
    results = run_workers(fit_args(small_npz, tmp_path / "run", "--strategy", "multi-worker"),
                          cwd=tmp_path)
    for code, _, err in results:
        assert code == 0, err[-3000:]
    assert "2 replica(s)" in results[0][1]
    run = tmp_path / "run"
    assert (run / "vae.keras").exists() and (run / "metrics.json").exists()
    epochs = [r.split(",")[0] for r in (run / "history.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2", "3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # only the chief wrote


def last_error_line(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def test_multi_worker_without_tf_config_is_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    # real data and a short run: the check must stop it, not a missing file or a timeout
    result = subprocess.run([sys.executable, "-m", "kvae.fit",
                             *fit_args("mnist-5k", tmp_path / "r", "--strategy", "multi-worker",
                                       epochs=1)],
                            capture_output=True, text=True, env=env)
    assert last_error_line(result) == (
        "kvae.fit: error: --strategy multi-worker needs the TF_CONFIG environment variable "
        "(cluster and task) on every machine")
    assert not (tmp_path / "r").exists()


def test_multi_worker_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        workers = [f"127.0.0.1:{taken.getsockname()[1]}", f"127.0.0.1:{free_ports(1)[0]}"]
        result = subprocess.run([sys.executable, "-m", "kvae.fit",
                                 *fit_args("mnist-5k", tmp_path / "r", "--strategy", "multi-worker",
                                           epochs=1)],
                                capture_output=True, text=True, env=worker_env(workers, 0))
    line = last_error_line(result)
    assert line.startswith(PORT_TAKEN) and '{"type": "worker", "index": 0}' in line, line
    assert not (tmp_path / "r").exists()
