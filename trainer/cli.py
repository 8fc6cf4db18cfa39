"""Command line: ``python -m trainer <command>`` (also installed as ``rankwright``).

Commands:

- ``merge``: bake one or more adapter files (any method) into a copy of a base model; write a diffusers folder
  or, for ``--out X.safetensors``, a single ldm/sgm checkpoint;
- ``convert``: turn any adapter file into a plain LoRA file by truncated SVD of each module's ΔW;
- ``inspect``: method, modules per part, ranks, alphas, dtype, architecture, hashes and metadata of a file;
- ``train``: train an adapter from a TOML config (``--set section.key=value`` overrides, ``--resume STATE_DIR``);
  under ``torchrun --nproc_per_node N -m trainer train ...`` or ``accelerate launch -m trainer train ...`` it
  trains data-parallel, and only the main process writes files. Exit 0 also when stopped (SIGINT/SIGTERM/STOP
  file) with a save; 1 when training failed (NaN loss); 2 for configuration mistakes;
- ``compare``: train several methods (``--methods lora,loha,...``) from one config on the same data, steps and
  seed, and write a report (preview grid, loss curves, parameters, file size, s/step, prior drift, concept score
  on the toy model) into a new folder; ``--override METHOD:section.key=value`` changes one method's config only;
- ``caption``: write caption files next to a dataset's images with a captioner or tagger (:mod:`trainer.captioning`);
- ``regularise``: draw regularisation images with the base model from the dataset's captions, the trigger word
  removed (:mod:`trainer.prior`), cached in a folder keyed by model, prompts and settings;
- ``report``: what training will do with each image of a dataset, as text, JSON and a contact sheet
  (:mod:`trainer.dataset_report`).

Each command is a :class:`Command` in ``COMMANDS`` (``@command(...)`` registers one); a new command (``train``)
adds an ``add_arguments`` function and a handler the same way. Handlers return an exit code; mistakes a user can
make raise :class:`CLIError` (or the loaders' own error classes) and end as one ``error: ...`` line with exit 2.

The adapter-file commands are argument parsing and printing around :mod:`methods.tools` (which the UI calls too);
loading and saving whole pipelines is trainer's.
"""

from __future__ import annotations

import os

# Before diffusers/transformers are imported: their info/warning chatter is not for CLI users.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

EXIT_USER_ERROR = 2
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Exit status when the reader of our output went away (``inspect FILE | head -1``), as if killed by SIGPIPE.
EXIT_BROKEN_PIPE = 141


class CLIError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2."""


@dataclasses.dataclass
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register ``run(args) -> exit code`` as subcommand ``name``."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(name, help, add_arguments, run)
        return run

    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer",
                                     description="Rankwright: Stable Diffusion adapter tools (LoRA, LoHa, LoKr, OFT, "
                                                 "BOFT, DoRA) writing Civitai-style .safetensors files.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for entry in COMMANDS.values():
        sub = subparsers.add_parser(entry.name, help=entry.help, description=entry.help)
        entry.add_arguments(sub)
        sub.set_defaults(handler=entry.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .install_check import check_installation

    check_installation()  # again: another distribution may have replaced trainer/__init__.py, not this file
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    from methods.base import ConfigError
    from methods.files import AdapterFileError

    from .models import ModelLoadError

    try:
        code = int(args.handler(args) or 0)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # Nobody reads the rest: point stdout at devnull so the interpreter's final flush fails quietly too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (CLIError, ModelLoadError, AdapterFileError, ConfigError, FileExistsError, FileNotFoundError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")


def _quiet_model_libraries() -> None:
    """Silence diffusers/transformers progress bars (imported only by the commands that load models)."""
    try:
        import diffusers.utils.logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - diffusers is a dependency
        pass
    try:
        import transformers.utils.logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _say(text: str = "") -> None:
    print(text, flush=True)


# ----- shared helpers ------------------------------------------------------------------------------------------------
def format_counts(counts: dict[str, int]) -> str:
    """``{"lora_unet": 79, "lora_te": 12}`` → ``unet 79, te 12``."""
    from methods.arch import part_label

    return ", ".join(f"{part_label(k)} {v}" for k, v in counts.items()) or "none"


def _require_file(path: str, what: str) -> Path:
    file = Path(path).expanduser()
    if not file.exists():
        raise CLIError(f"{path}: no such file ({what})")
    if not file.is_file():
        raise CLIError(f"{path}: is a folder, expected a file ({what})")
    return file


def _check_output(out: Path, overwrite: bool, inputs: list[Path]) -> None:
    resolved = out.resolve()
    for source in inputs:
        if source.exists() and source.resolve() == resolved:
            raise CLIError(f"{out}: the output would replace an input file; choose another --out")
    if out.exists() and not overwrite:
        kind = "folder" if out.is_dir() else "file"
        raise CLIError(f"{out} already exists ({kind}); choose another --out or pass --overwrite")


def _format_histogram(histogram: dict[str, int]) -> str:
    if len(histogram) == 1:
        return next(iter(histogram))
    return ", ".join(f"{value} ({count})" for value, count in histogram.items())


def _short(value: str, limit: int = 160) -> str:
    text = " ".join(value.split())
    return text if len(text) <= limit else f"{text[:limit]}… ({len(value)} chars)"


# ----- inspect ----------------------------------------------------------------------------------------------------
def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="adapter .safetensors file")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--full", action="store_true", help="do not shorten long metadata values")


@command("inspect", "show what an adapter file holds: methods, modules, ranks, metadata, hashes", _inspect_arguments)
def run_inspect(args: argparse.Namespace) -> int:
    from methods.tools import inspect_adapter

    report = inspect_adapter(_require_file(args.file, "adapter file"))
    if args.json:
        _say(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    hashes = report["hashes"]
    stored = hashes["stored_sshs_model_hash"]
    hash_note = "" if stored is None else (" (matches the stored value)" if hashes["stored_hash_matches"]
                                           else f" (stored value {stored} differs: the file was edited)")
    method_text = _format_histogram(report["methods"])
    if report["dora_modules"]:
        method_text += f" + DoRA ({report['dora_modules']} modules)"
    lines = [
        f"file:          {report['file']} ({report['size_bytes'] / 1e6:.2f} MB)",
        f"method:        {method_text}" + (f"  [{report['network_module']}]" if report["network_module"] else ""),
        f"architecture:  {report['architecture'] or 'unknown'} ({report['architecture_from']})"
        + (f", {report['layout']} layout" if report["layout"] != "kohya" else ""),
        f"modules:       {report['modules']} ({format_counts(report['modules_per_part'])})",
        f"rank:          {_format_histogram(report['ranks'])}",
        f"alpha:         {_format_histogram(report['alphas'])}",
        f"dtype:         {_format_histogram(report['dtypes'])}",
        f"parameters:    {report['parameters']:,} in {report['tensors']} tensors",
        f"sha256:        {hashes['sha256']} (AutoV2 {hashes['autov2']})",
        f"addnet hash:   {hashes['sshs_model_hash']}{hash_note}; legacy {hashes['sshs_legacy_hash']}",
    ]
    if report["unknown_modules"]:
        lines.append(f"unreadable:    {len(report['unknown_modules'])} module(s) of no known method, "
                     f"e.g. {report['unknown_modules'][0]}")
    metadata = report["metadata"]
    lines.append(f"metadata:      {len(metadata)} key(s)" + (":" if metadata else ""))
    width = max((len(k) for k in metadata), default=0)
    for key, value in metadata.items():
        lines.append(f"  {key:<{width}}  {value if args.full else _short(value)}")
    _say("\n".join(lines))
    return 0


# ----- merge ------------------------------------------------------------------------------------------------------
def _model_arguments(parser: argparse.ArgumentParser) -> None:
    from methods.arch import ARCHITECTURES

    parser.add_argument("--arch", choices=tuple(ARCHITECTURES), help="check the base model's architecture")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                        help="override the base model's prediction type")
    parser.add_argument("--config", help="diffusers folder whose configs describe a single-file base of "
                                         "non-standard size")
    parser.add_argument("--tokenizer", help="tokenizer folder for a single-file base (single files carry none)")


def _merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base model: diffusers folder, .safetensors/.ckpt, or hub id")
    parser.add_argument("--adapter", action="append", required=True, metavar="FILE",
                        help="adapter file to bake in (repeat for several; merged in the order given)")
    parser.add_argument("--strength", action="append", type=float, metavar="S",
                        help="strength (default 1); once for all adapters or once per --adapter")
    parser.add_argument("--out", required=True, help="output diffusers folder, or a .safetensors single file")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp16", help="dtype of the written weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _model_arguments(parser)




@command("merge", "bake adapters (any method) into a copy of a base model", _merge_arguments)
def run_merge(args: argparse.Namespace) -> int:
    from methods.tools import bake_adapters, read_adapter

    from .models import load_pipeline, save_pipeline_folder, save_single_file

    out = Path(args.out).expanduser()
    single_file = out.suffix == ".safetensors"
    if out.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise CLIError(f"{out}: write merged models as .safetensors (or a folder); pickled {out.suffix} is not written")
    adapters = [_require_file(a, "adapter file") for a in args.adapter]
    strengths = args.strength or [1.0]
    if len(strengths) == 1:
        strengths = strengths * len(adapters)
    if len(strengths) != len(adapters):
        raise CLIError(f"give --strength once, or once per --adapter ({len(adapters)}), not {len(strengths)} times")
    base_path = Path(args.base).expanduser()
    _check_output(out, args.overwrite, [base_path, *adapters])
    for adapter in adapters:
        read_adapter(adapter)  # fails fast on files that are not adapters (or hold NaN), before the base loads

    _quiet_model_libraries()
    pipe, info = load_pipeline(args.base, arch=args.arch, prediction_type=args.prediction_type,
                               dtype=torch.float32, config=args.config, tokenizer=args.tokenizer)
    _say(f"base: {args.base} ({info.arch}, {info.prediction_type}, {info.source_kind.replace('_', ' ')})")
    for note in info.notes:
        _say(f"note: {note}")
    if single_file and getattr(pipe, "unet", None) is None:
        raise CLIError(f"{out}: SD3/Flux merges are written as diffusers folders; give --out a folder path")
    reports = bake_adapters(pipe, list(zip(adapters, strengths)), info.arch)
    for report in reports:
        ignored = f"; {report.ignored} module(s) matched no layer and were skipped" if report.ignored else ""
        if report.trigger_vectors:
            ignored += f"; the vectors of {report.trigger_vectors!r} written into the token table(s)"
        _say(f"merged {report.adapter} at strength {report.strength:g}: {report.method}, {report.modules} modules "
             f"({format_counts(report.per_part)}){ignored}")
    dtype = DTYPES[args.dtype]
    if single_file:
        merged_from = ", ".join([Path(args.base).name] + [Path(r.adapter).name for r in reports])
        extra = {"modelspec.merged_from": merged_from,
                 "rankwright.merged_adapters": json.dumps([dataclasses.asdict(r) for r in reports])}
        save_single_file(pipe, out, dtype=dtype, metadata=extra, overwrite=args.overwrite)
        _say(f"wrote {out} (single-file {info.arch} checkpoint, {args.dtype})")
    else:
        pipe.to(dtype=dtype)
        save_pipeline_folder(pipe, out, overwrite=args.overwrite)
        _say(f"wrote {out} (diffusers folder, {args.dtype})")
        if getattr(pipe, "tokenizer", None) is None:
            _say("note: the base had no tokenizer, so the folder has none; pass --tokenizer to include one")
    return 0


# ----- convert ----------------------------------------------------------------------------------------------------
def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="adapter file of any method")
    parser.add_argument("--to", choices=("lora",), default="lora", help="target format (plain LoRA)")
    parser.add_argument("--rank", type=int, required=True, help="rank for Linear and 1×1 conv modules")
    parser.add_argument("--conv-rank", type=int, help="rank for k×k conv modules (default: --rank; 0 drops them)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--base", help="base model; required for files whose ΔW depends on it (OFT, BOFT, GLoRA, "
                                       "DoRA)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="dtype of the written file (default: the input's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _model_arguments(parser)


def real_size_parts(arch: str) -> list[Any]:
    """The model parts of a real-size ``arch`` model (or SD3/Flux variant: ``sd3.5-large``) on the meta device:
    layer shapes for ``convert`` without a base model."""
    from methods.network import model_parts

    from . import dit_architectures
    from .architectures import build_text_encoders, build_unet

    if arch in dit_architectures.VARIANTS:
        family = dit_architectures.VARIANTS[arch].family
        return model_parts(dit_architectures.build_transformer(arch, meta=True),
                           dit_architectures.build_text_encoders(arch, meta=True), family)
    return model_parts(build_unet(arch, meta=True), build_text_encoders(arch, meta=True), arch)


@command("convert", "turn any adapter file into a plain LoRA file (truncated SVD of each module's ΔW)",
         _convert_arguments)
def run_convert(args: argparse.Namespace) -> int:
    from methods.tools import convert_to_lora

    from .models import load_pipeline

    file = _require_file(args.file, "adapter file")
    out = Path(args.out).expanduser()
    _check_output(out, args.overwrite, [file])
    pipe, arch = None, args.arch
    if args.base:
        _quiet_model_libraries()
        pipe, info = load_pipeline(args.base, arch=args.arch, prediction_type=args.prediction_type,
                                   dtype=torch.float32, config=args.config, tokenizer=args.tokenizer)
        arch = info.arch
        _say(f"base: {args.base} ({info.arch}, {info.source_kind.replace('_', ' ')})")
    report = convert_to_lora(file, out, args.rank, args.conv_rank, pipe=pipe, arch=arch, dtype=args.dtype,
                             overwrite=args.overwrite, templates=real_size_parts)
    conv = args.rank if args.conv_rank is None else args.conv_rank
    _say(f"converted {report.modules} modules ({_format_histogram(report.methods)}) to LoRA rank {args.rank}, "
         f"conv rank {conv}")
    if report.dropped:
        _say(f"dropped {len(report.dropped)} k×k conv module(s) (--conv-rank 0)")
    _say(f"relative error ‖ΔW−ΔW_r‖/‖ΔW‖: overall {report.relative_error:.3e}, worst {report.worst_error:.3e} "
         f"({report.worst_module})")
    if report.base_dependent:
        _say(f"note: the ΔW of {'/'.join(report.base_dependent)} modules depends on the base weights: the LoRA matches "
             "them on this base model only, and at strength 1 where a consumer applies their strength otherwise than "
             "as a scale of ΔW")
    _say(f"wrote {out}")
    return 0



# ----- train ------------------------------------------------------------------------------------------------------
def print_training_event(event: dict[str, Any]) -> None:
    """The lines ``train`` and ``compare`` print for a run's events (only the main process gets events); the text
    is :func:`trainer.events.describe`'s, the same the web UI logs."""
    from .events import describe

    line = describe(event, cli=True)
    if line:
        _say(line)


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the run's TOML file (see trainer/config.py for every key)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                        help="override one key (value in TOML syntax, e.g. train.max_steps=500); repeatable")
    parser.add_argument("--resume", metavar="STATE_DIR",
                        help="continue from a *-state folder written next to a save (output.save_state)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the training step with torch.compile (train.compile = true)")


@command("train", "train an adapter as a TOML config says (multi-GPU/CPU: torchrun or accelerate launch -m "
                  "trainer train ...)", _train_arguments)
def run_train(args: argparse.Namespace) -> int:
    from .config import TrainerConfig
    from .loop import TrainingError, train

    _quiet_model_libraries()
    overrides = [*args.overrides, *(["train.compile=true"] if args.compile else [])]
    config = TrainerConfig.load(_require_file(args.config, "config file"), overrides)
    try:
        train(config, on_event=print_training_event, resume=args.resume)
    except TrainingError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    return 0


# ----- compare ----------------------------------------------------------------------------------------------------
def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the base run's TOML (data, steps, seed, optimizer, ...)")
    parser.add_argument("--methods", default="lora,loha,lokr,oft,boft",
                        help="comma-separated methods to train (default: lora,loha,lokr,oft,boft)")
    parser.add_argument("--out", help="the report folder, which must be new (default: "
                                      "<output.dir>/<output.name>-compare, numbered when taken)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                        help="override one key of the base config for every method (as train --set); repeatable")
    parser.add_argument("--override", action="append", default=[], metavar="METHOD:SECTION.KEY=VALUE",
                        dest="method_overrides",
                        help="override one key for one method only, e.g. oft:train.learning_rate=3e-3; repeatable")
    parser.add_argument("--drift-prompts", nargs="+", metavar="PROMPT",
                        help="prompts unrelated to the training data for the prior-drift score (default: a "
                             "generic list, or the toy model's own)")
    parser.add_argument("--concept", help="toy model only: the held-out concept to score (purple, orange, checkered, "
                                          "hollow; default: the one whose trigger names a dataset folder, else "
                                          "purple)")


@command("compare", "train several methods on the same data, steps and seed; write a report with previews, loss "
                    "curves, sizes, speed, prior drift (and the toy model's concept score)", _compare_arguments)
def run_compare(args: argparse.Namespace) -> int:
    from .compare import compare, parse_method_override, resolve_methods
    from .config import TrainerConfig

    _quiet_model_libraries()
    config = TrainerConfig.load(_require_file(args.config, "config file"), args.overrides)
    methods = resolve_methods(args.methods.split(","))
    per_method: dict[str, dict[str, Any]] = {}
    for text in args.method_overrides:
        method, key, value = parse_method_override(text)
        per_method.setdefault(method, {})[key] = value

    result = compare(config, methods, Path(args.out).expanduser() if args.out else None, overrides=per_method,
                     on_event=print_training_event, drift_prompts=args.drift_prompts, concept=args.concept)
    _say()
    _say(format_table(result.table()))
    _say()
    _say(f"report: {result.markdown_path}" + (" (stopped early)" if result.stopped else ""))
    return 1 if any(run.status == "failed" for run in result.runs) else 0


# ----- regularise --------------------------------------------------------------------------------------------------
def _regularise_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the run's TOML (base model, dataset, [sample] settings)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                        help="override one key of the config (as train --set); repeatable")
    parser.add_argument("--count", type=int, help="how many images (default: one per training image)")
    parser.add_argument("--out", help="the folder (default: <dataset folder>/../regularisation/<key>, the key "
                                      "naming the base model, prompts and settings)")
    parser.add_argument("--trigger", action="append", metavar="WORD",
                        help="a word to remove from the captions (default: dataset.trigger_word, else the image "
                             "folders' class word, else the most common first tag); repeatable")


@command("regularise", "draw regularisation images with the base model from the dataset's captions without the "
                       "trigger word (cached: a rerun reuses them); use the folder as dataset.reg_dir",
         _regularise_arguments)
def run_regularise(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .config import TrainerConfig
    from .prior import regularise

    _quiet_model_libraries()
    config = TrainerConfig.load(_require_file(args.config, "config file"), args.overrides)
    with tqdm(desc="regularisation images", unit="image", dynamic_ncols=True) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        result = regularise(config, count=args.count, out=args.out, trigger=args.trigger, progress=progress)
    removed = ", ".join(repr(word) for word in result.trigger) or "nothing"
    _say(f"{len(result.paths)} image(s) in {result.folder} ({result.reused} reused); removed from the captions: "
         f"{removed}")
    _say(f"train with them: dataset.reg_dir = {json.dumps(str(result.folder))}")
    return 0


def format_table(rows: list[dict[str, str]]) -> str:
    """Rows of equal keys as aligned plain-text columns under a header."""
    columns = list(rows[0])
    widths = [max(len(column), *(len(row[column]) for row in rows)) for column in columns]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths))]
    lines += ["  ".join(row[column].ljust(width) for column, width in zip(columns, widths)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


# ----- caption / report (dataset tools) -----------------------------------------------------------------------------
def _caption_arguments(parser: argparse.ArgumentParser) -> None:
    from .captioning import CAPTION_EXTENSIONS, CAPTION_MODES, MODEL_KINDS, CaptionOptions

    defaults = CaptionOptions(model="")
    parser.add_argument("dir", help="dataset folder (its images and those of its immediate sub-folders)")
    parser.add_argument("--model", required=True,
                        help="hub id or local folder: BLIP, BLIP-2, GIT, Florence-2 (florence-community/...), an "
                             "image-classification tagger, or a WD tagger folder (model.onnx + selected_tags.csv)")
    parser.add_argument("--kind", choices=MODEL_KINDS, default=defaults.kind, help="default: from the model's files")
    parser.add_argument("--mode", choices=CAPTION_MODES, default=defaults.mode,
                        help="skip_existing (default): only images without a caption; overwrite; append")
    parser.add_argument("--ext", choices=CAPTION_EXTENSIONS, default=defaults.caption_extension, dest="extension",
                        help="caption file extension (default .txt)")
    parser.add_argument("--prefix", default="", help="text put before each caption")
    parser.add_argument("--suffix", default="", help="text put after each caption")
    parser.add_argument("--trigger", default="", dest="trigger_word", help="trigger word, first in every caption")
    parser.add_argument("--prompt", default="", help="text the caption starts with (BLIP/GIT), or Florence-2's task "
                                                     "(<CAPTION>, <DETAILED_CAPTION>, <MORE_DETAILED_CAPTION>)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--num-beams", type=int, default=defaults.num_beams)
    parser.add_argument("--threshold", type=float, default=defaults.threshold, help="taggers: general tags")
    parser.add_argument("--character-threshold", type=float, default=defaults.character_threshold,
                        help="taggers with a tag list: character tags")
    parser.add_argument("--device", default=defaults.device, help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default=defaults.dtype)


@command("caption", "write a caption file next to each image of a dataset folder with a captioner (BLIP, GIT, "
                    "Florence-2, ...) or a tagger", _caption_arguments)
def run_caption(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .captioning import CaptionError, CaptionOptions, caption_folder

    _quiet_model_libraries()
    options = CaptionOptions(
        model=args.model, kind=args.kind, mode=args.mode, caption_extension=args.extension, prefix=args.prefix,
        suffix=args.suffix, trigger_word=args.trigger_word, prompt=args.prompt, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, threshold=args.threshold,
        character_threshold=args.character_threshold, device=args.device, dtype=args.dtype)
    bar: list[Any] = []

    def report(event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "caption_loading":
            _say(f"loading {event['model']}")
        elif kind == "caption_start":
            if event["total"]:
                _say(f"captioning {event['total']} image(s) with {event['model_name']} on {event['device']} "
                     f"({event['dtype']}); {event['skipped']} already captioned")
            bar.append(tqdm(total=event["total"], unit="image", disable=not event["total"]))
        elif kind == "caption_progress":
            bar[0].update(event["done"] - bar[0].n)
        elif kind == "caption_error":
            tqdm.write(f"warning: {event['path']}: {event['reason']}")

    try:
        result = caption_folder(args.dir, options, on_event=report)
    except CaptionError as error:
        raise CLIError(str(error)) from None
    finally:
        for progress in bar:
            progress.close()
    _say(f"wrote {len(result.written)} caption(s) in {result.seconds:.1f} s (model loaded in "
         f"{result.load_seconds:.1f} s); {len(result.failed)} failed; {len(result.skipped)} skipped (already "
         "captioned)")
    return 0


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", nargs="?", help="dataset folder (default options), instead of --config")
    parser.add_argument("--config", help="the run's TOML: its [dataset] section, train.seed and train.batch_size")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                        help="override one key, e.g. dataset.resolution=768; repeatable")
    parser.add_argument("--tokenizer", help="CLIP tokenizer folder for exact token counts (default: the config's "
                                            "model.tokenizer or model.base if found locally, else an approximation)")
    parser.add_argument("--out", help="folder for dataset_report.json and dataset_report.png (default: "
                                      "<output.dir>/<output.name>-dataset-report, numbered when taken)")


@command("report", "show what training will do with each image: buckets, crops, upscales, captions and their "
                   "token counts, duplicates; writes a JSON report and a contact sheet", _report_arguments)
def run_report(args: argparse.Namespace) -> int:
    from .config import TrainerConfig
    from .dataset_report import build_report, check_out_dir, token_counter, write_report
    from .loop import unique_path

    if bool(args.dir) == bool(args.config):
        raise CLIError("give a dataset folder or --config X.toml (one of them)")
    if args.config:
        config = TrainerConfig.load(_require_file(args.config, "config file"), args.overrides)
    else:
        config = TrainerConfig.from_dict({"dataset": {"dir": args.dir}}).with_overrides(args.overrides)
    counter = token_counter(None)
    for where, subfolder in ((args.tokenizer, None), (config.model.tokenizer, None), (config.model.base, "tokenizer")):
        if where:
            counter = token_counter(where, subfolder)
            if counter.exact:
                break
    out = Path(args.out) if args.out else unique_path(Path(config.output.dir).expanduser()
                                                      / f"{config.output.name}-dataset-report")
    try:
        out = check_out_dir(out, config.dataset)
        report = build_report(config.dataset, seed=config.train.seed, batch_size=config.train.batch_size,
                              tokenizer=counter)
    except ValueError as error:
        raise CLIError(str(error)) from None
    _say(report.format_text())
    json_path, png_path = write_report(report, out)
    _say(f"\nwrote {json_path} and {png_path}")
    return 0
