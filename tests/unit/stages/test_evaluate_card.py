"""The evaluate stage writes the model card beside its report, from its own metrics and
the localisation detail it is given (``reports/model_card.py`` builds the text)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from braintumor.reports.model_card import CARD_FILE
from braintumor.serving.bundle import Bundle, read_meta

from conftest import TINY_OVERRIDES, evaluate_args, write_params

CARD_LINE = (
    "Explanations against figshare tumour masks (pointing game, peak within 8 px of the "
    "mask): gradcam@top_activation 0.30 [0.20, 0.40] (energy 0.050, 40 slices); a centred "
    "Gaussian 0.45 (energy 0.030); mask area 0.020. The app's map: gradcam@top_activation."
)


@pytest.mark.slow
def test_the_stage_writes_the_card_from_its_metrics(
    tiny_project: dict[str, Path], tmp_path: Path
) -> None:
    """About 30 s: one evaluation of the tiny project without tracking, with a
    localisation detail; the card holds the run's own headline and that sentence, and
    says the audit was not run (no --audit)."""
    from braintumor.stages.evaluate import main

    detail = tmp_path / "localisation_detail.json"
    detail.write_text(json.dumps({"card_line": CARD_LINE, "chosen": "gradcam@top_activation"}))
    params = write_params(tmp_path / "params", TINY_OVERRIDES)
    args = evaluate_args(tiny_project, tmp_path / "out", params=params)
    assert main([*args, "--no-tracking", "--localisation", str(detail)]) == 0
    card = (tmp_path / "out" / CARD_FILE).read_text(encoding="utf-8")
    metrics = json.loads((tmp_path / "out" / "metrics" / "eval.json").read_text())["finetuned"]
    low, high = metrics["msoud_test.accuracy_ci_low"], metrics["msoud_test.accuracy_ci_high"]
    told = f"{metrics['msoud_test.accuracy']:.3f} [{low:.3f}, {high:.3f}]"
    assert f"| Msoud test (the study's split) | {metrics['msoud_test.count']:,} | {told} |" in card
    assert CARD_LINE in card and "Not for diagnosis" in card
    assert "Suspected label errors: not measured" in card
    assert f"temperature {round(metrics['temperature'], 3)}" in card
    assert read_meta(tmp_path / "out" / "bundle").model_sha256[:16] in card
    # the bundle carries the same card, hashed in its manifest, and still loads
    bundle = tmp_path / "out" / "bundle"
    assert (bundle / CARD_FILE).read_text(encoding="utf-8") == card
    assert CARD_FILE in read_meta(bundle).files
    Bundle.load(bundle)
