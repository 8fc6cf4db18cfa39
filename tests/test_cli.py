"""Base-model loading/saving (trainer/models.py) and the command line (trainer/cli.py: merge, convert, inspect, on
methods/tools.py).

Everything runs on tiny pipelines written to a temporary folder, as a diffusers folder and as an ldm/sgm single
file; nothing is downloaded. At least one test per command runs ``python -m trainer`` in a subprocess; the others
call the functions directly. Real-size checks use the meta device (no memory) or are marked slow.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from methods.apply import create_network, load_network, save_network
from methods.registry import available_methods
from methods.targets import TargetConfig
from methods.tools import convert_to_lora, module_deltas, read_adapter
from trainer import cli
from trainer.architectures import build_tiny_pipeline
from trainer.models import (
    CONFIG_METADATA_KEY,
    ModelLoadError,
    load_pipeline,
    pipeline_to_ldm,
    save_pipeline_folder,
    save_single_file,
    sd2_predicts_v,
)

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


# ----- helpers ----------------------------------------------------------------------------------------------------
def weights(pipe) -> dict[str, torch.Tensor]:
    result = {}
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        if module is not None:
            result.update({f"{name}.{k}": v.detach() for k, v in module.state_dict().items()})
    return result


def assert_same_weights(a, b, exact: bool = True) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys(), sorted(set(wa) ^ set(wb))[:5]
    for key in wa:
        if exact:
            assert wa[key].dtype == wb[key].dtype, key
            assert torch.equal(wa[key], wb[key]), key
        else:
            torch.testing.assert_close(wa[key].float(), wb[key].float(), msg=key)


def make_adapter(pipe, path: Path, method: str, options: dict, preset: str = "full", seed: int = 0) -> Path:
    network = create_network(pipe, method, options, TargetConfig(preset=preset))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in network:
            for name, parameter in adapter.named_parameters():
                if name not in ("dora_scale", "rescale"):
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    save_network(network, path, dtype="fp32")
    network.detach()
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    # One BLAS thread: the matrices are tiny, and threads only add contention on a busy test machine.
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def file_deltas(path: Path, pipe=None) -> dict[str, torch.Tensor]:
    deltas, _ = module_deltas(read_adapter(path), pipe)
    return deltas


# ----- fixtures ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory, tokenizer_dir):
    """A tiny sd1 base as a diffusers folder and a single file, plus adapter files of every registered method."""
    root = tmp_path_factory.mktemp("cli")
    pipe = build_tiny_pipeline("sd1", tokenizer_dir, seed=0)
    pipe.save_pretrained(root / "base")
    save_single_file(pipe, root / "base.safetensors")
    files = {"lora": make_adapter(pipe, root / "lora.safetensors", "lora", {"rank": 4, "alpha": 2.0})}
    files["dora"] = make_adapter(pipe, root / "dora.safetensors", "lora", {"rank": 4, "dora": True}, seed=1)
    for method, options in (("loha", {"rank": 2}), ("lokr", {"rank": 2, "factor": 4}), ("oft", {})):
        if method in available_methods():
            files[method] = make_adapter(pipe, root / f"{method}.safetensors", method, options, seed=2)
    return {"root": root, "tokenizer": tokenizer_dir, "files": files}


def base_pipe(work):
    return load_pipeline(work["root"] / "base")[0]


# ----- loading and saving base models -----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_folder_and_single_file_load_back_identical(arch, tmp_path, tokenizer_dir):
    pipe = build_tiny_pipeline(arch, tokenizer_dir, seed=3)
    pipe.save_pretrained(tmp_path / "folder")
    single = save_single_file(pipe, tmp_path / "model.safetensors")
    expected_prediction = "v_prediction" if arch == "sd2" else "epsilon"

    folder_pipe, folder_info = load_pipeline(tmp_path / "folder")
    assert (folder_info.arch, folder_info.source_kind, folder_info.prediction_type) == (
        arch, "folder", expected_prediction)
    assert_same_weights(pipe, folder_pipe)

    file_pipe, file_info = load_pipeline(single, tokenizer=tokenizer_dir)
    assert (file_info.arch, file_info.source_kind, file_info.prediction_type) == (
        arch, "single_file", expected_prediction)
    assert type(file_pipe) is type(pipe)
    assert_same_weights(pipe, file_pipe)
    assert file_pipe.tokenizer is not None and len(file_pipe.tokenizer) == len(pipe.tokenizer)

    with safe_open(str(single), framework="pt") as handle:
        keys = set(handle.keys())
        metadata = handle.metadata()
    text_prefix = {"sd1": "cond_stage_model.transformer.text_model.", "sd2": "cond_stage_model.model.transformer.",
                   "sdxl": "conditioner.embedders.1.model.transformer."}[arch]
    assert any(k.startswith(text_prefix) for k in keys)
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."))
               or k == "v_pred" for k in keys)
    if arch != "sd1":  # OpenCLIP layout: fused q/k/v
        assert any(k.endswith("attn.in_proj_weight") for k in keys)
    assert CONFIG_METADATA_KEY in metadata and metadata["modelspec.sai_model_spec"] == "1.0.1"


def test_ckpt_loads_with_config_folder_and_refuses_pickled_objects(tmp_path, tokenizer_dir):
    pipe = build_tiny_pipeline("sd2", tokenizer_dir, seed=4)
    pipe.save_pretrained(tmp_path / "folder")
    checkpoint = save_single_file(pipe, tmp_path / "model.ckpt")
    # A .ckpt has no metadata: tiny sizes cannot be guessed, and the message says what to do.
    with pytest.raises(ModelLoadError, match="cross-attention width is 32.*config folder"):
        load_pipeline(checkpoint)
    loaded, info = load_pipeline(checkpoint, config=tmp_path / "folder")
    assert (info.arch, info.prediction_type) == ("sd2", "v_prediction")  # from the v_pred marker key
    assert_same_weights(pipe, loaded)
    with pytest.raises(ModelLoadError, match="not sdxl"):
        load_pipeline(checkpoint, arch="sdxl", config=tmp_path / "folder")

    torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": Path("anything")}, tmp_path / "pickled.ckpt")
    with pytest.raises(ModelLoadError, match="pickled objects"):
        load_pipeline(tmp_path / "pickled.ckpt")


@pytest.mark.parametrize("source, message", [
    ("missing.safetensors", "no such file or folder"),
    ("notes.txt", "unsupported file type"),
    ("empty_dir", "no model_index.json"),
    ("adapter.safetensors", "adapter file"),
])
def test_load_pipeline_errors_are_one_sentence(tmp_path, source, message):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty_dir").mkdir()
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "adapter.safetensors"))
    with pytest.raises(ModelLoadError, match=message) as caught:
        load_pipeline(tmp_path / source)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder"])
def test_a_folder_missing_a_component_says_which(part, work, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(work["root"] / "base", copy)
    shutil.rmtree(copy / part)
    with pytest.raises(ModelLoadError, match=f"model_index.json lists a {part} .* no {part}/ sub-folder"):
        load_pipeline(copy)
    (copy / part).mkdir()
    with pytest.raises(ModelLoadError, match=f"the {part}/ sub-folder is empty"):
        load_pipeline(copy)


def test_real_size_single_file_layout_round_trips_through_diffusers_converters():
    """Our diffusers→ldm keys for real-size models map back to every diffusers key with diffusers' converters."""
    from diffusers import AutoencoderKL
    from diffusers.loaders import single_file_utils as sfu

    from trainer.architectures import SD_VAE, SDXL_VAE, build_text_encoders, build_unet

    class Pipe:
        pass

    expected = {"sd1": ("v1", 686), "sd2": ("v2", 686), "sdxl": ("xl_base", 1680)}
    for arch, (model_type, unet_keys) in expected.items():
        pipe = Pipe()
        pipe.unet = build_unet(arch, meta=True)
        with torch.device("meta"):
            pipe.vae = AutoencoderKL(**(SDXL_VAE if arch == "sdxl" else SD_VAE))
        encoders = build_text_encoders(arch, meta=True)
        pipe.text_encoder, pipe.text_encoder_2 = encoders[0], (encoders[1] if len(encoders) > 1 else None)
        state = pipeline_to_ldm(pipe)
        assert sfu.infer_diffusers_model_type(state) == model_type
        assert sum(k.startswith("model.diffusion_model.") for k in state) == unet_keys  # as in the released files
        unet = sfu.convert_ldm_unet_checkpoint(state, dict(pipe.unet.config))
        assert set(unet) == set(pipe.unet.state_dict())
        vae = sfu.convert_ldm_vae_checkpoint(state, dict(pipe.vae.config))
        assert set(vae) == set(pipe.vae.state_dict())
        if arch != "sdxl":
            assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in state


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_real_config_folder_describes_the_real_models(arch, tmp_path):
    """The config folder written for real-size single files builds exactly the real architectures."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    from trainer.architectures import build_text_encoders, build_unet
    from trainer.models import real_configs, write_config_folder

    folder = write_config_folder(tmp_path, real_configs(arch, "v_prediction"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
    reference = build_unet(arch, meta=True)
    assert {k: v.shape for k, v in unet.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()}
    for index, encoder in enumerate(build_text_encoders(arch, meta=True)):
        config = CLIPTextConfig.from_pretrained(folder, subfolder=["text_encoder", "text_encoder_2"][index])
        assert (config.hidden_size, config.num_hidden_layers) == (encoder.config.hidden_size,
                                                                  encoder.config.num_hidden_layers)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"


def test_sd2_prediction_test_runs(tokenizer_dir):
    pipe = build_tiny_pipeline("sd2", tokenizer_dir)
    assert isinstance(sd2_predicts_v(pipe.unet), bool)


# ----- merge ------------------------------------------------------------------------------------------------------
def in_memory_merge(work, adapters: list[tuple[str, float]]):
    pipe = base_pipe(work)
    for key, strength in adapters:
        network, _ = load_network(pipe, work["files"][key])
        network.merge(strength)
    return pipe


def text_encoder_keys(folder: Path) -> list[str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return list(handle.keys())


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_saved_folders_keep_the_text_model_level(arch, tokenizer_dir, tmp_path):
    """transformers 4.x loads CLIP text encoders saved without ``text_model.`` (transformers 5 naming) as random
    weights, silently; every folder we write — and the committed toy model — uses the long names."""
    pipe = build_tiny_pipeline(arch, tokenizer_dir, seed=3)
    out = save_pipeline_folder(pipe, tmp_path / "folder")
    for part in ("text_encoder", "text_encoder_2") if arch == "sdxl" else ("text_encoder",):
        keys = text_encoder_keys(out / part)
        # SDXL's second encoder (with projection) has its text_projection beside the text model in every version
        assert keys and all(key.startswith(("text_model.", "text_projection.")) for key in keys), (part, keys[:3])
        assert any(key.startswith("text_model.encoder.") for key in keys)
    reloaded, _ = load_pipeline(out)
    assert_same_weights(pipe, reloaded)  # the rename is lossless
    assert not list(tmp_path.glob(".*"))  # no temporary folder left
    assert oct((out / "text_encoder").stat().st_mode & 0o777) == oct(0o777 & ~current_umask())
    toy_keys = text_encoder_keys(ROOT / "presets" / "toy" / "model" / "text_encoder")
    assert all(key.startswith("text_model.") for key in toy_keys)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_merge_into_folder_matches_in_memory_merge(work, capsys):
    second = "loha" if "loha" in work["files"] else "dora"
    out = work["root"] / "merged_folder"
    code = cli.main(["merge", "--base", str(work["root"] / "base"), "--adapter", str(work["files"]["lora"]),
                     "--adapter", str(work["files"][second]), "--strength", "0.7", "--strength", "1.3",
                     "--out", str(out), "--dtype", "fp32"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "merged" in printed and "unet 79, te 12" in printed
    reference = in_memory_merge(work, [("lora", 0.7), (second, 1.3)])
    merged, info = load_pipeline(out)
    assert info.arch == "sd1"
    assert_same_weights(reference, merged)
    to_q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert not torch.equal(weights(merged)[to_q], weights(base_pipe(work))[to_q])
    assert text_encoder_keys(out / "text_encoder") and all(
        key.startswith("text_model.") for key in text_encoder_keys(out / "text_encoder"))

    # Never overwrite silently; --overwrite replaces.
    code = cli.main(["merge", "--base", str(work["root"] / "base"), "--adapter", str(work["files"]["lora"]),
                     "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2 and len(error_lines(captured.err)) == 1 and "--overwrite" in captured.err
    code = cli.main(["merge", "--base", str(work["root"] / "base"), "--adapter", str(work["files"]["lora"]),
                     "--out", str(out), "--overwrite", "--dtype", "fp16"])
    assert code == 0
    half, _ = load_pipeline(out, dtype=torch.float16)
    assert half.unet.dtype == torch.float16
    reference = in_memory_merge(work, [("lora", 1.0)])
    reference.to(dtype=torch.float16)
    assert_same_weights(reference, half)


def test_merge_into_single_file_subprocess(work):
    """``python -m trainer merge`` from a single-file base into a single file; it reloads to the in-memory merge."""
    method = "oft" if "oft" in work["files"] else "dora"
    out = work["root"] / "merged.safetensors"
    result = run_cli("merge", "--base", work["root"] / "base.safetensors", "--adapter", work["files"][method],
                     "--strength", "0.5", "--out", out, "--dtype", "fp32")
    assert result.returncode == 0, result.stderr
    assert f"merged {work['files'][method]} at strength 0.5: {method if method != 'dora' else 'lora'}, 91 modules " \
           "(unet 79, te 12)" in result.stdout
    assert "wrote" in result.stdout
    reloaded, info = load_pipeline(out, tokenizer=work["tokenizer"])
    assert info.source_kind == "single_file"
    assert_same_weights(in_memory_merge(work, [(method, 0.5)]), reloaded)
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["rankwright.merged_adapters"])[0]["modules"] == 91


def test_merge_refuses_wrong_architecture_and_non_adapters(work, tokenizer_dir, tmp_path, capsys):
    sdxl = build_tiny_pipeline("sdxl", tokenizer_dir)
    sdxl_lora = make_adapter(sdxl, tmp_path / "sdxl_lora.safetensors", "lora", {"rank": 2}, preset="attention")
    # Same module names as sd1 but another context width, and no metadata: only the shapes tell.
    tensors = dict(read_adapter(work["files"]["lora"]).tensors)
    to_k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    tensors[to_k] = torch.zeros(4, 48)
    save_file(tensors, str(tmp_path / "wide_context.safetensors"))
    cases = [
        ([str(sdxl_lora)], "sdxl"),
        ([str(tmp_path / "wide_context.safetensors")], "sd1"),
        ([str(work["root"] / "base.safetensors")], "base model checkpoint, not an adapter"),
        ([str(tmp_path / "missing.safetensors")], "no such file"),
    ]
    for adapters, message in cases:
        argv = ["merge", "--base", str(work["root"] / "base"), "--out", str(tmp_path / "out")]
        for adapter in adapters:
            argv += ["--adapter", adapter]
        code = cli.main(argv)
        captured = capsys.readouterr()
        assert code == 2, argv
        assert len(error_lines(captured.err)) == 1 and message in captured.err, captured.err
    assert not (tmp_path / "out").exists()


# ----- convert ----------------------------------------------------------------------------------------------------
def test_convert_lora_to_same_or_higher_rank_is_exact_subprocess(work):
    out = work["root"] / "lora_r6.safetensors"
    result = run_cli("convert", work["files"]["lora"], "--to", "lora", "--rank", "6", "--out", out)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if "relative error" in line)
    overall = float(line.split("overall ")[1].split(",")[0])
    worst = float(line.split("worst ")[1].split()[0])
    assert overall < 1e-5 and worst < 1e-5
    source, converted = file_deltas(work["files"]["lora"]), file_deltas(out)
    assert source.keys() == converted.keys()
    for name in source:
        assert (converted[name] - source[name]).norm() <= 1e-5 * source[name].norm() + 1e-12, name

    converted_file = read_adapter(out)
    metadata, grouped = converted_file.metadata, converted_file.modules
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_dim"] == "6"
    conv = grouped["lora_unet_down_blocks_0_resnets_0_conv1"]  # 3×3 conv, 32→32 channels, source rank 4
    assert tuple(conv["lora_down.weight"].shape) == (6, 32, 3, 3)
    assert tuple(conv["lora_up.weight"].shape) == (32, 6, 1, 1)
    assert float(conv["alpha"]) == 6.0
    linear = grouped["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    assert linear["lora_down.weight"].dim() == 2 and float(linear["alpha"]) == 6.0


def test_convert_lora_to_lower_rank_reports_the_svd_error(work):
    out = work["root"] / "lora_r2.safetensors"
    report = convert_to_lora(work["files"]["lora"], out, rank=2, conv_rank=1)
    source = file_deltas(work["files"]["lora"])
    residual = total = 0.0
    for delta in source.values():
        values = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1).double())
        keep = 1 if delta.dim() == 4 and delta.shape[-1] == 3 else 2
        residual += float((values[keep:] ** 2).sum())
        total += float((values**2).sum())
    assert report.relative_error == pytest.approx(math.sqrt(residual / total), rel=1e-4)
    assert 0.05 < report.relative_error < 1
    converted = file_deltas(out)
    measured = math.sqrt(sum(float((converted[n] - source[n]).double().pow(2).sum()) for n in source) / total)
    assert measured == pytest.approx(report.relative_error, rel=1e-3)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_convert_loha_lokr_reports_error_and_matches_delta(work, method):
    if method not in work["files"]:
        pytest.skip(f"{method} is not registered yet")
    pipe = base_pipe(work)
    source = file_deltas(work["files"][method], pipe)
    low = convert_to_lora(work["files"][method], work["root"] / f"{method}_r1.safetensors", rank=1, pipe=pipe)
    assert low.modules == len(source) and low.methods == {method: len(source)}
    assert 1e-3 < low.relative_error < 1
    converted = file_deltas(work["root"] / f"{method}_r1.safetensors")
    total = sum(float(d.double().pow(2).sum()) for d in source.values())
    measured = math.sqrt(sum(float((converted[n] - source[n]).double().pow(2).sum()) for n in source) / total)
    assert measured == pytest.approx(low.relative_error, rel=1e-3)
    # Full rank of the tiny layers (≤ 64 columns after flattening a 3×3 conv of 32 channels is 288): exact.
    high = convert_to_lora(work["files"][method], work["root"] / f"{method}_r64.safetensors", rank=64, pipe=pipe)
    assert high.relative_error < 1e-5


def test_convert_needs_base_for_oft_and_dora(work, capsys):
    for key in ("dora", "oft"):
        if key not in work["files"]:
            continue
        out = work["root"] / f"{key}_lora.safetensors"
        code = cli.main(["convert", str(work["files"][key]), "--rank", "4", "--out", str(out)])
        captured = capsys.readouterr()
        assert code == 2 and len(error_lines(captured.err)) == 1 and "--base" in captured.err
        assert not out.exists()
        code = cli.main(["convert", str(work["files"][key]), "--rank", "64", "--out", str(out),
                         "--base", str(work["root"] / "base")])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert "note: the ΔW of" in captured.out and "depends on the base weights" in captured.out
        # The converted LoRA reproduces the original merged weights at strength 1.
        merged = in_memory_merge(work, [(key, 1.0)])
        plain = base_pipe(work)
        network, _ = load_network(plain, out)
        network.merge(1.0)
        assert_same_weights(merged, plain, exact=False)


def test_convert_rejects_bad_input(work, tmp_path, capsys):
    (tmp_path / "broken.safetensors").write_text("not a safetensors file")
    save_file({"model.diffusion_model.x": torch.zeros(1)}, str(tmp_path / "ckpt.safetensors"))
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    cases = [
        (["convert", str(tmp_path / "nope.safetensors"), "--rank", "2"], "no such file"),
        (["convert", str(tmp_path / "broken.safetensors"), "--rank", "2"], "not a readable"),
        (["convert", str(tmp_path / "ckpt.safetensors"), "--rank", "2"], "not an adapter"),
        (["convert", str(tmp_path / "other.safetensors"), "--rank", "2"], "not an adapter file"),
        (["convert", str(work["files"]["lora"]), "--rank", "0"], "--rank must be at least 1"),
    ]
    for argv, message in cases:
        code = cli.main([*argv, "--out", str(tmp_path / "out.safetensors")])
        captured = capsys.readouterr()
        assert code == 2, argv
        assert len(error_lines(captured.err)) == 1 and message in captured.err, captured.err


@pytest.mark.slow
def test_convert_real_size_loha_without_base(tmp_path):
    """LoHa/LoKr ΔW from the file alone: shapes come from the real-size sd1 model on the meta device."""
    from methods.files import build_metadata, save_adapter_file
    from methods.network import AdapterNetwork, model_parts
    from trainer.architectures import build_text_encoders, build_unet

    parts = model_parts(build_unet("sd1", meta=True), build_text_encoders("sd1", meta=True), "sd1")
    targets = TargetConfig(preset="full", text_encoder_preset="none",
                           exclude=[r"up_blocks|mid_block|down_blocks.[123]|attn2|ff.net|proj_|downsamplers|"
                                    r"resnets.1|time_emb"])
    network = AdapterNetwork.create(parts, "sd1", "loha", {"rank": 2}, targets)
    network.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    assert any(a.is_conv for a in network)
    metadata = build_metadata(method="loha", arch="sd1", options={"rank": 2}, title="real", rank=2, alpha=2)
    source = save_adapter_file(tmp_path / "real_loha.safetensors", network.export_state_dict(), metadata, "fp32")
    expected = {name: adapter.delta_weight().detach() for name, adapter in network.adapters.items()}

    result = run_cli("convert", source, "--rank", "4", "--out", tmp_path / "real_lora.safetensors")
    assert result.returncode == 0, result.stderr
    converted = file_deltas(tmp_path / "real_lora.safetensors")
    assert set(converted) == set(expected)
    for name, delta in expected.items():
        assert converted[name].shape == delta.shape
        assert (converted[name] - delta).norm() <= 1e-5 * delta.norm(), name


# ----- inspect ----------------------------------------------------------------------------------------------------
def test_inspect_subprocess_prints_method_modules_metadata(work):
    key = "loha" if "loha" in work["files"] else "lora"
    result = run_cli("inspect", work["files"][key])
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert f"method:        {key}" in text
    assert "modules:       91 (unet 79, te 12)" in text
    assert "architecture:  sd1" in text
    assert "ss_network_module" in text and "sshs_model_hash" in text
    assert "matches the stored value" in text

    missing = run_cli("inspect", work["root"] / "missing.safetensors")
    assert missing.returncode == 2
    assert error_lines(missing.stderr) == [f"error: {work['root'] / 'missing.safetensors'}: no such file "
                                           "(adapter file)"]


def test_inspect_json_and_shortened_metadata(work, tmp_path, capsys):
    assert cli.main(["inspect", "--json", str(work["files"]["dora"])]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["methods"] == {"lora": 91} and report["dora_modules"] == 91
    assert report["modules_per_part"] == {"lora_unet": 79, "lora_te": 12}
    assert report["ranks"] == {"4": 91} and report["alphas"] == {"4": 91}
    assert report["dtypes"] == {"float32": report["tensors"]}
    assert report["architecture"] == "sd1"
    assert report["hashes"]["stored_hash_matches"] is True
    assert report["metadata"]["ss_network_module"] == "lycoris.kohya"

    lora_file = read_adapter(work["files"]["lora"])
    tensors = lora_file.tensors
    metadata = {**lora_file.metadata, "ss_tag_frequency": json.dumps({"10_x": {f"tag{i}": i for i in range(200)}})}
    save_file(tensors, str(tmp_path / "tagged.safetensors"), metadata)
    assert cli.main(["inspect", str(tmp_path / "tagged.safetensors")]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "ss_tag_frequency" in line)
    assert "chars)" in line and len(line) < 260
    assert "differs" not in out  # the data region, and so the addnet hash, did not change


# ----- damaged files and pipes ------------------------------------------------------------------------------------
def test_an_adapter_holding_nan_is_refused_by_every_verb(work, tmp_path, capsys):
    """One NaN in one module: merge writes nothing, inspect/convert/apply refuse, each naming that module."""
    from methods.apply import apply_adapter
    from methods.files import AdapterFileError

    source = read_adapter(work["files"]["lora"])
    tensors = dict(source.tensors)
    damaged = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors[f"{damaged}.lora_up.weight"] = tensors[f"{damaged}.lora_up.weight"].clone()
    tensors[f"{damaged}.lora_up.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(tensors, str(path), source.metadata)
    out = tmp_path / "merged"
    verbs = [["merge", "--base", str(work["root"] / "base"), "--adapter", str(path), "--out", str(out)],
             ["inspect", str(path)],
             ["convert", str(path), "--rank", "2", "--out", str(tmp_path / "converted.safetensors")]]
    for argv in verbs:
        code = cli.main(argv)
        captured = capsys.readouterr()
        assert code == 2, argv
        (line,) = error_lines(captured.err)
        assert f"module {damaged} holds non-finite values (1 NaN, 0 infinite in lora_up.weight)" in line, line
    assert not out.exists() and not (tmp_path / "converted.safetensors").exists()
    with pytest.raises(AdapterFileError, match=damaged):
        apply_adapter(base_pipe(work), path)


def test_inspect_into_a_closed_pipe_prints_no_traceback(work, tmp_path):
    """``inspect FILE | head -1``: the reader leaves after one line; the rest of a long report goes nowhere quietly."""
    source = read_adapter(work["files"]["lora"])
    metadata = {**source.metadata, "ss_tag_frequency": json.dumps({f"tag{i}": i for i in range(20000)})}
    path = tmp_path / "long.safetensors"
    save_file(source.tensors, str(path), metadata)  # with --full, far more than a pipe buffer of output
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(f"{sys.executable} -m trainer inspect --full {path} | head -1", shell=True,
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.stdout.startswith("file:") and len(result.stdout.splitlines()) == 1
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr

# ----- installation -----------------------------------------------------------------------------------------------
def test_a_foreign_distribution_of_our_top_level_names_is_refused_clearly(tmp_path):
    from trainer.install_check import InstallationConflict, check_installation

    site = tmp_path / "site-packages"
    (site / "trainer").mkdir(parents=True)
    ours = site / "rankwright-0.1.0.dist-info"
    ours.mkdir()
    (ours / "top_level.txt").write_text("methods\ntrainer\n")
    check_installation(site / "trainer")  # only ours: fine
    theirs = site / "trainer-0.0.36.dist-info"  # PyPI's "trainer" (setuptools: top_level.txt)
    theirs.mkdir()
    (theirs / "top_level.txt").write_text("trainer\n")
    hatch = site / "methods_kit-1.0.dist-info"  # a wheel without top_level.txt: its RECORD tells
    hatch.mkdir()
    (hatch / "RECORD").write_text("methods/__init__.py,sha256=x,10\nmethods_kit-1.0.dist-info/RECORD,,\n")
    with pytest.raises(InstallationConflict) as caught:
        check_installation(site / "trainer")
    message = str(caught.value)
    assert "'trainer' is also installed by trainer 0.0.36" in message
    assert "'methods' is also installed by methods_kit 1.0" in message
    assert "pip uninstall" in message and "virtual environment" in message
    check_installation(ROOT / "trainer")  # this checkout: no distribution records beside it

