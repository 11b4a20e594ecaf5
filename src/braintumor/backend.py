"""Selecting the Keras backend, which must happen before anything imports keras."""

from __future__ import annotations

import os
import sys

from braintumor.config import ConfigError


def use_backend(backend: str) -> None:
    """Set ``KERAS_BACKEND``; refuse if keras is already loaded with another backend."""
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
