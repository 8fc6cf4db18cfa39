"""Civitai-style adapter files (format spec §0, §3, §6): one dtype, string metadata with the §3.4 block, kohya's
hashes (checked against an independent re-implementation), atomic writes, and clear errors for bad files."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save

from methods import available_methods
from methods.apply import create_network, load_network, save_network
from methods.files import AdapterFileError, build_metadata, load_adapter_file, save_adapter_file
from methods.targets import TargetConfig

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SS_MINIMUM = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
              "ss_network_args")
LORA_OPTIONS = {"rank": 4, "alpha": 2.0, "conv_rank": 2, "conv_alpha": 1.0}


# ----- an independent re-implementation of kohya's hashes (spec §3.2; library/train_util.py) ---------------------
def addnet_hash_safetensors(b: io.BytesIO) -> str:
    """sha256 of everything after the 8-byte little-endian header length and the header."""
    digest = hashlib.sha256()
    b.seek(0)
    header_length = struct.unpack("<Q", b.read(8))[0]
    b.seek(8 + header_length)
    for chunk in iter(lambda: b.read(1024 * 1024), b""):
        digest.update(chunk)
    return digest.hexdigest()


def addnet_hash_legacy(b: io.BytesIO) -> str:
    """First 8 hex digits of sha256 of the 64 KiB at offset 1 MiB."""
    b.seek(0x100000)
    return hashlib.sha256(b.read(0x10000)).hexdigest()[:8]


def kohya_precalculate_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str, int]:
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors_save(tensors, ss_only)
    b = io.BytesIO(data)
    return addnet_hash_safetensors(b), addnet_hash_legacy(b), len(data)


def read_header(path: Path) -> tuple[bytes, dict]:
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header_bytes = raw[8:8 + length]
    return header_bytes, json.loads(header_bytes)


def data_region(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[8 + struct.unpack("<Q", raw[:8])[0]:]


def big_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A LoRA-shaped state dict of ~0.8 M values: > 1.1 MB even in 16-bit, so the legacy hash covers real data."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for index in range(3):
        name = f"lora_unet_down_blocks_0_attentions_{index}_proj_in"
        state[f"{name}.lora_down.weight"] = torch.randn(32, 4096, generator=generator)
        state[f"{name}.lora_up.weight"] = torch.randn(4096, 32, generator=generator)
        state[f"{name}.alpha"] = torch.tensor(16.0)
    return state


@pytest.fixture
def sd1_network(tiny_pipeline, randomize):
    pipe = tiny_pipeline("sd1")
    network = create_network(pipe, "lora", dict(LORA_OPTIONS), TargetConfig(preset="full"))
    randomize(network)
    return pipe, network


def only_file(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# ----- dtype and container ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_one_dtype_for_every_tensor_including_alpha(sd1_network, tmp_path, dtype):
    _, network = sd1_network
    path = save_network(network, tmp_path / "mychar.safetensors", dtype=dtype)
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        tensors = {key: handle.get_tensor(key) for key in keys}
    assert {t.dtype for t in tensors.values()} == {DTYPES[dtype]}
    alphas = [key for key in keys if key.endswith(".alpha")]
    assert len(alphas) == len(network) > 0
    for key in alphas:
        assert tensors[key].dim() == 0
        assert tensors[key].item() in (2.0, 1.0)  # alpha, conv_alpha: the effective value, never 0
    # Header: compact JSON starting with {" (A1111's check), all metadata values strings.
    header_bytes, header = read_header(path)
    assert header_bytes[:2] == b'{"'
    metadata = header["__metadata__"]
    assert metadata and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    # Names carry no dot; suffixes are exactly those of kohya LoRA.
    assert {key.partition(".")[2] for key in keys} == {"lora_down.weight", "lora_up.weight", "alpha"}


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_round_trip_gives_the_same_deltas(sd1_network, tmp_path, dtype):
    pipe, network = sd1_network
    path = save_network(network, tmp_path / "rt.safetensors", dtype=dtype)
    loaded, metadata = load_network(pipe, path)
    assert set(loaded.adapters) == set(network.adapters)
    expected = network.merged_deltas()
    got = loaded.merged_deltas()
    tolerance = {"fp32": 1e-6, "fp16": 2e-3, "bf16": 2e-2}[dtype]
    for name, delta in expected.items():
        scale = delta.abs().max().item()
        assert (got[name] - delta).abs().max().item() <= tolerance * scale, name
    assert metadata["ss_output_name"] == "rt"


# ----- metadata (§3.4) ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("arch", "prediction", "version", "v2", "architecture", "implementation", "resolution"), [
    ("sd1", "epsilon", "sd_v1", "False", "stable-diffusion-v1/lora", "diffusers", "512x512"),
    ("sd2", "epsilon", "sd_v2", "True", "stable-diffusion-v2-512/lora", "diffusers", "512x512"),
    ("sd2", "v_prediction", "sd_v2_v", "True", "stable-diffusion-v2-768-v/lora", "diffusers", "768x768"),
    ("sdxl", "epsilon", "sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora",
     "https://github.com/Stability-AI/generative-models", "1024x1024"),
])
def test_metadata_block(tiny_pipeline, tmp_path, arch, prediction, version, v2, architecture, implementation,
                        resolution):
    pipe = tiny_pipeline(arch)
    network = create_network(pipe, "lora", dict(LORA_OPTIONS), TargetConfig(preset="full"))
    path = save_network(network, tmp_path / "my_char-v1.safetensors", title="My Character", prediction_type=prediction,
                        extra_metadata={"ss_tag_frequency": {"10_mychar": {"mychar": 25}}, "ss_steps": 100})
    _, metadata = load_adapter_file(path)
    for key in SS_MINIMUM:
        assert key in metadata, key
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "4"
    assert metadata["ss_network_alpha"] == "2.0"
    args = json.loads(metadata["ss_network_args"])
    assert all(isinstance(v, str) for v in args.values())
    assert args["algo"] == "lora"
    assert args["conv_dim"] == "2" and args["conv_alpha"] == "1.0"
    assert metadata["ss_base_model_version"] == version
    assert metadata["ss_v2"] == v2
    assert metadata["ss_output_name"] == "my_char-v1"  # the file stem, whatever the title
    assert metadata["ss_steps"] == "100"
    assert json.loads(metadata["ss_tag_frequency"]) == {"10_mychar": {"mychar": 25}}
    float(metadata["ss_training_started_at"])
    assert metadata["modelspec.sai_model_spec"] == "1.0.1"
    assert metadata["modelspec.architecture"] == architecture
    assert metadata["modelspec.architecture"].endswith("/lora")
    assert metadata["modelspec.implementation"] == implementation
    assert metadata["modelspec.title"] == "My Character"
    assert metadata["modelspec.resolution"] == resolution
    assert metadata["modelspec.prediction_type"] == ("v" if prediction == "v_prediction" else "epsilon")
    assert "T" in metadata["modelspec.date"]
    assert metadata["modelspec.hash_sha256"] == "0x" + hashlib.sha256(data_region(path)).hexdigest()


@pytest.mark.parametrize("method", ["lora", "loha", "lokr", "oft", "boft"])
def test_network_module_per_method(method):
    if method not in available_methods():
        pytest.skip(f"{method} is not registered yet")
    metadata = build_metadata(method=method, arch="sd1", options={}, title="x")
    assert metadata["ss_network_module"] == ("networks.lora" if method == "lora" else "lycoris.kohya")
    assert json.loads(metadata["ss_network_args"])["algo"] == method
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_dora_is_a_lycoris_file():
    metadata = build_metadata(method="lora", arch="sdxl", options={"rank": 8, "dora": True}, title="x")
    assert metadata["ss_network_module"] == "lycoris.kohya"
    args = json.loads(metadata["ss_network_args"])
    assert args["dora_wd"] == "True" and args["wd_on_output"] == "True"


def test_save_adapter_file_stringifies_metadata(tmp_path):
    path = save_adapter_file(tmp_path / "m.safetensors", big_state_dict(),
                             {"ss_dataset_dirs": {"10_x": {"n_repeats": 10}}, "ss_epoch": 3, "ss_flip_aug": False})
    _, metadata = load_adapter_file(path)
    assert json.loads(metadata["ss_dataset_dirs"]) == {"10_x": {"n_repeats": 10}}
    assert metadata["ss_epoch"] == "3" and metadata["ss_flip_aug"] == "False"


# ----- kohya hashes ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_kohya_hashes_match_independent_implementation(tmp_path, dtype):
    state = big_state_dict()
    metadata = build_metadata(method="lora", arch="sd1", options={"rank": 32}, title="big", rank=32, alpha=16.0)
    metadata["modelspec.author"] = "someone"  # non-ss_ keys must not change the hashes
    path = save_adapter_file(tmp_path / "big.safetensors", state, metadata, dtype=dtype)
    _, stored = load_adapter_file(path)
    tensors = load_file(str(path))
    model_hash, legacy_hash, size = kohya_precalculate_hashes(tensors, stored)
    assert size > 0x110000, "the legacy hash must cover real tensor bytes"
    assert legacy_hash != hashlib.sha256(b"").hexdigest()[:8]
    assert stored["sshs_model_hash"] == model_hash
    assert stored["sshs_legacy_hash"] == legacy_hash
    assert len(model_hash) == 64 and model_hash == model_hash.lower()
    # The data region is independent of the metadata: the hash equals that of the final file's data region.
    assert stored["sshs_model_hash"] == hashlib.sha256(data_region(path)).hexdigest()
    assert stored["modelspec.hash_sha256"] == "0x" + model_hash
    # ... but the legacy hash is taken from the ss_-only serialisation, not the final file (different header).
    final = io.BytesIO(path.read_bytes())
    assert addnet_hash_safetensors(final) == model_hash


def test_hashes_change_with_the_tensors(tmp_path):
    first = save_adapter_file(tmp_path / "a.safetensors", big_state_dict(0), {"ss_x": "1"}, dtype="fp16")
    second = save_adapter_file(tmp_path / "b.safetensors", big_state_dict(1), {"ss_x": "1"}, dtype="fp16")
    a, b = load_adapter_file(first)[1], load_adapter_file(second)[1]
    assert a["sshs_model_hash"] != b["sshs_model_hash"]
    assert a["sshs_legacy_hash"] != b["sshs_legacy_hash"]


# ----- writing safely ----------------------------------------------------------------------------------------------
def test_existing_file_is_never_replaced(sd1_network, tmp_path):
    _, network = sd1_network
    path = tmp_path / "keep.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="keep.safetensors"):
        save_network(network, path)
    with pytest.raises(FileExistsError):
        save_adapter_file(path, big_state_dict())
    assert path.read_bytes() == b"precious"
    assert only_file(tmp_path) == ["keep.safetensors"]
    save_network(network, path, overwrite=True)
    assert load_adapter_file(path)[1]["ss_output_name"] == "keep"
    assert only_file(tmp_path) == ["keep.safetensors"]


def test_no_temporary_files_and_normal_permissions(sd1_network, tmp_path):
    _, network = sd1_network
    for name in ("a", "b", "c"):
        save_network(network, tmp_path / f"{name}.safetensors", dtype="bf16")
    assert only_file(tmp_path) == ["a.safetensors", "b.safetensors", "c.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    mode = (tmp_path / "a.safetensors").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask, oct(mode)  # not mkstemp's 0600


def test_creates_missing_folders(tmp_path):
    path = save_adapter_file(tmp_path / "deep" / "er" / "x.safetensors", big_state_dict())
    assert path.is_file()


def test_simulated_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    import methods.files as files

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", fail)
    target = tmp_path / "new.safetensors"
    with pytest.raises(OSError, match="No space left"):
        save_adapter_file(target, big_state_dict())
    assert not target.exists()
    assert only_file(tmp_path) == []
    # Same when replacing: the old file stays whole.
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="No space left"):
        save_adapter_file(target, big_state_dict(), overwrite=True)
    assert target.read_bytes() == b"old"
    assert only_file(tmp_path) == ["new.safetensors"]


def test_failure_while_moving_into_place(tmp_path, monkeypatch):
    import methods.files as files

    def fail(*args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(files.os, "replace", fail)
    monkeypatch.setattr(files.os, "link", fail)
    with pytest.raises(OSError):
        save_adapter_file(tmp_path / "x.safetensors", big_state_dict(), overwrite=True)
    with pytest.raises(OSError):
        save_adapter_file(tmp_path / "y.safetensors", big_state_dict())
    assert only_file(tmp_path) == []


def test_file_appearing_during_the_write_is_not_replaced(tmp_path, monkeypatch):
    """The existence check and the final move are one step (hard link), so a concurrent writer is never clobbered."""
    import methods.files as files

    target = tmp_path / "race.safetensors"
    real_serialize = files.serialize
    calls = []

    def serialize_then_race(tensors, metadata):
        calls.append(1)
        if len(calls) == 2:  # the final serialisation: someone else writes the file now
            target.write_bytes(b"other writer")
        return real_serialize(tensors, metadata)

    monkeypatch.setattr(files, "serialize", serialize_then_race)
    with pytest.raises(FileExistsError):
        save_adapter_file(target, big_state_dict())
    assert target.read_bytes() == b"other writer"
    assert only_file(tmp_path) == ["race.safetensors"]


def test_bad_save_arguments(tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        save_adapter_file(tmp_path / "x.ckpt", big_state_dict())
    with pytest.raises(ValueError, match="fp8"):
        save_adapter_file(tmp_path / "x.safetensors", big_state_dict(), dtype="fp8")
    assert only_file(tmp_path) == []


# ----- reading bad files ---------------------------------------------------------------------------------------------
def _good_bytes() -> bytes:
    return safetensors_save({"lora_unet_x.alpha": torch.tensor(1.0), "lora_unet_x.lora_up.weight": torch.ones(4, 4)},
                            {"ss_x": "y"})


BAD_FILES = {
    "empty": lambda: b"",
    "garbage": lambda: bytes(range(256)) * 3,
    "truncated": lambda: _good_bytes()[:-10],
    "trailing-bytes": lambda: _good_bytes() + b"xx",
    "huge-header-length": lambda: (10**12).to_bytes(8, "little") + b"{}",
    "bad-json": lambda: (5).to_bytes(8, "little") + b"{abcd",
    "no-tensors": lambda: safetensors_save({}, {"ss_x": "y"}),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_unreadable_files_raise_adapter_file_error(tmp_path, tiny_pipeline, case):
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(BAD_FILES[case]())
    with pytest.raises(AdapterFileError) as info:
        load_adapter_file(path)
    assert str(path) in str(info.value)
    with pytest.raises(AdapterFileError, match=str(path)):
        load_network(tiny_pipeline("sd1"), path)


def test_missing_file_and_folder(tmp_path):
    for path in (tmp_path / "missing.safetensors", tmp_path):
        with pytest.raises(AdapterFileError) as info:
            load_adapter_file(path)
        assert str(path) in str(info.value) and "no such file" in str(info.value)


def test_file_that_is_not_an_adapter(tmp_path, tiny_pipeline):
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(safetensors_save({"model.diffusion_model.conv_in.weight": torch.ones(2, 2)}))
    with pytest.raises(AdapterFileError, match="none of its 1 modules"):
        load_network(tiny_pipeline("sd1"), path)


def test_unsupported_method_names_the_module(tmp_path, tiny_pipeline):
    """A LyCORIS (IA)³ module (``weight``, ``on_input``) on a real layer: no method claims it, and the error says so."""
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    path = tmp_path / "ia3.safetensors"
    path.write_bytes(safetensors_save({f"{name}.weight": torch.ones(32), f"{name}.on_input": torch.tensor(False)}))
    with pytest.raises(AdapterFileError, match=f"{name}.*not support"):
        load_network(tiny_pipeline("sd1"), path)
