"""Method comparison: train several adapter methods on the same data, steps and seed, and report them side by side.

``compare(config, ["lora", "loha", ...], out_dir)`` derives one config per method from ``config`` (the method, only
the ``[network]`` options that method accepts, optional per-method overrides; everything else — data, steps,
seed, optimizer — unchanged) and trains each with :func:`trainer.loop.train` into ``out_dir/<method>/``. Then it
loads the base model once and renders, for the same prompts and seeds, the base model and every trained adapter:

* a preview grid (``grid.png``: first row the base model, then one row per method, one column per prompt);
* the **prior drift** of each adapter: for prompts unrelated to the training data, the mean absolute pixel
  difference between images with and without the adapter, divided by that between the base model's images of
  the same prompts at two different seeds (natural variation). 0 = unchanged, about 1 = as different as a new
  seed;
* the **concept score** where one is defined: for the embedded toy model (a base folder with
  ``rankwright_toy.json``), the fraction of a held-out concept's trigger prompts (:class:`trainer.toy.Concept`:
  the demo's purple, or the one named by ``concept``/``--concept`` or by the dataset's ``N_trigger`` folder) whose
  images show it; next to it, from the same images, **trigger subject kept** (the fraction drawing the shape the
  prompt asks for) and, from the drift prompts' images, **prompts kept** (the fraction drawing the colour, shape and
  background asked for, over the base model's fraction: 1 = as well as the base).

With the loss curves (``losses.png``), trainable parameters, file size and time per step (training steps only:
model loading, caching and saving excluded) it writes ``report.json`` and ``report.md``. ``out_dir`` must be new
(or empty): a comparison never replaces an earlier one.

Events: each run's training events pass through ``on_event`` (and ``out_dir/events.jsonl``) with ``method`` added,
between ``compare_start``, ``compare_method_start``/``compare_method_done`` per method, ``compare_render`` per
rendered row and ``compare_done`` (with the report's paths). A stop (``stop.request()``, SIGINT/SIGTERM during a
run, or a ``STOP`` file in ``out_dir``) ends the current run with a save and skips the remaining methods; the
methods that finished are still rendered and reported. A stop asked for while rendering (also a second one) ends
the rendering within a denoising step; the report then lists the runs without grid and scores. ``phase`` events
(:class:`trainer.events.Phase`) count the rendering's denoising steps, with an ETA.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from methods.base import ConfigError

from .config import NetworkSection, TrainerConfig, _toml_value, apply_override
from .events import EventCallback, EventLog, StopSignal
from .prior import GENERIC_PROMPTS, record_drift

DEFAULT_METHODS = ("lora", "loha", "lokr", "oft", "boft")
GENERIC_DRIFT_PROMPTS = GENERIC_PROMPTS  # what an adapter should leave alone
TOY_MARKER = "rankwright_toy.json"
DRIFT_SEED_OFFSET = 100_003  # the second seed of each drift prompt (natural variation), far from the first
PREVIEW_PROMPTS_FROM_CAPTIONS = 4  # prompts taken from the dataset's captions when [sample] has none
FINAL_LOSS_WINDOW = 10  # the final loss is the mean of this many last steps (single steps are noisy)
REPORT_JSON, REPORT_MD, GRID_PNG, LOSS_PNG, STOP_FILE = "report.json", "report.md", "grid.png", "losses.png", "STOP"
NETWORK_KEYS = {f.name for f in dataclasses.fields(NetworkSection)} - {"options"}
OPTIONS_KEY = "network.options"  # an override replacing the base config's method options as a whole


# ================================================================================================ configs
def resolve_methods(methods: Sequence[str]) -> list[str]:
    """Canonical method names (aliases resolved, duplicates dropped); ConfigError naming the available ones."""
    from methods.registry import get_method

    names = [name.strip() for name in methods if name and name.strip()]
    if not names:
        from methods.registry import available_methods

        raise ConfigError(f"no method to compare; choose from: {', '.join(available_methods())}")
    return list(dict.fromkeys(get_method(name).method for name in names))


@dataclasses.dataclass
class MethodConfig:
    method: str
    config: TrainerConfig
    dropped_options: list[str]  # base [network] options this method does not accept
    overrides: dict[str, Any]  # "section.key" → value, applied after the base config


def method_config(base: TrainerConfig, method: str, out_dir: str | Path,
                  overrides: Mapping[str, Any] | None = None) -> MethodConfig:
    """``base`` as ``method`` would train it in a comparison, writing into ``out_dir/<method>/``.

    The base ``[network]`` options this method does not accept are dropped (OFT has no rank); ``overrides``
    (``{"train.learning_rate": 3e-3, "network.block_size": 8}``) come last. ``"network.options": {...}`` in
    ``overrides`` stands for the base options (the UI passes each method's own options from its form this way).
    Per-run previews are off: the comparison renders every method with the same prompts afterwards, and previews
    would inflate the step time.
    """
    from methods.registry import get_method

    method_class = get_method(method)
    accepted = {field.name for field in dataclasses.fields(method_class.config_class)}
    data = base.to_dict()
    data["sample"].update(every_n_steps=0, prompts=[])
    overrides = dict(overrides or {})
    options = overrides.get(OPTIONS_KEY, base.network.options)
    if not isinstance(options, Mapping):
        raise ConfigError(f"{method}: {OPTIONS_KEY} must be a table of method options, got {options!r}")
    data["network"] = {**{key: value for key, value in data["network"].items() if key in NETWORK_KEYS},
                       **{key: value for key, value in options.items() if key in accepted},
                       "method": method_class.method}
    for key, value in overrides.items():
        if key == OPTIONS_KEY:
            continue
        try:
            apply_override(data, f"{key}={_toml_value(value)}")
        except TypeError:
            raise ConfigError(f"{method}: override {key} = {value!r} is not a TOML value") from None
    data["output"].update(dir=str(Path(out_dir) / method_class.method),
                          name=f"{base.output.name}_{method_class.method}")
    try:
        config = TrainerConfig.from_dict(data)
    except ConfigError as error:
        raise ConfigError(f"{method_class.method}: {error}") from None
    return MethodConfig(method_class.method, config, sorted(set(options) - accepted), overrides)


def parse_method_override(text: str) -> tuple[str, str, Any]:
    """``oft:train.learning_rate=3e-3`` → ("oft", "train.learning_rate", 0.003); values are TOML, as for --set."""
    method, colon, assignment = text.partition(":")
    key, equals, _ = assignment.partition("=")
    if not colon or not equals or not method.strip() or "." not in key:
        raise ConfigError(f"--override {text!r}: expected METHOD:section.key=value, e.g. oft:train.learning_rate=3e-3")
    parsed: dict[str, Any] = {}
    apply_override(parsed, assignment)
    value: Any = parsed
    for part in key.strip().split("."):
        value = value[part]
    return method.strip(), key.strip(), value


# ================================================================================================ scores
def _pixels(images: Sequence[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image.convert("RGB"), dtype=np.float64) for image in images])


def mean_abs_difference(first: Sequence[Image.Image], second: Sequence[Image.Image]) -> float:
    """Mean absolute pixel difference (0–255) of two equally long lists of equally sized images."""
    if len(first) != len(second) or not first:
        raise ValueError(f"need two equally long, non-empty image lists, got {len(first)} and {len(second)}")
    return float(np.abs(_pixels(first) - _pixels(second)).mean())


def prior_drift(base: Sequence[Image.Image], adapted: Sequence[Image.Image],
                base_other_seed: Sequence[Image.Image]) -> float | None:
    """How much an adapter changes images of unrelated prompts, relative to changing the seed.

    ``base``/``adapted``: the same prompts and seeds without/with the adapter; ``base_other_seed``: the base model
    on the same prompts at other seeds. 0 = unchanged, ~1 = as different as a new seed; None when the base model
    draws the same image whatever the seed (the scale is undefined).
    """
    natural = mean_abs_difference(base, base_other_seed)
    if natural == 0:
        return None
    return mean_abs_difference(base, adapted) / natural


def is_toy_model(base: str) -> bool:
    """The embedded toy model (trainer/toy.py) is a diffusers folder with ``rankwright_toy.json``."""
    return (Path(base).expanduser() / TOY_MARKER).is_file()


# ================================================================================================ rendering
@dataclasses.dataclass
class RenderPlan:
    """What each row (the base model, then each adapter) renders, with which options."""

    preview_prompts: list[str]
    drift_prompts: list[str]
    concept_prompts: list[str] | None  # None: no concept score is defined for this base model
    options: dict[str, Any]  # keyword arguments of trainer.sampling.render_previews (seed included)
    strength: float = 1.0
    concept: str | None = None  # the toy model's held-out concept scored (trainer.toy.CONCEPTS)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def render_plan(config: TrainerConfig, drift_prompts: Sequence[str] | None = None,
                strength: float = 1.0, concept: str | None = None) -> RenderPlan:
    """Prompts and options from the config's ``[sample]`` section (toy model: its own prompts, at its 64 px).

    ``concept``: the toy concept to score (default: the one whose trigger names a dataset folder, else purple);
    ConfigError when it is unknown or the base model is not the toy model."""
    from .sampling import preview_options

    options = {**preview_options(config.sample, config.dataset.resolution), "clip_skip": config.train.clip_skip}
    if config.dit.t5_max_length:  # SD3/Flux: render with the T5 length the adapters were trained with
        options["max_sequence_length"] = config.dit.t5_max_length
    concept_prompts = None
    default_drift: Sequence[str] = GENERIC_DRIFT_PROMPTS
    previews = list(config.sample.prompts)
    if is_toy_model(config.model.base):
        from . import toy

        try:
            scored = toy.get_concept(concept) if concept else (toy.concept_for_dataset(config.dataset.dir)
                                                               or toy.CONCEPTS[toy.HELD_OUT_COLOUR])
        except ValueError as error:
            raise ConfigError(f"--concept: {error}") from None
        options.update(width=toy.RESOLUTION, height=toy.RESOLUTION)
        concept_prompts = scored.prompts
        default_drift = toy.EVAL_PROMPTS
        if not any(scored.trigger in prompt.replace(",", " ").split() for prompt in previews):
            # the preset's previews name another concept's trigger (toy_demo.toml: purple's): show this one's
            previews = concept_prompts[:len(concept_prompts) // 2]
        concept = scored.name
    elif concept:
        raise ConfigError(f"concept {concept!r}: concept scores exist for the toy model only (presets/toy/model); "
                          "leave the concept out for this base model")
    return RenderPlan(previews or caption_prompts(config), list(drift_prompts or default_drift), concept_prompts,
                      options, float(strength), concept)


def caption_prompts(config: TrainerConfig, count: int = PREVIEW_PROMPTS_FROM_CAPTIONS) -> list[str]:
    """The first distinct training captions, trigger word included as training puts it."""
    from .dataset import process_caption, scan_dataset

    try:
        items = scan_dataset(config.dataset, seed=config.train.seed).train_items
    except ValueError as error:
        raise ConfigError(str(error)) from error
    captions = (process_caption(item.caption, random.Random(0), trigger_word=config.dataset.trigger_word)
                for item in items)
    prompts = list(dict.fromkeys(caption for caption in captions if caption))[:count]
    return prompts or [config.dataset.trigger_word or "a photo"]


@dataclasses.dataclass
class RowImages:
    previews: list[Image.Image]
    drift: list[Image.Image]
    concept: list[Image.Image] | None


def render_row(pipe: Any, plan: RenderPlan, seed_offset: int = 0) -> RowImages:
    """Everything one row needs, rendered with the pipeline as it is (with or without an adapter applied)."""
    from .sampling import render_previews

    options = {**plan.options, "seed": plan.options["seed"] + seed_offset}
    previews = render_previews(pipe, plan.preview_prompts, **options)
    concept = None
    if plan.concept_prompts is not None:
        same = plan.concept_prompts == plan.preview_prompts
        concept = previews if same else render_previews(pipe, plan.concept_prompts, **options)
    return RowImages(previews, render_previews(pipe, plan.drift_prompts, **options), concept)


def rendered_images(plan: RenderPlan, adapters: int) -> int:
    """How many images :func:`evaluate_adapters` renders: per row (the base model, then each adapter) what
    :func:`render_row` renders, and the base model's drift prompts once more at another seed."""
    per_row = len(plan.preview_prompts) + len(plan.drift_prompts)
    if plan.concept_prompts is not None and plan.concept_prompts != plan.preview_prompts:
        per_row += len(plan.concept_prompts)
    return per_row * (adapters + 1) + len(plan.drift_prompts)


@dataclasses.dataclass
class Evaluation:
    grid: Image.Image
    natural_variation: float  # mean |base seed A − base seed B| over the drift prompts (0–255)
    prior_drift: dict[str, float | None]
    concept_score: dict[str, float | None]  # "base" too
    subject_kept: dict[str, float | None]  # "base" too: trigger prompts drawing their shape
    prompt_rate: dict[str, float | None]  # "base" too: drift prompts drawing colour, shape and background asked for


def evaluate_adapters(pipe: Any, adapters: Mapping[str, str | Path], plan: RenderPlan,
                      on_row: Any = None) -> Evaluation:
    """Render the base model, then each adapter (applied at ``plan.strength``, removed again), and score them.

    ``adapters`` is ``row label → adapter file``; ``on_row(label, index, total)`` is called before each row.
    """
    from methods.apply import apply_adapter

    from .sampling import make_grid, render_previews

    labels = ["base", *adapters]
    report = on_row or (lambda label, index, total: None)
    report("base", 0, len(labels))
    base = render_row(pipe, plan)
    other_seed = render_previews(pipe, plan.drift_prompts,
                                 **{**plan.options, "seed": plan.options["seed"] + DRIFT_SEED_OFFSET})
    rows = {"base": base}
    for index, (label, path) in enumerate(adapters.items(), start=1):
        report(label, index, len(labels))
        with apply_adapter(pipe, path, plan.strength):
            rows[label] = render_row(pipe, plan)
    grid = make_grid(rows=[rows[label].previews for label in labels], row_labels=labels,
                     column_labels=plan.preview_prompts)
    drift = {label: prior_drift(base.drift, rows[label].drift, other_seed) for label in adapters}
    concept: dict[str, float | None] = dict.fromkeys(rows)
    subject, rate = dict(concept), dict(concept)
    if plan.concept_prompts is not None:
        from . import toy

        scored = toy.get_concept(plan.concept or toy.HELD_OUT_COLOUR)
        for label, row in rows.items():
            concept[label] = scored.score(row.concept)
            subject[label] = toy.prompt_match(row.concept, plan.concept_prompts)["shape"]
            rate[label] = toy.prompt_match(row.drift, plan.drift_prompts)["all"]
    return Evaluation(grid, mean_abs_difference(base.drift, other_seed), drift, concept, subject, rate)


def load_base_pipeline(config: TrainerConfig) -> Any:
    """The config's base model (and replacement VAE) in fp32 on the GPU if there is one, ready to render."""
    from .loop import load_vae
    from .models import load_pipeline

    model = config.model
    pipe, _ = load_pipeline(model.base, arch=None if model.arch == "auto" else model.arch,
                            prediction_type=None if model.prediction_type == "auto" else model.prediction_type,
                            tokenizer=model.tokenizer or None, config=model.config or None)
    if model.vae:
        pipe.vae = load_vae(model.vae, pipe.vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cuda" if torch.cuda.is_available() else "cpu")


# ================================================================================================ report
@dataclasses.dataclass
class MethodRun:
    method: str
    status: str  # done, stopped, failed, skipped
    steps: int = 0
    total_steps: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)
    trainable_parameters: int | None = None
    output_file: str | None = None
    file_bytes: int | None = None
    seconds_per_step: float | None = None
    concept_score: float | None = None
    subject_kept: float | None = None  # toy model: trigger prompts drawing the shape they ask for
    prompts_kept: float | None = None  # toy model: drift prompts drawn as asked, relative to the base model's rate
    prior_drift: float | None = None
    prior_ratio: float | None = None  # the last prior loss ratio of the run (train.prior_every_n_steps)
    best_checkpoint: str | None = None  # checkpoints.json's pick
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    dropped_options: list[str] = dataclasses.field(default_factory=list)
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    message: str = ""

    @property
    def final_loss(self) -> float | None:
        tail = self.losses[-FINAL_LOSS_WINDOW:]
        return sum(tail) / len(tail) if tail else None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "final_loss": self.final_loss}

    def row(self) -> dict[str, str]:
        """This run's line of the report table, as display strings."""
        status = self.status if self.status != "stopped" else f"stopped at step {self.steps}/{self.total_steps}"
        return {"method": self.method,
                "trainable params": f"{self.trainable_parameters:,}" if self.trainable_parameters else "—",
                "file size": _format_size(self.file_bytes),
                "s/step": f"{self.seconds_per_step:.3g}" if self.seconds_per_step else "—",
                "final loss": f"{self.final_loss:.4f}" if self.final_loss is not None else "—",
                "concept score": _score(self.concept_score), "prior drift": _score(self.prior_drift),
                "prior ratio": _score(self.prior_ratio), "trigger subject": _percent(self.subject_kept),
                "prompts kept": _score(self.prompts_kept),
                "status": status + (f": {self.message}" if self.message else "")}


@dataclasses.dataclass
class CompareReport:
    folder: Path
    runs: list[MethodRun]
    settings: dict[str, Any]  # base model, steps, seed, prompts, render options, natural variation
    base_concept_score: float | None = None
    base_subject_kept: float | None = None
    base_prompt_rate: float | None = None  # the base model's rate behind prompts kept
    grid: Path | None = None
    loss_plot: Path | None = None
    stopped: bool = False

    @property
    def json_path(self) -> Path:
        return self.folder / REPORT_JSON

    @property
    def markdown_path(self) -> Path:
        return self.folder / REPORT_MD

    def to_dict(self) -> dict[str, Any]:
        relative = {name: path.name if path else None for name, path in (("grid", self.grid),
                                                                           ("loss_plot", self.loss_plot))}
        return {"folder": str(self.folder), "stopped": self.stopped, **relative, "settings": self.settings,
                "base": {"concept_score": self.base_concept_score, "subject_kept": self.base_subject_kept,
                         "prompt_rate": self.base_prompt_rate},
                "methods": [run.to_dict() for run in self.runs]}

    def table(self) -> list[dict[str, str]]:
        """One row of display strings per method (the base model first), as report.md, the CLI and the UI show."""
        base = {"method": "base model", "trainable params": "—", "file size": "—", "s/step": "—",
                "final loss": "—", "concept score": _score(self.base_concept_score), "prior drift": "0 (reference)",
                "prior ratio": "1 (reference)" if any(r.prior_ratio is not None for r in self.runs) else "—",
                "trigger subject": _percent(self.base_subject_kept),
                "prompts kept": "—" if self.base_prompt_rate is None else
                f"1 (reference: {_percent(self.base_prompt_rate)} drawn as asked)", "status": ""}
        return [base, *(run.row() for run in self.runs)]

    def markdown(self) -> str:
        settings = self.settings
        rows = self.table()
        lines = ["# Method comparison", "",
                 f"Base model `{settings['base_model']}`, dataset `{settings['dataset']}`, "
                 f"{settings['steps']} steps per method, seed {settings['seed']}."
                 + (" **Stopped early**: methods not trained are marked skipped." if self.stopped else ""), "",
                 "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(row.values()) + " |" for row in rows]
        lines += ["", f"s/step: training steps only (model loading, caching and saving excluded). Final loss: mean "
                  f"of the last {FINAL_LOSS_WINDOW} steps. Prior drift: mean pixel change of "
                  f"{len(settings['drift_prompts'])} prompts unrelated to the training data with the adapter at "
                  f"strength {settings['strength']:g}, relative to the change from a new seed (0 = unchanged, "
                  "1 = as different as a new seed)."]
        if any(run.prior_ratio is not None for run in self.runs):
            lines.append("Prior ratio: the adapted model's denoising loss on the base model's own images of unrelated "
                         "prompts over the base model's, at the run's last measure (train.prior_every_n_steps; 1 = "
                         "unchanged).")
        if self.base_concept_score is not None:
            lines.append(f"Concept score: fraction of the toy model's trigger-word prompts whose images show the "
                         f"held-out concept `{settings.get('concept')}`. Trigger subject: fraction of those images "
                         "drawing the shape the prompt asks for. Prompts kept: fraction of the drift prompts' images "
                         "drawing the colour, shape and background asked for, over the base model's fraction.")
        if self.grid:
            lines += ["", "## Previews", "", "Rows: the base model, then each method; the same prompt and seed in each "
                      "column.", "", f"![previews]({self.grid.name})"]
        if self.loss_plot:
            lines += ["", "## Loss", "", f"![loss curves]({self.loss_plot.name})"]
        lines += ["", "## Settings per method", ""]
        for run in self.runs:
            details = [f"options {json.dumps(run.options)}"]
            if run.dropped_options:
                details.append(f"dropped (not accepted) {', '.join(run.dropped_options)}")
            if run.overrides:
                details.append(f"overrides {json.dumps(run.overrides)}")
            if run.output_file:
                details.append(f"file `{Path(run.output_file).relative_to(self.folder)}`")
            lines.append(f"- **{run.method}**: " + "; ".join(details))
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        from .loop import write_text_atomic

        write_text_atomic(self.json_path, json.dumps(self.to_dict(), indent=1, default=str) + "\n")
        write_text_atomic(self.markdown_path, self.markdown())


def _score(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def _format_size(size: int | None) -> str:
    if not size:
        return "—"
    return f"{size / 1e6:.2f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"


# ================================================================================================ running
class _RunStop(StopSignal):
    """The stop signal of one run: also set when the whole comparison is asked to stop."""

    def __init__(self, outer: StopSignal):
        super().__init__()
        self.outer = outer

    def requested(self) -> bool:
        if not self._event.is_set() and self.outer.requested():
            self.request(self.outer.reason)
        return super().requested()


class _RunRecorder:
    """Passes a run's events on, tagged with its method, and keeps what the report needs from them."""

    def __init__(self, events: EventLog, method: str):
        self.events, self.method = events, method
        self.ready: dict[str, Any] = {}
        self.last_step_time: float | None = None
        self.prior_ratio: float | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        if event["event"] == "ready":
            self.ready = event
        elif event["event"] == "step":
            self.last_step_time = event["time"]
        elif event["event"] == "prior":
            self.prior_ratio = event["ratio"]
        fields = {key: value for key, value in event.items() if key != "event"}
        self.events.emit(event["event"], **{**fields, "method": self.method})

    def seconds_per_step(self, steps: int) -> float | None:
        """From "ready" (model loaded, latents cached) to the last step: no loading, no final save."""
        if not steps or not self.ready or self.last_step_time is None:
            return None
        return max(self.last_step_time - self.ready["time"], 0.0) / steps


def _prepare_folder(out_dir: Path) -> None:
    """A new or empty folder; a STOP file there is a stop asked for before the comparison started (kept)."""
    if out_dir.exists() and (not out_dir.is_dir() or any(p.name != STOP_FILE for p in out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not empty; a comparison never replaces an earlier "
                              "one: choose another output folder")
    out_dir.mkdir(parents=True, exist_ok=True)


def default_out_dir(config: TrainerConfig) -> Path:
    """``<output.dir>/<output.name>-compare``, or ``…-compare-1``, ``-2``… when taken."""
    from .loop import unique_path

    return unique_path(Path(config.output.dir).expanduser() / f"{config.output.name}-compare")


def compare(config: TrainerConfig, methods: Sequence[str] = DEFAULT_METHODS, out_dir: str | Path | None = None,
            overrides: Mapping[str, Mapping[str, Any]] | None = None, on_event: EventCallback | None = None,
            stop: StopSignal | None = None, drift_prompts: Sequence[str] | None = None,
            strength: float = 1.0, concept: str | None = None) -> CompareReport:
    """Train each method of ``methods`` as ``config`` says and write the comparison report into ``out_dir``.

    ``overrides``: per method, ``{"section.key": value}`` applied to that method's config only. Returns the
    report (also written as ``report.json``/``report.md``). Every config is checked before the first run.
    ``concept``: the toy model's held-out concept to score (see :func:`render_plan`).
    """
    methods = resolve_methods(methods)
    overrides = {resolve_methods([name])[0]: dict(values) for name, values in (overrides or {}).items()}
    strays = sorted(set(overrides) - set(methods))
    if strays:
        raise ConfigError(f"overrides for {', '.join(strays)}, which is not compared (methods: {', '.join(methods)})")
    out_dir = Path(out_dir).expanduser() if out_dir is not None else default_out_dir(config)
    configs = [method_config(config, method, out_dir, overrides.get(method)) for method in methods]
    plan = render_plan(config, drift_prompts, strength, concept)
    _prepare_folder(out_dir)
    stop = stop or StopSignal()
    stop.stop_file = out_dir / STOP_FILE
    events = EventLog(out_dir, [on_event] if on_event else [])
    settings = {"base_model": config.model.base, "dataset": config.dataset.dir, "steps": config.train.max_steps,
                "epochs": config.train.epochs, "seed": config.train.seed, "methods": methods, **plan.to_dict()}
    events.emit("compare_start", folder=str(out_dir), methods=methods, steps=config.train.max_steps,
                base=config.model.base)
    try:
        runs = [_train_method(entry, index, len(configs), events, stop) for index, entry in enumerate(configs)]
        report = CompareReport(out_dir, runs, settings, stopped=stop.requested())
        _evaluate(config, report, plan, events, stop)
        losses = {run.method: run.losses for run in runs if run.losses}
        if losses:
            from .plots import loss_curves_png

            report.loss_plot = out_dir / LOSS_PNG
            loss_curves_png(losses, report.loss_plot, title="training loss per method")
        report.write()
    except BaseException as error:
        events.emit("error", message=" ".join(str(error).split()) or type(error).__name__, kind=type(error).__name__)
        raise
    events.emit("compare_done", report=str(report.json_path), markdown=str(report.markdown_path),
                grid=str(report.grid) if report.grid else None,
                loss_plot=str(report.loss_plot) if report.loss_plot else None, stopped=report.stopped,
                table=report.table())
    return report


def _train_method(entry: MethodConfig, index: int, count: int, events: EventLog, stop: StopSignal) -> MethodRun:
    from .loop import TrainingError, train

    run = MethodRun(entry.method, "skipped", total_steps=entry.config.train.max_steps,
                    options=entry.config.network.options, dropped_options=entry.dropped_options,
                    overrides=entry.overrides)
    if stop.requested():
        events.emit("compare_method_done", **_summary(run, index, count))
        return run
    events.emit("compare_method_start", method=entry.method, index=index, count=count,
                folder=entry.config.output.dir, dropped_options=entry.dropped_options, overrides=entry.overrides)
    recorder = _RunRecorder(events, entry.method)
    run_stop = _RunStop(stop)
    try:
        result = train(entry.config, on_event=recorder, stop=run_stop)
    except TrainingError as error:  # this method diverged: the others may still train
        run.status, run.message = "failed", " ".join(str(error).split())
    else:
        # train.prior_stop_ratio ending a run is its own rule: the run is done and the comparison goes on
        run.status = "stopped" if result.stopped_early and not result.prior_stop else "done"
        run.message = result.reason if result.prior_stop else ""
        run.steps, run.losses = result.steps, list(result.losses)
        run.best_checkpoint = str(result.best_checkpoint) if result.best_checkpoint else None
        if result.output_file is not None:
            run.output_file, run.file_bytes = str(result.output_file), result.output_file.stat().st_size
        if run.status == "stopped":  # e.g. SIGINT during this run: the remaining methods are skipped too
            stop.request(run_stop.reason)
    run.trainable_parameters = recorder.ready.get("trainable_parameters")
    run.total_steps = recorder.ready.get("total_steps", run.total_steps)
    run.seconds_per_step = recorder.seconds_per_step(run.steps)
    run.prior_ratio = recorder.prior_ratio
    events.emit("compare_method_done", **_summary(run, index, count))
    _free_memory()
    return run


def _summary(run: MethodRun, index: int, count: int) -> dict[str, Any]:
    fields = {key: value for key, value in run.to_dict().items() if key != "losses"}
    return {**fields, "index": index, "count": count, "row": run.row()}


def _evaluate(config: TrainerConfig, report: CompareReport, plan: RenderPlan, events: EventLog,
              stop: StopSignal) -> None:
    """Render and score the methods that finished (a stopped run is half-trained: shown in the table only).

    A stop asked for from here on (also a second one, after a stop during training) ends the rendering within a
    denoising step: the report then has no grid and no scores."""
    from .events import Phase, PhaseProgress
    from .sampling import RenderStopped, on_denoising_step

    finished = {run.method: run.output_file for run in report.runs if run.status == "done" and run.output_file}
    if not finished:
        return
    mark = stop.mark()
    events.emit(Phase(phase="loading", detail="the base model, to render the comparison"))
    pipe = load_base_pipeline(config)

    def on_row(label: str, index: int, total: int) -> None:
        events.emit("compare_render", row=label, index=index, total=total)

    images = rendered_images(plan, len(finished))
    counter = PhaseProgress(events.emit, "rendering", images * plan.options["steps"], "denoising steps",
                            detail=f"{images} images", should_stop=lambda: stop.requested_since(mark),
                            stopped=RenderStopped)
    try:
        with on_denoising_step(counter.advance):
            evaluation = evaluate_adapters(pipe, finished, plan, on_row)
    except RenderStopped:
        report.stopped = True
        events.emit("warning", message="rendering stopped: the report has no preview grid and no scores")
        return
    finally:
        del pipe
        _free_memory()
    events.emit(Phase(phase="scoring", detail="prior drift and the grid"))
    from .sampling import save_png_unique

    rows = {"rows": json.dumps(["base", *finished]), "prompts": json.dumps(plan.preview_prompts)}
    report.grid = save_png_unique(evaluation.grid, report.folder / GRID_PNG, rows)
    report.settings["natural_variation"] = evaluation.natural_variation
    report.base_concept_score = evaluation.concept_score["base"]
    report.base_subject_kept = evaluation.subject_kept["base"]
    report.base_prompt_rate = base_rate = evaluation.prompt_rate["base"]
    for run in report.runs:
        if run.method in finished:
            run.prior_drift = evaluation.prior_drift[run.method]
            run.concept_score = evaluation.concept_score[run.method]
            run.subject_kept = evaluation.subject_kept[run.method]
            rate = evaluation.prompt_rate[run.method]
            run.prompts_kept = rate / base_rate if rate is not None and base_rate else None
            record_drift(run.output_file, run.prior_drift)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


__all__ = ["DEFAULT_METHODS", "CompareReport", "MethodRun", "RenderPlan", "compare", "evaluate_adapters",
           "mean_abs_difference", "method_config", "parse_method_override", "prior_drift", "render_plan",
           "resolve_methods"]
