"""Building SAM2: config names and yaml files, official-format checkpoints, official
model names and their SHA-256, devices."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch

from sam2pal.errors import InputError
from sam2pal.models.build import build_model, load_model_config, resolve_config, resolve_device
from sam2pal.models.download import download_model, resolve_checkpoint
from sam2pal.models.registry import OFFICIAL_MODELS, OfficialModel, choose_config, official_model


@pytest.mark.parametrize(
    "name",
    [
        "configs/sam2.1/sam2.1_hiera_t.yaml",
        "sam2.1/sam2.1_hiera_t.yaml",
        "sam2.1_hiera_t.yaml",
        "sam2.1_hiera_t",
    ],
)
def test_packaged_config_spellings(name):
    assert resolve_config(name).name == "sam2.1_hiera_t.yaml"
    assert resolve_config(name).parent.name == "sam2.1"


def test_old_sam2_config_names_resolve():
    assert resolve_config("sam2_hiera_l.yaml").parent.name == "sam2"


def test_unknown_config_and_missing_yaml():
    with pytest.raises(InputError, match="packaged: .*sam2.1_hiera_t"):
        resolve_config("sam3_hiera_x")
    with pytest.raises(InputError, match="not found"):
        resolve_config("/nowhere/my_model.yaml")


def test_yaml_path_builds_the_same_model(tmp_path):
    copy = tmp_path / "my config.yaml"
    shutil.copy(resolve_config("sam2.1_hiera_t"), copy)
    by_name = build_model("sam2.1_hiera_t", "random", image_size=64)
    by_path = build_model(str(copy), "random", image_size=64)
    assert by_path.image_size == 64
    for (k, a), (_, b) in zip(by_name.state_dict().items(), by_path.state_dict().items()):
        assert torch.equal(a, b), k  # same seed, same architecture


def test_image_size_must_be_a_multiple_of_32():
    assert load_model_config("sam2.1_hiera_t", 96).model.image_size == 96
    with pytest.raises(InputError, match="multiple of 32"):
        load_model_config("sam2.1_hiera_t", 100)


def test_official_checkpoint_format_round_trip(tmp_path, tiny_model):
    path = tmp_path / "model.pt"
    torch.save({"model": tiny_model.state_dict()}, path)
    loaded = build_model("sam2.1_hiera_t", path, image_size=128, seed=123)
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert not loaded.training
    bare = tmp_path / "bare.pt"
    torch.save(tiny_model.state_dict(), bare)
    build_model("sam2.1_hiera_t", bare, image_size=128)
    # a checkpoint loads at any image size
    assert build_model("sam2.1_hiera_t", path, image_size=64).image_size == 64


def test_bad_checkpoints(tmp_path, tiny_model):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(InputError, match="notes.pt: not a readable PyTorch checkpoint"):
        build_model("sam2.1_hiera_t", text)
    wrong = tmp_path / "wrong.pt"
    torch.save({"model": tiny_model.state_dict()}, wrong)
    with pytest.raises(InputError, match="does not fit"):
        build_model("sam2.1_hiera_s", wrong, image_size=64)
    with pytest.raises(InputError, match="missing.pt: checkpoint file not found"):
        build_model("sam2.1_hiera_t", tmp_path / "missing.pt")


def test_devices():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError, match="not cpu, auto, cuda or cuda:N"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU is visible"):
            resolve_device("cuda:0")


def test_official_names_and_configs():
    assert official_model("sam2.1_hiera_large.pt").name == "sam2.1_hiera_large"
    assert official_model("base_plus").config.endswith("sam2.1_hiera_b+.yaml")
    assert choose_config(None, "/data/sam2.1_hiera_small.pt").endswith("sam2.1_hiera_s.yaml")
    assert choose_config("my.yaml", "sam2.1_hiera_small") == "my.yaml"
    with pytest.raises(InputError, match="give the config"):
        choose_config(None, "/data/finetuned.pt")
    for model in OFFICIAL_MODELS.values():
        assert len(model.sha256) == 64 and model.url.startswith("https://dl.fbaipublicfiles.com/")


def test_official_checkpoint_missing_or_wrong(tmp_path):
    with pytest.raises(
        InputError, match=r"sam2.1_hiera_tiny.pt: official checkpoint .* put it at that path"
    ):
        resolve_checkpoint("sam2.1_hiera_tiny", tmp_path)
    (tmp_path / "sam2.1_hiera_tiny.pt").write_bytes(b"something else")
    with pytest.raises(InputError, match="not the official sam2.1_hiera_tiny.pt"):
        resolve_checkpoint("sam2.1_hiera_tiny", tmp_path)
    assert resolve_checkpoint("random", tmp_path) == "random"


def _local_model(payload: bytes, url: str, digest: str | None = None) -> OfficialModel:
    return OfficialModel(
        "local",
        "local.pt",
        "configs/sam2.1/sam2.1_hiera_t.yaml",
        url,
        digest or hashlib.sha256(payload).hexdigest(),
        len(payload),
    )


def test_download_checks_sha256_and_leaves_nothing_half_written(tmp_path):
    payload = b"checkpoint bytes" * 1000
    source = tmp_path / "source.pt"
    source.write_bytes(payload)
    dest = tmp_path / "checkpoints"
    path = download_model(_local_model(payload, source.as_uri()), dest)
    assert path.read_bytes() == payload
    bad = _local_model(payload, source.as_uri(), digest="0" * 64)
    with pytest.raises(InputError, match="download is corrupt"):
        download_model(bad, tmp_path / "other")
    assert not list((tmp_path / "other").glob("*"))
    offline = _local_model(payload, (tmp_path / "nowhere.pt").as_uri())
    with pytest.raises(InputError, match="no internet access.*put it at"):
        download_model(offline, tmp_path / "third")
    assert not list((tmp_path / "third").glob("*"))
