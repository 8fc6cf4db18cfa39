"""The Gradio Blocks app: Dataset, Model & method, Training, Compare, Results and Config tabs.

All logic sits in :class:`RankwrightUI`'s callbacks, which call the trainer's public API (and ui.workspace /
ui.jobs / ui.pipelines); :func:`build_app` only lays out components and wires them. Callbacks never let a user's
mistake escape: :meth:`RankwrightUI.guard` turns it into a message in the tab's status box and a warning toast.
"""

from __future__ import annotations

import functools
import html
import itertools
import json
import logging
import shutil
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from methods.base import ConfigError
from trainer.compare import DEFAULT_METHODS
from trainer.config import TrainerConfig

from . import form, pipelines, workspace
from .jobs import PROJECT_ROOT, JobError, JobRunner, JobView
from .workspace import Workspace, WorkspaceError

log = logging.getLogger("rankwright.ui")

THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="slate")
CSS = """
.rw-progress { width: 100%; background: var(--block-background-fill); border: 1px solid var(--border-color-primary);
               border-radius: 8px; height: 26px; position: relative; overflow: hidden; }
.rw-progress > .bar { height: 100%; background: var(--color-accent); transition: width .4s; }
.rw-progress > .label { position: absolute; inset: 0; display: flex; align-items: center; justify-content: center;
                        font-weight: 600; font-variant-numeric: tabular-nums; }
.rw-mono textarea { font-family: var(--font-mono); font-size: 13px; }
"""
USER_ERRORS = (ConfigError, WorkspaceError, JobError, ValueError, OSError, KeyError, tomllib.TOMLDecodeError)
KEEP_WHEN_MISSING = ("model.base", "dataset.dir", "output.dir")  # presets without them keep the form's values
DEMO_PRESET = "toy_demo.toml"
DEMO_DATASET = "toy_demo"


class RankwrightUI:
    """The callbacks, independent of the layout (unit-tested without a browser)."""

    def __init__(self, ws: Workspace, runner: JobRunner | None = None, cache: pipelines.PipelineCache | None = None,
                 preset_dirs: list[Path] | None = None):
        self.ws = ws
        self.runner = runner or JobRunner(ws.jobs)
        self.cache = cache or pipelines.PipelineCache()
        self.preset_dirs = preset_dirs if preset_dirs is not None else [PROJECT_ROOT / "presets", ws.presets]
        self.fields = form.all_fields()
        self.keys = [field.key for field in self.fields]
        self.methods = list(form.method_fields())
        # What the web server may send, fixed at launch: never widened by anything a browser sends.
        self.allowed_paths: list[str] = [str(folder) for folder in ws.served]
        self.checker = workspace.ImageChecker()
        self.foreign_jobs: set[str] = set()  # job records on disk that are ignored (warned about once)
        self.demo: gr.Blocks | None = None

    # ================================================================ helpers
    def guard(self, function: Callable, outputs: int, status: int | None = None) -> Callable:
        """Wrap a callback: a user error becomes a warning toast (and the status output's text), never a crash."""

        @functools.wraps(function)
        def wrapped(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except USER_ERRORS as error:
                message = " ".join(str(error).split()) or type(error).__name__
            except Exception as error:  # a bug: keep serving, show what happened
                log.exception("callback %s failed", function.__name__)
                message = f"unexpected error ({type(error).__name__}: {error}); see the server log"
            gr.Warning(message)
            result = [gr.skip()] * outputs
            if status is not None:
                result[status] = f"⚠️ {message}"
            return result[0] if outputs == 1 else tuple(result)

        return wrapped

    def values(self, args: tuple) -> dict[str, Any]:
        return dict(zip(self.keys, args))

    def config_from(self, args: tuple) -> TrainerConfig:
        return form.values_to_config(self.values(args))

    def ordered(self, values: dict[str, Any]) -> list[Any]:
        return [values[key] for key in self.keys]

    def default_config(self) -> TrainerConfig:
        return TrainerConfig.from_dict({"model": {}, "dataset": {"dir": str(self.ws.default_dataset())},
                                        "output": {"dir": str(self.ws.outputs)},
                                        "network": {"method": "lora", "rank": 16}})

    def demo_config(self) -> TrainerConfig | None:
        """The toy demo (presets/toy_demo.toml: the embedded toy model and its held-out-concept dataset), with the
        dataset copied into the workspace so that editing captions never touches the project's files; None when
        the project has no toy model."""
        preset = PROJECT_ROOT / "presets" / DEMO_PRESET
        model = PROJECT_ROOT / "presets" / "toy" / "model"
        source = PROJECT_ROOT / "presets" / "toy" / "data"
        if not (preset.is_file() and (model / "model_index.json").is_file() and source.is_dir()):
            return None
        dataset = self.ws.datasets / DEMO_DATASET
        if not dataset.exists():
            staging = self.ws.datasets / f".{DEMO_DATASET}.partial"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(source, staging)
            staging.rename(dataset)
        config = TrainerConfig.load(preset)
        config.model.base = str(model)
        config.dataset.dir = str(dataset)
        config.output.dir = str(self.ws.outputs)
        return config

    def initial_config(self) -> TrainerConfig:
        """The last started or saved settings, else the toy demo (a first start: press Train and watch), else the
        defaults."""
        if self.ws.last_config.is_file():
            try:
                return TrainerConfig.load(self.ws.last_config)
            except ConfigError as error:
                log.warning("ignoring %s: %s", self.ws.last_config, error)
        try:
            return self.demo_config() or self.default_config()
        except (ConfigError, OSError) as error:
            log.warning("toy demo unavailable: %s", error)
            return self.default_config()

    def remember(self, config: TrainerConfig) -> None:
        workspace.write_text_atomic(self.ws.last_config, config.to_toml().rstrip("\n"))

    def confine(self, config: TrainerConfig) -> TrainerConfig:
        """``config`` with every folder a browser chose checked against the workspace (WorkspaceError naming the fix
        otherwise): the dataset and regularisation folders resolved into ``datasets/`` or a ``--data-dir`` and
        existing, the output folder (and an adapter to start from) in ``outputs/``, a caption extension the UI
        edits. Relative names are taken in those folders."""
        for key in ("dir", "reg_dir"):
            if key == "dir" or config.dataset.reg_dir:
                folder = self.ws.dataset_folder(getattr(config.dataset, key))
                if not folder.is_dir():
                    raise WorkspaceError(f"the dataset folder {folder} does not exist: add images in the Dataset tab")
                setattr(config.dataset, key, str(folder))
        config.dataset.caption_extension = workspace.caption_extension(config.dataset.caption_extension)
        config.output.dir = str(self.ws.output_folder(config.output.dir))
        if config.network.init_from:
            config.network.init_from = str(self.ws.output_file(config.network.init_from))
        return config

    def own_job(self, record: Any) -> Any:
        """``record`` if its output folder lies in this workspace's outputs, else None: a job record on disk (from
        an older version, or edited by hand) never makes the UI read or serve another folder."""
        if record is not None and not workspace.is_within(Path(record.output_dir).resolve(), self.ws.outputs):
            if record.id not in self.foreign_jobs:
                self.foreign_jobs.add(record.id)
                log.warning("ignoring job %s: its output folder %s is outside %s", record.id, record.output_dir,
                            self.ws.outputs)
            return None
        return record

    def servable(self, paths: list[str]) -> list[str]:
        """The files among ``paths`` (read from a job's events) that exist and may be served."""
        return [path for path in paths if path and Path(path).is_file() and self.ws.is_served(path)]

    # ================================================================ dataset
    def dataset_view(self, dataset_dir: str, extension: str = ".txt") -> tuple:
        """(gallery items, image paths, concept choices, summary markdown)."""
        folder = self.ws.dataset_folder(dataset_dir)
        if not folder.is_dir():
            return [], [], gr.update(choices=["subject"]), (f"The folder `{folder}` does not exist yet: drop images "
                                                            "above to create it, or type an existing folder.")
        everything = workspace.list_images(folder, extension)
        images = [item for item in everything if not item.linked_out]
        problems = self.checker.problems([item.path for item in images], extension)
        problems += [(item.path, workspace.LINKED_OUT) for item in everything if item.linked_out]
        bad = {path.resolve() for path, _ in problems}
        gallery = [(str(workspace.thumbnail(item.path, self.ws.thumbnails)), item.caption
                    or f"{item.path.name} (no caption)") for item in images if item.path.resolve() not in bad]
        paths = [str(item.path) for item in images if item.path.resolve() not in bad]
        concepts = workspace.list_concepts(folder)
        lines = [f"**{len(paths)} usable image(s)** in `{folder}`"]
        for concept in concepts:
            lines.append(f"- `{concept.folder}`: {concept.images} image(s) × {concept.repeats} repeat(s) "
                         f"(class word “{concept.name}”)")
        root_images = sum(1 for item in images if not item.folder)
        if root_images:
            lines.append(f"- directly in the folder: {root_images} image(s) × 1 repeat")
        uncaptioned = sum(1 for item in images if not item.caption and item.path.resolve() not in bad)
        if uncaptioned:
            lines.append(f"- {uncaptioned} image(s) without a caption")
        if problems:
            lines.append(f"\n**Left out ({len(problems)}):**")
            lines += [f"- `{path.name}`: {reason}" for path, reason in problems]
        names = [c.name for c in concepts] or ["subject"]
        return gallery, paths, gr.update(choices=names), "\n".join(lines)

    def upload(self, files: list[str] | None, dataset_dir: str, concept: str, repeats: float | None,
               extension: str = ".txt") -> tuple:
        """Store uploaded images/captions/zips; returns (file input cleared, report, *dataset_view)."""
        if not files:
            return (None, "Nothing uploaded.", *self.dataset_view(dataset_dir, extension))
        folder = self.ws.dataset_folder(dataset_dir)
        target = workspace.concept_folder(folder, concept or "subject", int(repeats or 1))
        report = workspace.add_uploads(files if isinstance(files, list) else [files], target)
        if report.rejected:
            gr.Warning(f"{len(report.rejected)} file(s) left out: "
                       + "; ".join(f"{name}: {reason}" for name, reason in report.rejected[:3]))
        summary = f"Into `{target.relative_to(folder)}`:\n" + "\n".join(f"- {line}"
                                                                      for line in report.summary().splitlines())
        return (None, summary, *self.dataset_view(dataset_dir, extension))

    def select_image(self, paths: list[str], extension: str, event: gr.SelectData) -> tuple[str, str, str]:
        index = event.index if isinstance(event.index, int) else 0
        if not paths or index >= len(paths):
            return "", "", "Select an image."
        path = Path(paths[index])
        return str(path), workspace.read_caption(path, extension), f"Selected `{path.name}`"

    def save_caption(self, dataset_dir: str, image: str, caption: str, extension: str = ".txt") -> tuple:
        if not image:
            raise WorkspaceError("select an image in the gallery first")
        folder = self.ws.dataset_folder(dataset_dir)
        path = workspace.write_caption(folder, image, caption, extension)
        return (f"Caption saved to `{path.name}`.", *self.dataset_view(dataset_dir, extension))

    def add_trigger(self, dataset_dir: str, word: str, extension: str = ".txt", selected: str = "") -> tuple:
        """(status, the selected image's caption as it is now, *dataset_view)."""
        folder = self.ws.dataset_folder(dataset_dir)
        count = workspace.add_trigger_word(folder, word, extension)
        return (f"Added “{word.strip()}” to {count} caption(s).", self._caption_of(folder, selected, extension),
                *self.dataset_view(dataset_dir, extension))

    def find_replace(self, dataset_dir: str, find: str, replace: str, extension: str = ".txt",
                     selected: str = "") -> tuple:
        folder = self.ws.dataset_folder(dataset_dir)
        count = workspace.find_replace(folder, find, replace, extension)
        return (f"Replaced “{find}” with “{replace}” in {count} caption(s).",
                self._caption_of(folder, selected, extension),
                *self.dataset_view(dataset_dir, extension))

    @staticmethod
    def _caption_of(folder: Path, selected: str, extension: str) -> Any:
        """The caption of the image the browser says is selected, if it is one of the dataset's."""
        try:
            return workspace.read_caption(workspace.check_image(folder, selected), extension)
        except WorkspaceError:
            return gr.skip()

    def set_repeats(self, dataset_dir: str, concept: str, repeats: float | None, extension: str = ".txt") -> tuple:
        folder = self.ws.dataset_folder(dataset_dir)
        matches = [c for c in workspace.list_concepts(folder) if c.name == (concept or "").strip()]
        if not matches:
            raise WorkspaceError(f"no concept folder named “{concept}” in {folder}; upload images into it first")
        target = workspace.set_repeats(folder, matches[0].folder, int(repeats or 0))
        return (f"`{matches[0].folder}` → `{target.name}`", *self.dataset_view(dataset_dir, extension))

    def delete_image(self, dataset_dir: str, image: str, extension: str = ".txt") -> tuple:
        if not image:
            raise WorkspaceError("select an image in the gallery first")
        workspace.delete_image(self.ws.dataset_folder(dataset_dir), image, extension)
        return ("", "", f"Deleted `{Path(image).name}`.", *self.dataset_view(dataset_dir, extension))

    # ================================================================ model and method
    def detect(self, base: str, arch: str, prediction_type: str, tokenizer: str = "") -> str:
        from trainer.models import ModelLoadError

        try:
            _, info = self.cache.load(base, arch, prediction_type, tokenizer)
        except ModelLoadError as error:
            raise WorkspaceError(str(error)) from None
        return f"Detected **{pipelines.describe(info)}**" + (f" · {'; '.join(info.notes)}" if info.notes else "")

    def method_changed(self, method: str) -> list[Any]:
        description = form.method_description(method) if method in self.methods else ""
        return [gr.update(visible=name == method) for name in self.methods] + [f"*{description}*"]

    def estimate(self, *args) -> str:
        values = self.values(args)
        try:
            config = form.values_to_config(values)
        except ConfigError as error:
            return f"⚠️ {error}"
        info = self.cache.loaded(config.model.base, config.model.arch, config.model.prediction_type,
                                 getattr(config.model, "tokenizer", ""))
        arch = info.arch if info is not None else (config.model.arch if config.model.arch != "auto" else "sd1")
        pipe = self.cache.pipe if info is not None else None
        try:
            return pipelines.estimate(config, arch, pipe).text()
        except (ConfigError, ValueError) as error:
            return f"⚠️ {error}"
        except Exception as error:  # an estimate must never break the page
            log.exception("estimate failed")
            return f"⚠️ cannot estimate the size ({type(error).__name__}: {error})"

    # ================================================================ training
    def start(self, *args) -> tuple[str, dict]:
        config = self.confine(self.config_from(args))
        self.remember(config)
        record = self.runner.start(config)
        command = form.cli_command(record.config_path)
        message = (f"Started job `{record.id}`: {config.network.method} → `{record.output_dir}/"
                   f"{config.output.name}.safetensors`. Same run from a shell: `{command}`")
        gr.Info("Training started")
        return message, {}

    def stop(self) -> str:
        if self.own_job(self.runner.current()) is None:
            raise JobError("No training job is running.")
        record = self.runner.stop()
        return f"Stop requested for `{record.id}`: it saves the adapter at the next step and ends."

    def poll(self, session: dict | None) -> tuple:
        """Timer tick: the current job's progress, status, loss plot, previews, log and saved files."""
        return self._tick(self.runner.current, self._show_job, self._no_job, 7, session)

    def _no_job(self) -> tuple:
        return "No training job yet.", progress_html(0, "idle"), None, [], "", *self.results()

    def _show_job(self, record: Any, view: JobView, session: dict) -> tuple:
        skip = gr.skip()
        status = f"**{view.status_text()}** — job `{record.id}` · {record.output_name}"
        progress = progress_html(view.fraction, view.progress_text())
        plot = skip
        if len(view.losses) != session.get("losses"):
            session["losses"] = len(view.losses)
            plot = loss_plot(view)
        previews = skip
        if len(view.previews) != session.get("previews"):
            session["previews"] = len(view.previews)
            previews = [(p, Path(p).name) for p in self.servable(newest_first(view.previews))][:24]
        log_text = "\n".join(view.log)
        files, choices = skip, skip
        if len(view.saves) != session.get("saves"):
            session["saves"] = len(view.saves)
            files, choices = self.results()
        return status, progress, plot, previews, log_text, files, choices

    def _tick(self, find: Callable[[], Any], show: Callable[[Any, JobView, dict], tuple], idle: Callable[[], tuple],
              outputs: int, session: dict | None) -> tuple:
        """One timer tick of a tab showing a job: ``idle()`` when there is none, nothing re-sent while the job's
        view is unchanged, else ``show(record, view, session)``; the session state comes last."""
        session = dict(session or {})
        skips = (gr.skip(),) * outputs
        try:
            record = self.own_job(find())
            if record is None:
                return (*skips, session) if session.get("job") == "none" else (*idle(), {"job": "none"})
            view = self.runner.view(record)
            if session.get("job") != record.id:
                session = {"job": record.id}
            if session.get("version") == view.version:
                return (*skips, session)
            session["version"] = view.version
            return (*show(record, view, session), session)
        except Exception:  # a broken tick must not flood the page with errors every second
            log.exception("poll of %s failed", show.__name__)
            return (*skips, session)

    # ================================================================ method comparison
    def compare(self, methods: list[str] | None, steps: float | None, drift_prompts: str, *args) -> tuple[str, dict]:
        """Start a comparison of the ticked methods on the form's settings, each method with its own options."""
        from trainer.compare import OPTIONS_KEY, default_out_dir, resolve_methods

        config = self.confine(self.config_from(args))
        self.remember(config)
        if steps not in (None, ""):
            if not float(steps).is_integer() or float(steps) < 1:
                raise WorkspaceError(f"steps per method must be a whole number ≥ 1, got {steps}")
            config = config.with_overrides([f"train.max_steps={int(steps)}", "train.epochs=0"])
        methods = resolve_methods(methods or [])
        values = self.values(args)
        # What Start would train with each method selected: the options of that method's group in the form.
        overrides = {method: {OPTIONS_KEY: form.values_to_data({**values, "network.method": method})["network"]
                              ["options"]} for method in methods}
        prompts = [line.strip() for line in (drift_prompts or "").splitlines() if line.strip()]
        record = self.runner.start_compare(config, methods, default_out_dir(config), overrides, prompts)
        gr.Info("Comparison started")
        return (f"Started comparison `{record.id}`: {', '.join(methods)}, {config.train.max_steps} steps each → "
                f"`{record.output_dir}`. The report (report.md, grid.png, losses.png) is written there."), {}

    def latest_comparison(self) -> Any:
        """The running comparison, else the newest one of the workspace (None if there is none)."""
        current = self.own_job(self.runner.current())
        if current is not None and current.kind == "compare":
            return current
        return next((record for record in self.runner.history() if record.kind == "compare"
                     and self.own_job(record) is not None), None)

    def poll_compare(self, session: dict | None) -> tuple:
        """Timer tick of the Compare tab: status, progress, table, preview grid, loss plot, report files."""
        idle = ("No comparison yet.", progress_html(0, "idle"), None, None, None, None)
        return self._tick(self.latest_comparison, self._show_comparison, lambda: idle, 6, session)

    def _show_comparison(self, record: Any, view: JobView, session: dict) -> tuple:
        status = f"**{view.status_text()}** — comparison `{record.id}` · {', '.join(view.methods) or '…'}"
        table = {"headers": list(view.rows[0]), "data": [list(row.values()) for row in view.rows]} \
            if view.rows else None
        plot = gr.skip()
        points = sum(len(losses) for losses in view.method_losses.values())
        if points != session.get("losses"):
            from trainer.plots import loss_curves_png

            session["losses"] = points
            plot = loss_curves_png(view.method_losses, title="training loss per method", width=720, height=320) \
                if points else None
        report = view.report
        grid = next(iter(self.servable([report.get("grid")])), None)
        files = self.servable([report.get("markdown"), report.get("report"), report.get("grid"),
                               report.get("loss_plot")])
        return status, progress_html(view.fraction, view.progress_text()), table, grid, plot, files or None

    # ================================================================ results
    def saved_files(self) -> list[dict[str, Any]]:
        """Every adapter saved by a job of this workspace that still exists, newest first."""
        found, seen = [], set()
        for record in filter(self.own_job, self.runner.history()):
            view = self.runner.view(record)
            for save in reversed(view.saves):
                path = Path(save.get("path", ""))
                if self.servable([str(path)]) and str(path) not in seen:
                    seen.add(str(path))
                    found.append({**save, "job": record.id, "size_bytes": path.stat().st_size})
        return found

    def results(self) -> tuple[Any, Any]:
        """(the file list for download, the adapter dropdown update)."""
        saves = self.saved_files()
        paths = [save["path"] for save in saves]
        choices = [(adapter_label(path), path) for path in paths]
        return paths or None, gr.update(choices=choices, value=paths[0] if paths else None)

    def refresh_results(self) -> tuple[Any, Any]:
        return self.results()

    def adapter_info(self, path: str | None) -> tuple[str, dict]:
        if not path:
            return "No adapter selected.", {}
        from methods.files import AdapterFileError
        from methods.tools import inspect_adapter

        file = self.ws.output_file(path)
        try:
            report = inspect_adapter(file)  # what `python -m trainer inspect` shows; refuses NaN/Inf tensors
        except AdapterFileError as error:
            raise WorkspaceError(str(error)) from None
        metadata = report["metadata"]
        shown = {}
        for key, value in metadata.items():
            try:
                shown[key] = json.loads(value) if value[:1] in "{[" else value
            except ValueError:
                shown[key] = value

        def listed(histogram: dict[str, int]) -> str:
            return ", ".join(histogram) if len(histogram) > 1 else next(iter(histogram), "?")

        method = listed(report["methods"]) + (" + DoRA" if report["dora_modules"] else "")
        parts = [f"**{file.name}**", pipelines.format_bytes(report["size_bytes"]), f"{report['tensors']} tensors",
                 f"method **{method}**", f"rank {listed(report['ranks'])}, alpha {listed(report['alphas'])}",
                 f"{report['modules']} modules", f"base {report['architecture'] or '?'}",
                 f"{metadata.get('ss_steps', '?')} steps"]
        if metadata.get("modelspec.trigger_phrase"):
            parts.append(f"trigger “{metadata['modelspec.trigger_phrase']}”")
        return " · ".join(parts), shown

    def try_it(self, base: str, arch: str, prediction_type: str, tokenizer: str, adapter: str | None, prompt: str,
               strength: float, seed: float, steps: float, size: float) -> tuple:
        if not adapter:
            raise WorkspaceError("choose an adapter file first (train one, or refresh the list)")
        if not prompt or not prompt.strip():
            raise WorkspaceError("type a prompt")
        started = time.time()
        try:
            with_image, without_image = pipelines.try_adapter(
                self.cache, base, str(self.ws.output_file(adapter)), prompt, float(strength), int(seed or 0),
                steps=int(steps or 20), size=int(size or 512), arch=arch, prediction_type=prediction_type,
                tokenizer=tokenizer)
        except Exception as error:
            from methods.files import AdapterFileError
            from trainer.models import ModelLoadError

            if isinstance(error, AdapterFileError | ModelLoadError):
                raise WorkspaceError(str(error)) from None
            raise
        return with_image, without_image, f"Rendered in {time.time() - started:.1f} s (seed {int(seed or 0)})."

    # ================================================================ presets and TOML
    def preset_choices(self) -> list[tuple[str, str]]:
        choices = []
        for folder in self.preset_dirs:
            if not folder.is_dir():
                continue
            for path in sorted([*folder.glob("*.toml"), *folder.glob("*/*.toml")]):
                label = ("workspace: " if folder == self.ws.presets else "") + str(path.relative_to(folder))
                choices.append((label, str(path)))
        return choices

    def merged_values(self, text: str | dict, args: tuple, keep: tuple[str, ...] = ()) -> list[Any]:
        """Form values from a TOML text. The form's base model, dataset and output folders stay where the TOML
        sets none; the keys in ``keep`` stay whatever the TOML says."""
        data = tomllib.loads(text) if isinstance(text, str) else text
        current = self.values(args)
        for key in (*KEEP_WHEN_MISSING, *keep):
            section, name = key.split(".")
            table = data.setdefault(section, {})
            if isinstance(table, dict) and (name not in table or key in keep):
                table[name] = form.Field.from_ui(next(f for f in self.fields if f.key == key), current[key])
        return self.ordered(form.config_to_values(TrainerConfig.from_dict(data)))

    def load_preset(self, path: str | None, *args) -> list[Any]:
        if not path:
            raise WorkspaceError("choose a preset first")
        file = Path(path)
        if path not in {value for _, value in self.preset_choices()} or not file.is_file():
            raise WorkspaceError(f"{path}: not one of the presets (refresh the list)")
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
            # Paths in a preset of the project (a demo model or dataset) are relative to the project folder.
            for section, name in (("model", "base"), ("model", "tokenizer"), ("model", "vae"), ("dataset", "dir")):
                table = data.get(section)
                value = table.get(name) if isinstance(table, dict) else None
                if isinstance(value, str) and value and not Path(value).expanduser().is_absolute() \
                        and not Path(value).exists() and (PROJECT_ROOT / value).exists():
                    table[name] = str(PROJECT_ROOT / value)
            # A preset is a recipe: outputs stay in this workspace, and the dataset folder chosen here stays
            # unless the preset brings its own (one that exists, like a demo dataset).
            dataset = data.get("dataset", {}).get("dir") if isinstance(data.get("dataset"), dict) else None
            own_dataset = isinstance(dataset, str) and dataset and Path(dataset).expanduser().is_dir()
            keep = ("output.dir",) if own_dataset else ("dataset.dir", "output.dir")
            values = self.merged_values(data, args, keep=keep)
        except (ConfigError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"preset {file.name}: {error}") from None
        kept = "your output folder is kept" if own_dataset else "your dataset and output folders are kept"
        return [*values, f"Loaded preset `{file.name}` ({kept})."]

    def apply_toml(self, text: str, *args) -> list[Any]:
        try:
            values = self.merged_values(text or "", args)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"not valid TOML ({error})") from None
        return [*values, "Applied the TOML to the form."]

    def upload_toml(self, file: str | None, *args) -> list[Any]:
        if not file:
            return [gr.skip()] * (len(self.keys) + 2)
        text = Path(file).read_text(encoding="utf-8", errors="replace")
        values = self.apply_toml(text, *args)
        return [*values[:-1], text, f"Loaded `{Path(file).name}`."]

    def show_toml(self, *args) -> tuple[str, str, str]:
        config = self.config_from(args)
        text = config.to_toml()
        path = self.ws.root / "configs" / f"{workspace.sanitize_folder_name(config.output.name)}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        workspace.write_text_atomic(path, text.rstrip("\n"))
        return text, form.cli_command(str(path)), f"Written to `{path}`."

    def save_preset(self, name: str, *args) -> tuple[str, str, Any, str]:
        config = self.config_from(args)
        if not name or not name.strip():
            raise WorkspaceError("type a preset name")
        path = self.ws.presets / f"{workspace.sanitize_folder_name(name)}.toml"
        replaced = path.exists()
        workspace.write_text_atomic(path, config.to_toml().rstrip("\n"))
        self.remember(config)
        choices = gr.update(choices=self.preset_choices(), value=str(path))
        return (config.to_toml(), form.cli_command(str(path)), choices,
                f"Preset {'replaced' if replaced else 'saved'}: `{path}`.")

    # ================================================================ page load
    def on_load(self) -> list[Any]:
        config = self.initial_config()
        values = form.config_to_values(config)
        try:
            dataset = self.dataset_view(values["dataset.dir"], values["dataset.caption_extension"])
        except USER_ERRORS as error:
            dataset = ([], [], gr.skip(), f"⚠️ {error}")
        return [*self.ordered(values), *dataset, gr.update(choices=self.preset_choices(), value=None)]


# ====================================================================================================== rendering
def newest_first(previews: list[str]) -> list[str]:
    """Preview files (``step000050_0.png``, ``step000050_1.png``, …) with the latest step first and each step's
    prompts in order: the newest previews show what the adapter does now, without scrolling."""
    batches = [list(batch) for _, batch in itertools.groupby(previews, key=lambda p: Path(p).name.rsplit("_", 1)[0])]
    return [path for batch in reversed(batches) for path in batch]


def adapter_label(path: str) -> str:
    """``outputs/my_adapter.safetensors``: the file and its folder, for the adapter list."""
    file = Path(path)
    return f"{file.parent.name}/{file.name}"


def progress_html(fraction: float, text: str) -> str:
    percent = max(0.0, min(1.0, float(fraction))) * 100
    return (f'<div class="rw-progress" role="progressbar" aria-valuenow="{percent:.0f}" aria-valuemin="0" '
            f'aria-valuemax="100"><div class="bar" style="width:{percent:.1f}%"></div>'
            f'<div class="label">{html.escape(text)}</div></div>')


def loss_plot(view: JobView):
    if not view.losses:
        return None
    from trainer.plots import loss_curve_png

    series = {"loss": view.losses}
    if view.validation:
        series["validation"] = view.validation
    smoothing = 0.6 if len(view.losses) >= 20 else 0.0
    return loss_curve_png(series, title="training loss", smoothing=smoothing, width=720, height=320)


# ====================================================================================================== layout
def _component(field: form.Field, value: Any, **extra: Any):
    """The input for one field, showing ``value`` (already in its UI form, see Field.to_ui)."""
    common = {"label": field.label, "info": field.info, "elem_id": "f-" + field.key.replace(".", "-"),
              "value": value, **extra}
    if field.kind == "choice":
        return gr.Dropdown(choices=list(field.choices), **common)
    if field.kind == "bool":
        return gr.Checkbox(**common)
    if field.kind == "int":
        return gr.Number(precision=0, **common)
    if field.kind == "float":
        return gr.Number(**common)
    if field.kind.startswith("optional"):  # empty means "not set" (None), which a gr.Number cannot express
        return gr.Textbox(placeholder="empty = not set", **common)
    if field.kind in ("lines", "table", "text"):
        return gr.Textbox(lines=3 if field.kind == "lines" else 2, **common)
    return gr.Textbox(**common)


def job_controls(start_label: str, idle_status: str, ids: tuple[str, str, str, str, str]) -> tuple:
    """Start and Stop buttons, the message of the last click, the job's status line and its progress bar."""
    start_id, stop_id, message_id, status_id, progress_id = ids
    with gr.Row():
        start = gr.Button(start_label, variant="primary", elem_id=start_id)
        stop = gr.Button("Stop", variant="stop", elem_id=stop_id)
    message = gr.Markdown(elem_id=message_id)
    status = gr.Markdown(idle_status, elem_id=status_id)
    progress = gr.HTML(progress_html(0, "idle"), elem_id=progress_id)
    return start, stop, message, status, progress


def build_app(ws: Workspace, ui: RankwrightUI | None = None) -> tuple[gr.Blocks, RankwrightUI]:
    ui = ui or RankwrightUI(ws)
    config = ui.initial_config()
    values = form.config_to_values(config)
    fields = {field.key: field for field in ui.fields}
    comps: dict[str, Any] = {}

    def make(key: str, **extra: Any):
        comps[key] = _component(fields[key], values[key], **extra)
        return comps[key]

    def grid(keys: list[str], columns: int = 3) -> None:
        for start in range(0, len(keys), columns):
            with gr.Row():
                for key in keys[start:start + columns]:
                    make(key)

    by_section = {section: [f.key for f in form.config_fields() if f.section == section] for section in form.SECTIONS}
    training_sections = ("train", "sample", "output", "dataset", "dit")

    with gr.Blocks(title="Rankwright") as demo:
        gr.Markdown("# Rankwright\nTrain LoRA, LoHa, LoKr, OFT and BOFT adapters for Stable Diffusion.")
        with gr.Tabs():
            # ------------------------------------------------------------------ dataset
            with gr.Tab("Dataset", id="dataset", elem_id="tab-dataset"):
                with gr.Row():
                    make("dataset.dir", scale=4)
                    open_folder = gr.Button("Open folder", scale=1, elem_id="open-folder")
                with gr.Row():
                    concept = gr.Dropdown(choices=["subject"], value="subject", allow_custom_value=True,
                                          label="Concept (sub-folder)", elem_id="concept",
                                          info="uploads go to <repeats>_<concept>; the name is the class word")
                    repeats = gr.Number(value=1, precision=0, minimum=1, label="Repeats", elem_id="repeats",
                                        info="times each image is seen per epoch (kohya's N_name folder)")
                    repeats_button = gr.Button("Set repeats", elem_id="set-repeats")
                uploads = gr.File(file_count="multiple", label="Drop images, caption .txt files or a .zip here",
                                  elem_id="uploads", height=140)
                upload_report = gr.Markdown(elem_id="upload-report")
                dataset_summary = gr.Markdown(elem_id="dataset-summary")
                gallery = gr.Gallery(label="Images (select one to edit its caption)", columns=6, height=420,
                                     allow_preview=False, elem_id="dataset-gallery", object_fit="contain",
                                     fit_columns=False)
                paths_state = gr.State([])
                selected = gr.Textbox(visible=False, elem_id="selected-image")
                with gr.Row():
                    with gr.Column(scale=3):
                        selected_label = gr.Markdown("Select an image.", elem_id="selected-label")
                        caption = gr.Textbox(label="Caption", lines=2, elem_id="caption")
                        with gr.Row():
                            save_caption = gr.Button("Save caption", variant="primary", elem_id="save-caption")
                            delete_button = gr.Button("Delete image", variant="stop", elem_id="delete-image")
                    with gr.Column(scale=2):
                        trigger = gr.Textbox(label="Trigger word", elem_id="trigger",
                                             info="put first in every caption that lacks it")
                        trigger_button = gr.Button("Add to all captions", elem_id="add-trigger")
                    with gr.Column(scale=2):
                        find = gr.Textbox(label="Find", elem_id="find")
                        replace = gr.Textbox(label="Replace with", elem_id="replace")
                        replace_button = gr.Button("Replace in all captions", elem_id="find-replace")
                dataset_status = gr.Markdown(elem_id="dataset-status")

            # ------------------------------------------------------------------ model and method
            with gr.Tab("Model & method", id="model", elem_id="tab-model"):
                with gr.Row():
                    make("model.base", scale=4)
                    detect_button = gr.Button("Detect", scale=1, elem_id="detect")
                detected = gr.Markdown(elem_id="detected")
                with gr.Accordion("Advanced model settings", open=False):
                    grid([k for k in by_section["model"] if k != "model.base"])
                with gr.Row():
                    make("network.method")
                    make("network.preset")
                method_description = gr.Markdown(f"*{form.method_description(values['network.method'])}*",
                                                 elem_id="method-description")
                groups = []
                for method, method_fields in form.method_fields().items():
                    with gr.Group(visible=method == values["network.method"],
                                  elem_id=f"options-{method}") as group:
                        main = [f.key for f in method_fields if f.main]
                        rest = [f.key for f in method_fields if not f.main]
                        grid(main, 4)
                        with gr.Accordion(f"More {method} options", open=False):
                            grid(rest, 4)
                    groups.append(group)
                estimate = gr.Markdown(elem_id="estimate")
                with gr.Accordion("Advanced target settings", open=False):
                    grid([k for k in by_section["network"] if k not in ("network.method", "network.preset")], 2)

            # ------------------------------------------------------------------ training
            with gr.Tab("Training", id="training", elem_id="tab-training"):
                with gr.Row():
                    preset = gr.Dropdown(choices=ui.preset_choices(), value=None, label="Preset", elem_id="preset",
                                         scale=3,
                                         info="presets/*.toml and presets saved in the workspace")
                    load_preset = gr.Button("Load preset", scale=1, elem_id="load-preset")
                main_keys = [k for s in training_sections for k in by_section[s] if fields[k].main
                             and k != "dataset.dir"]
                grid(main_keys, 4)
                with gr.Accordion("Advanced", open=False, elem_id="advanced"):
                    for section in training_sections:
                        gr.Markdown(f"**[{section}]**")
                        grid([k for k in by_section[section] if not fields[k].main], 4)
                start_button, stop_button, job_message, job_status, progress = job_controls(
                    "Start training", "No training job yet.",
                    ids=("start", "stop", "job-message", "job-status", "progress"))
                with gr.Row():
                    loss_image = gr.Image(label="Loss", type="pil", interactive=False, elem_id="loss-plot",
                                          height=320)
                    previews = gr.Gallery(label="Previews", columns=3, height=320, elem_id="previews",
                                          allow_preview=True)
                log_box = gr.Textbox(label="Log", lines=12, max_lines=12, autoscroll=True, elem_id="log",
                                     elem_classes="rw-mono", interactive=False)

            # ------------------------------------------------------------------ compare
            with gr.Tab("Compare", id="compare", elem_id="tab-compare"):
                gr.Markdown("Train several methods with the settings of the other tabs — the same data, steps and "
                            "seed, each method with its own options from *Model & method* — then compare previews, "
                            "loss, size, speed and prior drift (how much each adapter changes unrelated prompts).")
                with gr.Row():
                    compare_methods = gr.CheckboxGroup(choices=ui.methods, label="Methods", elem_id="compare-methods",
                                                       value=[m for m in DEFAULT_METHODS if m in ui.methods],
                                                       scale=3)
                    compare_steps = gr.Number(value=None, precision=0, minimum=1, elem_id="compare-steps",
                                              label="Steps per method (empty: the Training tab's)", scale=1)
                compare_drift = gr.Textbox(lines=2, elem_id="compare-drift",
                                           label="Prior-drift prompts, one per line (empty: a generic list, or the "
                                                 "toy model's own)")
                compare_button, compare_stop, compare_message, compare_status, compare_progress = job_controls(
                    "Compare", "No comparison yet.",
                    ids=("compare-start", "compare-stop", "compare-message", "compare-status", "compare-progress"))
                compare_table = gr.Dataframe(label="Results", interactive=False, wrap=True, elem_id="compare-table")
                with gr.Row():
                    compare_grid = gr.Image(label="Previews (rows: base model, then each method)", type="filepath",
                                            interactive=False, elem_id="compare-grid")
                    compare_loss = gr.Image(label="Loss per method", type="pil", interactive=False,
                                            elem_id="compare-loss", height=320)
                compare_files = gr.File(label="Report (click to download)", file_count="multiple",
                                        interactive=False, elem_id="compare-files")
                compare_session = gr.State({})

            # ------------------------------------------------------------------ results
            with gr.Tab("Results", id="results", elem_id="tab-results"):
                refresh_button = gr.Button("Refresh", elem_id="refresh-results")
                result_files = gr.File(label="Saved adapters (click to download)", file_count="multiple",
                                       interactive=False, elem_id="result-files")
                adapter = gr.Dropdown(label="Adapter", choices=[], elem_id="adapter")
                adapter_summary = gr.Markdown(elem_id="adapter-summary")
                with gr.Accordion("Metadata", open=False):
                    metadata = gr.JSON(label="Metadata", elem_id="metadata")
                gr.Markdown("### Try it\nThe same prompt and seed with the adapter and without it (base model from "
                            "the Model tab).")
                with gr.Row():
                    prompt = gr.Textbox(label="Prompt", scale=3, elem_id="try-prompt")
                    strength = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Strength", elem_id="try-strength")
                    seed = gr.Number(value=1234, precision=0, label="Seed", elem_id="try-seed")
                with gr.Row():
                    steps = gr.Number(value=20, precision=0, minimum=1, label="Steps", elem_id="try-steps")
                    size = gr.Number(value=512, precision=0, minimum=8, step=8, label="Size (px)", elem_id="try-size")
                    generate = gr.Button("Generate", variant="primary", elem_id="try-generate")
                with gr.Row():
                    with_image = gr.Image(label="With adapter", type="pil", interactive=False, elem_id="try-with",
                                          height=384)
                    without_image = gr.Image(label="Without", type="pil", interactive=False, elem_id="try-without",
                                             height=384)
                try_status = gr.Markdown(elem_id="try-status")

            # ------------------------------------------------------------------ config
            with gr.Tab("Config", id="config", elem_id="tab-config"):
                gr.Markdown("The form as the TOML file `python -m trainer train --config FILE` reads. Edit and apply "
                            "it, or save it as a preset.")
                toml_box = gr.Textbox(label="TOML", lines=24, max_lines=40, elem_id="toml", elem_classes="rw-mono",
                                      buttons=["copy"])
                with gr.Row():
                    show_button = gr.Button("Show the form as TOML", elem_id="show-toml")
                    apply_button = gr.Button("Apply this TOML to the form", elem_id="apply-toml")
                    toml_file = gr.File(label="Load a .toml file", file_types=[".toml"], elem_id="toml-file",
                                        height=90)
                with gr.Row():
                    preset_name = gr.Textbox(label="Preset name", elem_id="preset-name", scale=3)
                    save_preset = gr.Button("Save as preset", elem_id="save-preset", scale=1)
                cli_box = gr.Textbox(label="Same run from a shell", elem_id="cli", buttons=["copy"],
                                     interactive=False)
                config_status = gr.Markdown(elem_id="config-status")

        timer = gr.Timer(1.0)
        session = gr.State({})
        inputs = [comps[key] for key in ui.keys]
        extension = comps["dataset.caption_extension"]
        dataset_dir = comps["dataset.dir"]
        view_outputs = [gallery, paths_state, concept, dataset_summary]
        guard = ui.guard

        # dataset
        open_folder.click(guard(ui.dataset_view, 4, 3), [dataset_dir, extension], view_outputs)
        dataset_dir.submit(guard(ui.dataset_view, 4, 3), [dataset_dir, extension], view_outputs)
        uploads.upload(guard(ui.upload, 6, 1), [uploads, dataset_dir, concept, repeats, extension],
                       [uploads, upload_report, *view_outputs])
        gallery.select(guard(ui.select_image, 3, 2), [paths_state, extension], [selected, caption, selected_label])
        save_caption.click(guard(ui.save_caption, 5, 0), [dataset_dir, selected, caption, extension],
                           [dataset_status, *view_outputs])
        caption.submit(guard(ui.save_caption, 5, 0), [dataset_dir, selected, caption, extension],
                       [dataset_status, *view_outputs])
        trigger_button.click(guard(ui.add_trigger, 6, 0), [dataset_dir, trigger, extension, selected],
                             [dataset_status, caption, *view_outputs])
        replace_button.click(guard(ui.find_replace, 6, 0), [dataset_dir, find, replace, extension, selected],
                             [dataset_status, caption, *view_outputs])
        repeats_button.click(guard(ui.set_repeats, 5, 0), [dataset_dir, concept, repeats, extension],
                             [dataset_status, *view_outputs]).then(lambda: ("", "", "Select an image."), None,
                                                                   [selected, caption, selected_label])
        delete_button.click(guard(ui.delete_image, 7, 2), [dataset_dir, selected, extension],
                            [selected, caption, dataset_status, *view_outputs])

        # model and method
        model_inputs = [comps["model.base"], comps["model.arch"], comps["model.prediction_type"],
                        comps.get("model.tokenizer", gr.State(""))]
        detect_button.click(guard(ui.detect, 1, 0), model_inputs, [detected]).then(
            ui.estimate, inputs, [estimate], show_progress="hidden")
        comps["network.method"].change(ui.method_changed, [comps["network.method"]], [*groups, method_description],
                                       show_progress="hidden")
        estimate_triggers = [comps[k].change for k in ui.keys if k.startswith("network.")
                             or k in ("train.train_text_encoder", "output.save_dtype", "model.arch")]
        gr.on(estimate_triggers, ui.estimate, inputs, [estimate], trigger_mode="always_last",
              show_progress="hidden")

        # training
        start_button.click(guard(ui.start, 2, 0), inputs, [job_message, session], concurrency_limit=1)
        stop_button.click(guard(ui.stop, 1, 0), None, [job_message])
        load_preset.click(guard(ui.load_preset, len(inputs) + 1, len(inputs)), [preset, *inputs],
                          [*inputs, job_message])
        result_outputs = [result_files, adapter]
        timer.tick(ui.poll, [session], [job_status, progress, loss_image, previews, log_box, *result_outputs,
                                         session], show_progress="hidden", concurrency_limit=None, queue=False)

        # compare
        compare_button.click(guard(ui.compare, 2, 0), [compare_methods, compare_steps, compare_drift, *inputs],
                             [compare_message, compare_session], concurrency_limit=1)
        compare_stop.click(guard(ui.stop, 1, 0), None, [compare_message])
        timer.tick(ui.poll_compare, [compare_session], [compare_status, compare_progress, compare_table, compare_grid,
                                                        compare_loss, compare_files, compare_session],
                   show_progress="hidden", concurrency_limit=None, queue=False)

        # results
        refresh_button.click(guard(ui.refresh_results, 2), None, result_outputs)
        adapter.change(guard(ui.adapter_info, 2, 0), [adapter], [adapter_summary, metadata], show_progress="hidden")
        generate.click(guard(ui.try_it, 3, 2), [*model_inputs, adapter, prompt, strength, seed, steps, size],
                       [with_image, without_image, try_status])

        # config
        show_button.click(guard(ui.show_toml, 3, 2), inputs, [toml_box, cli_box, config_status])
        apply_button.click(guard(ui.apply_toml, len(inputs) + 1, len(inputs)), [toml_box, *inputs],
                           [*inputs, config_status])
        toml_file.upload(guard(ui.upload_toml, len(inputs) + 2, len(inputs) + 1), [toml_file, *inputs],
                         [*inputs, toml_box, config_status])
        save_preset.click(guard(ui.save_preset, 4, 3), [preset_name, *inputs], [toml_box, cli_box, preset,
                                                                                   config_status])

        demo.load(ui.on_load, None, [*inputs, *view_outputs, preset])
        demo.load(ui.estimate, inputs, [estimate], show_progress="hidden")

    ui.demo = demo
    threading.Thread(target=pipelines.warm_up, args=("sd1",), daemon=True).start()
    return demo, ui
