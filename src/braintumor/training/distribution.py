"""Data-parallel training over the local accelerators (``train.distribution``).

``data_parallel`` replicates the model on every local device and splits each batch
across them: the global batch is ``train.<phase>.batch_size`` (it must divide evenly),
each device takes ``batch_size / devices`` rows, and the gradients are averaged over the
global batch before one update. The update is therefore the one a single device makes on
the same global batch, and the learning rate stays the one tuned for that batch. To go
faster by growing the global batch with the device count instead, scale the learning
rate with it (the linear rule, Goyal et al. 2017: ``lr * k`` for ``k`` times the batch,
with a few epochs of warm-up); that is a change of recipe, so it is left to the params.

- JAX: ``keras.distribution.DataParallel`` over ``keras.distribution.list_devices()``
  (accelerators if any, else the CPU devices XLA exposes: with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` a CPU shows as two).
- TensorFlow: ``tf.distribute.MirroredStrategy`` over the GPUs, else the logical CPUs
  (``virtual_cpu_devices`` makes two for tests).
- PyTorch: not offered (Keras's torch backend has no data-parallel distribution).

Multi-host JAX (several machines, one program): call
``keras.distribution.initialize(job_addresses, num_processes, process_id)`` in every
process before the backend starts (or set ``KERAS_DISTRIBUTION_JOB_ADDRESSES``,
``KERAS_DISTRIBUTION_NUM_PROCESSES``, ``KERAS_DISTRIBUTION_PROCESS_ID``), then
``list_devices`` lists every host's devices and the same ``DataParallel`` spans them; each
process must then read its own shard of the data. The pipeline's stages are single-host.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from braintumor.core.schema import ConfigError

NONE = "none"
DATA_PARALLEL = "data_parallel"


def _devices(backend: str) -> list[Any]:
    if backend == "jax":
        import keras

        return list(keras.distribution.list_devices())
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_logical_devices("GPU")
        return [device.name for device in (gpus or tf.config.list_logical_devices("CPU"))]
    return []


def check_batch(batch_size: int, devices: int, what: str) -> None:
    """The global batch must split evenly (XLA shards need equal parts)."""
    if devices > 1 and batch_size % devices:
        raise ConfigError(
            f"{what}: {batch_size} does not split evenly over {devices} devices "
            "(train.distribution: data_parallel); use a multiple of the device count"
        )


@contextmanager
def data_parallel(mode: str, backend: str) -> Iterator[int]:
    """The scope a phase builds, compiles and fits its model in; yields the device count
    (1 when ``mode`` is ``none`` or there is one device: then nothing is changed)."""
    if mode == NONE:
        yield 1
        return
    if backend == "torch":
        raise ConfigError("train.distribution: data_parallel needs the jax or tensorflow backend")
    devices = _devices(backend)
    if len(devices) < 2:
        yield 1
        return
    if backend == "jax":
        import keras

        with keras.distribution.DataParallel(devices=devices).scope():
            yield len(devices)
        return
    import tensorflow as tf

    with tf.distribute.MirroredStrategy(devices=devices).scope():
        yield len(devices)


def virtual_cpu_devices(count: int, backend: str) -> None:
    """Show this machine's CPU as ``count`` devices (tests and benches); call it before the
    backend starts: JAX reads ``XLA_FLAGS`` once, TensorFlow fixes logical devices at its
    first use."""
    if backend == "jax":
        flag = f"--xla_force_host_platform_device_count={count}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    elif backend == "tensorflow":
        import tensorflow as tf

        (cpu,) = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
