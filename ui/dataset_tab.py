"""The Dataset tab: uploads, the gallery and caption editing, auto-captioning and the dataset report.

Auto-captioning (:func:`trainer.captioning.caption_folder`) and the report (:func:`trainer.dataset_report
.build_report`) run in a server thread (:mod:`ui.tasks`) with a progress bar and Stop; every caption is written as
soon as its batch is done, so a stop keeps them. A captioner is a hub id or a folder in the workspace's
``models/`` (:meth:`ui.workspace.Workspace.captioner`); the report's contact sheet is written into the served
``thumbnails/`` folder.
"""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path
from typing import Any

import gradio as gr

from methods.files import atomic_write_bytes

from . import workspace
from .common import USER_ERRORS, Layout, progress_html
from .tasks import Task, TaskSlot, unseen
from .workspace import WorkspaceError

REGULARISATION_FOLDER = "regularisation"  # in datasets/: <key>/ per base model, captions and settings
REPORT_ROWS = 200  # images listed in the report's table (the contact sheet shows those with warnings first)
CAPTION_MODES = [("only images without a caption", "skip_existing"), ("replace every caption", "overwrite"),
                 ("append to the caption", "append")]


class DatasetCallbacks:
    """Mixed into :class:`ui.app.RankwrightUI` (which provides ``ws``, ``checker``, ``values`` …)."""

    captioning: TaskSlot
    reporting: TaskSlot
    regularising: TaskSlot

    # ================================================================ gallery and captions
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
            lines.append(f"- {uncaptioned} image(s) without a caption (*Auto-caption* below writes them)")
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

    # ================================================================ auto-captioning
    def caption_start(self, dataset_dir: str, extension: str, model: str, kind: str, mode: str, prefix: str,
                      suffix: str, trigger: str, prompt: str, batch_size: float | None, max_new_tokens: float | None,
                      threshold: float | None, device: str) -> str:
        """Caption the dataset's images in a server thread; the Dataset tab's timer shows the progress."""
        from trainer.captioning import CaptionOptions, images_to_caption

        folder = self.ws.dataset_folder(dataset_dir)
        if not folder.is_dir():
            raise WorkspaceError(f"the dataset folder {folder} does not exist: upload images first")
        options = CaptionOptions(model=self.ws.captioner(model), kind=kind or "auto", mode=mode or "skip_existing",
                                 caption_extension=workspace.caption_extension(extension), prefix=prefix or "",
                                 suffix=suffix or "", trigger_word=trigger or "", prompt=prompt or "",
                                 batch_size=int(batch_size or 4), max_new_tokens=int(max_new_tokens or 40),
                                 threshold=float(0.35 if threshold in (None, "") else threshold),
                                 device=device or "auto")
        todo, skipped = images_to_caption(folder, options)  # validates the options; nothing loaded yet
        if not todo:
            return (f"Nothing to caption: all {len(skipped)} image(s) have a caption (choose “replace every "
                    "caption” or “append” to caption them again).")

        def run(task: Task) -> Any:
            from trainer.captioning import caption_folder

            def on_event(event: dict[str, Any]) -> None:
                kind = event["event"]
                if kind == "caption_loading":
                    task.progress(phase=f"loading {Path(options.model).name}", done=0, total=len(todo))
                elif kind == "caption_start":
                    task.progress(phase="captioning", done=0, total=event["total"], unit="images")
                elif kind == "caption_progress":
                    task.progress(done=event["done"], total=event["total"], eta=event.get("eta_s"))
                    task.recent = (task.recent + [(Path(r["path"]).name, r["caption"]) for r in event["recent"]])[-8:]

            return caption_folder(folder, options, on_event=on_event, stop=task.stop)

        name = f"captioning {len(todo)} image(s) with {Path(options.model).name}"
        self.captioning.start(name, run, refusal=WorkspaceError)
        return f"Started {name} ({len(skipped)} already captioned, skipped)." if skipped else f"Started {name}."

    def caption_stop(self) -> str:
        self.captioning.stop()
        return "Stop requested: the captions written so far are kept; the current batch finishes first."

    def poll_captioning(self, session: dict | None, dataset_dir: str, extension: str) -> tuple:
        """(status, progress bar, recent captions, *dataset_view when a run just ended, session)."""
        session = dict(session or {})
        task = self.captioning.task
        skips = (gr.skip(),) * 7
        if task is None or session.get("version") == (id(task), task.version):
            return (*skips, session)
        session["version"] = (id(task), task.version)
        recent = "\n".join(f"- `{name}`: {caption}" for name, caption in reversed(task.recent))
        status = task.status_text()
        if not task.running and task.result is not None:
            result = task.result
            status += (f" — {len(result.written)} caption(s) written, {len(result.skipped)} skipped, "
                       f"{len(result.failed)} failed")
            if result.failed:
                status += ": " + "; ".join(f"{Path(p).name}: {reason}" for p, reason in result.failed[:3])
        view = (gr.skip(),) * 4
        if not task.running and session.get("refreshed") != id(task):
            session["refreshed"] = id(task)
            try:
                view = self.dataset_view(dataset_dir, extension)
            except USER_ERRORS:
                pass
        return (status, progress_html(task.fraction, task.progress_text()), recent, *view, session)

    # ================================================================ regularisation images
    def regularise_start(self, count: float | None, *args) -> str:
        """Draw regularisation images with the base model in a server thread (``python -m trainer regularise``'s
        :func:`trainer.prior.regularise`): the captions without the trigger word, ``count`` images (empty or 0: one
        per training image), into ``datasets/regularisation/<key>``, where a rerun of the same settings reuses
        them."""
        from trainer.prior import regularise

        if count not in (None, "") and (not float(count).is_integer() or float(count) < 0):
            raise WorkspaceError(f"give the number of images as a whole number (0 = one per training image), "
                                 f"got {count!r}")
        config = self.confine(self.config_from(args))
        wanted = int(count) if count not in (None, "") and float(count) > 0 else None
        root = self.ws.datasets / REGULARISATION_FOLDER

        def run(task: Task) -> Any:
            task.progress(phase="reading the captions")

            def progress(done: int, total: int) -> None:
                phase = "drawing with the base model" if done else "loading the base model, then drawing" if total \
                    else "all cached"
                task.progress(phase=phase, done=done, total=total, unit="images")

            return regularise(config, count=wanted, root=root, progress=progress, stop=task.stop)

        self.regularising.start(f"regularisation images of {Path(config.dataset.dir).name}", run,
                                refusal=WorkspaceError)
        return "Started: images already drawn for the same captions and settings are reused."

    def regularise_stop(self) -> str:
        self.regularising.stop()
        return "Stop requested: the images drawn so far are kept (a new start reuses them)."

    def poll_regularising(self, session: dict | None) -> tuple:
        """(status, progress, the *Use as regularisation folder* button, session)."""
        session = dict(session or {})
        task = self.regularising.task
        if not unseen(task, session):
            return (*(gr.skip(),) * 3, session)
        status, result = task.status_text(), task.result
        if not task.running and result is not None:
            removed = ", ".join(f"“{word}”" for word in result.trigger) or "nothing"
            status += (f" — **{len(result.paths)} of {len(result.prompts)} image(s)** in `{result.folder}` "
                       f"({result.reused} reused; removed from the captions: {removed})")
            status += (". Start again to draw the rest." if result.stopped else
                       ". *Use as the regularisation folder* sets dataset.reg_dir to it (Training tab → Advanced).")
        usable = not task.running and result is not None and bool(result.paths)
        return status, progress_html(task.fraction, task.progress_text()), gr.update(visible=usable), session

    def regularise_use(self) -> tuple[str, str]:
        """(dataset.reg_dir's new value: the last regularisation images' folder, message)."""
        task = self.regularising.task
        if task is None or task.running or task.result is None or not task.result.paths:
            raise WorkspaceError("generate regularisation images first")
        folder = self.ws.dataset_folder(str(task.result.folder))
        return (str(folder), f"dataset.reg_dir = `{folder}` ({len(task.result.paths)} image(s)): training keeps "
                             "what the base model draws for these captions, and measures the prior loss ratio on them.")

    # ================================================================ dataset report
    def report_start(self, *args) -> str:
        """Build the dataset report of the form's [dataset] settings in a server thread."""
        from trainer.dataset_report import build_report, render_contact_sheet, token_counter

        config = self.confine(self.config_from(args))
        base = Path(config.model.base).expanduser()
        counter = token_counter(str(base), subfolder="tokenizer") if (base / "tokenizer").is_dir() else None
        section, seed, batch = config.dataset, config.train.seed, config.train.batch_size
        sheets = self.ws.thumbnails / "reports"

        def run(task: Task) -> Any:
            def on_event(event: dict[str, Any]) -> None:
                if event["event"] == "report_progress":
                    task.progress(phase=event["phase"], done=event["done"], total=event["total"] or 0,
                                  eta=event.get("eta_s"), unit="images")

            report = build_report(section, seed=seed, batch_size=batch, tokenizer=counter, on_event=on_event,
                                  stop=task.stop)
            task.progress(phase="drawing the contact sheet")
            key = hashlib.sha1(f"{section.dir}|{time.time_ns()}".encode()).hexdigest()[:12]
            path = sheets / f"{Path(section.dir).name}-{key}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            render_contact_sheet(report).save(buffer, format="PNG")
            atomic_write_bytes(path, buffer.getvalue())
            return report, path

        self.reporting.start(f"the report of {Path(section.dir).name}", run, refusal=WorkspaceError)
        return ""

    def report_stop(self) -> str:
        self.reporting.stop()
        return "Stop requested."

    def poll_report(self, session: dict | None) -> tuple:
        """(status, progress, summary markdown, contact sheet, per-image table, session)."""
        session = dict(session or {})
        task = self.reporting.task
        if not unseen(task, session):
            return (*(gr.skip(),) * 5, session)
        summary, sheet, table = gr.skip(), gr.skip(), gr.skip()
        if not task.running and task.result is not None:
            report, path = task.result
            summary, table = report_markdown(report), report_table(report)
            sheet = str(path) if self.ws.is_served(path) else None
        return (task.status_text(), progress_html(task.fraction, task.progress_text()), summary, sheet, table,
                session)


def report_markdown(report: Any) -> str:
    """The report as the Dataset tab shows it: totals, buckets, warnings, duplicates, tags and caption lengths."""
    from trainer.dataset_report import CAPTION_TOKEN_LIMIT

    samples = sum(bucket["samples"] for bucket in report.buckets)
    settings = report.settings
    buckets = "on" if settings["enable_buckets"] else "**off** (square crops)"
    lines = [f"**{len(report.images)} image(s)**, {samples} sample(s) per epoch, {len(report.skipped)} skipped · "
             f"resolution {settings['resolution']} px, buckets {buckets}, crop {settings['crop']}", "",
             "| bucket | aspect | images | samples |", "|---|---|---|---|"]
    lines += [f"| {b['bucket'][0]}×{b['bucket'][1]} | {b['aspect']:.2f} | {b['images']} | {b['samples']} |"
              for b in report.buckets]
    if report.warnings:
        lines += ["", "**Warnings**"] + [f"- ⚠️ {warning['message']}" for warning in report.warnings]
    if report.duplicates:
        lines += ["", "**Duplicates**"] + [f"- {d['kind']}: " + ", ".join(f"`{Path(p).name}`" for p in d["paths"])
                                           for d in report.duplicates]
    top = sorted(report.tag_frequency.items(), key=lambda pair: (-pair[1], pair[0]))[:20]
    if top:
        lines += ["", "**Tag frequency**: " + ", ".join(f"{tag} ({count})" for tag, count in top)]
    tokens = [image.caption_tokens for image in report.images]
    if tokens:
        exact = "" if report.tokens["exact"] else "≈"
        lines += ["", f"**Caption length**: longest {exact}{max(tokens)} of {CAPTION_TOKEN_LIMIT} tokens (the "
                      f"77-token window less start and end), mean {exact}{sum(tokens) / len(tokens):.0f}; counted by "
                      f"{report.tokens['counter']}"]
    return "\n".join(lines)


def report_table(report: Any) -> dict[str, Any]:
    headers = ["image", "size", "aspect", "bucket", "scale", "cut away", "tokens", "caption", "warnings"]
    rows = [[image.name, f"{image.width}×{image.height}", f"{image.aspect:.2f}",
             f"{image.bucket[0]}×{image.bucket[1]}", f"×{image.scale:.2f}", f"{image.cropped_fraction:.0%}",
             str(image.caption_tokens), image.caption_status,
             "; ".join(w["code"].replace("_", " ") for w in image.warnings)] for image in report.images[:REPORT_ROWS]]
    return {"headers": headers, "data": rows}


# ====================================================================================================== layout
def task_controls(name: str, start_label: str) -> tuple[Any, ...]:
    """A background task's Start and Stop buttons, its click message, status line and progress bar (element ids
    ``<name>-start``, ``<name>-stop``, ``<name>-message``, ``<name>-status``, ``<name>-progress``)."""
    with gr.Row():
        start = gr.Button(start_label, variant="primary", elem_id=f"{name}-start")
        stop = gr.Button("Stop", variant="stop", elem_id=f"{name}-stop")
    return (start, stop, gr.Markdown(elem_id=f"{name}-message"), gr.Markdown(elem_id=f"{name}-status"),
            gr.HTML(progress_html(0, "idle"), elem_id=f"{name}-progress"))


def layout(ui: Any, L: Layout) -> None:
    with gr.Row():
        L.make("dataset.dir", scale=4)
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
    summary = gr.Markdown(elem_id="dataset-summary")
    gallery = gr.Gallery(label="Images (select one to edit its caption)", columns=6, height=420, allow_preview=False,
                         elem_id="dataset-gallery", object_fit="contain", fit_columns=False)
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
    status = gr.Markdown(elem_id="dataset-status")

    with gr.Accordion("Auto-caption", open=False, elem_id="auto-caption"):
        gr.Markdown("Write captions with a captioning model: BLIP, BLIP-2, GIT or Florence-2 (sentences) or a "
                    "WD-style tagger (tags), by hub id (downloaded on first use) or as a folder in the workspace's "
                    f"`models/` ({ui.ws.models}). Runs on the GPU when there is one.")
        with gr.Row():
            model = gr.Textbox(label="Captioning model", value="Salesforce/blip-image-captioning-base", scale=3,
                               elem_id="caption-model", info="hub id (owner/name) or a folder name in models/")
            kind = gr.Dropdown(choices=[("detect from the model", "auto"), ("captioner (sentences)", "captioner"),
                                        ("tagger (transformers)", "tagger"), ("tagger (ONNX)", "onnx_tagger")],
                               value="auto", label="Kind", elem_id="caption-kind")
            mode = gr.Dropdown(choices=CAPTION_MODES, value="skip_existing", label="Caption", elem_id="caption-mode")
        with gr.Row():
            prefix = gr.Textbox(label="Prefix", elem_id="caption-prefix")
            suffix = gr.Textbox(label="Suffix", elem_id="caption-suffix")
            caption_trigger = gr.Textbox(label="Trigger word (first, once)", elem_id="caption-trigger")
            prompt = gr.Textbox(label="Prompt / Florence-2 task", elem_id="caption-prompt",
                                info="text the caption starts with, or <CAPTION>, <DETAILED_CAPTION> …")
        with gr.Row():
            batch = gr.Number(value=4, precision=0, minimum=1, label="Batch size", elem_id="caption-batch")
            tokens = gr.Number(value=40, precision=0, minimum=1, label="Longest caption (tokens)",
                               elem_id="caption-tokens")
            threshold = gr.Number(value=0.35, minimum=0, maximum=1, label="Tag threshold", elem_id="caption-threshold")
            device = gr.Dropdown(choices=[("GPU when there is one", "auto"), ("CPU", "cpu"), ("GPU", "cuda")],
                                 value="auto", label="Device", elem_id="caption-device")
        caption_start, caption_stop, caption_message, caption_status, caption_progress = task_controls(
            "caption", "Caption images")
        caption_recent = gr.Markdown(elem_id="caption-recent")

    with gr.Accordion("Regularisation images", open=False, elem_id="regularisation"):
        gr.Markdown("Images the **base model** draws for your captions with the trigger word removed (the same as "
                    "`python -m trainer regularise`): trained as regularisation images (`dataset.reg_dir`), they "
                    "keep the model's own idea of the class, and the prior loss ratio is measured on them. Drawn "
                    "into the workspace's `datasets/regularisation/`; the same captions and settings reuse them.")
        reg_count = gr.Number(value=0, precision=0, minimum=0, label="Images (0 = one per training image)",
                              elem_id="regularise-count")
        reg_start, reg_stop, reg_message, reg_status, reg_progress = task_controls(
            "regularise", "Generate regularisation images")
        reg_use = gr.Button("Use as the regularisation folder", visible=False, elem_id="regularise-use")
    with gr.Accordion("Dataset report", open=False, elem_id="dataset-report"):
        gr.Markdown("What training will do with every image, with the settings of the other tabs: the bucket it "
                    "lands in and the part it keeps (the yellow box; the dimmed part is cut away), images that are "
                    "upscaled or heavily cropped, duplicates, missing or empty captions, caption length against "
                    "CLIP's 77-token window, and tag frequency.")
        report_start, report_stop, report_message, report_status, report_progress = task_controls(
            "report", "Build the report")
        report_summary = gr.Markdown(elem_id="report-summary")
        report_sheet = gr.Image(label="Contact sheet: crop boxes and warnings", type="filepath", interactive=False,
                                elem_id="report-sheet")
        report_images = gr.Dataframe(label="Per image", interactive=False, wrap=True, elem_id="report-images")
    L.tabs["dataset"] = {name: value for name, value in locals().items() if name not in ("ui", "L")}


def wire(ui: Any, L: Layout) -> None:
    s, guard, inputs = L.tabs["dataset"], L.guard, L.inputs
    extension, dataset_dir = L.comps["dataset.caption_extension"], L.comps["dataset.dir"]
    view = [s["gallery"], s["paths_state"], s["concept"], s["summary"]]
    s["view_outputs"] = view
    s["open_folder"].click(guard(ui.dataset_view, 4, 3), [dataset_dir, extension], view)
    dataset_dir.submit(guard(ui.dataset_view, 4, 3), [dataset_dir, extension], view)
    s["uploads"].upload(guard(ui.upload, 6, 1), [s["uploads"], dataset_dir, s["concept"], s["repeats"], extension],
                        [s["uploads"], s["upload_report"], *view])
    s["gallery"].select(guard(ui.select_image, 3, 2), [s["paths_state"], extension],
                        [s["selected"], s["caption"], s["selected_label"]])
    for trigger in (s["save_caption"].click, s["caption"].submit):
        trigger(guard(ui.save_caption, 5, 0), [dataset_dir, s["selected"], s["caption"], extension],
                [s["status"], *view])
    s["trigger_button"].click(guard(ui.add_trigger, 6, 0), [dataset_dir, s["trigger"], extension, s["selected"]],
                              [s["status"], s["caption"], *view])
    s["replace_button"].click(guard(ui.find_replace, 6, 0),
                              [dataset_dir, s["find"], s["replace"], extension, s["selected"]],
                              [s["status"], s["caption"], *view])
    s["repeats_button"].click(guard(ui.set_repeats, 5, 0), [dataset_dir, s["concept"], s["repeats"], extension],
                              [s["status"], *view]).then(lambda: ("", "", "Select an image."), None,
                                                         [s["selected"], s["caption"], s["selected_label"]])
    s["delete_button"].click(guard(ui.delete_image, 7, 2), [dataset_dir, s["selected"], extension],
                             [s["selected"], s["caption"], s["status"], *view])
    caption_inputs = [dataset_dir, extension, s["model"], s["kind"], s["mode"], s["prefix"], s["suffix"],
                      s["caption_trigger"], s["prompt"], s["batch"], s["tokens"], s["threshold"], s["device"]]
    s["caption_start"].click(guard(ui.caption_start, 1, 0), caption_inputs, [s["caption_message"]],
                             concurrency_limit=1)
    s["caption_stop"].click(guard(ui.caption_stop, 1, 0), None, [s["caption_message"]])
    caption_session = gr.State({})
    L.poll(ui.poll_captioning, [caption_session, dataset_dir, extension],
           [s["caption_status"], s["caption_progress"], s["caption_recent"], *view, caption_session])
    s["reg_start"].click(guard(ui.regularise_start, 1, 0), [s["reg_count"], *inputs], [s["reg_message"]],
                         concurrency_limit=1)
    s["reg_stop"].click(guard(ui.regularise_stop, 1, 0), None, [s["reg_message"]])
    s["reg_use"].click(guard(ui.regularise_use, 2, 1), None, [L.comps["dataset.reg_dir"], s["reg_message"]])
    reg_session = gr.State({})
    L.poll(ui.poll_regularising, [reg_session], [s["reg_status"], s["reg_progress"], s["reg_use"], reg_session])
    s["report_start"].click(guard(ui.report_start, 1, 0), inputs, [s["report_message"]], concurrency_limit=1)
    s["report_stop"].click(guard(ui.report_stop, 1, 0), None, [s["report_message"]])
    report_session = gr.State({})
    L.poll(ui.poll_report, [report_session], [s["report_status"], s["report_progress"], s["report_summary"],
                                               s["report_sheet"], s["report_images"], report_session])
