"""The Gradio Blocks app: Dataset, Model & method, Training, Compare, Results and Config tabs.

:class:`RankwrightUI` holds the callbacks — one mixin per tab (``ui/*_tab.py``), each calling the trainer's public
API (and ui.workspace / ui.jobs / ui.pipelines) — and what they share: the form ↔ config conversion, the checks
that confine every folder a browser names to the workspace, and the page load. :func:`build_app` lays out the tabs
(each module's ``layout``) and then wires them (each module's ``wire``). Callbacks never let a user's mistake
escape: :meth:`RankwrightUI.guard` turns it into a message in the tab's status box and a warning toast.

The form is kept per browser (``gr.BrowserState``, in its local storage): a reload shows the edits it had, also
unsaved ones, and the Compare tab's choices; a browser without any starts from the last started settings, else the
toy demo.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from methods.base import ConfigError
from methods.files import write_text_atomic
from trainer.config import TrainerConfig

from . import compare_tab, config_tab, dataset_tab, form, model_tab, pipelines, results_tab, training_tab, workspace
from .common import USER_ERRORS, Layout, adapter_label, progress_html  # noqa: F401  (part of this module's API)
from .compare_tab import CompareCallbacks
from .config_tab import KEEP_WHEN_MISSING, ConfigCallbacks  # noqa: F401
from .dataset_tab import DatasetCallbacks
from .jobs import PROJECT_ROOT, JobRunner
from .model_tab import ModelCallbacks
from .results_tab import ResultsCallbacks
from .tasks import TaskSlot
from .training_tab import TrainingCallbacks, loss_frame, newest_first  # noqa: F401
from .workspace import Workspace

log = logging.getLogger("rankwright.ui")

THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="slate")
CSS = """
.rw-progress { width: 100%; background: var(--block-background-fill); border: 1px solid var(--border-color-primary);
               border-radius: 8px; height: 26px; position: relative; overflow: hidden; }
.rw-progress > .bar { height: 100%; background: var(--color-accent); transition: width .4s; }
.rw-progress > .label { position: absolute; inset: 0; display: flex; align-items: center; justify-content: center;
                        font-weight: 600; font-variant-numeric: tabular-nums; }
.rw-mono textarea { font-family: var(--font-mono); font-size: 13px; }
#demo-banner { border: 2px solid var(--color-accent); border-radius: 8px; padding: 4px 12px; }
"""
THEME_TOGGLE_JS = """() => { const dark = !document.body.classList.contains('dark');
  document.body.classList.toggle('dark', dark); localStorage.setItem('rankwright-theme', dark ? 'dark' : 'light'); }"""
THEME_RESTORE_JS = """() => { const theme = localStorage.getItem('rankwright-theme');
  if (theme) document.body.classList.toggle('dark', theme === 'dark'); }"""
DEMO_PRESET = "toy_demo.toml"
DEMO_DATASET = "toy_demo"
FORM_STORAGE_KEY = "rankwright-form"
MAX_STORED_TEXT = 20_000  # characters of one stored form value that a page load accepts


class RankwrightUI(DatasetCallbacks, ModelCallbacks, TrainingCallbacks, CompareCallbacks, ResultsCallbacks,
                   ConfigCallbacks):
    """The callbacks, independent of the layout (unit-tested without a browser)."""

    def __init__(self, ws: Workspace, runner: JobRunner | None = None, cache: pipelines.PipelineCache | None = None,
                 preset_dirs: list[Path] | None = None, tensorboard_url: str | None = None):
        self.ws = ws
        self.runner = runner or JobRunner(ws.jobs)
        self.runner.accept = lambda record: self.own_job(record) is not None
        self.cache = cache or pipelines.PipelineCache()
        self.preset_dirs = preset_dirs if preset_dirs is not None else [PROJECT_ROOT / "presets", ws.presets]
        self.fields = form.all_fields()
        self.keys = [field.key for field in self.fields]
        self.field_by_key = {field.key: field for field in self.fields}
        self.methods = list(form.method_fields())
        # What the web server may send, fixed at launch: never widened by anything a browser sends.
        self.allowed_paths: list[str] = [str(folder) for folder in ws.served]
        self.checker = workspace.ImageChecker()
        self.foreign_jobs: set[str] = set()  # job records on disk that are ignored (warned about once)
        self.captioning, self.reporting, self.trying = TaskSlot("captioning"), TaskSlot("report"), TaskSlot("try it")
        self.regularising = TaskSlot("regularisation")
        self.try_results: list[tuple[Any, str]] = []
        self.tensorboard_url = tensorboard_url
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
                log.exception("callback %s failed", getattr(function, "__name__", "?"))
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
        write_text_atomic(self.ws.last_config, workspace.text_file(config.to_toml().rstrip("\n")))

    def confine(self, config: TrainerConfig) -> TrainerConfig:
        """``config`` with every folder a browser chose checked against the workspace (WorkspaceError naming the fix
        otherwise): the dataset and regularisation folders resolved into ``datasets/`` or a ``--data-dir`` and
        existing, the output folder (and an adapter to start from) in ``outputs/``, a caption extension the UI
        edits. Relative names are taken in those folders."""
        from .workspace import WorkspaceError

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

    def tensorboard_text(self) -> str:
        logs = self.ws.outputs
        if self.tensorboard_url:
            return (f"**TensorBoard**: [{self.tensorboard_url}]({self.tensorboard_url}) (started by the server for "
                    f"`{logs}`; it listens on this machine only — from elsewhere use an SSH tunnel)")
        return (f"**TensorBoard**: runs log to `<output folder>/tensorboard` in `{logs}`. On the server run "
                f"`tensorboard --logdir {logs}` and open http://localhost:6006, or start the UI with "
                "`python app.py --tensorboard 6006` to have it started and linked here.")

    # ================================================================ the form, per browser
    def stored_values(self, stored: Any) -> dict[str, Any]:
        """The form values a browser kept (``gr.BrowserState``), each checked against its field: a value that no
        field could show (an unknown choice, a number that is not one, an over-long text) is left out."""
        values = stored.get("values") if isinstance(stored, dict) else None
        if not isinstance(values, dict):
            return {}
        kept = {}
        for key, value in values.items():
            field = self.field_by_key.get(key)
            if field is None:
                continue
            if field.kind == "choice":
                allowed = {choice[1] if isinstance(choice, tuple) else choice for choice in field.choices}
                if value in allowed:
                    kept[key] = value
            elif field.kind == "bool":
                if isinstance(value, bool):
                    kept[key] = value
            elif field.kind in ("int", "float"):
                if isinstance(value, int | float) and not isinstance(value, bool):
                    kept[key] = value
            elif isinstance(value, str) and len(value) <= MAX_STORED_TEXT:
                kept[key] = value
        return kept

    def form_state(self, *args) -> dict[str, Any]:
        """What a browser keeps of the page: the form's values, the preset chosen and the Compare tab's choices.
        ``args``: the form's values in field order, then the preset, the compared methods, steps and prompts."""
        count = len(self.keys)
        preset, methods, steps, drift = (list(args[count:]) + [None] * 4)[:4]
        return {"values": self.values(args[:count]), "preset": preset, "compare": {
            "methods": methods, "steps": steps, "drift": drift}}

    def is_demo(self, values: dict[str, Any]) -> bool:
        return str(values.get("dataset.dir", "")) == str(self.ws.datasets / DEMO_DATASET)

    def on_load(self, stored: Any = None) -> list[Any]:
        """The page as this browser left it: its stored form (else the last settings, else the toy demo), the
        dataset it shows, the preset, the Compare tab's choices and — for the demo — the hint where to start."""
        config = self.initial_config()
        values = form.config_to_values(config)
        values.update(self.stored_values(stored))
        try:
            dataset = self.dataset_view(values["dataset.dir"], values["dataset.caption_extension"])
        except USER_ERRORS as error:
            dataset = ([], [], gr.skip(), f"⚠️ {error}")
        presets = self.preset_choices()
        stored = stored if isinstance(stored, dict) else {}
        preset = stored.get("preset") if stored.get("preset") in {path for _, path in presets} else None
        demo_preset = str(PROJECT_ROOT / "presets" / DEMO_PRESET)
        if preset is None and self.is_demo(values) and demo_preset in {path for _, path in presets}:
            preset = demo_preset
        compare = stored.get("compare") if isinstance(stored.get("compare"), dict) else {}
        methods = [m for m in compare.get("methods") or [] if m in self.methods] \
            if isinstance(compare.get("methods"), list) else None
        steps = compare.get("steps") if isinstance(compare.get("steps"), int | float) else None
        drift = compare.get("drift") if isinstance(compare.get("drift"), str) else None
        return [*self.ordered(values), *dataset, gr.update(choices=presets, value=preset),
                methods if methods is not None else gr.skip(), steps if steps is not None else gr.skip(),
                drift[:MAX_STORED_TEXT] if drift is not None else gr.skip(),
                gr.update(visible=self.is_demo(values))]


def browser_state_secret(ws: Workspace) -> str:
    """The key the browsers' stored forms are encrypted with: one per workspace (kept across restarts, so a
    restarted server still reads them), created on first use, readable by its owner only."""
    path = ws.root / ".browser_state_key"
    try:
        # Created with mode 0600 and O_EXCL: never readable by others, not even for a moment, and two servers
        # starting on one workspace agree on the key (the second reads the first's).
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text(encoding="utf-8").strip()
    key = secrets.token_hex(32)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(key + "\n")
    return key


def build_app(ws: Workspace, ui: RankwrightUI | None = None) -> tuple[gr.Blocks, RankwrightUI]:
    ui = ui or RankwrightUI(ws)
    L = Layout(form.config_to_values(ui.initial_config()), {field.key: field for field in ui.fields}, ui.guard)
    with gr.Blocks(title="Rankwright") as demo:
        with gr.Row():
            gr.Markdown("# Rankwright\nTrain LoRA, LoHa, LoKr, OFT and BOFT adapters for Stable Diffusion.")
            theme = gr.Button("🌓 Light / dark", elem_id="theme-toggle", scale=0, min_width=160)
        with gr.Row(visible=ui.is_demo(L.values), elem_id="demo-banner") as banner:
            gr.Markdown("**Toy demo loaded**: the embedded 64 px toy model and 12 images that teach it a colour it "
                        "never saw (“zq”, purple). Press **Start training** in the *Training* tab — about two "
                        "minutes on a CPU — and watch the loss and the previews.", elem_id="demo-hint")
            go = gr.Button("Go to Training", variant="primary", elem_id="demo-go", scale=0, min_width=160)
        with gr.Tabs() as tabs:
            for module, name, tab_id in ((dataset_tab, "Dataset", "dataset"), (model_tab, "Model & method", "model"),
                                         (training_tab, "Training", "training"), (compare_tab, "Compare", "compare"),
                                         (results_tab, "Results", "results"), (config_tab, "Config", "config")):
                with gr.Tab(name, id=tab_id, elem_id=f"tab-{tab_id}") as tab:
                    module.layout(ui, L)
                L.tab_components[tab_id] = tab
        L.timer = gr.Timer(1.0)
        L.visible_tab = gr.State("dataset")
        for tab_id, tab in L.tab_components.items():
            tab.select(lambda shown=tab_id: shown, None, [L.visible_tab], show_progress="hidden", queue=False)
        for module in (dataset_tab, model_tab, training_tab, compare_tab, results_tab, config_tab):
            module.wire(ui, L)
        L.wire_polls()

        theme.click(None, js=THEME_TOGGLE_JS)
        go.click(lambda: (gr.Tabs(selected="training"), "training"), None, [tabs, L.visible_tab]).then(
            ui.replot, [L.tabs["training"]["smoothing"], L.tabs["training"]["log_scale"]],
            [L.tabs["training"]["loss_plot"]], show_progress="hidden")
        compare, preset = L.tabs["compare"], L.tabs["training"]["preset"]
        kept = [*L.inputs, preset, compare["methods"], compare["steps"], compare["drift"]]
        stored = gr.BrowserState({}, storage_key=FORM_STORAGE_KEY, secret=browser_state_secret(ws))
        effective = [L.tabs["model"]["effective"], L.tabs["training"]["effective"]]

        def on_change(*args):
            text = ui.effective(*args[:len(ui.keys)])
            return text, text, ui.form_state(*args), gr.update(visible=ui.is_demo(ui.values(args[:len(ui.keys)])))

        gr.on([component.change for component in kept], on_change, kept, [*effective, stored, banner],
              trigger_mode="always_last", show_progress="hidden", queue=False)
        view = L.tabs["dataset"]["view_outputs"]
        demo.load(ui.on_load, [stored], [*L.inputs, *view, preset, compare["methods"], compare["steps"],
                                         compare["drift"], banner])
        demo.load(ui.estimate, L.inputs, [L.tabs["model"]["estimate"]], show_progress="hidden")
        demo.load(None, js=THEME_RESTORE_JS)

    ui.demo = demo
    threading.Thread(target=pipelines.warm_up, args=("sd1",), daemon=True).start()
    ui.runner.start_dispatcher()
    return demo, ui
