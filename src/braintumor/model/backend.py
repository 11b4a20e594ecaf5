"""Selecting the Keras backend, which must happen before anything imports keras, and the
compiler settings that go with it (XLA flags, JAX's persistent compilation cache)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from braintumor.core.blas import single_thread_blas
from braintumor.core.paths import real_project_root
from braintumor.core.schema import ConfigError, TrainParams

AUTOTUNE_FLAG = "--xla_gpu_autotune_level"


def configure_backend(train: TrainParams, project_root: Path) -> None:
    """``use_backend`` with the parameters' XLA autotune level, then the compilation cache
    (``train.compilation_cache`` relative to the real project root: a DVC temporary
    experiment workspace is deleted after its run, the repository's cache is not). NumPy's
    BLAS gets one thread (``core.blas``: beside the model runtime's threads, more is
    slower here)."""
    single_thread_blas()
    use_backend(train.backend, xla_gpu_autotune_level=train.xla_gpu_autotune_level)
    if train.deterministic:
        deterministic_ops(train.backend)
    cache = train.compilation_cache
    enable_compilation_cache(real_project_root(project_root) / cache if cache else None)


def use_backend(backend: str, *, xla_gpu_autotune_level: int | None = None) -> None:
    """Set ``KERAS_BACKEND``; refuse if keras is already loaded with another backend.

    ``xla_gpu_autotune_level`` (0-4) goes into ``XLA_FLAGS``, which JAX and TensorFlow
    read when they first start a GPU backend, so it only takes effect before that.
    """
    if xla_gpu_autotune_level is not None:
        os.environ["XLA_FLAGS"] = with_xla_flag(
            os.environ.get("XLA_FLAGS", ""), AUTOTUNE_FLAG, str(xla_gpu_autotune_level)
        )
    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() != backend:
            raise ConfigError(
                f"train.backend: {backend!r} requested but keras was already imported "
                f"with {keras.backend.backend()!r}"
            )
        return
    os.environ["KERAS_BACKEND"] = backend
    # TensorFlow's C++ start-up chatter would bury our one-line errors on stderr.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


DETERMINISM_FLAG = "--xla_gpu_deterministic_ops"


def deterministic_ops(backend: str) -> None:
    """Ask ``backend`` for deterministic kernels, so that a rerun with the same seed on the
    same machine repeats every number (resumed runs are exact either way: batch order and
    random layers are reseeded per epoch).

    TensorFlow: ``enable_op_determinism`` (ops without a deterministic kernel then raise
    instead of varying). JAX: XLA's deterministic-ops flag, read when the GPU backend
    starts (CPU XLA is deterministic already). PyTorch: ``use_deterministic_algorithms``,
    with the cuBLAS workspace setting it requires on CUDA. Call before the first op.
    """
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    elif backend == "jax":
        os.environ["XLA_FLAGS"] = with_xla_flag(
            os.environ.get("XLA_FLAGS", ""), DETERMINISM_FLAG, "true"
        )
    elif backend == "torch":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        import torch

        torch.use_deterministic_algorithms(True)


def seed_and_precision(seed: int, mixed_precision: bool) -> None:
    """Keras's global seed and dtype policy, set the same way wherever a model is built
    whose numbers must match another's (a training phase, and the audit whose pooled
    features phase 1 reuses)."""
    import keras

    keras.utils.set_random_seed(seed)
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed_precision else "float32")


def with_xla_flag(flags: str, name: str, value: str) -> str:
    """``flags`` (an XLA_FLAGS string) with ``name=value``, replacing any earlier value."""
    kept = [flag for flag in flags.split() if flag.split("=", 1)[0] != name]
    return " ".join([*kept, f"{name}={value}"])


def enable_compilation_cache(folder: Path | None) -> bool:
    """Turn on JAX's persistent compilation cache in ``folder`` (JAX backend only).

    Every program is cached, however quickly it compiled (JAX's default skips those under
    a second, which would leave out the weight initialisers a model build compiles by the
    dozen). On a GPU, JAX also points XLA's per-fusion autotuning cache there, so the
    fine-tuning phase and the evaluate stage reuse the convolution timings of the frozen
    phase. Call it before the first JAX computation. Returns whether the cache is on.
    """
    if folder is None or os.environ.get("KERAS_BACKEND") != "jax":
        return False
    import jax

    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder.resolve()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return True
