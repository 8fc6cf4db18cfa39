"""The Results tab: the adapters runs saved — training results apart from the comparisons' per-method files —
each with its previews, its metadata and *Try it*: the same prompt and seed with and without the adapter.

*Try it* renders in a server thread (:mod:`ui.tasks`) with a progress bar counting denoising steps and a Stop that
ends it within a step; each render adds a labelled pair (adapter, strength, seed) to the gallery, newest first,
so renders at two strengths stand side by side. Its size defaults to the adapter's training resolution.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import gradio as gr

from . import pipelines
from .common import Layout, adapter_label, progress_html
from .tasks import Task, TaskSlot
from .workspace import WorkspaceError

TRY_PAIRS_KEPT = 12


class ResultsCallbacks:
    """Mixed into :class:`ui.app.RankwrightUI`."""

    trying: TaskSlot
    try_results: list[tuple[Any, str]]

    # ================================================================ the lists
    def saved_files(self) -> list[dict[str, Any]]:
        """Every adapter saved by a job of this workspace that still exists, newest first, with the job's kind
        and (for a comparison) the method of the run that saved it."""
        found, seen = [], set()
        for record in filter(self.own_job, self.runner.history()):
            view = self.runner.view(record)
            for save in reversed(view.saves):
                path = Path(save.get("path", ""))
                if self.servable([str(path)]) and str(path) not in seen:
                    seen.add(str(path))
                    found.append({**save, "job": record.id, "kind": record.kind, "run": record.output_name,
                                  "size_bytes": path.stat().st_size})
        return found

    def results(self, selected: str | None = None) -> tuple[Any, Any, Any]:
        """(training files, comparison files, the adapter dropdown: the selection kept while it exists)."""
        saves = self.saved_files()
        training = [save for save in saves if save["kind"] != "compare"]
        compared = [save for save in saves if save["kind"] == "compare"]
        choices = [(adapter_label(save["path"]), save["path"]) for save in training]
        choices += [(f"comparison {save['run']} · {save.get('method', '?')} ({Path(save['path']).name})",
                     save["path"]) for save in compared]
        paths = [path for _, path in choices]
        value = selected if selected in paths else (paths[0] if paths else None)
        return (self.downloads(save["path"] for save in training) or None,
                self.downloads(save["path"] for save in compared) or None, gr.update(choices=choices, value=value))

    def downloads(self, paths: Iterable[str]) -> list[str]:
        """Each adapter file followed by its trigger vectors' file when it has one (the two are downloaded
        together), the servable ones only (:meth:`ui.app.RankwrightUI.servable`)."""
        from methods.embeddings import embedding_path

        return self.servable([file for path in paths for file in (path, str(embedding_path(path)))])

    def refresh_results(self, selected: str | None = None) -> tuple[Any, Any, Any]:
        return self.results(selected)

    # ================================================================ one adapter
    def adapter_info(self, path: str | None) -> tuple[str, dict]:
        if not path:
            return "No adapter selected.", {}
        from methods.embeddings import METADATA_WORD, embedding_path
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
        if metadata.get(METADATA_WORD):  # pivotal tuning: the adapter needs its embedding file
            parts.append(f"trigger vectors of “{metadata[METADATA_WORD]}” in "
                         f"`{embedding_path(file).name}` (download both)")
        return " · ".join(parts), shown

    def adapter_details(self, path: str | None, prompt: str = "") -> tuple:
        """(summary, metadata, the run's previews, Try it's size and prompt) of the selected adapter."""
        summary, metadata = self.adapter_info(path)
        if not path:
            return summary, metadata, [], gr.skip(), gr.skip()
        save = next((s for s in self.saved_files() if s["path"] == str(self.ws.output_file(path))), None)
        previews: list[tuple[str, str]] = []
        default_prompt, size = "", None
        if save is not None:
            record = self.runner.record(save["job"])
            view = self.runner.view(record)
            if record.kind == "compare":
                grid = self.servable([view.report.get("grid")])
                previews = [(grid[0], "the comparison's grid: base model, then each method")] if grid else []
            else:
                previews = [(p, view.preview_captions.get(p, Path(p).name))
                            for p in self.servable(list(reversed(view.previews)))][:12]
            try:  # the run's own settings: the size its previews were rendered at, its first prompt
                from trainer.config import TrainerConfig

                config = TrainerConfig.load(record.config_path)
                default_prompt = config.sample.prompts[0] if config.sample.prompts else ""
                size = max(config.sample.width, config.sample.height) or config.dataset.resolution
            except Exception:  # an old job's settings: the file's metadata only
                pass
        default_prompt = default_prompt or str(metadata.get("modelspec.trigger_phrase") or "")
        size = size or training_size(metadata)
        return (summary, metadata, previews, size if size else gr.skip(),
                default_prompt if default_prompt and not (prompt or "").strip() else gr.skip())

    # ================================================================ a run's checkpoints
    def checkpoints_of(self, folder: str | None, selected: str | None = None, name: str | None = None) -> tuple:
        """(the run folder's checkpoints.json — the saves of run ``name`` — as a table with the pick and its
        reason, the checkpoint dropdown showing ``selected`` if listed, else the pick). The folder is confined to
        ``outputs/``; files are taken by name inside it."""
        from trainer.prior import run_checkpoints

        if not folder:
            return "No run yet.", gr.update(choices=[], value=None)
        checkpoints = run_checkpoints(self.ws.output_folder(folder), name or None)
        if not checkpoints.records:
            return ("No checkpoints listed yet: each save of the run (Advanced → *Output* → save every N steps) "
                    "is listed here with its losses and prior loss ratio.", gr.update(choices=[], value=None))
        choices = checkpoint_choices(checkpoints)
        value = selected if selected in [name for _, name in choices] else Path(checkpoints.best.path).name
        return checkpoints_markdown(checkpoints), gr.update(choices=choices, value=value)

    def adapter_checkpoints(self, adapter: str | None) -> tuple[str, Any, str, str]:
        """(table, dropdown, the run folder, the run's name) of the selected adapter's run: the folder it lies in
        and, for a job of this workspace, its output name."""
        if not adapter:
            return "No adapter selected.", gr.update(choices=[], value=None), "", ""
        file = self.ws.output_file(adapter)
        name = next((save["run"] for save in self.saved_files() if save["path"] == str(file)), "")
        return (*self.checkpoints_of(str(file.parent), file.name, name), str(file.parent), name)

    def use_checkpoint(self, folder: str | None, choice: str | None,
                       name: str | None = None) -> tuple[Any, Any, Any, str | None, str]:
        """Make the chosen checkpoint of the run the adapter of *Try it* and the download: (training files,
        comparison files, the adapter dropdown, the file to download, message). The choice is a step or a file
        name, looked up in the run folder's checkpoints.json; anything else is refused."""
        from trainer.prior import find_checkpoint

        if not folder:
            raise WorkspaceError("no run to choose a checkpoint of yet")
        try:
            record = find_checkpoint(self.ws.output_folder(folder), choice or "", name or None)
        except ValueError as error:
            raise WorkspaceError(str(error)) from None
        file = self.ws.output_file(record.path)
        training, compared, adapter = self.results(str(file))
        if adapter["value"] != str(file):  # a run the UI did not start (a shell's, in outputs/): listed all the same
            adapter = gr.update(choices=[(adapter_label(str(file)), str(file)), *adapter["choices"]], value=str(file))
        return (training, compared, adapter, self.downloads([str(file)]),
                f"Using `{file.name}` (step {record.step}): it is the adapter of *Try it* (Results tab) and the file "
                "to download.")

    # ================================================================ try it
    def try_it(self, base: str, arch: str, prediction_type: str, tokenizer: str, adapter: str | None, prompt: str,
               strength: float, seed: float, steps: float, size: float) -> tuple:
        """(image with the adapter, image without, status) rendered now (in the calling thread)."""
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

    def try_start(self, base: str, arch: str, prediction_type: str, tokenizer: str, adapter: str | None, prompt: str,
                  strength: float, seed: float, steps: float, size: float) -> str:
        """Render the pair in a server thread, with a progress bar and Stop; the gallery gets a labelled pair."""
        from trainer.sampling import RenderStopped, on_denoising_step

        if not adapter:
            raise WorkspaceError("choose an adapter file first (train one, or refresh the list)")
        if not prompt or not prompt.strip():
            raise WorkspaceError("type a prompt")
        file = self.ws.output_file(adapter)
        steps, seed, strength = int(steps or 20), int(seed or 0), float(strength)
        size = int(size or 512)
        if size % 8 or size < 8:
            raise WorkspaceError(f"the size must be a multiple of 8 pixels, got {size}")

        def run(task: Task) -> Any:
            task.progress(phase="loading the base model", done=0, total=2 * steps, unit="denoising steps")

            def step() -> None:
                if task.stop.requested():
                    raise RenderStopped("stopped from the web UI")
                if task.phase != "rendering":
                    task.progress(phase="rendering", done=0)
                task.progress(done=task.done + 1)

            with on_denoising_step(step):
                return self.try_it(base, arch, prediction_type, tokenizer, str(file), prompt, strength, seed, steps,
                                   size)

        def keep(task: Task) -> None:
            if task.status == "done" and task.result is not None:
                with_image, without_image, _ = task.result
                label = f"{file.stem} · strength {strength:g} · seed {seed} · {size} px"
                self.try_results[:0] = [(with_image, f"with {label}"),
                                        (without_image, f"without (base model) · seed {seed} · {size} px")]
                del self.try_results[2 * TRY_PAIRS_KEPT:]

        self.trying.start(f"Try it ({file.stem}, strength {strength:g}, seed {seed})", run, on_done=keep,
                          refusal=WorkspaceError)
        return "Rendering…"

    def try_stop(self) -> str:
        self.trying.stop()
        return "Stop requested: the render ends within a denoising step."

    def poll_try(self, session: dict | None) -> tuple:
        """(status, progress, the gallery of labelled pairs, session)."""
        session = dict(session or {})
        task = self.trying.task
        signature = (id(task), task.version if task else 0, len(self.try_results))
        if session.get("version") == signature:
            return gr.skip(), gr.skip(), gr.skip(), session
        session["version"] = signature
        if task is None:
            return "", progress_html(0, "idle"), list(self.try_results), session
        status = task.status_text()
        if task.status == "done" and task.result is not None:
            status = f"{task.name}: {task.result[2]}"
        return status, progress_html(task.fraction, task.progress_text()), list(self.try_results), session


def _number(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def checkpoints_markdown(checkpoints: Any) -> str:
    """The saves as a table (step, file, concept validation loss, prior ratio, drift; the pick starred) and why the
    pick is the pick."""
    lines = ["| step | file | concept validation loss | prior loss ratio | drift | |", "|---|---|---|---|---|---|"]
    for record in checkpoints.records:
        best = "★ best" if checkpoints.best is not None and record.path == checkpoints.best.path else ""
        name = Path(record.path).name.replace("`", "'").replace("|", "\\|")  # inside a table cell's code
        lines.append(f"| {record.step} | `{name}` | "
                     f"{_number(record.validation_loss, 5)} | {_number(record.prior_ratio, 4)} | "
                     f"{_number(record.drift, 3)} | {best} |")
    if checkpoints.best is not None:
        lines += ["", f"**Best: step {checkpoints.best.step}** — {checkpoints.why}. A prior loss ratio of 1.0 = the "
                      "base model unchanged on unrelated images; higher = the adapter bleeds into them (tolerance "
                      f"train.prior_max_ratio = {checkpoints.max_prior_ratio:g})."]
    return "\n".join(lines)


def checkpoint_choices(checkpoints: Any) -> list[tuple[str, str]]:
    best = checkpoints.best.path if checkpoints.best is not None else None
    return [(f"step {r.step} · {Path(r.path).name}" + (" ★ best" if r.path == best else ""), Path(r.path).name)
            for r in checkpoints.records]


def checkpoint_controls(name: str) -> dict[str, Any]:
    """A run's checkpoints table, the checkpoint dropdown, *Use this checkpoint*, its message and the chosen
    file to download (element ids ``<name>-table``, ``<name>-choice``, ``<name>-use``, ``<name>-message``,
    ``<name>-file``), with the run folder they belong to (server-side state)."""
    with gr.Accordion("Checkpoints", open=True, elem_id=name):
        table = gr.Markdown("No run yet.", elem_id=f"{name}-table")
        with gr.Row():
            choice = gr.Dropdown(label="Checkpoint", choices=[], elem_id=f"{name}-choice", scale=3)
            use = gr.Button("Use this checkpoint", elem_id=f"{name}-use", scale=1)
        message = gr.Markdown(elem_id=f"{name}-message")
        file = gr.File(label="Chosen checkpoint (click to download)", file_count="multiple", interactive=False,
                       elem_id=f"{name}-file")
    return {"table": table, "choice": choice, "use": use, "message": message, "file": file, "run": gr.State(""),
            "name": gr.State("")}


def wire_checkpoint_controls(ui: Any, L: Layout, controls: dict[str, Any]) -> None:
    """*Use this checkpoint* → the Results tab's adapter (which Try it renders) and the download."""
    results = L.tabs["results"]
    controls["use"].click(L.guard(ui.use_checkpoint, 5, 4), [controls["run"], controls["choice"], controls["name"]],
                          [results["train_files"], results["compare_files"], results["adapter"], controls["file"],
                           controls["message"]])


def training_size(metadata: dict[str, Any]) -> int | None:
    """The training resolution an adapter's metadata names (its longer side), or None."""
    text = str(metadata.get("modelspec.resolution") or metadata.get("ss_resolution") or "")
    numbers = [int(n) for n in re.findall(r"\d+", text)]
    return max(numbers) if numbers else None


def layout(ui: Any, L: Layout) -> None:
    refresh = gr.Button("Refresh", elem_id="refresh-results")
    with gr.Row():
        train_files = gr.File(label="Training results (click to download)", file_count="multiple", interactive=False,
                              elem_id="result-files")
        compare_files = gr.File(label="Comparison runs, by method", file_count="multiple", interactive=False,
                                elem_id="compare-result-files")
    adapter = gr.Dropdown(label="Adapter", choices=[], elem_id="adapter")
    summary = gr.Markdown(elem_id="adapter-summary")
    previews = gr.Gallery(label="Its previews", columns=6, height=200, elem_id="adapter-previews",
                          allow_preview=True, object_fit="contain")
    with gr.Accordion("Metadata", open=False):
        metadata = gr.JSON(label="Metadata", elem_id="metadata")
    checkpoints = checkpoint_controls("result-checkpoints")
    gr.Markdown("### Try it\nThe same prompt and seed with the adapter and without it (base model from the Model "
                "tab); each render adds a labelled pair, newest first.")
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", scale=3, elem_id="try-prompt")
        strength = gr.Slider(-1.0, 2.0, value=1.0, step=0.05, label="Strength", elem_id="try-strength")
        seed = gr.Number(value=1234, precision=0, label="Seed", elem_id="try-seed")
    with gr.Row():
        steps = gr.Number(value=20, precision=0, minimum=1, label="Steps", elem_id="try-steps")
        size = gr.Number(value=int(L.values.get("dataset.resolution") or 512), precision=0, minimum=8, step=8,
                         label="Size (px; the adapter's training resolution when selected)", elem_id="try-size")
        generate = gr.Button("Try it", variant="primary", elem_id="try-generate")
        stop = gr.Button("Stop", variant="stop", elem_id="try-stop")
    status = gr.Markdown(elem_id="try-status")
    progress = gr.HTML(progress_html(0, "idle"), elem_id="try-progress")
    gallery = gr.Gallery(label="With and without the adapter", columns=4, height=360, elem_id="try-gallery",
                         allow_preview=True, object_fit="contain")
    L.tabs["results"] = {name: value for name, value in locals().items() if name not in ("ui", "L")}


def wire(ui: Any, L: Layout) -> None:
    s, guard = L.tabs["results"], L.guard
    outputs = [s["train_files"], s["compare_files"], s["adapter"]]
    s["refresh"].click(guard(ui.refresh_results, 3), [s["adapter"]], outputs)
    s["adapter"].change(guard(ui.adapter_details, 5, 0), [s["adapter"], s["prompt"]],
                        [s["summary"], s["metadata"], s["previews"], s["size"], s["prompt"]], show_progress="hidden")
    checkpoints = s["checkpoints"]
    s["adapter"].change(guard(ui.adapter_checkpoints, 4, 0), [s["adapter"]],
                        [checkpoints["table"], checkpoints["choice"], checkpoints["run"], checkpoints["name"]],
                        show_progress="hidden")
    wire_checkpoint_controls(ui, L, checkpoints)
    model_inputs = L.tabs["model"]["model_inputs"]
    s["generate"].click(guard(ui.try_start, 1, 0), [*model_inputs, s["adapter"], s["prompt"], s["strength"],
                                                    s["seed"], s["steps"], s["size"]], [s["status"]])
    s["stop"].click(guard(ui.try_stop, 1, 0), None, [s["status"]])
    session = gr.State({})
    L.poll(ui.poll_try, [session], [s["status"], s["progress"], s["gallery"], session])
