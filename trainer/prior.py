"""Forgetting: how much an adapter changes what the base model already knew, measured while training.

* **Prior set**: the images the metric is measured on — the dataset's regularisation images when it has some,
  else ``train.prior_images`` images the *base* model draws for ``train.prior_prompts`` (unrelated prompts by
  default). Generated images are cached under ``<output.dir>/cache/prior/<key>`` (the key covers the base model,
  prompts, size, sampler and seed) and reused by later runs.
* **Prior loss ratio**: the adapted model's denoising loss on the prior set divided by the base model's loss on the
  same latents, noise and timesteps (fixed per image, so the value is comparable from step to step). 1.0 = the
  base model's behaviour is unchanged there; it rises as the adapter bleeds into prompts it should leave alone.
  The base model's loss is the same network with every adapter at multiplier 0, which runs the untouched layers.
* **Checkpoint pick**: ``checkpoints.json`` in the output folder lists every save with the concept validation loss
  and the prior loss ratio at its step; :func:`best_checkpoint` picks the trade-off.
* **Regularisation images** (``python -m trainer regularise``): the base model draws the dataset's captions with
  the trigger word removed (:func:`regularisation_prompts`), cached the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from methods.files import atomic_write_bytes, write_text_atomic

from .events import log

CHECKPOINTS_FILE = "checkpoints.json"
# Unrelated to any particular training set: what an adapter should leave alone (also compare's drift prompts).
GENERIC_PROMPTS = (
    "a photo of a mountain lake at sunrise",
    "a bowl of fruit on a wooden table",
    "a city street at night, neon lights",
    "portrait of an old fisherman, oil painting",
    "a red sports car on a desert road",
    "a cat sleeping on a sofa",
)


# ================================================================================================ prompts
def default_prompts(base: str) -> list[str]:
    """Unrelated prompts for ``base``: the toy model's own evaluation prompts (it knows no other words), else
    :data:`GENERIC_PROMPTS`."""
    from .compare import is_toy_model

    if is_toy_model(base):
        from . import toy

        return list(toy.EVAL_PROMPTS)
    return list(GENERIC_PROMPTS)


def prior_prompts(config: Any) -> list[str]:
    """One prompt per prior image: train.prior_prompts (or the defaults), cycled to train.prior_images."""
    prompts = list(config.train.prior_prompts) or default_prompts(config.model.base)
    return [prompts[index % len(prompts)] for index in range(config.train.prior_images)]


def named_trigger_words(dataset: Any, items: Sequence[Any]) -> list[str]:
    """The words the user named the concept with: dataset.trigger_word (and the subsets'), else the class words of
    the image folders ("10_zq" → "zq") that the captions use; [] when neither says."""
    from .dataset import _contains_word, parse_folder_name

    words = [word for word in [dataset.trigger_word, *(s.trigger_word or "" for s in dataset.subsets)] if word.strip()]
    if words:
        return list(dict.fromkeys(word.strip() for word in words))
    captions = [item.caption for item in items if item.caption]
    folders = {parse_folder_name(item.folder)[1].strip() for item in items}
    return sorted(word for word in folders if word and any(_contains_word(c, word) for c in captions))


def trigger_words(dataset: Any, items: Sequence[Any]) -> list[str]:
    """The words that name the concept: :func:`named_trigger_words`, else the most common first caption tag."""
    from .dataset import split_tags

    words = named_trigger_words(dataset, items)
    if words:
        return words
    firsts = Counter(tags[0] for tags in (split_tags(item.caption) for item in items if item.caption) if tags)
    return [firsts.most_common(1)[0][0]] if firsts else []


def remove_words(caption: str, words: Sequence[str]) -> str:
    """``caption`` without ``words``: as tags they go whole, inside prose the word alone (spaces tidied)."""
    from .dataset import split_tags

    tags = [tag for tag in split_tags(caption) if tag not in words]
    text = ", ".join(tags)
    for word in words:
        text = re.sub(rf"(?<!\w){re.escape(word)}(?!\w)", "", text)
    text = re.sub(r"\s+", " ", text)
    return re.sub(r"\s*,(\s*,)*\s*", ", ", text).strip(" ,")


def regularisation_prompts(config: Any, items: Sequence[Any], count: int | None = None,
                           trigger: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """(one prompt per image, the trigger words removed): the training captions without the trigger, distinct, in
    dataset order, cycled to ``count`` (default: one per training image). Captions that were only the trigger
    become the folder's class word when it is not the trigger, else "a photo"."""
    from .dataset import parse_folder_name

    words = list(trigger) if trigger else trigger_words(config.dataset, items)
    prompts = []
    for item in items:
        prompt = remove_words(item.caption, words)
        if not prompt:
            class_word = parse_folder_name(item.folder)[1].strip()
            prompt = class_word if class_word and class_word not in words else "a photo"
        prompts.append(prompt)
    distinct = list(dict.fromkeys(prompts)) or ["a photo"]
    count = len(items) if count is None else count
    return [distinct[index % len(distinct)] for index in range(count)], words


# ================================================================================================ generation
def render_options(config: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """:func:`trainer.sampling.render_previews` options of the base model's images: the [sample] sampler, steps,
    guidance and seed at the dataset's resolution."""
    from .sampling import preview_options

    options = {**preview_options(config.sample, config.dataset.resolution), "clip_skip": config.train.clip_skip,
               **(extra or {})}
    options["width"] = options["height"] = config.dataset.resolution
    return options


def cache_key(base: str, prompts: Sequence[str], options: dict[str, Any]) -> str:
    """What the generated images depend on: the base model, the prompts (in order) and the render options."""
    text = json.dumps({"base": str(base), "prompts": list(prompts), "options": options}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def generate_images(pipe: Any, prompts: Sequence[str], folder: Path, options: dict[str, Any],
                    progress: Callable[[int], None] | None = None) -> tuple[list[Path], int]:
    """Image ``i`` = ``prompts[i]`` at seed ``options["seed"] + i``, written as ``NNNN.png`` with its caption in
    ``NNNN.txt`` (both atomically, the caption last). Pairs already there with the same caption are kept: a rerun
    with the same key only draws what is missing; ``progress(drawn)`` counts the drawn ones. Returns (the image
    paths, how many were reused)."""
    from .sampling import render_previews

    folder.mkdir(parents=True, exist_ok=True)
    if getattr(pipe, "transformer", None) is not None:  # SD3/Flux pipelines have their flow-matching Euler only
        options = {**options, "sampler": "euler"}
    paths, reused = [], 0
    for index, prompt in enumerate(prompts):
        image_path, caption_path = pair_paths(folder, index)
        if _present(image_path, caption_path, prompt):
            reused += 1
        else:
            image = render_previews(pipe, [prompt], **{**options, "seed": int(options["seed"]) + index})[0]
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            atomic_write_bytes(image_path, buffer.getvalue())
            write_text_atomic(caption_path, prompt)
            if progress is not None:
                progress(index + 1 - reused)
        paths.append(image_path)
    return paths, reused


def pair_paths(folder: Path, index: int) -> tuple[Path, Path]:
    """(image, caption) of :func:`generate_images`' pair ``index`` in ``folder``."""
    return folder / f"{index:04d}.png", folder / f"{index:04d}.txt"


def regularisation_images(folder: Path, prompts: Sequence[str]) -> list[Path]:
    """The images of :func:`generate_images`' pairs for ``prompts`` that ``folder`` holds."""
    return [pair_paths(folder, index)[0] for index, prompt in enumerate(prompts)
            if _present(*pair_paths(folder, index), prompt)]


def missing_images(prompts: Sequence[str], folder: Path) -> int:
    """How many of :func:`generate_images`' pairs are not in ``folder`` yet."""
    return len(prompts) - len(regularisation_images(folder, prompts))


def _present(image_path: Path, caption_path: Path, prompt: str) -> bool:
    return image_path.is_file() and caption_path.is_file() and caption_path.read_text(encoding="utf-8") == prompt


def folder_items(paths: Sequence[Path], prompts: Sequence[str], max_pixels: int) -> list[Any]:
    """Dataset items of generated images (one sample each, their prompt as caption)."""
    from .dataset import ImageItem, inspect_image

    items = []
    for path, prompt in zip(paths, prompts):
        height, width, digest, has_alpha = inspect_image(path, max_pixels)
        items.append(ImageItem(path=path, caption=prompt, folder="prior", n_repeats=1, size=(height, width),
                               sha256=digest, is_reg=True, has_alpha=has_alpha))
    return items


def prior_dataset(config: Any, reg_items: Sequence[Any], generate: Callable[[], list[Any]]) -> tuple[Any, str]:
    """(the prior set as an un-augmented dataset, what it is): the regularisation images when the dataset has some,
    else ``generate()``'s items, captioned with their prompts only (no trigger, prefix or suffix)."""
    from .dataset import ImageDataset

    seed = config.train.seed
    if reg_items:
        return ImageDataset(list(reg_items), config.dataset, seed, augment=False), "regularisation images"
    plain = dataclasses.replace(config.dataset, trigger_word="", caption_prefix="", caption_suffix="",
                                masked_loss=False, subsets=[])
    return ImageDataset(generate(), plain, seed, augment=False), "base-model images"


# ================================================================================================ the metric
class PriorMeter:
    """The prior loss ratio of a network on a fixed prior set.

    ``loss(batch, keys)`` is the training loss of a one-sample batch with noise keyed by ``keys`` (the engine's);
    every image gets the key ``("prior", seed, i)``, so its noise and timestep never change.
    """

    def __init__(self, dataset: Any, seed: int, loss: Callable[[dict[str, Any], list[tuple]], Any]):
        self.dataset, self.seed, self.loss = dataset, int(seed), loss
        self.base: list[float] | None = None

    def losses(self) -> list[float]:
        import torch

        from .dataset import collate_batch

        with torch.no_grad():
            return [float(self.loss(collate_batch([self.dataset[i]]), [("prior", self.seed, i)]))
                    for i in range(len(self.dataset))]

    def measure_base(self, network: Any) -> list[float]:
        """The base model's losses: every adapter at multiplier 0 (restored afterwards)."""
        with network.switched_off():
            self.base = self.losses()
        return self.base

    def measure(self) -> dict[str, float]:
        """{"ratio", "loss", "base_loss"} of the network as it is now (:meth:`measure_base` first)."""
        if self.base is None:
            raise RuntimeError("PriorMeter.measure_base must run before measure")
        losses = self.losses()
        loss, base = sum(losses) / len(losses), sum(self.base) / len(self.base)
        return {"ratio": loss / base if base > 0 else math.inf, "loss": loss, "base_loss": base}


# ================================================================================================ during a run
class ForgettingWatch:
    """One training run's forgetting measures: the prior set and its loss ratio every ``train.prior_every_n_steps``
    (events, TensorBoard), the measures of each save in ``checkpoints.json``, the early stop of
    ``train.prior_stop_ratio`` and the best-trade-off pick at the end. Only the main process measures and writes."""

    def __init__(self, config: Any, events: Any, accelerator: Any, stop: Any, resuming: bool):
        self.config, self.events, self.accelerator, self.stop = config, events, accelerator, stop
        self.main = accelerator.is_main_process
        self.output_dir = Path(config.output.dir)
        self.checkpoints = CheckpointLog(self.output_dir, config.train.prior_max_ratio, resuming=resuming,
                                         name=config.output.name)
        self.dataset: Any = None  # the prior set (prior_set)
        self.meter: PriorMeter | None = None  # with train.prior_every_n_steps, once the run has started
        self.source = ""
        self.stopped_run = False  # train.prior_stop_ratio asked the run to stop

    def prior_set(self, models: Any, reg_items: Sequence[Any]) -> Any:
        """The regularisation images, else base-model images (drawn once — call it before the adapters are
        attached — and cached under <output.dir>/cache/prior/<key>; the main process draws, the others read)."""
        from . import events as ev

        config = self.config
        options = render_options(config, models.preview_options())
        prompts = prior_prompts(config)
        folder = self.output_dir / "cache" / "prior" / cache_key(config.model.base, prompts, options)

        def generate() -> list[Any]:
            missing = missing_images(prompts, folder) if self.main else 0
            if missing:
                counter = ev.PhaseProgress(self.events.emit, "prior", missing, "images")
                generate_images(models.pipe, prompts, folder, options,
                                progress=lambda done: counter.advance(done - counter.done))
            self.accelerator.wait_for_everyone()
            paths = [pair_paths(folder, index)[0] for index in range(len(prompts))]
            return folder_items(paths, prompts, config.dataset.max_pixels)

        self.dataset, self.source = prior_dataset(config, reg_items, generate)
        return self.dataset

    def start(self, network: Any, loss: Callable[[dict[str, Any], list[tuple]], Any], eager: Callable[[], Any],
              step: int) -> None:
        """The base model's loss on the prior set (adapters at multiplier 0), then the ratio where training starts.
        ``loss`` is the engine's training loss of a batch; ``eager()`` the context its measures run in."""
        if self.dataset is None or not self.main:
            return
        self.meter, self.network, self.eager = PriorMeter(self.dataset, self.config.train.seed, loss), network, eager
        self._measured(lambda: self.meter.measure_base(network))
        self.check(step)

    def _measured(self, measure: Callable[[], Any]) -> Any:
        self.network.eval()
        try:
            with self.eager():
                return measure()
        finally:
            self.network.train()

    def check(self, step: int) -> None:
        """The prior loss ratio now: an event, a TensorBoard scalar, and the early stop of train.prior_stop_ratio."""
        from . import events as ev

        if self.meter is None:
            return
        values = self._measured(self.meter.measure)
        self.checkpoints.measured(step, prior_ratio=values["ratio"])
        self.events.emit(ev.PriorLoss(step=step, ratio=values["ratio"], prior_loss=values["loss"],
                                      base_loss=values["base_loss"],
                                      concept_loss=self.checkpoints.measures[step].get("validation_loss"),
                                      images=len(self.dataset), source=self.source))
        self.events.scalars(step, {"prior_loss_ratio": values["ratio"], "prior_loss": values["loss"]})
        limit = self.config.train.prior_stop_ratio
        if limit and values["ratio"] > limit and not self.stop.requested():
            reason = (f"the prior loss ratio {values['ratio']:.4f} passed train.prior_stop_ratio {limit:g} at step "
                      f"{step}: the adapter is changing what the base model drew for unrelated prompts")
            log.warning("%s; stopping with a save", reason)
            self.stopped_run = True
            self.stop.request(reason)

    def before_save(self, step: int, validate: Callable[[], None], metadata: dict[str, str]) -> dict[str, str]:
        """The file's metadata with this save's measures (checkpoints.json lists them too): each measure the run
        takes at all is taken now if it was not at this step."""
        if self.config.train.validation_every_n_steps and not self.checkpoints.has(step, "validation_loss"):
            validate()
        if self.meter is not None and not self.checkpoints.has(step, "prior_ratio"):
            self.check(step)
        kept = {key: value for key, value in metadata.items() if not key.startswith("rankwright_")}
        return {**kept, **self.checkpoints.file_metadata(step)}

    def report_best(self) -> str | None:
        """The best trade-off among the saves (checkpoints.json), logged and sent as an event; its path."""
        from . import events as ev

        pick = self.checkpoints.best() if self.main and self.checkpoints.records else None
        if pick is None:
            return None
        record, why = pick
        log.info("best checkpoint: step %d, %s (%s)", record.step, record.path, why)
        self.events.emit(ev.BestCheckpoint(step=record.step, path=record.path, validation_loss=record.validation_loss,
                                           prior_ratio=record.prior_ratio, why=why))
        return record.path


# ================================================================================================ checkpoints
@dataclasses.dataclass
class CheckpointRecord:
    step: int
    path: str
    validation_loss: float | None = None  # the concept's held-out loss (dataset.validation_split), if measured
    prior_ratio: float | None = None
    drift: float | None = None  # pixel drift, where something measured it (trainer.compare)


def best_checkpoint(records: Sequence[CheckpointRecord | dict[str, Any]],
                    max_prior_ratio: float = 1.1) -> tuple[CheckpointRecord, str] | None:
    """The best trade-off and why: among the saves whose prior ratio is within ``max_prior_ratio`` (or not
    measured), the lowest concept validation loss (without one: the latest such save, the most trained); when
    every measured save is past the tolerance, the lowest prior ratio. None for no records."""
    records = [r if isinstance(r, CheckpointRecord) else CheckpointRecord(**r) for r in records]
    if not records:
        return None
    kept = [r for r in records if r.prior_ratio is None or r.prior_ratio <= max_prior_ratio]
    if not kept:
        best = min(records, key=lambda r: (r.prior_ratio, -r.step))
        return best, (f"every save's prior loss ratio is above {max_prior_ratio:g}: the lowest ratio "
                      f"({best.prior_ratio:.4f})")
    scored = [r for r in kept if r.validation_loss is not None]
    if scored:
        best = min(scored, key=lambda r: (r.validation_loss, -r.step))
        return best, (f"the lowest concept validation loss ({best.validation_loss:.5f}) with a prior loss ratio "
                      f"within {max_prior_ratio:g}")
    best = max(kept, key=lambda r: r.step)
    return best, f"the latest save with a prior loss ratio within {max_prior_ratio:g} (no validation loss measured)"


class CheckpointLog:
    """``checkpoints.json``: the measures taken at each step, and one record per save (rewritten atomically).
    Runs of other names that share the folder (the UI's ``outputs/``) keep their records; the pick is this run's."""

    def __init__(self, output_dir: Path, max_prior_ratio: float, resuming: bool = False, name: str | None = None):
        self.path = Path(output_dir) / CHECKPOINTS_FILE
        self.max_prior_ratio = max_prior_ratio
        self.name = name
        self.measures: dict[int, dict[str, float]] = {}
        self.records: list[CheckpointRecord] = []
        self.others: list[CheckpointRecord] = []  # saves of other runs in this folder, written back as they were
        if not self.path.is_file():
            return
        try:
            earlier = json.loads(self.path.read_text(encoding="utf-8"))
            listed = [CheckpointRecord(**record) for record in earlier["checkpoints"]]
            measures = {int(m.pop("step")): m for m in earlier.get("measures", [])}
        except (ValueError, KeyError, TypeError) as error:
            log.warning("%s is unreadable (%s); it restarts with this run's saves", self.path, error)
            return
        own = [r for r in listed if belongs_to_run(r.path, name)]
        self.others = [r for r in listed if not belongs_to_run(r.path, name)]
        if resuming:  # a resumed run goes on with its saves before it
            self.records, self.measures = own, measures

    def measured(self, step: int, **values: float) -> None:
        self.measures.setdefault(step, {}).update(values)

    def has(self, step: int, what: str) -> bool:
        return what in self.measures.get(step, {})

    def saved(self, step: int, path: Path) -> None:
        values = self.measures.get(step, {})
        self.records = [r for r in self.records if r.path != str(path)]
        self.records.append(CheckpointRecord(step, str(path), values.get("validation_loss"),
                                             values.get("prior_ratio")))
        self.write()

    def file_metadata(self, step: int) -> dict[str, str]:
        """Keys for the file about to be saved at ``step``: its measures and, counting it as saved, the pick."""
        values = self.measures.get(step, {})
        keys = {f"rankwright_{name}": f"{values[name]:.6g}" for name in ("validation_loss", "prior_ratio")
                if name in values}
        if not self.measures:
            return keys
        self.forget_missing()
        this = CheckpointRecord(step, "", values.get("validation_loss"), values.get("prior_ratio"))
        best, why = best_checkpoint([*[r for r in self.records if r.step != step], this], self.max_prior_ratio)
        keys["rankwright_best_checkpoint"] = json.dumps({"step": best.step, "file": Path(best.path).name or
                                                         "this file", "why": why})
        return keys

    def renamed(self, old: Path, new: Path) -> None:
        """A save moved (an extended run keeps its old final file under its step name)."""
        for record in self.records:
            if record.path == str(old):
                record.path = str(new)
        if self.records:
            self.write()

    def forget_missing(self) -> None:
        """Drop the records of files deleted since (output.save_last_n_steps)."""
        self.records = [r for r in self.records if Path(r.path).exists()]
        self.others = [r for r in self.others if Path(r.path).exists()]

    def best(self) -> tuple[CheckpointRecord, str] | None:
        return best_checkpoint(self.records, self.max_prior_ratio)

    def write(self) -> None:
        self.forget_missing()
        pick = self.best()
        data = {"max_prior_ratio": self.max_prior_ratio,
                "checkpoints": [dataclasses.asdict(r) for r in [*self.others, *self.records]],
                "best": {**dataclasses.asdict(pick[0]), "why": pick[1]} if pick else None,
                "measures": [{"step": step, **values} for step, values in sorted(self.measures.items())]}
        write_text_atomic(self.path, json.dumps(data, indent=2) + "\n")


def read_checkpoints(output_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(output_dir) / CHECKPOINTS_FILE).read_text(encoding="utf-8"))


@dataclasses.dataclass
class RunCheckpoints:
    """A run folder's saves as checkpoints.json lists them, each file taken by its name inside the folder."""

    folder: Path
    records: list[CheckpointRecord]  # by step; ``path`` is ``folder / <the record's file name>`` and exists
    best: CheckpointRecord | None
    why: str
    max_prior_ratio: float


def run_checkpoints(output_dir: str | Path, name: str | None = None) -> RunCheckpoints:
    """The saves listed in ``output_dir``'s checkpoints.json whose files still lie in ``output_dir`` (a record is
    taken by its file name there, whatever folder it names: the file need not be where the run wrote it, and a
    record never leads outside the folder), with the pick over them. With ``name`` (output.name), only that run's
    files (``<name>.safetensors``, ``<name>-step….safetensors``): runs sharing a folder share the file. No file,
    or an unreadable one: no records."""
    folder = Path(output_dir).expanduser().resolve()
    try:
        data = read_checkpoints(folder)
        max_ratio = float(data.get("max_prior_ratio", 1.1))
        listed = [CheckpointRecord(**record) for record in data.get("checkpoints", [])]
    except (OSError, ValueError, TypeError, AttributeError):
        return RunCheckpoints(folder, [], None, "", 1.1)
    records = []
    for record in sorted(listed, key=lambda r: r.step):
        path = folder / Path(str(record.path)).name
        if _is_checkpoint_file(path, folder) and belongs_to_run(path, name):
            records.append(dataclasses.replace(record, path=str(path)))
    pick = best_checkpoint(records, max_ratio)
    return RunCheckpoints(folder, records, *(pick if pick else (None, "")), max_ratio)


def belongs_to_run(path: str | Path, name: str | None) -> bool:
    """Whether a save is run ``name``'s (``<name>.safetensors``, ``<name>-step….safetensors``); any, without a name."""
    stem = Path(path).stem
    return not name or stem == name or stem.startswith(f"{name}-")


def _is_checkpoint_file(path: Path, folder: Path) -> bool:
    return path.suffix == ".safetensors" and path.is_file() and path.resolve().parent == folder


def find_checkpoint(output_dir: str | Path, choice: str | int, name: str | None = None) -> CheckpointRecord:
    """The save of ``output_dir`` (of run ``name``) that ``choice`` names — its step, or its file name as
    :func:`run_checkpoints` lists it. ValueError for anything else: a name with a folder in it, a step or name
    with no save."""
    checkpoints = run_checkpoints(output_dir, name)
    text = str(choice).strip()
    if not text:
        raise ValueError("choose a checkpoint from the list")
    if text.isdigit():
        found = [r for r in checkpoints.records if r.step == int(text)]
    elif Path(text).name != text or text in (".", ".."):
        raise ValueError(f"{text!r} is not a checkpoint file name: choose one from the list")
    else:
        found = [r for r in checkpoints.records if Path(r.path).name == text]
    if not found:
        raise ValueError(f"no checkpoint {text!r} in {checkpoints.folder} (its checkpoints.json lists "
                         f"{len(checkpoints.records)} save(s) whose file is there)")
    return found[-1]


def record_drift(adapter_file: str | Path, drift: float | None) -> bool:
    """Add a pixel drift measured afterwards (trainer.compare) to the record of ``adapter_file`` in the
    checkpoints.json beside it; whether there was one to add it to."""
    path = Path(adapter_file).parent / CHECKPOINTS_FILE
    if drift is None or not path.is_file():
        return False
    data = json.loads(path.read_text(encoding="utf-8"))
    records = [r for r in data.get("checkpoints", []) if Path(r["path"]) == Path(adapter_file)]
    for record in records:
        record["drift"] = drift
    if data.get("best") and Path(data["best"]["path"]) == Path(adapter_file):
        data["best"]["drift"] = drift
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
    return bool(records)


# ================================================================================================ regularisation
@dataclasses.dataclass
class Regularisation:
    folder: Path
    paths: list[Path]
    prompts: list[str]
    trigger: list[str]  # the words removed from the captions
    reused: int  # images found in the folder already (same key)
    stopped: bool = False  # a stop ended it: ``paths`` are the images drawn so far


def default_regularisation_folder(config: Any, key: str) -> Path:
    """<the dataset folder>/../regularisation/<key> (with subsets: beside the first training subset's folder)."""
    data = config.dataset
    training = [s.image_dir for s in data.subsets if not s.is_reg]
    root = Path(training[0] if training else data.dir).expanduser().resolve()
    return root.parent / "regularisation" / key


def regularise(config: Any, count: int | None = None, out: str | Path | None = None,
               trigger: Sequence[str] | None = None, pipe: Any = None,
               progress: Callable[[int, int], None] | None = None, root: str | Path | None = None,
               stop: Any = None) -> Regularisation:
    """Draw regularisation images with the base model: the training captions without the trigger word(s)
    (:func:`regularisation_prompts`), one image per prompt at the [sample] settings and the dataset's resolution,
    into ``out`` (default ``<root>/<key>``, without a root :func:`default_regularisation_folder`) with caption
    files. Images already there for the same prompt are reused; the base model is loaded only when something is
    missing. ``progress(done, total)``, first with 0 once the number to draw is known. ``stop`` (a
    :class:`trainer.events.StopSignal`) ends it within a denoising step; the images drawn so far are kept."""
    from methods.base import ConfigError

    from .dataset import scan_dataset
    from .sampling import RenderStopped, on_denoising_step

    if count is not None and count < 1:
        raise ConfigError(f"--count must be ≥ 1, got {count}")
    try:
        scan = scan_dataset(config.dataset, seed=config.train.seed)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    items = scan.train_items + list(scan.validation)
    prompts, words = regularisation_prompts(config, items, count, trigger)
    options = render_options(config)
    key = cache_key(config.model.base, prompts, options)
    if out:
        folder = Path(out).expanduser()
    else:
        folder = Path(root) / key if root else default_regularisation_folder(config, key)
    missing = missing_images(prompts, folder)
    if progress:
        progress(0, missing)

    def check_stop() -> None:
        if stop is not None and stop.requested():
            raise RenderStopped("regularisation images stopped")

    try:
        check_stop()
        if missing and pipe is None:
            from .compare import load_base_pipeline

            pipe = load_base_pipeline(config)
        report = (lambda done: progress(done, missing)) if progress else None
        with on_denoising_step(check_stop):
            paths, reused = generate_images(pipe, prompts, folder, options, progress=report)
    except RenderStopped:
        drawn = regularisation_images(folder, prompts)
        return Regularisation(folder, drawn, prompts, words, len(prompts) - missing, stopped=True)
    manifest = {"key": key, "base": config.model.base, "trigger_removed": words, "options": options,
                "images": len(paths)}
    write_text_atomic(folder / "regularisation.json", json.dumps(manifest, indent=2, default=str) + "\n")
    return Regularisation(folder, paths, prompts, words, reused)
