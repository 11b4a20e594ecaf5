"""``train.distribution: data_parallel`` on two virtual CPU devices, per backend.

Each run is the real ``braintumor.train`` CLI in its own process (the device count is
fixed when the backend starts): JAX sees two devices through
``XLA_FLAGS=--xla_force_host_platform_device_count=2``, TensorFlow through two logical
CPUs. The same data, seed and global batch on one device and on two must give the same
loss curve: data parallelism splits each batch and averages the gradients, so the update
is the same up to the order of floating-point sums (tolerance below).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train_helpers import make_processed, tiny_raw_params

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("mirror")]
# Relative tolerance between the one- and two-device loss curves: float32 sums reordered
# across replicas (measured differences are ~1e-6 relative; 1e-4 leaves room, and a
# wrong split, such as each device seeing the whole batch or only half the gradient,
# moves the curve by far more).
RTOL = 1e-4

DRIVER = """
import sys
from braintumor.distribution import virtual_cpu_devices
virtual_cpu_devices(int(sys.argv[1]), sys.argv[2])
from braintumor.train import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_processed(tmp_path_factory.mktemp("processed"))


def train(root: Path, data_dir: Path, backend: str, devices: int, distribution: str) -> dict:
    """One frozen phase (tinycnn, 3 epochs, global batch 6) on ``devices`` virtual CPUs;
    returns its metrics with the per-epoch losses under ``"curve"``."""
    raw = tiny_raw_params(frozen__epochs=3, frozen__batch_size=6)  # 32 train, 12 val rows
    raw["train"].update(backend=backend, distribution=distribution, compilation_cache=None)
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    command = [
        sys.executable, "-c", DRIVER, str(devices), backend,
        "--phase", "frozen", "--params", str(root / "params.yaml"), "--data", str(data_dir),
        "--model-dir", str(root / "m"), "--checkpoints", str(root / "c"),
        "--metrics", str(root / "m.json"), "--history", str(root / "h.csv"),
        "--figures", str(root / "f"), "--no-tracking", "--verbose", "0",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "XLA_FLAGS")}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((root / "m.json").read_text())
    with (root / "h.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    metrics["curve"] = [(float(r["loss"]), float(r["val_loss"])) for r in rows]
    return metrics


@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_two_devices_give_the_one_device_loss_curve(
    tmp_path: Path, data_dir: Path, backend: str
) -> None:
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    one = train(tmp_path / "one", data_dir, backend, 1, "none")
    two = train(tmp_path / "two", data_dir, backend, 2, "data_parallel")
    assert one["devices"] == 1 and two["devices"] == 2
    assert len(one["curve"]) == len(two["curve"]) == 3
    assert two["curve"] == pytest.approx(one["curve"], rel=RTOL)


def test_a_batch_that_does_not_split_evenly_is_refused(tmp_path: Path, data_dir: Path) -> None:
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed")
    raw = tiny_raw_params(frozen__epochs=1, frozen__batch_size=5)
    raw["train"].update(backend="jax", distribution="data_parallel", compilation_cache=None)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    command = [
        sys.executable, "-c", DRIVER, "2", "jax",
        "--phase", "frozen", "--params", str(tmp_path / "params.yaml"), "--data", str(data_dir),
        "--model-dir", str(tmp_path / "m"), "--checkpoints", str(tmp_path / "c"),
        "--metrics", str(tmp_path / "m.json"), "--history", str(tmp_path / "h.csv"),
        "--figures", str(tmp_path / "f"), "--no-tracking",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "XLA_FLAGS")}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 1
    assert "does not split evenly over 2 devices" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "m").exists()
