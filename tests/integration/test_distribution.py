"""``train.distribution: data_parallel`` on two virtual CPU devices, per backend.

Each run is the real ``braintumor.stages.train`` CLI in its own process (the device count is
fixed when the backend starts): JAX sees two devices through
``XLA_FLAGS=--xla_force_host_platform_device_count=2``, TensorFlow through two logical
CPUs. The same data, seed, starting model and global batch on one device and on two must
give the same loss curve: data parallelism splits each batch and averages the
gradients, so the update is the same up to the order of floating-point sums (tolerance
below).

What is compared is a fine-tuning phase (BatchNormalization frozen, as the recipe's
phase 2) with augmentation and dropout off, from one phase-1 model. That is where the
equality holds on both backends: ``tf.distribute.MirroredStrategy`` draws random numbers
and computes training-mode BatchNormalization statistics per replica (on its half of the
batch), so with those on a TF run is a different, equally valid, sample of the recipe,
not the one-device curve. (JAX's ``DataParallel`` is one program over the global batch.)
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from train_helpers import make_processed, run_phase_cli, tiny_raw_params

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("mirror")]
# Relative tolerance between the one- and two-device loss curves: float32 sums reordered
# across replicas (the differences seen are ~1e-6 relative; 1e-4 leaves room), while a
# wrong split (each device seeing the whole batch, or half the gradient) moves the curve
# by far more.
RTOL = 1e-4

DRIVER = """
import sys
from braintumor.training.distribution import virtual_cpu_devices
virtual_cpu_devices(int(sys.argv[1]), sys.argv[2])
from braintumor.stages.train import main
sys.exit(main(sys.argv[3:]))
"""
NO_AUGMENTATION = {
    "zoom": 0.0,
    "width_shift": 0.0,
    "height_shift": 0.0,
    "shear": 0.0,
    "rotation": 0.0,
    "horizontal_flip": False,
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_processed(tmp_path_factory.mktemp("processed"))


def write_params(root: Path, backend: str, distribution: str, **train: int) -> Path:
    """tinycnn at 32 px, no augmentation or dropout, global batch 6 (32 train, 12 val)."""
    raw = tiny_raw_params(**train)
    raw["train"].update(backend=backend, distribution=distribution, compilation_cache=None)
    raw["augment"].update(NO_AUGMENTATION)
    raw["model"]["dropout"] = 0.0
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return root / "params.yaml"


def finetune(root: Path, data_dir: Path, init: Path, backend: str, devices: int) -> dict:
    """Three fine-tuning epochs from ``init`` on ``devices`` virtual CPUs; the metrics with
    the per-epoch (loss, val_loss) under ``"curve"``."""
    distribution = "data_parallel" if devices > 1 else "none"
    params = write_params(root, backend, distribution, finetune__epochs=3, finetune__batch_size=6)
    result = run_phase_cli(
        params,
        data_dir,
        root,
        launcher=("-c", DRIVER, str(devices), backend),
        phase="finetune",
        init=init,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((root / "m.json").read_text())
    with (root / "h.csv").open() as handle:
        metrics["curve"] = [
            (float(r["loss"]), float(r["val_loss"])) for r in csv.DictReader(handle)
        ]
    return metrics


@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_two_devices_give_the_one_device_loss_curve(
    tmp_path: Path, data_dir: Path, backend: str
) -> None:
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    start = tmp_path / "frozen"
    params = write_params(start, backend, "none", frozen__epochs=1, frozen__batch_size=6)
    made = run_phase_cli(params, data_dir, start)
    assert made.returncode == 0, made.stderr[-3000:]
    init = start / "m" / "model.keras"
    one = finetune(tmp_path / "one", data_dir, init, backend, 1)
    two = finetune(tmp_path / "two", data_dir, init, backend, 2)
    assert one["devices"] == 1 and two["devices"] == 2
    assert len(one["curve"]) == len(two["curve"]) == 3
    flat = [[value for pair in run["curve"] for value in pair] for run in (one, two)]
    assert flat[1] == pytest.approx(flat[0], rel=RTOL), (one["curve"], two["curve"])


def test_a_batch_that_does_not_split_evenly_is_refused(tmp_path: Path, data_dir: Path) -> None:
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed")
    params = write_params(tmp_path, "jax", "data_parallel", frozen__epochs=1, frozen__batch_size=5)
    result = run_phase_cli(params, data_dir, tmp_path, launcher=("-c", DRIVER, "2", "jax"))
    assert result.returncode == 1
    assert "does not split evenly over 2 devices" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "m").exists()
