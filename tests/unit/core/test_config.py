"""The typed parameters: both profiles load, and bad files fail with a one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from braintumor.core.config import deep_merge, flatten, load_params, params_from_mapping
from braintumor.core.schema import ConfigError

from conftest import REPO, committed_params_text, params_file, write_params


def test_paper_profile_has_the_recipe_values() -> None:
    params = load_params(params_file())
    assert params.profile == "paper"
    assert params.common.image_size == 224
    assert params.preprocess.clahe.clip_limit == 2.0 and params.preprocess.clahe.tile_grid == 8
    assert params.preprocess.unsharp.sigma == 1.5
    assert (params.preprocess.unsharp.image_weight, params.preprocess.unsharp.blur_weight) == (
        1.5,
        -0.5,
    )
    assert params.train.frozen.learning_rate == 1e-4 and params.train.frozen.epochs == 30
    assert params.train.finetune.learning_rate == 1e-5 and params.train.finetune.epochs == 20
    assert params.model.backbone == "resnet50" and params.model.dropout == 0.4
    assert [s.name for s in params.acquire.sources] == ["msoud", "sartaj"]


def test_quickstart_profile_overrides_only_what_it_names() -> None:
    raw = yaml.safe_load(committed_params_text())
    paper = params_from_mapping(raw, REPO / "profiles")
    quick = params_from_mapping({**raw, "profile": "quickstart"}, REPO / "profiles")
    assert quick.profile == "quickstart"
    assert [s.name for s in quick.acquire.sources] == ["msoud", "sartaj"]
    override = yaml.safe_load((REPO / "profiles" / "quickstart.yaml").read_text())
    for section in ("clean", "preprocess"):
        if not override.get(section):
            assert getattr(quick, section) == getattr(paper, section)


def test_every_profile_file_has_every_section_dvc_tracks() -> None:
    # dvc.yaml tracks per-section keys of profiles/*.yaml; a missing key fails `dvc repro`.
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    for profile in (REPO / "profiles").glob("*.yaml"):
        content = yaml.safe_load(profile.read_text())
        for stage in dvc["stages"].values():
            for entry in stage.get("params", []):
                if isinstance(entry, dict) and f"profiles/{profile.name}" in entry:
                    for key in entry[f"profiles/{profile.name}"]:
                        assert key.split(".")[0] in content, f"{profile.name} lacks {key}"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"clean": {"near_similarty": 0.9}}, "clean.near_similarty: unknown key"),
        ({"clean": {"near_similarity": 1.5}}, "clean.near_similarity: must be in (0, 1]"),
        ({"train": {"frozen": {"epochs": 0}}}, "train.frozen.epochs: must be >= 1"),
        ({"train": {"backend": "theano"}}, "train.backend: 'theano' is not one of"),
        ({"train": {"xla_gpu_autotune_level": 7}}, "train.xla_gpu_autotune_level: must be 0-4"),
        ({"preprocess": {"clahe": {"enabled": "yes"}}}, "preprocess.clahe.enabled: expected"),
        ({"common": {"image_size": "big"}}, "common.image_size: expected an integer"),
        ({"preprocess": {"val_fraction": 1.0}}, "preprocess.val_fraction: must be in (0, 1)"),
        ({"extra": 1}, "extra: unknown key"),
        (
            {"train": {"finetune": {"trainable": "from_block", "first_trainable_block": 17}}},
            "train.finetune.first_trainable_block: must be in [0, 16]",
        ),
        (
            {"train": {"finetune": {"trainable": "from_block", "first_trainable_block": -1}}},
            "train.finetune.first_trainable_block: must be in [0, 16]",
        ),
        (
            {"train": {"finetune": {"first_trainable_block": 5}}},
            "train.finetune.first_trainable_block: is only read with trainable: from_block",
        ),
        ({"train": {"finetune": {"trainable": "from_blok"}}}, "train.finetune.trainable: "),
        ({"profile": "nosuch"}, "profile: no profile file"),
        ({"common": {"seed": -1}}, "common.seed: must be in [0, 2147483647]"),
        ({"common": {"seed": 2**31}}, "common.seed: must be in [0, 2147483647]"),
        (
            {"train": {"frozen": {"early_stopping": {"patience": -1}}}},
            "train.frozen.early_stopping.patience: ",
        ),
        (
            {"train": {"finetune": {"early_stopping": {"min_delta": -0.1}}}},
            "train.finetune.early_stopping.min_delta: ",
        ),
        (
            {"train": {"finetune": {"reduce_lr": {"factor": 1.5}}}},
            "train.finetune.reduce_lr.factor: must be in (0, 1)",
        ),
        (
            {"train": {"finetune": {"reduce_lr": {"min_learning_rate": -1e-7}}}},
            "train.finetune.reduce_lr.min_learning_rate: ",
        ),
        ({"train": {"finetune": {"schedule": "step"}}}, "train.finetune.schedule: 'step'"),
        (
            {"train": {"finetune": {"schedule": "cosine", "epochs": 3, "warmup_epochs": 3}}},
            "train.finetune.warmup_epochs: must be in [0, epochs) (epochs is 3)",
        ),
        (
            {"train": {"finetune": {"schedule": "cosine", "warmup_epochs": -0.5}}},
            "train.finetune.warmup_epochs: must be in [0, epochs)",
        ),
        (
            {"train": {"frozen": {"warmup_epochs": 1}}},
            "train.frozen.warmup_epochs: is only read with schedule: cosine",
        ),
        ({"evaluate": {"robustness": {"seed": 2**40}}}, "evaluate.robustness.seed: must be in"),
        (
            {"serving": {"explanation": {"gate_width": 1.5}}},
            "serving.explanation.gate_width: must be in [0, 1.0]",
        ),
        (
            {"serving": {"explanation": {"gate_width": -0.1}}},
            "serving.explanation.gate_width: must be in [0, 1.0]",
        ),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_key(
    tmp_path: Path, override: dict, message: str
) -> None:
    path = write_params(tmp_path, override)
    with pytest.raises(ConfigError) as caught:
        load_params(path)
    text = str(caught.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_a_label_outside_the_vocabulary_is_refused(tmp_path: Path) -> None:
    raw = yaml.safe_load(committed_params_text())
    raw["acquire"]["sources"][0]["labels"]["glioma"] = "tumour"
    with pytest.raises(ConfigError, match=r"acquire.sources\.msoud\.labels\.glioma: maps to"):
        params_from_mapping(raw, REPO / "profiles")


def test_a_url_source_needs_a_checksum() -> None:
    raw = yaml.safe_load(committed_params_text())
    raw["acquire"]["sources"][0]["uri"] = "https://example.org/data.zip"
    with pytest.raises(ConfigError, match=r"acquire.sources\[0\].sha256"):
        params_from_mapping(raw, REPO / "profiles")


def test_params_are_frozen_and_flatten_to_dotted_keys() -> None:
    params = load_params(params_file())
    with pytest.raises(AttributeError):
        params.common.seed = 1  # type: ignore[misc]
    flat = flatten(params)
    assert flat["train.frozen.learning_rate"] == 1e-4
    assert flat["acquire.sources.msoud.uri"].startswith("kaggle://")


def test_deep_merge_merges_mappings_and_replaces_the_rest() -> None:
    merged = deep_merge({"a": {"b": 1, "c": [1]}, "d": 2}, {"a": {"c": [2]}, "e": 3})
    assert merged == {"a": {"b": 1, "c": [2]}, "d": 2, "e": 3}


def test_an_exponent_without_a_dot_is_a_number(tmp_path: Path) -> None:
    """``dvc exp run -S train.finetune.learning_rate=3e-5`` writes ``3e-05`` back (YAML 1.2);
    PyYAML alone reads that as a string and the params would be refused."""
    path = write_params(tmp_path)
    text = path.read_text()
    assert "learning_rate: 1.0e-05" in text  # the finetune rate as safe_dump writes it
    path.write_text(text.replace("learning_rate: 1.0e-05", "learning_rate: 3e-05", 1))
    assert yaml.safe_load("x: 3e-05")["x"] == "3e-05"  # the premise
    assert load_params(path).train.finetune.learning_rate == pytest.approx(3e-5)
    path.write_text(text.replace("learning_rate: 1.0e-05", "learning_rate: 3e-x5", 1))
    with pytest.raises(ConfigError, match="expected a number"):
        load_params(path)


def test_from_block_loads_and_the_block_count_matches_lite0(tmp_path: Path) -> None:
    from braintumor.core.schema import LITE0_BLOCKS
    from braintumor.model.lite0 import lite0_blocks

    assert len(lite0_blocks()) == LITE0_BLOCKS
    path = write_params(
        tmp_path, {"train": {"finetune": {"trainable": "from_block", "first_trainable_block": 5}}}
    )
    finetune = load_params(path).train.finetune
    assert (finetune.trainable, finetune.first_trainable_block) == ("from_block", 5)
