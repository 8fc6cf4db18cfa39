"""The Training tab: Start (which queues when a job runs), Stop, the queue, continuing a run from its saved state,
and the running job's phase, progress, loss plot, previews and log.

Every Start goes through the workspace's queue (:meth:`ui.jobs.JobRunner.submit`): it runs at once when nothing
else does, else waits its turn; the queue is listed with its order and can be changed. A run that stopped or
finished with resumable state (``output.save_state``) can be resumed, or trained N steps further, from that state
(``train(config, resume=state)``); a finished run goes on in its own name, its first final file kept under its step
name (the trainer's "extending a finished run").
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import gradio as gr

from trainer.config import TrainerConfig
from trainer.prior import CHECKPOINTS_FILE

from . import form
from .common import Layout, job_controls, progress_html
from .jobs import JobError, JobRecord
from .results_tab import checkpoint_controls, wire_checkpoint_controls
from .views import JobView

LOG_SHOWN = 200  # log lines sent to the page (newest first)
PREVIEWS_SHOWN = 24
SMOOTHING = 0.6  # the loss plot's default EMA smoothing (TensorBoard's)
SECTION_TITLES = {"dit": "SD3 / FLUX.1 (flow matching)"}


class TrainingCallbacks:
    """Mixed into :class:`ui.app.RankwrightUI`."""

    tensorboard_url: str | None = None

    # ================================================================ start, stop
    def start(self, *args) -> tuple[str, dict]:
        config = self.confine(self.config_from(args))
        self.remember(config)
        warning = self.crop_warning(config)
        record = self.runner.submit(config)
        return self._submitted(record, f"{config.network.method} → `{record.output_dir}/{config.output.name}"
                                       ".safetensors`") + (f"\n\n⚠️ {warning}" if warning else ""), {}

    def _submitted(self, record: JobRecord, what: str) -> str:
        command = form.cli_command(record.config_path)
        position = self.runner.position(record.id)
        if position is None:
            gr.Info("Training started")
            return f"Started job `{record.id}`: {what}. Same run from a shell: `{command}`"
        gr.Info(f"Queued at position {position}")
        return (f"Queued job `{record.id}` at position {position}: {what}. It starts when the jobs before it end; "
                "reorder or remove it under *Queue*.")

    def crop_warning(self, config: TrainerConfig) -> str:
        """A sentence when buckets are off and some images are not square (training crops them), else ""."""
        if config.dataset.enable_buckets:
            return ""
        from trainer.dataset import image_files, inspect_image

        cropped = 0
        for path in image_files(config.dataset.dir)[:2000]:
            try:
                height, width = inspect_image(path, config.dataset.max_pixels)[:2]
            except Exception:  # the trainer reports unusable files itself
                continue
            cropped += width != height
        if not cropped:
            return ""
        return (f"Aspect-ratio buckets are off: {cropped} non-square image(s) are cropped to a square. Tick "
                "*Aspect-ratio buckets* (Advanced) to keep them whole; the Dataset tab's report shows the crops.")

    def stop(self) -> str:
        record = self.own_job(self.runner.current())
        if record is None:
            raise JobError("No training job is running.")
        self.runner.stop()
        view = self.runner.view(record)
        if record.kind == "compare" and view.phase.name in ("rendering", "scoring", "loading") \
                and view.finished_runs >= len(view.methods or [1]):
            return f"Stop requested for `{record.id}`: the rendering ends within a denoising step."
        if record.kind == "compare":
            return (f"Stop requested for `{record.id}`: the current method saves and ends within seconds; the "
                    "methods that finished are still rendered (press Stop again to skip that).")
        return f"Stop requested for `{record.id}`: it saves the adapter and ends within seconds."

    # ================================================================ the running job
    def poll(self, session: dict | None, adapter: str | None = None, smoothing: float = SMOOTHING,
             log_scale: bool = False, visible_tab: str = "training") -> tuple:
        """Timer tick: the current job's status, progress, loss plot, previews, log, the saved files and the runs
        that can be continued; nothing is re-sent while nothing changed. The plot is sent only while the Training
        tab shows (a chart drawn while hidden has no size; selecting the tab draws it, see :meth:`replot`)."""
        return self._tick(self.runner.current,
                          lambda record, view, shown: self._show_job(record, view, shown, adapter, smoothing,
                                                                     log_scale, visible_tab == "training"),
                          lambda: self._no_job(adapter), 9, session)

    def poll_save(self, session: dict | None) -> tuple:
        """Timer tick: (the refused-save box's visibility, its question, session) — shown while the running job's
        last save waits for an answer; nothing re-sent while that does not change."""
        session = dict(session or {})
        record = self.own_job(self.runner.current())
        question = None
        if record is not None and record.kind == "train":
            view = self.runner.view(record)
            question = None if view.finished else view.save_question
        key = question["id"] if question else None
        if "question" in session and session["question"] == key:
            return gr.skip(), gr.skip(), session
        session["question"] = key
        return gr.update(visible=question is not None), save_question_text(question) if question else "", session

    def save_answer(self, action: str) -> str:
        """The user's answer to the running job's refused save: ``retry`` or ``rescue``."""
        record = self.own_job(self.runner.current())
        if record is None:
            raise JobError("No training job is running.")
        question = self.runner.answer_save(record, action)
        if action == "retry":
            return (f"Retrying the save of `{code_text(question['path'])}`; the log says whether it worked (if not, "
                    "you are asked again).")
        return "Saving to the rescue folder; the log and the status line name the file."

    def poll_checkpoints(self, session: dict | None, selected: str | None = None) -> tuple:
        """Timer tick: (the prior loss ratio line, the run's checkpoints table, the checkpoint dropdown, the run
        folder and name, session) of the current training job; re-sent when a ratio or a save arrives."""
        session = dict(session or {})
        record = self.own_job(self.runner.current())
        view = self.runner.view(record) if record is not None and record.kind == "train" else None
        # checkpoints.json is rewritten just after a save's event: its time stamp says when to read it again
        listed = Path(record.output_dir) / CHECKPOINTS_FILE if view else None
        key = (record.id, len(view.prior_ratios), listed.stat().st_mtime_ns if listed.is_file() else 0) \
            if view else None
        if "checkpoints" in session and session["checkpoints"] == key:
            return (*(gr.skip(),) * 5, session)
        session["checkpoints"] = key
        if view is None:
            return "", *self.checkpoints_of(None), "", "", session
        try:
            stop_ratio = TrainerConfig.load(record.config_path).train.prior_stop_ratio
        except Exception:  # an old job's settings: the ratio without its stop
            stop_ratio = 0.0
        return (prior_ratio_text(view, stop_ratio),
                *self.checkpoints_of(record.output_dir, selected, record.output_name), record.output_dir,
                record.output_name, session)

    def _no_job(self, adapter: str | None) -> tuple:
        return ("No training job yet.", progress_html(0, "idle"), gr.skip(), [], "", *self.results(adapter),
                gr.update(choices=self.resumable_runs()))

    def _show_job(self, record: Any, view: JobView, session: dict, adapter: str | None = None,
                  smoothing: float = SMOOTHING, log_scale: bool = False, plot_shown: bool = True) -> tuple:
        skip = gr.skip()
        status = f"**{view.status_text()}** — job `{record.id}` · {record.output_name}"
        if view.finished and view.output and not self.ws.is_served(view.output):
            status += (f"\n\n⚠️ The adapter was saved outside the workspace, to `{code_text(view.output)}`: the UI "
                       f"does not serve it (copy it into `{code_text(str(self.ws.outputs))}` to download it here).")
        progress = progress_html(view.fraction, view.progress_text())
        plot = skip
        points = (len(view.losses), sum(len(v) for v in view.series.values()))
        if points != session.get("losses") and plot_shown:
            session["losses"] = points
            plot = loss_plot(view, smoothing, log_scale)
        previews = skip
        if len(view.previews) != session.get("previews"):
            session["previews"] = len(view.previews)
            previews = [(p, view.preview_captions.get(p, Path(p).name))
                        for p in self.servable(newest_first(view.previews))][:PREVIEWS_SHOWN]
        log_text = "\n".join(itertools.islice(reversed(view.log), LOG_SHOWN))
        files = (skip,) * 3
        runs = skip
        if (len(view.saves), view.finished) != session.get("saves"):
            session["saves"] = (len(view.saves), view.finished)
            files = self.results(adapter)
            runs = gr.update(choices=self.resumable_runs())
        return status, progress, plot, previews, log_text, *files, runs

    def _tick(self, find, show, idle, outputs: int, session: dict | None) -> tuple:
        """One timer tick of a tab showing a job: ``idle()`` when there is none, nothing re-sent while the job's
        view is unchanged, else ``show(record, view, session)``; the session state comes last. (An error is the
        timer's to log: :meth:`ui.common.Layout.wire_polls`.)"""
        session = dict(session or {})
        skips = (gr.skip(),) * outputs
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

    def replot(self, smoothing: float, log_scale: bool) -> Any:
        record = self.own_job(self.runner.current())
        if record is None:
            return gr.skip()
        return loss_plot(self.runner.view(record), smoothing, log_scale)

    # ================================================================ the queue
    def poll_queue(self, session: dict | None) -> tuple:
        """(the queue's table, the queued-job dropdown, session); nothing re-sent while the queue is unchanged."""
        session = dict(session or {})
        queued = [record for record in self.runner.queue() if self.own_job(record) is not None]
        signature = [record.id for record in queued]
        if session.get("queue") == signature:
            return gr.skip(), gr.skip(), session
        session["queue"] = signature
        table = "No job is waiting." if not queued else "\n".join(
            ["| # | job | kind | output | what |", "|---|---|---|---|---|"]
            + [f"| {position} | `{record.id}` | {record.label} | {record.output_name} | {record.description} |"
               for position, record in enumerate(queued, start=1)])
        choices = [(f"{position}. {record.output_name} ({record.description})", record.id)
                   for position, record in enumerate(queued, start=1)]
        return table, gr.update(choices=choices, value=choices[0][1] if choices else None), session

    def queue_move(self, job_id: str | None, offset: int) -> str:
        if not job_id:
            raise JobError("choose a queued job first")
        position = self.runner.move(job_id, offset)
        return f"Job `{job_id}` is now at position {position}."

    def queue_remove(self, job_id: str | None) -> str:
        if not job_id:
            raise JobError("choose a queued job first")
        record = self.runner.remove(job_id)
        return f"Removed `{record.id}` ({record.output_name}) from the queue."

    # ================================================================ continuing a run
    def resumable_runs(self) -> list[tuple[str, str]]:
        """Training runs of this workspace that ended with resumable state, newest first: (label, job id)."""
        runs = []
        for record in self.runner.history():
            if record.kind != "train" or self.own_job(record) is None:
                continue
            view = self.runner.view(record)
            if not view.finished or view.status not in ("done", "stopped") or not self._state_of(view):
                continue
            ended = f"stopped at step {view.step}/{view.total}" if view.status == "stopped" else \
                f"finished, {view.step} steps"
            runs.append((f"{record.output_name} — {ended} ({record.id})", record.id))
        return runs

    def _state_of(self, view: JobView) -> Path | None:
        """The run's last resumable state folder, if it is one of this workspace's outputs."""
        if not view.state:
            return None
        from .workspace import is_within

        folder = Path(view.state).resolve()
        return folder if folder.is_dir() and is_within(folder, self.ws.outputs) else None

    def _run_to_continue(self, job_id: str | None) -> tuple[JobRecord, JobView, Path, TrainerConfig]:
        record = self.own_job(self.runner.record(job_id or ""))
        if record is None or record.kind != "train":
            raise JobError("choose a training run from the list (refresh it after a run ends)")
        view = self.runner.view(record)
        state = self._state_of(view) if view.finished else None
        if state is None:
            raise JobError(f"{record.output_name} has no resumable state (output.save_state was off, or it is "
                           "still running)")
        return record, view, state, TrainerConfig.load(record.config_path)

    def resume(self, job_id: str | None) -> str:
        """Continue a stopped run from its last save to the steps it was started with."""
        record, view, state, config = self._run_to_continue(job_id)
        if view.status != "stopped":
            raise JobError(f"{record.output_name} finished all its {view.step} steps: use “Train N more steps”")
        config = self.confine(config)
        queued = self.runner.submit(config, resume=state, description=f"resume {record.output_name} from step "
                                                                        f"{view.step} to {view.total}")
        return self._submitted(queued, f"{record.output_name} from step {view.step} to {view.total}")

    def train_more(self, job_id: str | None, steps: float | None) -> str:
        """Train a run ``steps`` further from its last save. A finished run goes on in its own name: the trainer
        keeps its final file as ``<name>-step<N>.safetensors`` and writes the new final file."""
        if steps in (None, "") or not float(steps).is_integer() or float(steps) < 1:
            raise JobError(f"give the number of steps to add (a whole number ≥ 1), got {steps!r}")
        record, view, state, config = self._run_to_continue(job_id)
        total = view.step + int(steps)
        config = self.confine(config.with_overrides([f"train.max_steps={total}", "train.epochs=0"]))
        queued = self.runner.submit(config, resume=state, description=f"{record.output_name} +{int(steps)} steps "
                                                                        f"(to {total})")
        kept = (f"; the finished file is kept as `{config.output.name}-step{view.step:06d}.safetensors`"
                if view.status == "done" else "")
        return self._submitted(queued, f"{record.output_name} from step {view.step} to {total}{kept}")


# ====================================================================================================== rendering
def code_text(text: str) -> str:
    """``text`` made safe inside Markdown inline code (a path may hold backticks)."""
    return str(text).replace("`", "'")


def save_question_text(question: dict[str, Any]) -> str:
    """What the refused-save box says: which file, why, the space needed and free, what each button does."""
    import time

    needed, free = question.get("needed_mb"), question.get("free_mb")
    space = f"It needs about **{needed} MB**" if needed is not None else "Its size is unknown"
    space += f"; **{free} MB** are free there." if free is not None else "."
    folders = question.get("rescue_folders")
    folders = ", ".join(f"`{code_text(f)}`" for f in folders) if isinstance(folders, list) and folders else \
        "the rescue folders"
    deadline = question.get("deadline")
    until = (f" Without an answer by {time.strftime('%H:%M', time.localtime(deadline))} it goes to the rescue "
             "folder." if isinstance(deadline, int | float) else "")
    return (f"### ⚠️ The adapter could not be saved\n\nWriting `{code_text(question.get('path', '?'))}` failed at step "
            f"{question.get('step', '?')}: **{question.get('reason', 'refused')}**. {space}\n\n"
            "The trained weights are kept in memory. Free some space (or make the folder writable) and press "
            f"**Retry save**, or **Save to the rescue folder** (the first writable of {folders}; outside the "
            f"workspace, so the UI names the file but does not serve it).{until}")


def prior_ratio_text(view: JobView, stop_ratio: float = 0.0) -> str:
    """The prior loss ratio now, its highest and the last few, with what 1.0 means; "" while none was measured."""
    if not view.prior_ratios:
        return ""
    step, ratio = view.prior_ratios[-1]
    high_step, high = max(view.prior_ratios, key=lambda point: (point[1], -point[0]))
    recent = " → ".join(f"{value:.4f}" for _, value in view.prior_ratios[-5:])
    stop = f"; the run stops above {stop_ratio:g} (train.prior_stop_ratio)" if stop_ratio > 0 else ""
    return (f"**Prior loss ratio {ratio:.4f}** at step {step} (1.0 = unchanged: the base model's behaviour on "
            f"unrelated images is kept; higher = the adapter bleeds into them) · highest {high:.4f} at step "
            f"{high_step} · last: {recent}{stop}")


def newest_first(previews: list[str]) -> list[str]:
    """Preview files (``step000050_0.png``, ``step000050_1.png``, …) with the latest step first and each step's
    prompts in order: the newest previews show what the adapter does now, without scrolling."""
    batches = [list(batch) for _, batch in itertools.groupby(previews, key=lambda p: Path(p).name.rsplit("_", 1)[0])]
    return [path for batch in reversed(batches) for path in batch]


def loss_plot(view: JobView, smoothing: float = SMOOTHING, log_scale: bool = False) -> Any:
    """The loss plot's new value: the whole plot (not only its data), so that series which appear later — the
    smoothed curve, validation or prior losses — are drawn too (an update of the data alone keeps the first
    series' colours and drops the others)."""
    frame = loss_frame(view, smoothing, log_scale)
    if frame is None:  # an empty plot, not None: a chart taken off the page while hidden breaks Gradio's resizing
        import pandas as pd

        frame = pd.DataFrame(columns=["step", "loss", "series"])
    return gr.LinePlot(value=frame, colors_in_legend=list(dict.fromkeys(frame["series"])),
                       y_title="log10(loss)" if log_scale else "loss")


def loss_frame(view: JobView, smoothing: float = SMOOTHING, log_scale: bool = False) -> Any:
    """The loss plot's data: the training loss (raw and smoothed) and any validation/prior series, by step;
    ``log_scale`` plots log10 of the values (the plot's y axis says so)."""
    import pandas as pd

    from trainer.plots import ema

    if not view.losses:
        return None
    steps = [step for step, _ in view.losses]
    raw = [value for _, value in view.losses]
    series = {"loss": list(zip(steps, raw))}
    smoothing = float(smoothing or 0.0)
    if 0 < smoothing < 1 and len(raw) > 1:
        series = {"loss (raw)": series["loss"], "loss (smoothed)": list(zip(steps, ema(raw, smoothing)))}
    series.update(view.series)
    rows = []
    for name, points in series.items():
        for step, value in points:
            if log_scale:
                if value <= 0:
                    continue
                value = math.log10(value)
            rows.append({"step": step, "loss": value, "series": name})
    return pd.DataFrame(rows, columns=["step", "loss", "series"])


# ====================================================================================================== layout
def layout(ui: Any, L: Layout) -> None:
    with gr.Row():
        preset = gr.Dropdown(choices=ui.preset_choices(), value=None, label="Preset", elem_id="preset", scale=3,
                             info="presets/*.toml and presets saved in the workspace")
        load_preset = gr.Button("Load preset", scale=1, elem_id="load-preset")
    sections = ("train", "sample", "output", "dataset", "dit")
    main_keys = [k for s in sections for k in L.keys_of(s) if L.fields[k].main and k != "dataset.dir"]
    L.grid(main_keys, 4)
    with gr.Accordion("Advanced", open=False, elem_id="advanced"):
        for section in sections:
            gr.Markdown(f"**{SECTION_TITLES.get(section, section.capitalize())}**")
            L.grid([k for k in L.keys_of(section) if not L.fields[k].main and k not in form.FORGETTING_KEYS], 4)
        gr.Markdown("**Keep the model (forgetting)**\n\nHow much the adapter changes what the base model already "
                    "draws: the *prior loss ratio* (1.0 = unchanged, higher = it bleeds into unrelated prompts) is "
                    "measured every N steps on regularisation images (the Dataset tab generates them) or on images "
                    "the base model draws for the prior prompts; each save lists it in the run's checkpoints, "
                    "where the best trade-off is picked. *Output preservation* holds the adapted model to the base "
                    "model's output for the training images captioned without the trigger word, so the concept "
                    "stays with its trigger (steps take about twice as long). *Trigger vectors* (pivotal tuning) "
                    "train the trigger word's own token vectors with the adapter, so the word carries the concept; "
                    "they are saved beside the adapter as `<name>_emb.safetensors`.", elem_id="forgetting")
        L.grid(list(form.FORGETTING_KEYS), 3)
    effective = gr.Markdown(elem_id="effective-training")
    start, stop, message, status, progress = job_controls(
        "Start training", "No training job yet.", ids=("start", "stop", "job-message", "job-status", "progress"))
    with gr.Column(visible=False, elem_id="save-failed") as save_box:
        save_question = gr.Markdown(elem_id="save-question")
        with gr.Row():
            save_retry = gr.Button("Retry save", variant="primary", elem_id="save-retry")
            save_rescue = gr.Button("Save to the rescue folder", elem_id="save-rescue")
    with gr.Accordion("Queue", open=True, elem_id="queue"):
        gr.Markdown("Jobs started while another runs wait here and run one at a time, first to last; the queue "
                    "is kept in the workspace (a reload or a server restart finds it).")
        queue_table = gr.Markdown("No job is waiting.", elem_id="queue-table")
        with gr.Row():
            queue_select = gr.Dropdown(label="Queued job", choices=[], elem_id="queue-select", scale=3)
            queue_up = gr.Button("Move up", elem_id="queue-up", scale=1)
            queue_down = gr.Button("Move down", elem_id="queue-down", scale=1)
            queue_remove = gr.Button("Remove", elem_id="queue-remove", variant="stop", scale=1)
        queue_message = gr.Markdown(elem_id="queue-message")
    with gr.Accordion("Continue a run", open=False, elem_id="continue"):
        with gr.Row():
            resume_run = gr.Dropdown(label="Run (with saved state)", choices=ui.resumable_runs(), elem_id="resume-run",
                                     scale=3)
            resume_button = gr.Button("Resume", elem_id="resume", scale=1)
            more_steps = gr.Number(value=100, precision=0, minimum=1, label="Steps to add", elem_id="more-steps",
                                   scale=1)
            more_button = gr.Button("Train N more steps", elem_id="train-more", scale=1)
        resume_message = gr.Markdown(elem_id="resume-message")
    with gr.Row():
        with gr.Column(scale=3):
            loss_plot = gr.LinePlot(x="step", y="loss", color="series", label="Loss", elem_id="loss-plot",
                                    x_title="step", y_title="loss")
            with gr.Row():
                smoothing = gr.Slider(0.0, 0.99, value=SMOOTHING, step=0.01, label="Smoothing", elem_id="smoothing")
                log_scale = gr.Checkbox(label="Log scale (log10)", value=False, elem_id="log-scale")
        previews = gr.Gallery(label="Previews (newest first)", columns=3, height=320, elem_id="previews",
                              allow_preview=True, scale=2)
    prior_ratio = gr.Markdown(elem_id="prior-ratio")
    checkpoints = checkpoint_controls("checkpoints")
    log_box = gr.Textbox(label="Log (newest first)", lines=12, max_lines=12, elem_id="log", elem_classes="rw-mono",
                         interactive=False)
    tensorboard = gr.Markdown(ui.tensorboard_text(), elem_id="tensorboard")
    L.tabs["training"] = {name: value for name, value in locals().items() if name not in ("ui", "L", "sections")}


def wire(ui: Any, L: Layout) -> None:
    s, guard, inputs = L.tabs["training"], L.guard, L.inputs
    results = L.tabs["results"]
    session = gr.State({})
    s["start"].click(guard(ui.start, 2, 0), inputs, [s["message"], session], concurrency_limit=1)
    s["stop"].click(guard(ui.stop, 1, 0), None, [s["message"]])
    s["load_preset"].click(guard(ui.load_preset, len(inputs) + 1, len(inputs)), [s["preset"], *inputs],
                           [*inputs, s["message"]])
    outputs = [s["status"], s["progress"], s["loss_plot"], s["previews"], s["log_box"], results["train_files"],
               results["compare_files"], results["adapter"], s["resume_run"], session]
    L.poll(ui.poll, [session, results["adapter"], s["smoothing"], s["log_scale"], L.visible_tab], outputs)
    gr.on([s["smoothing"].release, s["log_scale"].change, L.tab_components["training"].select], ui.replot,
          [s["smoothing"], s["log_scale"]], [s["loss_plot"]], show_progress="hidden")
    save_session = gr.State({})
    L.poll(ui.poll_save, [save_session], [s["save_box"], s["save_question"], save_session])
    s["save_retry"].click(guard(lambda: ui.save_answer("retry"), 1, 0), None, [s["message"]])
    s["save_rescue"].click(guard(lambda: ui.save_answer("rescue"), 1, 0), None, [s["message"]])
    checkpoints, checkpoint_session = s["checkpoints"], gr.State({})
    L.poll(ui.poll_checkpoints, [checkpoint_session, checkpoints["choice"]],
           [s["prior_ratio"], checkpoints["table"], checkpoints["choice"], checkpoints["run"],
            checkpoints["name"], checkpoint_session])
    wire_checkpoint_controls(ui, L, checkpoints)
    queue_session = gr.State({})
    L.poll(ui.poll_queue, [queue_session], [s["queue_table"], s["queue_select"], queue_session])
    s["queue_up"].click(guard(lambda job: ui.queue_move(job, -1), 1, 0), [s["queue_select"]], [s["queue_message"]])
    s["queue_down"].click(guard(lambda job: ui.queue_move(job, 1), 1, 0), [s["queue_select"]], [s["queue_message"]])
    s["queue_remove"].click(guard(ui.queue_remove, 1, 0), [s["queue_select"]], [s["queue_message"]])
    s["resume_button"].click(guard(ui.resume, 1, 0), [s["resume_run"]], [s["resume_message"]])
    s["more_button"].click(guard(ui.train_more, 1, 0), [s["resume_run"], s["more_steps"]], [s["resume_message"]])
