"""The package's layers, bottom-up: who may import whom, written down once.

Each layer is a subpackage, so a module's layer is the folder it lives in; only the order
is written here. A module may import modules of its own layer or of a layer below it,
never one above; ``tests/repo/test_layers.py`` reads every import of every module (inside
functions too) and fails on one that points up, on a folder missing from this order and on
a module outside every folder. Each layer exists for a reason a test can hold:

- ``core``: parameters (schema and loader), paths, atomic files and hashing, redaction:
  the plumbing every other module uses. It imports nothing else of ours, so loading
  ``params.yaml`` never drags in imaging, Keras or MLflow.
- ``reports``: figures (one way to save one) and the headline numbers of each stage's
  metrics; matplotlib and arrays only, so every layer above can draw.
- ``data``: decoding (DICOM too) and the recipe's transform, duplicate hashing, the sources
  and their acquisition, cleaning and the grouped split: pure functions on files and arrays.
- ``model``: the Keras side of the network: backend selection, the classifier and its
  backbones, augmentation, and the ImageNet weights (file format, the PyTorch state-dict
  reader, the conversion). It knows nothing of training loops, serving or tracking.
- ``training``: a phase (the fit, its inputs, callbacks, resumable checkpoints, compile
  counts, data parallelism).
- ``evaluation``: metrics, calibration, robustness under perturbations, the OOD detector;
  arrays in, numbers out, no network built.
- ``explain``: Grad-CAM, occlusion and the overlay, on any Keras model.
- ``serving``: the bundle (a model with its preprocessing, classes, calibration and OOD
  statistics, every file hashed) and everything that answers with it: the one
  decode-check-predict path, the MLflow pyfunc, batch ``predict`` and the app. It never
  imports tracking or a stage, so serving a bundle needs neither the pipeline nor a
  tracking server.
- ``tracking``: MLflow runs of the stages and the model registry (which registers the
  serving pyfunc, hence above serving).
- ``stages``: one thin entry point per DVC stage, over everything below; nothing imports
  them.
"""

from __future__ import annotations

LAYERS: tuple[str, ...] = (
    "core",
    "reports",
    "data",
    "model",
    "training",
    "evaluation",
    "explain",
    "serving",
    "tracking",
    "stages",
)


def layer_of(module: str) -> str:
    """The layer of a module named under the package (``"serving.bundle"`` -> ``"serving"``)."""
    return module.split(".", 1)[0]
