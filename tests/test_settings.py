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
# the orientation search, mirror pairs and framing (issue 16)
ORIENTATION_SETTINGS = {
    "orientation": "none",
    "mirror_swap": False,
    "mirror_pairs": [],
    "framing": "stretch",
    "framing_fill": "border",
}
# the dark tones lifted (sam2pal.inference.tone)
TONE_SETTINGS = {"tone": "auto"}
# the zoom pass for small structures (issue 17)
ZOOM_SETTINGS = {"zoom": "off", "zoom_below": 0.1, "zoom_margin": 0.5}
# which of SAM2's candidate masks, and absent structures kept (benchmarks/readout.py)
MASK_RULE_SETTINGS = {"mask_choice": "templates", "absent": "keep"}
DEFAULT_ENGINE_SETTINGS = {
    **OLD_DEFAULT_ENGINE_SETTINGS,
    **ORIENTATION_SETTINGS,
    **TONE_SETTINGS,
    **ZOOM_SETTINGS,
    **MASK_RULE_SETTINGS,
}
MASK_SETTINGS = (
    *OLD_MASK_SETTINGS[:-1],
    *ORIENTATION_SETTINGS,
    *TONE_SETTINGS,
    *ZOOM_SETTINGS,
    *MASK_RULE_SETTINGS,
    "on_bad_image",
)

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
            # a schema may also take YAML's unquoted off / on (read as false / true)
            named = {choice for choice in spec["enum"] if not isinstance(choice, bool)}
            assert set(flag.choices) == named, f"{section}.{key}"


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
    assert settings.mask_keys() == MASK_SETTINGS
    assert settings.recorded_keys() == (*MASK_SETTINGS, "template_files", "max_templates")
    # the fine-tuning frames its images, and cuts the zoom windows, as the segmentation does
    assert settings.training_keys() == (
        "framing",
        "framing_fill",
        "tone",
        "zoom",
        "zoom_below",
        "zoom_margin",
        "mask_choice",
        "absent",
    )
    assert settings.workflow_keys() == OLD_FINETUNE_WORKFLOW_KEYS
    # the trainer's settings are the rest of the section
    assert settings.keys(settings.Finetune, reruns="training") == tuple(_fields(settings.Training))


def test_one_default_of_each_engine_setting():
    from sam2pal.inference.engine import Propagator
    from sam2pal.inference.temporal import VideoPropagator

    defaults = settings.engine_defaults()
    assert defaults == DEFAULT_ENGINE_SETTINGS
    assert [type(v) for v in defaults.values()] == [
        type(v) for v in DEFAULT_ENGINE_SETTINGS.values()
    ]
    assert defaults == pipeline.DEFAULT_ENGINE_SETTINGS

    def default(parameters, key):
        value = parameters[key].default
        # a list setting (mirror_pairs) may default to an empty tuple in the signature
        return list(value) if isinstance(defaults[key], list) else value

    for engine, keys in (
        (Propagator, list(defaults)),
        # a video is tracked in its keyframes' orientation: no search
        (VideoPropagator, [k for k in defaults if k not in settings.PHOTO_ONLY_SETTINGS]),
    ):
        parameters = inspect.signature(engine.__init__).parameters
        assert {key: default(parameters, key) for key in keys} == {
            key: defaults[key] for key in keys
        }, engine
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
    assert given == {**DEFAULT_ENGINE_SETTINGS, "smooth_edges": 3}
    assert cli._engine_settings(parser.parse_args([]), group=extended)["smooth_edges"] == 0

    assert pipeline._engine_settings({"smooth_edges": 3}, group=extended)["smooth_edges"] == 3
    with pytest.raises(InputError, match="unknown propagation setting"):
        pipeline._engine_settings({"smooth_edges": 3})

    assert settings.mask_keys(extended) == (*MASK_SETTINGS, "smooth_edges")
    assert "smooth_edges" in settings.recorded_keys(extended)
    assert settings.engine_defaults(extended)["smooth_edges"] == 0


# -- the orientation search, mirror pairs and framing -------------------------------------


def _propagate_schema():
    import jsonschema

    return jsonschema.Draft7Validator(SCHEMA["properties"]["propagate"])


@pytest.mark.parametrize(
    "values",
    [
        {"orientation": "rot4_mirror", "mirror_swap": True},
        {"mirror_pairs": [["fore_wing_a", "fore_wing_b"], ["x", "y"]]},
        {"framing": "letterbox", "framing_fill": "border"},
        {"framing_fill": 0},
        {"framing_fill": 255},
        {"framing_fill": "128"},
        {"framing_fill": "10, 20,30"},
        {"framing_fill": [10, 20, 30]},
    ],
)
def test_the_schema_takes_the_orientation_and_framing_settings(values):
    assert list(_propagate_schema().iter_errors(values)) == []


@pytest.mark.parametrize(
    "values",
    [
        {"orientation": "rot8"},
        {"orientation": "rot4", "mirror_swap": "yes"},
        {"mirror_pairs": [["a"]]},
        {"mirror_pairs": [["a", "b", "c"]]},
        {"mirror_pairs": ["a", "b"]},
        {"mirror_pairs": [["a", 2]]},
        {"framing": "pad"},
        {"framing_fill": 256},
        {"framing_fill": -1},
        {"framing_fill": "red"},
        {"framing_fill": "300"},
        {"framing_fill": "1,2"},
        {"framing_fill": [1, 2]},
        {"framing_fill": [1, 2, 300]},
    ],
)
def test_the_schema_refuses_bad_orientation_and_framing_settings(values):
    assert list(_propagate_schema().iter_errors(values)) != []


@pytest.mark.parametrize(
    "text", ["border", "0", "128", "255", "1,2,3", " 10, 20 ,30 ", "256", "-1", "red", "1,2", ""]
)
def test_the_framing_fill_flag_and_the_schema_agree(text):
    """A fill the command line takes is one the config takes, and the other way round."""
    try:
        value = settings.fill_value(text)
    except argparse.ArgumentTypeError as exc:
        assert "border, a grey level 0-255 or R,G,B" in str(exc)
        assert list(_propagate_schema().iter_errors({"framing_fill": text})) != [], text
    else:
        assert list(_propagate_schema().iter_errors({"framing_fill": text})) == [], text
        assert value == text.replace(" ", "")


def test_only_photos_search_the_orientation():
    video = _options("video")
    for flag in ("--orientation", "--mirror_swap"):
        assert flag in _options("segment") and flag not in video, flag
    for flag in ("--framing", "--framing_fill"):
        assert flag in _options("segment") and flag in video, flag
    args = cli.build_parser().parse_args(
        ["video", "--annotations", "a.json", "--output_dir", "y", "--framing", "letterbox"]
    )
    given = cli._engine_settings(args)
    assert given["framing"] == "letterbox"
    assert "orientation" not in given and "mirror_swap" not in given
    # the pipeline fills in the defaults of the settings the command has no flag for
    assert pipeline._engine_settings(given) == {**DEFAULT_ENGINE_SETTINGS, "framing": "letterbox"}
    # a video given an orientation search by its settings (the workflow's config) stops
    # before anything is read
    with pytest.raises(InputError, match=r"^orientation rot4_mirror: .*propagate\.orientation"):
        pipeline.segment_video(
            "t.json",
            "frames",
            "frames.csv",
            "o.jsonl",
            "r.json",
            engine_settings={"orientation": "rot4_mirror"},
        )
