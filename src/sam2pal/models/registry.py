"""Names of official SAM 2.1 models and which config goes with a checkpoint.

Kept free of heavy imports: the workflow reads it while building its job graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sam2pal.errors import InputError

# Meta's published SAM 2.1 checkpoints. The digests and sizes agree with the files'
# pages on Hugging Face (facebook/sam2.1-hiera-*) and with independent mirrors.
_META_BASE = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"


@dataclass(frozen=True)
class OfficialModel:
    name: str
    file_name: str
    config: str
    url: str
    sha256: str
    size: int  # bytes


OFFICIAL_MODELS: dict[str, OfficialModel] = {
    m.name: m
    for m in [
        OfficialModel(
            "sam2.1_hiera_tiny",
            "sam2.1_hiera_tiny.pt",
            "configs/sam2.1/sam2.1_hiera_t.yaml",
            _META_BASE + "sam2.1_hiera_tiny.pt",
            "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69",
            156008466,
        ),
        OfficialModel(
            "sam2.1_hiera_small",
            "sam2.1_hiera_small.pt",
            "configs/sam2.1/sam2.1_hiera_s.yaml",
            _META_BASE + "sam2.1_hiera_small.pt",
            "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38",
            184416285,
        ),
        OfficialModel(
            "sam2.1_hiera_base_plus",
            "sam2.1_hiera_base_plus.pt",
            "configs/sam2.1/sam2.1_hiera_b+.yaml",
            _META_BASE + "sam2.1_hiera_base_plus.pt",
            "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5",
            323606802,
        ),
        OfficialModel(
            "sam2.1_hiera_large",
            "sam2.1_hiera_large.pt",
            "configs/sam2.1/sam2.1_hiera_l.yaml",
            _META_BASE + "sam2.1_hiera_large.pt",
            "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318",
            898083611,
        ),
    ]
}

# Other spellings users type for the same models.
_MODEL_ALIASES = {
    "tiny": "sam2.1_hiera_tiny",
    "small": "sam2.1_hiera_small",
    "base_plus": "sam2.1_hiera_base_plus",
    "base+": "sam2.1_hiera_base_plus",
    "large": "sam2.1_hiera_large",
    "sam2.1_hiera_t": "sam2.1_hiera_tiny",
    "sam2.1_hiera_s": "sam2.1_hiera_small",
    "sam2.1_hiera_b+": "sam2.1_hiera_base_plus",
    "sam2.1_hiera_l": "sam2.1_hiera_large",
}
for _m in list(OFFICIAL_MODELS.values()):
    _MODEL_ALIASES[_m.file_name] = _m.name
    _MODEL_ALIASES[_m.name.replace("_hiera_", "-hiera-").replace("_plus", "-plus")] = _m.name

RANDOM_CHECKPOINT = "random"

# The small model trained in this project (`sam2pal pretrain`), shipped in the source tree.
MICRO_MODEL = "sam2pal-micro"
# SHA-256 of resources/models/sam2pal-micro.pt as shipped (see resources/models/README.md)
MICRO_SHA256 = "d519df5f3f6dc670e364df01b64bd82da02e69c184cdea16c1789c454ada871a"


def micro_model_files() -> tuple[Path, Path]:
    """(checkpoint, config) of the shipped sam2pal-micro model."""
    folder = Path(__file__).resolve().parents[3] / "resources" / "models"
    return folder / f"{MICRO_MODEL}.pt", folder / f"{MICRO_MODEL}.yaml"


def official_model(name: str) -> OfficialModel | None:
    """The official model a checkpoint value names, or None if it names none."""
    key = str(name).strip()
    key = _MODEL_ALIASES.get(key, key)
    return OFFICIAL_MODELS.get(key)


def config_for_checkpoint(checkpoint) -> str | None:
    """The config that goes with a checkpoint value when none is given, if known.

    Args:
        checkpoint: a checkpoint setting (file path, official name, ``"random"``, None).

    Returns:
        An official model's own config, the tiny config for random weights,
        sam2pal-micro's config, or a yaml file of the same name next to the checkpoint
        file; None when none is known.
    """
    text = str(checkpoint).strip() if checkpoint is not None else RANDOM_CHECKPOINT
    if text == RANDOM_CHECKPOINT:
        return "configs/sam2.1/sam2.1_hiera_t.yaml"
    if text in (MICRO_MODEL, f"{MICRO_MODEL}.pt"):
        return str(micro_model_files()[1])
    model = official_model(text) or official_model(Path(text).name)
    if model:
        return model.config
    sibling = Path(text).expanduser().with_suffix(".yaml")
    if Path(text).suffix == ".pt" and sibling.is_file():  # a config saved next to its checkpoint
        return str(sibling)
    return None


def choose_config(config, checkpoint) -> str:
    """The model config of a run.

    Args:
        config: the config setting, or None / empty.
        checkpoint: the checkpoint setting.

    Returns:
        `config` if given, else the one that goes with `checkpoint`
        (`config_for_checkpoint`); InputError when none does.
    """
    if config:
        return str(config)
    inferred = config_for_checkpoint(checkpoint)
    if inferred is None:
        raise InputError(
            f"{checkpoint}: cannot tell the model config from the checkpoint name; "
            "give the config (model.config, or --sam2_config)"
        )
    return inferred
