"""Loading and saving base pipelines: hub ids, diffusers folders, and single-file ldm/sgm checkpoints, offline.

``load_pipeline(source)`` accepts

- a diffusers folder (``model_index.json``) → ``DiffusionPipeline.from_pretrained(folder, local_files_only=True)``;
- a single-file checkpoint (``.safetensors``, or ``.ckpt`` read with ``torch.load(weights_only=True)`` so no pickled
  code runs) in the original ldm (SD1/SD2) or sgm (SDXL) layout. The architecture is read from the keys
  (``cond_stage_model.transformer`` → sd1, ``cond_stage_model.model`` → sd2, ``conditioner.embedders.1`` → sdxl)
  and the cross-attention width; the components are built with diffusers' own single-file converters from a
  temporary diffusers-style config folder, so nothing is fetched from the hub. The configs are, in this order:
  a ``config`` folder given by the caller, the configs embedded by :func:`save_single_file`, or the real-size
  configs of :mod:`trainer.architectures`;
- anything else that looks like ``owner/name`` → ``DiffusionPipeline.from_pretrained`` (downloads; never in tests).

SD3/SD3.5 and FLUX.1 pipelines (a transformer instead of a UNet) load the same way from folders and hub ids; their
variant (SD3 medium, SD3.5 medium/large, FLUX.1 dev/schnell) is read from the transformer's config
(:func:`trainer.dit_architectures.detect`). A single-file SD3/Flux checkpoint in the original layout (sgm/BFL keys,
with or without ComfyUI's ``model.diffusion_model.`` prefix) is a transformer only: it is converted with diffusers'
``from_single_file`` and joined with the VAE, text encoders, tokenizers and scheduler of ``config``, the diffusers
folder (or hub id) of the base model it belongs to; that folder's ``transformer/config.json`` describes the
checkpoint where it has one, else the released variant's real-size config does.

``save_single_file(pipe, path)`` writes the inverse conversion (diffusers → ldm/sgm keys), readable by A1111,
ComfyUI, Forge and diffusers' ``from_single_file``; it also stores the diffusers configs in the safetensors
metadata so that non-standard sizes (the tiny test models) load back without a config folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import tempfile
from pathlib import Path
from typing import Any

import torch

from . import architectures

SOURCE_KINDS = ("hub", "folder", "single_file")
PREDICTION_TYPES = ("epsilon", "v_prediction")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
CONFIG_METADATA_KEY = "rankwright.diffusers_config"

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIXES = {
    "sd1": ["cond_stage_model.transformer."],
    "sd2": ["cond_stage_model.model."],
    "sdxl": ["conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."],
}
CONTEXT_DIM = {"sd1": 768, "sd2": 1024, "sdxl": 2048}
DIT_FAMILIES = ("sd3", "flux")
MODELSPEC_ARCHITECTURE = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512",
                          "sd2-v": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base"}
SCHEDULER_CONFIG = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                    "beta_end": 0.012, "beta_schedule": "scaled_linear", "timestep_spacing": "leading",
                    "steps_offset": 1, "prediction_type": "epsilon"}
# Per tokenizer of each architecture: hub repos (and subfolder) whose tokenizer may already sit in the local cache.
# They are looked up with local_files_only; nothing is fetched.
CACHED_TOKENIZERS: dict[str, list[list[tuple[str, str | None]]]] = {
    "sd1": [[("openai/clip-vit-large-patch14", None), ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer")]],
    "sd2": [[("stabilityai/stable-diffusion-2-1", "tokenizer"),
             ("stabilityai/stable-diffusion-2-1-base", "tokenizer")]],
    "sdxl": [[("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"), ("openai/clip-vit-large-patch14", None)],
             [("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2")]],
}

class ModelLoadError(ValueError):
    """A base model that cannot be loaded; the message is one sentence naming the source and what to do."""


FLOW = "flow"  # the "prediction type" of SD3/Flux: flow matching (velocity)


@dataclasses.dataclass
class ModelInfo:
    arch: str  # sd1, sd2, sdxl, sd3, flux
    prediction_type: str  # epsilon or v_prediction; "flow" for SD3/Flux
    source_kind: str  # hub, folder, single_file
    source: str = ""
    prediction_from: str = ""  # how the prediction type was decided (argument, file, config, test, default)
    notes: list[str] = dataclasses.field(default_factory=list)
    variant: str = ""  # SD3/Flux: the released model it is shaped like (sd3.5-large, flux-dev, …)
    variant_title: str = ""  # "FLUX.1 dev", or "a FLUX.1 dev-like transformer of non-standard size"


# ----- loading --------------------------------------------------------------------------------------------------
def load_pipeline(source: str | os.PathLike, arch: str | None = None, prediction_type: str | None = None,
                  dtype: torch.dtype = torch.float32, *, config: str | os.PathLike | None = None,
                  tokenizer: str | os.PathLike | None = None) -> tuple[Any, ModelInfo]:
    """Load a SD1/SD2/SDXL pipeline from a hub id, a diffusers folder or a single-file checkpoint.

    ``arch`` checks the detected architecture (a mismatch is an error); ``prediction_type`` overrides whatever
    the source says (and skips the SD2 test forward pass). ``config`` (single files only) is a diffusers folder
    whose component configs describe the checkpoint; ``tokenizer`` a folder with ``vocab.json``/``merges.txt``
    (single files carry no tokenizer: without one, a locally cached hub tokenizer is used if present, else None).
    """
    known = (*CONTEXT_DIM, *DIT_FAMILIES)
    if arch is not None and arch not in known:
        raise ModelLoadError(f"unknown architecture {arch!r}; choose one of {', '.join(known)}")
    if prediction_type is not None and arch in DIT_FAMILIES:
        raise ModelLoadError(f"{arch} models are trained by flow matching and have no prediction type; leave "
                             "model.prediction_type at auto")
    if prediction_type is not None:
        prediction_type = normalise_prediction_type(prediction_type)
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        pipe, info = _load_folder(path, dtype)
    elif path.is_file():
        pipe, info = _load_single_file(path, arch, dtype, config, tokenizer, prediction_type)
    elif _looks_like_hub_id(text):
        pipe, info = _load_hub(text, dtype)
    else:
        raise ModelLoadError(f"{text}: no such file or folder, and not a hub id of the form owner/name")
    if arch is not None and info.arch != arch:
        raise ModelLoadError(f"{text}: this is an {info.arch} model, not {arch}")
    if prediction_type is not None and info.prediction_type == FLOW:
        raise ModelLoadError(f"{text}: {info.variant_title} is trained by flow matching and has no prediction "
                             "type; leave model.prediction_type at auto")
    if prediction_type is not None and prediction_type != info.prediction_type:
        info.prediction_type, info.prediction_from = prediction_type, "argument"
        set_prediction_type(pipe, prediction_type)
    return pipe, info


def normalise_prediction_type(value: str) -> str:
    value = {"v": "v_prediction", "v-prediction": "v_prediction", "eps": "epsilon"}.get(value, value)
    if value not in PREDICTION_TYPES:
        raise ModelLoadError(f"prediction type {value!r} is not one of epsilon, v_prediction")
    return value


def set_prediction_type(pipe: Any, prediction_type: str) -> None:
    scheduler = pipe.scheduler
    pipe.scheduler = type(scheduler).from_config(scheduler.config, prediction_type=prediction_type)


def _looks_like_hub_id(text: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text)) and not text.endswith(SINGLE_FILE_SUFFIXES)


def _pipeline_info(pipe: Any, kind: str, source: str) -> ModelInfo:
    from methods.network import detect_architecture

    from .dit_architectures import detect

    found = detect(pipe) if getattr(pipe, "transformer", None) is not None else None
    if found is not None and getattr(pipe, "vae", None) is not None:
        notes = [] if found.exact else [f"the transformer's sizes differ from {found.variant.title}'s; its ids are "
                                        "used for metadata"]
        return ModelInfo(found.variant.family, FLOW, kind, source, "flow matching", notes, found.variant.name,
                         found.description)
    if getattr(pipe, "unet", None) is None or getattr(pipe, "vae", None) is None:
        raise ModelLoadError(f"{source}: {type(pipe).__name__} is not a Stable Diffusion (SD1/SD2/SDXL), SD3/SD3.5 or "
                             "FLUX.1 pipeline")
    arch = detect_architecture(pipe)
    prediction = getattr(pipe.scheduler.config, "prediction_type", None) or "epsilon"
    return ModelInfo(arch, prediction, kind, source, "scheduler config")


def _load_folder(path: Path, dtype: torch.dtype) -> tuple[Any, ModelInfo]:
    from diffusers import DiffusionPipeline

    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"{path}: folder has no model_index.json, so it is not a diffusers pipeline folder")
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path}: model_index.json is not valid JSON ({_first_line(error)})") from error
    # Components saved as [null, null] (a tokenizer-less merge of a single file) must be passed as None explicitly,
    # or diffusers refuses the non-optional ones.
    absent = {name: None for name, value in index.items()
              if not name.startswith("_") and isinstance(value, list) and value[:1] == [None]}
    _check_components(path, index)
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True, **absent)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ModelLoadError(f"{path}: the diffusers folder cannot be loaded ({_first_line(error)})") from error
    return pipe, _pipeline_info(pipe, "folder", str(path))


def _check_components(path: Path, index: dict[str, Any]) -> None:
    """Every component model_index.json names has its sub-folder (diffusers only says "no file named
    config.json found in directory <the pipeline folder>" when one is missing)."""
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
            continue
        folder = path / name
        if not folder.is_dir():
            raise ModelLoadError(f"{path}: model_index.json lists a {name} ({value[1]}) but the folder has no "
                                 f"{name}/ sub-folder; the copy is incomplete — copy the whole diffusers folder")
        if not any(folder.iterdir()):
            raise ModelLoadError(f"{path}: the {name}/ sub-folder is empty; the copy is incomplete — copy the whole "
                                 "diffusers folder")


def _load_hub(repo_id: str, dtype: torch.dtype) -> tuple[Any, ModelInfo]:
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(repo_id, torch_dtype=dtype)
    except Exception as error:  # hub errors come in many classes (HTTP, offline, gated repo, missing files)
        message = f"{repo_id}: could not load it from the Hugging Face hub ({_first_line(error)})"
        raise ModelLoadError(message) from error
    return pipe, _pipeline_info(pipe, "hub", repo_id)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and (safetensors) metadata of a single-file checkpoint; ``.ckpt`` without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    metadata: dict[str, str] = {}
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            tensors = {}
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                for key in handle.keys():
                    tensors[key] = handle.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as error:
            raise ModelLoadError(f"{path}: not a readable .safetensors file ({_first_line(error)})") from error
        return tensors, metadata
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(f"{path}: unsupported file type {path.suffix or '(none)'}; "
                             "give a .safetensors or .ckpt checkpoint or a diffusers folder")
    try:
        try:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError for disallowed globals, EOFError/RuntimeError for corrupt files
        if "weights_only" in str(error) or "Unsupported global" in str(error):
            raise ModelLoadError(f"{path}: the checkpoint holds pickled objects other than tensors, which are not "
                                 "loaded for safety; convert it to .safetensors with a trusted tool") from error
        raise ModelLoadError(f"{path}: not a readable PyTorch checkpoint ({_first_line(error)})") from error
    while isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise ModelLoadError(f"{path}: the checkpoint does not hold a state dict")
    tensors = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return tensors, metadata


def detect_checkpoint_architecture(state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> str:
    """sd1, sd2 or sdxl from the text-encoder keys of an ldm/sgm checkpoint; one clear error for anything else."""
    keys = state_dict.keys()
    has = {prefix: any(k.startswith(prefix) for k in keys) for prefix in (
        UNET_PREFIX, "conditioner.embedders.1.", "conditioner.embedders.0.", "cond_stage_model.model.",
        "cond_stage_model.transformer.")}
    if not has[UNET_PREFIX]:
        if any(k.startswith(("lora_", "lycoris_")) for k in keys):
            raise ModelLoadError(f"{source}: this is an adapter file (LoRA/LyCORIS), not a base model checkpoint")
        if any(k.startswith(("down_blocks.", "conv_in.")) for k in keys):
            raise ModelLoadError(f"{source}: this is a bare diffusers UNet/VAE file, not a full SD checkpoint; "
                                 "give a diffusers pipeline folder or a full ldm/sgm checkpoint")
        raise ModelLoadError(f"{source}: not a Stable Diffusion checkpoint (no model.diffusion_model.* weights)")
    first_conv = state_dict.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if first_conv is not None and first_conv.dim() == 4 and first_conv.shape[1] != 4:
        raise ModelLoadError(f"{source}: the UNet takes {first_conv.shape[1]} input channels (inpainting or "
                             "another special model); only plain text-to-image SD1/SD2/SDXL checkpoints are supported")
    if has["conditioner.embedders.1."]:
        return "sdxl"
    if has["conditioner.embedders.0."]:
        raise ModelLoadError(f"{source}: an SDXL refiner checkpoint (one OpenCLIP encoder) is not supported")
    if has["cond_stage_model.model."]:
        return "sd2"
    if has["cond_stage_model.transformer."]:
        return "sd1"
    raise ModelLoadError(f"{source}: the checkpoint has a UNet but no text encoder, so it cannot be used as a base "
                         "model; give a full SD1/SD2/SDXL checkpoint")


def checkpoint_context_dim(state_dict: dict[str, torch.Tensor]) -> int | None:
    for key, tensor in state_dict.items():
        if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight"):
            return int(tensor.shape[-1])
    return None


def real_configs(arch: str, prediction_type: str = "epsilon") -> dict[str, Any]:
    """The diffusers component configs of the real-size architecture (see :mod:`trainer.architectures`)."""
    encoders = [architectures._clip_config(spec, None).to_dict() for spec in architectures.TEXT_ENCODERS[arch]]
    configs: dict[str, Any] = {
        "arch": arch,
        "unet": dict(architectures.UNET[arch]),
        "vae": dict(architectures.SDXL_VAE if arch == "sdxl" else architectures.SD_VAE),
        "text_encoder": encoders[0],
        "scheduler": {**SCHEDULER_CONFIG, "prediction_type": prediction_type},
    }
    if arch == "sdxl":
        configs["text_encoder_2"] = encoders[1]
    return configs


def pipeline_configs(pipe: Any) -> dict[str, Any]:
    """The component configs of a loaded pipeline, in the form :func:`write_config_folder` takes."""
    from methods.network import detect_architecture

    configs: dict[str, Any] = {
        "arch": detect_architecture(pipe),
        "unet": _plain_config(pipe.unet.config),
        "vae": _plain_config(pipe.vae.config),
        "text_encoder": pipe.text_encoder.config.to_dict(),
        "scheduler": {**_plain_config(pipe.scheduler.config), "_class_name": type(pipe.scheduler).__name__},
    }
    if getattr(pipe, "text_encoder_2", None) is not None:
        configs["text_encoder_2"] = pipe.text_encoder_2.config.to_dict()
    return configs


def _plain_config(config: Any) -> dict[str, Any]:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def write_config_folder(folder: Path, configs: dict[str, Any]) -> Path:
    """A diffusers-style folder holding only configs (``unet/config.json``, ``text_encoder/config.json``, …)."""
    folder.mkdir(parents=True, exist_ok=True)
    classes = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}
    for name in ("unet", "vae"):
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps({**configs[name], "_class_name": classes[name]}))
    for name in ("text_encoder", "text_encoder_2"):
        if name in configs:
            (folder / name).mkdir(exist_ok=True)
            (folder / name / "config.json").write_text(json.dumps(configs[name]))
    (folder / "scheduler").mkdir(exist_ok=True)
    scheduler = {"_class_name": "EulerDiscreteScheduler", **configs["scheduler"]}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return folder


def _configs_from_folder(folder: Path) -> dict[str, Any]:
    def read(name: str, file: str = "config.json") -> dict[str, Any] | None:
        path = folder / name / file
        return json.loads(path.read_text()) if path.is_file() else None

    configs = {name: read(name) for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    configs["scheduler"] = read("scheduler", "scheduler_config.json") or dict(SCHEDULER_CONFIG)
    missing = [name for name in ("unet", "vae", "text_encoder") if configs[name] is None]
    if missing:
        raise ModelLoadError(f"{folder}: the config folder lacks {', '.join(m + '/config.json' for m in missing)}")
    return {k: v for k, v in configs.items() if v is not None}


def _prediction_hint(state_dict: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> str | None:
    if "v_pred" in state_dict:  # the marker ComfyUI reads (NoobAI-style v-prediction checkpoints)
        return "v_prediction"
    spec = metadata.get("modelspec.prediction_type", "").lower()
    if spec in ("v", "v_prediction"):
        return "v_prediction"
    if spec == "epsilon":
        return "epsilon"
    if "768-v" in path.name or re.search(r"(^|[-_.])v[-_]?pred", path.name.lower()):
        return "v_prediction"
    return None


def _load_single_file(path: Path, arch: str | None, dtype: torch.dtype, config: str | os.PathLike | None,
                      tokenizer: str | os.PathLike | None, prediction_type: str | None = None
                      ) -> tuple[Any, ModelInfo]:
    state_dict, metadata = read_checkpoint(path)
    from .dit_architectures import detect_checkpoint

    dit_variant = detect_checkpoint({key: tuple(tensor.shape) for key, tensor in state_dict.items()})
    if dit_variant is not None:
        if arch is not None and arch != dit_variant.family:
            raise ModelLoadError(f"{path}: this is a {dit_variant.title} checkpoint ({dit_variant.family}), not {arch}")
        if prediction_type is not None:
            raise ModelLoadError(f"{path}: {dit_variant.title} is trained by flow matching and has no prediction "
                                 "type; leave model.prediction_type at auto")
        return _load_dit_single_file(path, state_dict, dit_variant, dtype, config)
    detected = detect_checkpoint_architecture(state_dict, str(path))
    if arch is not None and arch != detected:
        raise ModelLoadError(f"{path}: this is an {detected} checkpoint, not {arch}")
    arch = detected
    notes: list[str] = []
    if config is not None:
        configs, origin = _configs_from_folder(Path(config)), f"config folder {config}"
    elif CONFIG_METADATA_KEY in metadata:
        try:
            configs, origin = json.loads(metadata[CONFIG_METADATA_KEY]), "configs embedded in the file"
        except json.JSONDecodeError as error:
            raise ModelLoadError(f"{path}: the embedded {CONFIG_METADATA_KEY} metadata is not valid JSON") from error
    else:
        configs, origin = real_configs(arch), f"real-size {arch} configs"
        context = checkpoint_context_dim(state_dict)
        if context is not None and context != CONTEXT_DIM[arch]:
            raise ModelLoadError(f"{path}: the UNet's cross-attention width is {context}, not the {CONTEXT_DIM[arch]} "
                                 f"of a real {arch} model; pass the matching diffusers config folder")
    configs.setdefault("scheduler", dict(SCHEDULER_CONFIG))

    # Prediction type: a hint in the file, else the given/embedded configs, else epsilon (SD2: A1111's test below).
    hint, prediction_from = _prediction_hint(state_dict, metadata, path), "file"
    if prediction_type is not None:
        hint, prediction_from = prediction_type, "argument"
    if hint is None and origin.startswith("real-size"):
        hint, prediction_from = (None, "test") if arch == "sd2" else ("epsilon", "default")
    elif hint is None:
        hint, prediction_from = configs["scheduler"].get("prediction_type", "epsilon"), origin
    with tempfile.TemporaryDirectory(prefix="rankwright-config-") as temporary:
        folder = write_config_folder(Path(temporary), configs)
        components = _build_components(state_dict, arch, folder, dtype, str(path))
    if hint is None:  # real-size SD2 without hints: A1111's test (a v-model predicts ≈ −x for this input)
        hint = "v_prediction" if sd2_predicts_v(components["unet"]) else "epsilon"
        notes.append("SD2 prediction type decided by A1111's test forward pass; pass --prediction-type to override")
    configs["scheduler"]["prediction_type"] = hint
    components["scheduler"] = _scheduler(configs["scheduler"])
    components.update(_tokenizers(arch, tokenizer, config, notes))
    pipe = _assemble(arch, components)
    return pipe, ModelInfo(arch, hint, "single_file", str(path), prediction_from, notes)


def _load_dit_single_file(path: Path, state_dict: dict[str, torch.Tensor], variant: Any, dtype: torch.dtype,
                          components: str | os.PathLike | None) -> tuple[Any, ModelInfo]:
    """An original-layout SD3/Flux transformer file joined with the other components of ``components``."""
    from diffusers import DiffusionPipeline, FluxTransformer2DModel, SD3Transformer2DModel

    from .dit_architectures import write_transformer_config

    if components is None:
        raise ModelLoadError(
            f"{path}: a single-file {variant.title} checkpoint holds the transformer only; set model.config (CLI: "
            f"--config) to the diffusers folder or hub id of the base model (e.g. {variant.hub_id}) for its VAE, "
            "text encoders and tokenizers")
    source = os.fspath(components)
    folder = Path(source).expanduser()
    local = folder.is_dir()
    if not local and not _looks_like_hub_id(source):
        raise ModelLoadError(f"{path}: model.config = {source!r} is neither a diffusers folder nor a hub id")
    if local and not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    model_class = SD3Transformer2DModel if variant.family == "sd3" else FluxTransformer2DModel
    transformer_weights = {key: tensor for key, tensor in state_dict.items()
                           if not key.startswith(("first_stage_model.", "text_encoders.", "cond_stage_model."))}
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="rankwright-config-") as temporary:
        if local and (folder / "transformer" / "config.json").is_file():
            config_source = str(folder)
        elif not local:
            config_source = source
        else:
            config_source = str(write_transformer_config(Path(temporary), variant.name))
            notes.append(f"transformer config: the released {variant.title}'s")
        offline = {"local_files_only": True} if local else {}
        try:
            transformer = model_class.from_single_file(transformer_weights, config=config_source,
                                                       subfolder="transformer", torch_dtype=dtype, **offline)
        except (ValueError, KeyError, RuntimeError, OSError, IndexError) as error:
            described = "the released model's" if notes else f"{source}'s"
            raise ModelLoadError(f"{path}: the weights do not fit {described} {variant.title} transformer "
                                 f"configuration ({_first_line(error)})") from error
    missing = [n for n, t in (*transformer.named_parameters(), *transformer.named_buffers()) if t.device.type == "meta"]
    if missing:
        raise ModelLoadError(f"{path}: the checkpoint lacks {len(missing)} transformer weight(s) (first: {missing[0]})")
    try:
        pipe = DiffusionPipeline.from_pretrained(source, transformer=transformer, torch_dtype=dtype, **offline)
    except Exception as error:  # folder or hub errors come in many classes
        raise ModelLoadError(f"{source}: could not load the other components for {path.name} "
                             f"({_first_line(error)})") from error
    info = _pipeline_info(pipe, "single_file", str(path))
    if info.arch != variant.family:
        raise ModelLoadError(f"{source}: a {info.arch} pipeline, but {path.name} is a {variant.title} transformer")
    info.notes[:0] = notes + [f"VAE, text encoders and tokenizers from {source}"]
    return pipe, info


def _build_components(state_dict: dict[str, torch.Tensor], arch: str, folder: Path, dtype: torch.dtype,
                      source: str) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    def subset(*prefixes: str) -> dict[str, torch.Tensor]:
        return {k: v for k, v in state_dict.items() if k.startswith(prefixes)}

    components: dict[str, Any] = {}
    try:
        components["unet"] = UNet2DConditionModel.from_single_file(
            subset(UNET_PREFIX), config=str(folder), subfolder="unet", torch_dtype=dtype, local_files_only=True)
        components["vae"] = AutoencoderKL.from_single_file(
            subset(VAE_PREFIX), config=str(folder), subfolder="vae", torch_dtype=dtype, local_files_only=True)
        prefixes = TEXT_ENCODER_PREFIXES[arch]
        names = ["text_encoder", "text_encoder_2"][: len(prefixes)]
        for index, (name, prefix) in enumerate(zip(names, prefixes)):
            # Each encoder sees only its own keys: diffusers tells CLIP-L from OpenCLIP by key *and width*, which
            # is ambiguous when both encoders have the same width (the tiny SDXL test model).
            model_class = CLIPTextModelWithProjection if arch == "sdxl" and index == 1 else CLIPTextModel
            encoder_keys = subset(prefix)
            if not encoder_keys:
                raise ModelLoadError(f"{source}: the checkpoint has no {prefix}* weights for its {name}")
            components[name] = create_diffusers_clip_model_from_ldm(
                model_class, encoder_keys, subfolder=name, config=str(folder), torch_dtype=dtype,
                local_files_only=True)
    except ModelLoadError:
        raise
    except (ValueError, KeyError, RuntimeError, OSError, IndexError) as error:
        raise ModelLoadError(f"{source}: the weights do not fit the {arch} configuration ({_first_line(error)})") \
            from error
    for name, model in components.items():
        missing = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
        if missing:
            raise ModelLoadError(f"{source}: the checkpoint lacks {len(missing)} weight(s) of the {name} "
                                 f"(first: {missing[0]}); it is incomplete or not a {arch} checkpoint")
        model.eval()
    return components


def _scheduler(config: dict[str, Any]):
    import diffusers

    values = dict(config)
    class_name = values.pop("_class_name", "EulerDiscreteScheduler")
    scheduler_class = getattr(diffusers, class_name, diffusers.EulerDiscreteScheduler)
    return scheduler_class.from_config(values)


def _tokenizers(arch: str, tokenizer: str | os.PathLike | None, config: str | os.PathLike | None,
                notes: list[str]) -> dict[str, Any]:
    from transformers import CLIPTokenizer

    names = ["tokenizer", "tokenizer_2"] if arch == "sdxl" else ["tokenizer"]
    result: dict[str, Any] = {}
    for index, name in enumerate(names):
        candidates: list[tuple[str, str | None]] = []
        if tokenizer is not None:
            candidates.append((os.fspath(tokenizer), None))
        if config is not None:
            candidates.append((os.fspath(config), name))
        candidates.extend(CACHED_TOKENIZERS[arch][index])
        loaded = None
        for where, subfolder in candidates:
            if not _tokenizer_present(where, subfolder):
                continue
            try:
                kwargs = {"subfolder": subfolder} if subfolder else {}
                candidate = CLIPTokenizer.from_pretrained(where, local_files_only=True, **kwargs)
            except (OSError, ValueError, TypeError):
                continue
            if len(candidate) > 2:  # transformers 5 returns an empty tokenizer instead of failing on missing files
                loaded = candidate
                break
        if loaded is None:
            notes.append(f"no {name} found (a single file carries none); pass a tokenizer folder to prompt the model")
        result[name] = loaded
    return result


def _tokenizer_present(where: str, subfolder: str | None) -> bool:
    """Whether a tokenizer's vocab.json exists locally (a folder, or a hub repo already in the local cache)."""
    folder = Path(where).expanduser()
    if folder.is_dir():
        return (folder / (subfolder or "") / "vocab.json").is_file()
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a diffusers dependency
        return False
    filename = f"{subfolder}/vocab.json" if subfolder else "vocab.json"
    found = try_to_load_from_cache(where, filename)
    return isinstance(found, str)


def _assemble(arch: str, components: dict[str, Any]):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if arch == "sdxl":
        return StableDiffusionXLPipeline(**components)
    return StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@torch.no_grad()
def sd2_predicts_v(unet: Any) -> bool:
    """A1111's ``is_using_v_parameterization_for_sd2``: for x = 0.5, t = 999 a v-model predicts ≈ −x."""
    parameter = next(unet.parameters())
    x = torch.full((1, 4, 8, 8), 0.5, device=parameter.device, dtype=parameter.dtype)
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, device=parameter.device, dtype=parameter.dtype)
    out = unet(x, torch.tensor([999], device=parameter.device), encoder_hidden_states=context).sample
    return bool((out.float() - x.float()).mean().item() < -1)


# ----- diffusers folders ------------------------------------------------------------------------------------------
# Text-encoder classes whose transformers 4.x module tree has a ``text_model.`` level that transformers 5 dropped.
CANONICAL_TEXT_MODEL_PREFIX = {"CLIPTextModel": "text_model."}


def save_pipeline_folder(pipe: Any, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``pipe`` as a diffusers folder that every supported transformers version loads.

    ``save_pretrained`` goes into a sibling temporary folder, the text encoders are rewritten in the canonical
    key layout (:func:`canonical_text_encoder_layout`), and the folder is moved into place, so ``out`` is never
    half-written.
    """
    import shutil

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.{secrets.token_hex(6)}.tmp")
    temporary.mkdir()  # not mkdtemp: its 0700 would make the folder unreadable to other users of a shared UI
    try:
        pipe.save_pretrained(str(temporary), safe_serialization=True)
        canonical_text_encoder_layout(temporary)
        if out.exists():
            if out.is_dir():
                shutil.rmtree(out)
            else:
                out.unlink()
        os.replace(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return out


def canonical_text_encoder_layout(folder: str | os.PathLike) -> list[Path]:
    """Rename the text encoders' weights of a diffusers folder to the ``text_model.*`` layout; returns the files
    changed.

    transformers 5 saves ``CLIPTextModel`` without its ``text_model.`` level (and strips that prefix again when
    loading), but transformers 4.x — which kohya pins and our dependency range allows — does not know the short
    names and silently leaves the encoder at random weights. The long names load in both. The rename is lossless
    (same tensors, same dtypes); ``CLIPTextModelWithProjection`` (SDXL's second encoder) keeps the level anyway.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    changed: list[Path] = []
    for part in sorted(Path(folder).glob("text_encoder*")):
        config_path = part / "config.json"
        if not config_path.is_file():
            continue
        architectures = json.loads(config_path.read_text(encoding="utf-8")).get("architectures") or []
        prefix = CANONICAL_TEXT_MODEL_PREFIX.get(architectures[0]) if len(architectures) == 1 else None
        if prefix is None:
            continue
        index_path = part / "model.safetensors.index.json"
        index = json.loads(index_path.read_text(encoding="utf-8")) if index_path.is_file() else None
        files = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
        for name in files:
            path = part / name
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            if all(key.startswith(prefix) for key in tensors):
                continue
            renamed = {key if key.startswith(prefix) else prefix + key: tensor for key, tensor in tensors.items()}
            temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # save_file: the usual file mode
            try:
                save_file(renamed, str(temporary), metadata=metadata)
                os.replace(temporary, path)
            except BaseException:
                temporary.unlink(missing_ok=True)
                raise
            changed.append(path)
        if index:
            index["weight_map"] = {key if key.startswith(prefix) else prefix + key: file
                                   for key, file in index["weight_map"].items()}
            index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return changed


# ----- diffusers → ldm/sgm ----------------------------------------------------------------------------------------
_RESNET_NORMS = {"norm1": ("conv1", "in_layers.2", "in_layers.0"), "norm2": ("conv2", "out_layers.3", "out_layers.0")}
_UNET_TOP = {"conv_norm_out": "out.0"}


def unet_to_ldm(unet: Any) -> dict[str, torch.Tensor]:
    """Diffusers UNet state dict → ``model.diffusion_model.*`` keys (inverse of ``convert_ldm_unet_checkpoint``)."""
    from methods.naming import UNetNaming

    naming = UNetNaming(unet, sgm_style=True)
    result = {}
    for key, tensor in unet.state_dict().items():
        module, _, parameter = key.rpartition(".")
        target = _UNET_TOP.get(module) or naming.sgm_path(module)
        if target is None:
            head, _, last = module.rpartition(".")
            if last in _RESNET_NORMS and ".resnets." in module:
                conv, conv_ldm, norm_ldm = _RESNET_NORMS[last]
                mapped = naming.sgm_path(f"{head}.{conv}")
                if mapped is not None and mapped.endswith(conv_ldm):
                    target = mapped[: -len(conv_ldm)] + norm_ldm
        if target is None:
            raise ValueError(f"UNet weight {key} has no ldm/sgm name; the UNet layout is not SD1/SD2/SDXL")
        result[f"{UNET_PREFIX}{target}.{parameter}"] = tensor
    return result


def vae_to_ldm(vae: Any) -> dict[str, torch.Tensor]:
    """Diffusers AutoencoderKL → ``first_stage_model.*`` keys (inverse of ``convert_ldm_vae_checkpoint``)."""
    up_blocks = len(vae.config.up_block_types)
    result = {}
    for key, tensor in vae.state_dict().items():
        new = key
        new = new.replace("conv_norm_out", "norm_out")
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
                     lambda m: f"decoder.up.{up_blocks - 1 - int(m[1])}.block.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{up_blocks - 1 - int(m[1])}.upsample.", new)
        new = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", new)
        if ".mid_block.attentions.0." in new:
            new = new.replace(".mid_block.attentions.0.", ".mid.attn_1.")
            for old, ldm in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                             ("to_out.0", "proj_out")):
                new = new.replace(f".attn_1.{old}.", f".attn_1.{ldm}.")
            if tensor.dim() == 2:  # ldm stores the attention projections as 1×1 convs
                tensor = tensor[:, :, None, None]
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        result[VAE_PREFIX + new] = tensor
    return result


def clip_to_ldm(text_encoder: Any, prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP-L → ``<prefix>text_model.*`` (the ldm/sgm layout keeps the transformers names)."""
    result = {}
    for key, tensor in text_encoder.state_dict().items():
        if key.endswith("position_ids"):
            continue
        stripped = key.removeprefix("text_model.")
        result[f"{prefix}text_model.{stripped}"] = tensor
    return result


_OPENCLIP_LAYER = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
                   ("self_attn.out_proj", "attn.out_proj"))


def openclip_to_ldm(text_encoder: Any, prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP (OpenCLIP weights) → OpenCLIP keys: fused ``attn.in_proj_weight``, ``ln_1``, ``mlp.c_fc`` …"""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()
             if not k.endswith("position_ids")}
    result: dict[str, torch.Tensor] = {}
    fused: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
        if match:
            layer, module, kind = int(match[1]), match[2], match[3]
            qkv = re.fullmatch(r"self_attn\.([qkv])_proj", module)
            if qkv:
                fused.setdefault((layer, kind), {})[qkv[1]] = tensor
                continue
            for old, new in _OPENCLIP_LAYER:
                if module == old:
                    module = new
                    break
            else:
                raise ValueError(f"text encoder weight {key} has no OpenCLIP name")
            result[f"{prefix}transformer.resblocks.{layer}.{module}.{kind}"] = tensor
        elif key == "embeddings.token_embedding.weight":
            result[prefix + "token_embedding.weight"] = tensor
        elif key == "embeddings.position_embedding.weight":
            result[prefix + "positional_embedding"] = tensor
        elif key.startswith("final_layer_norm."):
            result[prefix + "ln_final." + key.rpartition(".")[2]] = tensor
        elif key == "text_projection.weight":
            result[prefix + "text_projection"] = tensor.T.contiguous()
        else:
            raise ValueError(f"text encoder weight {key} has no OpenCLIP name")
    for (layer, kind), parts in fused.items():
        result[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0)
    return result


def pipeline_to_ldm(pipe: Any) -> dict[str, torch.Tensor]:
    """The whole pipeline as one ldm (SD1/SD2) or sgm (SDXL) state dict."""
    from methods.network import detect_architecture

    arch = detect_architecture(pipe)
    state = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae)}
    prefixes = TEXT_ENCODER_PREFIXES[arch]
    if arch == "sd1":
        state.update(clip_to_ldm(pipe.text_encoder, prefixes[0]))
    elif arch == "sd2":
        state.update(openclip_to_ldm(pipe.text_encoder, prefixes[0]))
    else:
        state.update(clip_to_ldm(pipe.text_encoder, prefixes[0]))
        state.update(openclip_to_ldm(pipe.text_encoder_2, prefixes[1]))
    return state


def save_single_file(pipe: Any, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                     metadata: dict[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write the pipeline as one ldm/sgm checkpoint (``.safetensors``, or ``.ckpt`` holding only tensors).

    The safetensors metadata carries ModelSpec keys and the diffusers configs (``rankwright.diffusers_config``),
    so :func:`load_pipeline` rebuilds non-standard sizes exactly; other tools ignore it.
    """
    path = Path(path)
    if path.suffix not in (".safetensors", ".ckpt"):
        raise ValueError(f"{path}: a single-file checkpoint must end in .safetensors or .ckpt")
    if getattr(pipe, "unet", None) is None:
        raise ValueError(f"{path}: single-file checkpoints are written for SD1/SD2/SDXL only; write an SD3/Flux "
                         "model as a diffusers folder (an output path without .safetensors)")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or allow overwriting")
    configs = pipeline_configs(pipe)
    arch = configs["arch"]
    prediction = configs["scheduler"].get("prediction_type", "epsilon")
    state = {}
    for key, tensor in pipeline_to_ldm(pipe).items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[key] = tensor.contiguous()
    if prediction == "v_prediction":
        state["v_pred"] = torch.tensor([])
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        if path.suffix == ".ckpt":
            torch.save({"state_dict": state}, temporary)
        else:
            from safetensors.torch import save_file

            version = "sd2-v" if arch == "sd2" and prediction == "v_prediction" else arch
            header = {
                "modelspec.sai_model_spec": "1.0.1",
                "modelspec.architecture": MODELSPEC_ARCHITECTURE[version],
                "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if arch == "sdxl"
                else "https://github.com/Stability-AI/stablediffusion",
                "modelspec.title": path.stem,
                "modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon",
                CONFIG_METADATA_KEY: json.dumps(configs, default=_json_default),
                **(metadata or {}),
            }
            save_file(state, temporary, metadata={k: str(v) for k, v in header.items()})
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple | set):
        return list(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return str(value)
