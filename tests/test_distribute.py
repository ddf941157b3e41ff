"""tf.distribute: two logical CPU devices (mirrored) and two worker processes (multi-worker)."""

import json
import os
import socket
import subprocess
import sys

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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_multi_worker_two_processes_one_run_folder(small_npz, tmp_path):
    workers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    procs = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "kvae.fit",
             *fit_args(small_npz, tmp_path / "run", "--strategy", "multi-worker")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path))
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "2 replica(s)" in outputs[0][0]
    run = tmp_path / "run"
    assert (run / "vae.keras").exists() and (run / "metrics.json").exists()
    epochs = [r.split(",")[0] for r in (run / "history.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2", "3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # only the chief wrote


def test_multi_worker_without_tf_config_is_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    result = subprocess.run([sys.executable, "-m", "kvae.fit", "--strategy", "multi-worker",
                             "--out", str(tmp_path / "r"), "--dataset", str(tmp_path / "x.npz")],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2
