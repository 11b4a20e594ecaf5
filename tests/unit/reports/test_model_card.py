"""The model card builder on metrics shaped as the stages write them (eval.json's flat
``<view>.<metric>`` keys with bootstrap intervals, audit.json's nested label issues, the
localisation detail's ``card_line``), whole and with pieces missing."""

from __future__ import annotations

from typing import Any

from braintumor.reports.model_card import NOT_MEASURED, model_card

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
CARD_LINE = (
    "Explanations against figshare tumour masks (pointing game, peak within 8 px of the "
    "mask): hirescam@block10_add 0.41 [0.37, 0.45] (energy 0.068, 619 slices); a centred "
    "Gaussian 0.49 (energy 0.035); mask area 0.016. The app's map: hirescam@block10_add."
)


def _view(name: str, accuracy: float, count: int, recalls: tuple[float, ...]) -> dict[str, Any]:
    view = {
        f"{name}.accuracy": accuracy,
        f"{name}.accuracy_ci_low": accuracy - 0.02,
        f"{name}.accuracy_ci_high": accuracy + 0.015,
        f"{name}.macro_f1": accuracy - 0.01,
        f"{name}.macro_f1_ci_low": accuracy - 0.03,
        f"{name}.macro_f1_ci_high": accuracy + 0.01,
        f"{name}.count": count,
        f"{name}.ece_before": 0.0636,
        f"{name}.ece_after": 0.0135,
    }
    view.update({f"{name}.{c}_recall": r for c, r in zip(CLASSES, recalls, strict=True)})
    return view


def eval_json() -> dict[str, Any]:
    """The parts of a quickstart eval.json the card reads (values from a real run)."""
    finetuned: dict[str, Any] = {}
    finetuned |= _view("msoud_test", 0.95097, 979, (0.8915, 0.9444, 0.9893, 0.9900))
    finetuned |= _view("msoud_leakage_free", 0.92935, 368, (0.87, 0.97, 1.0, 1.0))
    finetuned |= _view("test", 0.86710, 1234, (0.7668, 0.8221, 0.9398, 0.9637))
    finetuned |= _view("leakage_free", 0.81637, 452, (0.6883, 0.9489, 1.0, 0.9429))
    finetuned |= _view("sartaj_test", 0.54510, 255, (0.3, 0.4, 0.6, 0.9))
    finetuned |= {"ood.test.false_alarms": 0.0227, "ood.leakage_free.false_alarms": 0.0243}
    finetuned |= {"ood.threshold": 4009.7, "temperature": 1.21}
    finetuned |= {"robustness.clean": 0.8164, "robustness.gamma_0.7": 0.7699}
    finetuned |= {"robustness.noise_10": 0.781, "robustness.jpeg_30": 0.8252}
    return {
        "finetuned": finetuned,
        "base": {"test.accuracy": 0.8},
        "external": {"sartaj_test.accuracy": 0.39216, "msoud_test.accuracy": 0.86925},
        "seconds": 72.9,
    }


def audit_json() -> dict[str, Any]:
    def per_class(images: int, suspects: int) -> dict[str, dict[str, float]]:
        return {c: {"images": images, "suspects": suspects, "share": 0.1} for c in CLASSES}

    return {
        "label_issues": {
            "test": {"msoud": per_class(245, 34), "sartaj": per_class(64, 20)},
            "train": {"msoud": per_class(552, 35)},
        },
        "out_of_fold_accuracy": {"test": 0.7763, "training": 0.8905},
    }


def test_the_card_tells_use_data_intervals_calibration_and_limits() -> None:
    card = model_card(
        eval_json(),
        CLASSES,
        model={"backbone": "lite0", "profile": "quickstart", "temperature": 1.21},
        data={"sources": ["msoud", "sartaj"], "splits": {"train": 4098, "val": 723, "test": 1234}},
        audit=audit_json(),
        localisation={"card_line": CARD_LINE, "chosen": "hirescam@block10_add"},
    )
    assert "Not for diagnosis" in card and "## Intended use" in card
    assert "Sources: msoud, sartaj." in card and "train 4,098, val 723, test 1,234" in card
    # the headline with its interval and the calibration before -> after
    assert "| Msoud test (the study's split) | 979 | 0.951 [0.931, 0.966] |" in card
    assert "| all test, leakage-free | 452 | 0.816 [0.796, 0.831] |" in card
    assert "0.064 -> 0.013" in card
    assert "| all test, leakage-free | 0.688 | 0.949 | 1.000 | 0.943 |" in card
    assert "2.3% of the test set, 2.4% of the leakage-free test" in card
    assert "worst gamma_0.7 0.770 (a drop of 0.046)" in card
    assert CARD_LINE in card
    assert "test msoud 136/980 (13.9%)" in card and "test sartaj 80/256 (31.2%)" in card
    assert "accuracy 0.545 there against 0.951" in card and "scores 0.392" in card
    assert NOT_MEASURED not in card
    assert "backbone lite0, profile quickstart, temperature 1.21" in card


def test_missing_pieces_are_stated_not_crashed() -> None:
    metrics = eval_json()
    for key in [k for k in metrics["finetuned"] if k.startswith(("sartaj", "ood", "robust"))]:
        del metrics["finetuned"][key]
    del metrics["external"]
    card = model_card(metrics, CLASSES)
    assert "Localisation was not run for this model" in card
    assert f"Suspected label errors: {NOT_MEASURED}" in card
    assert f"| SARTAJ test | - | {NOT_MEASURED} | - | - |" in card
    assert "No learned out-of-distribution detector was fitted" in card
    assert f"Accuracy under perturbations: {NOT_MEASURED}." in card
    assert f"its view was {NOT_MEASURED}" in card
    assert "Sources: not recorded." in card
    # a localisation detail without its sentence counts as not run
    assert "Localisation was not run" in model_card(metrics, CLASSES, localisation={"x": 1})
    # nothing at all: still a card, with its use and its gaps
    empty = model_card({}, CLASSES)
    assert "Not for diagnosis" in empty and "evaluation is missing" in empty
