"""One definition of each setting (sam2pal.settings): the schema, config/README.md, the
command line, the engine and the workflow's rerun triggers agree with it."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import yaml

from sam2pal import cli, settings
from sam2pal.errors import InputError
from sam2pal.inference import pipeline

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
README = (REPO / "config" / "README.md").read_text(encoding="utf-8")

# The key sets the workflow used before they were derived from `reruns`
# (workflow/rules/common.smk, sam2pal.inference.pipeline).
OLD_MASK_SETTINGS = (
    "cycle_consistency",
    "fill_hole_area",
    "area_growth_limit",
    "area_clamp_pad",
    "bbox_clamp",
    "exact",
    "on_bad_image",
)
OLD_FINETUNE_WORKFLOW_KEYS = (
    "enabled",
    "adapter",
    "pool_images",
    "training_templates",
    "training_template_images",
    "threads",
    "mem_mb",
    "runtime",
)
OLD_DEFAULT_ENGINE_SETTINGS = {
    "cycle_consistency": True,
    "fill_hole_area": 8,
    "area_growth_limit": 0.0,
    "area_clamp_pad": 10,
    "bbox_clamp": False,
    "exact": False,
}

# Flags of `segment` and `video` that are no setting of a config section.
NON_SETTING_FLAGS = {
    "--help",
    # inputs and outputs of one command
    "--image_dir",
    "--output_dir",
    "--output_timestamp",
    "--input",
    "--video_dir",
    "--annotations",
    "--export_predictions",
    "--px_per_mm",
    "--calibration_csv",
    # templates (a collection's `templates` entry)
    "--template_image",
    "--template_mask",
    "--structure_name",
    "--template_labels",
    "--template_json",
    "--template_dir",
    # PyTorch's threads (0: its default), not a job's
    "--threads",
    # which training runs, and with what
    "--use_lora",
    "--full_finetune",
    "--skip_training",
    "--train_only",
    "--checkpoint",
    "--ground_truth",
    # accepted flags of the old tool that change nothing
    *cli.DRIFT_FLAGS,
}

# Flags whose default is not the setting's, on purpose: fine-tuning flags are None
# until given (`segment` tells which were given); the old tool wrote no overlays; a
# model must be named; --image_format None tells --video_dir that it was not given.
OWN_DEFAULT_FLAGS = {"--save_vis", "--sam2_checkpoint", "--image_format"}
TRAINING_FLAGS = set(settings.flags(settings.Training))


def _fields(group) -> dict:
    return {f.name: f for f in dataclasses.fields(group)}


@pytest.mark.parametrize("section", list(settings.SECTIONS))
def test_schema_defaults_are_the_settings_defaults(section):
    group = settings.SECTIONS[section]
    schema = SCHEMA["properties"][section]["properties"]
    assert set(schema) == set(_fields(group)), section
    defaults = settings.defaults(group)
    for key, spec in schema.items():
        assert spec.get("default") == defaults[key], f"{section}.{key}"
        assert type(spec.get("default")) in (type(defaults[key]), int), f"{section}.{key}"
        flag = _fields(group)[key].metadata["flag"]
        if flag is not None and flag.choices:
            assert set(flag.choices) == set(spec["enum"]), f"{section}.{key}"


def _readme_section(section: str) -> str:
    match = re.search(rf"^## `{section}`\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert match, f"config/README.md has no section {section}"
    return match.group(1)


@pytest.mark.parametrize("section", list(settings.SECTIONS))
def test_every_setting_is_documented_in_the_config_readme(section):
    text = _readme_section(section)
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    for key in _fields(settings.SECTIONS[section]):
        assert any(f"`{key}`" in row.split("|")[1] for row in rows), f"{section}.{key}"


def test_every_field_says_what_it_is_and_what_it_reruns():
    for group in (*settings.SECTIONS.values(), settings.Training):
        for field in dataclasses.fields(group):
            assert field.metadata["help"].strip(), field.name
            assert field.metadata["reruns"] in settings.RERUNS, field.name
    with pytest.raises(ValueError, match="reruns must be one of"):
        settings.setting(0, "a setting", "everything")


def _options(command: str) -> dict:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.option_strings[0]: a for a in sub.choices[command]._actions if a.option_strings}


def _setting_flags() -> dict:
    found = {}
    for group in settings.SECTIONS.values():
        for name, field in settings.flags(group).items():
            found.setdefault(name, []).append((group, field))
    return found


@pytest.mark.parametrize("command", ["segment", "video"])
def test_every_flag_is_a_setting_or_listed_as_none(command):
    known = _setting_flags()
    for flag, action in _options(command).items():
        name = "--help" if flag == "-h" else flag
        assert name in known or name in NON_SETTING_FLAGS, f"{command} {name}"
        if name not in known:
            continue
        for _, field in known[name]:
            ref = field.metadata["flag"]
            if name in TRAINING_FLAGS:
                assert action.default is None, name
            elif name not in OWN_DEFAULT_FLAGS:
                expected = False if ref.invert else settings.default_of(field)
                assert action.default == expected, name
            if ref.choices:
                assert tuple(action.choices) == ref.choices, name


def test_the_rerun_sets_are_the_workflows():
    assert settings.mask_keys() == OLD_MASK_SETTINGS
    assert settings.recorded_keys() == (*OLD_MASK_SETTINGS, "template_files", "max_templates")
    assert settings.workflow_keys() == OLD_FINETUNE_WORKFLOW_KEYS
    # the trainer's settings are the rest of the section
    assert settings.keys(settings.Finetune, reruns="training") == tuple(_fields(settings.Training))


def test_one_default_of_each_engine_setting():
    from sam2pal.inference.engine import Propagator
    from sam2pal.inference.temporal import VideoPropagator

    defaults = settings.engine_defaults()
    assert defaults == OLD_DEFAULT_ENGINE_SETTINGS
    assert [type(v) for v in defaults.values()] == [
        type(v) for v in OLD_DEFAULT_ENGINE_SETTINGS.values()
    ]
    assert defaults == pipeline.DEFAULT_ENGINE_SETTINGS
    for engine in (Propagator, VideoPropagator):
        parameters = inspect.signature(engine.__init__).parameters
        assert {key: parameters[key].default for key in defaults} == defaults, engine
    args = cli.build_parser().parse_args(
        ["segment", "--image_dir", "x", "--output_dir", "y", "--template_json", "t.json"]
    )
    assert cli._engine_settings(args) == defaults


def test_the_trainer_takes_the_fine_tuning_settings():
    from sam2pal.models.adapters import DEFAULT_LORA_COMPONENTS
    from sam2pal.training.palindrome import FinetuneSettings

    assert [f.name for f in dataclasses.fields(FinetuneSettings)] == list(
        _fields(settings.Training)
    )
    assert FinetuneSettings().targets == list(DEFAULT_LORA_COMPONENTS)
    assert dataclasses.asdict(FinetuneSettings()) == settings.defaults(settings.Training)
    args = cli.build_parser().parse_args(
        ["finetune", "--image_dir", "x", "--output_dir", "y", "--epochs", "3"]
    )
    args.no_feature_cache = True
    assert cli._finetune_settings(args, lora=True) == {
        "mode": "lora",
        "num_epochs": 3,
        "cache_features": False,
    }


def test_a_new_engine_setting_is_one_field():
    """A segmentation setting added as one field reaches the command line, the
    pipeline's engine settings and the workflow's rerun triggers."""
    extended = dataclasses.make_dataclass(
        "Extended",
        [
            (
                "smooth_edges",
                int,
                settings.setting(
                    0,
                    "smooth outlines over this many pixels (0: off)",
                    "segmentation",
                    engine=True,
                    flag="--smooth_edges",
                ),
            )
        ],
        bases=(settings.Segmentation,),
        frozen=True,
    )
    parser = argparse.ArgumentParser()
    cli._engine_args(parser, "the template", group=extended)
    assert "smooth outlines" in parser.format_help()
    given = cli._engine_settings(parser.parse_args(["--smooth-edges", "3"]), group=extended)
    assert given == {**OLD_DEFAULT_ENGINE_SETTINGS, "smooth_edges": 3}
    assert cli._engine_settings(parser.parse_args([]), group=extended)["smooth_edges"] == 0

    assert pipeline._engine_settings({"smooth_edges": 3}, group=extended)["smooth_edges"] == 3
    with pytest.raises(InputError, match="unknown propagation setting"):
        pipeline._engine_settings({"smooth_edges": 3})

    assert settings.mask_keys(extended) == (*OLD_MASK_SETTINGS, "smooth_edges")
    assert "smooth_edges" in settings.recorded_keys(extended)
    assert settings.engine_defaults(extended)["smooth_edges"] == 0
