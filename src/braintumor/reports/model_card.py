"""The model card: what the served model is for, what it was tested on and where it fails.

One Markdown page written by the evaluate stage beside the bundle it describes, built only
from numbers the pipeline measured: ``metrics/eval.json`` (the fine-tuned model's views
with their bootstrap intervals, calibration before and after the temperature, the
out-of-distribution detector's false alarms, robustness, the external view),
``metrics/audit.json`` (suspected label errors) and ``metrics/localisation_detail.json``
(its ``card_line``: do the explanations point at the tumour). A reader who only gets the
model (the registry, a copied bundle) learns its intended use, its honest numbers and its
limits without the repository.

Pure: dicts in, text out. Every piece may be missing (a profile without localisation,
an evaluation without the audit or the SARTAJ views): the card then says what was not
measured instead of failing, since a card with a gap is still better than no card.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

CARD_FILE = "MODEL_CARD.md"
MODEL = "finetuned"
# The views of the test set, headline first: the msoud_test split is the study's; the
# leakage-free ones drop every slice with a training twin or same-patient neighbour.
VIEWS = (
    ("msoud_test", "Msoud test (the study's split)"),
    ("msoud_leakage_free", "Msoud test, leakage-free"),
    ("test", "all test (Msoud + SARTAJ)"),
    ("leakage_free", "all test, leakage-free"),
    ("sartaj_test", "SARTAJ test"),
)
RECALL_VIEWS = ("msoud_test", "leakage_free")
NOT_MEASURED = "not measured in this evaluation"


def _number(view: Mapping[str, Any], key: str) -> float | None:
    value = view.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _with_interval(view: Mapping[str, Any], prefix: str, key: str) -> str:
    """``0.951 [0.937, 0.963]``, the point alone without its interval, ``-`` if absent."""
    value = _number(view, f"{prefix}.{key}")
    if value is None:
        return "-"
    low = _number(view, f"{prefix}.{key}_ci_low")
    high = _number(view, f"{prefix}.{key}_ci_high")
    if low is None or high is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _ece(view: Mapping[str, Any], prefix: str) -> str:
    before = _number(view, f"{prefix}.ece_before")
    after = _number(view, f"{prefix}.ece_after")
    if before is None or after is None:
        return "-"
    return f"{before:.3f} -> {after:.3f}"


def _count(view: Mapping[str, Any], prefix: str) -> str:
    count = _number(view, f"{prefix}.count")
    return f"{count:,.0f}" if count is not None else "-"


def intended_use() -> list[str]:
    return [
        "## Intended use",
        "",
        "Research and teaching: classifying a single 2-D brain MRI slice (JPEG, PNG or "
        "windowed DICOM) as glioma, meningioma, pituitary tumour or no tumour, with a "
        "calibrated probability per class and a map of the regions that drove the answer, "
        "to study how such a model behaves, where it fails and how its explanations relate "
        "to the tumour.",
        "",
        "## Not intended use",
        "",
        "- **Not for diagnosis.** It is not a medical device and was not validated "
        "clinically: no diagnosis, triage, screening or treatment decision may rest on it.",
        "- Not for other modalities (CT), other organs, whole volumes or patients: it sees one "
        "slice, without the patient's history or other sequences.",
        "- Not for tumour types outside its four classes: it always answers one of them (its "
        "out-of-distribution check refuses some, not all, unfamiliar images).",
        "- Not for images from scanners or protocols unlike its training data without a new "
        "evaluation there (see the SARTAJ numbers below).",
    ]


def data_section(metrics: Mapping[str, Any], data: Mapping[str, Any] | None) -> list[str]:
    lines = ["## Data", ""]
    finetuned = metrics.get(MODEL, {})
    data = data or {}
    sources = data.get("sources")
    if sources:
        lines.append(f"Sources: {', '.join(str(name) for name in sources)}.")
    else:
        lines.append("Sources: not recorded.")
    splits = data.get("splits") or {}
    if splits:
        told = ", ".join(f"{name} {count:,}" for name, count in splits.items())
        lines.append(f"Images after cleaning (exact and near duplicates removed): {told}.")
    views = [
        f"{label} {_count(finetuned, view)}"
        for view, label in VIEWS
        if _number(finetuned, f"{view}.count") is not None
    ]
    if views:
        lines.append(f"Test images per view: {'; '.join(views)}.")
    return lines


def evaluation_section(metrics: Mapping[str, Any], classes: Sequence[str]) -> list[str]:
    finetuned = metrics.get(MODEL)
    lines = ["## Evaluation", ""]
    if not finetuned:
        return [*lines, f"The served model's evaluation is missing ({NOT_MEASURED})."]
    lines += [
        "The served (fine-tuned, temperature-calibrated) model; 95 % bootstrap intervals in "
        "brackets. ECE: expected calibration error before -> after the temperature fitted on "
        "the validation split.",
        "",
        "| view | images | accuracy | macro-F1 | ECE |",
        "|---|---|---|---|---|",
    ]
    for view, label in VIEWS:
        if _number(finetuned, f"{view}.accuracy") is None:
            lines.append(f"| {label} | - | {NOT_MEASURED} | - | - |")
            continue
        lines.append(
            f"| {label} | {_count(finetuned, view)} | "
            f"{_with_interval(finetuned, view, 'accuracy')} | "
            f"{_with_interval(finetuned, view, 'macro_f1')} | {_ece(finetuned, view)} |"
        )
    lines += ["", "Recall per class:", "", f"| view | {' | '.join(classes)} |"]
    lines.append("|---" * (len(classes) + 1) + "|")
    for view in RECALL_VIEWS:
        label = dict(VIEWS)[view]
        values = [_number(finetuned, f"{view}.{name}_recall") for name in classes]
        told = [f"{value:.3f}" if value is not None else "-" for value in values]
        lines.append(f"| {label} | {' | '.join(told)} |")
    return lines


def ood_section(metrics: Mapping[str, Any]) -> list[str]:
    finetuned = metrics.get(MODEL, {})
    lines = ["## Out-of-distribution behaviour", ""]
    rates = {
        view: _number(finetuned, f"ood.{view}.false_alarms") for view in ("test", "leakage_free")
    }
    if all(rate is None for rate in rates.values()):
        return [
            *lines,
            "No learned out-of-distribution detector was fitted (or it was "
            f"{NOT_MEASURED}): uploads far from the training intensity statistics are "
            "refused, other unfamiliar images get an answer.",
        ]
    labels = {"test": "test set", "leakage_free": "leakage-free test"}
    told = ", ".join(
        f"{rate:.1%} of the {labels[view]}" for view, rate in rates.items() if rate is not None
    )
    return [
        *lines,
        "Uploads whose pooled features lie further from the training slices than the "
        "threshold fitted on validation slices are refused with a message, no class given "
        f"(photographs, other modalities). False alarms on real test slices: {told}.",
    ]


def robustness_section(metrics: Mapping[str, Any]) -> list[str]:
    finetuned = metrics.get(MODEL, {})
    lines = ["## Robustness", ""]
    found = {
        key.removeprefix("robustness."): float(value)
        for key, value in finetuned.items()
        if key.startswith("robustness.") and isinstance(value, int | float)
    }
    clean = found.pop("clean", None)
    if clean is None or not found:
        return [*lines, f"Accuracy under perturbations: {NOT_MEASURED}."]
    worst = min(found, key=found.__getitem__)
    kinds = ", ".join(sorted({name.split("_", 1)[0] for name in found}))
    served = finetuned.get("served.max_probability_diff")
    scored_on = (
        f" Scored on the exported model that serving runs; on the clean slices its "
        f"probabilities are within {float(served):.1e} of the Keras model's."
        if isinstance(served, int | float)
        else ""
    )
    return [
        *lines,
        f"Accuracy on the leakage-free test view under {len(found)} perturbations "
        f"({kinds}): clean {clean:.3f}; worst {worst} {found[worst]:.3f} (a drop of "
        f"{clean - found[worst]:.3f}).{scored_on}",
    ]


def localisation_section(localisation: Mapping[str, Any] | None) -> list[str]:
    lines = ["## Explanations", ""]
    line = (localisation or {}).get("card_line")
    if not line:
        return [
            *lines,
            "Localisation was not run for this model (no metrics/localisation_detail.json "
            "with a card_line): whether its maps point at the tumour is not measured.",
        ]
    return [*lines, str(line)]


def audit_section(audit: Mapping[str, Any] | None) -> list[str]:
    lines = ["## Label audit", ""]
    issues = (audit or {}).get("label_issues")
    if not issues:
        return [*lines, f"Suspected label errors: {NOT_MEASURED} (no audit stage output)."]
    parts = []
    for split, by_source in issues.items():
        for source, by_class in by_source.items():
            images = sum(int(item.get("images", 0)) for item in by_class.values())
            suspects = sum(int(item.get("suspects", 0)) for item in by_class.values())
            if images:
                parts.append(f"{split} {source} {suspects}/{images:,} ({suspects / images:.1%})")
    return [
        *lines,
        "Out-of-fold class probabilities on frozen features and confident learning "
        "(cleanlab) flag labels that look unlikely; no label was changed. Suspects / images: "
        f"{'; '.join(parts)}.",
    ]


def limitations_section(metrics: Mapping[str, Any]) -> list[str]:
    finetuned = metrics.get(MODEL, {})
    lines = ["## Limitations", ""]
    msoud = _number(finetuned, "msoud_test.accuracy")
    sartaj = _number(finetuned, "sartaj_test.accuracy")
    if msoud is not None and sartaj is not None:
        ece = [_number(finetuned, f"{view}.ece_after") for view in ("sartaj_test", "msoud_test")]
        calibration = f" and ECE {ece[0]:.3f} against {ece[1]:.3f}" if None not in ece else ""
        lines.append(
            f'- **SARTAJ\'s test folder is a different distribution** (README "Labels"): '
            f"accuracy {sartaj:.3f} there against {msoud:.3f} on Msoud's test split"
            f"{calibration}, and its labels are the ones the audit doubts most; the headline "
            "is Msoud's test split and the leakage-free views."
        )
    else:
        lines.append(
            '- SARTAJ\'s test folder is a different distribution (README "Labels"); its '
            f"view was {NOT_MEASURED}."
        )
    external = metrics.get("external") or {}
    held_out = _number(external, "sartaj_test.accuracy")
    if held_out is not None:
        lines.append(
            f"- Trained without SARTAJ, the frozen-feature head scores {held_out:.3f} on its "
            "test images: the model does not carry over to an unseen source."
        )
    lines += [
        "- Public Kaggle data sets of 2-D slices with no patient identifiers: same-patient "
        "slices are grouped by image similarity, not by record, so some leakage may remain "
        "outside the leakage-free views.",
        "- The explanation maps show what the model used, not where the tumour is; see "
        "Explanations for how often they point at it.",
    ]
    return lines


def model_card(
    metrics: Mapping[str, Any],
    classes: Sequence[str],
    *,
    model: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    audit: Mapping[str, Any] | None = None,
    localisation: Mapping[str, Any] | None = None,
) -> str:
    """The card's Markdown. ``metrics``: ``eval.json``'s dict; ``model``: what identifies
    the served model (backbone, image size, profile, temperature, model and data digests);
    ``data``: ``sources`` (names) and ``splits`` (name -> images); ``audit``:
    ``metrics/audit.json``; ``localisation``: ``metrics/localisation_detail.json``. Any of
    them may be missing or partial: the card then states what was not measured."""
    model = model or {}
    described = ", ".join(
        f"{key} {value}" for key, value in model.items() if value not in (None, "")
    )
    lines = [
        "# Model card: brain tumour MRI slice classifier",
        "",
        "Generated by the evaluate stage from this model's own evaluation; every number below "
        "was measured on this model.",
        "",
        f"Classes: {', '.join(classes)}." + (f" Model: {described}." if described else ""),
        "",
    ]
    sections = (
        intended_use(),
        data_section(metrics, data),
        evaluation_section(metrics, classes),
        ood_section(metrics),
        robustness_section(metrics),
        localisation_section(localisation),
        audit_section(audit),
        limitations_section(metrics),
    )
    for section in sections:
        lines += [*section, ""]
    return "\n".join(lines)
