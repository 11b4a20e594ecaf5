"""The package's layers, bottom-up: who may import whom, written down once.

A module may import modules of its own layer or of a layer below it, never one above;
``tests/test_layers.py`` reads every import of every module (inside functions too) and
fails on one that points up. Each layer exists for a reason a test can hold:

- ``foundation``: parameters, paths, atomic writes and redaction, the plumbing every
  other module uses. It imports nothing else of ours, so loading ``params.yaml`` or
  resolving a path never drags in imaging, Keras or MLflow.
- ``science``: the pure functions on arrays and files that hold the method (decoding,
  DICOM included, and the recipe's transform, duplicate hashing, metrics, calibration,
  robustness, the OOD detector, the headline numbers, PyTorch state dicts read without
  torch, a training phase's resumable state, the data stages' figures and workers). It
  never imports our Keras model code, so each function stays testable on small arrays
  without building a network.
- ``model``: the Keras side: backend selection, the model builder and its pretrained
  weights, augmentation, the input pipeline, training callbacks, compile counts and
  Grad-CAM. It knows nothing of serving, tracking or the stages.
- ``serving``: the bundle (a model with its preprocessing, classes and calibration) and
  everything that answers with it: the one decode-check-predict path, the MLflow pyfunc,
  batch ``predict`` and the app. It never imports tracking or a stage, so serving a
  bundle needs neither the pipeline nor a tracking server.
- ``tracking``: MLflow runs of the stages and the model registry (which registers the
  serving pyfunc, hence above serving).
- ``stages``: the DVC stages, thin orchestrators over everything below; nothing imports
  them.
"""

from __future__ import annotations

LAYERS: dict[str, tuple[str, ...]] = {
    "foundation": ("config", "io_utils", "layers", "paths", "redaction"),
    "science": (
        "calibration",
        "checkpointing",
        "dicom",
        "figures",
        "hashing",
        "headline",
        "imaging",
        "metrics",
        "ood",
        "robustness",
        "torch_pickle",
        "workers",
    ),
    "model": (
        "augment",
        "backend",
        "callbacks",
        "compile_stats",
        "data_loading",
        "distribution",
        "explain",
        "model",
        "pretrained",
    ),
    "serving": ("bundle", "serving", "served_model", "predict", "app"),
    "tracking": ("tracking", "registry"),
    "stages": ("acquire", "clean", "preprocess", "train", "evaluate"),
}
