"""DVC stage ``localise``: do the explanations point at the tumour? Measured on masks.

The figshare masks (``data/masks``, the ``masks`` stage) are matched to the source's
images by clean's signatures (:mod:`braintumor.data.masks`: every mask counted by status,
none dropped silently); the matched Testing slices of the same class, at most
``localise.max_slices``, are preprocessed as the model sees them, and each method x layer
of ``localise`` explains the slice's true class with the fine-tuned model. Scores
(:mod:`braintumor.evaluation.localisation`): the pointing game with ``tolerance`` pixels
and the share of map energy inside the mask, beside a centred Gaussian that knows nothing.
Occlusion runs on the first ``occlusion_slices`` of them only (a forward pass per patch);
every other map is scored on that subset too, so the comparison is paired.

Outputs: ``metrics/localisation.json`` (the DVC metric: per method and layer, the
baseline, the mask counts and the map chosen for the app), the detail (intervals, per
class, the paired subset, the matches' statuses), every mask's match as CSV, and a
figure (bars and example overlays with the mask's contour).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from braintumor.core.config import load_params
from braintumor.core.files import atomic_path, write_json
from braintumor.core.schema import ConfigError, Params
from braintumor.data.masks import TEST, MaskError
from braintumor.model.backend import configure_backend
from braintumor.model.saved import SavedModelError, load_classifier

OCCLUSION = "occlusion"
# Methods the app can afford per upload (one forward and backward pass): the choice is
# made among these; occlusion is measured as the gradient-free reference.
SERVABLE = ("gradcam", "hirescam", "gradcampp")


class LocaliseError(ValueError):
    """The model, masks or images cannot be used together (one line)."""


def match(params: Params, raw: Path, masks: Path) -> pd.DataFrame:
    """Every mask with its status and matched image (``data.masks.match_masks``)."""
    from braintumor.data import masks as mask_data

    meta = mask_data.read_meta(masks)
    grays = [mask_data.read_gray(masks / "images" / f"{name}.jpg") for name in meta["id"]]
    readable = np.array(
        [
            gray is not None and mask_data.read_mask(masks / "masks" / f"{name}.png") is not None
            for gray, name in zip(grays, meta["id"], strict=True)
        ]
    )
    sources = {source.name: source for source in params.acquire.sources}
    if params.localise.source not in sources:
        raise LocaliseError(
            f"localise.source: {params.localise.source!r} is not in acquire.sources "
            f"({', '.join(sorted(sources))})"
        )
    labels = sorted(set(meta["class"].astype(str)))
    images = mask_data.source_images(raw, sources[params.localise.source], labels)
    image_grays = [mask_data.read_gray(raw / entry.path) for entry in images]
    return mask_data.match_masks(
        meta,
        readable,
        mask_data.signatures(grays, params.clean),
        images,
        mask_data.signatures(image_grays, params.clean),
        params.clean.near_similarity,
        params.localise.alignment,
    )


def select(rows: pd.DataFrame, count: int, seed: int) -> pd.DataFrame:
    """``count`` rows (0: all) drawn per class in proportion, seeded, classes interleaved:
    any head of the result is itself a proportional draw (occlusion's subset is one)."""
    shuffled = rows.sample(frac=1.0, random_state=seed)
    # Round-robin over classes keeps the proportions within one slice per class.
    order = shuffled.groupby("class", sort=True).cumcount() / shuffled.groupby("class")[
        "class"
    ].transform("size")
    picked = shuffled.assign(_rank=order).sort_values(["_rank", "class"], kind="stable")
    return picked.head(count or len(picked)).drop(columns="_rank").reset_index(drop=True)


def model_inputs(
    params: Params, raw: Path, masks: Path, rows: pd.DataFrame
) -> tuple[np.ndarray, np.ndarray]:
    """The slices as the model sees them (uint8, N x S x S) and their masks at S x S."""
    from braintumor.data.imaging import ImageDecodeError, decode_image, preprocess_gray
    from braintumor.data.masks import mask_at, read_mask

    size = params.common.image_size
    images = np.zeros((len(rows), size, size), dtype=np.uint8)
    regions = np.zeros((len(rows), size, size), dtype=bool)
    for index, row in enumerate(rows.itertuples()):
        path = raw / str(row.path)
        try:
            gray = decode_image(path.read_bytes(), name=str(path)).gray
        except (OSError, ImageDecodeError) as error:
            raise LocaliseError(f"{path}: {error}") from None
        images[index] = preprocess_gray(gray, size, params.preprocess)
        mask = read_mask(masks / "masks" / f"{row.id}.png")
        if mask is None:
            raise LocaliseError(f"{masks / 'masks' / f'{row.id}.png'}: unreadable or empty")
        regions[index] = mask_at(mask, size, size)
    return images, regions


def load_model(path: Path, num_classes: int) -> Any:
    """The fine-tuned Keras model, checked (``model.saved.load_classifier``)."""
    try:
        return load_classifier(path, num_classes, "the finetune stage")
    except SavedModelError as error:
        raise LocaliseError(str(error)) from None


def resolve_layers(params: Params, model: Any) -> list[str]:
    """``localise.layers`` with ``auto`` as ``model.gradcam_layer`` (itself ``auto``: the
    backbone's last block), each checked against the model."""
    from braintumor.model.classifier import feature_layer_name

    names = {layer.name for layer in model.layers}
    resolved = []
    for name in params.localise.layers:
        if name == "auto":
            name = params.model.gradcam_layer
            if name == "auto":
                name = feature_layer_name(params.model.backbone)
        if name not in names:
            raise LocaliseError(f"localise.layers: the model has no layer {name!r}")
        if name not in resolved:
            resolved.append(name)
    return resolved


def measure(
    params: Params, model: Any, images: np.ndarray, classes: np.ndarray, layers: Sequence[str]
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Maps (N, S, S) of every method@layer (occlusion: ``occlusion_slices`` first rows
    only), in the parameters' method-by-layer order (``choose`` breaks ties by it), and the
    seconds each computation took.

    The gradient methods at a layer come from one shared forward and backward pass
    (``explain.cams.gradient_maps``): 3 methods x 2 layers cost 2 passes, not 6. Its
    seconds are reported once, under the joint key ``gradcam+hirescam+gradcampp@layer``,
    not split among the methods (the weightings cost next to nothing beside the pass);
    occlusion's stay under ``occlusion@input``.
    """
    from braintumor.explain.cams import INPUT_LAYER, explanation_maps, gradient_maps

    settings = params.localise
    batch = images[..., None].astype(np.float32)
    gradient = [method for method in settings.methods if method != OCCLUSION]
    computed: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for layer in layers if gradient and len(batch) else []:
        key = f"{'+'.join(gradient)}@{layer}"
        start = time.perf_counter()
        each = gradient_maps(
            model,
            batch,
            gradient,
            layer,
            classes,
            batch_size=settings.batch_size,
            gate_width=params.serving.explanation.gate_width,
        )
        seconds[key] = time.perf_counter() - start
        computed.update({f"{method}@{layer}": values for method, values in each.items()})
        print(f"localise: {key} on {len(batch)} slices, one gradient pass, {seconds[key]:.1f} s")
    count = min(settings.occlusion_slices, len(batch))
    if OCCLUSION in settings.methods and count > 0:
        key = f"{OCCLUSION}@{INPUT_LAYER}"
        start = time.perf_counter()
        computed[key] = explanation_maps(
            model,
            batch[:count],
            OCCLUSION,
            INPUT_LAYER,
            classes[:count],
            batch_size=settings.batch_size,
            occlusion_patch=settings.occlusion_patch,
            occlusion_stride=settings.occlusion_stride,
        )
        seconds[key] = time.perf_counter() - start
        print(f"localise: {key} on {count} slices, {seconds[key]:.1f} s")
    maps = {
        key: computed[key]
        for method in settings.methods
        for key in (
            [f"{method}@{INPUT_LAYER}"]
            if method == OCCLUSION
            else [f"{method}@{layer}" for layer in layers]
        )
        if key in computed
    }
    return maps, seconds


def score_all(
    params: Params, maps: dict[str, np.ndarray], regions: np.ndarray, labels: np.ndarray
) -> dict[str, Any]:
    """Scores of every map, of the centred Gaussian, and the paired occlusion subset."""
    from braintumor.evaluation.localisation import area_shares, centred_gaussian, score

    tolerance = params.localise.tolerance
    size = regions.shape[1]
    gaussian = centred_gaussian(size, size, params.localise.baseline_sigma)
    results = {
        key: score(values, regions[: len(values)], tolerance, labels[: len(values)])
        for key, values in maps.items()
    }
    baseline = score(np.broadcast_to(gaussian, regions.shape), regions, tolerance, labels)
    paired: dict[str, Any] = {}
    occluded = [key for key in maps if key.startswith(f"{OCCLUSION}@")]
    if occluded:
        count = len(maps[occluded[0]])
        paired = {
            key: score(values[:count], regions[:count], tolerance, labels[:count])
            for key, values in maps.items()
        }
        paired["centred_gaussian"] = score(
            np.broadcast_to(gaussian, (count, size, size)),
            regions[:count],
            tolerance,
            labels[:count],
        )
    return {
        "methods": results,
        "baseline": baseline,
        "area_share": float(area_shares(regions).mean()),
        "paired_with_occlusion": paired,
    }


def headline(
    scores: dict[str, Any], counts: dict[str, int], chosen: str, params: Params
) -> dict[str, Any]:
    """The DVC metric: pointing and energy per method and layer, the baseline, the counts,
    the choice (no timings or prose, which change or crowd ``dvc metrics diff``: both are
    in the detail). Nested as method -> layer so ``dvc metrics diff`` reads
    ``hirescam.block10_add.pointing``."""
    methods: dict[str, dict[str, Any]] = {}
    for key, result in scores["methods"].items():
        method, layer = key.split("@", 1)
        methods.setdefault(method, {})[layer] = {
            "pointing": round(result["pointing"], 4),
            "energy": round(result["energy"], 4),
            "slices": result["slices"],
        }
    method, layer = chosen.split("@", 1)
    return {
        **methods,
        "centred_gaussian": {
            "pointing": round(scores["baseline"]["pointing"], 4),
            "energy": round(scores["baseline"]["energy"], 4),
        },
        "mask_area_share": round(scores["area_share"], 4),
        "slices": scores["baseline"]["slices"],
        "tolerance_px": params.localise.tolerance,
        "masks": counts,
        "chosen": {
            "method": method,
            "layer": layer,
            # Negative: "look at the middle" does better on this score.
            "pointing_over_baseline": round(
                scores["methods"][chosen]["pointing"] - scores["baseline"]["pointing"], 4
            ),
            "energy_over_baseline": round(
                scores["methods"][chosen]["energy"] - scores["baseline"]["energy"], 4
            ),
        },
    }


def card_line(
    scores: dict[str, Any], chosen: str, tolerance: int, last: str, gate_width: float = 0.0
) -> str:
    """One sentence for a model card: the chosen map, the last map's Grad-CAM, occlusion
    and the centred Gaussian, pointing game with its interval and energy in the mask, and
    the gradient methods' soft ReLU gates when they have them."""
    methods, baseline = scores["methods"], scores["baseline"]

    def told(key: str) -> str:
        result = methods[key]
        low, high = result["pointing_interval"]
        return (
            f"{key} {result['pointing']:.2f} [{low:.2f}, {high:.2f}] "
            f"(energy {result['energy']:.3f}, {result['slices']} slices)"
        )

    shown = [chosen] + [
        key for key in (f"gradcam@{last}", f"{OCCLUSION}@input") if key in methods and key != chosen
    ]
    return (
        f"Explanations against figshare tumour masks (pointing game, peak within {tolerance} "
        f"px of the mask): {'; '.join(told(key) for key in shown)}; a centred Gaussian "
        f"{baseline['pointing']:.2f} (energy {baseline['energy']:.3f}); mask area "
        f"{scores['area_share']:.3f}. The app's map: {chosen}"
        + (
            f" (gradients through soft ReLU gates of width {gate_width:g})."
            if gate_width > 0
            else "."
        )
    )


def examples(
    params: Params,
    rows: pd.DataFrame,
    images: np.ndarray,
    regions: np.ndarray,
    maps: dict[str, np.ndarray],
) -> list[dict[str, Any]]:
    """A few slices (one per class in turn, among those every map covers) with their maps."""
    covered = min(len(values) for values in maps.values()) if maps else 0
    picks = select(
        rows.head(covered).assign(_row=np.arange(covered)),
        params.localise.examples,
        params.localise.seed,
    )
    return [
        {
            "image": images[row],
            "mask": regions[row],
            "title": f"{label} {Path(path).name}",
            "maps": {key: values[row] for key, values in maps.items()},
        }
        for row, label, path in zip(picks["_row"], picks["class"], picks["path"], strict=True)
    ]


def run(args: argparse.Namespace, params: Params) -> dict[str, Any]:
    """The stage's work; returns the headline."""
    from braintumor.data.masks import class_counts, masks_by_status, match_counts
    from braintumor.evaluation.localisation import choose, localisation_figure

    started = time.perf_counter()
    matches = match(params, args.raw, args.masks)
    counts = match_counts(matches)
    print("localise: masks " + ", ".join(f"{key} {value}" for key, value in counts.items()))
    with atomic_path(args.matches) as temporary:
        matches.to_csv(temporary, index=False)
    usable = masks_by_status(matches, TEST)
    if usable.empty:
        raise LocaliseError(f"{args.masks}: no mask matches a test image of the same class")
    # Occlusion's subset is the head of the selection: select() interleaves classes.
    rows = select(usable, params.localise.max_slices, params.localise.seed)
    classes = list(params.common.classes)
    labels = rows["class"].to_numpy()
    class_index = np.array([classes.index(label) for label in labels], dtype=np.int64)
    images, regions = model_inputs(params, args.raw, args.masks, rows)
    model = load_model(args.model, len(classes))
    layers = resolve_layers(params, model)
    maps, seconds = measure(params, model, images, class_index, layers)
    scores = score_all(params, maps, regions, labels)
    servable = [key for key in scores["methods"] if key.split("@", 1)[0] in SERVABLE]
    chosen, reason = choose(scores["methods"], servable or list(scores["methods"]))
    print(f"localise: chosen {chosen} ({reason})")
    summary = headline(scores, counts, chosen, params)
    detail = {
        **scores,
        "masks": counts,
        "masks_per_class": class_counts(matches),
        "tolerance_px": params.localise.tolerance,
        "image_size": params.common.image_size,
        "explained_class": "true",
        "seconds": {key: round(value, 2) for key, value in seconds.items()},
        "chosen": {"key": chosen, "reason": reason},
        "card_line": card_line(
            scores,
            chosen,
            params.localise.tolerance,
            layers[0],
            params.serving.explanation.gate_width,
        ),
        "gate_width": params.serving.explanation.gate_width,
        "elapsed_seconds": round(time.perf_counter() - started, 1),
    }
    args.figures.mkdir(parents=True, exist_ok=True)
    localisation_figure(
        scores["methods"],
        scores["baseline"],
        scores["area_share"],
        examples(params, rows, images, regions, maps),
        args.figures / "localisation.png",
    )
    write_json(args.detail, detail)
    write_json(args.metrics, summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--raw", type=Path, required=True, help="data/raw")
    parser.add_argument("--masks", type=Path, required=True, help="data/masks")
    parser.add_argument("--model", type=Path, required=True, help="the fine-tuned model")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--detail", type=Path, required=True)
    parser.add_argument("--matches", type=Path, required=True)
    parser.add_argument("--figures", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        configure_backend(params.train, args.params.resolve().parent)
        summary = run(args, params)
    except (ConfigError, LocaliseError, MaskError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    chosen = summary["chosen"]
    print(f"localise: wrote {args.metrics}; the app's map: {chosen['method']}@{chosen['layer']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
