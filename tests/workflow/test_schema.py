"""The config schema documents itself: every key has a description."""

from __future__ import annotations

import yaml
from conftest import REPO

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def undocumented(schema: dict, where: str = "") -> list[str]:
    """Dotted names of the properties under `schema` that have no description."""
    missing = []
    for name, spec in schema.get("properties", {}).items():
        key = f"{where}.{name}" if where else name
        if not str(spec.get("description") or "").strip():
            missing.append(key)
        missing += undocumented(spec, key)
    for child in ("items", "additionalProperties"):
        if isinstance(schema.get(child), dict):
            missing += undocumented(schema[child], where)
    for child in ("oneOf", "anyOf", "allOf"):
        for option in schema.get(child, []):
            missing += undocumented(option, where)
    return missing


def test_every_config_key_has_a_description():
    schema = yaml.safe_load(SCHEMA.read_text())
    assert len(schema["properties"]["finetune"]["properties"]) > 30  # the walk reaches them
    assert undocumented(schema) == []


def test_a_key_without_description_is_found():
    schema = {
        "properties": {
            "a": {"description": "documented", "properties": {"b": {"type": "integer"}}},
            "c": {"oneOf": [{"type": "array", "items": {"properties": {"d": {}}}}]},
        }
    }
    assert undocumented(schema) == ["a.b", "c", "c.d"]
